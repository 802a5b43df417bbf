"""Tests of the two memory ops and their Triton kernels.

- PyTorch tier (always): the PyTorch paths of `ops_engram` and `ops_chapter_attention` against their naive
  references (`naive_engram`, `naive_chapter_attention`: per-token, per-head Python loops); the sparse row
  gradients of the table reads (`ops_table_rows`) against the dense gradients of `F.embedding`.
- Interpreter tier (`test_triton_*`, Triton installed): the kernels run on the CPU under the Triton
  interpreter in fp32 and fp16 against the PyTorch paths, forward and every gradient. The interpreter must be
  switched on (TRITON_INTERPRET=1) before Triton is first imported, which `import transformers` already
  does, so these tests run in a child process started with the variable set; the parent session keeps
  dispatching to the PyTorch paths. `TRITON_INTERPRET=1 pytest tests/test_kernels.py -k test_triton_`
  runs them directly.
- GPU tier (`test_gpu_*`, CUDA only): compiled kernels in fp32/fp16/bf16 on larger shapes.
"""


import pytest
import torch

from modeling_memory.memory_llama import kernel_backend, ops_chapter_attention, ops_engram
from kernel_tiers import compiled_kernel_modules, interpreted_kernel_modules, run_interpreter_tier, skip_unless_interpreted
from modeling_memory.memory_llama.naive_chapter_attention import naive_chapter_attention
from modeling_memory.memory_llama.naive_engram import naive_engram_lookup, naive_engram_row_ids, naive_history_lengths, naive_primes_from
from modeling_memory.memory_llama.ops_chapter_attention import chapter_attention_folded, chapter_attention_torch
from modeling_memory.memory_llama.ops_engram import EngramHashing, engram_history_lengths, engram_lookup_torch, engram_row_ids
from modeling_memory.memory_llama.ops_table_rows import gather_rows


# Kernel vs PyTorch path, per dtype: (atol, rtol). fp16 kernels round probabilities and score gradients to
# fp16 before their dot products (as flash attention does), the PyTorch path keeps them in fp32.
FORWARD_TOLERANCE = {torch.float32: (2e-5, 1e-5), torch.float16: (2e-3, 5e-3)}
GRAD_TOLERANCE = {torch.float32: (5e-5, 1e-4), torch.float16: (5e-3, 1e-2)}
# GPU tier, relative error of the whole tensor (norm of the difference / norm of the PyTorch path's).
GPU_RELATIVE_TOLERANCE = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}

KERNEL_MODULES = ("modeling_memory.memory_llama.kernels_engram", "modeling_memory.memory_llama.kernels_chapter_attention")
PRIMES = [11, 13, 17, 19, 23, 29, 31, 37, 41, 43, 47, 53]


# ----------------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------------


