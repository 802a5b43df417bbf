"""Sparse memory fine-tuning: learn new data by training only the memory slots it reads much more often
than background data does, with everything else frozen (after "Continual Learning via Sparse Memory
Finetuning", 2025, on product-key memory layers).

1. `count_slot_reads(model, batches)`: for each memory table (product-key values, Engram tables), how
   often each slot (row) is read over the batches, and by how many batches, from the slots the model's
   forward reports (its recorded `pkm_indices` and `engram_row_ids`).
2. `rank_slots(new_data, background, top_t)`: TF-IDF per slot, the slot's share of the new data's reads
   times log((background batches + 1) / (background batches that read the slot + 1)); the top-t slots of
   each table that the new data reads.
3. `prepare_sparse_memory_finetuning(model, selected)`: freeze every parameter but those tables, and keep
   only the selected rows of their gradients. With an optimizer that updates only the rows it gets
   gradients for (the sparse tables' lazy Adam, row-wise Adagrad, SGD), every other row stays
   bit-identical.
"""

from dataclasses import dataclass, field

import torch
from torch import nn

from modeling_memory.memory_llama.engram import MemoryLlamaEngram
from modeling_memory.memory_llama.modeling_memory_llama import MemoryLlamaModel
from modeling_memory.memory_llama.product_key_memory import MemoryLlamaProductKeyMemory
from modeling_memory.training.memory_parameters import ENGRAM_TABLE, PKM_VALUES, memory_kinds

# Tables whose slots are ranked: those a token reads a handful of rows of.
RANKED_KINDS = (PKM_VALUES, ENGRAM_TABLE)
# Rows trained per table by default: a quarter of the grafted product-key table (65,536 rows), where the
# demo learnt the most facts while keeping general knowledge (500 and 1,000 rows, the paper's order for a
# pretrained memory of 1M slots, learnt almost nothing on a fresh graft).
DEFAULT_TOP_T = 16000
# The training settings `memory-llama train --mode sparse_memory` uses unless told otherwise: near the best point of
# the learning–forgetting frontier (benchmarks/knowledge_frontier.py; README, "Teaching a model facts"). The chosen
# value rows start at zero, so they need a learning rate far above a backbone's (the values train at x
# pkm_values_lr_multiplier of it), short rows (one fact a document, documents kept apart) and many passes.
RECOMMENDED_TRAINING_ARGUMENTS = {
    "learning_rate": 0.3,
    "lr_scheduler_type": "constant_with_warmup",
    "warmup_steps": 5,
    "weight_decay": 0.0,
    "per_device_train_batch_size": 8,
    "num_train_epochs": 10,
    "block_size": 64,
    "logging_steps": 5,  # a run is tens of steps; Trainer's 500 would log no loss, and draw no loss curve
}


@dataclass
class SlotReads:
    """Reads of every ranked table over some batches.

    counts: table parameter name -> (rows,) int64, how many times each row was read (real tokens only).
    batches_reading: table parameter name -> (rows,) int64, in how many batches each row was read at least once.
    num_batches: the number of batches counted.
    """

    counts: dict[str, torch.Tensor] = field(default_factory=dict)
    batches_reading: dict[str, torch.Tensor] = field(default_factory=dict)
    num_batches: int = 0


def _table_names(model: nn.Module) -> dict[int, str]:
    """id(table parameter) -> its name, for the ranked tables."""
    named = dict(model.named_parameters(remove_duplicate=False))
    return {id(named[name]): name for name, kind in memory_kinds(model).items() if kind in RANKED_KINDS and name in named}


def _tables_read(model: nn.Module, names: dict[int, str]) -> tuple[list[str], list[str]]:
    """The table each product-key layer and each Engram layer reads, by parameter name, in layer order: the
    order of the model's recorded `pkm_indices` and `engram_row_ids`."""
    product_key_tables, engram_tables = [], []
    shared_values = None
    for module in model.modules():  # the model before its layers, the layers in order
        if isinstance(module, MemoryLlamaModel):
            shared_values = module.pkm_values
        elif isinstance(module, MemoryLlamaProductKeyMemory):
            values = module.pkm_values if module.pkm_values is not None else shared_values
            product_key_tables.append(names[id(values.weight)])
        elif isinstance(module, MemoryLlamaEngram):
            engram_tables.append(names[id(module.table.weight)])
    return product_key_tables, engram_tables


