"""`memory-llama`: the command line. Each subcommand is a function `cmd_<name>(args)`; `main` wires
them to argparse.

Building the parser imports nothing beyond the standard library, so `--help` and argument errors
answer at once; each command imports what it needs when it runs. `train` passes every
TrainingArguments field through: its subparser knows only the options of its own (fast help and
errors), and `cmd_train` parses the whole line again with TrainingArguments imported.

Options of several words are accepted with hyphens or underscores (`--max-new-tokens` or
`--max_new_tokens`); help lists the first spelling.
"""

import argparse
import copy
import os
import sys
import textwrap

SPELLING_NOTE = (
    "Options of several words may be spelt with hyphens or underscores: --block-size or --block_size, "
    "--output_dir or --output-dir."
)


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


def fail(command: str, message: str):
    """Exit with status 1 and one line on stderr: `memory-llama COMMAND: error: MESSAGE`."""
    raise SystemExit(f"memory-llama {command}: error: {message}")


# ---- checkpoints named on the command line -------------------------------------------------------


def _looks_like_hub_id(text: str) -> bool:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if text.startswith((".", "/", "~")) or text.count("/") > 1 or text.lower().endswith(".gguf"):
        return False
    try:
        validate_repo_id(text)
    except HFValidationError:
        return False
    return True


def checkpoint_kind(checkpoint: str, command: str) -> str:
    """What CHECKPOINT names: "folder" (a Hugging Face checkpoint folder), "gguf" (a .gguf file) or "hub"
    (a Hub id); anything else ends the command with a message saying what to pass instead."""
    path = os.path.expanduser(checkpoint)
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            fail(command, f"{checkpoint} has no config.json, so it is not a checkpoint folder: pass the folder that "
                          "save_pretrained wrote (config.json and weights).")
        return "folder"
    if os.path.isfile(path):
        if not path.lower().endswith(".gguf"):
            fail(command, f"{checkpoint} is a file: pass the checkpoint folder holding it (config.json and weights), "
                          "or a .gguf file.")
        try:
            with open(path, "rb") as handle:
                magic = handle.read(4)
        except OSError as error:
            fail(command, f"cannot read {checkpoint}: {error}")
        if magic != b"GGUF":
            fail(command, f"{checkpoint} is not a GGUF file (it does not start with the GGUF magic bytes): "
                          "is the download complete?")
        return "gguf"
    if not _looks_like_hub_id(checkpoint):
        fail(command, f"{checkpoint}: no such file or folder. Pass a checkpoint folder, a .gguf file or a Hub id.")
    return "hub"


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _load_failure(checkpoint: str, kind: str, what: str, error: BaseException) -> str:
    if kind == "hub":
        return f"{checkpoint}: no such file or folder, and loading it as a Hub id failed: {_first_line(error)}"
    return f"cannot load the {what} of {checkpoint}: {_first_line(error)}"


def _gguf_location(checkpoint: str) -> tuple[str, dict]:
    """(folder, from_pretrained keyword arguments) of a .gguf file, as transformers loads it."""
    path = os.path.abspath(os.path.expanduser(checkpoint))
    return os.path.dirname(path), {"gguf_file": os.path.basename(path)}


# ---- commands -----------------------------------------------------------------------------------


def _add_info(subparsers):
    parser = _subparser(subparsers, "info", help="memory layout and parameter counts of a checkpoint")
    parser.add_argument("checkpoint", help="a MemoryLlama checkpoint folder (or Hub id when online)")
    parser.set_defaults(func=cmd_info)


