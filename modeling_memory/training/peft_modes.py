"""Training modes and PEFT adapters for MemoryLlama.

| mode          | backbone            | memory projections  | Engram tables, chapter banks, memory norms, conv |
| ------------- | ------------------- | ------------------- | ------------------------------------------------ |
| `full`        | trained             | trained             | trained                                          |
| `memory_only` | frozen              | trained             | trained                                          |
| `lora`        | LoRA                | trained             | trained                                          |
| `lora_all`    | LoRA                | LoRA                | trained                                          |

Why memory is never put in PEFT's `modules_to_save`, nor LoRA on a table: `modules_to_save` keeps
a deep copy of each module (a second copy of a multi-GB table) and LoRA on an `nn.Embedding` adds a
dense (rank x rows) matrix. Instead, in the LoRA modes the memory parameters are marked trainable
on the base model after `get_peft_model` and saved next to the adapter as `memory.safetensors`
(`save_adapter_with_memory` / `load_adapter_with_memory`).

memory_llama has no PEFT default target modules. `recommended_lora_config(model, mode)` lists the
modules to wrap by their full names, chosen by module type (`memory_parameters.memory_kinds`: what
belongs to a memory module is memory), so a Llama projection name can never hit a memory module (or
the reverse), and `prepare_model_for_mode` checks any user-given config with PEFT's own matcher
before wrapping: a target that would land on a table, on memory in `lora` mode, or on nothing at all
is an error, not a silent mis-target.
"""

import json
import os

import safetensors.torch
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import check_target_module_exists
from torch import nn

from modeling_memory.choices import TRAINING_MODES
from modeling_memory.memory_llama.table_sharding import write_sharded_table
from modeling_memory.training.memory_parameters import TABLE_KINDS, memory_kinds
from modeling_memory.training.sharded_tables import sharded_tables
from modeling_memory.tools.safe_write import atomic_file

BACKBONE_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MEMORY_WEIGHTS_NAME = "memory.safetensors"


def _check_mode(mode: str) -> None:
    if mode not in TRAINING_MODES:
        raise ValueError(f"Unknown training mode {mode!r}; choose one of {', '.join(TRAINING_MODES)}.")


def _memory_names(model: nn.Module) -> set[str]:
    """Names of the model's memory parameters and buffers (as `named_parameters` spells them)."""
    return set(memory_kinds(model))


def _is_memory_module(name: str, memory_names: set[str]) -> bool:
    """Whether the module called `name` is memory or lies inside a memory module."""
    return any(tensor.startswith(f"{name}.") for tensor in memory_names)


def _memory_projections(model: nn.Module) -> list[str]:
    """Full names of the memory's linear projections (router, chapter and Engram projections, the
    product-key query, gate and output): what `lora_all` adds to the backbone's targets."""
    kinds = memory_kinds(model)
    return [
        name for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and kinds.get(f"{name}.weight") not in (None, *TABLE_KINDS)
    ]


def _backbone_projections(model: nn.Module) -> list[str]:
    """Full names of the backbone's attention and MLP projections (none inside memory)."""
    memory = _memory_names(model)
    return [
        name for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in BACKBONE_LORA_TARGETS
        and f"{name}.weight" not in memory
    ]


def recommended_lora_config(model: nn.Module, mode: str, r: int = 16, lora_alpha: int = 32, lora_dropout: float = 0.0) -> LoraConfig | None:
    """The LoraConfig for a training mode of `model` (None for `full` and `memory_only`, which use no adapter).

    `lora`: LoRA on the backbone's attention and MLP projections.
    `lora_all`: the same plus the memory's projections. Tables, banks, norms and the conv are trained
    directly in both. Targets are listed by their full module names, chosen by module type.
    """
    _check_mode(mode)
    if mode in ("full", "memory_only", "sparse_memory"):
        return None
    targets = _backbone_projections(model) + (_memory_projections(model) if mode == "lora_all" else [])
    return LoraConfig(task_type="CAUSAL_LM", r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, target_modules=targets)


def _lora_targets(model: nn.Module, config: LoraConfig) -> list[str]:
    """Names of the modules PEFT would wrap, found with PEFT's own matcher."""
    return [name for name, _ in model.named_modules() if name and check_target_module_exists(config, name)]


