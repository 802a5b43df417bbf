"""`memory-llama graft BASE OUT`: graft memory onto a Llama-family checkpoint and write a MemoryLlama
checkpoint that computes exactly what the base computes until it is trained. Three steps:

    inspect   BASE (directory, Hub id or .gguf) from its metadata alone -> BaseCheckpoint
    plan      the memory settings, tokenizer, dtype and output checked -> GraftPlan (`--dry-run` prints it);
              every check on the input happens here, before any weights are loaded
    run       load the base, record its logits on fixed prompts -> `grafting.graft` -> save into a staging
              directory beside OUT -> reload, compare with the base -> rename the staging directory to OUT

OUT appears only through that final rename (`safe_write.staging_directory`), so a failed or interrupted
run leaves no partial OUT. The graft itself and its checks are `grafting.py`'s, shared with `from_llama`.
"""

import dataclasses
import functools
import json
import zipfile
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig

from modeling_memory.memory_llama.configuration_memory_llama import MemoryLlamaConfig
from modeling_memory.tools.graft import (
    DTYPES,
    GraftError,
    check_base_config,
    check_base_family,
    check_memory_fields,
    graft,
    memory_config_from_llama,
    resolve_dtype,
)
from modeling_memory.tools.loading import check_gguf_file, from_pretrained, looks_like_hub_id, pickle_only_error
from modeling_memory.training.memory_parameters import memory_kinds
from modeling_memory.memory_llama.modeling_memory_llama import MemoryLlamaForCausalLM
from modeling_memory.tools.safe_write import DEFAULT_MAX_SHARD_SIZE, check_output_dir, staging_directory
from modeling_memory.tools.summary import build_on_meta, memory_layout, parameter_counts

# Short prompts of different kinds (prose, numbers, code, another language) on which a graft is verified.
VERIFICATION_PROMPTS = (
    "The capital of France is",
    "In 1905, Albert Einstein published four papers that",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "Le chat dort sur le canapé parce que",
)
DEFAULT_TOLERANCE = 1e-4
_say = functools.partial(print, flush=True)

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
PICKLE_INDEX = "pytorch_model.bin.index.json"
PICKLE_SINGLE = "pytorch_model.bin"
# Files fetched from a Hub repository besides the weights: config, generation config, tokenizer.
_HUB_SMALL_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab*",
    "merges.txt",
    "chat_template*",
    "README.md",
)


# ----------------------------------------------------------------------------------------------------
# Inspect: what BASE is, from its metadata alone


@dataclasses.dataclass
class BaseCheckpoint:
    """What BASE turned out to be, learnt from its metadata only (no weights loaded)."""

    name: str  # shown in the plan and the model card: Hub id, or the directory / file name (no local path)
    kind: str  # "directory", "hub" or "gguf"
    path: Path  # local directory (for "hub": the downloaded snapshot) or the .gguf file
    config: PretrainedConfig
    weights_format: str  # "safetensors", "pickle" or "gguf"
    weight_files: list[str]
    embedding_rows: int | None  # rows of the input embedding as stored, when the format tells cheaply
    hub_id: str | None = None


def inspect_base(base: str, *, allow_pickle: bool = False, revision: str | None = None) -> BaseCheckpoint:
    """Classify BASE and check it from metadata alone: a local Hugging Face directory, a `.gguf` file, or a
    Hub id (downloaded; needs the network unless already in the Hub cache)."""
    path = Path(base).expanduser()
    if path.is_dir():
        return _inspect_directory(path, name=path.resolve().name, allow_pickle=allow_pickle)
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise GraftError(
                f"BASE {base!r} is a file but not a .gguf file: pass a Hugging Face checkpoint directory "
                "(config.json + safetensors), a .gguf file, or a Hub id."
            )
        return _inspect_gguf(path)
    if path.suffix.lower() == ".gguf":
        raise GraftError(f"BASE {base!r}: no such GGUF file.")
    if looks_like_hub_id(base):
        return _inspect_hub(base, allow_pickle=allow_pickle, revision=revision)
    raise GraftError(
        f"BASE {base!r} does not exist: pass a Hugging Face checkpoint directory, a .gguf file, or a Hub id "
        "such as HuggingFaceTB/SmolLM2-135M."
    )


