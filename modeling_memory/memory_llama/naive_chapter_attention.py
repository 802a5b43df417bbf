"""Naive reference of chapter attention: the oracle that `ops_chapter_attention.py` (the PyTorch paths) and
`kernels_chapter_attention.py` (the Triton kernels) are tested and benchmarked against.

One softmax per token, head and chapter read, in loops, written to be obviously right rather than fast.
Tests and benchmarks import it; the model never does, so a Hub export does not ship it.
"""

import torch


def naive_chapter_attention(
    query: torch.Tensor,
    bank_keys: torch.Tensor,
    bank_values: torch.Tensor,
    chapter_ids: torch.Tensor,
    chapter_weights: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """o[n, h] = sum_r w[n, r] * softmax_t(scale * K[c, t, h] . q[n, h]) V[c, :, h], c = chapter_ids[n, r].

    Args:
        query: (N, H, D).
        bank_keys, bank_values: (C, T, H, D) projected bank.
        chapter_ids: (N, R) int64 chapters each token reads; chapter_weights (N, R) the weight of each one's output.
        scale: softmax scale.
    Returns:
        (N, H, D) fp32, differentiable with respect to every floating-point input.
    """
    num_tokens, num_heads, head_dim = query.shape
    tokens = []
    for n in range(num_tokens):
        heads = []
        for h in range(num_heads):
            total = query.new_zeros(head_dim, dtype=torch.float32)
            for r in range(chapter_ids.shape[1]):
                chapter = int(chapter_ids[n, r])
                scores = bank_keys[chapter, :, h].float() @ query[n, h].float() * scale
                total = total + chapter_weights[n, r].float() * (scores.softmax(0) @ bank_values[chapter, :, h].float())
            heads.append(total)
        tokens.append(torch.stack(heads))
    if not tokens:
        return query.new_zeros(query.shape, dtype=torch.float32)
    return torch.stack(tokens)


__all__ = ["naive_chapter_attention"]
