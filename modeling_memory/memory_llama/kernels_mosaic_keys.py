"""Triton kernels of the Memory Mosaics v2 key scan (`ops_mosaic_keys.py` holds the PyTorch path and the
dispatcher, `naive_mosaic_keys.py` the naive reference).

A program owns one (batch, head) sequence and walks it in tiles of BLOCK_T time steps, keeping the state
kbar = exp(log_norm) * key as its direction and log norm in registers (fp32), never kbar itself.

Forward, per tile: the (BLOCK_T x BLOCK_T) matrix of log weights log_gate_j + S[t, j], S[t, j] =
sum_{j < i <= t} log_decay_i, each row scaled by its largest term's log size (log ||u_j|| included, and the
carried state's), one dot with the tile of u, plus the carried state; then each row is normalised into its key
and log norm, and the last row is carried on. The fp32 state before each tile is kept for the backward.

Backward, tiles in reverse, from the saved log norms n_t = log ||kbar_t|| and tile states. With
Q[t, j] = exp(log_gate_j + S[t, j] - n_t) (u_j's share of k_t; the state's share likewise), the tile's keys are
recomputed in fp32 as Q u + (state term), whatever the output dtype, and with r_t = g_t - (g_t . k_t) k_t
(g the keys' gradient):
- du_j = sum_{t >= j} Q[t, j] r_t, and dlog_gate_j = u_j . du_j;
- dlog_decay_j = sum_{t >= j} (lambda_j kbar_{j-1} . r_t) / ||kbar_t||, where lambda_j kbar_{j-1} is the sum of
  the terms of kbar_j before step j: an exclusive prefix sum over i < j of Q[t, i] (r_t . u_i), plus the tile
  state's term, summed over t >= j.
Every exponent is the log size of a term of kbar_t minus n_t, so every factor stays O(1) whatever the scale of
kbar. Steps after the tile arrive through one carried vector, sum_{t > tile} exp(S - n_t) r_t, held with its own
running log scale. Steps whose state is zero (left padding) get no gradient, as in the PyTorch path.

Statistics, accumulators and dot products are fp32 (IEEE, not TF32) for every input dtype: the dot operands are
fp32 values formed in the kernel, and a program's tiles run one after another, so the scan is bound by latency
rather than by the tensor cores.

Imported only once `kernel_backend.triton_available()` is True; the guarded import keeps it importable where
Triton is missing. Without a GPU the kernels run only if TRITON_INTERPRET=1 was set before this module was
imported.
"""

import torch

from .kernel_backend import check_kernel_device, interpreter_requested, next_power_of_2
from .ops_mosaic_keys import MAX_EXPONENT, check_scan_inputs

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where Triton is missing
    triton = None
    tl = None


# Kernels are decorated as interpreted functions when this was set at import time.
INTERPRETED = interpreter_requested()

# Time steps per tile (the interpreter prefers few, large steps; a GPU's registers hold a 64 x 64 fp32 tile
# comfortably, wider keys get a shorter tile).
_BLOCK_T = 64


