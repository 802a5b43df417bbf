"""Triton kernels of the product-key weighted embedding bag (`ops_product_keys.py` holds the PyTorch path and
the dispatcher, `naive_product_keys.py` the naive reference). Each token reads J = heads * top_k value rows; its output is their weighted sum.

Forward: a program takes a block of tokens and a block of value columns, gathers the J rows of every
token in chunks and accumulates weight * row in fp32; the output is written in the values' dtype.
Backward:
- weights: grad_weights[t, j] = <grad_out[t], values[indices[t, j]]>, fp32, per block of tokens and reads.
- values: a coalesced sparse COO gradient. The (token, read) entries are stably sorted by row (torch
  sort and unique_consecutive); a program takes a block of distinct rows and sums each row's run of
  entries, weight * grad_out, in sorted order in fp32, and writes the row once in the values' dtype. No
  atomics, so the gradient is bitwise repeatable, and nothing touches the N - U rows nobody read.

This module is imported only once `kernel_backend.triton_available()` is True; the guarded import
keeps it importable (for Hub remote-code import checks) where Triton is missing. On a machine without
a GPU the kernels run only if TRITON_INTERPRET=1 was set before this module was imported.
"""

import torch

from .kernel_backend import check_kernel_device, interpreter_requested, next_power_of_2

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where Triton is missing
    triton = None
    tl = None


# Kernels are decorated as interpreted functions when this was set at import time.
INTERPRETED = interpreter_requested()

# Elements of the (tokens, reads, columns) tile one program gathers; the interpreter prefers few, large programs.
_TILE_ELEMENTS = 1 << 16 if INTERPRETED else 1 << 13
# Widest column block: a program covers the whole row under the interpreter, a slice of it on a GPU.
_MAX_BLOCK_D = 1 << 12 if INTERPRETED else 256
# Distinct rows summed per program of the values-gradient kernel.
_ROW_BLOCK = 256 if INTERPRETED else 16


