"""`MemoryTrainer`: the Hugging Face `Trainer` with what memory models need on top.

- Parameter groups: Engram tables at lr x `engram_lr_multiplier`, chapter banks at
  lr x `chapter_bank_lr_multiplier`, both without weight decay; norms and biases without weight
  decay. The scheduler scales every group by the same factor, so the ratios hold all run long.
- Tables (every kind in `memory_parameters.TABLE_KINDS`) have sparse row gradients and train with an
  optimizer that touches only the rows a step read: `LazyAdam` (default) or `RowWiseAdagrad`
  (`table_optimizer`), beside the `optim` optimizer for everything else, as one `CombinedOptimizer`
  (`create_optimizer`). Trainer's own gradient clipping and logged `grad_norm` count the sparse gradients:
  `table_optimizers` gives torch's norm the sparse layout.
- The router aux loss under gradient accumulation and data parallelism, on Trainer's public loss hooks. The
  language-model loss is Trainer's `compute_loss_func` (`language_model_loss`, unless one is given), so labels
  never reach the model and the model never adds its aux loss to it; Trainer normalises it over the tokens of
  the whole accumulated batch (`num_items_in_batch`) as for any model. While training, `compute_loss` asks the
  model for its router losses (`output_router_logits=True`, as for Mixtral) and adds the per-micro-batch
  `aux_loss` divided by the number of micro-batches in the step; DDP's gradient mean then averages it over
  processes. The sum is scaled for gradient accumulation, which the class says as Trainer documents for
  subclasses that scale their own loss (`loss_is_scaled_for_ga = True`). Evaluation does not ask for the
  router losses: `eval_loss` is the language-model loss alone.
- Memory health in the logs (`memory_health.py`), read from the memory internals the training forward
  records: `chapter_usage_entropy`, `chapters_used_fraction`, `engram_gate_mean` and `aux_loss`.
- Several processes (torchrun, accelerate launch): the memory tables are sharded by row owner
  (`shard_memory_tables`) and kept out of DDP and FSDP2; clipping counts each table once over all its blocks;
  saving is collective (each process streams its blocks) and a checkpoint holds each process's table optimizer
  state, so that a run resumes exactly on the same number of processes (`sharded_tables.py`).
- `save_model` (checkpoints and the final save) writes into a staging folder and moves each file into place;
  with a PEFT model whose memory is trained directly (see `peft_modes.py`) it also writes `memory.safetensors`,
  which `train` loads back when resuming and after loading the best checkpoint at the end.

A plain `Trainer` trains these models too, without the extras, once the tables are switched to dense
gradients (`set_sparse_table_gradients(model, False)`): its AdamW takes dense gradients only, and then every
step updates every table row. It adds the per-micro-batch aux loss without dividing it by the accumulation steps.
"""

import json
import math
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field

import torch
from torch import nn
from accelerate.utils import broadcast_object_list
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer import TRAINING_ARGS_NAME

from modeling_memory.memory_llama.table_placement import MemoryTable
from modeling_memory.training.memory_health import MemoryHealth
from modeling_memory.training.memory_parameters import CHAPTER_BANK, ENGRAM_TABLE, PKM_VALUES, TABLE_KINDS, memory_kinds, memory_parameters
from modeling_memory.training.sharded_tables import (
    check_table_optimizer_state,
    clip_grad_norm_with_shards,
    keep_tables_out_of_ddp,
    load_table_optimizer_state,
    save_table_optimizer_state,
    sharded_tables,
    state_dict_to_save,
)
from modeling_memory.training.table_optimizers import CombinedOptimizer, LazyAdam, RowWiseAdagrad

