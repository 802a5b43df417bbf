"""Memory Mosaics v2 key scan: the gated leaky average kbar_t = g_t * u_t + lambda_t * kbar_{t-1} and its
normalised keys k_t = kbar_t / ||kbar_t|| (the op under the associative memory; the query is the key, so this is
the only part of the layer that needs its own kernel).

The PyTorch path and the dispatcher that picks it or the Triton kernels of `kernels_mosaic_keys.py`; the naive
reference both are tested against is `naive_mosaic_keys.py`.

kbar itself over- or underflows (g_t = exp(up to +-60), long products of lambdas), and the keys do not depend on
its scale, so it is never formed: only a scaled copy and the log of the scale. The PyTorch path cuts
time into chunks of CHUNK steps (Mamba-2's SSD chunking). Within a chunk every term of kbar_t is one entry of a
(C x C) matrix, exp(log_gate_j + sum_{j < i <= t} log_decay_i) applied to u_j, plus the carried state; each row is
scaled by its largest term's log size (its log gate, log decay sum and log ||u_j||, as RWKV's WKV kernel keeps a
running maximum), so every entry is at most about 1 / ||u_j||. Only the state passes from chunk to chunk, as a
vector and a running log scale, in a Python loop of T / C cheap steps. The scales are constants to autograd (the
keys do not depend on them), so autograd's gradients are the true ones and stay O(1) whatever the scale of kbar.

Padding is the caller's: u = 0, log_gate = 0, log_decay = 0 leaves the state unchanged. Where kbar_t = 0 (left
padding before the first real step, from a zero or no initial state) the key is 0 and the state is a constant:
it has no direction to differentiate, so no gradient reaches those steps' inputs, projected included (the true
derivative there would scale with exp(padding's log gate 0 - the real steps' log gates), which overflows fp16).

Shapes: B batch, H heads, T time steps, D key width, C chunk length.
"""

import torch

from .kernel_backend import kernel_choice


# Time steps per chunk of the PyTorch path: the (C x C) weight matrix of every chunk is formed at once.
CHUNK = 32
# Largest exponent passed to exp(): only a term whose u is (nearly) zero can reach it, and capping keeps
# exp() finite (fp32 overflows above 88.7) so that 0 * weight stays 0.
MAX_EXPONENT = 64.0


def check_scan_inputs(projected, log_gate, log_decay, initial_keys, initial_log_norm) -> None:
    """Raise a clear error for shapes that do not fit (B, H, T, D), (B, H, T), (B, H, T), (B, H, D), (B, H)."""
    if projected.dim() != 4:
        raise ValueError(f"projected must be (B, H, T, D), got shape {tuple(projected.shape)}.")
    batch, heads, length, width = projected.shape
    for name, tensor in (("log_gate", log_gate), ("log_decay", log_decay)):
        if tensor.shape != (batch, heads, length):
            raise ValueError(f"{name} must be ({batch}, {heads}, {length}) for projected of shape "
                             f"{tuple(projected.shape)}, got {tuple(tensor.shape)}.")
    if (initial_keys is None) != (initial_log_norm is None):
        raise ValueError("initial_keys and initial_log_norm must be given together (or both left None).")
    if initial_keys is not None and (
        initial_keys.shape != (batch, heads, width) or initial_log_norm.shape != (batch, heads)
    ):
        raise ValueError(
            f"initial_keys must be ({batch}, {heads}, {width}) and initial_log_norm ({batch}, {heads}), got "
            f"{tuple(initial_keys.shape)} and {tuple(initial_log_norm.shape)}."
        )


def _segment_sums(log_decay: torch.Tensor) -> torch.Tensor:
    """(..., C) -> (..., C, C): entry [t, j] = sum_{j < i <= t} log_decay_i for j <= t, 0 above the diagonal.

    Summed over the segment itself rather than as a difference of two cumulative sums, which would lose the
    precision of small segments after a long run of strong decays."""
    size = log_decay.shape[-1]
    later = torch.ones(size, size, dtype=torch.bool, device=log_decay.device).tril(-1)  # [i, j]: i > j
    terms = log_decay.unsqueeze(-1).expand(*log_decay.shape, size).masked_fill(~later, 0.0)
    return terms.cumsum(dim=-2)


