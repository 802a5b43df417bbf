"""`memory-llama`: the command line's parser and entry point.

This module sits beside the `modeling_memory` package rather than in it: importing the package registers
the model with transformers' Auto classes, which imports torch and transformers (seconds). Building the
parser here imports only the standard library, so `--help` and argument errors answer at once; a command
imports its implementation (`memory_llama_cli.commands.cmd_<name>`) only when it runs.

`train` passes every TrainingArguments field through: its subparser knows only the options of its own (fast
help and errors), and the command parses the whole line again with TrainingArguments imported.

Options of several words are accepted with hyphens or underscores (`--max-new-tokens` or
`--max_new_tokens`); help lists the first spelling.
"""

import argparse
import copy
import sys
import textwrap

SPELLING_NOTE = (
    "Options of several words may be spelt with hyphens or underscores: --block-size or --block_size, "
    "--output_dir or --output-dir."
)
# peft_modes.TRAINING_MODES and grafting.PRESETS, spelt out so that building the parser imports neither
# torch nor PEFT (a test checks that they agree).
TRAINING_MODES = ("full", "memory_only", "lora", "lora_all", "sparse_memory")
GRAFT_PRESETS = ("engram", "chapters", "both", "pkm", "all")
DEFAULT_MAX_SHARD_SIZE = "5GB"  # safe_write.DEFAULT_MAX_SHARD_SIZE (checked by the same test)


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


def _subparser(subparsers, name: str, **kwargs) -> argparse.ArgumentParser:
    return subparsers.add_parser(name, formatter_class=HelpFormatter, **kwargs)


def _add_allow_pickle(parser) -> None:
    add_option(parser, "--allow-pickle", action="store_true",
               help="accept checkpoints whose only weights are pickle files (pytorch_model.bin), which can run code")


def _add_max_shard_size(parser) -> None:
    add_option(parser, "--max-shard-size", default=DEFAULT_MAX_SHARD_SIZE,
               help=f"largest safetensors shard (default {DEFAULT_MAX_SHARD_SIZE})")


# ---- the commands' arguments --------------------------------------------------------------------


def _add_info(subparsers):
    parser = _subparser(subparsers, "info", help="memory layout and parameter counts of a checkpoint")
    parser.add_argument("checkpoint", help="a MemoryLlama checkpoint folder (or Hub id when online)")


def _add_generate(subparsers):
    parser = _subparser(
        subparsers, "generate", help="generate text from a checkpoint",
        description="Generate a continuation of --prompt. CHECKPOINT may also be a plain Llama checkpoint or a .gguf "
                    "file: that generates with the base model, without memory.",
    )
    parser.add_argument("checkpoint", help="a checkpoint folder, a .gguf file, or a Hub id when online")
    add_option(parser, "--prompt", required=True)
    add_option(parser, "--max-new-tokens", type=int, default=32)
    add_option(parser, "--sample", action="store_true", help="sample instead of greedy decoding")
    add_option(parser, "--temperature", type=float, default=1.0)
    add_option(parser, "--num-beams", type=int, default=1)
    add_option(parser, "--seed", type=int, default=0)
    _add_allow_pickle(parser)


def _add_demo(subparsers):
    _subparser(subparsers, "demo", help="the main demo on the offline SmolLM2-135M checkpoint (no arguments)")


def _add_graft(subparsers):
    parser = _subparser(
        subparsers, "graft",
        help="graft memory onto a Llama-family checkpoint; OUT computes what BASE computes until trained",
        description="Graft memory onto BASE and write a MemoryLlama checkpoint to OUT, verified against BASE.",
    )
    parser.add_argument("base", help="a Hugging Face checkpoint directory, a .gguf file, or a Hub id")
    parser.add_argument("out", help="output directory (written through a temporary directory beside it)")
    add_option(parser, "--preset", default="both", help="engram, chapters, both (default), pkm or all, sized for the base")
    add_option(parser, "--memory-config", metavar="FILE", help="JSON object of memory fields, applied over the preset")
    add_option(
        parser, "--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
        help="a memory field, applied last; VALUE is read as JSON when it parses (e.g. --set engram_layers=[1,5])",
    )
    add_option(parser, "--dtype", default="auto", help="auto (the base's; float32 for GGUF), float32, bfloat16, float16")
    add_option(parser, "--tokenizer", help="tokenizer to use instead of the one shipped with BASE")
    add_option(parser, "--revision", help="Hub revision when BASE is a Hub id")
    _add_max_shard_size(parser)
    add_option(parser, "--tolerance", type=float, default=1e-4, help="largest |logit difference| accepted (default 1e-4)")
    _add_allow_pickle(parser)
    add_option(parser, "--overwrite", action="store_true", help="replace a non-empty OUT")
    add_option(parser, "--dry-run", action="store_true", help="print the plan (new parameters, bytes, layers); write nothing")


