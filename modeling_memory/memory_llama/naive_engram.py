"""Naive reference of the Engram lookup: the oracle that `ops_engram.py` (the PyTorch path) and
`kernels_engram.py` (the Triton kernels) are tested and benchmarked against.

Python integers, token by token and head by head, written to be obviously right rather than fast. Tests
and benchmarks import it; the model never does, so a Hub export does not ship it.
"""

import torch

from .ops_engram import EngramHashing


def naive_is_prime(n: int) -> bool:
    """Trial division."""
    return n > 1 and all(n % divisor for divisor in range(2, int(n**0.5) + 1))


def naive_primes_from(start: int, count: int) -> list[int]:
    """The `count` smallest primes >= `start`, in order."""
    primes, candidate = [], start
    while len(primes) < count:
        if naive_is_prime(candidate):
            primes.append(candidate)
        candidate += 1
    return primes


def naive_history_lengths(boundary: torch.Tensor, history: int) -> torch.Tensor:
    """How many tokens of n-gram history each new token may use, walking back from it until a break.

    Args:
        boundary: (B, L + S) bool, True at a document end (EOS) or padding; the first L = `history` entries
            are the cached history.
        history: L.
    Returns:
        (B, S) int64 in [0, L].
    """
    batch, total = boundary.shape
    lengths = torch.zeros(batch, total - history, dtype=torch.long)
    for b in range(batch):
        for s in range(total - history):
            count, position = 0, history + s - 1
            while position >= 0 and not boundary[b, position] and count < history:
                count, position = count + 1, position - 1
            lengths[b, s] = count
    return lengths


def _mix(grams: list[int], order: int, multipliers: list[int]) -> int:
    """(g_0 * m_0) XOR (g_1 * m_1) XOR ... over the `order` most recent canonical ids g (g_0 the token itself)."""
    mix = 0
    for k in range(order):
        mix ^= grams[k] * multipliers[k]
    return mix


def _rows_of(grams: list[int], hashing: EngramHashing) -> list[int]:
    """The row every head reads for one token, from its canonical id and its history's (pad id where missing)."""
    multipliers = [int(m) for m in hashing.multipliers]
    rows = []
    for i, order in enumerate(hashing.ngram_orders):
        mix = _mix(grams, order, multipliers)
        for j in range(hashing.heads_per_order):
            head = i * hashing.heads_per_order + j
            rows.append(mix % int(hashing.table_primes[head]) + int(hashing.table_offsets[head]))
    return rows


def naive_engram_row_ids(token_ids: torch.Tensor, history_lengths: torch.Tensor, hashing: EngramHashing) -> torch.Tensor:
    """Table rows each head reads; the contract of `ops_engram.engram_row_ids`.

    Args:
        token_ids: (B, L + S) raw token ids, the L = max_order - 1 history tokens first.
        history_lengths: (B, S) usable history of each new token.
        hashing: the layer's `EngramHashing`.
    Returns:
        (B, S, H) int64.
    """
    history = hashing.multipliers.numel() - 1
    batch, new_len = history_lengths.shape
    rows = torch.zeros(batch, new_len, hashing.table_primes.numel(), dtype=torch.long)
    for b in range(batch):
        for s in range(new_len):
            grams = [
                int(hashing.canonical_map[token_ids[b, history + s - k]]) if k <= history_lengths[b, s] else hashing.pad_id
                for k in range(max(hashing.ngram_orders))
            ]
            rows[b, s] = torch.tensor(_rows_of(grams, hashing))
    return rows


def naive_engram_row_ids_of_documents(
    input_ids: torch.Tensor, token_mask: torch.Tensor, eos_token_ids: list[int], hashing: EngramHashing
) -> torch.Tensor:
    """Table rows each head reads for a batch of new sequences (no cache), walking back through each sequence:
    history stops at the sequence start, at padding and at an EOS (the EOS token itself is history of nothing).

    Args:
        input_ids: (B, S) raw token ids; token_mask (B, S) bool, False at padding; eos_token_ids the EOS ids.
    Returns:
        (B, S, H) int64 (rows at padding positions are meaningless).
    """
    batch, length = input_ids.shape
    rows = torch.zeros(batch, length, hashing.table_primes.numel(), dtype=torch.long)
    for b in range(batch):
        for t in range(length):
            grams, broken = [int(hashing.canonical_map[input_ids[b, t]])], False
            for k in range(1, max(hashing.ngram_orders)):
                source = t - k
                if source < 0 or not token_mask[b, source] or int(input_ids[b, source]) in eos_token_ids:
                    broken = True
                grams.append(hashing.pad_id if broken else int(hashing.canonical_map[input_ids[b, source]]))
            rows[b, t] = torch.tensor(_rows_of(grams, hashing))
    return rows


def naive_engram_lookup(
    token_ids: torch.Tensor, history_lengths: torch.Tensor, hashing: EngramHashing, table_weight: torch.Tensor
) -> torch.Tensor:
    """The lookup: every head's row, concatenated; the contract of `ops_engram.engram_lookup_torch`, with a dense
    gradient to `table_weight` (plain indexing).

    Returns:
        (B, S, H * D) in the table's dtype.
    """
    rows = naive_engram_row_ids(token_ids, history_lengths, hashing)
    batch, new_len, heads = rows.shape
    tokens = []
    for b in range(batch):
        for s in range(new_len):
            tokens.append(torch.cat([table_weight[rows[b, s, h]] for h in range(heads)]))
    if not tokens:
        return table_weight.new_zeros(batch, new_len, heads * table_weight.shape[1])
    return torch.stack(tokens).view(batch, new_len, -1)


__all__ = [
    "naive_engram_lookup",
    "naive_engram_row_ids",
    "naive_engram_row_ids_of_documents",
    "naive_history_lengths",
    "naive_is_prime",
    "naive_primes_from",
]
