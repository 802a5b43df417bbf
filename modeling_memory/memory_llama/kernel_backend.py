"""Kernel utilities in one place: whether Triton is usable, the interpreter flag, which implementation
runs a memory op (the Triton kernels or the PyTorch path), and the block-size helper the kernel
files share.

Environment knobs, read once per process (the first time an op runs):

- `MODELING_MEMORY_KERNELS`: "triton" forces the kernels (an error if they cannot run here), "torch"
  forces the PyTorch path; unset picks the kernels on CUDA tensors when Triton imports.
- `TRITON_INTERPRET=1`: Triton's interpreter, which runs the kernels on CPU tensors too. It must be set
  before Triton is first imported (transformers imports it through torch._dynamo).

Inside `torch.compile` the PyTorch path always runs: the kernels' launchers do work on the host, and the
compiler fuses the PyTorch path instead.

Kernel modules import triton only after `triton_available()` says yes.
"""

import functools
import os

import torch

KERNELS_ENV = "MODELING_MEMORY_KERNELS"
INTERPRETER_ENV = "TRITON_INTERPRET"


def interpreter_requested() -> bool:
    """TRITON_INTERPRET=1 in the environment. Kernel modules read it once, when imported: Triton decorates
    their kernels as interpreted functions only if it was set then."""
    return os.environ.get(INTERPRETER_ENV) == "1"


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:
        return False
    return True


_settings_read: tuple[str, bool] | None = None


def _settings() -> tuple[str, bool]:
    """(forced backend or "", interpreter on), read from the environment on first use."""
    global _settings_read
    if _settings_read is None:
        forced = os.environ.get(KERNELS_ENV, "").strip().lower()
        if forced not in ("", "triton", "torch"):
            raise ValueError(f"{KERNELS_ENV} must be 'triton' or 'torch' (or unset), got {forced!r}.")
        _settings_read = (forced, interpreter_requested())
    return _settings_read


def kernel_choice(tensor: torch.Tensor) -> str:
    """'triton' or 'torch' for an op on `tensor`: forced by MODELING_MEMORY_KERNELS, else Triton on CUDA
    tensors (or anywhere under TRITON_INTERPRET=1) when Triton imports, else the PyTorch path."""
    if torch.compiler.is_compiling():
        return "torch"  # the kernels' launchers work on the host; the compiler fuses the PyTorch path instead
    forced, interpreter = _settings()
    if forced == "torch":
        return "torch"
    usable = (tensor.is_cuda or interpreter) and triton_available()
    if forced == "triton" and not usable:
        raise RuntimeError(
            f"{KERNELS_ENV}=triton but Triton kernels cannot run here: install triton and use CUDA "
            "tensors, or set TRITON_INTERPRET=1 before importing modeling_memory to run them on the CPU."
        )
    return "triton" if usable else "torch"


def reload_settings() -> None:
    """Read the environment knobs again (otherwise they are read once per process)."""
    global _settings_read
    _settings_read = None


def check_kernel_device(tensor: torch.Tensor, kernels: str, module: str, interpreted: bool) -> None:
    """Raise a clear error when `kernels` (e.g. "Engram") cannot run on `tensor`: Triton needs CUDA tensors, or
    the interpreter switched on before the kernel `module` was imported (`interpreted`, read then)."""
    if not tensor.is_cuda and not interpreted:
        raise RuntimeError(
            f"Triton {kernels} kernels need CUDA tensors, or {INTERPRETER_ENV}=1 set before {module} is first imported."
        )


def next_power_of_2(value: int) -> int:
    """Smallest power of two >= value (1 for value <= 1): Triton block sizes must be powers of two."""
    return 1 << max(0, int(value) - 1).bit_length()
