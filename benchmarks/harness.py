"""What every benchmark uses: timings taken side by side, the machine, the command line, and the writer of
benchmarks/RESULTS.md.

A benchmark reads its options from `benchmark_parser` (every one has --threads and --no-write), calls `start_run`
(threads set, machine printed), times its variants with `interleaved_medians`, and ends with `finish_run`, which
writes its section of RESULTS.md headed by the command that produced it and the machine it ran on.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

RESULTS_FILE = Path(__file__).resolve().parent / "RESULTS.md"


# ---------------------------------------------------------------------------------------------- timing


def interleaved_medians(functions: dict, repeats: int, warmup: int = 1, clock=time.perf_counter) -> dict:
    """Median seconds per call of each function, calls interleaved (A B C A B C ...) so that load from other
    processes on a shared machine hits every variant alike. Warm-up calls are not timed. `clock`: wall time by
    default; `time.process_time` counts this process's CPU time only (with one intra-op thread, the time the work
    took, whatever else the machine runs)."""
    for _ in range(warmup):
        for function in functions.values():
            function()
    timings = {name: [] for name in functions}
    for _ in range(repeats):
        for name, function in functions.items():
            begin = clock()
            function()
            timings[name].append(clock() - begin)
    return {name: statistics.median(times) for name, times in timings.items()}


# ---------------------------------------------------------------------------------------------- machine, command


def machine_description() -> str:
    """CPU model, cores, load average, GPU, torch (with its intra-op threads), transformers and Python."""
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        pass
    load = f", load average {os.getloadavg()[0]:.1f} at start" if hasattr(os, "getloadavg") else ""
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (
        f"{cpu}, {os.cpu_count()} cores{load}, {gpu}, torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"transformers {transformers.__version__}, Python {platform.python_version()}"
    )


def command_line() -> str:
    """The command that is running, as typed from the repository root: `python -m benchmarks.<name> <options>`."""
    spec = getattr(sys.modules["__main__"], "__spec__", None)
    program = ["-m", spec.name] if spec is not None else [sys.argv[0]]
    return shlex.join(["python", *program, *sys.argv[1:]])


# ---------------------------------------------------------------------------------------------- a benchmark's run


def benchmark_parser(description: str, default_threads: int | None = None) -> argparse.ArgumentParser:
    """An argument parser with the options every benchmark has: --threads and --no-write."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    default = default_threads or "torch's own"
    parser.add_argument(
        "--threads", type=int, default=default_threads,
        help=f"torch intra-op threads (default: {default}); one is steadiest on a machine shared with other work, "
        "where OpenMP barriers of several threads wait for descheduled ones",
    )
    parser.add_argument("--no-write", action="store_true", help="print the results; leave RESULTS.md alone")
    return parser


def start_run(args) -> tuple[str, float]:
    """Set torch's intra-op threads to `args.threads` (when given) and print the machine: (machine, start time)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    machine = machine_description()
    print(f"machine: {machine}", flush=True)
    return machine, time.perf_counter()


def finish_run(args, title: str, body: str, machine: str, started: float) -> None:
    """Print the time taken and, unless --no-write, write the section `title` of RESULTS.md: the command and its
    duration, the machine, then `body`."""
    minutes = (time.perf_counter() - started) / 60
    print(f"done in {minutes:.1f} min", flush=True)
    if not args.no_write:
        write_section(title, f"Command: `{command_line()}` ({minutes:.1f} min)\n\nMachine: {machine}.\n\n{body}")
        print(f"wrote the section {title!r} of {RESULTS_FILE}", flush=True)


# ---------------------------------------------------------------------------------------------- results


def markdown_table(header: list[str], rows: list[list]) -> str:
    """A Markdown table of `rows` (lists of cells, printed with str) under `header`."""
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def write_section(title: str, body: str, results_file: Path | None = None) -> None:
    """Replace the section "## title" of `results_file` (default: benchmarks/RESULTS.md) up to the next "## "
    heading, or append it; every other section is left exactly as it is. The file is read just before writing,
    as others may edit it."""
    results_file = results_file or RESULTS_FILE
    text = results_file.read_text() if results_file.exists() else "# Benchmark results\n"
    section = f"## {title}\n\n{body.strip()}\n"
    pattern = re.compile(rf"^## {re.escape(title)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: section + "\n", text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    results_file.write_text(text.rstrip("\n") + "\n")
