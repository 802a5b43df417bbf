"""Reading rows of a memory table with a sparse row gradient: the read under the Engram tables, the
chapter bank (in training) and any other memory value table.

A training step reads a few rows of a table that may hold millions, so its gradient is a coalesced
`torch.sparse_coo_tensor` of the table's shape: the distinct rows read, each once, holding the sum of the
gradients of all its reads (the layout of `nn.Embedding(sparse=True)` gradients, which the optimizers of
`table_optimizer.py` update row by row and DDP all-reduces). Nothing of the table's size is allocated.
"""

import torch
import torch.nn.functional as F


def sparse_row_gradient(grad_rows: torch.Tensor, row_ids: torch.Tensor, table_shape, table_dtype) -> torch.Tensor:
    """The gradient of a table from the gradients of the rows read.

    Args:
        grad_rows: (..., D) gradient of each read, in `row_ids` order.
        row_ids: (...) int rows read (repeats allowed).
        table_shape: (rows, D) of the table.
        table_dtype: dtype of the gradient's values (repeated reads are summed in fp32 first).
    Returns:
        coalesced sparse COO (rows, D): the U distinct rows read, sorted, each holding the sum of its reads'
        gradients in read order (repeatable bit for bit). Counting U costs one host sync.
    """
    width = table_shape[1]
    grads = grad_rows.reshape(-1, width)
    # Stable: the reads of one row stay in read order, which fixes the order of their sum.
    sorted_rows, order = torch.sort(row_ids.reshape(-1), stable=True)
    is_first = torch.ones_like(sorted_rows, dtype=torch.bool)
    is_first[1:] = sorted_rows[1:] != sorted_rows[:-1]
    first = is_first.nonzero().squeeze(1)
    rows = sorted_rows.index_select(0, first)
    # Most rows are read once: each row starts from its first read, and any repeats are added to it.
    values = grads.index_select(0, order.index_select(0, first))
    if first.numel() < sorted_rows.numel():
        repeats = (~is_first).nonzero().squeeze(1)
        run_of = is_first.cumsum(0) - 1
        values = values.float()
        values.index_add_(0, run_of.index_select(0, repeats), grads.index_select(0, order.index_select(0, repeats)).float())
    values = values.to(table_dtype)
    return torch.sparse_coo_tensor(
        rows.unsqueeze(0), values, tuple(table_shape), is_coalesced=True, check_invariants=False
    )


class _GatherRowsWithSparseGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, table: torch.Tensor, row_ids: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(row_ids)
        ctx.table_shape, ctx.table_dtype = table.shape, table.dtype
        return F.embedding(row_ids, table)

    @staticmethod
    def backward(ctx, grad_rows):
        (row_ids,) = ctx.saved_tensors
        return sparse_row_gradient(grad_rows, row_ids, ctx.table_shape, ctx.table_dtype), None


def gather_rows(table: torch.Tensor, row_ids: torch.Tensor, sparse_grad: bool = True) -> torch.Tensor:
    """`table[row_ids]` whose gradient to `table` is a coalesced sparse tensor (or dense with `sparse_grad=False`,
    for optimizers that take only dense gradients).

    Args:
        table: (rows, D) the table's weight.
        row_ids: (...) int64 rows to read.
    Returns:
        (..., D) in the table's dtype.
    """
    if not sparse_grad or not (table.requires_grad and torch.is_grad_enabled()):
        return F.embedding(row_ids, table)
    return _GatherRowsWithSparseGradient.apply(table, row_ids)


class _DenseGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, table: torch.Tensor) -> torch.Tensor:
        return table.view_as(table)

    @staticmethod
    def backward(ctx, grad):
        return grad.to_dense() if grad.is_sparse else grad


def dense_gradient(table: torch.Tensor) -> torch.Tensor:
    """`table` itself, whose gradient reaches the table dense: for a read whose op always returns a sparse
    gradient (the product-key bag), when the table was asked for dense gradients."""
    if not (table.requires_grad and torch.is_grad_enabled()):
        return table
    return _DenseGradient.apply(table)


__all__ = ["dense_gradient", "gather_rows", "sparse_row_gradient"]