def _add_export(subparsers):
    parser = _subparser(
        subparsers, "export", help="write a Hub-ready copy that loads with trust_remote_code=True without this package"
    )
    parser.add_argument("checkpoint", help="a MemoryLlama checkpoint directory (or Hub id when online)")
    parser.add_argument("out", help="output directory (written through a temporary directory beside it)")
    add_option(parser, "--repo-id", help="the Hub id the model card's loading snippets name (default: OUT's name)")
    _add_max_shard_size(parser)
    _add_allow_pickle(parser)
    add_option(parser, "--overwrite", action="store_true", help="replace a non-empty OUT")


def _add_push(subparsers):
    parser = _subparser(
        subparsers, "push", help="export a checkpoint (as `export` does) and upload it to the Hugging Face Hub"
    )
    parser.add_argument("checkpoint", help="a MemoryLlama checkpoint directory")
    parser.add_argument("repo_id", help="Hub repository, e.g. your-name/my-memory-llama (created if missing)")
    add_option(parser, "--private", action="store_true", help="create the repository as private")
    add_option(parser, "--revision", help="branch to push to (created if missing)")
    add_option(parser, "--create-pr", action="store_true", help="open a pull request instead of committing")
    add_option(parser, "--commit-message", help="commit message")
    _add_max_shard_size(parser)
    _add_allow_pickle(parser)


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
        from memory_llama_cli.train_command import build_train_parser

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
    add_option(parser, "--sparse-memory-top-t", type=int, metavar="T",
               help="sparse_memory mode: rows trained per memory table, the top T by TF-IDF (default 16000)")
    add_option(parser, "--background-data", metavar="PATH",
               help="sparse_memory mode: background text the slots are ranked against (default: the offline natural text)")
    add_option(parser, "--background-rows", type=int, metavar="N",
               help="sparse_memory mode: background rows of --block-size tokens counted (default 256)")
    add_option(parser, "--lora-r", type=int, default=16, help="LoRA rank (lora modes)")
    add_option(parser, "--lora-alpha", type=int, default=32, help="LoRA alpha (lora modes)")
    add_option(parser, "--lora-dropout", type=float, default=0.0, help="LoRA dropout (lora modes)")
    _add_allow_pickle(parser)
    add_option(parser, "--overwrite", action="store_true", help="replace a non-empty --output_dir (the previous run in it is deleted)")
    add_option(parser, "--help-training", action=_PrintTrainingArgumentsHelp, help="list every TrainingArguments field and exit")


def _add_train(subparsers):
    parser = _subparser(
        subparsers, "train",
        help="fine-tune with MemoryTrainer (modes: full, memory_only, lora, lora_all); TrainingArguments pass through",
        description=TRAIN_DESCRIPTION,
        epilog=TRAIN_EPILOG,
        allow_abbrev=False,  # TrainingArguments has ~120 options: no prefix guessing
    )
    add_train_arguments(parser)


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
    _add_allow_pickle(parser)


def _add_eval(subparsers):
    parser = _subparser(subparsers, "eval", help="perplexity on text and exact-match recall on knowledge probes")
    add_eval_arguments(parser)


# ---- entry point --------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="memory-llama",
        description="MemoryLlama: Llama with learnt memory (chapter memory and Engram).",
        epilog=SPELLING_NOTE,
        formatter_class=HelpFormatter,
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_demo, _add_info, _add_generate, _add_graft, _add_export, _add_push, _add_train, _add_eval):
        add(subparsers)
    return parser


def run_command(args: argparse.Namespace) -> int:
    """Run `memory_llama_cli.commands.cmd_<command>`. A ToolError (bad input; the message says how to fix it) ends
    the command with one line on stderr and status 1; SIGTERM interrupts it like Ctrl-C, so the command
    removes what it was writing."""
    from memory_llama_cli import commands
    from modeling_memory.tools.errors import ToolError
    from modeling_memory.tools.safe_write import sigterm_as_interrupt

    try:
        with sigterm_as_interrupt():
            return getattr(commands, f"cmd_{args.command}")(args)
    except ToolError as error:
        raise SystemExit(f"memory-llama {args.command}: error: {error}") from error


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args, unrecognized = parser.parse_known_args(argv)
    if args.command == "train":
        # The options `train` leaves unrecognised are TrainingArguments fields: the command parses the
        # whole line again with them (and refuses what is still unknown).
        args.command_line = argv[argv.index("train") + 1 :]
    elif unrecognized:
        parser.error(f"unrecognized arguments: {' '.join(unrecognized)}")
    return run_command(args)


if __name__ == "__main__":
    sys.exit(main())
