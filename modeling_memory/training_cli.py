"""`memory-llama train` and `memory-llama eval`: fine-tuning and evaluation from the command line.

train: a MemoryLlama checkpoint (or a Llama one with `--graft`), text data (`--data`) or the
built-in knowledge set (`--knowledge-entities`), a training mode (`--mode`) and every
`TrainingArguments` / `MemoryTrainingArguments` field passed through (`--learning_rate 1e-4`,
`--max_steps 100`, `--resume_from_checkpoint DIR` or `last` — the newest complete checkpoint —, ...). Runs `MemoryTrainer`, saves the model (or
adapter + memory), `trainer_state.json`, `loss_curve.png` and `chapter_usage.png` in `--output_dir`.
Under `accelerate launch` it trains on every process (see `accelerate_config_path`).
`--output_dir` must be new or empty, so that two runs never mix: resuming a checkpoint of its own
continues the run it holds, and `--overwrite` replaces it.

The `train` subparser of `memory-llama` holds only the options of `train` itself (`add_train_arguments`:
no transformers import, so help and errors are fast); `parse_train_command_line` parses the whole
line again with every TrainingArguments field.

eval: perplexity on text (`--data`) and exact-match recall on knowledge probes
(`--knowledge-entities`), computed with the project's local `evaluate` metric modules; prints a
table and writes JSON (`--output-json`).
"""

import argparse
import copy
import dataclasses
import json
import os
import shutil
import tempfile
import typing
import uuid

from .cli import SPELLING_NOTE, HelpFormatter, add_option

ACCELERATE_CONFIGS = ("ddp_cpu", "ddp_gpu", "fsdp_gpu")
# peft_modes.TRAINING_MODES and grafting.PRESETS, spelt out so that building the parser imports
# neither torch nor PEFT (a test checks that they agree).
TRAINING_MODES = ("full", "memory_only", "lora", "lora_all")
GRAFT_PRESETS = ("engram", "chapters", "both", "pkm", "all")


def accelerate_config_path(name: str) -> str:
    """Path of a packaged accelerate config: ddp_cpu, ddp_gpu or fsdp_gpu."""
    if name not in ACCELERATE_CONFIGS:
        raise ValueError(f"Unknown accelerate config {name!r}; the package ships {', '.join(ACCELERATE_CONFIGS)}.")
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "accelerate_configs", f"{name}.yaml")


# ---- arguments ---------------------------------------------------------------------------------

TRAIN_DESCRIPTION = (
    "Fine-tune MODEL with MemoryTrainer on --data or the built-in knowledge set (--knowledge-entities) and save "
    "the model (or adapter + memory), trainer_state.json and plots to --output_dir."
)
TRAIN_EPILOG = (
    "Every transformers.TrainingArguments and MemoryTrainingArguments field passes through under its own name: "
    "--output_dir DIR (default trainer_output), --max_steps, --learning_rate, --per_device_train_batch_size, "
    "--gradient_accumulation_steps, --logging_steps, --save_steps, --resume_from_checkpoint DIR|last, "
    "--table_optimizer, --engram_lr_multiplier, ...; `memory-llama train --help-training` lists them all. "
    "--output_dir must be new or empty: continue the run it holds with --resume_from_checkpoint last, or "
    "replace it with --overwrite. " + SPELLING_NOTE
)


def _add_knowledge_arguments(parser, purpose: str) -> None:
    add_option(parser, "--knowledge-entities", type=int, help=f"{purpose} the built-in knowledge set with this many fictional people")
    add_option(parser, "--knowledge-seed", type=int, default=0, help="seed of the knowledge set (same seed = same people)")