if triton is not None:

    @triton.jit
    def _bag_forward_kernel(
        indices_ptr, weights_ptr, values_ptr, out_ptr, num_tokens, num_reads, value_dim, values_row_stride,
        BLOCK_T: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        """out[t, d] = sum_j weights[t, j] * values[indices[t, j], d] for a (BLOCK_T, BLOCK_D) tile."""
        offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        token_ok = offs_t < num_tokens
        column_ok = offs_d < value_dim
        acc = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
        for start in range(0, num_reads, BLOCK_J):
            offs_j = start + tl.arange(0, BLOCK_J)
            read_ok = token_ok[:, None] & (offs_j < num_reads)[None, :]
            entries = offs_t.to(tl.int64)[:, None] * num_reads + offs_j[None, :]
            rows = tl.load(indices_ptr + entries, mask=read_ok, other=0)
            weights = tl.load(weights_ptr + entries, mask=read_ok, other=0.0).to(tl.float32)
            gathered = tl.load(
                values_ptr + rows[:, :, None] * values_row_stride + offs_d[None, None, :],
                mask=read_ok[:, :, None] & column_ok[None, None, :],
                other=0.0,
            )
            acc += tl.sum(weights[:, :, None] * gathered.to(tl.float32), axis=1)
        out_offsets = offs_t.to(tl.int64)[:, None] * value_dim + offs_d[None, :]
        tl.store(out_ptr + out_offsets, acc.to(out_ptr.dtype.element_ty), mask=token_ok[:, None] & column_ok[None, :])

    @triton.jit
    def _bag_weights_grad_kernel(
        indices_ptr, values_ptr, grad_out_ptr, grad_weights_ptr, num_tokens, num_reads, value_dim, values_row_stride,
        BLOCK_T: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        """grad_weights[t, j] = <grad_out[t], values[indices[t, j]]> for a (BLOCK_T, BLOCK_J) tile, in fp32."""
        offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        offs_j = tl.program_id(1) * BLOCK_J + tl.arange(0, BLOCK_J)
        token_ok = offs_t < num_tokens
        read_ok = token_ok[:, None] & (offs_j < num_reads)[None, :]
        entries = offs_t.to(tl.int64)[:, None] * num_reads + offs_j[None, :]
        rows = tl.load(indices_ptr + entries, mask=read_ok, other=0)
        acc = tl.zeros([BLOCK_T, BLOCK_J], dtype=tl.float32)
        for start in range(0, value_dim, BLOCK_D):
            offs_d = start + tl.arange(0, BLOCK_D)
            column_ok = offs_d < value_dim
            grad = tl.load(
                grad_out_ptr + offs_t.to(tl.int64)[:, None] * value_dim + offs_d[None, :],
                mask=token_ok[:, None] & column_ok[None, :],
                other=0.0,
            ).to(tl.float32)
            gathered = tl.load(
                values_ptr + rows[:, :, None] * values_row_stride + offs_d[None, None, :],
                mask=read_ok[:, :, None] & column_ok[None, None, :],
                other=0.0,
            )
            acc += tl.sum(gathered.to(tl.float32) * grad[:, None, :], axis=2)
        tl.store(grad_weights_ptr + entries, acc, mask=read_ok)

    @triton.jit
    def _bag_values_grad_kernel(
        sorted_entries_ptr, run_starts_ptr, weights_ptr, grad_out_ptr, grad_rows_ptr, num_unique, num_reads,
        value_dim, BLOCK_U: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        """Row u of the U distinct rows read: the sum over its run of sorted entries e (= t * J + j) of
        weights[e] * grad_out[t], in sorted order, in fp32."""
        offs_u = tl.program_id(0) * BLOCK_U + tl.arange(0, BLOCK_U)
        offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        row_ok = offs_u < num_unique
        column_ok = offs_d < value_dim
        position = tl.load(run_starts_ptr + offs_u, mask=row_ok, other=0)
        end = tl.load(run_starts_ptr + offs_u + 1, mask=row_ok, other=0)
        active = position < end
        acc = tl.zeros([BLOCK_U, BLOCK_D], dtype=tl.float32)
        # The loop runs as long as the block's longest run (the most-read row among its BLOCK_U rows).
        while tl.max(active.to(tl.int32), axis=0) > 0:
            entry = tl.load(sorted_entries_ptr + position, mask=active, other=0)
            weight = tl.load(weights_ptr + entry, mask=active, other=0.0).to(tl.float32)
            token = entry // num_reads
            grad = tl.load(
                grad_out_ptr + token[:, None] * value_dim + offs_d[None, :],
                mask=active[:, None] & column_ok[None, :],
                other=0.0,
            )
            acc += weight[:, None] * grad.to(tl.float32)
            position += 1
            active = position < end
        tl.store(
            grad_rows_ptr + offs_u.to(tl.int64)[:, None] * value_dim + offs_d[None, :],
            acc.to(grad_rows_ptr.dtype.element_ty),
            mask=row_ok[:, None] & column_ok[None, :],
        )


def _tile_sizes(num_tokens: int, num_reads: int, value_dim: int) -> tuple[int, int, int]:
    """(BLOCK_T, BLOCK_J, BLOCK_D): as wide a column block as allowed, then as many reads and tokens as fit."""
    block_d = min(next_power_of_2(value_dim), _MAX_BLOCK_D)
    block_j = min(next_power_of_2(num_reads), max(1, _TILE_ELEMENTS // block_d))
    block_t = min(next_power_of_2(num_tokens), max(1, _TILE_ELEMENTS // (block_j * block_d)))
    return block_t, block_j, block_d


class ProductKeyBagFunction(torch.autograd.Function):
    """Weighted embedding bag; gradients to the values (sparse, coalesced) and to the weights (dense)."""

    @staticmethod
    def forward(ctx, values, indices, weights):
        num_tokens, num_reads = indices.shape
        value_dim = values.shape[1]
        ctx.save_for_backward(values, indices, weights)
        out = torch.empty(num_tokens, value_dim, dtype=values.dtype, device=values.device)
        if num_tokens == 0:
            return out
        block_t, block_j, block_d = _tile_sizes(num_tokens, num_reads, value_dim)
        grid = (triton.cdiv(num_tokens, block_t), triton.cdiv(value_dim, block_d))
        _bag_forward_kernel[grid](
            indices, weights, values, out, num_tokens, num_reads, value_dim, values.stride(0),
            BLOCK_T=block_t, BLOCK_J=block_j, BLOCK_D=block_d,
        )
        return out

    @staticmethod
    def backward(ctx, grad_out):
        values, indices, weights = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        grad_values = grad_weights = None
        if ctx.needs_input_grad[2]:
            grad_weights = _bag_weights_grad(grad_out, values, indices).to(weights.dtype)
        if ctx.needs_input_grad[0]:
            grad_values = _bag_values_grad(grad_out, indices, weights, values.shape, values.dtype)
        return grad_values, None, grad_weights


def _bag_weights_grad(grad_out: torch.Tensor, values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """(T, J) fp32 gradient of the read weights."""
    num_tokens, num_reads = indices.shape
    value_dim = values.shape[1]
    grad_weights = torch.empty(num_tokens, num_reads, dtype=torch.float32, device=values.device)
    if num_tokens == 0:
        return grad_weights
    block_t, block_j, block_d = _tile_sizes(num_tokens, num_reads, value_dim)
    grid = (triton.cdiv(num_tokens, block_t), triton.cdiv(num_reads, block_j))
    _bag_weights_grad_kernel[grid](
        indices, values, grad_out, grad_weights, num_tokens, num_reads, value_dim, values.stride(0),
        BLOCK_T=block_t, BLOCK_J=block_j, BLOCK_D=block_d,
    )
    return grad_weights


def _bag_values_grad(grad_out, indices, weights, values_shape, values_dtype) -> torch.Tensor:
    """Coalesced sparse COO (N, Dv) gradient of the values: the distinct rows read, ascending."""
    value_dim = values_shape[1]
    # Stable: the entries of one row stay in (token, read) order, so the summation order is fixed.
    sorted_rows, sorted_entries = torch.sort(indices.flatten(), stable=True)
    rows, counts = torch.unique_consecutive(sorted_rows, return_counts=True)
    run_starts = torch.zeros(rows.numel() + 1, dtype=torch.int64, device=indices.device)
    torch.cumsum(counts, 0, out=run_starts[1:])
    grad_rows = torch.empty(rows.numel(), value_dim, dtype=values_dtype, device=grad_out.device)
    if rows.numel() > 0:
        block_d = min(next_power_of_2(value_dim), _MAX_BLOCK_D)
        grid = (triton.cdiv(rows.numel(), _ROW_BLOCK), triton.cdiv(value_dim, block_d))
        _bag_values_grad_kernel[grid](
            sorted_entries, run_starts, weights, grad_out, grad_rows, rows.numel(), indices.shape[1], value_dim,
            BLOCK_U=_ROW_BLOCK, BLOCK_D=block_d,
        )
    return torch.sparse_coo_tensor(
        rows[None], grad_rows, tuple(values_shape), is_coalesced=True, check_invariants=False
    )


def product_key_bag_triton(values: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted embedding bag; same contract as `ops_product_keys.product_key_bag_torch`.

    Args:
        values: (N, Dv) the values table (rows contiguous); gets a coalesced sparse gradient.
        indices: (T, J) int64 slots read.
        weights: (T, J) weight of each read (fp32); gets a dense gradient in its own dtype.
    Returns:
        (T, Dv) in the values' dtype, accumulated in fp32.
    """
    check_kernel_device(values, "product-key", __name__, INTERPRETED)
    if values.stride(1) != 1:
        values = values.contiguous()
    return ProductKeyBagFunction.apply(
        values, indices.to(device=values.device, dtype=torch.int64).contiguous(), weights.contiguous()
    )