def _matching(names, entry: str) -> list[str]:
    """The names PEFT's `modules_to_save` / `target_parameters` entry `entry` matches (equal, or ending in `.entry`)."""
    return [name for name in names if name == entry or name.endswith(f".{entry}")]


def check_lora_config(model: nn.Module, mode: str, config: LoraConfig) -> list[str]:
    """Validate a LoraConfig for `mode` on `model` before anything is wrapped; returns the target names.

    Raises ValueError when the config targets nothing, a memory table (a dense rank x rows delta),
    memory modules in `lora` mode (there memory is trained directly), no memory projection in
    `lora_all` mode, or names memory modules in `modules_to_save` (a deep copy of each)."""
    if not isinstance(config, LoraConfig):
        raise ValueError(f"Training modes take a peft.LoraConfig, got {type(config).__name__}.")
    if config.target_modules is None:
        raise ValueError(
            "The LoRA config has no target_modules, and memory_llama has no PEFT defaults: name them, or use "
            "recommended_lora_config(model, mode)."
        )
    kinds = memory_kinds(model)
    memory = set(kinds)
    module_names = [name for name, _ in model.named_modules() if name]
    saved = [m for m in config.modules_to_save or [] if any(_is_memory_module(n, memory) for n in _matching(module_names, m))]
    if saved:
        raise ValueError(
            f"modules_to_save={saved} would deep-copy memory modules (a second copy of each table or bank). "
            "Leave memory out of modules_to_save: the training modes train it directly and save it as "
            f"{MEMORY_WEIGHTS_NAME} next to the adapter."
        )
    parameter_names = [name for name, _ in model.named_parameters()]
    memory_params = [p for p in config.target_parameters or [] if set(_matching(parameter_names, p)) & memory]
    if memory_params:
        raise ValueError(
            f"target_parameters={memory_params} put LoRA on memory parameters; the training modes train "
            "tables and banks directly. Remove them from target_parameters."
        )
    targets = _lora_targets(model, config)
    if not targets:
        raise ValueError(
            f"The LoRA config's target_modules={config.target_modules!r} match no module of this model. "
            "Use recommended_lora_config(model, mode) or name modules such as q_proj, v_proj."
        )
    tables = [name for name in targets if kinds.get(f"{name}.weight") in TABLE_KINDS]
    if tables:
        raise ValueError(
            f"target_modules hits memory tables {tables[:3]}: LoRA on a table adds a dense (rank x rows) matrix as "
            "large as the table itself. Remove the table from target_modules; the training modes train tables "
            "directly."
        )
    memory_targets = [name for name in targets if _is_memory_module(name, memory)]
    if mode == "lora" and memory_targets:
        raise ValueError(
            f"In mode 'lora' the memory is trained directly, but target_modules={config.target_modules!r} also hits "
            f"memory modules {memory_targets[:4]}{' ...' if len(memory_targets) > 4 else ''}. Use mode 'lora_all' for "
            "LoRA on the memory projections, or narrow target_modules (e.g. recommended_lora_config(model, 'lora'))."
        )
    if mode == "lora_all" and not memory_targets:
        leaves = sorted({name.rsplit(".", 1)[-1] for name in _memory_projections(model)})
        raise ValueError(
            f"Mode 'lora_all' puts LoRA on the memory projections, but target_modules={config.target_modules!r} hits "
            f"none of them. Add {', '.join(leaves)} or use mode 'lora'."
        )
    return targets


def _adapter_parameter_names(model: nn.Module) -> set[str]:
    return {name for name, _ in model.named_parameters() if "lora_" in name}


