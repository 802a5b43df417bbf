"""Triton kernels of the Engram lookup (`ops_engram.py` holds the PyTorch path and the dispatcher,
`naive_engram.py` the naive reference).

Forward: one kernel maps raw ids to canonical ids, hashes the suffix n-grams and gathers the rows of
every head straight into the concatenated output `e`. Only when the table needs a gradient (or the caller
asks for them) does it also write the row ids, a small (N, H) tensor (int32 where they fit), so the backward
does not hash again.

Backward: the table's gradient is sparse (the convention of `ops_table_rows.py`): a coalesced COO tensor
holding only the U distinct rows read. The (token, head) entries are stably sorted by row; the first
entry of each run of equal rows sums the run in sorted order, in fp32, and writes it once, in the table
dtype, as its run's row of the (U, D) values. Bitwise repeatable; nothing of the table's size is touched.
Counting U costs one host sync.

This module is imported only once `kernel_backend.triton_available()` is True; the guarded import
keeps it importable (for Hub remote-code import checks) where Triton is missing. On a machine without
a GPU the kernels run only if TRITON_INTERPRET=1 was set before this module was imported.
"""

import torch

from .kernel_backend import check_kernel_device, interpreter_requested, next_power_of_2
from .ops_engram import EngramHashing

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where Triton is missing
    triton = None
    tl = None


# Kernels are decorated as interpreted functions when this was set at import time.
INTERPRETED = interpreter_requested()

# Elements of the (tokens, heads, width) tile one program moves; the interpreter prefers few, large programs.
_TILE_ELEMENTS = 1 << 16 if INTERPRETED else 1 << 12
# Backward passes over the (N * H) entries: entries per program.
_ENTRY_BLOCK = 1024 if INTERPRETED else 128

# Per-head n-gram orders as a device tensor, cached: building it on every call costs a host-to-device copy.
_HEAD_ORDERS = {}