if triton is not None:

    @triton.jit
    def _segment_sums(log_decay, BLOCK_T: tl.constexpr):
        """(BLOCK_T, BLOCK_T) [t, j] = sum_{j < i <= t} log_decay_i (0 for j >= t), summed over the segment itself
        rather than as a difference of cumulative sums, which would lose small segments after strong decays."""
        offs = tl.arange(0, BLOCK_T)
        later = offs[:, None] > offs[None, :]  # [i, j]: i > j
        return tl.cumsum(tl.where(later, log_decay[:, None], 0.0), axis=0)

    @triton.jit
    def _mosaic_key_scan_forward_kernel(
        projected_ptr, log_gate_ptr, log_decay_ptr, initial_keys_ptr, initial_log_norm_ptr, keys_ptr, log_norm_ptr,
        tile_keys_ptr, tile_log_norm_ptr, length, width, num_tiles,
        MAX_EXPONENT: tl.constexpr, HAS_INITIAL: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        """Keys and log norms of one (batch, head) sequence, tile by tile; also the fp32 state before each tile."""
        sequence = tl.program_id(0).to(tl.int64)
        offs_t = tl.arange(0, BLOCK_T)
        offs_d = tl.arange(0, BLOCK_D)
        width_ok = offs_d < width
        causal = offs_t[:, None] >= offs_t[None, :]
        last_row = offs_t == BLOCK_T - 1
        steps_base = sequence * length
        if HAS_INITIAL:
            state = tl.load(initial_keys_ptr + sequence * width + offs_d, mask=width_ok, other=0.0).to(tl.float32)
            state_log_norm = tl.load(initial_log_norm_ptr + sequence).to(tl.float32)
        else:
            state = tl.zeros([BLOCK_D], dtype=tl.float32)
            state_log_norm = tl.zeros([], dtype=tl.float32) - float("inf")
        for tile in range(num_tiles):
            tile_index = sequence * num_tiles + tile
            tl.store(tile_keys_ptr + tile_index * width + offs_d, state, mask=width_ok)
            tl.store(tile_log_norm_ptr + tile_index, state_log_norm)
            steps = tile * BLOCK_T + offs_t
            step_ok = steps < length
            rows = (steps_base + steps)[:, None] * width + offs_d[None, :]
            row_mask = step_ok[:, None] & width_ok[None, :]
            # Steps past the end read as padding (u = 0, log gate = log decay = 0): the state is unchanged.
            u = tl.load(projected_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
            log_gate = tl.load(log_gate_ptr + steps_base + steps, mask=step_ok, other=0.0).to(tl.float32)
            log_decay = tl.load(log_decay_ptr + steps_base + steps, mask=step_ok, other=0.0).to(tl.float32)
            segment = _segment_sums(log_decay, BLOCK_T)
            state_term_log = state_log_norm + tl.cumsum(log_decay, axis=0)
            log_weights = log_gate[None, :] + segment
            # Each row's scale: its largest term's log size, so a zero u (padding) never sets it.
            input_log_norm = 0.5 * tl.log(tl.sum(u * u, axis=1))
            term_log = tl.where(causal, log_weights + input_log_norm[None, :], float("-inf"))
            scale = tl.maximum(tl.max(term_log, axis=1), state_term_log)
            scale = tl.where(scale == float("-inf"), 0.0, scale)
            weights = tl.where(causal, tl.exp(tl.minimum(log_weights - scale[:, None], MAX_EXPONENT)), 0.0)
            scaled = tl.dot(weights, u, input_precision="ieee")
            scaled += tl.exp(state_term_log - scale)[:, None] * state[None, :]
            squared = tl.sum(scaled * scaled, axis=1)
            nonzero = squared > 0
            norm = tl.sqrt(tl.where(nonzero, squared, 1.0))
            keys = tl.where(nonzero[:, None], scaled / norm[:, None], 0.0)
            log_norm = tl.where(nonzero, scale + tl.log(norm), float("-inf"))
            tl.store(keys_ptr + rows, keys.to(keys_ptr.dtype.element_ty), mask=row_mask)
            tl.store(log_norm_ptr + steps_base + steps, log_norm, mask=step_ok)
            state = tl.sum(tl.where(last_row[:, None], keys, 0.0), axis=0)
            state_log_norm = tl.max(tl.where(last_row, log_norm, float("-inf")), axis=0)

    @triton.jit
    def _mosaic_key_scan_backward_kernel(
        projected_ptr, log_gate_ptr, log_decay_ptr, log_norm_ptr, tile_keys_ptr, tile_log_norm_ptr, grad_keys_ptr,
        grad_projected_ptr, grad_log_gate_ptr, grad_log_decay_ptr, length, width, num_tiles,
        MAX_EXPONENT: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        """Gradients of projected, log_gate and log_decay for one (batch, head) sequence, tiles in reverse."""
        sequence = tl.program_id(0).to(tl.int64)
        offs_t = tl.arange(0, BLOCK_T)
        offs_d = tl.arange(0, BLOCK_D)
        width_ok = offs_d < width
        causal = offs_t[:, None] >= offs_t[None, :]
        last_row = offs_t == BLOCK_T - 1
        steps_base = sequence * length
        # sum over the steps t after the tile of exp(S - n_t) r_t, as exp(later_log_scale) * later.
        later = tl.zeros([BLOCK_D], dtype=tl.float32)
        later_log_scale = tl.zeros([], dtype=tl.float32) - float("inf")
        for tile_from_end in range(num_tiles):
            tile = num_tiles - 1 - tile_from_end
            steps = tile * BLOCK_T + offs_t
            step_ok = steps < length
            rows = (steps_base + steps)[:, None] * width + offs_d[None, :]
            row_mask = step_ok[:, None] & width_ok[None, :]
            u = tl.load(projected_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
            log_gate = tl.load(log_gate_ptr + steps_base + steps, mask=step_ok, other=0.0).to(tl.float32)
            log_decay = tl.load(log_decay_ptr + steps_base + steps, mask=step_ok, other=0.0).to(tl.float32)
            log_norm = tl.load(log_norm_ptr + steps_base + steps, mask=step_ok, other=float("-inf"))
            grad = tl.load(grad_keys_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
            tile_index = sequence * num_tiles + tile
            state = tl.load(tile_keys_ptr + tile_index * width + offs_d, mask=width_ok, other=0.0)
            state_log_norm = tl.load(tile_log_norm_ptr + tile_index)

            segment = _segment_sums(log_decay, BLOCK_T)
            decay_through = tl.cumsum(log_decay, axis=0)
            # [j] = sum_{j < i <= tile end} log_decay_i; steps past the end decay by 0.
            segment_to_end = tl.sum(tl.where(last_row[:, None], segment, 0.0), axis=0)
            decay_to_end = tl.sum(log_decay, axis=0)
            nonzero = log_norm > float("-inf")  # a zero state has no direction: nothing flows back through it

            # The keys again, in fp32 whatever the output dtype: kbar_t / exp(n_t), renormalised.
            input_weights = tl.where(
                causal & nonzero[:, None],
                tl.exp(tl.minimum(log_gate[None, :] + segment - log_norm[:, None], MAX_EXPONENT)),
                0.0,
            )
            state_weights = tl.where(nonzero, tl.exp(tl.minimum(state_log_norm + decay_through - log_norm, MAX_EXPONENT)), 0.0)
            keys = tl.dot(input_weights, u, input_precision="ieee") + state_weights[:, None] * state[None, :]
            squared = tl.sum(keys * keys, axis=1)
            keys = tl.where(squared[:, None] > 0, keys / tl.sqrt(tl.where(squared > 0, squared, 1.0))[:, None], 0.0)
            radial = grad - tl.sum(grad * keys, axis=1)[:, None] * keys
            radial = tl.where(nonzero[:, None], radial, 0.0)

            # Through u_j and its gate.
            later_to_input = tl.exp(tl.minimum(log_gate + segment_to_end + later_log_scale, MAX_EXPONENT))
            grad_u = tl.dot(tl.trans(input_weights), radial, input_precision="ieee")
            grad_u += later_to_input[:, None] * later[None, :]
            # A zero state (left padding) is a constant: nothing reaches its steps' inputs.
            grad_u = tl.where(nonzero[:, None], grad_u, 0.0)
            grad_log_gate = tl.sum(grad_u * u, axis=1)

            # Through the state before step j, lambda_j kbar_{j-1} = sum_{i < j} g_i (decays) u_i + the tile's
            # start state: term [t, i] of kbar_t projected on r_t / ||kbar_t||, summed over i < j and t >= j.
            terms = input_weights * tl.dot(radial, tl.trans(u), input_precision="ieee")
            terms_before = tl.cumsum(terms, axis=1) - terms
            state_terms = state_weights * tl.sum(radial * state[None, :], axis=1)
            grad_log_decay = tl.sum(tl.where(causal, terms_before + state_terms[:, None], 0.0), axis=0)
            # ... and through the steps after the tile.
            later_terms = later_to_input * tl.sum(u * later[None, :], axis=1)
            later_from_state = tl.exp(tl.minimum(state_log_norm + decay_to_end + later_log_scale, MAX_EXPONENT))
            grad_log_decay += tl.cumsum(later_terms, axis=0) - later_terms
            grad_log_decay += later_from_state * tl.sum(state * later, axis=0)

            tl.store(grad_projected_ptr + rows, grad_u.to(grad_projected_ptr.dtype.element_ty), mask=row_mask)
            tl.store(grad_log_gate_ptr + steps_base + steps, grad_log_gate, mask=step_ok)
            tl.store(grad_log_decay_ptr + steps_base + steps, grad_log_decay, mask=step_ok)

            # Carry to the previous tile: its steps reach this tile's step t through all of this tile's decays
            # up to t, and the later steps through the whole tile.
            reach_log = tl.where(nonzero, decay_through - log_norm, float("-inf"))
            later_log = decay_to_end + later_log_scale
            new_log_scale = tl.maximum(tl.max(reach_log, axis=0), later_log)
            shift = tl.where(new_log_scale == float("-inf"), 0.0, new_log_scale)
            later = tl.sum(tl.exp(reach_log - shift)[:, None] * radial, axis=0) + tl.exp(later_log - shift) * later
            later_log_scale = new_log_scale


def _kernel_settings(width: int) -> dict:
    block_d = max(16, next_power_of_2(width))
    return dict(
        BLOCK_T=_BLOCK_T if block_d <= 64 or INTERPRETED else max(16, _BLOCK_T // 2),
        BLOCK_D=block_d,
        MAX_EXPONENT=MAX_EXPONENT,
        num_warps=8 if block_d >= 128 else 4,
        # Two stages: the next tile's loads are issued while this one computes (the carried state serialises
        # the tiles, so there is nothing else to overlap).
        num_stages=2,
    )


class MosaicKeyScanFunction(torch.autograd.Function):
    """The key scan; gradients to projected, log_gate and log_decay from the keys. The log norms are not
    differentiable and the initial state gets no gradient."""

    @staticmethod
    def forward(ctx, projected, log_gate, log_decay, initial_keys, initial_log_norm):
        batch, heads, length, width = projected.shape
        settings = _kernel_settings(width)
        num_tiles = triton.cdiv(length, settings["BLOCK_T"])
        device = projected.device
        keys = torch.empty_like(projected)
        log_norm = torch.empty(batch, heads, length, dtype=torch.float32, device=device)
        # The fp32 state before every tile: the backward recomputes the keys in fp32 from it.
        tile_keys = torch.empty(batch * heads, num_tiles, width, dtype=torch.float32, device=device)
        tile_log_norm = torch.empty(batch * heads, num_tiles, dtype=torch.float32, device=device)
        has_initial = initial_keys is not None
        if batch * heads > 0 and length > 0:
            _mosaic_key_scan_forward_kernel[(batch * heads,)](
                projected, log_gate, log_decay,
                initial_keys if has_initial else tile_keys, initial_log_norm if has_initial else tile_log_norm,
                keys, log_norm, tile_keys, tile_log_norm, length, width, num_tiles,
                HAS_INITIAL=has_initial, **settings,
            )
        ctx.save_for_backward(projected, log_gate, log_decay, log_norm, tile_keys, tile_log_norm)
        ctx.mark_non_differentiable(log_norm)
        return keys, log_norm

    @staticmethod
    def backward(ctx, grad_keys, grad_log_norm):
        projected, log_gate, log_decay, log_norm, tile_keys, tile_log_norm = ctx.saved_tensors
        batch, heads, length, width = projected.shape
        grad_projected = torch.empty_like(projected)
        grad_log_gate = torch.empty(log_gate.shape, dtype=torch.float32, device=projected.device)
        grad_log_decay = torch.empty(log_decay.shape, dtype=torch.float32, device=projected.device)
        if batch * heads > 0 and length > 0:
            _mosaic_key_scan_backward_kernel[(batch * heads,)](
                projected, log_gate, log_decay, log_norm, tile_keys, tile_log_norm, grad_keys.contiguous(),
                grad_projected, grad_log_gate, grad_log_decay, length, width, tile_keys.shape[1],
                **_kernel_settings(width),
            )
        return (
            grad_projected if ctx.needs_input_grad[0] else None,
            grad_log_gate.to(log_gate.dtype) if ctx.needs_input_grad[1] else None,
            grad_log_decay.to(log_decay.dtype) if ctx.needs_input_grad[2] else None,
            None,
            None,
        )


def mosaic_key_scan_triton(
    projected: torch.Tensor,
    log_gate: torch.Tensor,
    log_decay: torch.Tensor,
    initial_keys: torch.Tensor | None = None,
    initial_log_norm: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The key scan; same contract as `ops_mosaic_keys.mosaic_key_scan_torch`.

    Args:
        projected: (B, H, T, D) u_t, fp32, fp16 or bf16 (D up to 256, padded to a power of two inside the kernels).
        log_gate: (B, H, T) log g_t; log_decay: (B, H, T) log lambda_t <= 0.
        initial_keys, initial_log_norm: (B, H, D) and (B, H) state before the first step, or both None (zero state).
    Returns:
        keys (B, H, T, D) in projected's dtype, differentiable; log_norm (B, H, T) fp32, not differentiable.
    """
    check_kernel_device(projected, "mosaic key scan", __name__, INTERPRETED)
    check_scan_inputs(projected, log_gate, log_decay, initial_keys, initial_log_norm)
    if initial_keys is not None:
        as_state = lambda tensor: tensor.detach().to(device=projected.device, dtype=torch.float32).contiguous()  # noqa: E731
        initial_keys, initial_log_norm = as_state(initial_keys), as_state(initial_log_norm)
    return MosaicKeyScanFunction.apply(
        projected.contiguous(), log_gate.contiguous(), log_decay.contiguous(), initial_keys, initial_log_norm
    )
