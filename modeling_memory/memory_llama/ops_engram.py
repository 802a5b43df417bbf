"""Engram lookup: canonical-id map + n-gram hashing + gather of every head (the op under Engram).

The PyTorch path and the dispatcher that picks it or the Triton kernels of `kernels_engram.py`; the naive
reference both are tested against is `naive_engram.py`. Row ids depend on tokens only, so they could be
computed before the layer runs. Both paths give the table a sparse row gradient (`ops_table_rows.py`): a
step's cost does not grow with the table.

Shapes: B batch, S new tokens, L = max_order - 1 history tokens prepended from the cache, H heads
(all orders), D per-head width.
"""

from dataclasses import dataclass

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


@dataclass
class EngramHashing:
    """What addresses the rows of one Engram layer's table, besides the tokens (built by the layer per forward).

    canonical_map: (V,) int64 raw id -> canonical id (the model's, shared by its Engram layers).
    multipliers: (max_order,) odd int64 hash multipliers of the layer.
    table_primes: (H,) int64 size of each head's table, heads grouped by order in `ngram_orders` order.
    table_offsets: (H,) int64 first row of each head's table inside the layer's one embedding.
    ngram_orders: the orders, each with H / len(ngram_orders) heads.
    pad_id: canonical id that stands for missing history.
    """

    canonical_map: torch.Tensor
    multipliers: torch.Tensor
    table_primes: torch.Tensor
    table_offsets: torch.Tensor
    ngram_orders: tuple[int, ...]
    pad_id: int

    @property
    def heads_per_order(self) -> int:
        return self.table_primes.numel() // len(self.ngram_orders)


def engram_row_ids(token_ids: torch.Tensor, history_lengths: torch.Tensor, hashing: EngramHashing) -> torch.Tensor:
    """Table rows each head reads (vectorised over tokens; `naive_engram.naive_engram_row_ids` is the oracle).

    Args:
        token_ids: (B, L + S) raw token ids, the L = max_order - 1 history tokens first.
        history_lengths: (B, S) from `engram_history_lengths`.
        hashing: the layer's `EngramHashing`.
    Returns:
        (B, S, H) int64 row ids into the layer's embedding.
    """
    multipliers, orders = hashing.multipliers, hashing.ngram_orders
    history = multipliers.numel() - 1
    canonical = hashing.canonical_map[token_ids]
    new_len = history_lengths.shape[1]
    mixes = {}
    mix = canonical[:, history:] * multipliers[0]
    for k in range(1, max(orders)):
        previous = canonical[:, history - k : history - k + new_len]
        previous = torch.where(history_lengths >= k, previous, torch.full_like(previous, hashing.pad_id))
        mix = mix ^ (previous * multipliers[k])
        mixes[k + 1] = mix
    rows = []
    per_order = hashing.heads_per_order
    for i, order in enumerate(orders):
        heads = slice(i * per_order, (i + 1) * per_order)
        rows.append(mixes[order].unsqueeze(-1) % hashing.table_primes[heads] + hashing.table_offsets[heads])
    return torch.cat(rows, dim=-1)


def engram_lookup_torch(
    token_ids: torch.Tensor,
    history_lengths: torch.Tensor,
    hashing: EngramHashing,
    table_weight: torch.Tensor,
    sparse_grad: bool = True,
    return_row_ids: bool = False,
):
    """The lookup in PyTorch: concatenated head embeddings e, (B, S, H * D), from the layer's (rows, D) table
    weight. The table's gradient is a coalesced sparse tensor of the rows read (dense with `sparse_grad=False`).
    With `return_row_ids`, also the (B, S, H) int64 rows read."""
    rows = engram_row_ids(token_ids, history_lengths, hashing)
    embeddings = gather_rows(table_weight, rows, sparse_grad).flatten(-2)
    return (embeddings, rows) if return_row_ids else embeddings


def engram_lookup(
    token_ids: torch.Tensor,
    history_lengths: torch.Tensor,
    hashing: EngramHashing,
    table_weight: torch.Tensor,
    sparse_grad: bool = True,
    return_row_ids: bool = False,
):
    """Dispatcher: the fused Triton kernel when usable (see `kernel_backend.py`), the PyTorch path otherwise; same
    contract as `engram_lookup_torch`. It reads the weight tensor directly: a layer whose table carries an
    adapter computes the row ids and calls its table module instead."""
    if kernel_choice(token_ids) == "triton":
        from .kernels_engram import engram_lookup_triton

        return engram_lookup_triton(token_ids, history_lengths, hashing, table_weight, sparse_grad, return_row_ids)
    return engram_lookup_torch(token_ids, history_lengths, hashing, table_weight, sparse_grad, return_row_ids)