# Optimizers of the tables: both update only the rows a step read.
TABLE_OPTIMIZERS = {"adam": LazyAdam, "rowwise_adagrad": RowWiseAdagrad}
# The seed papers' recipes: Engram tables at 5x the backbone's learning rate, the chapter bank at 2x,
# product-key values at 10x (Memory Layers at Scale).
ENGRAM_LR_MULTIPLIER = 5.0
CHAPTER_BANK_LR_MULTIPLIER = 2.0
PKM_VALUES_LR_MULTIPLIER = 10.0
# The argument holding each table kind's learning-rate multiplier.
TABLE_LR_MULTIPLIER_ARGUMENTS = {
    ENGRAM_TABLE: "engram_lr_multiplier", CHAPTER_BANK: "chapter_bank_lr_multiplier", PKM_VALUES: "pkm_values_lr_multiplier",
}
DEFAULT_TABLE_LR_MULTIPLIERS = {
    ENGRAM_TABLE: ENGRAM_LR_MULTIPLIER, CHAPTER_BANK: CHAPTER_BANK_LR_MULTIPLIER, PKM_VALUES: PKM_VALUES_LR_MULTIPLIER,
}


@dataclass
class MemoryTrainingArguments(TrainingArguments):
    """`TrainingArguments` plus the memory settings `MemoryTrainer` reads.

    table_optimizer: optimizer of the tables (Engram tables, chapter banks), which touches only the rows a
        step read: "adam" (`LazyAdam`, with `adam_beta1/2` and `adam_epsilon`; state: two floats per table
        weight) or "rowwise_adagrad" (`RowWiseAdagrad`; state: one float per table row).
    engram_lr_multiplier / chapter_bank_lr_multiplier / pkm_values_lr_multiplier: learning rate of the Engram
        tables / chapter banks / product-key values over `learning_rate` (5, 2 and 10, the papers' recipes).
    log_memory_health: add chapter usage, Engram gate and aux loss to the training logs.
    """

    table_optimizer: str = field(
        default="adam",
        metadata={"help": "Optimizer of the tables (touched rows only).", "choices": list(TABLE_OPTIMIZERS)},
    )
    engram_lr_multiplier: float = field(
        default=ENGRAM_LR_MULTIPLIER, metadata={"help": "Engram tables' learning rate / learning_rate."}
    )
    chapter_bank_lr_multiplier: float = field(
        default=CHAPTER_BANK_LR_MULTIPLIER, metadata={"help": "Chapter banks' learning rate / learning_rate."}
    )
    pkm_values_lr_multiplier: float = field(
        default=PKM_VALUES_LR_MULTIPLIER, metadata={"help": "Product-key values' learning rate / learning_rate."}
    )
    log_memory_health: bool = field(
        default=True, metadata={"help": "Log chapter usage entropy, chapters used, Engram gate mean and aux loss."}
    )

    def __post_init__(self):
        if self.table_optimizer not in TABLE_OPTIMIZERS:
            raise ValueError(f"table_optimizer must be one of {tuple(TABLE_OPTIMIZERS)}, got {self.table_optimizer!r}.")
        for name in TABLE_LR_MULTIPLIER_ARGUMENTS.values():
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and value >= 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}.")
        super().__post_init__()


TABLE_GROUP_NAMES = {ENGRAM_TABLE: "engram_tables", CHAPTER_BANK: "chapter_banks", PKM_VALUES: "pkm_values"}


def table_group_name(kind: str) -> str:
    """Name of the optimizer group of one table kind (`TABLE_GROUP_NAMES`)."""
    return TABLE_GROUP_NAMES[kind]


def memory_parameter_groups(
    model: nn.Module,
    learning_rate: float,
    weight_decay: float,
    decay_parameter_names: list[str],
    table_lr_multipliers: dict[str, float] | None = None,
) -> list[dict]:
    """Optimizer parameter groups for a memory model (trainable parameters only, empty groups left out).

    Groups, each with a "name": "decay" (lr, weight_decay), "no_decay" (lr, 0: names outside
    `decay_parameter_names`, i.e. norms and biases), and one per table kind (`TABLE_KINDS`) holding a
    "table_kind" key: "engram_tables" (lr x engram multiplier, 0), "chapter_banks" (lr x bank multiplier, 0).
    `table_lr_multipliers` maps a kind to its multiplier (default: the papers', 1 for other kinds).
    """
    multipliers = {**DEFAULT_TABLE_LR_MULTIPLIERS, **(table_lr_multipliers or {})}
    names = memory_kinds(model)
    table_kind_of = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if names.get(name) in TABLE_KINDS:
            table_kind_of.setdefault(id(param), names[name])
    decay_names = set(decay_parameter_names)
    buckets = {"decay": [], "no_decay": [], **{table_group_name(kind): [] for kind in TABLE_KINDS}}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if id(param) in table_kind_of:
            buckets[table_group_name(table_kind_of[id(param)])].append(param)
        elif name in decay_names:
            buckets["decay"].append(param)
        else:
            buckets["no_decay"].append(param)
    groups = [
        {"name": "decay", "params": buckets["decay"], "lr": learning_rate, "weight_decay": weight_decay},
        {"name": "no_decay", "params": buckets["no_decay"], "lr": learning_rate, "weight_decay": 0.0},
    ]
    for kind in TABLE_KINDS:
        groups.append({
            "name": table_group_name(kind), "table_kind": kind, "params": buckets[table_group_name(kind)],
            "lr": learning_rate * multipliers.get(kind, 1.0), "weight_decay": 0.0,
        })
    return [group for group in groups if group["params"]]


