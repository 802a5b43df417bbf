"""Engram lookup: canonical-id map + n-gram hashing + gather of every head (the op under Engram).

Readable PyTorch reference and the dispatcher that picks it or the Triton kernels of
`kernels_engram.py`. Row ids depend on tokens only, so they are computed before the layer runs. Both
give the table a sparse row gradient (`ops_table_rows.py`): a step's cost does not grow with the table.

Shapes: B batch, S new tokens, L = max_order - 1 history tokens prepended from the cache, H heads
(all orders), D per-head width.
"""

import torch

from .kernel_backend import kernel_choice
from .ops_table_rows import gather_rows


def engram_history_lengths(boundary: torch.Tensor, max_history: int) -> torch.Tensor:
    """How many tokens of n-gram history each new token may use.

    Args:
        boundary: (B, L + S) bool, True where a token ends a document (EOS) or is padding; the first
            L entries are the cached history (or all True when there is none).
        max_history: L.
    Returns:
        (B, S) int64 in [0, L]: the number of preceding tokens in the same segment, capped at L.
    """
    total = boundary.shape[1]
    positions = torch.arange(total, device=boundary.device)
    last_break = torch.where(boundary, positions, torch.full_like(positions, -1)).cummax(dim=1).values
    # History of token t may reach back to, but not including, the last break strictly before t
    # (max_history >= 1: every n-gram order is at least 2).
    last_break_before = last_break[:, max_history - 1 : total - 1]
    return (positions[max_history:] - 1 - last_break_before).clamp(0, max_history)


def engram_row_ids_reference(
    token_ids: torch.Tensor,
    history_lengths: torch.Tensor,
    canonical_map: torch.Tensor,
    multipliers: torch.Tensor,
    table_primes: torch.Tensor,
    table_offsets: torch.Tensor,
    ngram_orders: list[int],
    pad_id: int,
) -> torch.Tensor:
    """Table rows each head reads.

    Args:
        token_ids: (B, L + S) raw token ids, the L history tokens first.
        history_lengths: (B, S) from `engram_history_lengths`.
        canonical_map: (V,) raw id -> canonical id.
        multipliers: (max_order,) odd int64 hash multipliers of this layer.
        table_primes: (H,) table sizes, heads grouped by order in `ngram_orders` order.
        table_offsets: (H,) first row of each head's table inside the layer's one embedding.
        ngram_orders: orders, each with H / len(ngram_orders) heads.
        pad_id: canonical id that stands for missing history.
    Returns:
        (B, S, H) int64 row ids into the layer's embedding.
    """
    history = multipliers.numel() - 1
    canonical = canonical_map[token_ids]
    new_len = history_lengths.shape[1]
    heads_per_order = table_primes.numel() // len(ngram_orders)
    mixes = {}
    mix = canonical[:, history:] * multipliers[0]
    for k in range(1, max(ngram_orders)):
        previous = canonical[:, history - k : history - k + new_len]
        previous = torch.where(history_lengths >= k, previous, torch.full_like(previous, pad_id))
        mix = mix ^ (previous * multipliers[k])
        mixes[k + 1] = mix
    rows = []
    for i, order in enumerate(ngram_orders):
        heads = slice(i * heads_per_order, (i + 1) * heads_per_order)
        rows.append(mixes[order].unsqueeze(-1) % table_primes[heads] + table_offsets[heads])
    return torch.cat(rows, dim=-1)


def engram_lookup_reference(
    token_ids, history_lengths, canonical_map, multipliers, table_primes, table_offsets, ngram_orders, pad_id,
    table_weight, sparse_grad: bool = True,
) -> torch.Tensor:
    """Concatenated head embeddings e: (B, S, H * D) from the layer's (rows, D) table weight. The table's
    gradient is a coalesced sparse tensor of the rows read (dense with `sparse_grad=False`)."""
    rows = engram_row_ids_reference(
        token_ids, history_lengths, canonical_map, multipliers, table_primes, table_offsets, ngram_orders, pad_id
    )
    return gather_rows(table_weight, rows, sparse_grad).flatten(-2)


def engram_lookup(
    token_ids, history_lengths, canonical_map, multipliers, table_primes, table_offsets, ngram_orders, pad_id,
    table_weight, sparse_grad: bool = True,
) -> torch.Tensor:
    """Dispatcher: the fused Triton kernel when usable (see `kernel_backend.py`), the reference otherwise; same
    contract as `engram_lookup_reference`. It reads the weight tensor directly: a layer whose table carries an
    adapter computes the row ids and calls its table module instead."""
    if kernel_choice(token_ids) == "triton":
        from .kernels_engram import engram_lookup_triton

        return engram_lookup_triton(
            token_ids, history_lengths, canonical_map, multipliers, table_primes, table_offsets, ngram_orders,
            pad_id, table_weight, sparse_grad=sparse_grad,
        )
    return engram_lookup_reference(
        token_ids, history_lengths, canonical_map, multipliers, table_primes, table_offsets, ngram_orders, pad_id,
        table_weight, sparse_grad=sparse_grad,
    )
