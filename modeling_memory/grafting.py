"""Grafting memory onto a Llama: the memory config from a Llama config, and a MemoryLlama that starts
from the Llama's weights. Every Llama parameter keeps its key, the memory's last projections are zero,
so the result computes exactly what the Llama computed.
"""

import dataclasses
import os

import torch
from transformers import AutoConfig, PretrainedConfig
from transformers.models.llama.configuration_llama import LlamaConfig

from .canonical_ids import build_canonical_map
from .configuration_memory_llama import MemoryLlamaConfig

# Families whose checkpoints transformers loads with the Llama layout and key names.
LLAMA_COMPATIBLE_MODEL_TYPES = ("llama", "memory_llama", "mistral")

_LLAMA_FIELDS = {f.name for f in dataclasses.fields(LlamaConfig)}
MEMORY_FIELDS = tuple(f.name for f in dataclasses.fields(MemoryLlamaConfig) if f.name not in _LLAMA_FIELDS)

# Config entries describing the source checkpoint rather than the architecture.
_SOURCE_ONLY_KEYS = ("model_type", "architectures", "quantization_config", "transformers_version", "auto_map")


def memory_config_from_llama(base_config: PretrainedConfig, **memory_fields) -> MemoryLlamaConfig:
    """A MemoryLlamaConfig with the base's architecture and the given memory fields.

    Raises ValueError for a base family without the Llama layout or for an unknown memory field.
    """
    if base_config.model_type not in LLAMA_COMPATIBLE_MODEL_TYPES:
        raise ValueError(
            f"Cannot graft memory onto model_type={base_config.model_type!r}: supported families are "
            f"{', '.join(LLAMA_COMPATIBLE_MODEL_TYPES)} (checkpoints with the Llama layout and key names)."
        )
    unknown = sorted(set(memory_fields) - set(MEMORY_FIELDS))
    if unknown:
        raise ValueError(f"Unknown memory field(s) {unknown}; valid fields are: {', '.join(MEMORY_FIELDS)}.")
    fields = {k: v for k, v in base_config.to_dict().items() if k not in _SOURCE_ONLY_KEYS}
    if base_config.model_type == "mistral" and fields.get("sliding_window") is not None:
        raise ValueError(
            "This Mistral checkpoint uses sliding-window attention, which the Llama layout does not have; "
            "only Mistral checkpoints with sliding_window=None can be grafted."
        )
    fields = {k: v for k, v in fields.items() if k in _LLAMA_FIELDS}
    fields.update(memory_fields)
    return MemoryLlamaConfig(**fields)


def graft_from_llama(model_class, llama_model_or_path, tokenizer=None, **memory_fields):
    """See `MemoryLlamaForCausalLM.from_llama`."""
    if isinstance(llama_model_or_path, (str, os.PathLike)):
        base_config = AutoConfig.from_pretrained(llama_model_or_path)
        config = memory_config_from_llama(base_config, **memory_fields)
        model, info = model_class.from_pretrained(
            llama_model_or_path, config=config, dtype=config.dtype or "auto", output_loading_info=True
        )
        missing, unexpected = info["missing_keys"], info["unexpected_keys"]
    else:
        llama = llama_model_or_path
        config = memory_config_from_llama(llama.config, **memory_fields)
        config._attn_implementation = llama.config._attn_implementation
        dtype = next(llama.parameters()).dtype
        model = model_class(config).to(device=next(llama.parameters()).device, dtype=dtype)
        missing, unexpected = model.load_state_dict(llama.state_dict(), strict=False)
    # Only the memory may start fresh: anything else missing would be silently random.
    not_memory = sorted(key for key in missing if not is_memory_parameter_name(key))
    if unexpected or not_memory:
        raise ValueError(
            f"The base model's weights do not match the Llama layout: unexpected keys {sorted(unexpected)[:5]}, "
            f"missing non-memory keys {not_memory[:5]}."
        )
    model.eval()
    if tokenizer is not None and config.engram_layers:
        with torch.no_grad():
            canonical = build_canonical_map(tokenizer, config.vocab_size)
            model.model.engram_canonical_map.copy_(canonical.to(model.model.engram_canonical_map.device))
    return model


# Name segments of everything the memory adds to a Llama (parameters and buffers).
_MEMORY_SEGMENTS = (
    "engram", "chapter_memory", "memory_layernorm", "chapter_bank", "engram_canonical_map", "product_key_memory", "pkm_values",
)


def is_memory_parameter_name(name: str) -> bool:
    """Whether a parameter, buffer or module name belongs to the memory: Engram, chapter memory, its layer
    norm, the shared chapter bank or the canonical-id map."""
    return any(segment in _MEMORY_SEGMENTS for segment in name.split("."))


PRESETS = ("engram", "chapters", "both", "pkm", "all")


def memory_preset(base_config: PretrainedConfig, preset: str = "both") -> dict:
    """Memory fields sized for a base model.

    Engram sits early (about 1/15 of the depth, where n-gram knowledge helps most) and at mid-depth;
    chapter memory at 1/3 and 2/3 of the depth. The bank holds 128 chapters of 32 tokens (4,096
    memory tokens, 2 routed + 1 shared read per token); each Engram layer has 2 orders x 8 heads of
    ~50K-row tables. The product-key memory ("pkm"; "all" is "both" plus it) sits beside the MLP at
    mid-depth, where sparse memory fine-tuning places it: 256^2 = 65,536 value slots of the model's width,
    4 heads reading 32 each.
    """
    if preset not in PRESETS:
        raise ValueError(f"Unknown preset {preset!r}; choose one of {', '.join(PRESETS)}.")
    depth, hidden = base_config.num_hidden_layers, base_config.hidden_size
    fields: dict = {"engram_layers": [], "chapter_layers": [], "pkm_layers": []}
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
        fields.update(pkm_layers=[depth // 2], pkm_num_keys=256, pkm_top_k=32, pkm_heads=4, pkm_key_dim=256)
    return fields