def _read_config(directory: Path, where: str) -> PretrainedConfig:
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise GraftError(
            f"{where} has no config.json, so it is not a Hugging Face checkpoint directory: pass a directory "
            "with config.json and safetensors weights, a .gguf file, or a Hub id."
        )
    try:
        raw = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise GraftError(f"Cannot read {config_file}: {error}. Is the file complete?") from error
    if not isinstance(raw, dict):
        raise GraftError(f"{config_file} does not hold a JSON object; it is not a model config.")
    # The family first, from the raw file: transformers cannot parse a config of a family it does not know.
    check_base_family(raw.get("model_type"), where)
    try:
        config = AutoConfig.from_pretrained(directory)
    except (ValueError, TypeError, KeyError) as error:
        raise GraftError(f"{config_file} is not a valid {raw.get('model_type')} config: {error}") from error
    check_base_config(config, where)
    return config


def _inspect_directory(directory: Path, name: str, allow_pickle: bool, hub_id: str | None = None) -> BaseCheckpoint:
    where = f"BASE {hub_id or str(directory)!r}"
    config = _read_config(directory, where)
    weights_format, files = _find_weights(directory, where, allow_pickle)
    embedding_rows = _check_weights_readable(directory, weights_format, files)
    return BaseCheckpoint(
        name=name,
        kind="hub" if hub_id else "directory",
        path=directory,
        config=config,
        weights_format=weights_format,
        weight_files=files,
        embedding_rows=embedding_rows,
        hub_id=hub_id,
    )


def _shards_of(index_file: Path, where: str) -> list[str]:
    try:
        weight_map = json.loads(index_file.read_text(encoding="utf-8"))["weight_map"]
        return sorted(set(weight_map.values()))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as error:
        raise GraftError(f"{where}: cannot read the shard index {index_file.name} ({error}); is it complete?") from error


def _find_weights(directory: Path, where: str, allow_pickle: bool) -> tuple[str, list[str]]:
    if (directory / SAFETENSORS_INDEX).is_file():
        weights_format, files = "safetensors", _shards_of(directory / SAFETENSORS_INDEX, where)
    elif (directory / SAFETENSORS_SINGLE).is_file():
        weights_format, files = "safetensors", [SAFETENSORS_SINGLE]
    elif (directory / PICKLE_INDEX).is_file() or (directory / PICKLE_SINGLE).is_file():
        if not allow_pickle:
            raise pickle_only_error(where, [PICKLE_SINGLE])
        weights_format = "pickle"
        files = _shards_of(directory / PICKLE_INDEX, where) if (directory / PICKLE_INDEX).is_file() else [PICKLE_SINGLE]
    else:
        ggufs = sorted(p.name for p in directory.glob("*.gguf"))
        hint = f" It holds {', '.join(ggufs)}: pass that .gguf file itself as BASE." if ggufs else ""
        raise GraftError(
            f"{where} has no weights: expected {SAFETENSORS_SINGLE} or {SAFETENSORS_INDEX} with its shards.{hint}"
        )
    missing = [f for f in files if not (directory / f).is_file()]
    if missing:
        raise GraftError(f"{where} is missing weight files {missing}: the download or copy is incomplete.")
    return weights_format, files


def _check_weights_readable(directory: Path, weights_format: str, files: list[str]) -> int | None:
    """Open every weight file's header (not its tensors); returns the stored embedding rows when known."""
    embedding_rows = None
    for name in files:
        file = directory / name
        try:
            if weights_format == "safetensors":
                from safetensors import safe_open

                with safe_open(file, framework="pt") as reader:
                    for key in reader.keys():
                        if key.endswith("embed_tokens.weight"):
                            embedding_rows = reader.get_slice(key).get_shape()[0]
            elif not zipfile.is_zipfile(file):
                raise OSError("not a torch.save zip archive")
        except Exception as error:  # safetensors raises its own error types for damaged headers
            raise GraftError(
                f"Cannot read weight file {file}: {error}. The file is damaged or incomplete; download or copy it again."
            ) from error
    return embedding_rows


