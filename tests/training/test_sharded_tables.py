"""Memory tables sharded by row owner across processes (gloo, CPU), against one process on the global batch.

`sharded_worker.py` trains a tiny MemoryLlama (Engram table, chapter bank, product-key values) under
`torch.distributed.run` with its tables sharded, wrapped by DDP (tables ignored) or FSDP2 (`fully_shard`
directly, tables as ignored parameters: accelerate drops FSDP on CPU), with gradient clipping that binds. The
reference is the same model, optimizer and batch in this process, unsharded and unwrapped, clipped by torch's
`clip_grad_norm_`. Tolerances (fp32): losses and gradient norms rtol 1e-5 (sums in another order); the saved
checkpoint, loaded in one process, gives the sharded model's logits to atol 1e-5, and the reference's to 1e-3 (Adam's
first steps are +-lr wherever a gradient is not ~0, so summation-order noise in a near-zero gradient moves a
weight by up to 2 lr); rows no step read bit-identical.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

from training_helpers import save_tiny_model

import sharded_worker

WORKER = os.path.join(os.path.dirname(__file__), "sharded_worker.py")
MEMORY = dict(
    pkm_layers=[1], pkm_num_keys=6, pkm_top_k=3, pkm_heads=2, pkm_key_dim=8, router_aux_loss_coef=0.0, router_z_loss_coef=0.01
)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("sharded") / "model", **MEMORY)


@pytest.fixture(scope="module")
def reference(model_dir, tmp_path_factory):
    """One process, the whole global batch, whole tables."""
    from modeling_memory import MemoryLlamaForCausalLM

    torch.set_num_threads(1)
    model = MemoryLlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    optimizer = sharded_worker.build_optimizer(model)
    data = sharded_worker.global_batch(model.config.vocab_size)
    losses, norms = [], []
    for step in range(sharded_worker.STEPS):
        loss = model(input_ids=data[step], labels=data[step]).loss
        loss.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), sharded_worker.MAX_GRAD_NORM)))
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
    saved = tmp_path_factory.mktemp("reference")
    model.save_pretrained(saved)
    return {"losses": losses, "norms": norms, "dir": saved}


def _launch(model_dir, out, wrapper: str, processes: int) -> list[dict]:
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
        WORKER, str(model_dir), str(out), wrapper,
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(sys.path), TRANSFORMERS_VERBOSITY="error")
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-5000:]
    return [json.load(open(os.path.join(out, f"rank-{rank}.json"))) for rank in range(processes)]


def _tables(path) -> dict[str, torch.Tensor]:
    from modeling_memory import MemoryLlamaForCausalLM

    model = MemoryLlamaForCausalLM.from_pretrained(path, dtype=torch.float32)
    return {name: module.weight.detach().clone() for name, module in model.memory_tables().items()}


def _logits(path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = sharded_worker.global_batch(model.config.vocab_size)[0]
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("wrapper, processes", [("ddp", 2), ("fsdp2", 2), ("ddp", 4), ("ddp-disk", 2)])
def test_sharded_training_matches_one_process(model_dir, reference, tmp_path, wrapper, processes):
    ranks = _launch(model_dir, tmp_path, wrapper, processes)
    # The processes really are different ranks, each holding a different block of every table.
    assert sorted(report["rank"] for report in ranks) == list(range(processes))
    initial = _tables(model_dir)
    for name, table in initial.items():
        rows, width = table.shape
        per_rank = -(-rows // processes)
        starts = [report["blocks"][name][0] for report in ranks]
        assert starts == [min(rank * per_rank, rows) for rank in range(processes)]
        numels = [report["blocks"][name][2] for report in ranks]
        assert sum(numels) == table.numel() and max(numels) == per_rank * width  # 1/N of the table each
        assert all(report["table_types"][name] == "DTensor" for report in ranks)
    for report in ranks:
        assert report["losses"] == pytest.approx(reference["losses"], rel=1e-5)
        assert report["norms"] == pytest.approx(reference["norms"], rel=1e-5)
        assert report["dcp_round_trip"] and report["bad_layouts_refused"]
    assert reference["norms"][0] > sharded_worker.MAX_GRAD_NORM  # clipping bound, so its factor was compared

    # The sharded run's checkpoint is an ordinary one: it loads in one process and computes what the reference does.
    saved_logits = _logits(tmp_path / "saved")
    torch.testing.assert_close(saved_logits, torch.load(tmp_path / "logits.pt"), rtol=0, atol=1e-5)
    torch.testing.assert_close(saved_logits, _logits(reference["dir"]), rtol=0, atol=1e-3)
    trained, expected = _tables(tmp_path / "saved"), _tables(reference["dir"])
    untouched = 0
    for name, before in initial.items():
        changed = (expected[name] != before).any(dim=1)
        untouched += int((~changed).sum())
        assert torch.equal(trained[name][~changed], before[~changed])  # rows no step read: bit-identical
        assert torch.equal((trained[name] != before).any(dim=1), changed)
    assert untouched > 0  # (the chapter bank is read whole by these steps; the Engram and value tables are not)


def test_tensor_parallel_backbone_with_sharded_tables(model_dir, tmp_path):
    """`from_pretrained(tp_plan="auto")` shards attention and MLP as Llama declares them (the config's
    base_model_tp_plan) while the tables are sharded by row owner; the logits are one process's (fp32, atol 1e-5),
    greedy generation with the cache gives its tokens, and the saved checkpoint loads whole in one process."""
    ranks = _launch(model_dir, tmp_path, "tp", 2)
    for report in ranks:
        assert report["q_proj_local_rows"] * 2 == report["q_proj_rows"]
    assert sum(report["table_rows"] for report in ranks) == _tables(model_dir)["model.layers.0.engram.table.weight"].shape[0]
    expected = _logits(model_dir)
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(_logits(tmp_path / "saved"), expected, rtol=0, atol=1e-5)  # saved whole, loads in one
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    prompts = sharded_worker.global_batch(model.config.vocab_size)[0][:2, :8]
    reference = model.generate(prompts, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    assert torch.equal(torch.load(tmp_path / "generated.pt"), reference)  # greedy decoding with the cache


def test_bad_sharding_requests_are_refused_before_any_work(model_dir, tmp_path, monkeypatch):
    """No process group (and no launcher), tables already placed off the device, more processes than rows."""
    from modeling_memory import MemoryLlamaForCausalLM
    from modeling_memory.memory_llama.table_sharding import rows_per_process

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    model = MemoryLlamaForCausalLM.from_pretrained(model_dir)
    with pytest.raises(RuntimeError, match="needs torch.distributed: launch with `torchrun`"):
        model.shard_memory_tables()
    with pytest.raises(RuntimeError, match="needs torch.distributed: launch with `torchrun`"):
        MemoryLlamaForCausalLM.from_pretrained(model_dir, shard_memory_tables=True)
    assert not model.memory_tables_sharded
    model.set_memory_placement("disk", str(tmp_path / "offload"))
    with pytest.raises(ValueError, match="Shard the memory tables before placing them"):
        model.shard_memory_tables()
    assert rows_per_process(10, 4, "t") == 3
    with pytest.raises(ValueError, match="Table t has 3 rows, too few to give each of 4 processes some"):
        rows_per_process(3, 4, "t")