@torch.no_grad()
def count_slot_reads(model: nn.Module, batches) -> SlotReads:
    """Count the slots each ranked table is read at over `batches`, from the slots the forward reports
    (`output_pkm_indices`, `output_engram_row_ids`): nothing is recomputed.

    Args:
        model: a MemoryLlama model (or a wrapper around one) with product-key memory and/or Engram layers.
        batches: an iterable of dicts with "input_ids" (B, S) and optionally "attention_mask" (B, S).
    Returns:
        SlotReads over the batches (padding excluded).
    """
    names = _table_names(model)
    if not names:
        raise ValueError(
            "The model has no product-key memory or Engram tables to rank slots of: graft one first "
            "(e.g. `memory-llama graft BASE OUT --preset pkm`)."
        )
    product_key_tables, engram_tables = _tables_read(model, names)
    rows_of = {name: param.shape[0] for name, param in model.named_parameters(remove_duplicate=False)}
    reads = SlotReads()
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            input_ids, attention_mask = batch["input_ids"], batch.get("attention_mask")
            outputs = model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                use_cache=False,
                output_pkm_indices=bool(product_key_tables),
                output_engram_row_ids=bool(engram_tables),
            )
            real = torch.ones(input_ids.numel(), dtype=torch.bool, device=input_ids.device)
            if attention_mask is not None:
                real = attention_mask.reshape(-1).bool()
            read = list(zip(product_key_tables, outputs.pkm_indices or ())) + list(zip(engram_tables, outputs.engram_row_ids or ()))
            per_batch: dict[str, torch.Tensor] = {}
            for name, slots in read:  # (B * S, ...) the slots each token read
                counts = torch.bincount(slots[real].reshape(-1), minlength=rows_of[name]).cpu()
                per_batch[name] = per_batch.get(name, 0) + counts
            for name, counts in per_batch.items():
                reads.counts[name] = reads.counts.get(name, 0) + counts
                reads.batches_reading[name] = reads.batches_reading.get(name, 0) + (counts > 0).long()
            reads.num_batches += 1
    finally:
        model.train(was_training)
    return reads


def slot_scores(new_data: SlotReads, background: SlotReads) -> dict[str, torch.Tensor]:
    """TF-IDF of every slot: share of the new data's reads x log((B + 1) / (df + 1)), where B is the number
    of background batches and df the number of them that read the slot. (rows,) fp64 per table."""
    scores = {}
    for name, counts in new_data.counts.items():
        share = counts.double() / max(int(counts.sum()), 1)
        reading = background.batches_reading.get(name, torch.zeros_like(counts))
        idf = torch.log((background.num_batches + 1) / (reading.double() + 1))
        scores[name] = share * idf
    return scores


def rank_slots(new_data: SlotReads, background: SlotReads, top_t: int) -> dict[str, torch.Tensor]:
    """The top-`top_t` slots of each table by TF-IDF, among the slots the new data reads.

    Returns:
        table parameter name -> (<= top_t,) int64 row ids, best first (ties: lower row first).
    """
    if not (isinstance(top_t, int) and top_t >= 1):
        raise ValueError(f"top_t must be an integer >= 1 (slots trained per table), got {top_t!r}.")
    selected = {}
    for name, scores in slot_scores(new_data, background).items():
        read = torch.nonzero(new_data.counts[name] > 0).flatten()
        # A stable sort on the negated scores keeps ties in row order.
        order = torch.sort(-scores[read], stable=True).indices
        selected[name] = read[order[:top_t]]
    return selected


def _keep_rows(gradient: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """The gradient with every row outside `keep` (a (rows,) bool mask) removed (sparse) or zeroed (dense)."""
    if gradient.is_sparse:
        gradient = gradient.coalesce()
        rows = gradient.indices()[0]
        kept = keep[rows]
        return torch.sparse_coo_tensor(
            gradient.indices()[:, kept], gradient.values()[kept], gradient.shape, is_coalesced=True,
            check_invariants=False,
        )
    return gradient * keep.to(gradient.dtype)[:, None]


def prepare_sparse_memory_finetuning(model: nn.Module, selected: dict[str, torch.Tensor]) -> nn.Module:
    """Freeze `model` except the rows in `selected` (from `rank_slots`), in place.

    Every parameter outside the selected tables stops requiring gradients, and a gradient hook on each
    selected table drops the rows outside its selection, so that no other row can change.
    """
    params = dict(model.named_parameters(remove_duplicate=False))
    unknown = sorted(set(selected) - set(params))
    if unknown:
        raise ValueError(f"No parameters named {unknown} in the model; pass the names `rank_slots` returned.")
    for name, param in params.items():
        param.requires_grad_(name in selected)
    for name, rows in selected.items():
        param = params[name]
        keep = torch.zeros(param.shape[0], dtype=torch.bool, device=param.device)
        keep[rows.to(param.device)] = True
        param.register_hook(lambda gradient, keep=keep: _keep_rows(gradient, keep))
    model.sparse_memory_slots = {name: rows.clone() for name, rows in selected.items()}
    return model


def select_and_prepare(model: nn.Module, new_batches, background_batches, top_t: int) -> dict[str, torch.Tensor]:
    """Count, rank and freeze in one call; returns the selected rows per table."""
    selected = rank_slots(count_slot_reads(model, new_batches), count_slot_reads(model, background_batches), top_t)
    prepare_sparse_memory_finetuning(model, selected)
    return selected


def describe_selection(selected: dict[str, torch.Tensor], model: nn.Module) -> str:
    """One line per table: rows trained of rows in the table."""
    params = dict(model.named_parameters(remove_duplicate=False))
    lines = []
    for name, rows in selected.items():
        total = params[name].shape[0]
        lines.append(f"{name}: {rows.numel():,} of {total:,} rows trainable ({rows.numel() / total:.3%})")
    return "\n".join(lines)


__all__ = [
    "DEFAULT_TOP_T",
    "RANKED_KINDS",
    "RECOMMENDED_TRAINING_ARGUMENTS",
    "SlotReads",
    "count_slot_reads",
    "describe_selection",
    "prepare_sparse_memory_finetuning",
    "rank_slots",
    "select_and_prepare",
    "slot_scores",
]
