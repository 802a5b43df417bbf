"""Loading checkpoints in the tools: weights come from safetensors only, unless the user opts in to pickle;
an adapter folder written by `memory-llama train` in a LoRA mode loads with the base model it names.

Pickle files (`pytorch_model.bin`, `.pt`, ...) can run code when loaded. Every loading path of this package
(the `memory-llama` commands, `from_llama` with a path, the demo, the graft and export tools) goes through
`from_pretrained` here, which refuses a folder holding only pickle weights with one clear message; the
commands' `--allow-pickle` (`allow_pickle=True` from Python) lets them load. A plain
`MemoryLlamaForCausalLM.from_pretrained` is transformers' own and follows its defaults.

`load_memory_llama` reads a checkpoint folder, a Hub id or an adapter folder alike (the commands that read a
model go through it), and with `merge=True` merges an adapter into its base.
"""

import json
import os

from modeling_memory.tools.errors import ToolError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
SAFETENSORS_SUFFIXES = (".safetensors", ".safetensors.index.json")


def pickle_only_weights(folder, subfolder: str = "") -> list[str]:
    """The pickle weight files of a local checkpoint folder that holds no safetensors weights (else [])."""
    directory = os.path.join(str(folder), subfolder)
    names = os.listdir(directory) if os.path.isdir(directory) else []
    if any(name.endswith(SAFETENSORS_SUFFIXES) for name in names):
        return []
    return sorted(name for name in names if name.endswith(PICKLE_SUFFIXES))


def pickle_only_error(where: str, pickles) -> ToolError:
    """The one message for a checkpoint whose only weights are pickle files."""
    return ToolError(
        f"{where} holds only pickle weights ({', '.join(pickles)}), which can run code when loaded. Convert them "
        "to safetensors, or opt in with --allow-pickle (allow_pickle=True from Python) if you trust their source."
    )


def refuse_pickle_only(folder, *, allow_pickle: bool = False, subfolder: str = "", where: str | None = None) -> None:
    """Raise ToolError when `folder` holds only pickle weights and the user has not opted in to them."""
    pickles = pickle_only_weights(folder, subfolder)
    if pickles and not allow_pickle:
        raise pickle_only_error(where or str(folder), pickles)


def check_gguf_file(path, where: str) -> None:
    """Refuse a file that does not start with the GGUF magic bytes (a failed download, an HTML error page)."""
    try:
        with open(path, "rb") as handle:
            magic = handle.read(4)
    except OSError as error:
        raise ToolError(f"Cannot read {where}: {error}") from error
    if magic != b"GGUF":
        raise ToolError(f"{where} is not a GGUF file (it does not start with the GGUF magic bytes): is the download complete?")


def looks_like_hub_id(text: str) -> bool:
    """Whether a checkpoint named on the command line can be a Hub id (`owner/name`), not a local path or file.

    A name without an owner (`does-not-exist`) is taken for a local path: every Hub repository has an owner
    (the old owner-less names redirect), and asking the Hub about a mistyped folder name would mean seconds of
    retries before the error when the network is unreachable."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if text.startswith((".", "/", "~")) or text.count("/") != 1 or text.lower().endswith(".gguf"):
        return False
    try:
        validate_repo_id(text)
    except HFValidationError:
        return False
    return True


def from_pretrained(model_class, location, *, allow_pickle: bool = False, **kwargs):
    """`model_class.from_pretrained(location, **kwargs)` reading safetensors only unless `allow_pickle`."""
    if os.path.isdir(str(location)):
        refuse_pickle_only(location, allow_pickle=allow_pickle, subfolder=kwargs.get("subfolder", ""))
    return model_class.from_pretrained(location, use_safetensors=None if allow_pickle else True, **kwargs)


ADAPTER_CONFIG_NAME = "adapter_config.json"


def adapter_base(folder) -> str | None:
    """The base model folder that the PEFT adapter in `folder` names (`base_model_name_or_path` in its
    adapter_config.json), or None when `folder` holds no adapter. Raises ToolError when that base is not a
    local folder (`memory-llama train` records it as an absolute path)."""
    path = os.path.join(str(folder), ADAPTER_CONFIG_NAME)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as handle:
            base = json.load(handle).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError) as error:
        raise ToolError(f"Cannot read the adapter config {path}: {error}") from error
    if not base or not os.path.isdir(base):
        raise ToolError(f"The adapter in {folder} names base model {base!r}, which is not a local folder.")
    return base


def load_tokenizer(*locations):
    """The tokenizer saved in the first of `locations` that has one (e.g. a run's output, then its base), or None."""
    from transformers import AutoTokenizer

    for location in locations:
        try:
            return AutoTokenizer.from_pretrained(location)
        except (OSError, ValueError, TypeError):
            continue
    return None


def load_memory_llama(checkpoint, *, allow_pickle: bool = False, merge: bool = False, **kwargs):
    """A MemoryLlama from a checkpoint folder or Hub id, or from an adapter folder written by `memory-llama train`
    in a LoRA mode: the base model it names, then the adapter and the memory trained beside it
    (`peft_modes.load_adapter_with_memory`), as a PeftModel; with `merge`, the LoRA weights merged into the base
    by PEFT's `merge_and_unload`: a plain MemoryLlamaForCausalLM. `kwargs` go to `from_pretrained` (dtype, ...)."""
    from modeling_memory.memory_llama.modeling_memory_llama import MemoryLlamaForCausalLM

    base = adapter_base(checkpoint) if os.path.isdir(str(checkpoint)) else None
    model = from_pretrained(MemoryLlamaForCausalLM, base or checkpoint, allow_pickle=allow_pickle, **kwargs)
    if base is None:
        return model
    from modeling_memory.training.peft_modes import load_adapter_with_memory

    refuse_pickle_only(checkpoint, allow_pickle=allow_pickle)  # adapter_model.bin without a safetensors twin
    model = load_adapter_with_memory(model, str(checkpoint))
    return model.merge_and_unload() if merge else model


__all__ = [
    "ADAPTER_CONFIG_NAME",
    "adapter_base",
    "check_gguf_file",
    "from_pretrained",
    "load_memory_llama",
    "load_tokenizer",
    "looks_like_hub_id",
    "pickle_only_error",
    "pickle_only_weights",
    "refuse_pickle_only",
]