class _PrintTrainingArgumentsHelp(argparse.Action):
    """`--help-training`: the full help, with every TrainingArguments field (imports transformers)."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, nargs=0, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        build_train_parser().print_help()
        parser.exit()


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `train` itself (no TrainingArguments fields: adding those imports transformers)."""
    parser.add_argument("model", help="a MemoryLlama checkpoint folder, or a Llama one together with --graft")
    add_option(parser, "--graft", choices=GRAFT_PRESETS, help="graft memory (memory_preset) onto a Llama checkpoint first")
    add_option(parser, "--data", help="training text: a .txt/.json/.jsonl/.parquet file or folder, or a Hub dataset name")
    add_option(parser, "--text-column", default="text", help="column holding the documents (json/parquet)")
    _add_knowledge_arguments(parser, "train on")
    add_option(parser, "--knowledge-statements", type=int, default=3, choices=[1, 2, 3], help="training phrasings per fact")
    add_option(parser, "--block-size", type=int, default=256, help="tokens per packed training row")
    add_option(parser, "--mode", choices=TRAINING_MODES, default="full", help="training mode (see README, 'Training modes')")
    add_option(parser, "--lora-r", type=int, default=16, help="LoRA rank (lora modes)")
    add_option(parser, "--lora-alpha", type=int, default=32, help="LoRA alpha (lora modes)")
    add_option(parser, "--lora-dropout", type=float, default=0.0, help="LoRA dropout (lora modes)")
    add_option(parser, "--overwrite", action="store_true", help="replace a non-empty --output_dir (the previous run in it is deleted)")
    add_option(parser, "--help-training", action=_PrintTrainingArgumentsHelp, help="list every TrainingArguments field and exit")


def add_training_arguments_fields(parser: argparse.ArgumentParser) -> None:
    """Every MemoryTrainingArguments field, as HfArgumentParser adds them (`--learning_rate` and `--learning-rate`)."""
    from transformers import HfArgumentParser

    from .trainer import MemoryTrainingArguments

    group = parser.add_argument_group(
        "training arguments", "transformers.TrainingArguments and MemoryTrainingArguments fields, e.g. --learning_rate 1e-4"
    )
    hints = typing.get_type_hints(MemoryTrainingArguments)
    for field in dataclasses.fields(MemoryTrainingArguments):
        if field.init:
            # A copy with the type resolved: HfArgumentParser rewrites `field.type` in place.
            field = copy.copy(field)
            field.type = hints[field.name]
            HfArgumentParser._parse_dataclass_field(group, field)


def build_train_parser() -> argparse.ArgumentParser:
    """The whole `train` command line: its own options and every TrainingArguments field."""
    parser = argparse.ArgumentParser(
        prog="memory-llama train", description=TRAIN_DESCRIPTION, epilog=TRAIN_EPILOG, formatter_class=HelpFormatter,
        allow_abbrev=False,  # ~120 TrainingArguments options: no prefix guessing
    )
    add_train_arguments(parser)
    add_training_arguments_fields(parser)
    return parser


def parse_train_command_line(arguments: list[str]) -> argparse.Namespace:
    """The arguments after `memory-llama train`, parsed (errors exit as argparse's do)."""
    return build_train_parser().parse_args(arguments)


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="a MemoryLlama checkpoint folder, or an adapter folder written by `train`")
    add_option(parser, "--data", help="text for perplexity: a .txt/.json/.jsonl/.parquet file or folder, or a Hub dataset name")
    add_option(parser, "--text-column", default="text")
    add_option(parser, "--block-size", type=int, default=256, help="tokens per packed row for perplexity")
    _add_knowledge_arguments(parser, "probe recall of")
    add_option(
        parser, "--probes", choices=["held_out", "training"], default="held_out",
        help="held_out: questions phrased unlike the training text; training: the training phrasing cut before the answer",
    )
    add_option(parser, "--batch-size", type=int, default=8)
    add_option(parser, "--output-json", help="also write the results to this JSON file")


def _training_arguments(args):
    from .trainer import MemoryTrainingArguments

    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(MemoryTrainingArguments) if f.init}
    return MemoryTrainingArguments(**values)


# ---- shared checks and loading ------------------------------------------------------------------


