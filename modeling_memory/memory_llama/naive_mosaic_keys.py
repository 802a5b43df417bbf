"""Naive reference of the Memory Mosaics v2 key scan: the oracle that `ops_mosaic_keys.py` (the PyTorch path)
and `kernels_mosaic_keys.py` (the Triton kernels) are tested and benchmarked against.

One step per token, the state itself kept in float64, written to be obviously right rather than fast or safe
from overflow: it holds while the state's norm stays within float64's range (log norms within about +-700),
which covers the tests' log gates of +-60. Tests and benchmarks import it; the model never does, so a Hub export
does not ship it.
"""

import torch


def naive_mosaic_key_scan(
    projected: torch.Tensor,
    log_gate: torch.Tensor,
    log_decay: torch.Tensor,
    initial_keys: torch.Tensor | None = None,
    initial_log_norm: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """kbar_t = exp(log_gate_t) * u_t + exp(log_decay_t) * kbar_{t-1}; the contract of
    `ops_mosaic_keys.mosaic_key_scan_torch`.

    Args:
        projected: (B, H, T, D) u_t.
        log_gate, log_decay: (B, H, T).
        initial_keys, initial_log_norm: (B, H, D) and (B, H), the state before the first step as its direction
            and the log of its norm (both None: a zero state).
    Returns:
        keys (B, H, T, D) kbar_t / ||kbar_t|| (0 where kbar_t = 0) and log_norm (B, H, T) log ||kbar_t||
        (-inf where kbar_t = 0), both float64 and differentiable with respect to projected, log_gate and log_decay
        (no gradient passes back through a zero state).
    """
    batch, heads, length, width = projected.shape
    projected, log_gate, log_decay = projected.double(), log_gate.double(), log_decay.double()
    if initial_keys is None:
        state = projected.new_zeros(batch, heads, width)
    else:
        state = initial_log_norm.double().exp()[..., None] * initial_keys.double()
    keys, log_norms = [], []
    # unbind: one view per step, whose backward stacks the steps' gradients once (indexing would add a full-size
    # gradient per step).
    for u, gate, decay in zip(projected.unbind(2), log_gate.unbind(2), log_decay.unbind(2)):
        state = gate[..., None].exp() * u + decay[..., None].exp() * state
        squared = (state * state).sum(-1)
        nonzero = squared > 0
        # A zero state has no direction: its key is 0, and it is a constant that passes no gradient back (so the
        # steps of left padding get none).
        state = torch.where(nonzero[..., None], state, torch.zeros_like(state))
        norm = torch.where(nonzero, squared, torch.ones_like(squared)).sqrt()
        keys.append(torch.where(nonzero[..., None], state / norm[..., None], torch.zeros_like(state)))
        log_norms.append(torch.where(nonzero, norm.log(), torch.full_like(norm, float("-inf"))))
    if length == 0:
        return projected.new_zeros(projected.shape), projected.new_zeros(batch, heads, 0)
    return torch.stack(keys, dim=2), torch.stack(log_norms, dim=2)


__all__ = ["naive_mosaic_key_scan"]
