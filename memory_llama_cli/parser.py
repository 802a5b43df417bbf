"""The parser of `memory-llama`: every command's arguments, built with the standard library only.

Building it imports neither torch nor transformers (`import modeling_memory` takes about 5 s), so `--help`
and argument errors answer at once. Its modules depend in one direction: this one imports nothing of the
package; `memory_llama_cli` (main) imports it and, when a command runs, `commands`, which imports
`train_command`, which imports this one.

The names the library accepts (training modes, graft presets, table placements, the default shard size) live once, in
`modeling_memory/choices.py`, which the library imports. Importing it the ordinary way would first run
`modeling_memory/__init__.py` (torch and transformers), so `library_choices` executes that file on its own:
it holds constants only. The parser lists them in help and refuses anything else, as argparse does.

`train` passes every TrainingArguments field through: its subparser knows only the options of its own (fast
help and errors), and the command parses the whole line again with `build_train_parser`, which adds the
TrainingArguments fields (importing transformers).

Options of several words are accepted with hyphens or underscores (`--max-new-tokens` or `--max_new_tokens`);
help lists the first spelling. A misspelt option is refused with one line naming the closest valid one.
"""

import argparse
import copy
import difflib
import functools
import importlib.util
import os
import textwrap
import types

SPELLING_NOTE = (
    "Options of several words may be spelt with hyphens or underscores: --block-size or --block_size, "
    "--output_dir or --output-dir."
)
MEMORY_KINDS = "chapter memory, Engram and product-key memory"