def _check_writable(output_dir: str) -> None:
    """Fail before any work when --output_dir cannot be created or written (its nearest existing ancestor
    is a file, or is not writable)."""
    path = os.path.abspath(output_dir)
    existing = path
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise SystemExit(f"--output_dir {output_dir} cannot be created: {existing} is a file, not a folder.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise SystemExit(f"--output_dir {output_dir} cannot be written: {existing} is not writable.")


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
            raise SystemExit(
                f"--overwrite would delete the checkpoint that --resume_from_checkpoint {resume} continues from "
                f"(it is in --output_dir {output_dir}): drop one of the two."
            )
        _check_replaceable(args, output_dir)
        return True
    if not resuming_here:
        held = sorted(os.listdir(output_dir))
        shown = ", ".join(held[:4]) + (", ..." if len(held) > 4 else "")
        raise SystemExit(
            f"--output_dir {output_dir} is not empty (it holds {shown}), and training into it would mix two runs' "
            "checkpoints and plots. Choose a new --output_dir, add --overwrite to replace the previous run, or "
            "continue it with --resume_from_checkpoint last."
        )
    return False


def _check_replaceable(args, output_dir: str) -> None:
    """--overwrite deletes `output_dir`: refuse when that would delete more than a previous run."""
    if os.path.islink(output_dir):
        raise SystemExit(f"--output_dir {output_dir} is a symbolic link; --overwrite replaces only a real folder: "
                         "pass the folder it points to, or a new one.")
    folder = os.path.realpath(output_dir)
    for name, place in (("the current folder", os.getcwd()), ("your home folder", os.path.expanduser("~"))):
        if _inside(place, folder):
            raise SystemExit(f"--overwrite would delete --output_dir {output_dir}, which holds {name}: "
                             "give the run a folder of its own.")
    inputs = (("MODEL", args.model), ("--data", args.data), ("--resume_from_checkpoint", args.resume_from_checkpoint))
    for option, path in inputs:
        if path is not None and os.path.exists(path) and _inside(path, folder):
            raise SystemExit(f"--overwrite would delete {option} {path}, which lies inside --output_dir {output_dir}: "
                             "choose another --output_dir.")
    parent = os.path.dirname(folder)
    if not os.access(parent, os.W_OK | os.X_OK):
        raise SystemExit(f"--overwrite cannot replace --output_dir {output_dir}: its parent {parent} is not writable.")


def _remove_previous_run(output_dir: str) -> None:
    """Move the old folder aside in one rename, then delete it: nobody ever finds `output_dir` half
    deleted (an interruption leaves at most a hidden .NAME.replaced-* folder beside it)."""
    folder = os.path.abspath(output_dir)
    aside = os.path.join(os.path.dirname(folder), f".{os.path.basename(folder)}.replaced-{uuid.uuid4().hex[:8]}")
    os.replace(folder, aside)
    shutil.rmtree(aside, ignore_errors=True)
    if os.path.exists(aside):
        print(f"--overwrite: the previous run was moved to {aside}, which could not be deleted completely")
    else:
        print(f"--overwrite: deleted the previous run in {output_dir}")


def _check_knowledge_arguments(args) -> None:
    if args.knowledge_entities is not None and not 1 <= args.knowledge_entities <= 100_000:
        raise SystemExit(f"--knowledge-entities must be between 1 and 100000, got {args.knowledge_entities}.")


def _check_data_source(source: str) -> None:
    from .data import BUILDERS

    if os.path.exists(source):
        return
    if source.startswith((".", "/", "~")) or os.path.splitext(source)[1].lower() in BUILDERS:
        raise SystemExit(f"--data {source}: no such file or folder.")


def _load_config(path: str):
    from transformers import AutoConfig

    from modeling_memory import MemoryLlamaConfig  # noqa: F401  (registers memory_llama with the Auto classes)

    if os.path.isfile(path) and path.lower().endswith(".gguf"):
        raise SystemExit(
            f"{path} is a GGUF file: graft memory onto it first (`memory-llama graft {path} OUT`), then pass OUT."
        )
    if not os.path.isdir(path):
        raise SystemExit(f"{path} is not a checkpoint folder (expected config.json and weights inside).")
    try:
        return AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as error:
        raise SystemExit(f"Cannot read the model config in {path}: {error}")


def _load_tokenizer(path: str):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError) as error:
        raise SystemExit(f"No tokenizer in {path} ({error}); save the tokenizer next to the model (tokenizer.save_pretrained).")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _text_rows(args, tokenizer, text_column: str, main_process_first=None):
    """Packed training/eval rows from --data or the knowledge set."""
    import contextlib

    from .data import knowledge_dataset, load_text_dataset, tokenize_and_pack
    from .knowledge import KnowledgeSet

    context = main_process_first(desc="tokenising") if main_process_first else contextlib.nullcontext()
    with context:
        if args.data is not None:
            try:
                dataset = load_text_dataset(args.data, text_column=text_column)
            except (ValueError, FileNotFoundError) as error:
                raise SystemExit(str(error))
        else:
            knowledge = KnowledgeSet.generate(args.knowledge_entities, args.knowledge_seed, getattr(args, "knowledge_statements", 3))
            dataset, text_column = knowledge_dataset(knowledge), "text"
        return tokenize_and_pack(dataset, tokenizer, args.block_size, text_column=text_column)


