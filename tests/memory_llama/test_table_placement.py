"""Memory tables on the host and on disk (`table_placement.py`) compute exactly what tables on the device compute:
in every forward and generation mode, in training (the rows reach the working copy's file), and through a
checkpoint. The reference is always the same model with its tables on the device."""

import copy
import json
import os

import pytest
import torch
from safetensors import safe_open

from conftest import PAD, random_ids, tiny_config, wake_memory
from modeling_memory import MemoryLlamaForCausalLM
from modeling_memory.memory_llama import table_placement
from modeling_memory.memory_llama.table_placement import (
    deferred_memory_tables,
    map_safetensors_shared,
    write_safetensors_streaming,
)
from modeling_memory.training.table_optimizers import LazyAdam, RowWiseAdagrad

OFF_DEVICE = ["host", "disk"]


def every_table_config(**overrides):
    """All three table kinds: Engram at layer 0, product keys at layer 1, chapters at layer 2 (shared tables)."""
    fields = dict(pkm_layers=[1], pkm_num_keys=8, pkm_top_k=4, pkm_heads=2, pkm_key_dim=16)
    fields.update(overrides)
    return tiny_config(**fields)


@pytest.fixture(scope="module")
def device_model():
    torch.manual_seed(0)
    return wake_memory(MemoryLlamaForCausalLM(every_table_config())).eval()


def placed(model, placement, tmp_path):
    other = copy.deepcopy(model)
    return other.set_memory_placement(placement, str(tmp_path / "offload") if placement == "disk" else None)


def left_padded(seed, lengths=(11, 7, 4)):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.full((len(lengths), max(lengths)), PAD)
    mask = torch.zeros_like(ids)
    for row, length in enumerate(lengths):
        ids[row, -length:] = random_ids(1, length, generator)
        mask[row, -length:] = 1
    return ids, mask


@pytest.mark.parametrize("placement", OFF_DEVICE)
def test_placement_moves_every_table_and_nothing_else(device_model, placement, tmp_path):
    model = placed(device_model, placement, tmp_path)
    tables = model.memory_tables()
    assert sorted(tables) == ["model.chapter_bank.weight", "model.layers.0.engram.table.weight", "model.pkm_values.weight"]
    assert model.memory_placement == placement
    for name, param in model.named_parameters():
        torch.testing.assert_close(param, device_model.get_parameter(name), rtol=0, atol=0)
    if placement == "disk":
        files = sorted(os.listdir(tmp_path / "offload"))
        assert files == sorted(f"{name}.safetensors" for name in tables)
        for name, module in tables.items():  # each working copy is a valid safetensors file holding the table
            with safe_open(str(tmp_path / "offload" / f"{name}.safetensors"), "pt") as file:
                assert torch.equal(file.get_tensor(name), module.weight.detach())
    model.save_pretrained(tmp_path / "saved")
    assert "memory_placement" not in json.loads((tmp_path / "saved" / "config.json").read_text())


@pytest.mark.parametrize("placement", OFF_DEVICE)
def test_moving_the_model_leaves_off_device_tables_where_they_are(device_model, placement, tmp_path):
    model = placed(device_model, placement, tmp_path)
    before = {name: module.weight.data_ptr() for name, module in model.memory_tables().items()}
    model.to(torch.float64).half().float()
    assert model.model.embed_tokens.weight.dtype == torch.float32
    for name, module in model.memory_tables().items():
        assert module.weight.dtype == torch.float32 and module.weight.data_ptr() == before[name]
    model.set_memory_placement("device")
    assert model.memory_placement == "device" and not (placement == "disk" and os.listdir(tmp_path / "offload"))
    model.to(torch.float64)
    assert all(module.weight.dtype == torch.float64 for module in model.memory_tables().values())


@pytest.mark.parametrize("placement", OFF_DEVICE)
def test_forward_and_every_generation_mode_equal_device_tables(device_model, placement, tmp_path):
    model = placed(device_model, placement, tmp_path)
    ids, mask = left_padded(1)
    with torch.no_grad():
        assert torch.equal(model(ids, attention_mask=mask).logits, device_model(ids, attention_mask=mask).logits)
    greedy = dict(attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=PAD)
    for kwargs in (
        greedy,
        dict(greedy, use_cache=False),
        dict(greedy, cache_implementation="static"),
        dict(greedy, num_beams=3),
    ):
        assert torch.equal(model.generate(ids, **kwargs), device_model.generate(ids, **kwargs)), kwargs
    # Prompt-lookup decoding (one row) proposes tokens and crops the cache when they are rejected.
    repeated = torch.cat([ids[:1, -4:]] * 3, dim=1)
    assisted = dict(max_new_tokens=10, do_sample=False, pad_token_id=PAD, prompt_lookup_num_tokens=2)
    assert torch.equal(model.generate(repeated, **assisted), device_model.generate(repeated, **assisted))
    sampling = dict(attention_mask=mask, max_new_tokens=10, do_sample=True, top_k=0, pad_token_id=PAD)
    torch.manual_seed(3)
    sampled = model.generate(ids, **sampling)
    torch.manual_seed(3)
    assert torch.equal(sampled, device_model.generate(ids, **sampling))


