"""Grafting memory onto a Llama: the memory config from a Llama config, and the one graft that every tool
uses (`modeling_memory.from_llama`, `memory-llama graft`, `memory-llama train --graft`).

Every Llama parameter keeps its key and the memory's last projections start at zero, so the result computes
exactly what the Llama computed. The checks live here once: the base's family (Mistral's sliding window, a
model that already has memory), the memory settings (preset, field names, values against the base's depth
and width), the dtype, and the loaded weights (only memory may be missing).

Tooling, not run-time code: a checkpoint exported for the Hub does not carry this file.
"""

import contextlib
import dataclasses
import os
from pathlib import Path

import torch
from huggingface_hub.errors import StrictDataclassError
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig
from transformers.models.llama.configuration_llama import LlamaConfig
from transformers.utils import logging as hf_logging

from modeling_memory.choices import GRAFT_PRESETS
from modeling_memory.tools.canonical_ids import build_canonical_map
from modeling_memory.memory_llama.configuration_memory_llama import MEMORY_LAYER_FIELDS, MemoryLlamaConfig
from modeling_memory.tools.errors import ToolError
from modeling_memory.tools.loading import from_pretrained
from modeling_memory.training.memory_parameters import memory_kinds
from modeling_memory.memory_llama.modeling_memory_llama import MemoryLlamaForCausalLM
from modeling_memory.memory_llama.table_placement import deferred_memory_tables

# Families whose checkpoints transformers loads with the Llama layout and key names.
LLAMA_COMPATIBLE_MODEL_TYPES = ("llama", "memory_llama", "mistral")

_LLAMA_FIELDS = {f.name for f in dataclasses.fields(LlamaConfig)}
MEMORY_FIELDS = tuple(f.name for f in dataclasses.fields(MemoryLlamaConfig) if f.name not in _LLAMA_FIELDS)
# Config entries describing the source checkpoint rather than the architecture.
_SOURCE_ONLY_KEYS = ("model_type", "architectures", "quantization_config", "transformers_version", "auto_map")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class GraftError(ToolError):
    """A graft that cannot be done as asked; the message says what is wrong and how to fix it."""


# ---- the base -----------------------------------------------------------------------------------


def check_base_family(model_type, where: str, *, has_memory_layers: bool = False, sliding_window=None) -> None:
    """Refuse a base that is not a Llama-layout family, a MemoryLlama that already has memory layers, or a
    Mistral with sliding-window attention (which the Llama layout does not have)."""
    if model_type not in LLAMA_COMPATIBLE_MODEL_TYPES:
        raise GraftError(
            f"{where} is a {model_type!r} model; memory can be grafted only onto Llama-layout families: "
            f"{', '.join(LLAMA_COMPATIBLE_MODEL_TYPES)} (transformers loads these with the Llama layout and "
            "key names). Other families (Qwen2, Gemma, Phi, Mixtral, ...) compute differently."
        )
    if has_memory_layers:
        raise GraftError(
            f"{where} is already a MemoryLlama with memory layers; graft onto the original Llama checkpoint instead."
        )
    if model_type == "mistral" and sliding_window is not None:
        raise GraftError(
            f"{where} is a Mistral model with sliding-window attention (sliding_window={sliding_window}), which the "
            "Llama layout does not have; only Mistral checkpoints with sliding_window=None can be grafted."
        )


def check_base_config(config: PretrainedConfig, where: str = "The base model") -> None:
    """`check_base_family` on a loaded config."""
    check_base_family(
        config.model_type,
        where,
        has_memory_layers=any(getattr(config, name, None) for name in MEMORY_LAYER_FIELDS),
        sliding_window=getattr(config, "sliding_window", None),
    )


# ---- the memory settings ------------------------------------------------------------------------


def check_memory_fields(fields: dict, where: str) -> None:
    unknown = sorted(set(fields) - set(MEMORY_FIELDS))
    if unknown:
        raise GraftError(f"{where}: unknown memory field(s) {unknown}; valid fields are: {', '.join(MEMORY_FIELDS)}.")