def _inspect_gguf(file: Path) -> BaseCheckpoint:
    where = f"BASE {str(file)!r}"
    check_gguf_file(file, where)
    try:
        config = AutoConfig.from_pretrained(file.parent, gguf_file=file.name)
    except (ValueError, KeyError, RuntimeError, OSError) as error:
        raise GraftError(f"transformers cannot read {where}: {error}") from error
    check_base_config(config, where)
    return BaseCheckpoint(
        name=file.name,
        kind="gguf",
        path=file,
        config=config,
        weights_format="gguf",
        weight_files=[file.name],
        embedding_rows=None,
    )


def _inspect_hub(repo_id: str, allow_pickle: bool, revision: str | None) -> BaseCheckpoint:
    """Download config and tokenizer first, check them, then the weights."""
    from huggingface_hub import HfApi, snapshot_download, try_to_load_from_cache
    from huggingface_hub.constants import is_offline_mode
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

    where = f"BASE {repo_id!r}"
    if is_offline_mode():
        # A copy downloaded earlier is a snapshot folder in the Hub cache; the directory checks take it from there.
        cached_config = try_to_load_from_cache(repo_id, "config.json", revision=revision)
        if not isinstance(cached_config, str):
            raise GraftError(
                f"{where} is not a local path, so it was taken as a Hub id, but Hugging Face offline mode is on "
                f"(HF_HUB_OFFLINE=1) and the repository is not in the local Hub cache. Unset HF_HUB_OFFLINE to "
                f"download it, or pass a local checkpoint directory or .gguf file."
            )
        snapshot = Path(cached_config).parent
        return _inspect_directory(snapshot, name=repo_id, allow_pickle=allow_pickle, hub_id=repo_id)

    try:
        repo_files = set(HfApi().list_repo_files(repo_id, revision=revision))
        if "config.json" not in repo_files:
            ggufs = sorted(f for f in repo_files if f.endswith(".gguf"))
            hint = f" It holds GGUF files ({', '.join(ggufs[:3])}): download one and pass its path." if ggufs else ""
            raise GraftError(f"{where} has no config.json: it is not a transformers checkpoint.{hint}")
        # Only the transformers-format weights: some repositories also hold other copies (consolidated.*).
        weights = next(
            ([name] for name in (SAFETENSORS_INDEX, SAFETENSORS_SINGLE, PICKLE_INDEX, PICKLE_SINGLE) if name in repo_files),
            None,
        )
        if weights is None:
            raise GraftError(f"{where} has no weights: expected {SAFETENSORS_SINGLE} or {SAFETENSORS_INDEX} with its shards.")
        if weights[0] in (PICKLE_INDEX, PICKLE_SINGLE) and not allow_pickle:
            raise pickle_only_error(where, [PICKLE_SINGLE])
        small_files = [*_HUB_SMALL_FILES, *(w for w in weights if w.endswith(".json"))]
        snapshot = Path(snapshot_download(repo_id, revision=revision, allow_patterns=small_files))
        _read_config(snapshot, where)  # architecture checks before the (large) weights are fetched
        if weights[0].endswith(".index.json"):
            weights += _shards_of(snapshot / weights[0], where)
        snapshot = Path(snapshot_download(repo_id, revision=revision, allow_patterns=weights))
    except (RepositoryNotFoundError, GatedRepoError) as error:
        raise GraftError(
            f"{where}: no such model repository on the Hub, or it is private or gated (log in with `hf auth login`)."
        ) from error
    except RevisionNotFoundError as error:
        raise GraftError(f"{where}: revision {revision!r} does not exist.") from error
    except (HfHubHTTPError, OSError) as error:
        raise GraftError(f"{where}: could not download from the Hub ({error}). Check the network or pass a local copy.") from error
    except Exception as error:
        if type(error).__module__.startswith(("httpx", "httpcore")):  # connection refused, DNS, timeout
            raise GraftError(
                f"{where}: could not reach the Hugging Face Hub ({error}). Check the network, or pass a local "
                "checkpoint directory or .gguf file."
            ) from error
        raise
    return _inspect_directory(snapshot, name=repo_id, allow_pickle=allow_pickle, hub_id=repo_id)