@pytest.mark.parametrize("optimizer_class", [LazyAdam, RowWiseAdagrad])
def test_training_on_disk_equals_device_and_the_rows_reach_the_file(device_model, optimizer_class, tmp_path):
    """Three steps of a table optimizer: the same losses and tables as on the device; the working copy, read back
    through a separate (private) mapping of the file, holds the trained rows; rows no step read are unchanged."""
    reference = copy.deepcopy(device_model).train()
    model = placed(device_model, "disk", tmp_path).train()
    generator = torch.Generator().manual_seed(2)
    batches = [random_ids(2, 10, generator) for _ in range(3)]
    runs = []
    for trained in (reference, model):
        tables = [module.weight for module in trained.memory_tables().values()]
        optimizer = optimizer_class(tables, lr=0.1)
        losses = []
        for ids in batches:
            loss = trained(ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
        runs.append(losses)
    assert runs[0] == pytest.approx(runs[1], rel=1e-6)
    engram_key = "model.layers.0.engram.table.weight"
    before = device_model.get_parameter(engram_key)
    for name, module in model.memory_tables().items():
        torch.testing.assert_close(module.weight, reference.get_parameter(name), rtol=1e-6, atol=1e-7)
        with safe_open(str(tmp_path / "offload" / f"{name}.safetensors"), "pt") as file:
            assert torch.equal(file.get_tensor(name), module.weight.detach())
    changed = (model.get_parameter(engram_key) != before).any(dim=1)
    assert 0 < changed.sum() < changed.numel()


def test_checkpoint_of_off_device_tables_loads_with_plain_from_pretrained(device_model, tmp_path):
    model = placed(device_model, "disk", tmp_path)
    model.save_pretrained(tmp_path / "saved")
    files = sorted(os.listdir(tmp_path / "saved"))
    assert "model.safetensors.index.json" in files and "model.safetensors" not in files
    assert not any(name.endswith(".partial") for name in files)
    ids, mask = left_padded(5)
    reloaded = MemoryLlamaForCausalLM.from_pretrained(tmp_path / "saved").eval()
    assert reloaded.memory_placement == "device"
    with torch.no_grad():
        assert torch.equal(reloaded(ids, attention_mask=mask).logits, device_model(ids, attention_mask=mask).logits)
    # ... and straight onto disk again, in a new working copy (never the checkpoint's own file).
    again = MemoryLlamaForCausalLM.from_pretrained(
        tmp_path / "saved", memory_placement="disk", memory_offload_dir=str(tmp_path / "again")
    ).eval()
    assert again.memory_placement == "disk" and len(os.listdir(tmp_path / "again")) == 3
    with torch.no_grad():
        assert torch.equal(again(ids, attention_mask=mask).logits, device_model(ids, attention_mask=mask).logits)


def _anonymous_rss_bytes() -> int:
    with open("/proc/self/status") as file:
        for line in file:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no RssAnon")


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads Linux's /proc")
def test_a_table_goes_from_checkpoint_to_working_copy_and_back_without_a_copy_in_ram(tmp_path):
    """A 96 MiB Engram table: loading it to disk placement and saving it again stream it (the process's anonymous
    memory grows by far less than the table)."""
    config = tiny_config(engram_table_size=196_613, engram_dim=128, chapter_layers=[])
    torch.manual_seed(0)
    MemoryLlamaForCausalLM(config).save_pretrained(tmp_path / "big")
    start = _anonymous_rss_bytes()
    model = MemoryLlamaForCausalLM.from_pretrained(
        tmp_path / "big", memory_placement="disk", memory_offload_dir=str(tmp_path / "offload")
    )
    model.save_pretrained(tmp_path / "again")
    grown = _anonymous_rss_bytes() - start
    table_bytes = model.memory_tables()["model.layers.0.engram.table.weight"].weight.numel() * 4
    assert table_bytes >= 90 * 2**20 and grown < table_bytes / 3


def test_placement_errors_come_before_any_work(device_model, tmp_path, monkeypatch):
    model = copy.deepcopy(device_model)
    with pytest.raises(ValueError, match="choose one of device, host, disk"):
        model.set_memory_placement("ssd")
    with pytest.raises(ValueError, match="needs memory_offload_dir"):
        model.set_memory_placement("disk")
    with pytest.raises(ValueError, match="only with memory_placement='disk'"):
        model.set_memory_placement("host", str(tmp_path))
    a_file = tmp_path / "file"
    a_file.write_text("")
    with pytest.raises(ValueError, match="is a file"):
        model.set_memory_placement("disk", str(a_file))
    with pytest.raises(ValueError, match="choose one of"):
        MemoryLlamaForCausalLM.from_pretrained(tmp_path / "nothing-here", memory_placement="ram")

    disk_model = placed(device_model, "disk", tmp_path)
    monkeypatch.setattr(table_placement.shutil, "disk_usage", lambda path: type("Usage", (), {"free": 100})())
    with pytest.raises(ValueError, match="100 B free"):
        model.set_memory_placement("disk", str(tmp_path / "full"))
    assert not (tmp_path / "full").exists() and model.memory_placement == "device"
    monkeypatch.setattr(table_placement, "available_ram_bytes", lambda: 100)
    with pytest.raises(ValueError, match="use memory_placement='disk'"):
        disk_model.set_memory_placement("host")
    assert disk_model.memory_placement == "disk"


def test_a_working_copy_of_the_wrong_size_or_dtype_is_refused(tmp_path):
    table = torch.randn(6, 4)
    path = str(tmp_path / "table.safetensors")
    write_safetensors_streaming(path, {"table": table})
    mapped = map_safetensors_shared(path, "table", (6, 4), torch.float32)
    assert torch.equal(mapped.tensor, table)
    mapped.close(remove=False)
    with pytest.raises(ValueError, match="not this table's"):
        map_safetensors_shared(path, "table", (6, 4), torch.bfloat16)
    with pytest.raises(ValueError, match="not this table's"):
        map_safetensors_shared(path, "table", (7, 4), torch.float32)
    with open(path, "r+b") as file:
        file.truncate(os.path.getsize(path) - 8)
    with pytest.raises(ValueError, match="truncated"):
        map_safetensors_shared(path, "table", (6, 4), torch.float32)


@pytest.mark.parametrize("placement", OFF_DEVICE)
def test_deferred_tables_are_created_in_their_placement_and_initialised_there(placement, tmp_path):
    """Built inside `deferred_memory_tables`, the tables have no storage until placed, and are then filled as
    `_init_weights` fills them (zero product-key values, normal rows elsewhere), a block at a time."""
    config = every_table_config()
    with deferred_memory_tables():
        model = MemoryLlamaForCausalLM(config)
    assert all(module.weight.is_meta for module in model.memory_tables().values())
    assert not model.model.embed_tokens.weight.is_meta
    model.set_memory_placement(placement, str(tmp_path / "offload") if placement == "disk" else None)
    tables = model.memory_tables()
    assert torch.count_nonzero(tables["model.pkm_values.weight"].weight) == 0
    for name in ("model.layers.0.engram.table.weight", "model.chapter_bank.weight"):
        rows = tables[name].weight
        assert rows.device.type == "cpu" and abs(rows.std().item() - config.initializer_range) < 0.005
    ids = random_ids(2, 8, torch.Generator().manual_seed(0))
    assert torch.isfinite(model(ids).logits).all()


def test_graft_onto_a_loaded_base_creates_tables_on_disk(tmp_path):
    """A graft whose tables go to disk computes exactly what the base computes, like a graft in RAM."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from modeling_memory.tools.graft import from_llama

    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                        num_attention_heads=4, num_key_value_heads=2)).eval()
    fields = dict(engram_layers=[0], engram_table_size=101, engram_dim=16, pkm_layers=[1], pkm_num_keys=8,
                  pkm_top_k=4, pkm_heads=2, pkm_key_dim=16)
    model = from_llama(base, memory_placement="disk", memory_offload_dir=str(tmp_path / "offload"), **fields)
    assert model.memory_placement == "disk" and len(os.listdir(tmp_path / "offload")) == 2
    ids = random_ids(2, 8, torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, base(ids).logits)


def test_from_pretrained_checks_the_offload_disk_against_the_checkpoints_tables_before_loading(tmp_path, monkeypatch):
    """A disk without room for the tables the checkpoint's config describes is refused before any weight loads."""
    import shutil

    MemoryLlamaForCausalLM(every_table_config()).save_pretrained(tmp_path / "model")
    from transformers import PreTrainedModel

    loaded = []  # transformers' loading, which MemoryLlama's from_pretrained calls after its checks
    monkeypatch.setattr(PreTrainedModel, "from_pretrained", classmethod(lambda cls, *args, **kwargs: loaded.append(True)))
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(1, 1, 1024))
    with pytest.raises(ValueError, match=r"The tables need .* but its disk has 1.00 KiB free"):
        MemoryLlamaForCausalLM.from_pretrained(
            tmp_path / "model", memory_placement="disk", memory_offload_dir=str(tmp_path / "offload")
        )
    assert not loaded and not (tmp_path / "offload").exists()