def memory_preset(base_config: PretrainedConfig, preset: str = "both") -> dict:
    """Memory fields sized for a base model.

    Engram sits early (about 1/15 of the depth, where n-gram knowledge helps most) and at mid-depth;
    chapter memory at 1/3 and 2/3 of the depth. The bank holds 128 chapters of 32 tokens (4,096
    memory tokens, 2 routed + 1 shared read per token); each Engram layer has 2 orders x 8 heads of
    ~50K-row tables. The product-key memory ("pkm"; "all" is "both" plus it) sits beside the MLP at 1/4, 1/2
    and 3/4 of the depth, the three layers reading one shared table (as Memory Layers at Scale shares one
    pool): 256^2 = 65,536 value slots of the model's width, 4 heads reading the top 8 each. Eight rather
    than the paper's 32 because a grafted memory's keys are random: sharper reads let each slot serve fewer
    contexts (on SmolLM2, sparse memory fine-tuning learnt more facts with 8 than with 32, and with three
    layers than with one).

    "mosaic" puts a long-term associative memory (Memory Mosaics v2) beside the self-attention at 2/3 and 5/6 of
    the depth ("parallel": its output projection starts at zero), half the attention's heads at its head width,
    reading every pair at least 64 tokens back (64 to 256 while training; less for a base whose context is under
    1,024 tokens).
    """
    if preset not in GRAFT_PRESETS:
        raise GraftError(f"Unknown preset {preset!r}; choose one of {', '.join(GRAFT_PRESETS)}.")
    depth, hidden = base_config.num_hidden_layers, base_config.hidden_size
    fields: dict = {name: [] for name in MEMORY_LAYER_FIELDS}
    if preset in ("engram", "both", "all"):
        early = max(1, depth // 15) if depth > 2 else 0
        fields.update(
            engram_layers=sorted({early, depth // 2}),
            engram_heads_per_order=8,
            engram_table_size=50021,
            engram_dim=16 * max(8, min(64, hidden // 16)),
        )
    if preset in ("chapters", "both", "all"):
        heads = next(h for h in (base_config.num_attention_heads, 8, 4, 2, 1) if hidden % h == 0)
        fields.update(
            chapter_layers=sorted({depth // 3, (2 * depth) // 3}),
            chapter_num_chapters=128,
            chapter_size=32,
            chapter_top_k=2,
            chapter_num_shared=1,
            chapter_num_heads=heads,
        )
    if preset in ("pkm", "all"):
        fields.update(
            pkm_layers=sorted({depth // 4, depth // 2, (3 * depth) // 4}), pkm_num_keys=256, pkm_top_k=8, pkm_heads=4,
            pkm_key_dim=256,
        )
    if preset == "mosaic":
        fields.update(
            mosaic_layers=sorted({(2 * depth) // 3, (5 * depth) // 6}),
            mosaic_placement="parallel",
            mosaic_num_heads=max(1, base_config.num_attention_heads // 2),
            mosaic_head_dim=getattr(base_config, "head_dim", None) or hidden // base_config.num_attention_heads,
            # 64..256 tokens as in the paper, within a short context
            mosaic_min_delay=min(64, base_config.max_position_embeddings // 4),
            mosaic_max_delay=min(256, base_config.max_position_embeddings // 2),
        )
    return fields


def memory_config_from_llama(base_config: PretrainedConfig, preset: str | None = None, **memory_fields) -> MemoryLlamaConfig:
    """A MemoryLlamaConfig with the base's architecture: the `preset`'s fields (sized for the base; none by
    default), then `memory_fields` on top, validated against the base's depth and width.

    Raises GraftError for a base that cannot be grafted, an unknown field or an invalid value.
    """
    check_base_config(base_config)
    check_memory_fields(memory_fields, "memory settings")
    fields = {k: v for k, v in base_config.to_dict().items() if k in _LLAMA_FIELDS and k not in _SOURCE_ONLY_KEYS}
    fields.update(memory_preset(base_config, preset) if preset is not None else {})
    fields.update(memory_fields)
    if fields.get("mosaic_layers") and fields.get("mosaic_placement", "replace") == "replace":
        raise GraftError(
            "mosaic_placement='replace' swaps a layer's self-attention for an associative memory, discarding what the "
            "base's attention learnt (the graft would no longer compute what the base computes); graft with "
            "mosaic_placement='parallel' (the 'mosaic' preset), or train a 'replace' model from scratch."
        )
    try:
        return MemoryLlamaConfig(**fields)
    except (ValueError, TypeError, StrictDataclassError) as error:
        # Strict-dataclass type errors wrap the validator's message: report the cause itself.
        cause = error.__cause__ if isinstance(error, StrictDataclassError) and error.__cause__ else error
        depth = base_config.num_hidden_layers
        raise GraftError(
            f"Invalid memory settings for this base ({depth} layers, valid layer indices 0..{depth - 1}, "
            f"hidden size {base_config.hidden_size}): {' '.join(str(cause).split())}"
        ) from error


def resolve_dtype(dtype: str, stored=None) -> torch.dtype:
    """"auto" keeps `stored` (the base checkpoint's dtype; float32 when unknown, as for GGUF); otherwise one of
    float32, bfloat16, float16."""
    if dtype != "auto":
        if dtype not in DTYPES:
            raise GraftError(f"Unknown dtype {dtype!r}; choose one of auto, {', '.join(DTYPES)}.")
        return DTYPES[dtype]
    if isinstance(stored, torch.dtype):
        return stored
    return DTYPES.get(str(stored).removeprefix("torch."), torch.float32)


# ---- the graft ----------------------------------------------------------------------------------


def graft(
    base,
    config: MemoryLlamaConfig,
    *,
    tokenizer=None,
    dtype: torch.dtype | None = None,
    allow_pickle: bool = False,
    memory_placement: str = "device",
    memory_offload_dir: str | None = None,
):
    """The MemoryLlamaForCausalLM of `config` holding the base's weights, its memory computing zero.

    Args:
        base: a loaded Llama-layout causal LM (its weights are copied; a GGUF model dequantised by transformers
            included), or a local checkpoint folder or Hub id, loaded straight into the MemoryLlama (no second
            copy of the weights in memory).
        config: the memory config (`memory_config_from_llama`).
        tokenizer: builds Engram's canonical-id map (the identity without one).
        dtype: of the result; default the base model's own (for a folder: "auto", its stored dtype).
        allow_pickle: for a folder, accept pickle-only weights.
        memory_placement, memory_offload_dir: where the memory tables live (`set_memory_placement`). Grafted onto a
            loaded base, a table off the device is created straight in its placement, so it may be larger than RAM.
    Raises:
        GraftError: the base's weights do not have the Llama layout (only memory keys may be missing).
    """
    if isinstance(base, (str, os.PathLike)):
        # The memory keys are missing by design and checked below; transformers' load report would list them all.
        previous = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            model, info = from_pretrained(
                MemoryLlamaForCausalLM, base, allow_pickle=allow_pickle, config=config, dtype=dtype or "auto",
                output_loading_info=True, memory_placement=memory_placement, memory_offload_dir=memory_offload_dir,
            )
        finally:
            hf_logging.set_verbosity(previous)
        missing, unexpected, mismatched = info["missing_keys"], info["unexpected_keys"], info.get("mismatched_keys") or []
    else:
        parameter = next(base.parameters())
        config._attn_implementation = base.config._attn_implementation  # same attention kernels, same numbers
        off_device = memory_placement != "device"
        with deferred_memory_tables() if off_device else contextlib.nullcontext():
            model = MemoryLlamaForCausalLM(config)
        if off_device:
            model.set_memory_placement(memory_placement, memory_offload_dir)
        model = model.to(device=parameter.device, dtype=dtype or parameter.dtype)
        missing, unexpected = model.load_state_dict(base.state_dict(), strict=False)
        mismatched = []
        model.generation_config = base.generation_config
    not_memory = sorted(set(missing) - set(memory_kinds(model)))  # anything else missing would be silently random
    if unexpected or not_memory or mismatched:
        raise GraftError(
            f"The base model's weights do not match the Llama layout: unexpected keys {sorted(unexpected)[:5]}, "
            f"missing non-memory keys {not_memory[:5]}, keys of other shapes {sorted(mismatched)[:5]}. Only "
            "checkpoints with Llama key names can be grafted."
        )
    model.eval()
    if tokenizer is not None and config.engram_layers:
        with torch.no_grad():
            canonical = model.model.engram_canonical_map
            canonical.copy_(build_canonical_map(tokenizer, config.vocab_size).to(canonical.device))
    return model


def from_llama(
    llama_model_or_path,
    tokenizer=None,
    *,
    allow_pickle: bool = False,
    memory_placement: str = "device",
    memory_offload_dir: str | None = None,
    **memory_fields,
) -> MemoryLlamaForCausalLM:
    """Graft memory onto a Llama-family causal LM: a loaded model, a checkpoint folder, a Hub id or a `.gguf`
    file (dequantised by transformers; needs `gguf`).

    The result computes exactly what the Llama computes (the memory's last projections start at zero).
    With a `tokenizer`, Engram's canonical-id map is built from it (otherwise the identity).
    `memory_fields` are MemoryLlamaConfig memory fields, e.g. `engram_layers=[1], chapter_layers=[3]`;
    `memory_preset(config, "both")` gives fields sized for the base. A folder's weights load from safetensors
    only, unless `allow_pickle=True`. `memory_placement` / `memory_offload_dir` say where the tables live (see
    `graft`).

        model = modeling_memory.from_llama("path/to/llama", tokenizer=tokenizer, engram_layers=[2], chapter_layers=[10])
    """
    base = llama_model_or_path
    if isinstance(base, (str, os.PathLike)) and str(base).lower().endswith(".gguf"):
        gguf = Path(base).expanduser().resolve()
        base = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    placement = dict(memory_placement=memory_placement, memory_offload_dir=memory_offload_dir)
    if isinstance(base, (str, os.PathLike)):
        config = memory_config_from_llama(AutoConfig.from_pretrained(base), **memory_fields)
        return graft(base, config, tokenizer=tokenizer, allow_pickle=allow_pickle, **placement)
    config = memory_config_from_llama(base.config, **memory_fields)
    return graft(base, config, tokenizer=tokenizer, **placement)


__all__ = [
    "DTYPES",
    "GraftError",
    "LLAMA_COMPATIBLE_MODEL_TYPES",
    "MEMORY_FIELDS",
    "check_base_config",
    "check_base_family",
    "check_memory_fields",
    "from_llama",
    "graft",
    "memory_config_from_llama",
    "memory_preset",
    "resolve_dtype",
]
