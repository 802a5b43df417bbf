"""`memory-llama merge ADAPTER OUT`: a LoRA adapter written by `memory-llama train`, merged into its base, as a
plain MemoryLlama checkpoint that every tool and `from_pretrained` read without PEFT.

The LoRA weights are merged by PEFT's own `merge_and_unload`; the memory that the LoRA modes train directly
(saved beside the adapter as memory.safetensors) is loaded into the base first, so it is part of the result.
Before anything appears at OUT, the merged model's logits are compared with the adapter model's.
"""

import dataclasses
from pathlib import Path

import torch

from modeling_memory.choices import DEFAULT_MAX_SHARD_SIZE
from modeling_memory.tools.errors import ToolError
from modeling_memory.tools.export import verification_ids
from modeling_memory.tools.loading import adapter_base, load_memory_llama, load_tokenizer
from modeling_memory.tools.safe_write import check_output_dir, staging_directory

# Largest |logit difference| accepted between the merged and the adapter model, relative to the largest logit:
# W + s·BA against W·x + s·B(A·x) differs by rounding only (float32 on the CPU; half precision gets more room).
FLOAT32_TOLERANCE = 1e-4
HALF_PRECISION_TOLERANCE = 2e-2


@dataclasses.dataclass
class MergeResult:
    out: Path
    base: str
    files: list[str]
    max_abs_logit_diff: float  # merged model vs adapter model


def merge_adapter(
    adapter,
    out,
    *,
    overwrite: bool = False,
    max_shard_size: str = DEFAULT_MAX_SHARD_SIZE,
    allow_pickle: bool = False,
) -> MergeResult:
    """Merge the adapter folder `adapter` into the base model it names and write the plain checkpoint to `out`
    (weights in the base's dtype, config, generation config, tokenizer), checked against the adapter model.

    Raises ToolError: `adapter` is not an adapter folder, its base is not a local folder, `out` cannot be
    written, or the merged model's logits differ from the adapter model's (nothing is written then)."""
    adapter, out = Path(adapter).expanduser().absolute(), Path(out).expanduser().absolute()
    base = adapter_base(adapter) if adapter.is_dir() else None
    if base is None:
        raise ToolError(
            f"{adapter} is not an adapter folder (no adapter_config.json): pass the --output_dir of a "
            "`memory-llama train --mode lora` (or lora_all) run."
        )
    check_output_dir(out, overwrite, sources=(adapter, base))
    model = load_memory_llama(adapter, allow_pickle=allow_pickle, dtype="auto").eval()
    input_ids = verification_ids(model.config)
    with torch.no_grad():
        expected = model(input_ids=input_ids).logits.float()
        merged = model.merge_and_unload().eval()
        actual = merged(input_ids=input_ids).logits.float()
    difference = float((expected - actual).abs().max())
    relative = FLOAT32_TOLERANCE if merged.dtype == torch.float32 else HALF_PRECISION_TOLERANCE
    tolerance = relative * max(1.0, float(expected.abs().max()))
    if not difference <= tolerance:
        raise ToolError(
            f"The merged model's logits differ from the adapter model's by {difference:.3g} (tolerance "
            f"{tolerance:.3g}); nothing was written to {out}."
        )
    tokenizer = load_tokenizer(adapter, base)
    with staging_directory(out, overwrite) as staging:
        merged.save_pretrained(staging, max_shard_size=max_shard_size)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        files = sorted(p.name for p in staging.iterdir())
    return MergeResult(out=out, base=base, files=files, max_abs_logit_diff=difference)


__all__ = ["MergeResult", "merge_adapter"]
