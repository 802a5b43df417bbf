"""`memory-llama train` under `accelerate launch` with 2 CPU processes (DDP, the packaged ddp_cpu
config) against the same run in one process with the same global batch; and FSDP requested on CPU
processes, which accelerate 1.15 does not support, refused with a clear error instead of silently
training plain data parallel. The one-process reference runs in the test process.

Same data order (sequential sampling), global batch 4 = 1 process x 2 rows x 2 accumulation steps =
2 processes x 1 row x 2 accumulation steps: the tables' sparse gradients accumulate over micro-batches
(DDP's no_sync) before DDP all-reduces them. The router z-loss is a per-token mean, so with full rows
the mean over micro-batches equals the whole-batch mean; the load-balancing loss is a product of batch
means and would differ between micro-batches of 2 rows and of 1, so it is switched off here (its
scaling is tested in test_trainer.py).
Tolerance (fp32): losses agree to rtol 1e-5 per step (gradient all-reduce sums in another order);
the saved models' logits to atol 1e-4.
"""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from memory_llama_cli.train_command import accelerate_config_path
from training_helpers import save_tiny_model

pytestmark = pytest.mark.slow

STEPS, GLOBAL_BATCH, ACCUMULATION, BLOCK = 4, 4, 2, 32


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("distributed")
    save_tiny_model(root / "model", router_aux_loss_coef=0.0, router_z_loss_coef=0.01)
    from modeling_memory.data.knowledge import KnowledgeSet

    with open(root / "train.txt", "w") as handle:
        handle.write("\n".join(KnowledgeSet.generate(40, seed=5).training_documents()) + "\n")
    return root


def _losses(output):
    with open(output / "trainer_state.json") as handle:
        losses = [entry["loss"] for entry in json.load(handle)["log_history"] if "loss" in entry]
    assert len(losses) == STEPS
    return losses