def build_memory_optimizer(
    groups: list[dict], table_optimizer: str, dense_optimizer_cls: type, dense_optimizer_kwargs: dict
) -> torch.optim.Optimizer:
    """One optimizer for `memory_parameter_groups`: the table groups on `TABLE_OPTIMIZERS[table_optimizer]`, the
    rest on `dense_optimizer_cls(**dense_optimizer_kwargs)`, combined (`CombinedOptimizer`) when both exist.
    `LazyAdam` takes the dense optimizer's betas and eps when it has them."""
    if table_optimizer not in TABLE_OPTIMIZERS:
        raise ValueError(f"table_optimizer must be one of {tuple(TABLE_OPTIMIZERS)}, got {table_optimizer!r}.")
    table_groups = [group for group in groups if "table_kind" in group]
    dense_groups = [group for group in groups if "table_kind" not in group]
    optimizers = [dense_optimizer_cls(dense_groups, **dense_optimizer_kwargs)] if dense_groups else []
    if table_groups:
        table_cls = TABLE_OPTIMIZERS[table_optimizer]
        table_kwargs = {}
        if table_cls is LazyAdam:
            table_kwargs = {k: dense_optimizer_kwargs[k] for k in ("betas", "eps") if k in dense_optimizer_kwargs}
        optimizers.append(table_cls(table_groups, lr=table_groups[0]["lr"], **table_kwargs))
    return CombinedOptimizer(optimizers) if table_groups else optimizers[0]


def set_sparse_table_gradients(model: nn.Module, enabled: bool) -> None:
    """Give every memory table of `model` sparse row gradients (the default) or dense ones (`enabled=False`,
    for optimizers and tools that take only dense gradients, such as a plain `Trainer`'s AdamW). Sets `sparse`
    on each table's module, which the layers reading the table follow (and which DDP reads when it wraps the
    model: call this before)."""
    tables = {id(param) for param in memory_parameters(model, TABLE_KINDS)}
    for module in model.modules():
        if isinstance(module, (nn.Embedding, nn.EmbeddingBag, MemoryTable)):
            if any(id(param) in tables for param in module.parameters(recurse=False)):
                module.sparse = enabled


def last_complete_checkpoint(output_dir: str) -> str | None:
    """The newest `checkpoint-N` folder of `output_dir` whose trainer_state.json (Trainer writes it after
    the weights, optimizer and RNG states) parses; None when there is none."""
    if not os.path.isdir(output_dir):
        return None
    steps = []
    for name in os.listdir(output_dir):
        match = re.fullmatch(r"checkpoint-(\d+)", name)
        if match and os.path.isdir(os.path.join(output_dir, name)):
            steps.append(int(match.group(1)))
    for step in sorted(steps, reverse=True):
        folder = os.path.join(output_dir, f"checkpoint-{step}")
        try:
            with open(os.path.join(folder, "trainer_state.json")) as handle:
                json.load(handle)
        except (OSError, ValueError):
            continue
        return folder
    return None


