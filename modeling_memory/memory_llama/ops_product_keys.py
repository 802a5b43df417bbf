"""Product-key memory ops: the product-key top-k search and the weighted embedding bag (the ops under
`MemoryLlamaProductKeyMemory`, which runs in parallel with the MLP at `config.pkm_layers`).

The PyTorch paths and the dispatcher that picks the bag's PyTorch path or the Triton kernels of
`kernels_product_keys.py`; the naive references all of them are tested against are in
`naive_product_keys.py`. The search has no kernel: it scores 2 * num_keys sub-keys and k * k
candidates per head, never the N = num_keys**2 slots.

The values table never gets a dense gradient: the bag's backward returns a coalesced
`torch.sparse_coo_tensor` of shape (N, value_dim), one row per distinct slot read, the contributions
of repeated reads summed (`nn.Embedding(sparse=True)` and `F.embedding_bag(sparse=True)` give one row
per read instead). autograd stores it in `.grad` with its rows intact but without the coalesced flag,
and concatenates further contributions (layers sharing the table, accumulation steps); an optimizer's
`.coalesce()` then costs one sort of the rows read.

Shapes: T tokens, H heads, K key width (two halves of K / 2), n sub-keys per half, k top-k, J = H * k
slots read per token, N slots, Dv value width.
"""

import torch

from .kernel_backend import kernel_choice


# Gathered (tokens, J, Dv) blocks of the PyTorch path hold at most this many elements.
GATHER_ELEMENTS = 1 << 22


def product_key_topk(query: torch.Tensor, keys: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k slots of every head by product-key search.

    Slot i * n + j has score <q_1, k1_i> + <q_2, k2_j> (q_1, q_2 the halves of q). The best k of all
    n**2 sums are among the k x k sums of each half's own top k, so only those are formed.

    Args:
        query: (T, H, K).
        keys: (H, 2, n, K / 2) sub-keys of the first and second half.
        top_k: k <= n.
    Returns:
        scores (T, H, k) fp32, best first; indices (T, H, k) int64 slot ids in [0, n**2).
        Differentiable with respect to query and keys through the scores.
    """
    num_tokens, num_heads, key_dim = query.shape
    num_keys = keys.shape[2]
    halves = query.float().view(num_tokens, num_heads, 2, key_dim // 2)
    # Scores in fp32 whatever the dtype: they choose slots and feed the softmax.
    half_scores = torch.einsum("thsd,hsnd->thsn", halves, keys.float())  # (T, H, 2, n)
    top_scores, top_ids = half_scores.topk(top_k, dim=-1)  # (T, H, 2, k)
    candidates = top_scores[:, :, 0, :, None] + top_scores[:, :, 1, None, :]  # (T, H, k, k)
    scores, best = candidates.flatten(-2).topk(top_k, dim=-1)
    first = top_ids[:, :, 0].gather(-1, best // top_k)
    second = top_ids[:, :, 1].gather(-1, best % top_k)
    return scores, first * num_keys + second


def _token_blocks(num_tokens: int, slots: int, value_dim: int):
    """Slices of tokens whose gathered (tokens, J, Dv) rows stay within GATHER_ELEMENTS."""
    step = max(1, GATHER_ELEMENTS // max(1, slots * value_dim))
    for start in range(0, num_tokens, step):
        yield slice(start, start + step)


def product_key_bag_values_grad(
    grad_out: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor, values_shape, values_dtype
) -> torch.Tensor:
    """Sparse gradient of the values table: row r gets sum over reads (t, j) of r of weights[t, j] * grad_out[t].

    Args:
        grad_out: (T, Dv).
        indices, weights: (T, J) slots read and their weights.
        values_shape: (N, Dv); values_dtype: dtype of the gradient's rows.
    Returns:
        coalesced sparse COO (N, Dv): the distinct rows read, ascending, summed in fp32 and rounded once.
    """
    rows, inverse = torch.unique(indices, sorted=True, return_inverse=True)
    total = torch.zeros(rows.numel(), values_shape[1], dtype=torch.float32, device=grad_out.device)
    for block in _token_blocks(indices.shape[0], indices.shape[1], values_shape[1]):
        contributions = weights[block].float()[:, :, None] * grad_out[block].float()[:, None, :]  # (t, J, Dv)
        total.index_add_(0, inverse[block].flatten(), contributions.flatten(0, 1))
    return torch.sparse_coo_tensor(
        rows[None], total.to(values_dtype), tuple(values_shape), is_coalesced=True, check_invariants=False
    )


class ProductKeyBagFunction(torch.autograd.Function):
    """Weighted embedding bag in PyTorch, with the sparse coalesced values gradient of the project's
    convention (`F.embedding_bag(sparse=True)` returns one row per read, uncoalesced)."""

    @staticmethod
    def forward(ctx, values, indices, weights):
        ctx.save_for_backward(values, indices, weights)
        out = values.new_empty(indices.shape[0], values.shape[1])
        for block in _token_blocks(indices.shape[0], indices.shape[1], values.shape[1]):
            rows = values[indices[block]].float()  # (t, J, Dv)
            out[block] = torch.einsum("tj,tjd->td", weights[block].float(), rows).to(values.dtype)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        values, indices, weights = ctx.saved_tensors
        grad_values = grad_weights = None
        if ctx.needs_input_grad[2]:
            grad_weights = torch.empty(weights.shape, dtype=torch.float32, device=weights.device)
            for block in _token_blocks(indices.shape[0], indices.shape[1], values.shape[1]):
                rows = values[indices[block]].float()
                grad_weights[block] = torch.einsum("tjd,td->tj", rows, grad_out[block].float())
            grad_weights = grad_weights.to(weights.dtype)
        if ctx.needs_input_grad[0]:
            grad_values = product_key_bag_values_grad(grad_out, indices, weights, values.shape, values.dtype)
        return grad_values, None, grad_weights


def product_key_bag_torch(values: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted sum of the rows each token reads.

    Args:
        values: (N, Dv) the values table; its gradient is sparse (see the module docstring).
        indices: (T, J) int64 slots read (all heads of a token together).
        weights: (T, J) weight of each read (fp32).
    Returns:
        (T, Dv) in the values' dtype, accumulated in fp32.
    """
    return ProductKeyBagFunction.apply(values, indices, weights)


def product_key_bag(values: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Dispatcher: Triton kernels when usable (see `kernel_backend.py`), the PyTorch path otherwise. Same
    contract as `product_key_bag_torch`."""
    if kernel_choice(values) == "triton":
        from .kernels_product_keys import product_key_bag_triton

        return product_key_bag_triton(values, indices, weights)
    return product_key_bag_torch(values, indices, weights)
