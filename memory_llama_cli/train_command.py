"""`memory-llama train` and `memory-llama eval`: fine-tuning and evaluation from the command line.

train: a MemoryLlama checkpoint (or a Llama one with `--graft`), text data (`--data`) or the
built-in knowledge set (`--knowledge-entities`), a training mode (`--mode`) and every
`TrainingArguments` / `MemoryTrainingArguments` field passed through (`--learning_rate 1e-4`,
`--max_steps 100`, `--resume_from_checkpoint DIR` or `last` — the newest complete checkpoint —, ...). Runs `MemoryTrainer`, saves the model (or
adapter + memory), `trainer_state.json`, `loss_curve.png` and `chapter_usage.png` in `--output_dir`.
Under `accelerate launch` it trains on every process (see `accelerate_config_path`).
`--output_dir` must be new or empty, so that two runs never mix: resuming a checkpoint of its own
continues the run it holds, and `--overwrite` replaces it.

The `train` subparser of `memory-llama` holds only the options of `train` itself
(`memory_llama_cli.parser.add_train_arguments`: no transformers import, so help and errors are fast);
`parse_train_command_line` parses the whole line again with every TrainingArguments field.

MODEL (train) and CHECKPOINT (eval) may be an adapter folder of an earlier LoRA-mode run: eval loads it with
its base; train merges it into its base first (a LoRA mode needs a checkpoint folder as base: merge first).

eval: perplexity on text (`--data`) and exact-match recall on knowledge probes
(`--knowledge-entities`), computed by `evaluation.py` with the project's local `evaluate` metric
modules; prints a table and writes JSON (`--output-json`).

Bad input raises ToolError before any work.
"""

import argparse
import dataclasses
import json
import os

from memory_llama_cli.parser import build_train_parser, refuse_unknown_options

from modeling_memory.choices import GRAFT_PRESETS
from modeling_memory.tools.errors import ToolError
from modeling_memory.tools.loading import adapter_base
from modeling_memory.tools.safe_write import atomic_file, check_writable, remove_directory

ACCELERATE_CONFIGS = ("ddp_cpu", "ddp_gpu", "fsdp_gpu")


def accelerate_config_path(name: str) -> str:
    """Path of a packaged accelerate config: ddp_cpu, ddp_gpu or fsdp_gpu."""
    if name not in ACCELERATE_CONFIGS:
        raise ValueError(f"Unknown accelerate config {name!r}; the package ships {', '.join(ACCELERATE_CONFIGS)}.")
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "accelerate_configs", f"{name}.yaml")


# ---- the whole `train` command line: its own options and every TrainingArguments field ---------------


def parse_train_command_line(arguments: list[str]) -> argparse.Namespace:
    """The arguments after `memory-llama train`, parsed (errors exit as argparse's do; an unknown option with one
    line naming the closest valid one)."""
    parser = build_train_parser()
    refuse_unknown_options(parser, arguments)
    args = parser.parse_args(arguments)
    if args.mode == "sparse_memory":
        apply_sparse_memory_defaults(args, arguments)
    return args


def apply_sparse_memory_defaults(args, arguments: list[str]) -> None:
    """--mode sparse_memory: every setting of `RECOMMENDED_TRAINING_ARGUMENTS` the command line does not give
    replaces the generic default (Trainer's learning rate of 5e-5 and 3 epochs teach the zero-initialised value
    rows nothing)."""
    from memory_llama_cli.parser import given_options
    from modeling_memory.training.sparse_memory_finetuning import RECOMMENDED_TRAINING_ARGUMENTS

    given = given_options(arguments)
    for name, value in RECOMMENDED_TRAINING_ARGUMENTS.items():
        if name not in given:
            setattr(args, name, value)


def _training_arguments(args):
    from modeling_memory.training.trainer import MemoryTrainingArguments

    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(MemoryTrainingArguments) if f.init}
    return MemoryTrainingArguments(**values)


# ---- shared checks and loading ------------------------------------------------------------------


