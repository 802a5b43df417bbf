"""Tests of the product-key memory layer, its ops and its Triton kernels.

- PyTorch tier (always): the product-key search against the naive brute-force search over all N = n**2 slots
  (`naive_product_keys`), the bag's PyTorch path against the naive bag;
  the layer against a dense reference (softmax over the top-k of all N scores, a dense (T, N) weight
  matrix times the table); fp32 softmax for half inputs; zero output at birth and which gradients flow
  on the first and second steps; the sparse, coalesced values gradient; a values table shared by two
  layers; constructor errors.
- Interpreter tier (`test_triton_*`, Triton installed): the bag kernels on the CPU under the Triton
  interpreter in fp32 and fp16 against the PyTorch path, forward, weight gradients and values gradients.
  As in test_kernels.py, they run in a child process started with TRITON_INTERPRET=1
  (`test_interpreter_tier_in_subprocess`); `TRITON_INTERPRET=1 pytest tests/test_product_key_memory.py
  -k test_triton_` runs them directly.
- GPU tier (`test_gpu_*`, CUDA only): compiled kernels in fp32/fp16/bf16 on larger shapes.
"""


import pytest
import torch
import torch.nn.functional as F

from modeling_memory.memory_llama import kernel_backend, ops_product_keys
from modeling_memory.memory_llama.kernel_backend import KERNELS_ENV
from kernel_tiers import compiled_kernel_modules, interpreted_kernel_modules, run_interpreter_tier, skip_unless_interpreted
from modeling_memory.memory_llama.naive_product_keys import naive_product_key_bag, naive_product_key_scores, naive_product_key_topk
from modeling_memory.memory_llama.ops_product_keys import product_key_bag_torch, product_key_topk
from modeling_memory import MemoryLlamaForCausalLM
from conftest import tiny_config
from test_kernels import assert_close, assert_relative, grads_of


# Kernel vs PyTorch path, per dtype: (atol, rtol). Both accumulate in fp32 and round the output and the
# values gradient once to the values' dtype, so fp16 differs by at most one fp16 rounding; the weight
# gradients are fp32 dot products of fp16 numbers (exact products), differing only in summation order.
BAG_FORWARD_TOLERANCE = {torch.float32: (1e-5, 1e-5), torch.float16: (1e-3, 1e-3)}
BAG_WEIGHTS_GRAD_TOLERANCE = {torch.float32: (2e-5, 1e-5), torch.float16: (2e-5, 1e-5)}
BAG_VALUES_GRAD_TOLERANCE = {torch.float32: (1e-5, 1e-5), torch.float16: (1e-3, 1e-3)}
# GPU tier, relative error of the whole tensor (norm of the difference / norm of the PyTorch path's).
GPU_RELATIVE_TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}
# Layer vs the dense reference (fp32; only the summation order differs).
LAYER_TOLERANCE = (1e-5, 1e-5)
LAYER_GRAD_TOLERANCE = (1e-5, 1e-4)

KERNEL_MODULES = ("modeling_memory.memory_llama.kernels_product_keys",)
PEFT_LIKE_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# ----------------------------------------------------------------------------------------------------
# Inputs and the dense layer
# ----------------------------------------------------------------------------------------------------


def pkm_config(hidden_size=24, num_keys=6, top_k=3, heads=2, key_dim=8, value_dim=None, query_norm=True,
               layers=(0,), share_values=False, initializer_range=0.2):
    """A model config with product-key memory only, at `layers` of as many decoder layers."""
    return tiny_config(
        hidden_size=hidden_size, num_hidden_layers=max(layers) + 1, chapter_layers=[], engram_layers=[],
        pkm_layers=list(layers), pkm_num_keys=num_keys, pkm_top_k=top_k, pkm_heads=heads, pkm_key_dim=key_dim,
        pkm_value_dim=value_dim, pkm_query_norm=query_norm, pkm_share_values=share_values,
        initializer_range=initializer_range,
    )


def make_memory(seed=0, random_values=True, dtype=torch.float32, **settings):
    """The memory of a model built from `pkm_config(**settings)`, with its own values table, initialised by the
    model's `_init_weights`; with `random_values` its table is redrawn from N(0, 1) so that the output and every
    gradient are non-zero."""
    torch.manual_seed(seed)
    memory = MemoryLlamaForCausalLM(pkm_config(**settings)).model.layers[0].product_key_memory
    if random_values:
        with torch.no_grad():
            memory.pkm_values.weight.normal_()
    return memory.to(dtype)