def _finite_or_zero(log_scale: torch.Tensor) -> torch.Tensor:
    """A row's log scale, 0 where it is -inf (nothing but zeros to scale), so that subtracting it never gives NaN."""
    return torch.where(log_scale == float("-inf"), torch.zeros_like(log_scale), log_scale)


def _normalise(state: torch.Tensor, log_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Direction and log norm of exp(log_scale) * state, (..., D) and (...): 0 and -inf for a zero state, with no
    gradient through the norm's kink there."""
    squared = (state * state).sum(-1)
    nonzero = squared > 0
    norm = torch.where(nonzero, squared, torch.ones_like(squared)).sqrt()
    keys = torch.where(nonzero[..., None], state / norm[..., None], torch.zeros_like(state))
    log_norm = torch.where(nonzero, log_scale + norm.log(), torch.full_like(norm, float("-inf")))
    return keys, log_norm


def mosaic_key_scan_torch(
    projected: torch.Tensor,
    log_gate: torch.Tensor,
    log_decay: torch.Tensor,
    initial_keys: torch.Tensor | None = None,
    initial_log_norm: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The key scan in PyTorch, chunked and in log space (see the module docstring).

    Args:
        projected: (B, H, T, D) u_t = W_phi x_t per head, fp32, fp16 or bf16.
        log_gate: (B, H, T) log g_t, finite.
        log_decay: (B, H, T) log lambda_t <= 0, finite.
        initial_keys, initial_log_norm: (B, H, D) unit (or zero) direction and (B, H) log norm (-inf for a zero
            state) of the state before the first step, fp32; both None for a zero state. They get no gradient.
    Returns:
        keys (B, H, T, D) in projected's dtype: kbar_t / ||kbar_t||, exactly 0 where kbar_t = 0; differentiable
        with respect to projected, log_gate and log_decay (all three get no gradient where kbar_t = 0).
        log_norm (B, H, T) fp32 (float64 for float64 inputs): log ||kbar_t||, -inf where kbar_t = 0; not
        differentiable. keys[:, :, -1] and log_norm[:, :, -1] are the state to continue from.
    All arithmetic is fp32 (float64 for float64 inputs) whatever the input dtype.
    """
    check_scan_inputs(projected, log_gate, log_decay, initial_keys, initial_log_norm)
    batch, heads, length, width = projected.shape
    compute_dtype = torch.float64 if projected.dtype == torch.float64 else torch.float32
    # The state before a chunk is exp(state_shift) * state: state O(1), state_shift a constant to autograd.
    if initial_keys is None:
        state = projected.new_zeros(batch, heads, width, dtype=compute_dtype)
        state_shift = projected.new_full((batch, heads), float("-inf"), dtype=compute_dtype)
    else:
        state = initial_keys.detach().to(compute_dtype)
        state_shift = initial_log_norm.detach().to(compute_dtype)
    if length == 0:
        return projected.new_zeros(projected.shape), projected.new_zeros(batch, heads, 0, dtype=compute_dtype)

    # Pad time to whole chunks with steps that leave the state unchanged; their outputs are dropped.
    num_chunks = -(-length // CHUNK)
    padding = num_chunks * CHUNK - length
    inputs = projected.to(compute_dtype)
    with torch.no_grad():
        started = (inputs != 0).any(-1).cumsum(-1) > 0  # (B, H, T): kbar is nonzero from here on
        if initial_keys is not None:
            started |= ((state != 0).any(-1) & (state_shift > float("-inf"))).unsqueeze(-1)
    inputs = torch.where(started.unsqueeze(-1), inputs, 0.0)  # the zero state's steps: no gradient
    inputs = torch.nn.functional.pad(inputs, (0, 0, 0, padding))
    inputs = inputs.view(batch, heads, num_chunks, CHUNK, width)
    gate = torch.nn.functional.pad(log_gate.to(compute_dtype), (0, padding)).view(batch, heads, num_chunks, CHUNK)
    decay = torch.nn.functional.pad(log_decay.to(compute_dtype), (0, padding)).view(batch, heads, num_chunks, CHUNK)

    causal = torch.ones(CHUNK, CHUNK, dtype=torch.bool, device=projected.device).tril()
    segment = _segment_sums(decay)  # (B, H, N, C, C)
    decay_through = decay.cumsum(-1)  # (B, H, N, C): log decay of the carried state from the chunk start through t
    log_weights = gate.unsqueeze(-2) + segment  # [t, j]: log of u_j's weight in kbar_t
    with torch.no_grad():
        # Log size of each term, log ||u_j|| included, so a zero u_j (padding) never sets a row's scale.
        input_log_norm = 0.5 * (inputs * inputs).sum(-1).log()
        term_log = (log_weights + input_log_norm.unsqueeze(-2)).masked_fill(~causal, float("-inf"))
        inner_scale = term_log.amax(-1)  # (B, H, N, C); -inf where u is zero through t
        inner_shift = _finite_or_zero(inner_scale)
    weights = torch.where(causal, (log_weights - inner_shift.unsqueeze(-1)).clamp(max=MAX_EXPONENT).exp(), 0.0)
    inner = weights @ inputs  # (B, H, N, C, D): the chunk's own terms, row t scaled by exp(-inner_shift_t)

    keys, log_norms = [], []
    # unbind, not indexing, per chunk: the backward then stacks the chunks' gradients once.
    chunks = zip(inner.unbind(2), decay_through.unbind(2), inner_scale.unbind(2), inner_shift.unbind(2))
    for chunk_inner, chunk_decay_through, chunk_inner_scale, chunk_inner_shift in chunks:
        state_log = state_shift.unsqueeze(-1) + chunk_decay_through  # (B, H, C)
        with torch.no_grad():
            state_size = state_log + 0.5 * (state * state).sum(-1).log().unsqueeze(-1)  # -inf for a zero state
            scale = _finite_or_zero(torch.maximum(chunk_inner_scale, state_size))
            inner_factor = (chunk_inner_shift - scale).clamp(max=MAX_EXPONENT).exp()
        state_factor = (state_log - scale).clamp(max=MAX_EXPONENT).exp()
        combined = inner_factor.unsqueeze(-1) * chunk_inner + state_factor.unsqueeze(-1) * state.unsqueeze(-2)
        chunk_keys, chunk_log_norm = _normalise(combined, scale)
        keys.append(chunk_keys)
        log_norms.append(chunk_log_norm)
        state, state_shift = combined[:, :, -1], scale[:, :, -1]
    keys = torch.stack(keys, dim=2).view(batch, heads, num_chunks * CHUNK, width)[:, :, :length]
    log_norm = torch.stack(log_norms, dim=2).view(batch, heads, num_chunks * CHUNK)[:, :, :length]
    return keys.to(projected.dtype), log_norm.detach()


def mosaic_key_scan(
    projected: torch.Tensor,
    log_gate: torch.Tensor,
    log_decay: torch.Tensor,
    initial_keys: torch.Tensor | None = None,
    initial_log_norm: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dispatcher: the Triton kernels when usable (see `kernel_backend.py`), the PyTorch path otherwise (always for
    float64 inputs, which it computes in float64); same contract as `mosaic_key_scan_torch`. A decode step passes
    the last position's (keys, log_norm) back as (initial_keys, initial_log_norm): continuing equals one scan over
    the concatenation."""
    if projected.dtype != torch.float64 and kernel_choice(projected) == "triton":
        from .kernels_mosaic_keys import mosaic_key_scan_triton

        return mosaic_key_scan_triton(projected, log_gate, log_decay, initial_keys, initial_log_norm)
    return mosaic_key_scan_torch(projected, log_gate, log_decay, initial_keys, initial_log_norm)
