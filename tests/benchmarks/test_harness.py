"""The benchmarks' harness (benchmarks/harness.py): interleaved timings, the command line a result records, the
RESULTS.md writer; and that every benchmark module imports and every command recorded in RESULTS.md still parses."""

import importlib
import pkgutil
import re
import shlex
import sys
import types

import pytest

import benchmarks
from benchmarks import harness

BENCHMARK_MODULES = sorted(
    name for _, name, _ in pkgutil.iter_modules(benchmarks.__path__) if name not in ("harness", "from_scratch")
)


class FakeClock:
    """A clock that only the timed functions move forward."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_interleaved_medians_interleave_the_calls_and_skip_the_warm_up():
    clock, calls = FakeClock(), []
    durations = {"a": iter([100.0, 1.0, 5.0, 2.0]), "b": iter([100.0, 7.0, 3.0, 4.0])}  # first: the warm-up call

    def timed(name):
        def call():
            calls.append(name)
            clock.now += next(durations[name])

        return call

    medians = harness.interleaved_medians({"a": timed("a"), "b": timed("b")}, repeats=3, clock=clock)
    assert calls == ["a", "b"] * 4
    assert medians == {"a": 2.0, "b": 4.0}


def test_command_line_is_the_module_command(monkeypatch):
    main = types.ModuleType("__main__")
    main.__spec__ = types.SimpleNamespace(name="benchmarks.iso_flop")
    monkeypatch.setitem(sys.modules, "__main__", main)
    monkeypatch.setattr(sys, "argv", ["/somewhere/benchmarks/iso_flop.py", "--kinds", "baseline", "pkm", "--dataset", "a b"])
    assert harness.command_line() == "python -m benchmarks.iso_flop --kinds baseline pkm --dataset 'a b'"


def test_write_section_replaces_only_its_own_section(tmp_path):
    results = tmp_path / "RESULTS.md"
    others = "## Kernels on an NVIDIA H100\n\nGPU rows.\n\n## Demo (memory-llama demo)\n\nDemo rows.\n"
    results.write_text(f"# Benchmark results\n\n## Kernels\n\nold rows\n\n{others}")

    harness.write_section("Kernels", "new rows", results)
    assert results.read_text() == f"# Benchmark results\n\n## Kernels\n\nnew rows\n\n{others}"

    harness.write_section("Forgetting (benchmarks/forgetting.py): baseline, pkm", "appended", results)
    assert results.read_text() == (
        f"# Benchmark results\n\n## Kernels\n\nnew rows\n\n{others}\n"
        "## Forgetting (benchmarks/forgetting.py): baseline, pkm\n\nappended\n"
    )


@pytest.fixture
def results_file(tmp_path, monkeypatch):
    path = tmp_path / "RESULTS.md"
    monkeypatch.setattr(harness, "RESULTS_FILE", path)
    return path


def test_finish_run_writes_the_command_and_the_machine_unless_told_not_to(results_file, monkeypatch):
    main = types.ModuleType("__main__")
    main.__spec__ = types.SimpleNamespace(name="benchmarks.engram_lookup")
    monkeypatch.setitem(sys.modules, "__main__", main)
    monkeypatch.setattr(sys, "argv", ["engram_lookup.py", "--repeats", "7"])
    args = harness.benchmark_parser("test").parse_args(["--no-write"])
    harness.finish_run(args, "Engram lookup", "the table", "a machine", started=0.0)
    assert not results_file.exists()

    args = harness.benchmark_parser("test").parse_args([])
    harness.finish_run(args, "Engram lookup", "the table", "a machine", started=0.0)
    text = results_file.read_text()
    assert re.search(r"^## Engram lookup\n\nCommand: `python -m benchmarks.engram_lookup --repeats 7` \(\d+\.\d min\)\n\n"
                     r"Machine: a machine\.\n\nthe table\n$", text, re.M)


@pytest.mark.parametrize("name", BENCHMARK_MODULES)
def test_every_benchmark_imports_and_has_a_help(name, capsys, monkeypatch):
    module = importlib.import_module(f"benchmarks.{name}")
    monkeypatch.setattr(sys, "argv", [f"benchmarks/{name}.py", "--help"])
    with pytest.raises(SystemExit) as exit_info:
        module.main()
    assert exit_info.value.code == 0
    assert "usage:" in capsys.readouterr().out


class Parsed(Exception):
    """Raised instead of starting a benchmark: its command line parsed."""


def recorded_commands():
    """(module, arguments) of every `Command: `python -m benchmarks...`` line of RESULTS.md."""
    text = harness.RESULTS_FILE.read_text()
    commands = [shlex.split(command) for command in re.findall(r"Command: `(python [^`]*)`", text)]
    return [(command[2].removeprefix("benchmarks."), command[3:]) for command in commands]


def test_results_record_module_commands():
    text = harness.RESULTS_FILE.read_text()
    assert recorded_commands(), "RESULTS.md records no benchmark command"
    assert not re.search(r"python benchmarks/\w+\.py", text), "a command in RESULTS.md runs a script by its path"
    assert all(command[:2] == ["python", "-m"] for command in map(shlex.split, re.findall(r"`(python [^`]*)`", text)))


@pytest.mark.parametrize("name, arguments", recorded_commands(), ids=lambda value: " ".join(value) if isinstance(value, list) else value)
def test_recorded_commands_still_parse(name, arguments, monkeypatch):
    module = importlib.import_module(f"benchmarks.{name}")

    def stop(args):
        raise Parsed(args)

    monkeypatch.setattr(module, "start_run", stop)
    monkeypatch.setattr(sys, "argv", [f"benchmarks/{name}.py", *arguments])
    with pytest.raises(Parsed):
        module.main()
