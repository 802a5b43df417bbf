"""The README and the pages under docs/ tell the truth about the code: every `memory-llama` command shown parses
with the real parser, every `python -m` module and script path exists, every Python block compiles and its
imports from this project resolve, every test named exists, and every relative link points to a file.

The commands that do real work are run by the tests named beside them in the docs (the quick start by
tests/memory_llama/test_real_checkpoint.py, graft and export by tests/tools/, train and eval by tests/cli/);
this file keeps the text and the code from drifting apart."""

import ast
import importlib
import importlib.util
import re
import shlex
from pathlib import Path

import pytest

from memory_llama_cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"```(\w*)\n(.*?)```", re.S)


def code_blocks(language: str):
    """(page, block text) of every fenced block in `language` on every page."""
    return [(page, text) for page in PAGES for lang, text in FENCE.findall(page.read_text()) if lang == language]


def shell_commands():
    """Every command line of the bash blocks, continuation lines joined and comments dropped."""
    commands = []
    for page, block in code_blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #", 1)[0].strip()
            if line and not line.startswith("#"):
                commands.append((page.relative_to(ROOT), line))
    return commands


def test_docs_exist_and_readme_links_them():
    readme = (ROOT / "README.md").read_text()
    for page in PAGES[1:]:
        assert f"docs/{page.name}" in readme, f"README.md does not link docs/{page.name}"


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_relative_links_resolve(page):
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
        if "://" not in target:
            assert (page.parent / target).exists(), f"{page.name} links {target}, which does not exist"


def test_memory_llama_commands_parse():
    """Each `memory-llama ...` line (or `... -m memory_llama_cli ...` under accelerate) parses with the command
    line's own parser, unknown options refused (train: with every TrainingArguments field, as the command
    itself parses it)."""
    from memory_llama_cli.train_command import parse_train_command_line

    checked = 0
    for page, line in shell_commands():
        start = next((line.index(head) + len(head) for head in ("memory-llama ", "-m memory_llama_cli ") if head in line), None)
        if start is None or line.startswith("pip"):
            continue
        words = shlex.split(line[start:].replace("...", "").replace("[", "").replace("]", ""))
        arguments = [word for word in words if not word.startswith("$(")]
        try:
            args, unknown = build_parser().parse_known_args(arguments)
            if args.command == "train":
                parse_train_command_line(arguments[1:])
            else:
                assert not unknown, f"{page}: `{line}` has options the parser does not know: {unknown}"
        except SystemExit as exit_:
            pytest.fail(f"{page}: `{line}` does not parse (exit {exit_.code})")
        checked += 1
    assert checked >= 10


def test_python_modules_and_scripts_exist():
    for page, line in shell_commands():
        for module in re.findall(r"(?:python|-m)\s+-m\s+([\w.]+)|launch .*?-m\s+([\w.]+)", line):
            name = next(part for part in module if part)
            assert importlib.util.find_spec(name) is not None, f"{page}: `{line}` runs {name}, which does not exist"
        for script in re.findall(r"python\s+([\w/]+\.py)", line):
            assert (ROOT / script).is_file(), f"{page}: `{line}` runs {script}, which does not exist"


def test_python_blocks_compile_and_their_imports_resolve():
    for page, block in code_blocks("python"):
        tree = ast.parse(block, filename=str(page))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "modeling_memory":
                module = importlib.import_module(node.module)
                for alias in node.names:
                    assert hasattr(module, alias.name), f"{page.name}: {node.module} has no {alias.name}"


def test_named_tests_exist():
    for page in PAGES:
        for path, name in re.findall(r"(tests/[\w/]+\.py)(?:::(\w+))?", page.read_text()):
            assert (ROOT / path).is_file(), f"{page.name} names {path}, which does not exist"
            if name:
                assert f"def {name}(" in (ROOT / path).read_text(), f"{page.name} names {path}::{name}"