def placement_arguments(args, config, num_processes: int = 1) -> dict:
    """`from_pretrained`'s memory_placement / memory_offload_dir from --memory-placement / --memory-offload-dir
    (nothing when the tables stay on the device), checked against the tables that `config` describes before any
    weights load: an offload folder that is not writable or lacks room for them, or RAM too small for host tables,
    is refused here. Each of several processes places only its block of each table (sharded by row owner), and
    the blocks' working copies are named for their rows, so the processes may share the folder."""
    if args.memory_placement in (None, "device"):
        return {}
    from modeling_memory.memory_llama.table_placement import check_placement
    from modeling_memory.memory_llama.table_sharding import meta_blocks
    from modeling_memory.tools.summary import build_on_meta

    tables = build_on_meta(config).memory_tables()
    try:
        if num_processes > 1:
            tables = meta_blocks(tables, num_processes)
        check_placement(args.memory_placement, args.memory_offload_dir, tables)
    except ValueError as error:
        raise ToolError(f"--memory-placement {args.memory_placement}: {error}") from error
    return {"memory_placement": args.memory_placement, "memory_offload_dir": args.memory_offload_dir}


def _inside(path: str, folder: str) -> bool:
    """Whether `path` is `folder` or lies inside it (symbolic links resolved)."""
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return os.path.commonpath([path, folder]) == folder


def _check_output_dir_is_free(args, output_dir: str) -> bool:
    """Refuse, before any work, to train into a folder holding files of another run: its checkpoints,
    plots and model would mix with the new run's. Resuming one of its own checkpoints continues that
    run; --overwrite replaces it. Returns whether there is a previous run to replace (`_remove_previous_run`)."""
    if not os.path.isdir(output_dir) or not os.listdir(output_dir):
        return False
    resume = args.resume_from_checkpoint
    resuming_here = resume == "last" or (resume is not None and _inside(resume, output_dir))
    if args.overwrite:
        if resuming_here:
            raise ToolError(
                f"--overwrite would delete the checkpoint that --resume_from_checkpoint {resume} continues from "
                f"(it is in --output_dir {output_dir}): drop one of the two."
            )
        _check_replaceable(args, output_dir)
        return True
    if not resuming_here:
        held = sorted(os.listdir(output_dir))
        shown = ", ".join(held[:4]) + (", ..." if len(held) > 4 else "")
        raise ToolError(
            f"--output_dir {output_dir} is not empty (it holds {shown}), and training into it would mix two runs' "
            "checkpoints and plots. Choose a new --output_dir, add --overwrite to replace the previous run, or "
            "continue it with --resume_from_checkpoint last."
        )
    return False


def _check_replaceable(args, output_dir: str) -> None:
    """--overwrite deletes `output_dir`: refuse when that would delete more than a previous run."""
    if os.path.islink(output_dir):
        raise ToolError(f"--output_dir {output_dir} is a symbolic link; --overwrite replaces only a real folder: "
                         "pass the folder it points to, or a new one.")
    folder = os.path.realpath(output_dir)
    for name, place in (("the current folder", os.getcwd()), ("your home folder", os.path.expanduser("~"))):
        if _inside(place, folder):
            raise ToolError(f"--overwrite would delete --output_dir {output_dir}, which holds {name}: "
                             "give the run a folder of its own.")
    inputs = (("MODEL", args.model), ("--data", args.data), ("--resume_from_checkpoint", args.resume_from_checkpoint))
    for option, path in inputs:
        if path is not None and os.path.exists(path) and _inside(path, folder):
            raise ToolError(f"--overwrite would delete {option} {path}, which lies inside --output_dir {output_dir}: "
                             "choose another --output_dir.")
    parent = os.path.dirname(folder)
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ToolError(f"--overwrite cannot replace --output_dir {output_dir}: its parent {parent} is not writable.")


def _remove_previous_run(output_dir: str) -> None:
    """Delete the previous run: nobody ever finds `output_dir` half deleted (`safe_write.remove_directory`)."""
    left = remove_directory(output_dir)
    if left is not None:
        print(f"--overwrite: the previous run was moved to {left}, which could not be deleted completely")
    else:
        print(f"--overwrite: deleted the previous run in {output_dir}")


def _check_knowledge_arguments(args) -> None:
    if args.knowledge_entities is not None and not 1 <= args.knowledge_entities <= 100_000:
        raise ToolError(f"--knowledge-entities must be between 1 and 100000, got {args.knowledge_entities}.")


