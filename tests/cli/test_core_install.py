"""A command that needs a package only the extras install (pyproject.toml), run where it is missing: one line
naming the package and the install that adds it, status 1, no traceback. The package is made missing in a
subprocess (`sys.modules[name] = None` makes its import fail as an absent package's does)."""

import subprocess
import sys

import pytest

from memory_llama_cli import EXTRA_PACKAGES

COMMAND = """
import sys
sys.modules[{name!r}] = None
from memory_llama_cli import main
main({argv!r})
"""


@pytest.mark.parametrize("name, argv", [("datasets", ["demo"]), ("peft", ["train", "model", "--data", "x.txt"])])
def test_a_command_without_its_extra_says_what_to_install(tmp_path, name, argv):
    assert name in EXTRA_PACKAGES
    result = subprocess.run(
        [sys.executable, "-c", COMMAND.format(name=name, argv=argv)], capture_output=True, text=True, cwd=tmp_path,
        env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}, timeout=120,
    )
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1] == (
        f"memory-llama {argv[0]}: error: needs the package {name}, which the core install leaves out: "
        "pip install 'modeling_memory[all]'"
    )
