"""Which implementation runs a memory op: the Triton kernels or the PyTorch reference.

Environment knobs, read once per process (the first time an op runs):

- `MODELING_MEMORY_KERNELS`: "triton" forces the kernels (an error if they cannot run here), "torch"
  forces the reference; unset picks the kernels on CUDA tensors when Triton imports.
- `TRITON_INTERPRET=1`: Triton's interpreter, which runs the kernels on CPU tensors too. It must be set
  before Triton is first imported (transformers imports it through torch._dynamo).

Inside `torch.compile` the reference always runs: the kernels' launchers do work on the host, and the
compiler fuses the reference instead.

Kernel modules import triton only after `triton_available()` says yes.
"""

import functools
import os

import torch

KERNELS_ENV = "MODELING_MEMORY_KERNELS"


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
        _settings_read = (forced, os.environ.get("TRITON_INTERPRET") == "1")
    return _settings_read


def kernel_choice(tensor: torch.Tensor) -> str:
    """'triton' or 'torch' for an op on `tensor`: forced by MODELING_MEMORY_KERNELS, else Triton on CUDA
    tensors (or anywhere under TRITON_INTERPRET=1) when Triton imports, else the reference."""
    if torch.compiler.is_compiling():
        return "torch"  # the kernels' launchers work on the host; the compiler fuses the reference instead
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
