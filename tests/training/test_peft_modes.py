"""Training modes with the real PEFT API: recommended configs and their guards, memory-only and full
fine-tuning, LoRA with directly trained memory saved beside the adapter (no deep copies), LoRA on the
memory projections, and merge_and_unload.

In every mode the tables (Engram tables, chapter bank) get sparse gradients and no tensor of a table's
size is allocated in a training step's forward and backward.

Tolerances (fp32): reloaded adapters reproduce logits to 1e-6 (the same weights and code path);
merged LoRA weights (W + scale * B A folded once) to atol 1e-5 / rtol 1e-4."""

import os

import datasets
import pytest
import torch
from peft import LoraConfig, PeftModel
from peft.utils.other import ModulesToSaveWrapper
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from conftest import random_ids
from modeling_memory import MemoryLlamaForCausalLM
from modeling_memory.training.peft_modes import (
    MEMORY_WEIGHTS_NAME,
    load_adapter_with_memory,
    load_memory_weights,
    prepare_model_for_mode,
    recommended_lora_config,
    trainable_parameter_counts,
)
from modeling_memory.training.trainer import MemoryTrainer, MemoryTrainingArguments
from training_helpers import tiny_model

BACKBONE = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
MEMORY_PROJECTIONS = {"router", "memory_query", "memory_key", "memory_value", "memory_output", "engram_key", "engram_value"}


def _dataset(rows=8, length=12):
    ids = random_ids(rows, length, torch.Generator().manual_seed(0))
    return datasets.Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})


def _train(model, tmp_path, steps=3):
    args = MemoryTrainingArguments(
        output_dir=str(tmp_path / "run"), max_steps=steps, per_device_train_batch_size=4, learning_rate=5e-2,
        report_to="none", save_strategy="no", disable_tqdm=True, dataloader_pin_memory=False, seed=0,
    )
    trainer = MemoryTrainer(model=model, args=args, train_dataset=_dataset())
    trainer.train()
    return trainer


def _logits(model, seed=1):
    ids = random_ids(2, 10, torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model.eval()(ids).logits


def _wrapped_leaf_names(peft_model):
    from peft.tuners.lora import LoraLayer

    return {name.rsplit(".", 1)[-1] for name, module in peft_model.named_modules() if isinstance(module, LoraLayer)}


def test_recommended_configs_target_exactly_the_intended_modules():
    assert recommended_lora_config(tiny_model(vocab_size=97), "full") is None
    assert recommended_lora_config(tiny_model(vocab_size=97), "memory_only") is None
    model = prepare_model_for_mode(tiny_model(vocab_size=97), "lora")
    assert _wrapped_leaf_names(model) == BACKBONE
    model = prepare_model_for_mode(tiny_model(vocab_size=97), "lora_all")
    assert _wrapped_leaf_names(model) == BACKBONE | MEMORY_PROJECTIONS
    with pytest.raises(ValueError, match="Unknown training mode"):
        recommended_lora_config(tiny_model(vocab_size=97), "qlora")


@pytest.mark.parametrize(
    "config, mode, message",
    [
        (LoraConfig(target_modules=["q_proj", "engram_key"]), "lora", "also hits memory modules"),
        (LoraConfig(target_modules=["table"]), "lora_all", "hits memory tables"),
        (LoraConfig(target_modules=["q_proj"]), "lora_all", "hits none of them"),
        (LoraConfig(target_modules=["qproj"]), "lora", "match no module"),
        (LoraConfig(), "lora", "no target_modules"),
        (LoraConfig(target_modules=["q_proj"], modules_to_save=["engram"]), "lora", "deep-copy memory modules"),
        (LoraConfig(target_modules=["q_proj"], target_parameters=["chapter_bank.weight"]), "lora", "target_parameters"),
    ],
)
def test_mis_targeted_configs_are_refused_before_wrapping(config, mode, message):
    model = tiny_model(vocab_size=97)
    with pytest.raises(ValueError, match=message):
        prepare_model_for_mode(model, mode, config)
    assert not any("lora_" in name for name, _ in model.named_parameters())  # nothing was wrapped


def test_modes_need_a_memory_model_with_memory():
    with pytest.raises(ValueError, match="has none"):
        prepare_model_for_mode(tiny_model(vocab_size=97, engram_layers=[], chapter_layers=[]), "memory_only")


class _DenseTensorsOfShapes(TorchDispatchMode):
    """Records every op that produces a new dense tensor (not a view) of one of `shapes`."""

    def __init__(self, shapes):
        super().__init__()
        self.shapes, self.ops = shapes, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor) and tensor.layout == torch.strided and not tensor._is_view():
                if tuple(tensor.shape) in self.shapes:
                    self.ops.append(str(func))
        return out