if triton is not None:

    @triton.jit
    def _engram_row_ids(
        token_ids_ptr, history_lengths_ptr, canonical_map_ptr, multipliers_ptr, head_orders_ptr,
        table_primes_ptr, table_offsets_ptr, pad_id, offs_t, offs_h, num_tokens, num_heads, new_len,
        HISTORY: tl.constexpr, MAX_ORDER: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
    ):
        """(BLOCK_T, BLOCK_H) int64 rows read by heads `offs_h` of flat tokens `offs_t` (= b * S + s)."""
        token_ok = offs_t < num_tokens
        head_ok = offs_h < num_heads
        batch = offs_t // new_len
        # Flat index of the token itself in token_ids (B, HISTORY + S).
        position = batch * (new_len + HISTORY) + HISTORY + offs_t % new_len
        history = tl.load(history_lengths_ptr + offs_t, mask=token_ok, other=0)
        order = tl.load(head_orders_ptr + offs_h, mask=head_ok, other=1)
        mix = tl.zeros([BLOCK_T, BLOCK_H], dtype=tl.int64)
        for k in tl.static_range(MAX_ORDER):
            in_segment = token_ok & (history >= k)
            raw = tl.load(token_ids_ptr + position - k, mask=in_segment, other=0)
            canonical = tl.load(canonical_map_ptr + raw, mask=in_segment, other=0)
            canonical = tl.where(history >= k, canonical, pad_id).to(tl.int64)
            term = canonical * tl.load(multipliers_ptr + k)
            # Head h folds in the k-th previous token only if its order is above k.
            mix = mix ^ tl.where(order[None, :] > k, term[:, None], 0)
        prime = tl.load(table_primes_ptr + offs_h, mask=head_ok, other=1)
        offset = tl.load(table_offsets_ptr + offs_h, mask=head_ok, other=0)
        return mix % prime[None, :] + offset[None, :]

    @triton.jit
    def _engram_forward_kernel(
        token_ids_ptr, history_lengths_ptr, canonical_map_ptr, multipliers_ptr, head_orders_ptr,
        table_primes_ptr, table_offsets_ptr, table_ptr, out_ptr, rows_ptr, pad_id, num_tokens, num_heads, new_len,
        head_dim, table_row_stride,
        HISTORY: tl.constexpr, MAX_ORDER: tl.constexpr, STORE_ROWS: tl.constexpr,
        BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        """Gathers the rows of every head into `out`; with STORE_ROWS also writes the (N, H) row ids for the backward."""
        offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        offs_d = tl.arange(0, BLOCK_D)
        rows = _engram_row_ids(
            token_ids_ptr, history_lengths_ptr, canonical_map_ptr, multipliers_ptr, head_orders_ptr,
            table_primes_ptr, table_offsets_ptr, pad_id, offs_t, offs_h, num_tokens, num_heads, new_len,
            HISTORY, MAX_ORDER, BLOCK_T, BLOCK_H,
        )
        mask = (
            (offs_t < num_tokens)[:, None, None]
            & (offs_h < num_heads)[None, :, None]
            & (offs_d < head_dim)[None, None, :]
        )
        values = tl.load(table_ptr + rows[:, :, None] * table_row_stride + offs_d[None, None, :], mask=mask)
        out_offsets = (
            offs_t.to(tl.int64)[:, None, None] * (num_heads * head_dim)
            + offs_h[None, :, None] * head_dim
            + offs_d[None, None, :]
        )
        tl.store(out_ptr + out_offsets, values, mask=mask)
        if STORE_ROWS:
            rows_mask = (offs_t < num_tokens)[:, None] & (offs_h < num_heads)[None, :]
            rows_offsets = offs_t.to(tl.int64)[:, None] * num_heads + offs_h[None, :]
            tl.store(rows_ptr + rows_offsets, rows.to(rows_ptr.dtype.element_ty), mask=rows_mask)

    @triton.jit
    def _engram_row_sum_kernel(
        grad_out_ptr, sorted_rows_ptr, sorted_entries_ptr, run_ids_ptr, values_ptr, num_entries, head_dim,
        BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        """Entries sorted by row: the first entry of each run of equal rows sums the run, in sorted order, in
        fp32, and stores it as row `run_ids[first]` of the sparse gradient's (U, D) values."""
        offs_e = tl.program_id(0) * BLOCK_E + tl.arange(0, BLOCK_E)
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < head_dim
        entry_ok = offs_e < num_entries
        rows = tl.load(sorted_rows_ptr + offs_e, mask=entry_ok, other=-1).to(tl.int64)
        previous = tl.load(sorted_rows_ptr + offs_e - 1, mask=entry_ok & (offs_e > 0), other=-1)
        is_first = entry_ok & (rows != previous)
        active = is_first
        total = tl.zeros([BLOCK_E, BLOCK_D], dtype=tl.float32)
        position = offs_e
        # Runs are short (distinct n-grams rarely share a row); the loop runs as long as the block's longest run.
        while tl.max(active.to(tl.int32), axis=0) > 0:
            entry = tl.load(sorted_entries_ptr + position, mask=active, other=0)
            grad = tl.load(grad_out_ptr + entry[:, None] * head_dim + offs_d[None, :], mask=active[:, None] & d_ok[None, :], other=0.0)
            total += grad.to(tl.float32)
            position += 1
            next_row = tl.load(sorted_rows_ptr + position, mask=active & (position < num_entries), other=-1)
            active = active & (next_row == rows)
        run = tl.load(run_ids_ptr + offs_e, mask=is_first, other=0).to(tl.int64)
        tl.store(
            values_ptr + run[:, None] * head_dim + offs_d[None, :],
            total.to(values_ptr.dtype.element_ty),
            mask=is_first[:, None] & d_ok[None, :],
        )


def _tile_sizes(num_tokens: int, num_heads: int, head_dim: int) -> tuple[int, int, int]:
    """(BLOCK_T, BLOCK_H, BLOCK_D): a full head row per program, as many heads and tokens as the tile allows."""
    block_d = next_power_of_2(head_dim)
    block_h = min(next_power_of_2(num_heads), max(1, _TILE_ELEMENTS // block_d))
    block_t = min(next_power_of_2(num_tokens), max(1, _TILE_ELEMENTS // (block_h * block_d)))
    return block_t, block_h, block_d


class EngramLookupFunction(torch.autograd.Function):
    """Fused Engram lookup; the gradient goes to the table weight only (sparse, or dense on request). The second
    output is the (N, H) row ids, written when the backward needs them or the caller asks for them (else empty)."""

    @staticmethod
    def forward(
        ctx, table_weight, token_ids, history_lengths, canonical_map, multipliers, head_orders, table_primes,
        table_offsets, pad_id, max_order, sparse_grad, return_row_ids,
    ):
        batch, new_len = history_lengths.shape
        num_heads = table_primes.numel()
        head_dim = table_weight.shape[1]
        num_tokens = batch * new_len
        out = torch.empty(batch, new_len, num_heads * head_dim, dtype=table_weight.dtype, device=table_weight.device)
        # The backward needs the row ids: the forward writes them (2-4 MB) rather than the backward hashing again.
        # int32 where they fit: the backward's radix sort then takes half the passes.
        store_rows = ctx.needs_input_grad[0] or return_row_ids
        rows_dtype = torch.int32 if table_weight.shape[0] < 2**31 else torch.int64
        rows = torch.empty(num_tokens if store_rows else 0, num_heads, dtype=rows_dtype, device=table_weight.device)
        ctx.save_for_backward(rows)
        ctx.mark_non_differentiable(rows)
        ctx.sparse_grad = sparse_grad
        ctx.table_shape, ctx.table_dtype = table_weight.shape, table_weight.dtype
        if num_tokens == 0:
            return out, rows
        block_t, block_h, block_d = _tile_sizes(num_tokens, num_heads, head_dim)
        grid = (triton.cdiv(num_tokens, block_t), triton.cdiv(num_heads, block_h))
        _engram_forward_kernel[grid](
            token_ids, history_lengths, canonical_map, multipliers, head_orders, table_primes, table_offsets,
            table_weight, out, rows, pad_id, num_tokens, num_heads, new_len, head_dim, table_weight.stride(0),
            HISTORY=multipliers.numel() - 1, MAX_ORDER=max_order, STORE_ROWS=store_rows,
            BLOCK_T=block_t, BLOCK_H=block_h, BLOCK_D=block_d,
        )
        return out, rows

    @staticmethod
    def backward(ctx, grad_out, grad_rows):
        (rows,) = ctx.saved_tensors
        grad_table = None
        if ctx.needs_input_grad[0]:
            grad_table = _engram_table_grad(grad_out.contiguous(), rows, ctx.table_shape, ctx.table_dtype)
            if not ctx.sparse_grad:
                grad_table = grad_table.to_dense()
        return (grad_table,) + (None,) * 11


def _engram_table_grad(grad_out, rows, table_shape, table_dtype) -> torch.Tensor:
    """Coalesced sparse gradient of the (rows, D) table from grad_out (B, S, H * D) and the forward's (N, H) row ids."""
    head_dim = table_shape[1]
    device = grad_out.device
    flat = rows.flatten()
    # Stable sort: entries of one row stay in (token, head) order, so the summation order is fixed.
    sorted_rows, sorted_entries = torch.sort(flat, stable=True)
    unique_rows, run_ids = torch.unique_consecutive(sorted_rows, return_inverse=True)
    values = torch.empty(unique_rows.numel(), head_dim, dtype=table_dtype, device=device)
    if flat.numel() > 0:
        _engram_row_sum_kernel[(triton.cdiv(flat.numel(), _ENTRY_BLOCK),)](
            grad_out, sorted_rows, sorted_entries, run_ids, values, flat.numel(), head_dim,
            BLOCK_E=_ENTRY_BLOCK, BLOCK_D=next_power_of_2(head_dim),
        )
    indices = unique_rows.to(torch.int64).unsqueeze(0)
    return torch.sparse_coo_tensor(indices, values, tuple(table_shape), is_coalesced=True, check_invariants=False)


def engram_lookup_triton(
    token_ids: torch.Tensor,
    history_lengths: torch.Tensor,
    hashing: EngramHashing,
    table_weight: torch.Tensor,
    sparse_grad: bool = True,
    return_row_ids: bool = False,
):
    """Fused Engram lookup; same contract as `ops_engram.engram_lookup_torch`.

    Args:
        token_ids: (B, L + S) raw token ids, L = max_order - 1 history tokens first.
        history_lengths: (B, S) int64 usable history per new token.
        hashing: the layer's `EngramHashing` (canonical map, multipliers, table primes and offsets, orders, pad id).
        table_weight: (rows, D) the layer's embedding weight; the only input that gets a gradient.
        sparse_grad: give the table a coalesced sparse gradient (the default); False densifies it, for optimizers
            that take only dense gradients.
        return_row_ids: also return the (B, S, H) int64 rows read.
    Returns:
        (B, S, H * D) in the table's dtype (and the row ids with `return_row_ids`).
    """
    check_kernel_device(table_weight, "Engram", __name__, INTERPRETED)
    orders, multipliers = list(hashing.ngram_orders), hashing.multipliers
    num_heads = hashing.table_primes.numel()
    if num_heads % len(orders) != 0:
        raise ValueError(f"{num_heads} heads cannot be split evenly over the orders {orders}.")
    max_order = max(orders)
    if max_order > multipliers.numel():
        raise ValueError(f"Order {max_order} needs {max_order} hash multipliers, got {multipliers.numel()}.")
    heads_per_order = num_heads // len(orders)
    device = table_weight.device
    key = (tuple(orders), heads_per_order, device)
    head_orders = _HEAD_ORDERS.get(key)
    if head_orders is None:
        head_orders = torch.tensor([order for order in orders for _ in range(heads_per_order)], device=device)
        _HEAD_ORDERS[key] = head_orders
    as_long = lambda tensor: tensor.to(device=device, dtype=torch.int64).contiguous()  # noqa: E731
    embeddings, rows = EngramLookupFunction.apply(
        table_weight.contiguous(), as_long(token_ids), as_long(history_lengths), as_long(hashing.canonical_map),
        as_long(multipliers), head_orders, as_long(hashing.table_primes), as_long(hashing.table_offsets),
        int(hashing.pad_id), max_order, bool(sparse_grad), bool(return_row_ids),
    )
    if return_row_ids:
        return embeddings, rows.long().view(*history_lengths.shape, num_heads)
    return embeddings