@functools.cache
def library_choices() -> types.ModuleType:
    """`modeling_memory/choices.py` (TRAINING_MODES, GRAFT_PRESETS, MEMORY_PLACEMENTS, ...), executed on its own,
    without running `modeling_memory/__init__.py`: finding a top-level package's folder does not import it."""
    folder = importlib.util.find_spec("modeling_memory").submodule_search_locations[0]
    spec = importlib.util.spec_from_file_location("memory_llama_cli._library_choices", os.path.join(folder, "choices.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---- parser helpers -----------------------------------------------------------------------------


def _spelling_key(option: str) -> str:
    return option.replace("-", "_").lstrip("_")


def both_spellings(*option_strings: str) -> list[str]:
    """The option strings plus, for each long option of several words, its other spelling (hyphens <->
    underscores), the given spellings first."""
    spellings = []
    for option in option_strings:
        candidates = [option]
        if option.startswith("--"):
            candidates += ["--" + option[2:].replace("_", "-"), "--" + option[2:].replace("-", "_")]
        for candidate in candidates:
            if candidate not in spellings:
                spellings.append(candidate)
    return spellings


def given_options(arguments: list[str]) -> set[str]:
    """The options a command line gives, by destination name (`--learning-rate 1` and `--learning_rate=1` give
    "learning_rate")."""
    return {_spelling_key(a.split("=", 1)[0]) for a in arguments if a.startswith("--")}


def add_option(container, *option_strings: str, **kwargs) -> argparse.Action:
    """`container.add_argument`, accepting both spellings of each option of several words."""
    return container.add_argument(*both_spellings(*option_strings), **kwargs)


class HelpFormatter(argparse.HelpFormatter):
    """Lists an option under its first spelling only: `--max-new-tokens`, not also `--max_new_tokens`
    (TrainingArguments fields come with both spellings, underscores first)."""

    def _format_action_invocation(self, action):
        seen, distinct = set(), []
        for option in action.option_strings:
            if _spelling_key(option) not in seen:
                seen.add(_spelling_key(option))
                distinct.append(option)
        if len(distinct) < len(action.option_strings):
            action = copy.copy(action)
            action.option_strings = distinct
        return super()._format_action_invocation(action)

    def _fill_text(self, text, width, indent):
        # Option names stay whole: no line break inside --block-size.
        return textwrap.fill(" ".join(text.split()), width, initial_indent=indent, subsequent_indent=indent,
                             break_on_hyphens=False)


def unknown_options(parser: argparse.ArgumentParser, arguments: list[str]) -> list[str]:
    """The `--options` among `arguments` that `parser` does not know, each with the closest one it knows:
    ["--promt (did you mean --prompt?)"]. A prefix of a known option counts as known where the parser
    accepts abbreviations (argparse then resolves it, or refuses it as ambiguous)."""
    known = [option for action in parser._actions for option in action.option_strings]
    refused = []
    for token in arguments:
        if token == "--":  # everything after it is positional
            break
        if not token.startswith("--") or " " in token:  # argparse too reads "--a b" as a positional value
            continue
        name = token.split("=", 1)[0]
        if name in known or (parser.allow_abbrev and any(option.startswith(name) for option in known)):
            continue
        closest = difflib.get_close_matches(name, known, n=1)
        refused.append(f"{name} (did you mean {closest[0]}?)" if closest else name)
    return refused


def refuse_unknown_options(parser: argparse.ArgumentParser, arguments: list[str]) -> None:
    """Exit with status 2 and one line naming each unknown option and its closest valid one, before argparse
    parses (which would complain about a missing required option first, or print a long usage)."""
    refused = unknown_options(parser, arguments)
    if refused:
        parser.exit(2, f"{parser.prog}: error: unrecognized arguments: {', '.join(refused)}\n")


def _subparser(subparsers, name: str, **kwargs) -> argparse.ArgumentParser:
    return subparsers.add_parser(name, formatter_class=HelpFormatter, **kwargs)


def _add_allow_pickle(parser) -> None:
    add_option(parser, "--allow-pickle", action="store_true",
               help="accept checkpoints whose only weights are pickle files (pytorch_model.bin), which can run code")


def _add_max_shard_size(parser) -> None:
    default = library_choices().DEFAULT_MAX_SHARD_SIZE
    add_option(parser, "--max-shard-size", default=default, help=f"largest safetensors shard (default {default})")


def _add_overwrite(parser) -> None:
    add_option(parser, "--overwrite", action="store_true", help="replace a non-empty OUT")


def _add_memory_placement(parser) -> None:
    placements = library_choices().MEMORY_PLACEMENTS
    add_option(
        parser, "--memory-placement", choices=placements, metavar="PLACEMENT",
        help=f"where the memory tables live: {_choices(placements)} (default device, beside the model); host: in RAM; "
             "disk: a working copy in --memory-offload-dir, so tables may be larger than RAM (docs/placement.md)",
    )
    add_option(
        parser, "--memory-offload-dir", metavar="DIR",
        help="with --memory-placement disk: folder for the tables' working copies (scratch, not a checkpoint; it needs "
             "room for every table)",
    )


def check_memory_placement(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Exit with status 2 when --memory-placement and --memory-offload-dir do not go together."""
    placement, folder = getattr(args, "memory_placement", None), getattr(args, "memory_offload_dir", None)
    if placement == "disk" and folder is None:
        parser.error("--memory-placement disk needs --memory-offload-dir DIR, the folder for the tables' working copies.")
    if folder is not None and not folder.strip():
        parser.error("--memory-offload-dir is empty: name the folder for the tables' working copies.")
    if folder is not None and placement != "disk":
        parser.error("--memory-offload-dir is used only with --memory-placement disk: add that, or drop --memory-offload-dir.")


def _choices(names) -> str:
    return ", ".join(names[:-1]) + f" or {names[-1]}"


ADAPTER_NOTE = "an adapter folder written by `memory-llama train` in a LoRA mode also works"


# ---- the commands' arguments --------------------------------------------------------------------


def _add_info(subparsers):
    parser = _subparser(subparsers, "info", help="memory layout and parameter counts of a checkpoint")
    parser.add_argument("checkpoint", help=f"a MemoryLlama checkpoint folder or a Hub id (owner/name); {ADAPTER_NOTE}")


def _add_generate(subparsers):
    parser = _subparser(
        subparsers, "generate", help="generate text from a checkpoint",
        description="Generate a continuation of --prompt. CHECKPOINT may also be a plain Llama checkpoint or a .gguf "
                    "file: that generates with the base model, without memory.",
    )
    parser.add_argument("checkpoint", help=f"a checkpoint folder, a .gguf file, or a Hub id (owner/name); {ADAPTER_NOTE}")
    add_option(parser, "--prompt", required=True)
    add_option(parser, "--max-new-tokens", type=int, default=32)
    add_option(parser, "--sample", action="store_true", help="sample instead of greedy decoding")
    add_option(parser, "--temperature", type=float, default=1.0)
    add_option(parser, "--num-beams", type=int, default=1)
    add_option(parser, "--seed", type=int, default=0)
    _add_memory_placement(parser)
    _add_allow_pickle(parser)


def _add_demo(subparsers):
    _subparser(subparsers, "demo", help="the main demo on the offline SmolLM2-135M checkpoint (no arguments)")


def _add_graft(subparsers):
    presets = library_choices().GRAFT_PRESETS
    parser = _subparser(
        subparsers, "graft",
        help=f"graft memory ({MEMORY_KINDS}) onto a Llama-family checkpoint; OUT computes what BASE computes "
             "until trained",
        description="Graft memory onto BASE and write a MemoryLlama checkpoint to OUT, verified against BASE.",
    )
    parser.add_argument("base", help="a Hugging Face checkpoint directory, a .gguf file, or a Hub id (owner/name)")
    parser.add_argument("out", help="output directory (written through a temporary directory beside it)")
    add_option(parser, "--preset", default="both", choices=presets, metavar="PRESET",
               help=f"{_choices(presets)}: which memory, sized for the base (default both: Engram and chapter memory; "
                    "pkm: product-key memory; all: the three)")
    add_option(parser, "--memory-config", metavar="FILE", help="JSON object of memory fields, applied over the preset")
    add_option(
        parser, "--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
        help="a memory field, applied last; VALUE is read as JSON when it parses (e.g. --set 'engram_layers=[1,5]', "
             "quoted for shells such as zsh)",
    )
    add_option(parser, "--dtype", default="auto", help="auto (the base's; float32 for GGUF), float32, bfloat16, float16")
    add_option(parser, "--tokenizer", help="tokenizer to use instead of the one shipped with BASE")
    add_option(parser, "--revision", help="Hub revision when BASE is a Hub id")
    _add_max_shard_size(parser)
    add_option(parser, "--tolerance", type=float, default=1e-4, help="largest |logit difference| accepted (default 1e-4)")
    _add_allow_pickle(parser)
    _add_overwrite(parser)
    add_option(parser, "--dry-run", action="store_true", help="print the plan (new parameters, bytes, layers); write nothing")


def _add_export(subparsers):
    parser = _subparser(
        subparsers, "export", help="write a Hub-ready copy that loads with trust_remote_code=True without this package"
    )
    parser.add_argument("checkpoint", help="a MemoryLlama checkpoint directory or a Hub id (owner/name); an adapter "
                                           "folder written by `memory-llama train` is merged into its base first")
    parser.add_argument("out", help="output directory (written through a temporary directory beside it)")
    add_option(parser, "--repo-id", help="the Hub id the model card's loading snippets name (default: OUT's name)")
    _add_max_shard_size(parser)
    _add_allow_pickle(parser)
    _add_overwrite(parser)


def _add_merge(subparsers):
    parser = _subparser(
        subparsers, "merge", help="merge a LoRA adapter written by `memory-llama train` into its base: a plain checkpoint",
        description="Merge the LoRA weights of ADAPTER into the base model it names (PEFT's merge_and_unload), with the "
                    "memory trained beside the adapter, and write a plain MemoryLlama checkpoint to OUT, verified "
                    "against the adapter model.",
    )
    parser.add_argument("adapter", help="an adapter folder written by `memory-llama train --mode lora` (or lora_all)")
    parser.add_argument("out", help="output directory (written through a temporary directory beside it)")
    _add_max_shard_size(parser)
    _add_allow_pickle(parser)
    _add_overwrite(parser)


def _add_push(subparsers):
    parser = _subparser(
        subparsers, "push", help="export a checkpoint (as `export` does) and upload it to the Hugging Face Hub"
    )
    parser.add_argument("checkpoint", help="a MemoryLlama checkpoint directory (an adapter folder is merged first)")
    parser.add_argument("repo_id", help="Hub repository, e.g. your-name/my-memory-llama (created if missing)")
    add_option(parser, "--private", action="store_true", help="create the repository as private")
    add_option(parser, "--revision", help="branch to push to (created if missing)")
    add_option(parser, "--create-pr", action="store_true", help="open a pull request instead of committing")
    add_option(parser, "--commit-message", help="commit message")
    _add_max_shard_size(parser)
    _add_allow_pickle(parser)


TRAIN_USAGE = "memory-llama train MODEL (--data PATH | --knowledge-entities N) [options]"
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
    choices = library_choices()
    parser.add_argument("model", help="a MemoryLlama checkpoint folder, a Llama one together with --graft, or an "
                                      "adapter folder of an earlier run (merged into its base first)")
    add_option(parser, "--graft", choices=choices.GRAFT_PRESETS, metavar="PRESET",
               help=f"graft memory onto a Llama checkpoint first: {_choices(choices.GRAFT_PRESETS)} (as `graft --preset`)")
    add_option(parser, "--data", help="training text: a .txt/.json/.jsonl/.parquet file or folder, or a Hub dataset name")
    add_option(parser, "--text-column", default="text", help="column holding the documents (json/parquet)")
    _add_knowledge_arguments(parser, "train on")
    add_option(parser, "--knowledge-statements", type=int, default=3, choices=[1, 2, 3], help="training statements per fact")
    add_option(parser, "--knowledge-questions", type=int, default=2, choices=[0, 1, 2],
               help="training question-answer pairs per fact (worded unlike the held-out probes)")
    add_option(parser, "--block-size", type=int, default=256,
               help="tokens per packed training row (documents packed together never read each other; "
                    "default 256, 64 with --mode sparse_memory)")
    add_option(parser, "--mode", choices=choices.TRAINING_MODES, default="full", metavar="MODE",
               help=f"training mode: {_choices(choices.TRAINING_MODES)} (default full; see README, 'Training modes')")
    add_option(parser, "--sparse-memory-top-t", type=int, metavar="T",
               help="sparse_memory mode: rows trained per memory table, the top T by TF-IDF (default 16000); the mode also "
                    "changes the defaults of --learning_rate (0.3), --num_train_epochs (10), --per_device_train_batch_size "
                    "(8), --lr_scheduler_type (constant_with_warmup, 5 steps) and --block-size (64)")
    add_option(parser, "--background-data", metavar="PATH",
               help="sparse_memory mode: background text the slots are ranked against (default: the offline natural text)")
    add_option(parser, "--background-rows", type=int, metavar="N",
               help="sparse_memory mode: background rows of --block-size tokens counted (default 256)")
    add_option(parser, "--lora-r", type=int, default=16, help="LoRA rank (lora modes)")
    add_option(parser, "--lora-alpha", type=int, default=32, help="LoRA alpha (lora modes)")
    add_option(parser, "--lora-dropout", type=float, default=0.0, help="LoRA dropout (lora modes)")
    _add_memory_placement(parser)
    _add_allow_pickle(parser)
    add_option(parser, "--overwrite", action="store_true", help="replace a non-empty --output_dir (the previous run in it is deleted)")
    add_option(parser, "--help-training", action=_PrintTrainingArgumentsHelp, help="list every TrainingArguments field and exit")


def _add_train(subparsers):
    parser = _subparser(
        subparsers, "train",
        help=f"fine-tune with MemoryTrainer (modes: {', '.join(library_choices().TRAINING_MODES)}); "
             "TrainingArguments pass through",
        usage=TRAIN_USAGE,
        description=TRAIN_DESCRIPTION,
        epilog=TRAIN_EPILOG,
        allow_abbrev=False,  # TrainingArguments has ~120 options: no prefix guessing
    )
    add_train_arguments(parser)


def add_training_arguments_fields(parser: argparse.ArgumentParser) -> None:
    """Every MemoryTrainingArguments field, as HfArgumentParser adds them (`--learning_rate` and `--learning-rate`).
    Imports transformers."""
    import dataclasses
    import typing

    from transformers import HfArgumentParser

    from modeling_memory.training.trainer import MemoryTrainingArguments

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
    """The whole `train` command line: its own options and every TrainingArguments field (imports transformers)."""
    parser = argparse.ArgumentParser(
        prog="memory-llama train", usage=TRAIN_USAGE, description=TRAIN_DESCRIPTION, epilog=TRAIN_EPILOG,
        formatter_class=HelpFormatter, allow_abbrev=False,  # ~120 TrainingArguments options: no prefix guessing
    )
    add_train_arguments(parser)
    add_training_arguments_fields(parser)
    return parser


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help=f"a MemoryLlama checkpoint folder; {ADAPTER_NOTE}")
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
    _add_memory_placement(parser)
    _add_allow_pickle(parser)


def _add_eval(subparsers):
    parser = _subparser(subparsers, "eval", help="perplexity on text and exact-match recall on knowledge probes")
    add_eval_arguments(parser)


COMMANDS = (_add_demo, _add_info, _add_generate, _add_graft, _add_export, _add_merge, _add_push, _add_train, _add_eval)


def build_parser() -> argparse.ArgumentParser:
    """The `memory-llama` parser with every command's subparser (standard library only)."""
    parser = argparse.ArgumentParser(
        prog="memory-llama",
        description=f"MemoryLlama: Llama with learnt memory ({MEMORY_KINDS}).",
        epilog=SPELLING_NOTE,
        formatter_class=HelpFormatter,
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS:
        add(subparsers)
    return parser


def command_parser(parser: argparse.ArgumentParser, argv: list[str]) -> tuple[str, argparse.ArgumentParser] | None:
    """(name, subparser) of the command `argv` names (its first word that is not an option), or None."""
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    first_word = next((word for word in argv if not word.startswith("-")), None)
    if first_word not in subparsers.choices:
        return None
    return first_word, subparsers.choices[first_word]


__all__ = [
    "HelpFormatter",
    "SPELLING_NOTE",
    "TRAIN_DESCRIPTION",
    "TRAIN_EPILOG",
    "TRAIN_USAGE",
    "add_eval_arguments",
    "add_option",
    "add_train_arguments",
    "add_training_arguments_fields",
    "both_spellings",
    "build_parser",
    "build_train_parser",
    "check_memory_placement",
    "command_parser",
    "library_choices",
    "refuse_unknown_options",
    "unknown_options",
]