def update_of(memory, hidden_states, shared_values=None):
    """The memory's residual update (the first of what it returns)."""
    return memory(hidden_states, shared_values)[0]


def dense_memory(memory, hidden_states, values):
    """The layer computed densely: top-k of all N scores, softmax, a (T, N) weight matrix times `values`."""
    batch, seq_len, hidden = hidden_states.shape
    flat = hidden_states.reshape(-1, hidden)
    query = memory.pkm_query(flat).view(-1, memory.heads, memory.key_dim)
    if memory.pkm_query_norm is not None:
        query = memory.pkm_query_norm(query)
    top_scores, slots = naive_product_key_topk(query, memory.pkm_keys, memory.top_k)
    weights = top_scores.softmax(dim=-1)
    dense_weights = torch.zeros(flat.shape[0], memory.num_slots).scatter_add(1, slots.flatten(1), weights.flatten(1))
    bag = dense_weights @ values.float()
    gated = (bag * F.silu(memory.pkm_gate(flat).float())).to(hidden_states.dtype)
    return memory.pkm_output(gated).view(batch, seq_len, hidden), slots


def assert_coalesced_rows(grad, num_rows):
    """A coalesced COO (num_rows, dim) gradient: sparse, one sorted row index per row, no duplicates."""
    assert grad.layout == torch.sparse_coo and grad.shape[0] == num_rows
    rows = grad._indices()
    assert rows.shape[0] == 1
    assert (rows[0, 1:] > rows[0, :-1]).all(), "row indices must be unique and ascending"


