"""Human-readable facts about a MemoryLlama: where the memory sits and how many parameters it holds."""

import torch

from modeling_memory.memory_llama.configuration_memory_llama import MemoryLlamaConfig
from modeling_memory.training.memory_parameters import CHAPTER_BANK, ENGRAM_TABLE, PKM_VALUES, memory_kinds


# The layer strip's mark of each memory kind, by the config field listing its layers.
LAYER_MARKS = {"engram_layers": "E", "chapter_layers": "C", "pkm_layers": "P", "mosaic_layers": "A"}
SEVERAL_KINDS_MARK = "+"


def layer_strip(config: MemoryLlamaConfig) -> str:
    """One character per decoder layer: E Engram, C chapter memory, P product-key memory, A associative memory,
    + more than one kind (the lines of `memory_layout` say which), . none (a plain Llama layer)."""
    def mark(layer: int) -> str:
        kinds = [letter for field, letter in LAYER_MARKS.items() if layer in getattr(config, field)]
        return kinds[0] if len(kinds) == 1 else SEVERAL_KINDS_MARK if kinds else "."

    return "".join(mark(layer) for layer in range(config.num_hidden_layers))


def memory_layout(config: MemoryLlamaConfig) -> str:
    """The layer strip (`layer_strip`) and one line per memory kind present."""
    lines = [
        f"layers ({config.num_hidden_layers}): {layer_strip(config)}   "
        f"(E Engram, C chapter memory, P product-key memory, A associative memory, {SEVERAL_KINDS_MARK} several)"
    ]
    if config.engram_layers:
        lines.append(
            f"Engram at {config.engram_layers}: orders {config.engram_ngram_orders} x {config.engram_heads_per_order} heads, "
            f"tables of ~{config.engram_table_size:,} rows (distinct primes), engram_dim {config.engram_dim}, "
            f"conv kernel {config.engram_conv_kernel} dilation {config.engram_effective_dilation}"
        )
    if config.chapter_layers:
        lines.append(
            f"chapter memory at {config.chapter_layers}: {config.chapter_num_chapters} chapters x {config.chapter_size} tokens "
            f"= {config.chapter_num_chapters * config.chapter_size:,} memory tokens"
            f" ({'one bank shared by all layers' if config.chapter_share_bank else 'one bank per layer'}); "
            f"each token reads {config.chapter_num_shared} shared + top-{config.chapter_top_k} routed chapters, "
            f"{config.chapter_num_heads} heads"
        )
    if config.pkm_layers:
        lines.append(
            f"product-key memory at {config.pkm_layers}: {config.pkm_num_slots:,} value slots"
            f" ({'one table shared by all layers' if config.pkm_share_values else 'one table per layer'}); "
            f"{config.pkm_heads} heads each read the top {config.pkm_top_k}"
        )
    if config.mosaic_layers:
        replace = config.mosaic_placement == "replace"
        lines.append(
            f"associative memory at {config.mosaic_layers} ({'instead of' if replace else 'beside'} self-attention): "
            f"{'short- and long-term' if replace else 'long-term'}, {config.mosaic_effective_num_heads} heads of "
            f"{config.mosaic_effective_head_dim}; "
            + (f"short-term window {config.mosaic_short_window}, " if replace else "")
            + f"long-term delay {config.mosaic_min_delay}..{config.mosaic_max_delay} tokens in training, "
            f"{config.mosaic_min_delay} at inference"
        )
    if not config.has_memory:
        lines.append("no memory: this model is a plain Llama")
    return "\n".join(lines)


# parameter_counts' key of each table kind; every other memory parameter counts as "memory_other".
_TABLE_COUNTS = {CHAPTER_BANK: "chapter_bank", ENGRAM_TABLE: "engram_tables", PKM_VALUES: "pkm_values"}


def parameter_counts(model) -> dict[str, int]:
    """Parameters of the backbone, the chapter bank(s), the Engram tables, the product-key values, the rest of
    the memory, and those touched per token (dense weights plus the rows and memory tokens one token reads)."""
    config = model.config
    counts = {"backbone": 0, "chapter_bank": 0, "engram_tables": 0, "pkm_values": 0, "memory_other": 0}
    kinds = memory_kinds(model)
    seen = set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            continue
        seen.add(id(param))
        kind = kinds.get(name)
        counts[_TABLE_COUNTS.get(kind, "memory_other") if kind else "backbone"] += param.numel()
    counts["total"] = sum(counts.values())
    embedding_rows = config.vocab_size * config.hidden_size
    tied = getattr(config, "tie_word_embeddings", False)
    dense_backbone = counts["backbone"] - embedding_rows + config.hidden_size  # one embedding row per token
    chapter_tokens_read = (config.chapter_num_shared + config.chapter_top_k) * config.chapter_size * config.hidden_size
    counts["active_per_token"] = (
        dense_backbone
        + (embedding_rows if tied else 0)  # a tied lm_head still multiplies the full matrix
        + counts["memory_other"]
        + len(config.chapter_layers) * chapter_tokens_read
        + len(config.engram_layers) * config.engram_dim
        + len(config.pkm_layers) * config.pkm_heads * config.pkm_top_k * config.pkm_effective_value_dim
    )
    return counts


def build_on_meta(config: MemoryLlamaConfig):
    """The model's structure without allocating its weights (for counting)."""
    from modeling_memory.memory_llama.modeling_memory_llama import MemoryLlamaForCausalLM

    with torch.device("meta"):
        return MemoryLlamaForCausalLM(config)