def cmd_info(args) -> int:
    kind = checkpoint_kind(args.checkpoint, "info")
    from transformers import AutoConfig

    from modeling_memory import MemoryLlamaConfig  # noqa: F401  (registers memory_llama with the Auto classes)
    from modeling_memory.summary import build_on_meta, memory_layout, parameter_counts

    location, gguf = _gguf_location(args.checkpoint) if kind == "gguf" else (args.checkpoint, {})
    try:
        config = AutoConfig.from_pretrained(location, **gguf)
    except (OSError, ValueError, KeyError) as error:
        fail("info", _load_failure(args.checkpoint, kind, "config", error))
    if config.model_type != "memory_llama":
        what = "a GGUF file holding a plain" if kind == "gguf" else "a plain"
        fail("info", f"{args.checkpoint} is {what} {config.model_type!r} checkpoint ({config.num_hidden_layers} layers, "
                     f"hidden size {config.hidden_size}) without memory: graft memory onto it first "
                     f"(`memory-llama graft {args.checkpoint} OUT`, or MemoryLlamaForCausalLM.from_llama), "
                     "then run `memory-llama info OUT`.")
    print(memory_layout(config))
    counts = parameter_counts(build_on_meta(config))
    width = max(len(k) for k in counts)
    for key, value in counts.items():
        print(f"{key.replace('_', ' '):<{width}}  {value:>15,}")
    return 0


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
    parser.set_defaults(func=cmd_generate)


def cmd_generate(args) -> int:
    if args.max_new_tokens < 1:
        fail("generate", "--max-new-tokens must be >= 1.")
    if args.num_beams < 1:
        fail("generate", "--num-beams must be >= 1.")
    if args.sample and not args.temperature > 0:
        fail("generate", "--temperature must be > 0 with --sample.")
    kind = checkpoint_kind(args.checkpoint, "generate")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from modeling_memory import MemoryLlamaConfig  # noqa: F401  (registers memory_llama with the Auto classes)

    location, gguf = _gguf_location(args.checkpoint) if kind == "gguf" else (args.checkpoint, {})
    if kind == "gguf":
        print(f"{args.checkpoint} is a GGUF file: generating with its plain base model (no memory).", file=sys.stderr)
    try:
        tokenizer = AutoTokenizer.from_pretrained(location, **gguf)
    except (OSError, ValueError, TypeError, KeyError) as error:
        hint = "" if kind == "hub" else "; save the tokenizer next to the model (tokenizer.save_pretrained)"
        fail("generate", _load_failure(args.checkpoint, kind, "tokenizer", error) + hint)
    try:
        model = AutoModelForCausalLM.from_pretrained(location, dtype=torch.float32, **gguf).eval()
    except (OSError, ValueError, KeyError) as error:
        fail("generate", _load_failure(args.checkpoint, kind, "model", error))
    inputs = tokenizer(args.prompt, return_tensors="pt")
    if inputs["input_ids"].shape[1] == 0:
        fail("generate", "--prompt gives no tokens: pass some text.")
    torch.manual_seed(args.seed)
    output = model.generate(
        **inputs,
        max_new_tokens=args.max_new_tokens,
        do_sample=args.sample,
        temperature=args.temperature if args.sample else None,
        num_beams=args.num_beams,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
    )
    print(tokenizer.decode(output[0][inputs["input_ids"].shape[1] :], skip_special_tokens=True))
    return 0


def _add_demo(subparsers):
    parser = _subparser(subparsers, "demo", help="the main demo on the offline SmolLM2-135M checkpoint (no arguments)")
    parser.set_defaults(func=cmd_demo)


def cmd_demo(args) -> int:
    from modeling_memory.demo import run_demo

    return run_demo()


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
    add_option(parser, "--max-shard-size", default="5GB", help="largest safetensors shard (default 5GB)")
    add_option(parser, "--tolerance", type=float, default=1e-4, help="largest |logit difference| accepted (default 1e-4)")
    add_option(parser, "--allow-pickle", action="store_true", help="accept pickle-only weights (pytorch_model.bin)")
    add_option(parser, "--overwrite", action="store_true", help="replace a non-empty OUT")
    add_option(parser, "--dry-run", action="store_true", help="print the plan (new parameters, bytes, layers); write nothing")
    parser.set_defaults(func=cmd_graft)


def cmd_graft(args) -> int:
    from modeling_memory.graft_checkpoint import GraftError, graft_checkpoint, sigterm_raises_keyboard_interrupt

    try:
        with sigterm_raises_keyboard_interrupt():
            graft_checkpoint(
                args.base,
                args.out,
                preset=args.preset,
                memory_json=args.memory_config,
                overrides=args.overrides,
                dtype=args.dtype,
                tokenizer=args.tokenizer,
                allow_pickle=args.allow_pickle,
                overwrite=args.overwrite,
                dry_run=args.dry_run,
                max_shard_size=args.max_shard_size,
                tolerance=args.tolerance,
                revision=args.revision,
            )
    except GraftError as error:
        raise SystemExit(f"memory-llama graft: error: {error}") from error
    return 0


