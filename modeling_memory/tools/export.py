"""Hub export and upload: `memory-llama export CHECKPOINT OUT`, `memory-llama push CHECKPOINT REPO_ID`
and `modeling_memory.push_to_hub(model, repo_id)`. CHECKPOINT may be an adapter folder written by
`memory-llama train` in a LoRA mode: it is merged into its base first (`loading.load_memory_llama`).

An exported folder loads with `trust_remote_code=True` where this package is not installed. transformers
builds it: with the config and model classes registered for their Auto classes, `save_pretrained` copies
`modeling_memory_llama.py`, `configuration_memory_llama.py` and every file they reach by relative import
(the flat run-time modules, kernels included) and writes `auto_map` into config.json. The registration
lasts only for the export, so a MemoryLlama is never "remote code" otherwise.

Every export is checked before it appears: a fresh Python process in which `modeling_memory` cannot be
imported loads the folder as remote code and must reproduce the model's logits. That process runs in a scratch
folder, so it is given absolute paths only.
"""

import contextlib
import copy
import dataclasses
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from transformers import AutoConfig

from modeling_memory.tools.errors import ToolError
from modeling_memory.tools.loading import adapter_base, from_pretrained, load_memory_llama, load_tokenizer, looks_like_hub_id
from modeling_memory.tools.model_card import read_base_info, render_model_card
from modeling_memory.memory_llama.modeling_memory_llama import MemoryLlamaForCausalLM
from modeling_memory.tools.safe_write import DEFAULT_MAX_SHARD_SIZE, check_output_dir, staging_directory


class ExportError(ToolError):
    """An export or push that cannot be done as asked; the message says what is wrong and how to fix it."""


@dataclasses.dataclass
class ExportResult:
    out: Path
    files: list[str]
    max_abs_logit_diff: float  # remote-code load without the package vs the exported model


# Loads FOLDER as remote code in a process where `modeling_memory` cannot be imported, and saves the
# logits of the given token ids. `-I` keeps the working directory and PYTHONPATH off sys.path; the
# finder refuses the package wherever it is installed (an editable install would otherwise provide it).
_LOAD_WITHOUT_PACKAGE = r"""
import importlib.abc
import sys


class RefusePackage(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "modeling_memory" or name.startswith("modeling_memory."):
            raise ModuleNotFoundError(f"No module named {name!r} (hidden for this check)", name=name)
        return None


sys.meta_path.insert(0, RefusePackage())
folder, ids_file, logits_file, dtype_name = sys.argv[1:5]
try:
    import modeling_memory  # noqa: F401
except ModuleNotFoundError:
    pass
else:
    sys.exit("modeling_memory is importable: this check would prove nothing")

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=getattr(torch, dtype_name)).eval()
if not type(model).__module__.startswith("transformers_modules."):
    sys.exit(f"loaded {type(model).__module__}.{type(model).__name__}, not the folder's remote code")
with torch.no_grad():
    logits = model(input_ids=load_file(ids_file)["input_ids"]).logits
save_file({"logits": logits.float().contiguous()}, logits_file)
"""


def verification_ids(config) -> torch.Tensor:
    """Two fixed rows of up to 16 token ids spread over the vocabulary (no tokenizer needed)."""
    length = min(16, config.max_position_embeddings)
    return (torch.arange(2 * length, dtype=torch.int64).reshape(2, length) * 7919 + 11) % config.vocab_size