# ---- train ------------------------------------------------------------------------------------


def run_train(args) -> int:
    """`memory-llama train`; see the module docstring."""
    import torch

    from .grafting import LLAMA_COMPATIBLE_MODEL_TYPES, graft_from_llama, memory_config_from_llama, memory_preset
    from .modeling_memory_llama import MemoryLlamaForCausalLM
    from .peft_modes import prepare_model_for_mode, recommended_lora_config, trainable_parameter_counts
    from .plots import plot_chapter_usage, plot_loss_curve
    from .trainer import MemoryTrainer

    # Every check that needs no heavy work comes first.
    args.model = os.path.abspath(args.model)  # adapters record their base by this path
    if (args.data is None) == (args.knowledge_entities is None):
        raise SystemExit("Give exactly one training source: --data PATH or --knowledge-entities N.")
    _check_knowledge_arguments(args)
    if args.data is not None:
        _check_data_source(args.data)
    config = _load_config(args.model)
    if config.model_type not in LLAMA_COMPATIBLE_MODEL_TYPES:
        raise SystemExit(
            f"{args.model} is a {config.model_type!r} checkpoint; `train` takes a MemoryLlama checkpoint, or one of the "
            f"Llama-layout families ({', '.join(LLAMA_COMPATIBLE_MODEL_TYPES)}) together with --graft."
        )
    if config.model_type != "memory_llama" and args.graft is None:
        raise SystemExit(
            f"{args.model} is a {config.model_type!r} checkpoint: add --graft {{engram,chapters,both}} to graft memory "
            "onto it, or pass a MemoryLlama checkpoint."
        )
    if config.model_type == "memory_llama" and args.graft is not None:
        raise SystemExit(f"{args.model} already is a MemoryLlama checkpoint; drop --graft.")
    if args.graft is not None:
        try:  # builds the grafted config only (no weights): Mistral's sliding window and the like fail here
            memory_config_from_llama(config, **memory_preset(config, args.graft))
        except ValueError as error:
            raise SystemExit(f"--graft {args.graft} onto {args.model}: {error}")
    if args.graft is not None and args.mode.startswith("lora"):
        raise SystemExit(
            f"--mode {args.mode} saves an adapter that needs its MemoryLlama base on disk: graft first "
            "(`memory-llama graft`), then train the grafted checkpoint; --graft works with --mode full or memory_only."
        )
    max_positions = config.max_position_embeddings
    if not 2 <= args.block_size <= max_positions:
        raise SystemExit(f"--block-size must be between 2 and the model's max_position_embeddings ({max_positions}), got {args.block_size}.")
    if args.mode != "full" and config.model_type == "memory_llama" and not (config.chapter_layers or config.engram_layers):
        raise SystemExit(f"--mode {args.mode} trains the memory, but {args.model} has none; use --mode full or --graft.")
    if args.lora_r < 1 or args.lora_alpha < 1 or not 0 <= args.lora_dropout < 1:
        raise SystemExit("--lora-r and --lora-alpha must be >= 1 and --lora-dropout in [0, 1).")
    if args.resume_from_checkpoint == "last":
        from .trainer import last_complete_checkpoint

        if last_complete_checkpoint(args.output_dir) is None:
            raise SystemExit(f"--resume_from_checkpoint last: no complete checkpoint in {args.output_dir}.")
    elif args.resume_from_checkpoint is not None and not os.path.isdir(args.resume_from_checkpoint):
        raise SystemExit(f"--resume_from_checkpoint {args.resume_from_checkpoint}: no such checkpoint folder.")
    if args.eval_strategy not in (None, "no"):
        raise SystemExit("`train` takes no evaluation data: leave --eval_strategy at 'no' and run `memory-llama eval` on the result.")
    try:
        training_args = _training_arguments(args)
    except ValueError as error:
        raise SystemExit(f"Invalid training arguments: {error}")

    _check_writable(training_args.output_dir)
    replace_previous_run = _check_output_dir_is_free(args, training_args.output_dir)

    fsdp_requested = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" or bool(training_args.fsdp)
    if fsdp_requested and training_args.device.type == "cpu":
        # accelerate 1.15 turns FSDP on only for GPU-like process groups; on CPU it would silently
        # train plain data parallel instead, which is not what was asked for.
        raise SystemExit(
            "FSDP was requested, but these are CPU processes: accelerate enables FSDP only on GPUs (and other "
            "accelerators) and would silently fall back to plain data parallel here. On CPUs use the ddp_cpu "
            "config; for FSDP use GPUs (fsdp_gpu config)."
        )

    tokenizer = _load_tokenizer(args.model)
    if len(tokenizer) > config.vocab_size:
        raise SystemExit(f"The tokenizer has {len(tokenizer)} tokens but the model's vocabulary only {config.vocab_size}.")
    if config.model_type == "memory_llama":
        model = MemoryLlamaForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    else:
        model = graft_from_llama(MemoryLlamaForCausalLM, args.model, tokenizer=tokenizer, **memory_preset(config, args.graft))
        model = model.float()
    lora_config = recommended_lora_config(args.mode, r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout)
    model = prepare_model_for_mode(model, args.mode, lora_config)
    rows = _text_rows(args, tokenizer, args.text_column, training_args.main_process_first)
    if replace_previous_run:
        # As late as possible, so that a failure while loading keeps the previous run. Every process
        # decided this before the barrier in _text_rows, so all of them meet here; one deletes.
        with training_args.main_process_first(local=False, desc="replacing the previous run"):
            if training_args.process_index == 0:
                _remove_previous_run(training_args.output_dir)

    from transformers import default_data_collator

    trainer = MemoryTrainer(
        model=model, args=training_args, train_dataset=rows, processing_class=tokenizer, data_collator=default_data_collator
    )
    if trainer.is_world_process_zero():
        counts = trainable_parameter_counts(model)
        accelerator = trainer.accelerator
        print(
            f"mode {args.mode}: {counts['total']:,} trainable parameters (adapter {counts['adapter']:,}, "
            f"memory {counts['memory']:,}, backbone {counts['backbone']:,}); {len(rows)} rows of {args.block_size} tokens; "
            f"{accelerator.distributed_type.value} on {accelerator.num_processes} process(es)"
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
            from .knowledge import KnowledgeSet

            knowledge = KnowledgeSet.generate(args.knowledge_entities, args.knowledge_seed, args.knowledge_statements)
            path = os.path.join(output_dir, "knowledge.json")
            with open(path, "w") as handle:
                handle.write(knowledge.to_json())
            written.append(path)
        names = ", ".join(os.path.basename(p) for p in written) or "no plots"
        print(f"saved the trained model to {output_dir}; wrote {names}")
    return 0


# ---- eval -------------------------------------------------------------------------------------


def _resolve_eval_checkpoint(checkpoint: str):
    """(config, base model folder or None): a full checkpoint's config, or for an adapter folder the
    config of the base model that adapter_config.json names. Reads no weights."""
    if not os.path.isdir(checkpoint):
        raise SystemExit(f"{checkpoint} is not a checkpoint folder.")
    adapter_config = os.path.join(checkpoint, "adapter_config.json")
    if os.path.isfile(adapter_config):
        with open(adapter_config) as handle:
            base_path = json.load(handle).get("base_model_name_or_path")
        if not base_path or not os.path.isdir(base_path):
            raise SystemExit(f"The adapter in {checkpoint} names base model {base_path!r}, which is not a local folder.")
        config = _load_config(base_path)
    else:
        base_path, config = None, _load_config(checkpoint)
    if config.model_type != "memory_llama":
        raise SystemExit(f"{base_path or checkpoint} is a {config.model_type!r} checkpoint, not memory_llama.")
    return config, base_path


def load_for_eval(checkpoint: str):
    """(model, tokenizer) from a full checkpoint or from an adapter folder written by `train`
    (its base model is read from adapter_config.json; the memory from memory.safetensors)."""
    import torch

    from .modeling_memory_llama import MemoryLlamaForCausalLM
    from .peft_modes import load_adapter_with_memory

    _, base_path = _resolve_eval_checkpoint(checkpoint)
    if base_path is not None:
        base = MemoryLlamaForCausalLM.from_pretrained(base_path, dtype=torch.float32)
        model = load_adapter_with_memory(base, checkpoint)
    else:
        model = MemoryLlamaForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    return model.eval(), _load_tokenizer(checkpoint)


def _nll_per_row(logits, labels):
    """(rows, 2): summed next-token negative log-likelihood and number of scored tokens per row."""
    import torch
    import torch.nn.functional as F

    if isinstance(logits, tuple):
        logits = logits[0]
    shifted_logits = logits[:, :-1].float()
    shifted_labels = labels[:, 1:]
    nll = F.cross_entropy(shifted_logits.transpose(1, 2), shifted_labels, ignore_index=-100, reduction="none")
    return torch.stack([nll.sum(dim=1), shifted_labels.ne(-100).sum(dim=1).float()], dim=1)


def evaluate_perplexity(model, tokenizer, rows, batch_size: int) -> dict:
    """Token-weighted perplexity of `rows` (packed, with labels) through Trainer's evaluation loop and
    the local `perplexity` metric (accelerate splits the rows across processes when launched so)."""
    from transformers import default_data_collator

    from .metrics import load_metric
    from .trainer import MemoryTrainer, MemoryTrainingArguments

    metric = load_metric("perplexity")

    def compute_metrics(prediction):
        per_row = prediction.predictions
        return metric.compute(nll_sums=per_row[:, 0].tolist(), token_counts=per_row[:, 1].astype("int64").tolist())

    with tempfile.TemporaryDirectory() as scratch:
        args = MemoryTrainingArguments(
            output_dir=scratch, per_device_eval_batch_size=batch_size, report_to="none", log_memory_health=False,
            disable_tqdm=False, dataloader_pin_memory=False,
        )
        trainer = MemoryTrainer(
            model=model, args=args, eval_dataset=rows, processing_class=tokenizer, data_collator=default_data_collator,
            compute_metrics=compute_metrics, preprocess_logits_for_metrics=_nll_per_row,
        )
        results = trainer.evaluate()
    return {
        "perplexity": results["eval_perplexity"],
        "mean_nll": results["eval_mean_nll"],
        "num_tokens": int(results["eval_num_tokens"]),
        "num_rows": len(rows),
    }


def greedy_continuations(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int) -> list[str]:
    """Greedy continuation of each prompt (left-padded batches), decoded without special tokens."""
    import torch

    tokenizer.padding_side = "left"
    continuations = []
    for start in range(0, len(prompts), batch_size):
        batch = tokenizer(prompts[start : start + batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
        batch = batch.to(model.device)
        with torch.no_grad():
            output = model.generate(
                **batch, do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
        new_tokens = output[:, batch["input_ids"].shape[1] :]
        continuations.extend(tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
    return continuations


def evaluate_knowledge_recall(model, tokenizer, probes, batch_size: int) -> dict:
    """Exact-match recall of `probes` (greedy continuations scored by the local `knowledge_recall`
    metric), overall and per attribute."""
    from .metrics import load_metric

    longest_answer = max(len(tokenizer(" " + p.answer, add_special_tokens=False)["input_ids"]) for p in probes)
    continuations = greedy_continuations(model, tokenizer, [p.prompt for p in probes], longest_answer + 2, batch_size)
    metric = load_metric("knowledge_recall")
    overall = metric.compute(predictions=continuations, references=[p.answer for p in probes])
    by_attribute = {}
    for attribute in dict.fromkeys(p.attribute for p in probes):
        chosen = [i for i, p in enumerate(probes) if p.attribute == attribute]
        scores = metric.compute(predictions=[continuations[i] for i in chosen], references=[probes[i].answer for i in chosen])
        by_attribute[attribute] = scores["exact_match"]
    return {**overall, "by_attribute": by_attribute, "continuations": continuations}


def _format_table(results: dict) -> str:
    lines = [f"{'metric':<36} {'value':>12}", "-" * 49]
    if "perplexity" in results:
        ppl = results["perplexity"]
        lines.append(f"{'perplexity':<36} {ppl['perplexity']:>12.4f}")
        lines.append(f"{'mean NLL (nats / token)':<36} {ppl['mean_nll']:>12.4f}")
        lines.append(f"{'tokens scored':<36} {ppl['num_tokens']:>12,}")
    if "knowledge_recall" in results:
        recall = results["knowledge_recall"]
        lines.append(f"{'knowledge recall (' + recall['probes'] + ')':<36} {recall['exact_match']:>12.4f}")
        for attribute, value in recall["by_attribute"].items():
            lines.append(f"{'  ' + attribute:<36} {value:>12.4f}")
        lines.append(f"{'probes':<36} {recall['num_probes']:>12,}")
    return "\n".join(lines)


def run_eval(args) -> int:
    """`memory-llama eval`; see the module docstring."""
    from .knowledge import KnowledgeSet

    if args.data is None and args.knowledge_entities is None:
        raise SystemExit("Nothing to evaluate: give --data PATH (perplexity) and/or --knowledge-entities N (recall).")
    _check_knowledge_arguments(args)
    if args.data is not None:
        _check_data_source(args.data)
    if args.batch_size < 1:
        raise SystemExit(f"--batch-size must be >= 1, got {args.batch_size}.")
    if args.block_size < 2:
        raise SystemExit(f"--block-size must be >= 2, got {args.block_size}.")
    if args.output_json is not None and not os.path.isdir(os.path.dirname(os.path.abspath(args.output_json))):
        raise SystemExit(f"--output-json {args.output_json}: its folder does not exist.")

    config, _ = _resolve_eval_checkpoint(args.checkpoint)
    if args.data is not None and args.block_size > config.max_position_embeddings:
        raise SystemExit(
            f"--block-size {args.block_size} exceeds the model's max_position_embeddings ({config.max_position_embeddings})."
        )
    model, tokenizer = load_for_eval(args.checkpoint)
    results = {"checkpoint": os.path.abspath(args.checkpoint)}
    if args.data is not None:
        data_args = argparse.Namespace(data=args.data, knowledge_entities=None, block_size=args.block_size)
        rows = _text_rows(data_args, tokenizer, args.text_column)
        results["perplexity"] = {**evaluate_perplexity(model, tokenizer, rows, args.batch_size), "data": args.data}
    if args.knowledge_entities is not None:
        knowledge = KnowledgeSet.generate(args.knowledge_entities, args.knowledge_seed)
        probes = knowledge.probes(held_out=args.probes == "held_out")
        recall = evaluate_knowledge_recall(model, tokenizer, probes, args.batch_size)
        recall.pop("continuations")
        results["knowledge_recall"] = {
            **recall, "probes": args.probes, "knowledge_entities": args.knowledge_entities, "knowledge_seed": args.knowledge_seed,
        }
    print(_format_table(results))
    text = json.dumps(results, indent=2)
    if args.output_json is not None:
        directory = os.path.dirname(os.path.abspath(args.output_json))
        handle, staging = tempfile.mkstemp(prefix=".eval-", suffix=".json", dir=directory)
        with os.fdopen(handle, "w") as stream:
            stream.write(text + "\n")
        os.replace(staging, args.output_json)
        print(f"wrote {args.output_json}")
    else:
        print(text)
    return 0


__all__ = [
    "ACCELERATE_CONFIGS",
    "accelerate_config_path",
    "add_eval_arguments",
    "add_train_arguments",
    "evaluate_knowledge_recall",
    "evaluate_perplexity",
    "greedy_continuations",
    "load_for_eval",
    "run_eval",
    "run_train",
]
