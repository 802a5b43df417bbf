"""`memory-llama`: the command line of MemoryLlama, a package of its own that the library never imports.

- `memory_llama_cli.parser`: every command's arguments, standard library only (fast `--help` and errors).
- `memory_llama_cli` (this module): `main`, the entry point; it imports a command's implementation only when
  the command runs.
- `memory_llama_cli.commands`: `cmd_<name>(args)` for each command; `train_command`: `train` and `eval`.

Bad input ends a command with one line and status 1 (a ToolError), argument errors with one line or argparse's
usage and status 2, and an interrupted command (Ctrl-C, or SIGTERM, which interrupts it the same way) with one
line and status 130, after it has removed what it was writing.
"""

import sys

from memory_llama_cli.parser import build_parser, check_memory_placement, command_parser, refuse_unknown_options

INTERRUPTED_STATUS = 130  # 128 + SIGINT, as shells report an interrupted program
# Packages that only the extras install (pyproject.toml): a command that needs one says which install adds it.
EXTRA_PACKAGES = {"accelerate", "datasets", "evaluate", "gguf", "jinja2", "matplotlib", "peft"}


def run_command(args) -> int:
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
    except ModuleNotFoundError as error:
        if error.name not in EXTRA_PACKAGES:
            raise
        raise SystemExit(
            f"memory-llama {args.command}: error: needs the package {error.name}, which the core install leaves out: "
            "pip install 'modeling_memory[all]'"
        ) from error


def main(argv=None) -> int:
    """The `memory-llama` entry point: parse `argv` (default: the process's arguments) and run the command."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    command = command_parser(parser, argv)
    # `train`'s own subparser does not know the TrainingArguments fields: its command checks the whole line.
    if command is not None and command[0] != "train":
        refuse_unknown_options(command[1], argv[argv.index(command[0]) + 1 :])
    args, unrecognized = parser.parse_known_args(argv)
    if args.command == "train":
        # The options `train` leaves unrecognised are TrainingArguments fields: the command parses the
        # whole line again with them (and refuses what is still unknown).
        args.command_line = argv[argv.index("train") + 1 :]
    elif unrecognized:
        parser.error(f"unrecognized arguments: {' '.join(unrecognized)}")
    check_memory_placement(command[1], args)
    try:
        return run_command(args)
    except KeyboardInterrupt as interrupt:
        # Ctrl-C, or SIGTERM (sigterm_as_interrupt names the signal); the command has cleaned up on its way out.
        print(f"memory-llama {args.command}: interrupted ({str(interrupt) or 'Ctrl-C'})", file=sys.stderr)
        raise SystemExit(INTERRUPTED_STATUS) from None


__all__ = ["build_parser", "main", "run_command"]
