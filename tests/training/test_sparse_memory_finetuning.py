"""Sparse memory fine-tuning: slot counting (from the slots the forward records) against the slots recomputed
independently (each product-key layer's addressing, the naive Engram hashing loops), the TF-IDF ranking against a
hand-computed example, and training that leaves every row outside the chosen slots bit-identical."""

import math

import pytest
import torch

from modeling_memory import MemoryLlamaForCausalLM
from modeling_memory.training.sparse_memory_finetuning import (
    SlotReads,
    count_slot_reads,
    prepare_sparse_memory_finetuning,
    rank_slots,
    slot_scores,
)
from modeling_memory.memory_llama.naive_engram import naive_engram_row_ids_of_documents
from conftest import EOS, random_ids, tiny_config, train_steps

PKM = dict(pkm_layers=[1, 2], pkm_num_keys=6, pkm_top_k=3, pkm_heads=2, pkm_key_dim=8)
VALUES = "model.pkm_values.weight"
TABLE = "model.layers.0.engram.table.weight"


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return train_steps(MemoryLlamaForCausalLM(tiny_config(chapter_layers=[], **PKM)))


def batches(seed: int, count: int, rows: int = 2, length: int = 10):
    generator = torch.Generator().manual_seed(seed)
    return [{"input_ids": random_ids(rows, length, generator)} for _ in range(count)]


def test_ranking_matches_a_hand_computed_example():
    """5 slots. New data reads slot 1 six times, slot 3 three times, slot 4 once (10 reads); of 3 background
    batches, slot 1 is read by 3, slot 3 by none, slot 4 by 1."""
    new = SlotReads({"t": torch.tensor([0, 6, 0, 3, 1])}, {"t": torch.tensor([0, 1, 0, 1, 1])}, 1)
    background = SlotReads({"t": torch.tensor([9, 9, 0, 0, 2])}, {"t": torch.tensor([3, 3, 0, 0, 1])}, 3)
    expected = {1: 0.6 * math.log(4 / 4), 3: 0.3 * math.log(4 / 1), 4: 0.1 * math.log(4 / 2)}
    scores = slot_scores(new, background)["t"]
    for slot, value in expected.items():
        assert scores[slot].item() == pytest.approx(value)
    assert rank_slots(new, background, top_t=2)["t"].tolist() == [3, 4]  # 0.416 > 0.069 > 0
    assert rank_slots(new, background, top_t=10)["t"].tolist() == [3, 4, 1]  # only slots the new data reads
    with pytest.raises(ValueError, match="top_t must be an integer >= 1"):
        rank_slots(new, background, top_t=0)


def test_counts_equal_the_slots_the_layers_read(model):
    """Counts come from the recorded outputs; compare with the slots recomputed from each product-key layer's own
    addressing and from the naive Engram hashing of each sequence."""
    data = batches(1, 2)
    data[1]["attention_mask"] = torch.ones(2, 10, dtype=torch.long)
    data[1]["attention_mask"][0, :4] = 0  # padding is not counted
    reads = count_slot_reads(model, data)
    assert set(reads.counts) == {VALUES, TABLE} and reads.num_batches == 2

    expected = torch.zeros(36, dtype=torch.long)
    expected_batches = torch.zeros(36, dtype=torch.long)
    engram = model.model.layers[0].engram
    hashing = engram.hashing(model.model.engram_canonical_map)
    expected_rows = torch.zeros(engram.table.num_embeddings, dtype=torch.long)
    captured = []
    hooks = [layer.post_attention_layernorm.register_forward_hook(lambda m, a, out: captured.append(out))
             for layer in (model.model.layers[1], model.model.layers[2])]
    with torch.no_grad():
        for batch in data:
            captured.clear()
            model(**batch)
            mask = batch.get("attention_mask", torch.ones(2, 10, dtype=torch.long)).bool().reshape(-1)
            in_batch = torch.zeros(36, dtype=torch.long)
            for layer, normed in zip((1, 2), captured):
                indices, _ = model.model.layers[layer].product_key_memory.address(normed.reshape(-1, 32))
                in_batch += torch.bincount(indices[mask].reshape(-1), minlength=36)
            expected += in_batch
            expected_batches += (in_batch > 0).long()
            rows = naive_engram_row_ids_of_documents(batch["input_ids"], mask.view(2, 10), [EOS], hashing)
            expected_rows += torch.bincount(rows.reshape(-1, rows.shape[-1])[mask].reshape(-1), minlength=len(expected_rows))
    for hook in hooks:
        hook.remove()
    assert torch.equal(reads.counts[VALUES], expected)
    assert torch.equal(reads.batches_reading[VALUES], expected_batches)
    assert int(reads.counts[TABLE].sum()) == (20 + 16) * 4  # real tokens x 4 Engram heads
    assert torch.equal(reads.counts[TABLE], expected_rows)


@pytest.mark.parametrize("optimizer_name", ["sgd", "sparse_adam"])
def test_only_the_chosen_rows_change(optimizer_name):
    torch.manual_seed(0)
    model = train_steps(MemoryLlamaForCausalLM(tiny_config(chapter_layers=[], **PKM)))
    new_data, background = batches(2, 3), batches(3, 4)
    selected = rank_slots(count_slot_reads(model, new_data), count_slot_reads(model, background), top_t=4)
    assert all(rows.numel() == 4 for rows in selected.values())
    before = {name: param.detach().clone() for name, param in model.named_parameters()}
    prepare_sparse_memory_finetuning(model, selected)
    trainable = [param for param in model.parameters() if param.requires_grad]
    assert len(trainable) == 2
    if optimizer_name == "sgd":
        optimizer = torch.optim.SGD(trainable, lr=0.5)
    else:
        optimizer = torch.optim.SparseAdam(trainable, lr=0.05)
    model.train()
    for batch in new_data * 2:
        model(**batch, labels=batch["input_ids"]).loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    after = dict(model.named_parameters())
    for name, original in before.items():
        if name not in selected:
            assert torch.equal(after[name], original), name
            continue
        changed = (after[name] != original).any(dim=1)
        chosen = torch.zeros_like(changed)
        chosen[selected[name]] = True
        assert not changed[~chosen].any(), f"{name}: rows outside the selection changed"
        assert changed[chosen].any(), f"{name}: no selected row learnt"


def test_models_without_ranked_tables_are_refused():
    model = MemoryLlamaForCausalLM(tiny_config(engram_layers=[]))
    with pytest.raises(ValueError, match="no product-key memory or Engram tables"):
        count_slot_reads(model, batches(0, 1))


def test_trainable_weights_of_sparse_memory_fine_tuning_count_only_the_chosen_rows():
    from modeling_memory.training.peft_modes import trainable_parameter_counts

    model = MemoryLlamaForCausalLM(tiny_config(chapter_layers=[], engram_layers=[], pkm_layers=[1], pkm_num_keys=6,
                                               pkm_top_k=3, pkm_heads=2, pkm_key_dim=8))
    everything = sum(p.numel() for p in model.parameters())
    assert trainable_parameter_counts(model)["total"] == everything
    prepare_sparse_memory_finetuning(model, {"model.pkm_values.weight": torch.tensor([0, 5, 7])})
    assert trainable_parameter_counts(model)["total"] == 3 * model.model.pkm_values.weight.shape[1]