# ----------------------------------------------------------------------------------------------------
# PyTorch tier: the search
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "num_keys, top_k, heads, key_dim",
    [(8, 3, 2, 8), (5, 1, 1, 4), (4, 4, 3, 2), (16, 5, 2, 12)],
    ids=["general", "k1", "k_equals_n", "wide"],
)
def test_product_key_topk_matches_brute_force(num_keys, top_k, heads, key_dim):
    generator = torch.Generator().manual_seed(num_keys * top_k)
    query = torch.randn(11, heads, key_dim, generator=generator)
    keys = torch.randn(heads, 2, num_keys, key_dim // 2, generator=generator)
    scores, indices = product_key_topk(query, keys, top_k)
    assert scores.shape == indices.shape == (11, heads, top_k)
    assert scores.dtype == torch.float32 and indices.dtype == torch.int64
    full = naive_product_key_scores(query, keys)
    expected_scores, expected_indices = naive_product_key_topk(query, keys, top_k)
    # The best k scores, best first, and the chosen slots really score that much.
    torch.testing.assert_close(scores, expected_scores, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(full.gather(-1, indices), scores, atol=1e-5, rtol=1e-5)
    assert (indices.sort(dim=-1).values.diff(dim=-1) > 0).all(), "each head reads k distinct slots"
    # Same slots wherever the k + 1 best scores are clearly apart (ties aside).
    ranked = full.topk(min(top_k + 1, num_keys**2), dim=-1).values
    clear = (ranked.diff(dim=-1).abs() > 1e-4).all(dim=-1)
    assert clear.float().mean() > 0.9
    assert torch.equal(indices[clear], expected_indices[clear])


def test_product_key_topk_gradients_match_brute_force():
    generator = torch.Generator().manual_seed(1)
    query = torch.randn(7, 2, 6, generator=generator, requires_grad=True)
    keys = torch.randn(2, 2, 5, 3, generator=generator, requires_grad=True)
    scores, _ = product_key_topk(query, keys, 3)
    expected = naive_product_key_topk(query, keys, 3)[0]
    grad = torch.randn(scores.shape, generator=generator)
    for got, want in zip(grads_of(scores, [query, keys], grad), grads_of(expected, [query, keys], grad)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------------
# PyTorch tier: the layer
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("query_norm", [True, False], ids=["query_norm", "no_query_norm"])
@pytest.mark.parametrize("value_dim", [None, 10], ids=["value_dim_hidden", "value_dim_10"])
def test_memory_matches_dense_reference(query_norm, value_dim):
    memory = make_memory(value_dim=value_dim, query_norm=query_norm)
    hidden_states = torch.randn(2, 5, 24, generator=torch.Generator().manual_seed(2))
    out, indices = memory(hidden_states)
    dense_values = memory.pkm_values.weight.detach().clone().requires_grad_()
    expected, slots = dense_memory(memory, hidden_states, dense_values)
    assert out.shape == hidden_states.shape and out.dtype == hidden_states.dtype
    # The slots it returns (recorded by the model as `pkm_indices`) are the ones it read: the top-k of all slots.
    assert indices.shape == (10, 2, 3) and torch.equal(indices.sort(-1).values, slots.sort(-1).values)
    assert_close(out, expected, LAYER_TOLERANCE, "output")
    # Every parameter but the values against the dense reference's gradient; the values' sparse gradient
    # against the dense gradient of the dense table.
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
    others = [p for name, p in memory.named_parameters() if name != "pkm_values.weight"]
    got = grads_of(out, others + [memory.pkm_values.weight], grad)
    want = grads_of(expected, others + [dense_values], grad)
    names = [name for name, _ in memory.named_parameters() if name != "pkm_values.weight"] + ["values"]
    for name, g, w in zip(names, got, want):
        assert_close(g.to_dense() if g.is_sparse else g, w, LAYER_GRAD_TOLERANCE, f"grad of {name}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_softmax_and_gate_in_fp32_for_half_inputs(dtype):
    # A seed whose half-precision scores pick the same slots as fp32 (a near tie picks another row, whose
    # value differs by far more than rounding): the comparison below then measures rounding only.
    memory = make_memory(seed=1, dtype=dtype)
    hidden_states = torch.randn(2, 4, 24, generator=torch.Generator().manual_seed(4)).to(dtype)
    indices, weights = memory.address(hidden_states.reshape(-1, 24))
    assert weights.dtype == torch.float32
    query = memory.pkm_query_norm(memory.pkm_query(hidden_states.reshape(-1, 24)).view(-1, 2, 8))
    scores, expected_indices = product_key_topk(query, memory.pkm_keys, memory.top_k)
    assert torch.equal(indices, expected_indices)
    assert torch.equal(weights, scores.float().softmax(dim=-1))
    torch.testing.assert_close(weights.sum(-1), torch.ones(weights.shape[:-1]), atol=1e-6, rtol=0)
    # The whole layer in half precision stays close to the same weights in fp32.
    out = update_of(memory, hidden_states)
    assert out.dtype == dtype
    reference, reference_indices = memory.float()(hidden_states.float())
    assert torch.equal(indices.sort(-1).values, reference_indices.sort(-1).values)
    assert_relative(out, reference, 3e-2, f"{dtype} layer vs fp32")


def test_zero_at_birth_values_learn_from_the_first_step():
    memory = make_memory(random_values=False)
    hidden_states = torch.randn(3, 6, 24, generator=torch.Generator().manual_seed(5))
    out = update_of(memory, hidden_states)
    assert torch.equal(out, torch.zeros_like(out))
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(6))
    out.backward(grad)
    # First backward: the values get a gradient; everything else reaches the output only through the
    # values read (zero until they are updated), so its gradient is exactly zero (see `_init_weights`).
    values_grad = memory.pkm_values.weight.grad
    assert values_grad.is_sparse and values_grad.coalesce().values().abs().sum() > 0
    others = {name: p for name, p in memory.named_parameters() if name != "pkm_values.weight"}
    for name, param in others.items():
        assert param.grad is None or not param.grad.any(), name
    # After one optimizer step (SGD takes sparse gradients) every parameter gets a non-zero gradient.
    torch.optim.SGD(memory.parameters(), lr=1.0).step()
    memory.zero_grad()
    update_of(memory, hidden_states).backward(grad)
    for name, param in memory.named_parameters():
        grad_of_param = param.grad.coalesce().values() if param.grad.is_sparse else param.grad
        assert grad_of_param.abs().sum() > 0, name


def test_init_weights_covers_every_parameter():
    model = MemoryLlamaForCausalLM(pkm_config(hidden_size=16, num_keys=4, top_k=2, heads=2, key_dim=6))
    memory = model.model.layers[0].product_key_memory
    with torch.no_grad():
        for param in memory.parameters():
            param.fill_(float("nan"))  # transformers materialises from empty storage
    memory.apply(model._init_weights)  # children first, as transformers applies it
    for name, param in memory.named_parameters():
        assert torch.isfinite(param).all(), name
    assert not memory.pkm_values.weight.any()
    assert torch.equal(memory.pkm_query_norm.weight, torch.ones(6))
    bound = 3**-0.5
    assert memory.pkm_keys.abs().max() <= bound and memory.pkm_keys.std() > 0.2 * bound
    assert list(memory.buffers()) == []
    config = pkm_config(hidden_size=256, num_keys=4, top_k=2, heads=2, key_dim=6, value_dim=64, initializer_range=0.02)
    wide = MemoryLlamaForCausalLM(config).model.layers[0].product_key_memory
    assert wide.pkm_query.weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert wide.pkm_gate.weight.std().item() == pytest.approx(256**-0.5, rel=0.1)  # fan-in scale
    assert wide.pkm_output.weight.std().item() == pytest.approx(64**-0.5, rel=0.1)


def test_values_gradient_is_sparse_coalesced_and_matches_dense():
    # 9 slots, 2 heads x 3 reads per token for 24 tokens: rows are read many times over.
    memory = make_memory(num_keys=3, top_k=3, heads=2, key_dim=4, value_dim=5)
    hidden_states = torch.randn(2, 12, 24, generator=torch.Generator().manual_seed(7))
    values = memory.pkm_values.weight
    out = update_of(memory, hidden_states)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(8))
    (values_grad,) = grads_of(out, [values], grad)
    assert_coalesced_rows(values_grad, memory.num_slots)
    assert values_grad.is_coalesced() and values_grad.dtype == values.dtype
    dense_values = values.detach().clone().requires_grad_()
    expected, slots = dense_memory(memory, hidden_states, dense_values)
    (expected_grad,) = grads_of(expected, [dense_values], grad)
    read = slots.unique()
    assert torch.equal(values_grad._indices()[0], read)  # exactly the rows read
    assert slots.numel() > 4 * read.numel()  # repeated reads, accumulated into one row each
    assert_close(values_grad.to_dense(), expected_grad, LAYER_GRAD_TOLERANCE, "values grad")
    # .backward() leaves a sparse .grad with the same rows (autograd drops the coalesced flag only).
    update_of(memory, hidden_states).backward(grad)
    assert_coalesced_rows(values.grad, memory.num_slots)
    assert_close(values.grad.to_dense(), expected_grad, LAYER_GRAD_TOLERANCE, "values .grad")


def test_untouched_rows_get_no_gradient_and_cost_does_not_scale_with_slots():
    # 1024**2 slots, a handful read: the gradient names only those rows.
    memory = make_memory(num_keys=1024, top_k=4, heads=2, key_dim=8, value_dim=4, random_values=False)
    hidden_states = torch.randn(1, 3, 24, generator=torch.Generator().manual_seed(9))
    out, indices = memory(hidden_states)
    out.sum().backward()
    grad = memory.pkm_values.weight.grad
    assert grad.is_sparse and grad._nnz() <= 3 * 2 * 4
    assert torch.equal(indices, memory.address(hidden_states.reshape(-1, 24))[0])
    assert torch.equal(grad._indices()[0], indices.unique())


def test_shared_values_table_gets_both_layers_gradients():
    """With `pkm_share_values` the model owns the one table and passes it to each layer's memory."""
    torch.manual_seed(10)
    model = MemoryLlamaForCausalLM(pkm_config(num_keys=4, top_k=2, heads=2, key_dim=8, layers=(0, 1), share_values=True))
    first, second = (model.model.layers[i].product_key_memory for i in (0, 1))
    shared = model.model.pkm_values
    assert first.pkm_values is None and second.pkm_values is None
    assert not shared.weight.any(), "initialised by _init_weights, to zero"
    assert [name for name in model.state_dict() if "values" in name] == ["model.pkm_values.weight"]
    assert sum(p is shared.weight for p in model.parameters()) == 1
    with torch.no_grad():
        shared.weight.normal_()
    table = shared.weight.detach().clone()

    hidden_states = torch.randn(2, 5, 24, generator=torch.Generator().manual_seed(11))
    grad = torch.randn(hidden_states.shape, generator=torch.Generator().manual_seed(12))
    (update_of(first, hidden_states, shared) + update_of(second, hidden_states, shared)).backward(grad)
    dense_values = table.clone().requires_grad_()
    expected = dense_memory(first, hidden_states, dense_values)[0] + dense_memory(second, hidden_states, dense_values)[0]
    (expected_grad,) = grads_of(expected, [dense_values], grad)
    shared_grad = shared.weight.grad
    assert shared_grad.is_sparse
    assert_close(shared_grad.to_dense(), expected_grad, LAYER_GRAD_TOLERANCE, "shared values grad")
    first_only = grads_of(update_of(first, hidden_states, shared), [shared.weight], grad)[0].to_dense()
    assert first_only.any() and not torch.allclose(first_only, expected_grad)


def test_projection_names_avoid_peft_targets():
    memory = make_memory()
    for name, _ in memory.named_modules():
        assert not name.endswith(PEFT_LIKE_NAMES), name


def test_bag_torch_matches_naive_bag():
    # 6 slots for 40 reads: rows read many times over, their gradients summed into one row each.
    generator = torch.Generator().manual_seed(16)
    values = torch.randn(6, 5, generator=generator, requires_grad=True)
    indices = torch.randint(0, 6, (10, 4), generator=generator)
    weights = torch.rand(10, 4, generator=generator, requires_grad=True)
    grad = torch.randn(10, 5, generator=generator)
    out = product_key_bag_torch(values, indices, weights)
    expected = naive_product_key_bag(values, indices, weights)
    torch.testing.assert_close(out, expected)
    (values_grad, weights_grad), (expected_values, expected_weights) = (
        grads_of(out, [values, weights], grad), grads_of(expected, [values, weights], grad))
    assert_coalesced_rows(values_grad, 6)
    torch.testing.assert_close(values_grad.to_dense(), expected_values)
    torch.testing.assert_close(weights_grad, expected_weights)


def test_bag_torch_empty_and_frozen_table():
    values = torch.randn(7, 4)
    out = product_key_bag_torch(values, torch.zeros(0, 3, dtype=torch.long), torch.zeros(0, 3))
    assert out.shape == (0, 4)
    weights = torch.rand(5, 3, requires_grad=True)
    indices = torch.randint(0, 7, (5, 3))
    out = product_key_bag_torch(values, indices, weights)
    torch.testing.assert_close(out, naive_product_key_bag(values, indices, weights))
    (grad,) = grads_of(out, [weights], torch.ones_like(out))
    torch.testing.assert_close(grad, values[indices].sum(-1))


def test_bag_torch_blocks(monkeypatch):
    # Tiny gather blocks: several token blocks in the forward and in both gradients.
    generator = torch.Generator().manual_seed(13)
    values = torch.randn(20, 6, generator=generator, requires_grad=True)
    indices = torch.randint(0, 20, (9, 4), generator=generator)
    weights = torch.rand(9, 4, generator=generator, requires_grad=True)
    grad = torch.randn(9, 6, generator=generator)
    whole = product_key_bag_torch(values, indices, weights)
    whole_grads = grads_of(whole, [values, weights], grad)
    monkeypatch.setattr(ops_product_keys, "GATHER_ELEMENTS", 30)
    blocked = product_key_bag_torch(values, indices, weights)
    blocked_grads = grads_of(blocked, [values, weights], grad)
    torch.testing.assert_close(blocked, whole)
    torch.testing.assert_close(blocked_grads[0].to_dense(), whole_grads[0].to_dense())
    torch.testing.assert_close(blocked_grads[1], whole_grads[1])


@pytest.mark.parametrize(
    "overrides, name, allowed",
    [
        (dict(pkm_top_k=7), "pkm_top_k", "`pkm_num_keys` (6)"),
        (dict(pkm_top_k=0), "pkm_top_k", ">= 1"),
        (dict(pkm_key_dim=7), "pkm_key_dim", "even"),
        (dict(pkm_key_dim=0), "pkm_key_dim", ">= 1"),
        (dict(pkm_heads=0), "pkm_heads", ">= 1"),
        (dict(pkm_heads=True), "pkm_heads", "expected int"),
        (dict(pkm_num_keys=0), "pkm_num_keys", ">= 1"),
        (dict(pkm_value_dim=0), "pkm_value_dim", ">= 1"),
        (dict(pkm_query_norm="yes"), "pkm_query_norm", "expected bool"),
        (dict(pkm_share_values=1), "pkm_share_values", "expected bool"),
    ],
)
def test_bad_settings_are_refused_by_the_config(overrides, name, allowed):
    """The memory is built from a validated config (it checks nothing again); the config names the field."""
    settings = dict(pkm_layers=[0], pkm_num_keys=6, pkm_top_k=3, pkm_heads=2, pkm_key_dim=8) | overrides
    with pytest.raises(Exception) as error:
        tiny_config(**settings)
    message = str(error.value)
    assert name in message and allowed in message, message


# ----------------------------------------------------------------------------------------------------
# Loading the kernel module (as in test_kernels.py)
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


@pytest.fixture
def fresh_backend_settings():
    """Re-read the backend knobs after a test that changed them."""
    yield
    kernel_backend.reload_settings()


# ----------------------------------------------------------------------------------------------------
# Interpreter tier: the bag kernels
# ----------------------------------------------------------------------------------------------------


BAG_CASES = {
    # T tokens, J = heads * top_k reads per token, N slots, Dv value width.
    "general": dict(num_tokens=13, num_reads=6, num_slots=50, value_dim=24),
    # Width not a power of two, wider than one GPU column block.
    "wide_rows": dict(num_tokens=5, num_reads=8, num_slots=40, value_dim=300),
    # 6 slots for 320 reads: every row is read many times.
    "repeated_rows": dict(num_tokens=40, num_reads=8, num_slots=6, value_dim=16),
    "single_read": dict(num_tokens=1, num_reads=1, num_slots=7, value_dim=16),
    # 4 heads x 16 reads over a large table.
    "many_reads": dict(num_tokens=9, num_reads=64, num_slots=4096, value_dim=32),
}


def make_bag_inputs(num_tokens, num_reads, num_slots, value_dim, *, seed=0, dtype=torch.float32, device="cpu"):
    """A values table in `dtype`, row ids and fp32 softmax weights (as the layer produces them)."""
    generator = torch.Generator().manual_seed(seed)
    values = torch.randn(num_slots, value_dim, generator=generator).to(device=device, dtype=dtype)
    indices = torch.randint(0, num_slots, (num_tokens, num_reads), generator=generator).to(device)
    weights = torch.randn(num_tokens, num_reads, generator=generator).softmax(dim=-1).to(device)
    grad_out = torch.randn(num_tokens, value_dim, generator=generator).to(device=device, dtype=dtype)
    return values, indices, weights, grad_out


def run_bag(op, values, indices, weights, grad_out):
    values = values.detach().clone().requires_grad_()
    weights = weights.detach().clone().requires_grad_()
    out = op(values, indices, weights)
    grad_values, grad_weights = grads_of(out, [values, weights], grad_out)
    return out, grad_values, grad_weights


def check_bag(kernels, case, dtype, seed=0):
    inputs = make_bag_inputs(**BAG_CASES[case], seed=seed, dtype=dtype)
    out, grad_values, grad_weights = run_bag(kernels.product_key_bag_triton, *inputs)
    expected, expected_values, expected_weights = run_bag(product_key_bag_torch, *inputs)
    assert out.dtype == dtype and grad_values.dtype == dtype and grad_weights.dtype == torch.float32
    assert_close(out, expected, BAG_FORWARD_TOLERANCE[dtype], "output")
    assert_close(grad_weights, expected_weights, BAG_WEIGHTS_GRAD_TOLERANCE[dtype], "grad of weights")
    assert grad_values.is_coalesced()
    assert_coalesced_rows(grad_values, inputs[0].shape[0])
    assert torch.equal(grad_values._indices(), expected_values._indices())
    assert_close(grad_values._values(), expected_values._values(), BAG_VALUES_GRAD_TOLERANCE[dtype], "grad of values")
    return grad_values


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", list(BAG_CASES))
def test_triton_bag_kernel_matches_pytorch_path(interpreted, case, dtype):
    check_bag(interpreted[0], case, dtype)


def test_triton_bag_kernel_with_small_blocks(interpreted, monkeypatch):
    # Small tiles: several programs per axis, the read loop and the column loop each run several times.
    kernels = interpreted[0]
    monkeypatch.setattr(kernels, "_TILE_ELEMENTS", 64)
    monkeypatch.setattr(kernels, "_MAX_BLOCK_D", 16)
    monkeypatch.setattr(kernels, "_ROW_BLOCK", 4)
    for case in ("general", "repeated_rows"):
        check_bag(kernels, case, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_triton_bag_values_grad_is_bitwise_repeatable(interpreted, dtype):
    first = check_bag(interpreted[0], "repeated_rows", dtype, seed=3)
    second = check_bag(interpreted[0], "repeated_rows", dtype, seed=3)
    assert torch.equal(first._values(), second._values())


def test_triton_bag_kernel_empty_and_frozen_table(interpreted):
    kernels = interpreted[0]
    values, indices, weights, _ = make_bag_inputs(0, 4, 9, 8)
    assert kernels.product_key_bag_triton(values, indices, weights).shape == (0, 8)
    values, indices, weights, grad_out = make_bag_inputs(**BAG_CASES["general"])
    weights.requires_grad_()
    out = kernels.product_key_bag_triton(values, indices, weights)
    (grad,) = grads_of(out, [weights], grad_out)
    expected = product_key_bag_torch(values, indices, weights)
    assert_close(grad, grads_of(expected, [weights], grad_out)[0], BAG_WEIGHTS_GRAD_TOLERANCE[torch.float32],
                 "grad of weights")


def test_triton_dispatcher_runs_the_layer_through_the_kernels(interpreted, monkeypatch, fresh_backend_settings):
    kernels = interpreted[0]
    calls = []
    original = kernels.product_key_bag_triton
    monkeypatch.setattr(kernels, "product_key_bag_triton", lambda *a: calls.append(1) or original(*a))
    memory = make_memory()
    hidden_states = torch.randn(2, 5, 24, generator=torch.Generator().manual_seed(14))
    grad = torch.randn(hidden_states.shape, generator=torch.Generator().manual_seed(15))
    parameters = list(memory.parameters())
    results = []
    for backend in ("triton", "torch"):
        monkeypatch.setenv(KERNELS_ENV, backend)
        kernel_backend.reload_settings()
        out = update_of(memory, hidden_states)
        results.append((out, grads_of(out, parameters, grad)))
    assert len(calls) == 1
    (out, grads), (expected, expected_grads) = results
    assert_close(out, expected, BAG_FORWARD_TOLERANCE[torch.float32], "output")
    for (name, _), got, want in zip(memory.named_parameters(), grads, expected_grads):
        if got.is_sparse:
            assert torch.equal(got._indices(), want._indices()), name
            got, want = got._values(), want._values()
        assert_close(got, want, LAYER_GRAD_TOLERANCE, f"grad of {name}")


# ----------------------------------------------------------------------------------------------------
# GPU tier
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_gpu_bag_kernel(compiled, dtype):
    kernels = compiled[0]
    # 2048 tokens, 4 heads x 32 reads, 65536 slots of width 512 (wider than one column block).
    inputs = make_bag_inputs(2048, 128, 65536, 512, dtype=dtype, device="cuda")
    out, grad_values, grad_weights = run_bag(kernels.product_key_bag_triton, *inputs)
    expected, expected_values, expected_weights = run_bag(product_key_bag_torch, *inputs)
    assert out.dtype == dtype and grad_values.dtype == dtype
    assert_relative(out, expected, GPU_RELATIVE_TOLERANCE[dtype], "output")
    assert_relative(grad_weights, expected_weights, GPU_RELATIVE_TOLERANCE[dtype], "grad of weights")
    assert torch.equal(grad_values._indices(), expected_values._indices())
    assert_relative(grad_values._values(), expected_values._values(), GPU_RELATIVE_TOLERANCE[dtype], "grad of values")
    again = run_bag(kernels.product_key_bag_triton, *inputs)[1]
    assert torch.equal(again._values(), grad_values._values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_gpu_layer_kernels_match_pytorch_path(compiled, dtype, monkeypatch, fresh_backend_settings):
    memory = make_memory(hidden_size=256, num_keys=64, top_k=8, heads=4, key_dim=64).to(device="cuda", dtype=dtype)
    hidden_states = torch.randn(4, 128, 256, device="cuda", dtype=dtype)
    grad = torch.randn_like(hidden_states)
    parameters = list(memory.parameters())
    results = []
    for backend in ("triton", "torch"):
        monkeypatch.setenv(KERNELS_ENV, backend)
        kernel_backend.reload_settings()
        out = update_of(memory, hidden_states)
        results.append((out, grads_of(out, parameters, grad)))
    (out, grads), (expected, expected_grads) = results
    assert_relative(out, expected, GPU_RELATIVE_TOLERANCE[dtype], "output")
    for (name, _), got, want in zip(memory.named_parameters(), grads, expected_grads):
        if got.is_sparse:
            assert torch.equal(got._indices(), want._indices()), name
            got, want = got._values(), want._values()
        assert_relative(got, want, GPU_RELATIVE_TOLERANCE[dtype], f"grad of {name}")