def make_engram_inputs(batch, new_len, orders, heads_per_order, head_dim, *, seed=0, vocab=50, primes=None,
                       repeated_token=None, dtype=torch.float32, device="cpu"):
    """Random Engram lookup inputs with document breaks, cached history and full-range int64 multipliers."""
    generator = torch.Generator().manual_seed(seed)
    history = max(orders) - 1
    token_ids = torch.randint(0, vocab, (batch, history + new_len), generator=generator)
    if repeated_token is not None:
        token_ids.fill_(repeated_token)
    boundary = torch.rand(batch, history + new_len, generator=generator) < 0.15
    boundary[:, :history] |= torch.rand(batch, 1, generator=generator) < 0.5  # some rows start without history
    history_lengths = engram_history_lengths(boundary, history)
    canonical_map = torch.randint(0, vocab - 7, (vocab,), generator=generator)
    pad_id = vocab
    # As the model draws them: odd, as large as int64 allows for ids up to the pad id.
    bound = (2**63 - 1) // (vocab + 1)
    multipliers = torch.randint(0, bound // 2, (history + 1,), generator=generator, dtype=torch.int64) * 2 + 1
    heads = heads_per_order * len(orders)
    primes = torch.tensor((primes or PRIMES)[:heads], dtype=torch.int64)
    offsets = torch.cumsum(primes, 0) - primes
    table = torch.nn.Embedding(int(primes.sum()), head_dim)
    with torch.no_grad():
        table.weight.normal_(generator=generator)
    table = table.to(device=device, dtype=dtype)
    hashing = EngramHashing(
        canonical_map.to(device), multipliers.to(device), primes.to(device), offsets.to(device), tuple(orders), pad_id
    )
    inputs = dict(token_ids=token_ids.to(device), history_lengths=history_lengths.to(device), hashing=hashing)
    return inputs, table, boundary


def make_chapter_inputs(num_tokens, num_heads, head_dim, num_chapters, chapter_size, num_shared, top_k, *,
                        seed=0, dtype=torch.float32, same_chapter=None, device="cpu"):
    """Query, projected bank, chapter ids (shared first, then top-k distinct routed ones) and weights."""
    generator = torch.Generator().manual_seed(seed)
    query = torch.randn(num_tokens, num_heads, head_dim, generator=generator)
    bank_keys = torch.randn(num_chapters, chapter_size, num_heads, head_dim, generator=generator)
    bank_values = torch.randn(num_chapters, chapter_size, num_heads, head_dim, generator=generator)
    routed_count = num_chapters - num_shared
    if same_chapter is not None:
        routed = torch.full((num_tokens, top_k), same_chapter, dtype=torch.long)
    else:
        routed = torch.rand(num_tokens, routed_count, generator=generator).argsort(dim=1)[:, :top_k] + num_shared
    shared = torch.arange(num_shared).expand(num_tokens, num_shared)
    chapter_ids = torch.cat([shared, routed], dim=1)
    routed_weights = torch.randn(num_tokens, top_k, generator=generator).softmax(dim=-1)
    chapter_weights = torch.cat([torch.full((num_tokens, num_shared), 1.0 / max(num_shared, 1)), routed_weights], 1)
    tensors = [t.to(device=device, dtype=dtype) for t in (query, bank_keys, bank_values)]
    return tensors + [chapter_ids.to(device), chapter_weights.to(device)]


def grads_of(output, inputs, grad_output):
    return torch.autograd.grad(output, inputs, grad_output)


def assert_close(actual, expected, tolerance, what):
    atol, rtol = tolerance
    torch.testing.assert_close(actual.float(), expected.float(), atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")


# ----------------------------------------------------------------------------------------------------
# PyTorch tier
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("orders", [[2, 3], [2, 4], [3]])
def test_engram_row_ids_match_naive_loop(orders):
    inputs, _, boundary = make_engram_inputs(3, 11, orders, heads_per_order=2, head_dim=4, seed=len(orders))
    history = max(orders) - 1
    assert torch.equal(inputs["history_lengths"], naive_history_lengths(boundary, history))
    rows = engram_row_ids(**inputs)
    assert torch.equal(rows, naive_engram_row_ids(**inputs))
    primes, offsets = inputs["hashing"].table_primes, inputs["hashing"].table_offsets
    heads = primes.numel()
    assert (rows >= offsets).all() and (rows < offsets + primes).all()
    assert rows.shape == (3, 11, heads)


def test_engram_lookup_torch_matches_naive_lookup():
    inputs, table, _ = make_engram_inputs(2, 9, [2, 3], heads_per_order=3, head_dim=5)
    e, rows = engram_lookup_torch(**inputs, table_weight=table.weight, return_row_ids=True)
    assert e.shape == (2, 9, 6 * 5)
    assert torch.equal(e, naive_engram_lookup(**inputs, table_weight=table.weight))
    assert torch.equal(rows, naive_engram_row_ids(**inputs))
    assert torch.equal(engram_lookup_torch(**inputs, table_weight=table.weight), e)


def dense_table_grad(table_weight, rows, grad_rows):
    """The dense gradient of `table_weight[rows]`, from torch's own embedding backward (fp32)."""
    weight = table_weight.detach().float().requires_grad_()
    (grad,) = torch.autograd.grad(torch.nn.functional.embedding(rows, weight), [weight], grad_rows.float())
    return grad


def assert_coalesced_rows(grad, rows):
    assert grad.is_sparse and grad.is_coalesced()
    assert torch.equal(grad.indices()[0], rows.unique())  # each row read, once, sorted


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_gather_rows_sparse_gradient_sums_repeated_rows(dtype):
    generator = torch.Generator().manual_seed(0)
    table = torch.randn(50, 6, generator=generator).to(dtype).requires_grad_()
    rows = torch.tensor([[3, 7, 3], [49, 3, 0]])  # row 3 read three times
    grad_rows = torch.randn(2, 3, 6, generator=generator).to(dtype)
    out = gather_rows(table, rows)
    assert torch.equal(out, table.detach()[rows])
    (grad,) = torch.autograd.grad(out, [table], grad_rows)
    assert_coalesced_rows(grad, rows)
    assert grad.dtype == dtype and grad.values().shape == (4, 6)
    # Summed in fp32 and rounded once: within one rounding of the fp32 sum.
    tolerance = (1e-6, 1e-6) if dtype == torch.float32 else (1e-3, 1e-3)
    assert_close(grad.to_dense(), dense_table_grad(table, rows, grad_rows), tolerance, "table grad")
    (again,) = torch.autograd.grad(gather_rows(table, rows), [table], grad_rows)
    assert torch.equal(again.values(), grad.values())  # repeatable bit for bit
    (dense,) = torch.autograd.grad(gather_rows(table, rows, sparse_grad=False), [table], grad_rows)
    assert dense.layout == torch.strided


def test_engram_lookup_torch_gives_sparse_row_gradient():
    inputs, table, _ = make_engram_inputs(3, 20, [2, 3], heads_per_order=2, head_dim=8, repeated_token=4)
    weight = table.weight.detach().clone().requires_grad_()
    out = engram_lookup_torch(**inputs, table_weight=weight)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    (grad,) = torch.autograd.grad(out, [weight], grad_out)
    rows = engram_row_ids(**inputs)
    assert_coalesced_rows(grad, rows)
    assert grad._nnz() < rows.numel() / 4  # one repeated token: far fewer rows than (token, head) reads
    expected = dense_table_grad(weight, rows, grad_out.view(*rows.shape, -1))
    torch.testing.assert_close(grad.to_dense(), expected, atol=1e-6, rtol=1e-6)


def test_engram_layer_calls_a_wrapped_table_as_a_module():
    """A table with an adapter on it is not read through its weight: the layer calls the module."""
    from conftest import tiny_config
    from modeling_memory.memory_llama.engram import MemoryLlamaEngram

    engram = MemoryLlamaEngram(tiny_config(), layer_idx=0)

    class ShiftedTable(torch.nn.Embedding):  # stands for a module with an adapter delta
        def forward(self, ids):
            return super().forward(ids) + 1.0

    token_ids = torch.randint(3, 90, (2, 2 + 6), generator=torch.Generator().manual_seed(0))
    history = engram_history_lengths(torch.zeros_like(token_ids, dtype=torch.bool), 2)
    canonical_map = torch.arange(97)
    plain = engram.lookup(token_ids, history, canonical_map)
    engram.table = ShiftedTable.from_pretrained(engram.table.weight.detach())
    torch.testing.assert_close(engram.lookup(token_ids, history, canonical_map), plain + 1.0)


@pytest.mark.parametrize("num_shared, top_k", [(1, 2), (0, 1), (1, 0), (2, 2)])
def test_chapter_attention_torch_matches_naive_loop(monkeypatch, num_shared, top_k):
    # Small token blocks so the PyTorch path's blocking is exercised too.
    monkeypatch.setattr(ops_chapter_attention, "TOKEN_BLOCK", 4)
    query, keys, values, ids, weights = make_chapter_inputs(10, 2, 8, 5, 7, num_shared, top_k, seed=top_k)
    inputs = [query.requires_grad_(), keys.requires_grad_(), values.requires_grad_(), weights.requires_grad_()]
    scale = 8**-0.5
    out = chapter_attention_torch(query, keys, values, ids, weights, scale)
    expected = naive_chapter_attention(query, keys, values, ids, weights, scale)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-5)
    grad = torch.randn_like(out)
    for got, want in zip(grads_of(out, inputs, grad), grads_of(expected, inputs, grad)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_folded_chapter_attention_reads_shared_rows_for_every_head(monkeypatch):
    """The folded form (the same rows as keys and values for every head) against the naive loop given those rows
    as every head's keys and values."""
    monkeypatch.setattr(ops_chapter_attention, "TOKEN_BLOCK", 4)
    query, _, _, ids, weights = make_chapter_inputs(10, 3, 12, 5, 7, 1, 2, seed=4)
    rows = torch.randn(5, 7, 12, generator=torch.Generator().manual_seed(5))
    inputs = [query.requires_grad_(), rows.requires_grad_(), weights.requires_grad_()]
    out = chapter_attention_folded(query, rows, ids, weights, 0.3)
    per_head = rows.unsqueeze(2).expand(5, 7, 3, 12)
    expected = naive_chapter_attention(query, per_head, per_head, ids, weights, 0.3)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-5)
    grad = torch.randn_like(out)
    for got, want in zip(grads_of(out, inputs, grad), grads_of(expected, inputs, grad)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_chapter_attention_torch_empty_and_half_precision():
    query, keys, values, ids, weights = make_chapter_inputs(0, 2, 8, 4, 3, 1, 1)
    assert chapter_attention_torch(query, keys, values, ids, weights, 1.0).shape == (0, 2, 8)
    query, keys, values, ids, weights = make_chapter_inputs(5, 2, 8, 4, 3, 1, 2, dtype=torch.float16)
    out = chapter_attention_torch(query, keys, values, ids, weights, 0.5)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.float(), naive_chapter_attention(query, keys, values, ids, weights, 0.5),
                               atol=2e-3, rtol=2e-3)


# ----------------------------------------------------------------------------------------------------
# Loading the kernel modules
# ----------------------------------------------------------------------------------------------------


INTERPRETED_KERNELS = interpreted_kernel_modules(KERNEL_MODULES)


@pytest.fixture(scope="module")
def interpreted():
    return skip_unless_interpreted(INTERPRETED_KERNELS)


def test_interpreter_tier_in_subprocess():
    """Runs the `test_triton_*` tests of this file in a child process started with TRITON_INTERPRET=1."""
    run_interpreter_tier(__file__, INTERPRETED_KERNELS)


@pytest.fixture(scope="module")
def compiled():
    return compiled_kernel_modules(KERNEL_MODULES)


# ----------------------------------------------------------------------------------------------------
# Interpreter tier: Engram
# ----------------------------------------------------------------------------------------------------


ENGRAM_CASES = {
    "two_orders": dict(batch=2, new_len=13, orders=[2, 3], heads_per_order=3, head_dim=16),
    "three_orders_odd_width": dict(batch=2, new_len=9, orders=[2, 3, 4], heads_per_order=1, head_dim=24),
    "repeated_rows": dict(batch=3, new_len=20, orders=[2, 3], heads_per_order=2, head_dim=8, repeated_token=4),
    "single_token": dict(batch=1, new_len=1, orders=[2, 3], heads_per_order=2, head_dim=16),
}


def run_engram(engram_kernels, case, dtype, seed=0, sparse_grad=True):
    """Kernel and PyTorch-path outputs and table gradients; the PyTorch path's gradient is dense, taken in fp32."""
    inputs, table, _ = make_engram_inputs(**ENGRAM_CASES[case], seed=seed, dtype=dtype)
    weight = table.weight.detach().clone().requires_grad_()
    out = engram_kernels.engram_lookup_triton(**inputs, table_weight=weight, sparse_grad=sparse_grad)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    (grad,) = grads_of(out, [weight], grad_out)
    expected_weight = weight.detach().float().requires_grad_()
    expected = engram_lookup_torch(**inputs, table_weight=expected_weight, sparse_grad=False)
    (expected_grad,) = grads_of(expected, [expected_weight], grad_out.float())
    return out, expected, grad, expected_grad, engram_row_ids(**inputs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", list(ENGRAM_CASES))
def test_triton_engram_kernel_matches_pytorch_path(interpreted, case, dtype):
    out, expected, grad, expected_grad, rows = run_engram(interpreted[0], case, dtype)
    assert out.dtype == dtype and grad.dtype == dtype
    # A gather: the forward is exact in every dtype.
    assert torch.equal(out.float(), expected)
    # Only the rows read, each once; the kernels accumulate in fp32 and round once: within one fp16
    # rounding of the fp32 PyTorch path.
    assert_coalesced_rows(grad, rows)
    assert_close(grad.to_dense(), expected_grad, (1e-6, 1e-6) if dtype == torch.float32 else (1e-3, 1e-3), "table grad")


def test_triton_engram_repeated_rows_accumulate_and_dense_on_request(interpreted):
    # Every token is the same id, so each head reads one row for all its tokens of the same history.
    out, _, grad, expected_grad, rows = run_engram(interpreted[0], "repeated_rows", torch.float32)
    assert grad._nnz() < out.shape[0] * out.shape[1] / 4  # far fewer rows than (token, head) reads
    torch.testing.assert_close(grad.to_dense(), expected_grad, atol=1e-5, rtol=1e-5)
    _, _, dense, _, _ = run_engram(interpreted[0], "repeated_rows", torch.float32, sparse_grad=False)
    assert dense.layout == torch.strided and torch.equal(dense, grad.to_dense())


def test_triton_engram_returns_row_ids_on_request(interpreted):
    """The rows the kernel read, with or without a gradient to compute (they are written then anyway)."""
    inputs, table, _ = make_engram_inputs(**ENGRAM_CASES["two_orders"])
    expected = engram_row_ids(**inputs)
    for needs_grad in (False, True):
        weight = table.weight.detach().clone().requires_grad_(needs_grad)
        out, rows = interpreted[0].engram_lookup_triton(**inputs, table_weight=weight, return_row_ids=True)
        assert rows.dtype == torch.int64 and torch.equal(rows, expected)
        assert torch.equal(out, engram_lookup_torch(**inputs, table_weight=weight.detach()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_triton_engram_backward_is_bitwise_repeatable(interpreted, dtype):
    first = run_engram(interpreted[0], "repeated_rows", dtype, seed=3)[2]
    second = run_engram(interpreted[0], "repeated_rows", dtype, seed=3)[2]
    assert torch.equal(first.indices(), second.indices()) and torch.equal(first.values(), second.values())


def test_triton_engram_dispatcher_uses_kernel(interpreted, monkeypatch):
    engram_kernels = interpreted[0]
    inputs, table, _ = make_engram_inputs(2, 5, [2, 3], heads_per_order=2, head_dim=8)
    calls = []
    original = engram_kernels.engram_lookup_triton
    monkeypatch.setattr(engram_kernels, "engram_lookup_triton", lambda *a, **k: calls.append(1) or original(*a, **k))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    kernel_backend.reload_settings()
    out = ops_engram.engram_lookup(**inputs, table_weight=table.weight)
    assert calls and torch.equal(out, engram_lookup_torch(**inputs, table_weight=table.weight))


# ----------------------------------------------------------------------------------------------------
# Interpreter tier: chapter attention
# ----------------------------------------------------------------------------------------------------


CHAPTER_CASES = {
    # N, H, D, C, T, shared, top_k: T = 40 is not a multiple of the 64-key tile.
    "general": dict(num_tokens=10, num_heads=2, head_dim=32, num_chapters=6, chapter_size=40, num_shared=1, top_k=2),
    # k = 1, width padded 48 -> 64, two key tiles with a ragged tail.
    "k1_odd_width": dict(num_tokens=7, num_heads=3, head_dim=48, num_chapters=5, chapter_size=70, num_shared=1, top_k=1),
    # Every token routed to chapter 1; 70 pairs per chapter span two 64-pair blocks.
    "same_chapter": dict(num_tokens=70, num_heads=1, head_dim=32, num_chapters=3, chapter_size=24, num_shared=1,
                         top_k=1, same_chapter=1),
    "single_token": dict(num_tokens=1, num_heads=1, head_dim=128, num_chapters=3, chapter_size=17, num_shared=1, top_k=1),
    # R = 1: only the shared chapter.
    "shared_only": dict(num_tokens=9, num_heads=2, head_dim=64, num_chapters=4, chapter_size=33, num_shared=1, top_k=0),
    "no_shared": dict(num_tokens=6, num_heads=2, head_dim=32, num_chapters=8, chapter_size=16, num_shared=0, top_k=3),
    "two_shared": dict(num_tokens=5, num_heads=2, head_dim=32, num_chapters=7, chapter_size=5, num_shared=2, top_k=2),
}


def run_chapter(chapter_kernels, case, dtype, seed=0):
    """Kernel and PyTorch-path outputs and gradients (query, keys, values, weights), both in `dtype`."""
    query, keys, values, ids, weights = make_chapter_inputs(**CHAPTER_CASES[case], seed=seed, dtype=dtype)
    scale = query.shape[-1] ** -0.5
    grad_out = torch.randn(query.shape, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    results = []
    for op in (chapter_kernels.chapter_attention_triton, chapter_attention_torch):
        inputs = [t.detach().clone().requires_grad_() for t in (query, keys, values, weights)]
        out = op(inputs[0], inputs[1], inputs[2], ids, inputs[3], scale)
        results.append((out, grads_of(out, inputs, grad_out)))
    return results


def check_chapter(results, dtype):
    (out, grads), (expected, expected_grads) = results
    assert out.dtype == dtype and out.shape == expected.shape
    assert_close(out, expected, FORWARD_TOLERANCE[dtype], "output")
    for name, got, want in zip(("query", "keys", "values", "weights"), grads, expected_grads):
        assert got.dtype == want.dtype, name
        assert_close(got, want, GRAD_TOLERANCE[dtype], f"grad of {name}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", list(CHAPTER_CASES))
def test_triton_chapter_kernel_matches_pytorch_path(interpreted, case, dtype):
    check_chapter(run_chapter(interpreted[1], case, dtype), dtype)


def test_triton_chapter_kernel_bank_grads_from_many_chunks(interpreted, monkeypatch):
    # Small dK/dV chunks: one chapter's gradient is atomically summed from several programs.
    chapter_kernels = interpreted[1]
    monkeypatch.setattr(chapter_kernels, "_CHUNK_PAIRS", 32)
    check_chapter(run_chapter(chapter_kernels, "same_chapter", torch.float32), torch.float32)


def test_triton_chapter_kernel_with_padded_grid(interpreted, monkeypatch):
    # The CUDA path launches an upper bound of blocks without a host sync; the extra blocks are empty.
    chapter_kernels = interpreted[1]
    original = chapter_kernels.group_pairs_by_chapter
    monkeypatch.setattr(
        chapter_kernels, "group_pairs_by_chapter", lambda ids, c, size, exact_grid: original(ids, c, size, False)
    )
    check_chapter(run_chapter(chapter_kernels, "general", torch.float32), torch.float32)


def test_triton_group_pairs_by_chapter(interpreted):
    group = interpreted[1].group_pairs_by_chapter
    ids = torch.tensor([[0, 3], [0, 3], [0, 1], [0, 3], [0, 3], [0, 3]])
    sorted_pairs, chapters, starts, ends = group(ids, 5, 2, exact_grid=True)
    flat = ids.flatten()
    assert torch.equal(flat[sorted_pairs], flat.sort().values)
    assert chapters.tolist() == [0, 0, 0, 1, 3, 3, 3]
    assert (ends - starts).tolist() == [2, 2, 2, 1, 2, 2, 1]
    _, padded_chapters, padded_starts, padded_ends = group(ids, 5, 2, exact_grid=False)
    used = padded_ends > padded_starts
    assert torch.equal(padded_chapters[used], chapters) and torch.equal(padded_starts[used], starts)
    assert not used[chapters.numel():].any()


def test_triton_chapter_dispatcher_and_frozen_bank(interpreted, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    kernel_backend.reload_settings()
    query, keys, values, ids, weights = make_chapter_inputs(**CHAPTER_CASES["general"])
    query.requires_grad_()
    out = ops_chapter_attention.chapter_attention(query, keys, values, ids, weights, 0.25)
    expected = chapter_attention_torch(query, keys, values, ids, weights, 0.25)
    assert_close(out, expected, FORWARD_TOLERANCE[torch.float32], "output")
    grad = torch.randn_like(out)
    assert_close(grads_of(out, [query], grad)[0], grads_of(expected, [query], grad)[0],
                 GRAD_TOLERANCE[torch.float32], "grad of query")


# ----------------------------------------------------------------------------------------------------
# GPU tier
# ----------------------------------------------------------------------------------------------------


def assert_relative(actual, expected, tolerance, what):
    error = (actual.float() - expected.float()).norm() / expected.float().norm().clamp_min(1e-12)
    assert error < tolerance, f"{what}: relative error {error:.2e} >= {tolerance:.0e}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_gpu_engram_kernel(compiled, dtype):
    engram_kernels = compiled[0]
    inputs, table, _ = make_engram_inputs(4, 512, [2, 3], heads_per_order=8, head_dim=32, vocab=1000,
                                          primes=naive_primes_from(1000, 16), dtype=dtype, device="cuda")
    weight = table.weight.detach().requires_grad_()
    out = engram_kernels.engram_lookup_triton(**inputs, table_weight=weight)
    expected = engram_lookup_torch(**inputs, table_weight=weight.detach())
    assert torch.equal(out, expected)
    grad_out = torch.randn_like(out)
    (grad,) = grads_of(out, [weight], grad_out)
    assert_coalesced_rows(grad, engram_row_ids(**inputs))
    expected_weight = weight.detach().float().requires_grad_()
    (expected_grad,) = grads_of(engram_lookup_torch(**inputs, table_weight=expected_weight, sparse_grad=False),
                                [expected_weight], grad_out.float())
    assert_relative(grad.to_dense(), expected_grad, GPU_RELATIVE_TOLERANCE[dtype], "table grad")
    (again,) = grads_of(engram_kernels.engram_lookup_triton(**inputs, table_weight=weight), [weight], grad_out)
    assert torch.equal(grad.values(), again.values())


@pytest.mark.parametrize("head_dim, chapter_size", [(64, 128), (128, 100), (32, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_gpu_chapter_kernel(compiled, dtype, head_dim, chapter_size):
    chapter_kernels = compiled[1]
    query, keys, values, ids, weights = make_chapter_inputs(2048, 4, head_dim, 64, chapter_size, 1, 2, dtype=dtype,
                                                            device="cuda")
    scale = head_dim**-0.5
    grad_out = torch.randn_like(query)
    results = []
    for op in (chapter_kernels.chapter_attention_triton, chapter_attention_torch):
        inputs = [t.detach().clone().requires_grad_() for t in (query, keys, values, weights)]
        out = op(inputs[0], inputs[1], inputs[2], ids, inputs[3], scale)
        results.append((out, grads_of(out, inputs, grad_out)))
    (out, grads), (expected, expected_grads) = results
    assert_relative(out, expected, GPU_RELATIVE_TOLERANCE[dtype], "output")
    for name, got, want in zip(("query", "keys", "values", "weights"), grads, expected_grads):
        assert_relative(got, want, GPU_RELATIVE_TOLERANCE[dtype], f"grad of {name}")