def _check_data_source(source: str) -> None:
    from modeling_memory.data.packing import BUILDERS

    if os.path.exists(source):
        return
    if source.startswith((".", "/", "~")) or os.path.splitext(source)[1].lower() in BUILDERS:
        raise ToolError(f"--data {source}: no such file or folder.")


def _load_config(path: str):
    """The config of the checkpoint folder `path`, or of the base an adapter folder names."""
    from transformers import AutoConfig  # memory_llama is registered: importing modeling_memory (above) did it

    if os.path.isfile(path) and path.lower().endswith(".gguf"):
        raise ToolError(
            f"{path} is a GGUF file: graft memory onto it first (`memory-llama graft {path} OUT`), then pass OUT."
        )
    if not os.path.isdir(path):
        raise ToolError(f"{path} is not a checkpoint folder (expected config.json and weights inside).")
    path = adapter_base(path) or path
    try:
        return AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as error:
        raise ToolError(f"Cannot read the model config in {path}: {error}")


def _load_tokenizer(path: str, fallback: str | None = None):
    """The tokenizer saved in `path`, else in `fallback` (an adapter folder's base), with a padding token."""
    from modeling_memory.tools.loading import load_tokenizer

    tokenizer = load_tokenizer(path, *([fallback] if fallback else []))
    if tokenizer is None:
        raise ToolError(f"No tokenizer in {path}; save the tokenizer next to the model (tokenizer.save_pretrained).")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _text_rows(args, tokenizer, text_column: str, main_process_first=None, separate_documents: bool = True):
    """Packed training/eval rows from --data or the knowledge set; training keeps the documents apart."""
    import contextlib

    import datasets

    from modeling_memory.data.packing import load_text_dataset, tokenize_and_pack
    from modeling_memory.data.knowledge import KnowledgeSet

    context = main_process_first(desc="tokenising") if main_process_first else contextlib.nullcontext()
    with context:
        if args.data is not None:
            try:
                dataset = load_text_dataset(args.data, text_column=text_column)
            except (ValueError, FileNotFoundError) as error:
                raise ToolError(str(error))
        else:
            knowledge = KnowledgeSet.generate(args.knowledge_entities, args.knowledge_seed, args.knowledge_statements,
                                              args.knowledge_questions)
            dataset, text_column = datasets.Dataset.from_dict({"text": knowledge.fact_documents()}), "text"
        # Training: documents packed into one row never read each other (per-document attention and memory), so a
        # fact is learnt in the context a question about it gives, not after whatever text the packer put before it.
        return tokenize_and_pack(dataset, tokenizer, args.block_size, text_column=text_column, separate_documents=separate_documents)


SPARSE_MEMORY_SLOTS_NAME = "sparse_memory_slots.safetensors"


def _sparse_memory_slots(args, model, tokenizer, rows, training_args) -> dict:
    """The rows `--mode sparse_memory` trains: read back from a resumed run's output folder (so a resumed run
    trains the same slots), else ranked by TF-IDF of the training rows' reads against the background's, and
    written to the output folder."""
    import torch
    from safetensors.torch import load_file

    from modeling_memory.data.packing import load_text_dataset, tokenize_and_pack
    from modeling_memory.training.sparse_memory_finetuning import DEFAULT_TOP_T, count_slot_reads, describe_selection, rank_slots

    saved = os.path.join(training_args.output_dir, SPARSE_MEMORY_SLOTS_NAME)
    if args.resume_from_checkpoint is not None and os.path.isfile(saved):
        slots = load_file(saved)
        print(f"sparse_memory: the slots of the run being resumed ({saved})")
        print(describe_selection(slots, model))
        return slots

    if args.background_data is not None:
        try:
            background = load_text_dataset(args.background_data, text_column=args.text_column)
        except (ValueError, FileNotFoundError) as error:
            raise ToolError(f"--background-data: {error}")
        text_column = args.text_column
    else:
        from modeling_memory.data.natural_text import load_natural_text

        try:
            background = load_natural_text()["train"]
        except FileNotFoundError as error:
            raise ToolError(f"{error} Or name background text with --background-data PATH.")
        text_column = "text"
    background_rows = tokenize_and_pack(background, tokenizer, args.block_size, text_column=text_column)
    background_rows = background_rows.select(range(min(len(background_rows), args.background_rows or 256)))

    def batches(dataset, size: int = 8):
        for start in range(0, len(dataset), size):
            chunk = dataset[start : start + size]
            yield {"input_ids": torch.tensor(chunk["input_ids"]), "attention_mask": torch.tensor(chunk["attention_mask"])}

    try:
        new_reads = count_slot_reads(model, batches(rows))
    except ValueError as error:
        raise ToolError(f"--mode sparse_memory: {error}")
    slots = rank_slots(new_reads, count_slot_reads(model, batches(background_rows)), args.sparse_memory_top_t or DEFAULT_TOP_T)
    print(f"sparse_memory: ranked against {len(background_rows)} background rows; {describe_selection(slots, model)}")
    return slots


