"""Naive references of the product-key memory ops: the oracles that `ops_product_keys.py` (the PyTorch
paths) and `kernels_product_keys.py` (the Triton kernels) are tested and benchmarked against.

The search scores every one of the N = n**2 slots with its full key spelt out (the product-key trick
avoids exactly that); the bag sums each token's rows in a loop. Tests and benchmarks import them; the
model never does, so a Hub export does not ship this file.
"""

import torch


def naive_product_key_scores(query: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """The score of every slot i * n + j: <q, [k1_i ; k2_j]>, the two sub-keys concatenated into the slot's key.

    Args:
        query: (T, H, K).
        keys: (H, 2, n, K / 2) sub-keys of the first and second half.
    Returns:
        (T, H, n**2) fp32.
    """
    num_heads, _, num_keys, half = keys.shape
    first = keys[:, 0, :, None, :].expand(num_heads, num_keys, num_keys, half)
    second = keys[:, 1, None, :, :].expand(num_heads, num_keys, num_keys, half)
    slot_keys = torch.cat([first, second], dim=-1).reshape(num_heads, num_keys * num_keys, 2 * half)
    return torch.einsum("thk,hnk->thn", query.float(), slot_keys.float())


def naive_product_key_topk(query: torch.Tensor, keys: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The top-k of all n**2 slot scores; the contract of `ops_product_keys.product_key_topk`.

    Returns:
        scores (T, H, k) fp32, best first; indices (T, H, k) int64 slot ids.
    """
    return naive_product_key_scores(query, keys).topk(top_k, dim=-1)


def naive_product_key_bag(values: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """out[t] = sum_j weights[t, j] * values[indices[t, j]], token by token; the contract of
    `ops_product_keys.product_key_bag_torch`, with a dense gradient to `values`.

    Args:
        values: (N, Dv); indices, weights: (T, J).
    Returns:
        (T, Dv) fp32.
    """
    rows = [(weights[t].float()[:, None] * values[indices[t]].float()).sum(0) for t in range(indices.shape[0])]
    if not rows:
        return values.new_zeros(0, values.shape[1], dtype=torch.float32)
    return torch.stack(rows)


__all__ = ["naive_product_key_bag", "naive_product_key_scores", "naive_product_key_topk"]