@pytest.mark.parametrize("mode", ["full", "memory_only", "lora", "lora_all"])
def test_tables_get_sparse_gradients_in_every_mode(mode):
    # Table sizes that no other tensor of the model has (more chapters than a batch reads).
    model = prepare_model_for_mode(tiny_model(vocab_size=97, engram_table_size=211, chapter_num_chapters=60), mode)
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    tables = [base.model.layers[0].engram.table.weight, base.model.chapter_bank.weight]
    ids = random_ids(2, 10, torch.Generator().manual_seed(0))
    model.train()
    with _DenseTensorsOfShapes({tuple(t.shape) for t in tables}) as recorder:
        model(input_ids=ids, labels=ids).loss.backward()
    assert recorder.ops == []  # no dense gradient (nor anything else) of a table's size
    for table in tables:
        assert table.requires_grad and table.grad.is_sparse
        assert 0 < table.grad.coalesce()._nnz() < table.shape[0]


def test_memory_only_trains_memory_and_nothing_else(tmp_path):
    model = prepare_model_for_mode(tiny_model(vocab_size=97), "memory_only")
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    _train(model, tmp_path)
    # tiny_config: Engram at layer 0, chapter memory (and its norm) at layer 2, one shared bank.
    memory = ("model.layers.0.engram.", "model.layers.2.chapter_memory.", "model.layers.2.memory_layernorm.", "model.chapter_bank.")
    for name, param in model.named_parameters():
        changed = not torch.equal(param.detach(), before[name])
        assert changed == name.startswith(memory), name
    model.save_pretrained(tmp_path / "saved")
    reloaded = MemoryLlamaForCausalLM.from_pretrained(tmp_path / "saved", dtype=torch.float32)
    torch.testing.assert_close(_logits(reloaded), _logits(model), rtol=0, atol=1e-6)


def test_full_fine_tuning_round_trip(tmp_path):
    model = prepare_model_for_mode(tiny_model(vocab_size=97), "full")
    assert trainable_parameter_counts(model)["total"] == sum(p.numel() for p in model.parameters())
    trainer = _train(model, tmp_path)
    trainer.save_model(str(tmp_path / "saved"))
    assert not os.path.exists(tmp_path / "saved" / MEMORY_WEIGHTS_NAME)
    reloaded = MemoryLlamaForCausalLM.from_pretrained(tmp_path / "saved", dtype=torch.float32)
    torch.testing.assert_close(_logits(reloaded), _logits(model), rtol=0, atol=1e-6)


