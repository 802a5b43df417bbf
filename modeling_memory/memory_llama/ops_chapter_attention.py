"""Chapter attention: each token attends, head by head, to the chapters it reads (its shared chapters
and its top-k routed ones), softmax within each chapter, and the per-chapter outputs are combined
with the token's chapter weights (MoE-style). This is the op under chapter memory.

The PyTorch path and the dispatcher that picks it or the Triton kernels of `kernels_chapter_attention.py`;
and the folded form training uses when it is cheaper (keys and values the same unprojected rows for every
head, the projections folded into the query and the output). The naive reference all of them are tested
against is `naive_chapter_attention.py`.

Shapes: N tokens, H heads, D head width, C chapters of T memory tokens, R chapters read per token.
"""

import torch

from .kernel_backend import kernel_choice


# Tokens processed together by the PyTorch paths: bounds the gathered K/V to TOKEN_BLOCK * R * T * H * D.
TOKEN_BLOCK = 1024


def _read_chapters(chapters: torch.Tensor, chapter_ids: torch.Tensor) -> torch.Tensor:
    """`chapters[chapter_ids]`, (n, R, ...), through `index_select`: its backward (`index_add_`) sums repeated
    reads in a fixed order, where advanced indexing's (`index_put_` with accumulate) does not on CPU threads."""
    return chapters.index_select(0, chapter_ids.reshape(-1)).view(*chapter_ids.shape, *chapters.shape[1:])


def chapter_attention_torch(
    query: torch.Tensor,
    bank_keys: torch.Tensor,
    bank_values: torch.Tensor,
    chapter_ids: torch.Tensor,
    chapter_weights: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """
    Args:
        query: (N, H, D).
        bank_keys, bank_values: (C, T, H, D) projected bank.
        chapter_ids: (N, R) int64 chapters each token reads.
        chapter_weights: (N, R) fp32 weight of each chapter's output.
        scale: softmax scale.
    Returns:
        (N, H, D) in the query's dtype; scores and softmax statistics in fp32.
    """
    outputs = []
    for start in range(0, query.shape[0], TOKEN_BLOCK):
        block = slice(start, start + TOKEN_BLOCK)
        keys = _read_chapters(bank_keys, chapter_ids[block])  # (n, R, T, H, D)
        values = _read_chapters(bank_values, chapter_ids[block])
        scores = torch.einsum("nhd,nrthd->nrht", query[block].float(), keys.float()) * scale
        probs = scores.softmax(dim=-1)
        per_chapter = torch.einsum("nrht,nrthd->nrhd", probs, values.float())
        outputs.append(torch.einsum("nr,nrhd->nhd", chapter_weights[block].float(), per_chapter))
    if not outputs:
        return query.new_zeros(query.shape)
    return torch.cat(outputs).to(query.dtype)


def chapter_attention_folded(
    query: torch.Tensor,
    bank_rows: torch.Tensor,
    chapter_ids: torch.Tensor,
    chapter_weights: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Chapter attention whose keys and values are the same (normed, unprojected) bank rows for every head: the
    folded form used in training (`MemoryLlamaChapterMemory.attend_folded`), where the query already carries the
    key projection and the output still needs the value projection.

    Args:
        query: (N, H, E) queries in the rows' space.
        bank_rows: (C, T, E) the rows of each chapter, read as keys and as values by every head.
        chapter_ids: (N, R) int64 chapters each token reads; chapter_weights (N, R) fp32.
        scale: softmax scale.
    Returns:
        (N, H, E) in the query's dtype; scores and softmax statistics in fp32.
    """
    num_tokens, num_heads, _ = query.shape
    reads, chapter_size = chapter_ids.shape[1], bank_rows.shape[1]
    outputs = []
    for start in range(0, num_tokens, TOKEN_BLOCK):
        block = slice(start, start + TOKEN_BLOCK)
        # Each token's R chapters side by side, (n, R * T, E): one product per token for all its heads and chapters.
        rows = _read_chapters(bank_rows, chapter_ids[block]).flatten(1, 2).float()
        scores = torch.bmm(query[block].float(), rows.transpose(1, 2)) * scale  # (n, H, R * T)
        probs = scores.view(-1, num_heads, reads, chapter_size).softmax(dim=-1)  # softmax within each chapter
        weighted = probs * chapter_weights[block].float()[:, None, :, None]
        outputs.append(torch.bmm(weighted.flatten(2), rows))
    if not outputs:
        return query.new_zeros(query.shape)
    return torch.cat(outputs).to(query.dtype)


def chapter_attention_runs_kernels(query: torch.Tensor) -> bool:
    """Whether `chapter_attention` runs the Triton kernels on `query` (see `kernel_backend.py`). The folded form has
    a PyTorch path only, so a layer may choose it only when the dispatcher would not run the kernels anyway."""
    return kernel_choice(query) == "triton"


def chapter_attention(query, bank_keys, bank_values, chapter_ids, chapter_weights, scale) -> torch.Tensor:
    """Dispatcher: Triton kernels when usable (see `kernel_backend.py`), the PyTorch path otherwise; same contract as
    `chapter_attention_torch`."""
    if chapter_attention_runs_kernels(query):
        from .kernels_chapter_attention import chapter_attention_triton

        return chapter_attention_triton(query, bank_keys, bank_values, chapter_ids, chapter_weights, scale)
    return chapter_attention_torch(query, bank_keys, bank_values, chapter_ids, chapter_weights, scale)