def prepare_model_for_mode(
    model, mode: str, lora_config: LoraConfig | None = None, sparse_memory_slots: dict | None = None
):
    """Set up `model` (a MemoryLlamaForCausalLM) for a training mode; returns the model to train.

    `full` and `memory_only` return the model itself with requires_grad set; the LoRA modes return
    a PeftModel (with `lora_config`, or `recommended_lora_config(model, mode)`) whose memory parameters
    outside the adapter are trainable on the base model. `sparse_memory` trains only the table rows in
    `sparse_memory_slots` (table parameter name -> row ids, from `sparse_memory_finetuning.rank_slots`)
    and freezes everything else.
    """
    _check_mode(mode)
    if (mode == "sparse_memory") != (sparse_memory_slots is not None):
        raise ValueError(
            "Mode 'sparse_memory' trains the slots chosen by TF-IDF and needs them as `sparse_memory_slots` "
            "(from modeling_memory.training.sparse_memory_finetuning.rank_slots, or select_and_prepare); other modes take none."
        )
    if getattr(getattr(model, "config", None), "model_type", None) != "memory_llama":
        raise ValueError(
            f"Training modes need a MemoryLlama model, got {type(model).__name__}; graft memory first "
            "(modeling_memory.from_llama)."
        )
    memory = _memory_names(model)
    if mode != "full" and not any(name in memory for name, _ in model.named_parameters()):
        raise ValueError(
            f"Mode {mode!r} trains the memory, but this model has none (chapter_layers, engram_layers, pkm_layers and "
            "mosaic_layers are empty). Use mode 'full' or graft memory first."
        )
    if mode == "full":
        for param in model.parameters():
            param.requires_grad_(True)
        return model
    if mode == "memory_only":
        for name, param in model.named_parameters():
            param.requires_grad_(name in memory)
        return model
    if mode == "sparse_memory":
        from modeling_memory.training.sparse_memory_finetuning import prepare_sparse_memory_finetuning

        return prepare_sparse_memory_finetuning(model, sparse_memory_slots)

    config = lora_config if lora_config is not None else recommended_lora_config(model, mode)
    targets = check_lora_config(model, mode, config)
    peft_model = get_peft_model(model, config)
    wrapped = sorted(name for name, module in model.named_modules() if isinstance(module, LoraLayer))
    if wrapped != sorted(targets):
        raise RuntimeError(f"PEFT wrapped {wrapped[:5]} but {sorted(targets)[:5]} were expected.")
    _mark_memory_trainable(peft_model)
    return peft_model


def _memory_outside_adapter(base: nn.Module):
    """(name, parameter) of the memory parameters that are not LoRA weights nor LoRA-wrapped base weights."""
    memory, adapter = _memory_names(base), _adapter_parameter_names(base)
    for name, param in base.named_parameters():
        if name in memory and name not in adapter and ".base_layer." not in name:
            yield name, param


def _mark_memory_trainable(peft_model: PeftModel) -> None:
    """Memory parameters outside the adapter train directly; LoRA-wrapped base weights stay frozen."""
    for _, param in _memory_outside_adapter(peft_model.get_base_model()):
        param.requires_grad_(True)


def memory_state_dict(model) -> dict[str, torch.Tensor]:
    """The memory parameters a PEFT model trains outside its adapter, keyed as in the base model's state dict."""
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    return {name: param.detach() for name, param in _memory_outside_adapter(base) if param.requires_grad}


def has_trainable_memory_outside_adapter(model) -> bool:
    """True for a PeftModel prepared by `prepare_model_for_mode` in a LoRA mode."""
    return isinstance(model, PeftModel) and bool(memory_state_dict(model))


def save_memory_weights(model, directory: str, is_main_process: bool = True) -> str:
    """Write the memory trained outside the adapter to `directory/memory.safetensors` (atomically). A table sharded
    across processes goes to a file of its own (`memory-<key>.safetensors`, named in memory.safetensors' metadata),
    each process streaming its block: then every process calls this, `is_main_process` true on one."""
    state = memory_state_dict(model)
    if not state:
        raise ValueError("This model trains no memory outside an adapter; there is nothing to save.")
    tables = {key: module for key, module in sharded_tables(model).items() if key in state}
    table_files = {}
    for key, module in tables.items():
        table_files[key] = f"memory-{key.removesuffix('.weight')}.safetensors"
        write_sharded_table(os.path.join(directory, table_files[key]), key, module, metadata={"format": "pt"})
    path = os.path.join(directory, MEMORY_WEIGHTS_NAME)
    if is_main_process:
        tensors = {name: tensor.contiguous().cpu().clone() for name, tensor in state.items() if name not in tables}
        metadata = {"format": "pt", "names": json.dumps(sorted(state)), "tables": json.dumps(table_files)}
        with atomic_file(path) as staging:
            safetensors.torch.save_file(tensors, staging, metadata=metadata)
    return path


