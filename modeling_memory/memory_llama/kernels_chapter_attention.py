"""Triton kernels of chapter attention (`ops_chapter_attention.py` holds the PyTorch path and the
dispatcher, `naive_chapter_attention.py` the naive reference).

Every token reads R chapters, so there are P = N * R (token, chapter) pairs. The pairs are sorted by
chapter and cut into blocks that each hold pairs of one chapter only (the MoE grouped-GEMM pattern):
a program takes one block and one head, loads that chapter's K/V tiles once for the whole block and
runs a flash-attention loop over the chapter's T memory tokens. It writes the pair's output and
log-sum-exp in fp32; the outputs are then combined with the chapter weights.

Backward (flash-attention 2 style, softmax recomputed from the saved log-sum-exp):
- dq: per block of pairs, looping over the chapter's key tiles; per-pair dq summed over R afterwards.
- dK, dV: per (chunk of one chapter's pairs, key tile, head), looping over the chunk's pairs with the
  K/V tile held in registers. A chapter read by one chunk only (all but the most-read chapters) stores
  its tile straight into the bank gradient in the bank's dtype; the chunks of a chapter read by several
  add their tiles with fp32 `atomic_add`s into a scratch whose tiles are zeroed first and rounded into
  the gradient last (two cheap extra launches), so no pass ever touches the whole bank in fp32.
- dweights[n, r] = <dout[n], o[n, r]> over heads and width: per head in the dq kernel, which also
  stores the flash-attention delta that the dK/dV kernel reads.

Statistics and accumulators are fp32 for every input dtype. fp32 inputs use IEEE (not TF32) dots.
Imported only once `kernel_backend.triton_available()` is True; the guarded import keeps it
importable where Triton is missing. Without a GPU the kernels run only if TRITON_INTERPRET=1 was set
before this module was imported.
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

# Pairs per forward / dq program, and per dK/dV program (a chunk is looped over in BLOCK_PAIRS steps).
_BLOCK_PAIRS = 64
_CHUNK_PAIRS = 1024 if INTERPRETED else 256
# Tokens per program of the kernel that merges the R pair outputs of each token.
_COMBINE_TOKENS = 64 if INTERPRETED else 16
# Memory tokens per key tile (reduced for short chapters).
_BLOCK_KEYS = 64


if triton is not None:

    @triton.jit
    def _load_pair_block(sorted_pairs_ptr, start, end, reads_per_token, BLOCK_PAIRS: tl.constexpr):
        """Pairs in sorted positions [start, min(start + BLOCK_PAIRS, end)): (pair ids, tokens, valid mask)."""
        offs = start + tl.arange(0, BLOCK_PAIRS)
        pair_ok = offs < end
        pair = tl.load(sorted_pairs_ptr + offs, mask=pair_ok, other=0)
        return pair, pair // reads_per_token, pair_ok

    @triton.jit
    def _chapter_attention_forward_kernel(
        query_ptr, keys_ptr, values_ptr, sorted_pairs_ptr, block_chapter_ptr, block_start_ptr, block_end_ptr,
        pair_out_ptr, pair_lse_ptr,
        stride_qn, stride_qh, stride_kc, stride_kt, stride_kh, stride_vc, stride_vt, stride_vh,
        chapter_size, head_dim, num_heads, reads_per_token, scale,
        BLOCK_PAIRS: tl.constexpr, BLOCK_KEYS: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
    ):
        block = tl.program_id(0)
        head = tl.program_id(1)
        chapter = tl.load(block_chapter_ptr + block)
        start = tl.load(block_start_ptr + block)
        end = tl.load(block_end_ptr + block)
        pair, token, pair_ok = _load_pair_block(sorted_pairs_ptr, start, end, reads_per_token, BLOCK_PAIRS)
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < head_dim
        q = tl.load(
            query_ptr + token[:, None] * stride_qn + head * stride_qh + offs_d[None, :],
            mask=pair_ok[:, None] & d_ok[None, :],
            other=0.0,
        )
        keys_base = keys_ptr + chapter * stride_kc + head * stride_kh
        values_base = values_ptr + chapter * stride_vc + head * stride_vh

        row_max = tl.full([BLOCK_PAIRS], float("-inf"), dtype=tl.float32)
        row_sum = tl.zeros([BLOCK_PAIRS], dtype=tl.float32)
        acc = tl.zeros([BLOCK_PAIRS, BLOCK_D], dtype=tl.float32)
        # Empty blocks (padding of the grid on CUDA) skip the loop and store nothing.
        num_keys = tl.where(start < end, chapter_size, 0)
        for key_start in range(0, num_keys, BLOCK_KEYS):
            offs_n = key_start + tl.arange(0, BLOCK_KEYS)
            key_ok = offs_n < chapter_size
            kv_mask = key_ok[:, None] & d_ok[None, :]
            k = tl.load(keys_base + offs_n[:, None] * stride_kt + offs_d[None, :], mask=kv_mask, other=0.0)
            scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale
            scores = tl.where(key_ok[None, :], scores, float("-inf"))
            new_max = tl.maximum(row_max, tl.max(scores, axis=1))
            rescale = tl.exp(row_max - new_max)
            probs = tl.exp(scores - new_max[:, None])
            row_sum = row_sum * rescale + tl.sum(probs, axis=1)
            v = tl.load(values_base + offs_n[:, None] * stride_vt + offs_d[None, :], mask=kv_mask, other=0.0)
            acc = acc * rescale[:, None] + tl.dot(probs.to(v.dtype), v, input_precision=DOT_PRECISION)
            row_max = new_max
        safe_sum = tl.where(row_sum > 0, row_sum, 1.0)
        out = acc / safe_sum[:, None]
        lse = row_max + tl.log(safe_sum)
        out_rows = pair.to(tl.int64) * num_heads + head
        tl.store(pair_out_ptr + out_rows[:, None] * head_dim + offs_d[None, :], out, mask=pair_ok[:, None] & d_ok[None, :])
        tl.store(pair_lse_ptr + out_rows, lse, mask=pair_ok)

    @triton.jit
    def _chapter_attention_dq_kernel(
        query_ptr, keys_ptr, values_ptr, grad_out_ptr, weights_ptr, pair_out_ptr, pair_lse_ptr, pair_delta_ptr,
        head_dots_ptr, sorted_pairs_ptr, block_chapter_ptr, block_start_ptr, block_end_ptr, pair_dq_ptr,
        stride_qn, stride_qh, stride_kc, stride_kt, stride_kh, stride_vc, stride_vt, stride_vh,
        stride_gn, stride_gh,
        chapter_size, head_dim, num_heads, reads_per_token, scale,
        BLOCK_PAIRS: tl.constexpr, BLOCK_KEYS: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
    ):
        block = tl.program_id(0)
        head = tl.program_id(1)
        chapter = tl.load(block_chapter_ptr + block)
        start = tl.load(block_start_ptr + block)
        end = tl.load(block_end_ptr + block)
        pair, token, pair_ok = _load_pair_block(sorted_pairs_ptr, start, end, reads_per_token, BLOCK_PAIRS)
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < head_dim
        row_mask = pair_ok[:, None] & d_ok[None, :]
        q = tl.load(query_ptr + token[:, None] * stride_qn + head * stride_qh + offs_d[None, :], mask=row_mask, other=0.0)
        # The pair's output is weight * o_pair, so its output gradient is weight * dout[token].
        weight = tl.load(weights_ptr + pair, mask=pair_ok, other=0.0)
        grad = tl.load(grad_out_ptr + token[:, None] * stride_gn + head * stride_gh + offs_d[None, :], mask=row_mask, other=0.0)
        stat_rows = pair.to(tl.int64) * num_heads + head
        # <dout, o_pair> of this head: summed over heads it is the weight's gradient; times the weight it is
        # the flash-attention "delta" (rowsum of dO_pair * O_pair), which the dK/dV kernel reads back.
        pair_out = tl.load(pair_out_ptr + stat_rows[:, None] * head_dim + offs_d[None, :], mask=row_mask, other=0.0)
        head_dot = tl.sum(grad.to(tl.float32) * pair_out, axis=1)
        delta = weight * head_dot
        tl.store(head_dots_ptr + stat_rows, head_dot, mask=pair_ok)
        tl.store(pair_delta_ptr + stat_rows, delta, mask=pair_ok)
        grad = (weight[:, None] * grad.to(tl.float32)).to(q.dtype)
        lse = tl.load(pair_lse_ptr + stat_rows, mask=pair_ok, other=0.0)
        keys_base = keys_ptr + chapter * stride_kc + head * stride_kh
        values_base = values_ptr + chapter * stride_vc + head * stride_vh

        dq = tl.zeros([BLOCK_PAIRS, BLOCK_D], dtype=tl.float32)
        num_keys = tl.where(start < end, chapter_size, 0)
        for key_start in range(0, num_keys, BLOCK_KEYS):
            offs_n = key_start + tl.arange(0, BLOCK_KEYS)
            key_ok = offs_n < chapter_size
            kv_mask = key_ok[:, None] & d_ok[None, :]
            k = tl.load(keys_base + offs_n[:, None] * stride_kt + offs_d[None, :], mask=kv_mask, other=0.0)
            v = tl.load(values_base + offs_n[:, None] * stride_vt + offs_d[None, :], mask=kv_mask, other=0.0)
            scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale
            probs = tl.where(key_ok[None, :], tl.exp(scores - lse[:, None]), 0.0)
            grad_probs = tl.dot(grad, tl.trans(v), input_precision=DOT_PRECISION)
            grad_scores = probs * (grad_probs - delta[:, None])
            dq += tl.dot(grad_scores.to(k.dtype), k, input_precision=DOT_PRECISION)
        dq = dq * scale
        tl.store(pair_dq_ptr + stat_rows[:, None] * head_dim + offs_d[None, :], dq, mask=row_mask)

    @triton.jit
    def _chapter_attention_combine_kernel(
        pair_out_ptr, weights_ptr, out_ptr, num_tokens, reads_per_token, row_width,
        BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr,
    ):
        """out[n] = sum_r weights[n, r] * pair_out[n, r] over rows of width H * D, summed in fp32."""
        offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_w = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
        token_ok = offs_n < num_tokens
        mask = token_ok[:, None] & (offs_w < row_width)[None, :]
        total = tl.zeros([BLOCK_N, BLOCK_W], dtype=tl.float32)
        for r in range(reads_per_token):
            pair = offs_n.to(tl.int64) * reads_per_token + r
            weight = tl.load(weights_ptr + pair, mask=token_ok, other=0.0)
            rows = tl.load(pair_out_ptr + pair[:, None] * row_width + offs_w[None, :], mask=mask, other=0.0)
            total += weight[:, None] * rows
        tl.store(out_ptr + offs_n.to(tl.int64)[:, None] * row_width + offs_w[None, :], total.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _chapter_attention_dkdv_kernel(
        query_ptr, keys_ptr, values_ptr, grad_out_ptr, weights_ptr, pair_lse_ptr, pair_delta_ptr,
        sorted_pairs_ptr, chunk_chapter_ptr, chunk_start_ptr, chunk_end_ptr, chapter_ids_ptr, grad_keys_ptr,
        grad_values_ptr, scratch_keys_ptr, scratch_values_ptr,
        stride_qn, stride_qh, stride_kc, stride_kt, stride_kh, stride_vc, stride_vt, stride_vh,
        stride_gn, stride_gh,
        chapter_size, head_dim, num_heads, reads_per_token, num_pairs, scale,
        STAGE: tl.constexpr,
        BLOCK_PAIRS: tl.constexpr, BLOCK_KEYS: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
    ):
        """STAGE 0: zero the scratch tiles of chapters read by several chunks; 1: dK/dV of the chunk;
        2: round those scratch tiles into the bank gradients. Stages 0 and 2 act in each such chapter's first chunk."""
        chunk = tl.program_id(0)
        key_block = tl.program_id(1)
        head = tl.program_id(2)
        chapter = tl.load(chunk_chapter_ptr + chunk)
        start = tl.load(chunk_start_ptr + chunk)
        end = tl.load(chunk_end_ptr + chunk)
        # The chunk starts (ends) its chapter's run of sorted pairs when the pair before (after) it reads another chapter.
        pair_before = tl.load(sorted_pairs_ptr + tl.maximum(start - 1, 0))
        pair_after = tl.load(sorted_pairs_ptr + tl.minimum(end, num_pairs - 1))
        first_chunk = (start == 0) | (tl.load(chapter_ids_ptr + pair_before) != chapter)
        last_chunk = (end >= num_pairs) | (tl.load(chapter_ids_ptr + pair_after) != chapter)
        shared_tile = (start < end) & (first_chunk.to(tl.int32) + last_chunk.to(tl.int32) < 2)
        offs_n = key_block * BLOCK_KEYS + tl.arange(0, BLOCK_KEYS)
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < head_dim
        # Bank gradients and scratches are contiguous (C, T, H, D).
        bank_offsets = ((chapter * chapter_size + offs_n.to(tl.int64)) * num_heads + head)[:, None] * head_dim + offs_d[None, :]
        # Stages 0 and 2 cover the keys of the first chunk of a chapter read by several chunks, none elsewhere.
        scratch_keys = tl.where(shared_tile & first_chunk, chapter_size, 0)
        if STAGE == 0:
            zero_mask = (offs_n < scratch_keys)[:, None] & d_ok[None, :]
            zeros = tl.zeros([BLOCK_KEYS, BLOCK_D], dtype=tl.float32)
            tl.store(scratch_keys_ptr + bank_offsets, zeros, mask=zero_mask)
            tl.store(scratch_values_ptr + bank_offsets, zeros, mask=zero_mask)
            return
        if STAGE == 2:
            copy_mask = (offs_n < scratch_keys)[:, None] & d_ok[None, :]
            dk = tl.load(scratch_keys_ptr + bank_offsets, mask=copy_mask, other=0.0)
            dv = tl.load(scratch_values_ptr + bank_offsets, mask=copy_mask, other=0.0)
            tl.store(grad_keys_ptr + bank_offsets, dk.to(grad_keys_ptr.dtype.element_ty), mask=copy_mask)
            tl.store(grad_values_ptr + bank_offsets, dv.to(grad_values_ptr.dtype.element_ty), mask=copy_mask)
            return
        # Empty chunks (padding of the grid on CUDA) see no keys, so they neither load nor add anything.
        key_ok = offs_n < tl.where(start < end, chapter_size, 0)
        kv_mask = key_ok[:, None] & d_ok[None, :]
        k = tl.load(keys_ptr + chapter * stride_kc + head * stride_kh + offs_n[:, None] * stride_kt + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(values_ptr + chapter * stride_vc + head * stride_vh + offs_n[:, None] * stride_vt + offs_d[None, :], mask=kv_mask, other=0.0)

        dk = tl.zeros([BLOCK_KEYS, BLOCK_D], dtype=tl.float32)
        dv = tl.zeros([BLOCK_KEYS, BLOCK_D], dtype=tl.float32)
        for pair_start in range(start, end, BLOCK_PAIRS):
            pair, token, pair_ok = _load_pair_block(sorted_pairs_ptr, pair_start, end, reads_per_token, BLOCK_PAIRS)
            row_mask = pair_ok[:, None] & d_ok[None, :]
            q = tl.load(query_ptr + token[:, None] * stride_qn + head * stride_qh + offs_d[None, :], mask=row_mask, other=0.0)
            weight = tl.load(weights_ptr + pair, mask=pair_ok, other=0.0)
            grad = tl.load(grad_out_ptr + token[:, None] * stride_gn + head * stride_gh + offs_d[None, :], mask=row_mask, other=0.0)
            grad = (weight[:, None] * grad.to(tl.float32)).to(k.dtype)
            stat_rows = pair.to(tl.int64) * num_heads + head
            lse = tl.load(pair_lse_ptr + stat_rows, mask=pair_ok, other=0.0)
            delta = tl.load(pair_delta_ptr + stat_rows, mask=pair_ok, other=0.0)
            scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale
            probs = tl.where(pair_ok[:, None] & key_ok[None, :], tl.exp(scores - lse[:, None]), 0.0)
            dv += tl.dot(tl.trans(probs.to(v.dtype)), grad, input_precision=DOT_PRECISION)
            grad_probs = tl.dot(grad, tl.trans(v), input_precision=DOT_PRECISION)
            grad_scores = probs * (grad_probs - delta[:, None])
            dk += tl.dot(tl.trans(grad_scores.to(q.dtype)), q, input_precision=DOT_PRECISION)
        dk = dk * scale
        if shared_tile:
            # Other chunks of the same chapter add to the same tile.
            tl.atomic_add(scratch_keys_ptr + bank_offsets, dk, mask=kv_mask)
            tl.atomic_add(scratch_values_ptr + bank_offsets, dv, mask=kv_mask)
        else:
            tl.store(grad_keys_ptr + bank_offsets, dk.to(grad_keys_ptr.dtype.element_ty), mask=kv_mask)
            tl.store(grad_values_ptr + bank_offsets, dv.to(grad_values_ptr.dtype.element_ty), mask=kv_mask)


def group_pairs_by_chapter(chapter_ids: torch.Tensor, num_chapters: int, block_size: int, exact_grid: bool):
    """Sort the (token, chapter) pairs by chapter and cut them into blocks of one chapter each.

    Args:
        chapter_ids: (N, R) int64.
        num_chapters: C.
        block_size: most pairs per block.
        exact_grid: count the blocks on the host (a device sync); otherwise return the upper bound
            ceil(P / block_size) + min(C, P) of blocks, the extra ones empty (start == end).
    Returns:
        sorted_pairs (P,) int64 pair ids (n * R + r) in chapter order, and per block:
        block_chapter, block_start, block_end (num_blocks,) int64 (a block covers sorted positions
        [start, end), all of chapter block_chapter).
    """
    device = chapter_ids.device
    flat = chapter_ids.reshape(-1)
    num_pairs = flat.numel()
    # Stable: pairs of one chapter stay in token order, which keeps the kernels' reads local. int32 keys
    # halve the radix sort's passes.
    sorted_chapters, sorted_pairs = torch.sort(flat.to(torch.int32) if num_chapters < 2**31 else flat, stable=True)
    chapters = torch.arange(num_chapters, device=device, dtype=sorted_chapters.dtype)
    chapter_start = torch.searchsorted(sorted_chapters, chapters)
    chapter_end = torch.searchsorted(sorted_chapters, chapters, right=True)
    blocks_per_chapter = (chapter_end - chapter_start + block_size - 1) // block_size
    blocks_through_chapter = blocks_per_chapter.cumsum(0)
    if exact_grid:
        num_blocks = int(blocks_through_chapter[-1])
    else:
        num_blocks = triton.cdiv(num_pairs, block_size) + min(num_chapters, num_pairs)
    block_index = torch.arange(num_blocks, device=device)
    block_chapter = torch.searchsorted(blocks_through_chapter, block_index, right=True)
    used = block_chapter < num_chapters
    block_chapter = block_chapter.clamp(max=num_chapters - 1)
    first_block_of_chapter = blocks_through_chapter[block_chapter] - blocks_per_chapter[block_chapter]
    block_start = chapter_start[block_chapter] + (block_index - first_block_of_chapter) * block_size
    block_end = torch.minimum(block_start + block_size, chapter_end[block_chapter])
    block_start = torch.where(used, block_start, 0)
    block_end = torch.where(used, block_end, 0)
    return sorted_pairs, block_chapter, block_start, block_end


def _kernel_settings(query: torch.Tensor, chapter_size: int) -> dict:
    head_dim = query.shape[-1]
    block_d = max(16, next_power_of_2(head_dim))
    # Wide fp32 rows: halve the key tile so the pipelined K/V tiles fit in shared memory.
    block_keys = _BLOCK_KEYS // 2 if block_d * query.element_size() > 256 else _BLOCK_KEYS
    return dict(
        BLOCK_KEYS=max(16, min(block_keys, next_power_of_2(chapter_size))),
        BLOCK_D=block_d,
        # "tf32" is Triton's default on CUDA and only affects fp32 operands; fp32 inputs get exact products.
        DOT_PRECISION="ieee" if query.dtype == torch.float32 else "tf32",
        num_warps=8 if block_d >= 128 else 4,
        num_stages=2,
    )


def _check_inputs(query, bank_keys, bank_values, chapter_ids, chapter_weights) -> None:
    check_kernel_device(query, "chapter-attention", __name__, INTERPRETED)
    num_tokens, num_heads, head_dim = query.shape
    if bank_keys.shape != bank_values.shape or bank_keys.shape[2:] != (num_heads, head_dim):
        raise ValueError(
            f"bank_keys {tuple(bank_keys.shape)} and bank_values {tuple(bank_values.shape)} must both be "
            f"(C, T, {num_heads}, {head_dim}) for a query of shape {tuple(query.shape)}."
        )
    if chapter_ids.shape != chapter_weights.shape or chapter_ids.shape[0] != num_tokens:
        raise ValueError(
            f"chapter_ids {tuple(chapter_ids.shape)} and chapter_weights {tuple(chapter_weights.shape)} must "
            f"both be ({num_tokens}, R)."
        )


class ChapterAttentionFunction(torch.autograd.Function):
    """Routed chapter attention; gradients to query, bank keys, bank values and chapter weights."""

    @staticmethod
    def forward(ctx, query, bank_keys, bank_values, chapter_ids, chapter_weights, scale):
        num_tokens, num_heads, head_dim = query.shape
        num_chapters, chapter_size = bank_keys.shape[:2]
        reads = chapter_ids.shape[1]
        weights = chapter_weights.float().contiguous()
        pair_out = torch.empty(num_tokens * reads, num_heads, head_dim, dtype=torch.float32, device=query.device)
        pair_lse = torch.empty(num_tokens * reads, num_heads, dtype=torch.float32, device=query.device)
        settings = _kernel_settings(query, chapter_size)
        sorted_pairs, block_chapter, block_start, block_end = group_pairs_by_chapter(
            chapter_ids, num_chapters, _BLOCK_PAIRS, exact_grid=not query.is_cuda
        )
        if block_chapter.numel() > 0:
            _chapter_attention_forward_kernel[(block_chapter.numel(), num_heads)](
                query, bank_keys, bank_values, sorted_pairs, block_chapter, block_start, block_end, pair_out, pair_lse,
                query.stride(0), query.stride(1), *bank_keys.stride()[:3], *bank_values.stride()[:3],
                chapter_size, head_dim, num_heads, reads, scale,
                BLOCK_PAIRS=_BLOCK_PAIRS, **settings,
            )
        # One pass over pair_out (einsum would run this as a slow batched GEMV).
        out = torch.empty(num_tokens, num_heads, head_dim, dtype=query.dtype, device=query.device)
        row_width = num_heads * head_dim
        block_w = min(next_power_of_2(row_width), 256)
        _chapter_attention_combine_kernel[(triton.cdiv(num_tokens, _COMBINE_TOKENS), triton.cdiv(row_width, block_w))](
            pair_out, weights, out, num_tokens, reads, row_width, BLOCK_N=_COMBINE_TOKENS, BLOCK_W=block_w,
        )
        ctx.save_for_backward(
            query, bank_keys, bank_values, chapter_ids, weights, pair_out, pair_lse, sorted_pairs, block_chapter,
            block_start, block_end,
        )
        ctx.scale = scale
        ctx.weights_dtype = chapter_weights.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        (query, bank_keys, bank_values, chapter_ids, weights, pair_out, pair_lse, sorted_pairs, block_chapter, block_start,
         block_end) = ctx.saved_tensors
        num_tokens, num_heads, head_dim = query.shape
        num_chapters, chapter_size = bank_keys.shape[:2]
        reads = weights.shape[1]
        grad_out = grad_out.contiguous()
        settings = _kernel_settings(query, chapter_size)
        strides = (
            query.stride(0), query.stride(1), *bank_keys.stride()[:3], *bank_values.stride()[:3],
            grad_out.stride(0), grad_out.stride(1),
        )
        sizes = (chapter_size, head_dim, num_heads, reads, ctx.scale)
        grad_query = grad_keys = grad_values = None
        # The dq kernel also writes every pair's per-head <dout, o_pair> and delta (needed by dK/dV), so it
        # always runs. Every pair row of its outputs is written.
        pair_dq = torch.empty(num_tokens * reads, num_heads, head_dim, dtype=torch.float32, device=query.device)
        head_dots = torch.empty(num_tokens * reads, num_heads, dtype=torch.float32, device=query.device)
        pair_delta = torch.empty_like(head_dots)
        if block_chapter.numel() > 0:
            _chapter_attention_dq_kernel[(block_chapter.numel(), num_heads)](
                query, bank_keys, bank_values, grad_out, weights, pair_out, pair_lse, pair_delta, head_dots,
                sorted_pairs, block_chapter, block_start, block_end, pair_dq, *strides, *sizes,
                BLOCK_PAIRS=_BLOCK_PAIRS, **settings,
            )
        grad_weights = head_dots.view(num_tokens, reads, num_heads).sum(-1).to(ctx.weights_dtype)
        if ctx.needs_input_grad[0]:
            grad_query = pair_dq.view(num_tokens, reads, num_heads, head_dim).sum(1).to(query.dtype)
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            # Zeros for the chapters no token reads; every read chapter's tiles are written by the kernel.
            grad_keys = torch.zeros(bank_keys.shape, dtype=bank_keys.dtype, device=query.device)
            grad_values = torch.zeros(bank_values.shape, dtype=bank_values.dtype, device=query.device)
            # Uninitialised on purpose: only the tiles of chapters read by several chunks are zeroed and used.
            scratch_keys = torch.empty(bank_keys.shape, dtype=torch.float32, device=query.device)
            scratch_values = torch.empty(bank_values.shape, dtype=torch.float32, device=query.device)
            _, chunk_chapter, chunk_start, chunk_end = group_pairs_by_chapter(
                chapter_ids, num_chapters, _CHUNK_PAIRS, exact_grid=not query.is_cuda
            )
            key_blocks = triton.cdiv(chapter_size, settings["BLOCK_KEYS"])
            if chunk_chapter.numel() > 0:
                for stage in (0, 1, 2):
                    _chapter_attention_dkdv_kernel[(chunk_chapter.numel(), key_blocks, num_heads)](
                        query, bank_keys, bank_values, grad_out, weights, pair_lse, pair_delta,
                        sorted_pairs, chunk_chapter, chunk_start, chunk_end, chapter_ids, grad_keys, grad_values,
                        scratch_keys, scratch_values, *strides, chapter_size, head_dim, num_heads, reads,
                        num_tokens * reads, ctx.scale, STAGE=stage, BLOCK_PAIRS=_BLOCK_PAIRS, **settings,
                    )
            grad_keys = grad_keys if ctx.needs_input_grad[1] else None
            grad_values = grad_values if ctx.needs_input_grad[2] else None
        return grad_query, grad_keys, grad_values, None, grad_weights, None


def chapter_attention_triton(
    query: torch.Tensor,
    bank_keys: torch.Tensor,
    bank_values: torch.Tensor,
    chapter_ids: torch.Tensor,
    chapter_weights: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Routed chapter attention; same contract as `ops_chapter_attention.chapter_attention_torch`.

    Args:
        query: (N, H, D), D up to 128 (padded to a power of two inside the kernels).
        bank_keys, bank_values: (C, T, H, D) projected bank; cast to the query's dtype if they differ.
        chapter_ids: (N, R) int64 chapters each token reads, each in [0, C).
        chapter_weights: (N, R) weight of each chapter's output (fp32 recommended).
        scale: softmax scale.
    Returns:
        (N, H, D) in the query's dtype.
    """
    _check_inputs(query, bank_keys, bank_values, chapter_ids, chapter_weights)
    if query.shape[0] == 0:
        return query.new_zeros(query.shape)
    # The kernels read width-contiguous rows and dot operands of one dtype.
    query = query if query.stride(-1) == 1 else query.contiguous()
    bank_keys = bank_keys.to(query.dtype)
    bank_values = bank_values.to(query.dtype)
    bank_keys = bank_keys if bank_keys.stride(-1) == 1 else bank_keys.contiguous()
    bank_values = bank_values if bank_values.stride(-1) == 1 else bank_values.contiguous()
    chapter_ids = chapter_ids.to(device=query.device, dtype=torch.int64).contiguous()
    return ChapterAttentionFunction.apply(query, bank_keys, bank_values, chapter_ids, chapter_weights, float(scale))