# ----------------------------------------------------------------------------------------------------
# Plan: every check on the input, no weights loaded


@dataclasses.dataclass
class GraftPlan:
    """Everything decided before any weights are loaded; `describe()` is what `--dry-run` prints."""

    base: BaseCheckpoint
    out: Path
    memory_config: MemoryLlamaConfig
    dtype: torch.dtype
    max_shard_size: str
    tokenizer_size: int
    allow_pickle: bool
    overwrite: bool
    counts: dict[str, int]
    new_parameters: int
    new_bytes: int
    total_bytes: int

    def describe(self) -> str:
        config = self.memory_config
        base = self.base
        where = {"directory": "local directory", "hub": "Hub repository", "gguf": "GGUF file"}[base.kind]
        files = ", ".join(base.weight_files[:3]) + (f", ... ({len(base.weight_files)} files)" if len(base.weight_files) > 3 else "")
        base_parameters = self.counts["total"] - self.new_parameters
        tables = [("chapter bank", "chapter_bank"), ("Engram tables", "engram_tables"), ("product-key values", "pkm_values")]
        breakdown = ", ".join(f"{label} {self.counts[key]:,}" for label, key in tables if self.counts[key])
        lines = [
            f"base:            {base.name} ({where}; {base.weights_format} weights: {files})",
            f"architecture:    {base.config.model_type}, {config.num_hidden_layers} layers, hidden {config.hidden_size}, "
            f"vocab {config.vocab_size:,} (tokenizer {self.tokenizer_size:,})",
            f"output:          {self.out} ({str(self.dtype).removeprefix('torch.')}, shards of at most {self.max_shard_size})",
            *("memory:          " + line if i == 0 else "                 " + line for i, line in enumerate(memory_layout(config).splitlines())),
            f"engram layers:   {config.engram_layers or 'none'}",
            f"chapter layers:  {config.chapter_layers or 'none'}",
            f"parameters:      base {base_parameters:,} + new {self.new_parameters:,} "
            f"({breakdown + ', ' if breakdown else ''}other memory {self.counts['memory_other']:,}) = {self.counts['total']:,}",
            f"bytes:           new {_human_bytes(self.new_bytes)}, checkpoint {_human_bytes(self.total_bytes)}",
        ]
        return "\n".join(lines)


def parse_overrides(assignments) -> dict:
    """`["chapter_top_k=4", "engram_layers=[1, 5]"]` -> {field: value}. Values are JSON when they parse as
    JSON (numbers, lists, booleans, null), strings otherwise; every key must be a memory field."""
    fields = {}
    for assignment in assignments or ():
        key, sep, text = assignment.partition("=")
        key = key.strip()
        if not sep or not key:
            raise GraftError(f"--set {assignment!r}: expected FIELD=VALUE, e.g. --set chapter_top_k=4.")
        try:
            fields[key] = json.loads(text)
        except json.JSONDecodeError:
            fields[key] = text
    check_memory_fields(fields, "--set")
    return fields


def read_memory_json(path) -> dict:
    """Memory fields from a JSON file holding one object {field: value}."""
    try:
        fields = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise GraftError(f"Cannot read the memory settings file {path}: {error}") from error
    if not isinstance(fields, dict):
        raise GraftError(f"{path} must hold a JSON object of memory fields, e.g. {{\"chapter_top_k\": 4}}.")
    check_memory_fields(fields, str(path))
    return fields