class _TableOptimizerStateOnResume(TrainerCallback):
    """Puts each process's own optimizer state of its table blocks in place when a run resumes, before its first
    step (Trainer has then loaded the optimizer checkpoint the first process wrote, which holds only its blocks)."""

    def __init__(self, tables: dict):
        self.tables, self.folder = tables, None

    def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
        if self.folder is not None:
            load_table_optimizer_state(optimizer, self.tables, self.folder)
            self.folder = None


class MemoryTrainer(Trainer):
    """`Trainer` for MemoryLlama models (plain or wrapped by PEFT); see the module docstring.

    Takes the same arguments as `Trainer`. With `MemoryTrainingArguments` the table optimizer, the
    learning-rate multipliers and health logging can be chosen; with plain `TrainingArguments`
    the defaults apply (the papers' multipliers, tables on the main optimizer, health logged).
    """

    # `compute_loss` returns the loss of the whole accumulated batch's share (see the module docstring): Trainer
    # must use it as is.
    loss_is_scaled_for_ga = True

    def __init__(self, *args, **kwargs):
        if kwargs.get("compute_loss_func") is None:
            kwargs["compute_loss_func"] = self.language_model_loss
        super().__init__(*args, **kwargs)
        self.sharded_tables = self._shard_tables_across_processes()
        if self.sharded_tables:
            self._table_state_on_resume = _TableOptimizerStateOnResume(self.sharded_tables)
            self.add_callback(self._table_state_on_resume)
        self.memory_health = MemoryHealth(self.accelerator.unwrap_model(self.model).config)

    def _shard_tables_across_processes(self) -> dict:
        """In a run of several processes, the memory tables sharded by row owner (`shard_memory_tables`, unless the
        model was loaded so) and kept out of the data-parallel wrappers: DDP ignores them, FSDP2 gets them as ignored
        modules. Returns the sharded tables by name (none in one process)."""
        if self.accelerator.num_processes == 1:
            return {}
        model = self.accelerator.unwrap_model(self.model)
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        if not hasattr(base, "shard_memory_tables") or not base.memory_tables():
            return {}
        if not base.memory_tables_sharded:
            base.shard_memory_tables()
        tables = sharded_tables(base)
        keep_tables_out_of_ddp(self.model, tables)
        if self.is_fsdp_enabled:
            self.accelerator.state.fsdp_plugin.ignored_modules = list(tables.values())
        return tables

    # ---- gradient clipping with sharded tables -----------------------------------------------

    def _clip_grad_norm(self, model):
        """Trainer's clipping, with each sharded table's gradient counted once over all its blocks, so that every
        process clips by the factor one process on the whole batch would (Trainer's own counts only the local
        block, which differs between processes)."""
        if not self.sharded_tables:
            return super()._clip_grad_norm(model)
        self.accelerator.unscale_gradients()
        return clip_grad_norm_with_shards(model.parameters(), self.args.max_grad_norm, self.sharded_tables)

    def _get_grad_norm(self, model, grad_norm=None):
        if grad_norm is None and self.sharded_tables:
            grad_norm = clip_grad_norm_with_shards(model.parameters(), float("inf"), self.sharded_tables)
        return super()._get_grad_norm(model, grad_norm)

    def _setting(self, name: str, default):
        value = getattr(self.args, name, None)
        return default if value is None else value

    def _check_memory_model(self) -> None:
        model = self.accelerator.unwrap_model(self.model)
        if getattr(getattr(model, "config", None), "model_type", None) != "memory_llama":
            raise ValueError(
                "MemoryTrainer needs a MemoryLlama model (or a PEFT model around one); "
                f"got {type(model).__name__}. Use transformers.Trainer for other models."
            )

    # ---- optimizer ---------------------------------------------------------------------------

    def create_optimizer(self, model=None) -> torch.optim.Optimizer:
        """Parameter groups for tables, banks, decay and no-decay parameters (see `memory_parameter_groups`); the
        tables on the table optimizer, the rest on `optim` (see `build_memory_optimizer`)."""
        if self.optimizer is not None:
            return self.optimizer
        opt_model = self.model if model is None else model
        self._check_memory_model()
        multipliers = {
            kind: self._setting(argument, DEFAULT_TABLE_LR_MULTIPLIERS[kind])
            for kind, argument in TABLE_LR_MULTIPLIER_ARGUMENTS.items()
        }
        groups = memory_parameter_groups(
            opt_model,
            learning_rate=self.args.learning_rate,
            weight_decay=self.args.weight_decay,
            decay_parameter_names=self.get_decay_parameter_names(opt_model),
            table_lr_multipliers=multipliers,
        )
        if not groups:
            raise ValueError("The model has no trainable parameters: check the training mode (requires_grad flags).")
        if self.optimizer_cls_and_kwargs is not None:
            optimizer_cls, optimizer_kwargs = self.optimizer_cls_and_kwargs
        else:
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        optimizer_kwargs = dict(optimizer_kwargs)
        special = sorted({"params", "model", "optimizer_dict"} & set(optimizer_kwargs))
        if special or not (isinstance(optimizer_cls, type) and issubclass(optimizer_cls, torch.optim.Optimizer)):
            raise ValueError(
                f"optim={self.args.optim!r} builds its own parameter groups ({special or optimizer_cls}), which would "
                "drop the memory groups (table and bank learning rates, no weight decay). Use an optimizer such as "
                "adamw_torch, adafactor or sgd with MemoryTrainer, or transformers.Trainer without the memory groups."
            )
        table_optimizer = self._setting("table_optimizer", "adam")
        self.optimizer = build_memory_optimizer(groups, table_optimizer, optimizer_cls, optimizer_kwargs)
        return self.optimizer

    # ---- loss --------------------------------------------------------------------------------

    def language_model_loss(self, outputs, labels: torch.Tensor, num_items_in_batch=None) -> torch.Tensor:
        """The default `compute_loss_func`: the model's own causal-LM loss (label smoothing when asked), without the
        router losses. Summed over tokens and divided by `num_items_in_batch`, the label tokens of the whole
        accumulated batch, when Trainer gives it (always in training); a mean over the batch's tokens otherwise.

        Args:
            outputs: the model's output (logits (B, S, V)); labels: (B, S) with -100 where no loss is taken.
        """
        if labels is None:
            raise ValueError("MemoryTrainer trains a causal language model: the batches need `labels`.")
        if self.label_smoother is not None:
            return self.label_smoother(outputs, labels, shift_labels=True, num_items_in_batch=num_items_in_batch)
        model = self.accelerator.unwrap_model(self.model)
        return model.loss_function(
            logits=outputs["logits"], labels=labels, vocab_size=model.config.vocab_size, num_items_in_batch=num_items_in_batch
        )

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Trainer's loss (the language-model loss, `compute_loss_func`) plus, while training, the router aux loss
        as a mean over the micro-batches of the step (DDP averages it over processes); see the module docstring."""
        log_health = model.training and self._setting("log_memory_health", True)
        if model.training:
            inputs = {**inputs, "output_router_logits": True}  # the router losses are computed only when asked
        if log_health:
            inputs = {**inputs, **MemoryHealth.OUTPUT_FLAGS}  # the memory internals the health logs read
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        if log_health:
            self.memory_health.record(outputs, inputs.get("attention_mask"))
        aux_loss = outputs.get("aux_loss") if isinstance(outputs, dict) else None
        if model.training and aux_loss is not None:
            loss = loss + aux_loss.to(loss.device) / self.current_gradient_accumulation_steps
        return (loss, outputs) if return_outputs else loss

    # ---- logging -----------------------------------------------------------------------------

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        # Training logs carry "loss"; all processes reach this point together, as the reduce needs.
        if "loss" in logs and self._setting("log_memory_health", True):
            logs.update(self.memory_health.flush(self.accelerator))
        super().log(logs, start_time)

    # ---- saving and resuming (PEFT models with directly trained memory) -----------------------

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Trainer's `save_model` (which checkpoints use too), written into a staging folder inside `output_dir` and
        then moved into place file by file: a process killed mid-save never leaves a half-written weight file where
        a loader would read it. A PEFT model that trains memory outside its adapter also gets `memory.safetensors`.
        Pushed to the Hub afterwards, as Trainer does for a call that is not its own (`push_to_hub`)."""
        from modeling_memory.training.peft_modes import has_trainable_memory_outside_adapter, save_memory_weights

        output_dir = output_dir if output_dir is not None else self.args.output_dir
        os.makedirs(output_dir, exist_ok=True)
        staging = tempfile.mkdtemp(prefix=".saving-", dir=output_dir) if self.args.should_save else None
        if self.sharded_tables:  # every process writes its table blocks into the first process's staging folder
            staging = broadcast_object_list([staging])[0]
        try:
            model = self.accelerator.unwrap_model(self.model)
            if self.sharded_tables:
                self._save_sharded(model, staging, checkpoint=_internal_call)
            else:
                super().save_model(staging, _internal_call=True)  # Trainer would push before the files are in place
            if (self.args.should_save or self.sharded_tables) and has_trainable_memory_outside_adapter(model):
                save_memory_weights(model, staging, is_main_process=self.args.should_save)
            if self.sharded_tables:
                self.accelerator.wait_for_everyone()
            if self.args.should_save:
                for name in sorted(os.listdir(staging)):
                    os.replace(os.path.join(staging, name), os.path.join(output_dir, name))
        finally:
            if self.args.should_save:
                shutil.rmtree(staging, ignore_errors=True)
        if self.args.push_to_hub and not _internal_call:
            self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)

    def _save_sharded(self, model, folder: str, checkpoint: bool) -> None:
        """What Trainer's save writes, by every process: the model (each process streams its blocks of the tables,
        `save_pretrained`), the tokenizer and training arguments (first process), and in a checkpoint each
        process's optimizer state of its table blocks."""
        state_dict = None
        if self.is_fsdp_enabled:  # FSDP2's DTensors gathered whole; the tables are streamed by their owners
            state_dict = state_dict_to_save(model, self.sharded_tables)
        model.save_pretrained(folder, is_main_process=self.args.should_save, state_dict=state_dict)
        if self.args.should_save:
            if self.processing_class is not None:
                self.processing_class.save_pretrained(folder)
            torch.save(self.args, os.path.join(folder, TRAINING_ARGS_NAME))
        if checkpoint and self.optimizer is not None:
            save_table_optimizer_state(self.optimizer, self.sharded_tables, folder)

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs):
        """Trainer's `train`, and for a PEFT model that trains memory outside its adapter, that memory loaded from
        the checkpoint it resumes from and, with `load_best_model_at_end`, from the best checkpoint at the end.
        `resume_from_checkpoint=True` resumes from the newest *complete* checkpoint in `output_dir` (one whose
        trainer_state.json, written last, reads back), skipping any a killed run left half-written."""
        if resume_from_checkpoint is True:
            resume_from_checkpoint = last_complete_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(f"No complete checkpoint to resume from in {self.args.output_dir}.")
        if resume_from_checkpoint:
            self._load_memory_weights(resume_from_checkpoint)
            check_table_optimizer_state(resume_from_checkpoint, self.accelerator.num_processes if self.sharded_tables else 1)
            if self.sharded_tables:
                self._table_state_on_resume.folder = resume_from_checkpoint
        result = super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)
        if self.args.load_best_model_at_end and self.state.best_model_checkpoint is not None:
            self._load_memory_weights(self.state.best_model_checkpoint)
        return result

    def _load_memory_weights(self, checkpoint_dir: str) -> None:
        from modeling_memory.training.peft_modes import MEMORY_WEIGHTS_NAME, has_trainable_memory_outside_adapter, load_memory_weights

        model = self.accelerator.unwrap_model(self.model)
        if has_trainable_memory_outside_adapter(model):
            if not os.path.isfile(os.path.join(checkpoint_dir, MEMORY_WEIGHTS_NAME)):
                raise FileNotFoundError(
                    f"{checkpoint_dir} has no {MEMORY_WEIGHTS_NAME}, but this PEFT model trains memory outside the "
                    "adapter: the checkpoint was written by a plain Trainer or another training mode."
                )
            load_memory_weights(model, checkpoint_dir)


__all__ = [
    "last_complete_checkpoint",
    "MemoryTrainer",
    "MemoryTrainingArguments",
    "TABLE_OPTIMIZERS",
    "build_memory_optimizer",
    "memory_parameter_groups",
    "set_sparse_table_gradients",
]