def _add_export(subparsers):
    parser = _subparser(
        subparsers, "export", help="write a Hub-ready copy that loads with trust_remote_code=True without this package"
    )
    parser.add_argument("checkpoint", help="a MemoryLlama checkpoint directory (or Hub id when online)")
    parser.add_argument("out", help="output directory (written through a temporary directory beside it)")
    add_option(parser, "--repo-id", help="the Hub id the model card's loading snippets name (default: OUT's name)")
    add_option(parser, "--max-shard-size", default="5GB", help="largest safetensors shard (default 5GB)")
    add_option(parser, "--overwrite", action="store_true", help="replace a non-empty OUT")
    parser.set_defaults(func=cmd_export)


def cmd_export(args) -> int:
    from modeling_memory.graft_checkpoint import GraftError, sigterm_raises_keyboard_interrupt
    from modeling_memory.hub_export import export_for_hub

    try:
        with sigterm_raises_keyboard_interrupt():
            result = export_for_hub(
                args.checkpoint, args.out, overwrite=args.overwrite, max_shard_size=args.max_shard_size, model_id=args.repo_id
            )
    except GraftError as error:  # ExportError included
        raise SystemExit(f"memory-llama export: error: {error}") from error
    print(f"loads without the package: max |logit difference| {result.max_abs_logit_diff:.3g}")
    print(f"wrote {result.out}: {', '.join(result.files)}")
    return 0


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
    add_option(parser, "--max-shard-size", default="5GB", help="largest safetensors shard (default 5GB)")
    parser.set_defaults(func=cmd_push)


def cmd_push(args) -> int:
    from modeling_memory.graft_checkpoint import GraftError, sigterm_raises_keyboard_interrupt
    from modeling_memory.hub_export import push_checkpoint

    try:
        with sigterm_raises_keyboard_interrupt():
            commit = push_checkpoint(
                args.checkpoint,
                args.repo_id,
                commit_message=args.commit_message,
                private=True if args.private else None,
                revision=args.revision,
                create_pr=args.create_pr,
                max_shard_size=args.max_shard_size,
            )
    except GraftError as error:  # ExportError included
        raise SystemExit(f"memory-llama push: error: {error}") from error
    print(f"pushed to {commit.commit_url}")
    if commit.pr_url:
        print(f"pull request: {commit.pr_url}")
    return 0


def _add_train(subparsers):
    from modeling_memory.training_cli import TRAIN_DESCRIPTION, TRAIN_EPILOG, add_train_arguments

    parser = _subparser(
        subparsers, "train",
        help="fine-tune with MemoryTrainer (modes: full, memory_only, lora, lora_all); TrainingArguments pass through",
        description=TRAIN_DESCRIPTION,
        epilog=TRAIN_EPILOG,
        allow_abbrev=False,  # TrainingArguments has ~120 options: no prefix guessing
    )
    add_train_arguments(parser)
    parser.set_defaults(func=cmd_train)


def cmd_train(args) -> int:
    from modeling_memory.training_cli import parse_train_command_line, run_train

    return run_train(parse_train_command_line(args.command_line))


def _add_eval(subparsers):
    from modeling_memory.training_cli import add_eval_arguments

    parser = _subparser(subparsers, "eval", help="perplexity on text and exact-match recall on knowledge probes")
    add_eval_arguments(parser)
    parser.set_defaults(func=cmd_eval)


def cmd_eval(args) -> int:
    from modeling_memory.training_cli import run_eval

    return run_eval(args)


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


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args, unrecognized = parser.parse_known_args(argv)
    if args.command == "train":
        # The options `train` leaves unrecognised are TrainingArguments fields: cmd_train parses the
        # whole line again with them (and refuses what is still unknown).
        args.command_line = argv[argv.index("train") + 1 :]
    elif unrecognized:
        parser.error(f"unrecognized arguments: {' '.join(unrecognized)}")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