def _train(workspace, name, processes, config=None, extra=()):
    """`memory-llama train` with the global batch split over `processes`; under `accelerate launch` with
    `config`, else in this process (the one-process reference, without start-up cost)."""
    output = workspace / name
    train = [
        "train", str(workspace / "model"), "--data", str(workspace / "train.txt"),
        "--block-size", str(BLOCK), "--output_dir", str(output), "--max_steps", str(STEPS),
        "--per_device_train_batch_size", str(GLOBAL_BATCH // (processes * ACCUMULATION)),
        "--gradient_accumulation_steps", str(ACCUMULATION), "--learning_rate", "1e-2",
        "--logging_steps", "1", "--report_to", "none", "--seed", "0",
        *(() if "--save_strategy" in extra else ("--save_strategy", "no")),
        "--train_sampling_strategy", "sequential", "--disable_tqdm", "true", "--dataloader_pin_memory", "false",
        "--use_cpu", "true", *extra,
    ]
    if config is None:
        from memory_llama_cli import main

        assert main(train) == 0
        return output, _losses(output), ""
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
        "--num_processes", str(processes), "--main_process_port", str(_free_port()),
        "-m", "memory_llama_cli", *train,
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return output, _losses(output), result.stdout


def _logits(path):
    from modeling_memory.tools.loading import load_memory_llama

    model = load_memory_llama(str(path), dtype=torch.float32).eval()  # a full checkpoint, or an adapter with its memory
    ids = torch.arange(3, 3 + 2 * BLOCK).reshape(2, BLOCK) % model.config.vocab_size
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture(scope="module")
def single_process(workspace):
    return _train(workspace, "single", 1)


def test_two_ddp_processes_match_one(workspace, single_process):
    reference_dir, reference_losses, _ = single_process
    output, losses, stdout = _train(workspace, "ddp", 2, accelerate_config_path("ddp_cpu"))
    assert "MULTI_CPU on 2 process(es); 2 memory tables sharded by row owner" in stdout
    assert losses == pytest.approx(reference_losses, rel=1e-5)
    assert reference_losses[-1] < reference_losses[0]
    # The checkpoint is an ordinary one (each table whole, in a file of its own, written block by block by the two
    # processes) and loads with from_pretrained in one process.
    with open(output / "model.safetensors.index.json") as handle:
        files = set(json.load(handle)["weight_map"].values())
    assert files == {"model-00001-of-00001.safetensors", "memory-model.layers.0.engram.table.safetensors", "memory-model.chapter_bank.safetensors"}
    torch.testing.assert_close(_logits(output), _logits(reference_dir), rtol=0, atol=1e-4)


def test_lora_mode_with_sharded_memory_matches_one_process(workspace):
    """The LoRA mode trains the memory (tables included) beside the adapter: under 2 processes its tables are
    sharded, each process streams its blocks into the adapter folder's memory files, and the folder loads in one
    process with the one-process run's logits."""
    lora = ("--mode", "lora", "--lora-dropout", "0")  # dropout would draw differently in one process and in two
    reference, reference_losses, _ = _train(workspace, "lora_single", 1, extra=lora)
    output, losses, stdout = _train(workspace, "lora_ddp", 2, accelerate_config_path("ddp_cpu"), lora)
    assert "2 memory tables sharded by row owner" in stdout
    assert losses == pytest.approx(reference_losses, rel=1e-5)
    assert os.path.isfile(output / "memory-model.layers.0.engram.table.safetensors")
    torch.testing.assert_close(_logits(output), _logits(reference), rtol=0, atol=1e-4)


def test_two_processes_resume_exactly_and_refuse_another_count(workspace):
    """A run of 2 processes with sharded tables, checkpointed at step 2 and resumed from there in a new launch, ends
    bit for bit where the uninterrupted run ends (weights, table optimizer state per process, data order, RNG).
    Resuming that checkpoint in one process is refused before any step: its table optimizer state is per process."""
    config = accelerate_config_path("ddp_cpu")
    saving = ("--save_strategy", "steps", "--save_steps", "2")
    whole, whole_losses, _ = _train(workspace, "ddp_whole", 2, config, saving)
    assert {"table-optimizer-0-of-2.pt", "table-optimizer-1-of-2.pt"} <= set(os.listdir(whole / "checkpoint-2"))
    resumed, resumed_losses, _ = _train(
        workspace, "ddp_resumed", 2, config, (*saving, "--resume_from_checkpoint", str(whole / "checkpoint-2"))
    )
    assert resumed_losses == whole_losses
    torch.testing.assert_close(_logits(resumed), _logits(whole), rtol=0, atol=0)

    from memory_llama_cli import main

    with pytest.raises(SystemExit, match="written by a run of 2 processes; this run has 1"):  # before loading
        main(["train", str(workspace / "model"), "--data", str(workspace / "train.txt"), "--block-size", str(BLOCK),
              "--output_dir", str(workspace / "one"), "--max_steps", str(STEPS), "--report_to", "none", "--use_cpu",
              "true", "--resume_from_checkpoint", str(whole / "checkpoint-2")])


def test_fsdp_on_cpu_processes_is_refused_not_silently_replaced(workspace, monkeypatch):
    """`accelerate launch` with an FSDP config exports ACCELERATE_USE_FSDP=true to every process, but
    accelerate 1.15 only honours it on GPU-like process groups; TrainingArguments' own --fsdp goes the
    same way. Both are refused on CPU (checked in one process: the check reads exactly that state)."""
    from memory_llama_cli import main

    arguments = ["train", str(workspace / "model"), "--data", str(workspace / "train.txt"), "--block-size", str(BLOCK),
                 "--max_steps", "1", "--report_to", "none", "--use_cpu", "true"]
    with pytest.raises(SystemExit, match="FSDP was requested, but these are CPU processes"):
        main([*arguments, "--output_dir", str(workspace / "fsdp_cli"), "--fsdp", "full_shard auto_wrap"])
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(SystemExit, match="FSDP was requested, but these are CPU processes"):
        main([*arguments, "--output_dir", str(workspace / "fsdp_env")])
    assert not (workspace / "fsdp_cli").exists() and not (workspace / "fsdp_env").exists()
