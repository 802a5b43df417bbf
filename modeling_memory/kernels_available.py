"""Whether Triton can be imported here. Kernel modules import triton only after this says yes."""

import functools


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:
        return False
    return True