def _save_sparse_memory_slots(slots: dict, output_dir: str) -> None:
    from safetensors.torch import save_file

    from modeling_memory.tools.safe_write import atomic_file

    with atomic_file(os.path.join(output_dir, SPARSE_MEMORY_SLOTS_NAME)) as temporary:
        save_file({name: rows.contiguous() for name, rows in slots.items()}, temporary)


# ---- train ------------------------------------------------------------------------------------


def run_train(args) -> int:
    """`memory-llama train`; see the module docstring."""
    import torch
    from transformers import set_seed

    from modeling_memory.tools.graft import LLAMA_COMPATIBLE_MODEL_TYPES, GraftError, graft, memory_config_from_llama
    from modeling_memory.tools.loading import from_pretrained, load_memory_llama
    from modeling_memory.memory_llama.modeling_memory_llama import MemoryLlamaForCausalLM
    from modeling_memory.training.peft_modes import prepare_model_for_mode, recommended_lora_config, trainable_parameter_counts
    from modeling_memory.tools.plots import plot_chapter_usage, plot_loss_curve
    from modeling_memory.training.trainer import MemoryTrainer

    # Every check that needs no heavy work comes first.
    args.model = os.path.abspath(args.model)  # adapters record their base by this path
    if (args.data is None) == (args.knowledge_entities is None):
        raise ToolError("Give exactly one training source: --data PATH or --knowledge-entities N.")
    _check_knowledge_arguments(args)
    if args.data is not None:
        _check_data_source(args.data)
    config = _load_config(args.model)
    if config.model_type not in LLAMA_COMPATIBLE_MODEL_TYPES:
        raise ToolError(
            f"{args.model} is a {config.model_type!r} checkpoint; `train` takes a MemoryLlama checkpoint, or one of the "
            f"Llama-layout families ({', '.join(LLAMA_COMPATIBLE_MODEL_TYPES)}) together with --graft."
        )
    if config.model_type != "memory_llama" and args.graft is None:
        raise ToolError(
            f"{args.model} is a {config.model_type!r} checkpoint: add --graft PRESET ({', '.join(GRAFT_PRESETS)}) to "
            "graft memory onto it, or pass a MemoryLlama checkpoint."
        )
    if config.model_type == "memory_llama" and args.graft is not None:
        raise ToolError(f"{args.model} already is a MemoryLlama checkpoint; drop --graft.")
    memory_config = None
    if args.graft is not None:
        try:  # the grafted config only (no weights): Mistral's sliding window and the like fail here
            memory_config = memory_config_from_llama(config, args.graft)
        except GraftError as error:
            raise ToolError(f"--graft {args.graft} onto {args.model}: {error}") from error
    if args.graft is not None and args.mode.startswith("lora"):
        raise ToolError(
            f"--mode {args.mode} saves an adapter that needs its MemoryLlama base on disk: graft first "
            "(`memory-llama graft`), then train the grafted checkpoint; --graft works with --mode full or memory_only."
        )
    from_adapter = adapter_base(args.model) is not None
    if from_adapter and args.mode.startswith("lora"):
        raise ToolError(
            f"--mode {args.mode} saves an adapter that needs its base on disk, but {args.model} is itself an adapter: "
            f"merge it first (`memory-llama merge {args.model} OUT`), then train OUT."
        )
    max_positions = config.max_position_embeddings
    if not 2 <= args.block_size <= max_positions:
        raise ToolError(f"--block-size must be between 2 and the model's max_position_embeddings ({max_positions}), got {args.block_size}.")
    has_memory = config.model_type == "memory_llama" and config.has_memory
    if args.mode != "full" and config.model_type == "memory_llama" and not has_memory:
        raise ToolError(f"--mode {args.mode} trains the memory, but {args.model} has none; use --mode full or --graft.")
    sparse_options = {"--sparse-memory-top-t": args.sparse_memory_top_t, "--background-data": args.background_data,
                      "--background-rows": args.background_rows}
    given = [name for name, value in sparse_options.items() if value is not None]
    if args.mode != "sparse_memory" and given:
        raise ToolError(f"{', '.join(given)} only apply to --mode sparse_memory (this run is --mode {args.mode}).")
    for name in ("--sparse-memory-top-t", "--background-rows"):
        if sparse_options[name] is not None and sparse_options[name] < 1:
            raise ToolError(f"{name} must be >= 1, got {sparse_options[name]}.")
    if args.lora_r < 1 or args.lora_alpha < 1 or not 0 <= args.lora_dropout < 1:
        raise ToolError("--lora-r and --lora-alpha must be >= 1 and --lora-dropout in [0, 1).")
    if args.resume_from_checkpoint == "last":
        from modeling_memory.training.trainer import last_complete_checkpoint

        if last_complete_checkpoint(args.output_dir) is None:
            raise ToolError(f"--resume_from_checkpoint last: no complete checkpoint in {args.output_dir}.")
    elif args.resume_from_checkpoint is not None and not os.path.isdir(args.resume_from_checkpoint):
        raise ToolError(f"--resume_from_checkpoint {args.resume_from_checkpoint}: no such checkpoint folder.")
    if args.eval_strategy not in (None, "no"):
        raise ToolError("`train` takes no evaluation data: leave --eval_strategy at 'no' and run `memory-llama eval` on the result.")
    try:
        training_args = _training_arguments(args)
    except ValueError as error:
        raise ToolError(f"Invalid training arguments: {error}")

    check_writable(training_args.output_dir, "--output_dir")
    if args.memory_offload_dir is not None and _inside(args.memory_offload_dir, training_args.output_dir):
        raise ToolError(
            f"--memory-offload-dir {args.memory_offload_dir} lies inside --output_dir {training_args.output_dir}: the "
            "tables' working copies are scratch, not part of the run. Choose a folder outside --output_dir."
        )
    replace_previous_run = _check_output_dir_is_free(args, training_args.output_dir)

    fsdp_requested = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" or bool(training_args.fsdp)
    if fsdp_requested and training_args.device.type == "cpu":
        # accelerate 1.15 turns FSDP on only for GPU-like process groups; on CPU it would silently
        # train plain data parallel instead, which is not what was asked for.
        raise ToolError(
            "FSDP was requested, but these are CPU processes: accelerate enables FSDP only on GPUs (and other "
            "accelerators) and would silently fall back to plain data parallel here. On CPUs use the ddp_cpu "
            "config; for FSDP use GPUs (fsdp_gpu config)."
        )

    if args.resume_from_checkpoint is not None:
        from modeling_memory.training.sharded_tables import check_table_optimizer_state
        from modeling_memory.training.trainer import last_complete_checkpoint

        resume = args.resume_from_checkpoint
        try:  # a model with memory shards its tables over several processes
            check_table_optimizer_state(last_complete_checkpoint(args.output_dir) if resume == "last" else resume, training_args.world_size)
        except ValueError as error:
            raise ToolError(f"--resume_from_checkpoint: {error}")
    placement = placement_arguments(args, memory_config or config, training_args.world_size)
    # Several processes shard the tables by row owner before placing them: each places only its block.
    sharded = training_args.world_size > 1
    if sharded and args.mode == "sparse_memory":
        raise ToolError(
            f"--mode sparse_memory trains chosen rows of whole tables, and these {training_args.world_size} processes "
            "would shard the tables by row owner: run sparse memory fine-tuning in one process."
        )
    load_placement = {} if sharded else placement
    # --seed governs everything drawn before Trainer seeds itself too: a graft's new memory and the LoRA init.
    set_seed(training_args.seed)
    tokenizer = _load_tokenizer(args.model, fallback=adapter_base(args.model))
    if len(tokenizer) > config.vocab_size:
        raise ToolError(f"The tokenizer has {len(tokenizer)} tokens but the model's vocabulary only {config.vocab_size}.")
    if from_adapter:  # the adapter merged into its base, trained further as a plain model
        model = load_memory_llama(args.model, allow_pickle=args.allow_pickle, merge=True, dtype=torch.float32, **load_placement)
    elif memory_config is None:
        model = from_pretrained(
            MemoryLlamaForCausalLM, args.model, allow_pickle=args.allow_pickle, dtype=torch.float32, **load_placement
        )
    else:
        model = graft(
            args.model, memory_config, tokenizer=tokenizer, dtype=torch.float32, allow_pickle=args.allow_pickle, **load_placement
        )
    if sharded:
        model.shard_memory_tables()
        if placement:
            model.set_memory_placement(placement["memory_placement"], placement["memory_offload_dir"])
    lora_config = recommended_lora_config(model, args.mode, r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout)
    rows = _text_rows(args, tokenizer, args.text_column, training_args.main_process_first)
    slots = _sparse_memory_slots(args, model, tokenizer, rows, training_args) if args.mode == "sparse_memory" else None
    model = prepare_model_for_mode(model, args.mode, lora_config, sparse_memory_slots=slots)
    if replace_previous_run:
        # As late as possible, so that a failure while loading keeps the previous run. Every process
        # decided this before the barrier in _text_rows, so all of them meet here; one deletes.
        with training_args.main_process_first(local=False, desc="replacing the previous run"):
            if training_args.process_index == 0:
                _remove_previous_run(training_args.output_dir)
    if slots is not None and training_args.process_index == 0:
        _save_sparse_memory_slots(slots, training_args.output_dir)  # a resumed run trains the same slots

    from transformers import default_data_collator

    trainer = MemoryTrainer(
        model=model, args=training_args, train_dataset=rows, processing_class=tokenizer, data_collator=default_data_collator
    )
    if trainer.is_world_process_zero():
        counts = trainable_parameter_counts(model)  # of a table in sparse_memory mode, only its chosen rows
        accelerator = trainer.accelerator
        rows_note = " in the chosen rows" if slots is not None else ""
        print(
            f"mode {args.mode}: {counts['total']:,} trainable parameters (adapter {counts['adapter']:,}, "
            f"memory {counts['memory']:,}{rows_note}, backbone {counts['backbone']:,}); {len(rows)} rows of "
            f"{args.block_size} tokens; {accelerator.distributed_type.value} on {accelerator.num_processes} process(es)"
            + (f"; {len(trainer.sharded_tables)} memory tables sharded by row owner" if trainer.sharded_tables else "")
        )
    trainer.train(resume_from_checkpoint=True if args.resume_from_checkpoint == "last" else args.resume_from_checkpoint)
    trainer.save_model()
    trainer.save_state()
    usage = trainer.memory_health.chapter_usage(trainer.accelerator)  # a collective: every process calls it

    if trainer.is_world_process_zero():
        output_dir = training_args.output_dir
        written = []
        if any("loss" in entry for entry in trainer.state.log_history):
            written.append(plot_loss_curve(trainer.state.log_history, os.path.join(output_dir, "loss_curve.png")))
        else:
            print(f"no training loss was logged (logging_steps {training_args.logging_steps} > steps run): no loss_curve.png")
        if usage:
            written.append(plot_chapter_usage(usage, os.path.join(output_dir, "chapter_usage.png")))
        else:
            print("no chapter usage recorded (no chapter layers, or --log_memory_health false): no chapter_usage.png")
        if args.knowledge_entities is not None:
            from modeling_memory.data.knowledge import KnowledgeSet

            knowledge = KnowledgeSet.generate(
                args.knowledge_entities, args.knowledge_seed, args.knowledge_statements, args.knowledge_questions
            )
            path = os.path.join(output_dir, "knowledge.json")
            with open(path, "w") as handle:
                handle.write(knowledge.to_json())
            written.append(path)
        names = ", ".join(os.path.basename(p) for p in written) or "no plots"
        print(f"saved the trained model to {output_dir}; wrote {names}")
    # Every process leaves together and tears its process groups down (the tables' own included): a process that
    # exits while another still holds a connection can abort it.
    trainer.accelerator.wait_for_everyone()
    trainer.accelerator.end_training()
    return 0