def load_base_tokenizer(base: BaseCheckpoint, tokenizer_path: str | None = None):
    """The tokenizer that ships with BASE (or the one at `tokenizer_path`)."""
    tokenizer_files = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
    if tokenizer_path is None and base.kind != "gguf" and not any((base.path / f).is_file() for f in tokenizer_files):
        raise GraftError(
            f"BASE {base.name!r} has no tokenizer files ({', '.join(tokenizer_files)}). The Engram canonical-id map "
            "and OUT need the checkpoint's tokenizer: add its tokenizer files, or pass --tokenizer PATH."
        )
    try:
        if tokenizer_path is not None:
            return AutoTokenizer.from_pretrained(tokenizer_path)
        if base.kind == "gguf":
            return AutoTokenizer.from_pretrained(base.path.parent, gguf_file=base.path.name)
        return AutoTokenizer.from_pretrained(base.path)
    except (OSError, ValueError, TypeError, KeyError) as error:
        where = tokenizer_path or base.name
        reason = " ".join(str(error).split())
        raise GraftError(
            f"Cannot load a tokenizer from {where!r} ({reason}). The Engram canonical-id map and OUT need the "
            "checkpoint's tokenizer: add its tokenizer files, or pass --tokenizer PATH."
        ) from error


def _check_vocab_sizes(base: BaseCheckpoint, tokenizer) -> None:
    vocab = base.config.vocab_size
    if base.embedding_rows is not None and base.embedding_rows != vocab:
        raise GraftError(
            f"BASE's config says vocab_size={vocab} but its embedding has {base.embedding_rows} rows; fix config.json."
        )
    if len(tokenizer) > vocab:
        raise GraftError(
            f"The tokenizer has {len(tokenizer):,} tokens but the model's embedding has only {vocab:,} rows, so ids "
            f">= {vocab} would have no embedding. Use the checkpoint's own tokenizer (--tokenizer), or resize the "
            "embeddings (model.resize_token_embeddings) before grafting."
        )


def _check_shard_size(max_shard_size: str) -> None:
    from transformers.utils.hub import convert_file_size_to_int

    try:
        convert_file_size_to_int(max_shard_size)
    except (ValueError, TypeError) as error:
        raise GraftError(f"--max-shard-size {max_shard_size!r}: use digits and a unit, e.g. 5GB or 500MB.") from error