def logits_without_package(folder, input_ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Logits of `input_ids` from `folder` loaded with `trust_remote_code=True` in a fresh process where
    `modeling_memory` cannot be imported (CPU). Raises ExportError when the folder does not load there."""
    from safetensors.torch import load_file, save_file

    folder = os.path.abspath(folder)  # the check runs in the scratch folder: a relative path would mean another place
    with tempfile.TemporaryDirectory(prefix="memory-llama-check-") as scratch:
        ids_file, logits_file = os.path.join(scratch, "ids.safetensors"), os.path.join(scratch, "logits.safetensors")
        save_file({"input_ids": input_ids.cpu().contiguous()}, ids_file)
        env = {
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "HF_MODULES_CACHE": os.path.join(scratch, "modules"),  # keep the user's remote-code cache untouched
            "TRANSFORMERS_VERBOSITY": "error",
        }
        dtype_name = str(dtype).removeprefix("torch.")
        command = [sys.executable, "-I", "-c", _LOAD_WITHOUT_PACKAGE, str(folder), ids_file, logits_file, dtype_name]
        result = subprocess.run(command, env=env, capture_output=True, text=True, cwd=scratch)
        if result.returncode != 0:
            raise ExportError(
                f"The exported folder does not load with trust_remote_code=True without the package:\n"
                f"{(result.stderr or result.stdout)[-3000:]}"
            )
        return load_file(logits_file)["logits"]


@contextlib.contextmanager
def registered_for_auto_class(model: MemoryLlamaForCausalLM):
    """Register the config and model classes with AutoConfig / AutoModelForCausalLM for the block only, so
    `save_pretrained` copies the modeling code and writes `auto_map`; AutoModel is mapped too. Afterwards
    the classes and the model's config are as they were."""
    classes = ((type(model), "AutoModelForCausalLM"), (type(model.config), "AutoConfig"))
    previous = [(cls, cls.__dict__.get("_auto_class")) for cls, _ in classes]
    had_auto_map = "auto_map" in model.config.__dict__
    previous_auto_map = copy.deepcopy(model.config.__dict__.get("auto_map"))
    try:
        for cls, auto_class in classes:
            cls.register_for_auto_class(auto_class)
        module = type(model).__module__.rsplit(".", 1)[-1]
        model.config.auto_map = {"AutoModel": f"{module}.MemoryLlamaModel"}
        yield
    finally:
        for cls, auto_class in previous:
            if auto_class is None:
                if "_auto_class" in cls.__dict__:
                    delattr(cls, "_auto_class")
            else:
                cls._auto_class = auto_class
        if had_auto_map:
            model.config.auto_map = previous_auto_map
        else:
            model.config.__dict__.pop("auto_map", None)


def _logit_tolerance(model) -> float:
    """Exact up to float32 rounding on the CPU; half precision or another device gets more room."""
    same_numerics = model.dtype == torch.float32 and model.device.type == "cpu"
    return 1e-5 if same_numerics else 2e-2


def export_model_for_hub(
    model: MemoryLlamaForCausalLM,
    out,
    *,
    tokenizer=None,
    overwrite: bool = False,
    max_shard_size: str = DEFAULT_MAX_SHARD_SIZE,
    model_id: str | None = None,
    base_name: str | None = None,
    base_hub_id: str | None = None,
    license: str | None = None,
    tags=(),
) -> ExportResult:
    """Write a Hub-ready copy of `model` to `out` (weights, config with `auto_map`, the flat modeling files,
    generation config, tokenizer when given, model card), checked to load without the package.

    `model_id` is what the card's loading snippets use (default: the folder name); `base_*`, `license` and
    `tags` describe the base model on the card.
    """
    if not isinstance(model, MemoryLlamaForCausalLM):
        raise ExportError(
            f"Expected a MemoryLlamaForCausalLM from the modeling_memory package, got {type(model).__name__}."
        )
    out = Path(out).expanduser().absolute()
    check_output_dir(out, overwrite)
    model_id = model_id or out.name
    with staging_directory(out, overwrite) as staging:
        with registered_for_auto_class(model):
            model.save_pretrained(staging, max_shard_size=max_shard_size)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        input_ids = verification_ids(model.config)
        with torch.no_grad():
            expected = model(input_ids=input_ids.to(model.device)).logits.float().cpu()
        actual = logits_without_package(staging, input_ids, dtype=model.dtype)
        difference = float((expected - actual).abs().max())
        tolerance = _logit_tolerance(model) * max(1.0, float(expected.abs().max()))
        if not difference <= tolerance:
            raise ExportError(
                f"The exported folder loads without the package but its logits differ from the model's by "
                f"{difference:.3g} (tolerance {tolerance:.3g}); nothing was written to {out}."
            )
        card = render_model_card(
            model,
            model_id=model_id,
            base_name=base_name,
            base_hub_id=base_hub_id,
            remote_code=True,
            verification=(
                f"loaded with trust_remote_code=True in a Python process without the package, max |logit "
                f"difference| {difference:.3g} against the package's model"
            ),
            license=license,
            tags=tags,
        )
        card.save(staging / "README.md")
        files = sorted(p.name for p in staging.iterdir())
    return ExportResult(out=out, files=files, max_abs_logit_diff=difference)


def _check_memory_checkpoint(checkpoint: str) -> None:
    path = Path(checkpoint).expanduser()
    if not path.exists() and not looks_like_hub_id(checkpoint):
        raise ExportError(f"{checkpoint!r}: no such checkpoint directory (nor a Hub id, owner/name).")
    if path.exists() and not (path / "config.json").is_file():
        raise ExportError(f"{checkpoint!r} is not a checkpoint directory: it has no config.json.")
    try:
        config = AutoConfig.from_pretrained(checkpoint)
    except (OSError, ValueError) as error:
        raise ExportError(f"Cannot read the config of {checkpoint!r}: {error}") from error
    if config.model_type != "memory_llama":
        raise ExportError(
            f"{checkpoint!r} is a {config.model_type!r} checkpoint, not memory_llama: graft memory onto it first "
            "(`memory-llama graft BASE OUT`)."
        )


def load_checkpoint_for_export(checkpoint: str, allow_pickle: bool = False):
    """(model, tokenizer or None, base name, base Hub id, license) of a MemoryLlama checkpoint, or of an adapter
    folder merged into its base (the base's card describes it)."""
    base = adapter_base(checkpoint) if Path(checkpoint).expanduser().is_dir() else None
    _check_memory_checkpoint(base or checkpoint)
    try:
        if base is not None:
            model = load_memory_llama(checkpoint, allow_pickle=allow_pickle, merge=True, dtype="auto").eval()
        else:
            model = from_pretrained(MemoryLlamaForCausalLM, checkpoint, allow_pickle=allow_pickle, dtype="auto").eval()
    except OSError as error:  # missing weights
        raise ExportError(f"Cannot load the weights of {checkpoint!r}: {error}") from error
    tokenizer = load_tokenizer(checkpoint, *([base] if base else []))
    card_folder = base or checkpoint
    base_name, base_hub_id, license = read_base_info(card_folder) if Path(card_folder).is_dir() else (None, None, None)
    return model, tokenizer, base_name, base_hub_id, license


def export_for_hub(
    checkpoint: str,
    out,
    *,
    overwrite: bool = False,
    max_shard_size: str = DEFAULT_MAX_SHARD_SIZE,
    model_id: str | None = None,
    allow_pickle: bool = False,
) -> ExportResult:
    """`memory-llama export`: a Hub-ready copy of the MemoryLlama checkpoint at `checkpoint` (directory, adapter
    folder merged into its base, or Hub id when online). The base model named on the checkpoint's card carries
    over to the new card."""
    local = Path(checkpoint).expanduser()
    base = adapter_base(local) if local.is_dir() else None
    sources = [local] if local.exists() else []
    check_output_dir(Path(out), overwrite, sources=sources + ([Path(base)] if base else []))
    model, tokenizer, base_name, base_hub_id, license = load_checkpoint_for_export(checkpoint, allow_pickle)
    return export_model_for_hub(
        model,
        out,
        tokenizer=tokenizer,
        overwrite=overwrite,
        max_shard_size=max_shard_size,
        model_id=model_id,
        base_name=base_name,
        base_hub_id=base_hub_id,
        license=license,
    )


def _check_can_push(repo_id: str) -> None:
    from huggingface_hub.constants import is_offline_mode
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise ExportError(f"Invalid Hub repository id {repo_id!r}: {error}") from error
    if is_offline_mode():
        raise ExportError(
            "Cannot push while Hugging Face offline mode is on (HF_HUB_OFFLINE=1): unset it, and log in with "
            "`hf auth login` or set HF_TOKEN."
        )


def upload_folder_to_hub(
    folder,
    repo_id: str,
    *,
    commit_message: str | None = None,
    commit_description: str | None = None,
    private: bool | None = None,
    token: str | bool | None = None,
    revision: str | None = None,
    create_pr: bool = False,
):
    """Create the repository if needed and upload `folder` in one commit; returns huggingface_hub's CommitInfo."""
    from huggingface_hub import HfApi

    from modeling_memory import __version__

    api = HfApi(token=token, library_name="modeling_memory", library_version=__version__)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    if revision is not None and not create_pr and not revision.startswith("refs/pr"):
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    return api.upload_folder(
        repo_id=repo_id,
        folder_path=str(folder),
        commit_message=commit_message or "Upload MemoryLlama (weights, remote code, model card)",
        commit_description=commit_description,
        revision=revision,
        create_pr=create_pr,
    )


def push_checkpoint(checkpoint: str, repo_id: str, *, allow_pickle: bool = False, **upload_arguments):
    """`memory-llama push`: `push_to_hub` of the MemoryLlama checkpoint at `checkpoint` (with its tokenizer).
    `upload_arguments` are those of `push_to_hub`. Returns huggingface_hub's CommitInfo."""
    _check_can_push(repo_id)  # before the weights load
    model, tokenizer, *_ = load_checkpoint_for_export(checkpoint, allow_pickle)
    return push_to_hub(model, repo_id, tokenizer=tokenizer, **upload_arguments)


def push_to_hub(
    model: MemoryLlamaForCausalLM,
    repo_id: str,
    *,
    tokenizer=None,
    max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE,
    tags=None,
    **upload_arguments,
):
    """Upload `model` as a copy that loads with `trust_remote_code=True` where this package is not installed:
    weights, config with `auto_map`, the flat run-time modules, generation config, `tokenizer` when given, and
    a model card (with `tags`). The copy is exported into a temporary folder and checked to load without the
    package before anything is uploaded. `upload_arguments` are those of `upload_folder_to_hub`, named as in
    `PreTrainedModel.push_to_hub`: commit_message, commit_description, private, token, revision, create_pr.
    Returns huggingface_hub's CommitInfo.

        modeling_memory.push_to_hub(model, "you/my-memory-llama", tokenizer=tokenizer)

    (`model.push_to_hub` is transformers' own: it uploads the weights without the modeling code.)"""
    _check_can_push(repo_id)
    base_name = base_hub_id = license = None
    if model.name_or_path and Path(model.name_or_path).is_dir():
        base_name, base_hub_id, license = read_base_info(model.name_or_path)
    with tempfile.TemporaryDirectory(prefix="memory-llama-push-") as scratch:
        folder = Path(scratch) / "export"
        export_model_for_hub(
            model,
            folder,
            tokenizer=tokenizer,
            max_shard_size=max_shard_size,
            model_id=repo_id,
            base_name=base_name,
            base_hub_id=base_hub_id,
            license=license,
            tags=tags or (),
        )
        return upload_folder_to_hub(folder, repo_id, **upload_arguments)


__all__ = [
    "ExportError",
    "ExportResult",
    "export_for_hub",
    "export_model_for_hub",
    "logits_without_package",
    "push_checkpoint",
    "push_to_hub",
    "registered_for_auto_class",
    "verification_ids",
]