@pytest.mark.parametrize("mode", ["lora", "lora_all"])
def test_lora_modes_save_reload_and_merge(tmp_path, mode):
    tiny_model(vocab_size=97).save_pretrained(tmp_path / "base")
    base = MemoryLlamaForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32)
    table = base.model.layers[0].engram.table.weight
    base_parameters = sum(p.numel() for p in base.parameters())
    model = prepare_model_for_mode(base, mode)

    # No copy of any table or bank: the PEFT model trains the base model's own tensors.
    assert model.get_base_model().model.layers[0].engram.table.weight is table and table.requires_grad
    assert not any(isinstance(module, ModulesToSaveWrapper) for module in model.modules())
    counts = trainable_parameter_counts(model)
    assert sum(p.numel() for p in model.parameters()) == base_parameters + counts["adapter"]
    assert counts["backbone"] == 0 and counts["memory"] > 0 and counts["adapter"] > 0

    initial_table = table.detach().clone()
    trainer = _train(model, tmp_path)
    assert not torch.equal(table.detach(), initial_table)  # the memory trained directly
    trained_logits = _logits(model)
    trainer.save_model(str(tmp_path / "adapter"))
    saved = set(os.listdir(tmp_path / "adapter"))
    assert {"adapter_config.json", "adapter_model.safetensors", MEMORY_WEIGHTS_NAME} <= saved

    fresh = MemoryLlamaForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32)
    adapter_only = PeftModel.from_pretrained(fresh, str(tmp_path / "adapter"))
    assert not torch.allclose(_logits(adapter_only), trained_logits, atol=1e-4)  # the adapter alone misses the memory

    fresh = MemoryLlamaForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32)
    reloaded = load_adapter_with_memory(fresh, str(tmp_path / "adapter"))
    torch.testing.assert_close(_logits(reloaded), trained_logits, rtol=0, atol=1e-6)

    merged = reloaded.merge_and_unload()
    assert isinstance(merged, MemoryLlamaForCausalLM)
    assert not any("lora_" in name for name, _ in merged.named_parameters())
    torch.testing.assert_close(_logits(merged), trained_logits, rtol=1e-4, atol=1e-5)


def test_trainable_reload_and_memory_file_checks(tmp_path):
    base = tiny_model(vocab_size=97)
    model = prepare_model_for_mode(base, "lora")
    _train(model, tmp_path, steps=1).save_model(str(tmp_path / "adapter"))
    again = load_adapter_with_memory(tiny_model(vocab_size=97), str(tmp_path / "adapter"), is_trainable=True)
    assert again.get_base_model().model.layers[0].engram.table.weight.requires_grad

    bigger = tiny_model(vocab_size=97, engram_table_size=61)
    with pytest.raises(ValueError, match="shape mismatches"):
        load_memory_weights(bigger, str(tmp_path / "adapter"))
    with pytest.raises(FileNotFoundError, match="not a PEFT adapter folder"):
        load_adapter_with_memory(tiny_model(vocab_size=97), str(tmp_path))


@pytest.mark.parametrize("mode", ["memory_only", "lora", "lora_all"])
def test_associative_memory_trains_and_reloads_in_every_mode(tmp_path, mode):
    """A graft-style associative memory beside attention (output projection zero at birth) learns in each mode: the
    whole memory directly in memory_only and lora, its projections through LoRA in lora_all; what was trained
    comes back from the saved folder."""
    mosaic = dict(engram_layers=[], chapter_layers=[], mosaic_layers=[1], mosaic_placement="parallel",
                  mosaic_short_window=8, mosaic_min_delay=2, mosaic_max_delay=4)
    tiny_model(vocab_size=97, **mosaic).save_pretrained(tmp_path / "base")
    base = MemoryLlamaForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32)
    output = base.model.layers[1].associative_memory.mosaic_output
    assert output.weight.abs().max() == 0
    model = prepare_model_for_mode(base, mode)
    if mode == "lora_all":
        assert {"mosaic_key", "mosaic_value", "mosaic_output"} <= _wrapped_leaf_names(model)
    trainer = _train(model, tmp_path)
    trained_logits = _logits(model)
    trainer.save_model(str(tmp_path / "saved"))
    if mode == "memory_only":
        assert output.weight.abs().max() > 0
        reloaded = MemoryLlamaForCausalLM.from_pretrained(tmp_path / "saved", dtype=torch.float32)
    else:
        fresh = MemoryLlamaForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32)
        reloaded = load_adapter_with_memory(fresh, str(tmp_path / "saved"))
    untrained = _logits(MemoryLlamaForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32))
    assert not torch.allclose(trained_logits, untrained, atol=1e-4)
    torch.testing.assert_close(_logits(reloaded), trained_logits, rtol=0, atol=1e-6)