def _human_bytes(count: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if count < 1000 or unit == "GB":
            return f"{count:,.0f} {unit}" if unit == "B" else f"{count:,.1f} {unit}"
        count /= 1000
    raise AssertionError("unreachable")


def _checkpoint_bytes(model, float_dtype: torch.dtype) -> tuple[int, int, int]:
    """(new parameters, new bytes, total bytes) of what save_pretrained writes, from a model on meta."""
    saved = set(model.state_dict())
    memory = memory_kinds(model)
    tensors = dict(model.named_parameters())  # tied weights once
    tensors.update({name: b for name, b in model.named_buffers() if name in saved})
    new_parameters = new_bytes = total_bytes = 0
    for name, tensor in tensors.items():
        size = tensor.numel() * (float_dtype.itemsize if tensor.is_floating_point() else tensor.element_size())
        total_bytes += size
        if name in memory:
            new_bytes += size
            new_parameters += tensor.numel() if isinstance(tensor, torch.nn.Parameter) else 0
    return new_parameters, new_bytes, total_bytes


def plan_graft(
    base: str,
    out,
    *,
    preset: str = "both",
    memory_json: str | None = None,
    overrides=(),
    dtype: str = "auto",
    tokenizer: str | None = None,
    allow_pickle: bool = False,
    overwrite: bool = False,
    max_shard_size: str = DEFAULT_MAX_SHARD_SIZE,
    revision: str | None = None,
):
    """Every check on the input, no weights loaded. Returns (plan, base tokenizer).

    Args:
        base: a Hugging Face checkpoint directory, a `.gguf` file, or a Hub id.
        out: the output directory; refused when it exists and is not empty, unless `overwrite`.
        preset: one of `choices.GRAFT_PRESETS` ("both" by default), sized for the base by `grafting.memory_preset`.
        memory_json: a JSON file of memory fields applied over the preset.
        overrides: "field=value" strings applied last (values parsed as JSON when possible).
        dtype: "auto" (the base's dtype; float32 for GGUF), or one of `grafting.DTYPES`.
        tokenizer: a tokenizer to use instead of the one shipped with BASE.
        allow_pickle: accept pickle-only (`pytorch_model.bin`) weights.
        max_shard_size: largest safetensors shard, e.g. "5GB".
        revision: Hub revision when BASE is a Hub id.
    """
    out = Path(out)
    fields = {**(read_memory_json(memory_json) if memory_json else {}), **parse_overrides(overrides)}
    resolve_dtype(dtype)  # a bad name fails before BASE is even looked at
    _check_shard_size(max_shard_size)
    local_base = Path(base).expanduser()
    check_output_dir(out, overwrite, sources=(local_base,) if local_base.exists() else ())
    source = inspect_base(base, allow_pickle=allow_pickle, revision=revision)
    memory_config = memory_config_from_llama(source.config, preset, **fields)
    base_tokenizer = load_base_tokenizer(source, tokenizer)
    _check_vocab_sizes(source, base_tokenizer)
    torch_dtype = resolve_dtype(dtype, getattr(source.config, "dtype", None) if source.kind != "gguf" else None)
    meta_model = build_on_meta(memory_config)
    new_parameters, new_bytes, total_bytes = _checkpoint_bytes(meta_model, torch_dtype)
    plan = GraftPlan(
        base=source,
        out=out,
        memory_config=memory_config,
        dtype=torch_dtype,
        max_shard_size=max_shard_size,
        tokenizer_size=len(base_tokenizer),
        allow_pickle=allow_pickle,
        overwrite=overwrite,
        counts=parameter_counts(meta_model),
        new_parameters=new_parameters,
        new_bytes=new_bytes,
        total_bytes=total_bytes,
    )
    return plan, base_tokenizer


# ----------------------------------------------------------------------------------------------------
# Run: load, graft, write through a staging directory, verify, rename


@dataclasses.dataclass
class GraftResult:
    out: Path
    max_abs_logit_diff: float
    canonical_ids: int | None  # distinct canonical ids of the Engram map (None without Engram)
    vocab_size: int
    files: list[str]


def load_base_model(base: BaseCheckpoint, dtype: torch.dtype, allow_pickle: bool = False):
    """The base model as transformers loads it (GGUF dequantised)."""
    if base.kind == "gguf":
        # The config read while inspecting saves parsing the GGUF metadata once more.
        model = AutoModelForCausalLM.from_pretrained(base.path.parent, gguf_file=base.path.name, config=base.config, dtype=dtype)
    else:
        model = from_pretrained(AutoModelForCausalLM, base.path, allow_pickle=allow_pickle, dtype=dtype)
    return model.eval()


@torch.no_grad()
def prompt_logits(model, tokenizer, prompts=VERIFICATION_PROMPTS) -> list[torch.Tensor]:
    """Logits (float32, CPU) of each prompt, run one at a time so no padding is involved."""
    device = next(model.parameters()).device
    outputs = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"].to(device)
        outputs.append(model(input_ids=ids).logits[0].float().cpu())
    return outputs


def max_abs_difference(expected: list[torch.Tensor], actual: list[torch.Tensor]) -> float:
    return max(float((e - a).abs().max()) for e, a in zip(expected, actual, strict=True))


def base_license(base: BaseCheckpoint) -> str | None:
    """The license in the base's own model card (directory or Hub snapshot), carried over to OUT's card."""
    readme = base.path / "README.md" if base.kind != "gguf" else None
    if readme is None or not readme.is_file():
        return None
    from huggingface_hub import ModelCard

    try:
        return ModelCard.load(readme).data.license
    except (ValueError, OSError):  # a base card without valid metadata names no license
        return None


def run_graft(plan: GraftPlan, tokenizer, *, tolerance: float = DEFAULT_TOLERANCE, say=_say) -> GraftResult:
    """Load, graft, write OUT through a staging directory, verify against the base, rename."""
    from modeling_memory.tools.model_card import render_model_card

    say(f"loading the base model ({plan.base.name}) ...")
    base_model = load_base_model(plan.base, plan.dtype, plan.allow_pickle)
    expected = prompt_logits(base_model, tokenizer)
    say("grafting memory ...")
    if plan.base.kind == "gguf":  # dequantised in memory: copy its weights
        model = graft(base_model, plan.memory_config, tokenizer=tokenizer, dtype=plan.dtype)
    else:  # straight from the files into the MemoryLlama: no second copy of the weights in memory
        model = graft(plan.base.path, plan.memory_config, tokenizer=tokenizer, dtype=plan.dtype, allow_pickle=plan.allow_pickle)
    del base_model
    canonical_ids = None
    if plan.memory_config.engram_layers:
        canonical_ids = int(model.model.engram_canonical_map.unique().numel())
        vocab = plan.memory_config.vocab_size
        say(f"canonical token ids: {canonical_ids:,} of {vocab:,} ({1 - canonical_ids / vocab:.1%} fewer)")

    with staging_directory(plan.out, plan.overwrite) as staging:
        say(f"writing {plan.out} ...")
        model.save_pretrained(staging, max_shard_size=plan.max_shard_size)
        tokenizer.save_pretrained(staging)
        del model
        say("verifying: reloading the written checkpoint and comparing logits with the base ...")
        reloaded = from_pretrained(AutoModelForCausalLM, staging, dtype=plan.dtype).eval()
        if not isinstance(reloaded, MemoryLlamaForCausalLM):
            raise GraftError(f"The written checkpoint reloads as {type(reloaded).__name__}, not MemoryLlamaForCausalLM.")
        difference = max_abs_difference(expected, prompt_logits(reloaded, tokenizer))
        say(f"max |logit difference| vs the base on {len(VERIFICATION_PROMPTS)} prompts: {difference:.3g}")
        if not difference <= tolerance:  # also catches NaN
            raise GraftError(
                f"Verification failed: the grafted checkpoint's logits differ from the base's by up to {difference:.3g} "
                f"(tolerance {tolerance:g}). Nothing was written to {plan.out}."
            )
        card = render_model_card(
            reloaded,
            model_id=plan.out.name,
            base_name=plan.base.name,
            base_hub_id=plan.base.hub_id,
            remote_code=False,
            verification=f"max |logit difference| {difference:.3g} against the base on {len(VERIFICATION_PROMPTS)} fixed prompts",
            license=base_license(plan.base),
        )
        card.save(staging / "README.md")
        files = sorted(p.name for p in staging.iterdir())
    say(f"wrote {plan.out}: {', '.join(files)}")
    return GraftResult(
        out=plan.out,
        max_abs_logit_diff=difference,
        canonical_ids=canonical_ids,
        vocab_size=plan.memory_config.vocab_size,
        files=files,
    )


def graft_checkpoint(base: str, out, *, dry_run: bool = False, tolerance: float = DEFAULT_TOLERANCE, say=_say, **settings):
    """Graft memory onto BASE and write a verified MemoryLlama checkpoint to OUT (see the module docstring).

    `settings` are those of `plan_graft` (preset, memory_json, overrides, dtype, tokenizer, allow_pickle,
    overwrite, max_shard_size, revision). With `dry_run` the plan is printed and returned, and nothing is
    loaded or written; otherwise the result (a GraftResult) is verified against the base: a largest absolute
    logit difference above `tolerance` fails with nothing written.

    Raises:
        ToolError (GraftError for the graft's own checks): bad input (before any work) or a failed
        verification (nothing written).
    """
    if not tolerance >= 0:
        raise GraftError(f"--tolerance must be >= 0, got {tolerance}.")
    plan, base_tokenizer = plan_graft(base, out, **settings)
    say(("graft plan (dry run: nothing is written)\n" if dry_run else "graft plan\n") + plan.describe())
    if dry_run:
        return plan
    return run_graft(plan, base_tokenizer, tolerance=tolerance, say=say)


__all__ = [
    "DTYPES",
    "BaseCheckpoint",
    "GraftError",
    "GraftPlan",
    "GraftResult",
    "graft_checkpoint",
    "inspect_base",
    "parse_overrides",
    "plan_graft",
    "read_memory_json",
    "run_graft",
]
