"""How the kernel test files load the Triton kernel modules: interpreted on the CPU (in a child process) or
compiled on a GPU.

The interpreter needs TRITON_INTERPRET=1 when Triton itself is first imported, not only when the kernel
modules are: Triton's standard library (`tl.zeros`, `tl.sum`, ...) is made of jit functions, and
`import transformers` already imports Triton (through torch._dynamo). So the variable has to be set for
the whole process, which would send every CPU model test in the session through interpreted kernels.
Hence the interpreter tier normally runs in a child process (`run_interpreter_tier`), and runs inline
only when the session was started with TRITON_INTERPRET=1.
"""

import importlib
import importlib.util
import os
import subprocess
import sys

import pytest

from modeling_memory.memory_llama.kernel_backend import KERNELS_ENV

REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def interpreted_kernel_modules(names):
    """The kernel modules `names`, decorated for the Triton interpreter, if this process can run them; else None."""
    if os.environ.get("TRITON_INTERPRET") != "1" or importlib.util.find_spec("triton") is None:
        return None
    from modeling_memory.memory_llama.kernel_backend import triton_available

    if not triton_available():
        return None
    import triton.language as tl

    if type(tl.zeros).__name__ != "InterpretedFunction":
        return None
    return [importlib.import_module(name) for name in names]


def skip_unless_interpreted(modules):
    """`modules` from `interpreted_kernel_modules`, or skip (the child process runs those tests)."""
    if modules is None:
        pytest.skip("run by test_interpreter_tier_in_subprocess (needs TRITON_INTERPRET=1 for the whole process)")
    return modules


def run_interpreter_tier(test_file: str, modules) -> None:
    """Run the `test_triton_*` tests of `test_file` in a child process started with TRITON_INTERPRET=1; all of
    them must pass (none skipped)."""
    if modules is not None:
        pytest.skip("this session runs the interpreter tier itself")
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    env = dict(os.environ, TRITON_INTERPRET="1")
    env.pop(KERNELS_ENV, None)
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test_file, "-k", "test_triton_"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900, cwd=REPOSITORY)
    report = result.stdout[-8000:] + result.stderr[-2000:]
    assert result.returncode == 0, report
    summary = result.stdout.strip().splitlines()[-1]
    assert "passed" in summary and "skipped" not in summary and "deselected" in summary, report


def compiled_kernel_modules(names):
    """The kernel modules `names`, compiled for a GPU; skips without CUDA or under the interpreter."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET=1 is set for the whole session: no compiled kernels")
    pytest.importorskip("triton")
    return [importlib.import_module(name) for name in names]