def load_memory_weights(model, directory: str) -> list[str]:
    """Copy `directory/memory.safetensors` into the (base) model's parameters; returns the names loaded.

    Every saved tensor must name an existing parameter of the same shape; nothing is copied otherwise."""
    path = os.path.join(directory, MEMORY_WEIGHTS_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist: save it with save_adapter_with_memory / MemoryTrainer.")
    tensors = safetensors.torch.load_file(path)
    with safetensors.safe_open(path, "pt") as file:
        table_files = json.loads((file.metadata() or {}).get("tables", "{}"))
    sharded = sharded_tables(model)
    for key, name in table_files.items():  # whole tables, or this process's rows of each
        with safetensors.safe_open(os.path.join(directory, name), "pt") as file:
            rows = file.get_slice(key)
            sharding = sharded[key].row_sharding if key in sharded else None
            tensors[key] = rows[sharding.start : sharding.stop] if sharding else rows[:]
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    params = dict(base.named_parameters())
    unknown = sorted(name for name in tensors if name not in params)
    mismatched = sorted(
        f"{name} {tuple(tensors[name].shape)} vs {tuple(params[name].shape)}"
        for name in tensors if name in params and tensors[name].shape != params[name].shape
    )
    if unknown or mismatched:
        raise ValueError(
            f"{path} does not fit this model: unknown parameters {unknown[:5]}, shape mismatches {mismatched[:5]}. "
            "Load it into the same architecture it was trained on."
        )
    with torch.no_grad():
        for name, tensor in tensors.items():
            params[name].copy_(tensor.to(params[name].device, params[name].dtype))
    return sorted(tensors)


def save_adapter_with_memory(peft_model: PeftModel, directory: str) -> None:
    """`peft_model.save_pretrained(directory)` plus the directly trained memory (`memory.safetensors`)."""
    if not isinstance(peft_model, PeftModel):
        raise ValueError(f"Expected a PeftModel, got {type(peft_model).__name__}; use save_pretrained for full models.")
    peft_model.save_pretrained(directory)
    if has_trainable_memory_outside_adapter(peft_model):
        save_memory_weights(peft_model, directory)


def load_adapter_with_memory(base_model, directory: str, is_trainable: bool = False) -> PeftModel:
    """`PeftModel.from_pretrained(base_model, directory)` plus the memory saved beside the adapter.

    With `is_trainable=True` the loaded memory parameters are trainable again, as when saved."""
    if not os.path.isfile(os.path.join(directory, "adapter_config.json")):
        raise FileNotFoundError(f"{directory} holds no adapter_config.json: it is not a PEFT adapter folder.")
    peft_model = PeftModel.from_pretrained(base_model, directory, is_trainable=is_trainable)
    if os.path.isfile(os.path.join(directory, MEMORY_WEIGHTS_NAME)):
        names = load_memory_weights(peft_model, directory)
        if is_trainable:
            params = dict(peft_model.get_base_model().named_parameters())
            for name in names:
                params[name].requires_grad_(True)
    return peft_model


def trainable_parameter_counts(model) -> dict[str, int]:
    """Trainable parameters split into adapter, memory (outside the adapter) and backbone, plus the total. Of a
    table in sparse memory fine-tuning only the chosen rows count: no other row can change."""
    counts = {"adapter": 0, "memory": 0, "backbone": 0}
    memory = _memory_names(model)
    chosen_rows = getattr(model, "sparse_memory_slots", {})  # set by prepare_sparse_memory_finetuning
    seen = set()
    for name, param in model.named_parameters():
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))
        key = "adapter" if "lora_" in name else "memory" if name in memory else "backbone"
        counts[key] += chosen_rows[name].numel() * param[0].numel() if name in chosen_rows else param.numel()
    counts["total"] = sum(counts.values())
    return counts


__all__ = [
    "MEMORY_WEIGHTS_NAME",
    "TRAINING_MODES",
    "check_lora_config",
    "has_trainable_memory_outside_adapter",
    "load_adapter_with_memory",
    "load_memory_weights",
    "memory_state_dict",
    "prepare_model_for_mode",
    "recommended_lora_config",
    "save_adapter_with_memory",
    "save_memory_weights",
    "trainable_parameter_counts",
]