# ---- eval -------------------------------------------------------------------------------------


def _resolve_eval_checkpoint(checkpoint: str):
    """The config of a full checkpoint, or for an adapter folder of the base model that adapter_config.json
    names. Reads no weights."""
    if not os.path.isdir(checkpoint):
        raise ToolError(f"{checkpoint} is not a checkpoint folder.")
    config = _load_config(checkpoint)
    if config.model_type != "memory_llama":
        raise ToolError(f"{adapter_base(checkpoint) or checkpoint} is a {config.model_type!r} checkpoint, not memory_llama.")
    return config


def load_for_eval(checkpoint: str, allow_pickle: bool = False, placement: dict | None = None):
    """(model, tokenizer) from a full checkpoint or from an adapter folder written by `train`
    (its base model is read from adapter_config.json; the memory from memory.safetensors); `placement`: where the
    tables go (`placement_arguments`)."""
    import torch

    from modeling_memory.tools.loading import load_memory_llama

    _resolve_eval_checkpoint(checkpoint)
    model = load_memory_llama(checkpoint, allow_pickle=allow_pickle, dtype=torch.float32, **(placement or {}))
    return model.eval(), _load_tokenizer(checkpoint, fallback=adapter_base(checkpoint))


def run_eval(args) -> int:
    """`memory-llama eval`; see the module docstring."""
    from modeling_memory.tools.evaluation import evaluate_knowledge_recall, evaluate_perplexity, results_table
    from modeling_memory.data.knowledge import KnowledgeSet

    if args.data is None and args.knowledge_entities is None:
        raise ToolError("Nothing to evaluate: give --data PATH (perplexity) and/or --knowledge-entities N (recall).")
    _check_knowledge_arguments(args)
    if args.data is not None:
        _check_data_source(args.data)
    if args.batch_size < 1:
        raise ToolError(f"--batch-size must be >= 1, got {args.batch_size}.")
    if args.block_size < 2:
        raise ToolError(f"--block-size must be >= 2, got {args.block_size}.")
    if args.output_json is not None and not os.path.isdir(os.path.dirname(os.path.abspath(args.output_json))):
        raise ToolError(f"--output-json {args.output_json}: its folder does not exist.")

    config = _resolve_eval_checkpoint(args.checkpoint)
    if args.data is not None and args.block_size > config.max_position_embeddings:
        raise ToolError(
            f"--block-size {args.block_size} exceeds the model's max_position_embeddings ({config.max_position_embeddings})."
        )
    model, tokenizer = load_for_eval(args.checkpoint, args.allow_pickle, placement_arguments(args, config))
    results = {"checkpoint": os.path.abspath(args.checkpoint)}
    if args.data is not None:
        data_args = argparse.Namespace(data=args.data, knowledge_entities=None, block_size=args.block_size)
        rows = _text_rows(data_args, tokenizer, args.text_column, separate_documents=False)
        results["perplexity"] = {**evaluate_perplexity(model, tokenizer, rows, args.batch_size), "data": args.data}
    if args.knowledge_entities is not None:
        knowledge = KnowledgeSet.generate(args.knowledge_entities, args.knowledge_seed)
        probes = knowledge.probes(held_out=args.probes == "held_out")
        recall = evaluate_knowledge_recall(model, tokenizer, probes, args.batch_size)
        recall.pop("continuations")
        results["knowledge_recall"] = {
            **recall, "probes": args.probes, "knowledge_entities": args.knowledge_entities, "knowledge_seed": args.knowledge_seed,
        }
    print(results_table(results))
    text = json.dumps(results, indent=2)
    if args.output_json is not None:
        with atomic_file(args.output_json) as staging:
            staging.write_text(text + "\n")
        print(f"wrote {args.output_json}")
    else:
        print(text)
    return 0


__all__ = [
    "ACCELERATE_CONFIGS",
    "accelerate_config_path",
    "load_for_eval",
    "parse_train_command_line",
    "placement_arguments",
    "run_eval",
    "run_train",
]
