"""Tests of the Memory Mosaics v2 key scan (`ops_mosaic_keys`) and its Triton kernels (`kernels_mosaic_keys`).

- Reference tier (always): the PyTorch path against the naive float64 loop (`naive_mosaic_keys`) in float64 and
  fp32, forward and gradients, and `torch.autograd.gradcheck` on small float64 shapes over several chunks; log
  gates of +-60 and 2000-step sequences with strong decay (finite, equal to the naive loop); continuing from the
  last state equals one scan over the concatenation (from a zero state too); left padding gives zero keys,
  -inf log norms and finite gradients; half-precision inputs.
- Interpreter tier (`test_triton_*`, Triton installed): the kernels on the CPU under the Triton interpreter in
  fp32 and fp16 against the PyTorch path, forward and every gradient, and the dispatcher picking them. As in
  test_kernels.py they run in a child process started with TRITON_INTERPRET=1
  (`test_interpreter_tier_in_subprocess`); `TRITON_INTERPRET=1 pytest tests/memory_llama/test_mosaic_kernels.py
  -k test_triton_` runs them directly.
- GPU tier (`test_gpu_*`, CUDA only): compiled kernels in fp32/fp16/bf16 on a training-sized shape.
"""

import pytest
import torch

from modeling_memory.memory_llama import kernel_backend, ops_mosaic_keys
from modeling_memory.memory_llama.naive_mosaic_keys import naive_mosaic_key_scan
from modeling_memory.memory_llama.ops_mosaic_keys import mosaic_key_scan, mosaic_key_scan_torch
from kernel_tiers import compiled_kernel_modules, interpreted_kernel_modules, run_interpreter_tier, skip_unless_interpreted
from test_kernels import assert_close, assert_relative, grads_of


# PyTorch path vs the naive float64 loop, per compute dtype: (atol, rtol). Keys are unit vectors; log norms
# reach +-60 and beyond, so their relative part matters.
KEYS_TOLERANCE = {torch.float64: (1e-12, 1e-12), torch.float32: (1e-5, 1e-5)}
LOG_NORM_TOLERANCE = {torch.float64: (1e-12, 1e-12), torch.float32: (1e-5, 1e-6)}
GRAD_TOLERANCE = {torch.float64: (1e-10, 1e-10), torch.float32: (1e-4, 1e-4)}
# Kernels vs PyTorch path, per input dtype: both compute in fp32 (the kernels' backward recomputes the keys in
# fp32 rather than reading the rounded ones), so fp16 keys and gradients differ by about one fp16 rounding.
KERNEL_KEYS_TOLERANCE = {torch.float32: (2e-5, 1e-5), torch.float16: (1e-3, 1e-3)}
KERNEL_LOG_NORM_TOLERANCE = {torch.float32: (2e-5, 1e-6), torch.float16: (2e-5, 1e-6)}
KERNEL_GRAD_TOLERANCE = {torch.float32: (5e-5, 1e-4), torch.float16: (2e-3, 2e-3)}
# GPU tier, relative error of the whole tensor (norm of the difference / norm of the PyTorch path's).
GPU_RELATIVE_TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}

KERNEL_MODULES = ("modeling_memory.memory_llama.kernels_mosaic_keys",)
INPUT_NAMES = ("projected", "log_gate", "log_decay")


# ----------------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------------


def make_scan_inputs(batch, heads, length, width, *, seed=0, dtype=torch.float32, device="cpu", gate_range=2.0,
                     max_decay=1.0, left_padding=0, initial_state=False):
    """u, log gates uniform in [-gate_range, gate_range], log decays uniform in [-max_decay, 0]; the first
    `left_padding` steps of batch row 0 padded the caller's way (u = 0, log gate = log decay = 0); optionally a
    random initial state (unit direction, log norm ~ 3 * N(0, 1))."""
    generator = torch.Generator().manual_seed(seed)
    projected = torch.randn(batch, heads, length, width, generator=generator)
    log_gate = (torch.rand(batch, heads, length, generator=generator) * 2 - 1) * gate_range
    log_decay = -torch.rand(batch, heads, length, generator=generator) * max_decay
    for tensor in (projected, log_gate, log_decay):
        tensor[0, :, :left_padding] = 0
    inputs = dict(projected=projected, log_gate=log_gate, log_decay=log_decay)
    inputs = {name: tensor.to(device=device, dtype=dtype) for name, tensor in inputs.items()}
    if initial_state:
        direction = torch.randn(batch, heads, width, generator=generator)
        inputs["initial_keys"] = (direction / direction.norm(dim=-1, keepdim=True)).to(device)
        inputs["initial_log_norm"] = (torch.randn(batch, heads, generator=generator) * 3).to(device)
    return inputs


def run_scan(op, inputs, grad_keys):
    """keys, log_norm and the gradients of <keys, grad_keys> to projected, log_gate and log_decay."""
    leaves = {name: tensor.detach().clone().requires_grad_(name in INPUT_NAMES) for name, tensor in inputs.items()}
    keys, log_norm = op(**leaves)
    return keys, log_norm, grads_of(keys, [leaves[name] for name in INPUT_NAMES], grad_keys)


def check_against(results, expected_results, keys_tolerance, log_norm_tolerance, grad_tolerance):
    (keys, log_norm, grads), (expected_keys, expected_log_norm, expected_grads) = results, expected_results
    assert_close(keys, expected_keys, keys_tolerance, "keys")
    assert torch.equal(log_norm == float("-inf"), expected_log_norm == float("-inf"))
    assert_close(log_norm, expected_log_norm, log_norm_tolerance, "log_norm")
    for name, got, want in zip(INPUT_NAMES, grads, expected_grads):
        assert torch.isfinite(got).all(), name
        assert_close(got, want, grad_tolerance, f"grad of {name}")


def naive_results(inputs, grad_keys):
    """The naive loop's keys, log norms and gradients, in float64."""
    as_double = {name: tensor.double() if name in INPUT_NAMES else tensor for name, tensor in inputs.items()}
    return run_scan(naive_mosaic_key_scan, as_double, grad_keys.double())


def random_grad(inputs, seed=1):
    projected = inputs["projected"]
    grad = torch.randn(projected.shape, generator=torch.Generator().manual_seed(seed))
    return grad.to(device=projected.device, dtype=projected.dtype)


# ----------------------------------------------------------------------------------------------------
# Reference tier: the PyTorch path against the naive loop
# ----------------------------------------------------------------------------------------------------


SCAN_CASES = {
    # B, H, T, D: shorter than a chunk; several chunks with a ragged tail; an initial state; left padding.
    "one_chunk": dict(batch=2, heads=3, length=13, width=8),
    "ragged_chunks": dict(batch=2, heads=2, length=150, width=12, gate_range=4.0, max_decay=2.0),
    "initial_state": dict(batch=2, heads=2, length=70, width=8, initial_state=True),
    "left_padding": dict(batch=2, heads=2, length=80, width=8, left_padding=67),
    "single_step": dict(batch=1, heads=2, length=1, width=5, initial_state=True),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("case", list(SCAN_CASES))
def test_torch_path_matches_naive_loop(case, dtype):
    inputs = make_scan_inputs(**SCAN_CASES[case], dtype=dtype)
    grad_keys = random_grad(inputs)
    results = run_scan(mosaic_key_scan_torch, inputs, grad_keys)
    keys, log_norm, grads = results
    assert keys.dtype == dtype and log_norm.dtype == dtype and not log_norm.requires_grad
    assert all(grad.dtype == dtype for grad in grads)
    check_against(results, naive_results(inputs, grad_keys), KEYS_TOLERANCE[dtype], LOG_NORM_TOLERANCE[dtype],
                  GRAD_TOLERANCE[dtype])


@pytest.mark.parametrize("initial_state", [False, True], ids=["zero_state", "initial_state"])
def test_torch_path_gradcheck(monkeypatch, initial_state):
    # Chunks of 4: the 11 steps span three chunks, so the carried state is differentiated too.
    monkeypatch.setattr(ops_mosaic_keys, "CHUNK", 4)
    inputs = make_scan_inputs(1, 2, 11, 3, dtype=torch.float64, gate_range=3.0, initial_state=initial_state)
    state = {name: inputs[name].double() for name in ("initial_keys", "initial_log_norm") if name in inputs}
    leaves = [inputs[name].requires_grad_() for name in INPUT_NAMES]
    assert torch.autograd.gradcheck(lambda *tensors: mosaic_key_scan_torch(*tensors, **state)[0], leaves)


def extreme_inputs(length, dtype=torch.float32, device="cpu", seed=0):
    """Log gates near +55 and -55 in alternating runs of 250 steps (+-5 around them) and strong decays (lambda down
    to e^-8, forgetting a run within a few dozen steps): kbar spans e^-60 to e^60, which fp32 cannot hold."""
    inputs = make_scan_inputs(1, 2, length, 8, seed=seed, dtype=dtype, device=device, gate_range=5.0, max_decay=8.0)
    runs = torch.arange(length, device=device) // 250 % 2
    inputs["log_gate"] += torch.where(runs == 0, 55.0, -55.0).to(dtype)
    return inputs


def test_torch_path_extreme_gates_and_long_strong_decay():
    inputs = extreme_inputs(2000)
    grad_keys = random_grad(inputs)
    results = run_scan(mosaic_key_scan_torch, inputs, grad_keys)
    keys, log_norm, grads = results
    assert torch.isfinite(keys).all() and torch.isfinite(log_norm).all()
    assert log_norm.max() > 50 and log_norm.min() < -50  # the range fp32 could not hold as kbar
    check_against(results, naive_results(inputs, grad_keys), KEYS_TOLERANCE[torch.float32],
                  LOG_NORM_TOLERANCE[torch.float32], GRAD_TOLERANCE[torch.float32])


def check_scale_free(op, device="cpu"):
    """Shifting every log gate and the initial log norm by +-60 scales kbar by e^+-60 and changes neither the keys
    nor any gradient: the gradients stay O(1) whatever the scale of kbar."""
    inputs = make_scan_inputs(2, 2, 90, 8, seed=3, gate_range=2.0, initial_state=True, device=device)
    grad_keys = random_grad(inputs)
    keys, log_norm, grads = run_scan(op, inputs, grad_keys)
    for shift in (60.0, -60.0):
        shifted = dict(inputs, log_gate=inputs["log_gate"] + shift, initial_log_norm=inputs["initial_log_norm"] + shift)
        shifted_keys, shifted_log_norm, shifted_grads = run_scan(op, shifted, grad_keys)
        assert_close(shifted_keys, keys, (1e-5, 1e-5), f"keys, log gates shifted by {shift}")
        assert_close(shifted_log_norm - shift, log_norm, (1e-4, 1e-6), f"log_norm, log gates shifted by {shift}")
        for name, got, want in zip(INPUT_NAMES, shifted_grads, grads):
            assert_close(got, want, (1e-4, 1e-4), f"grad of {name}, log gates shifted by {shift}")


def test_torch_path_is_scale_free():
    check_scale_free(mosaic_key_scan_torch)


def check_continuation(op, inputs, splits, tolerance):
    """Scanning the pieces one after another, each from the last (keys, log_norm) of the one before, equals one
    scan over the whole sequence."""
    keys, log_norm = op(**inputs)
    state = {name: inputs[name] for name in ("initial_keys", "initial_log_norm") if name in inputs}
    pieces_keys, pieces_log_norm = [], []
    for start, end in zip(splits[:-1], splits[1:]):
        piece = {name: inputs[name][:, :, start:end] for name in INPUT_NAMES}
        piece_keys, piece_log_norm = op(**piece, **state)
        pieces_keys.append(piece_keys)
        pieces_log_norm.append(piece_log_norm)
        state = dict(initial_keys=piece_keys[:, :, -1].float(), initial_log_norm=piece_log_norm[:, :, -1])
    assert_close(torch.cat(pieces_keys, dim=2), keys, tolerance, "keys")
    continued_log_norm = torch.cat(pieces_log_norm, dim=2)
    assert torch.equal(continued_log_norm == float("-inf"), log_norm == float("-inf"))
    assert_close(continued_log_norm, log_norm, tolerance, "log_norm")


def test_torch_path_continues_from_its_last_state():
    # Batch row 0 is padding through step 20: its state after the first piece is zero (-inf log norm).
    inputs = make_scan_inputs(2, 2, 100, 8, left_padding=21, gate_range=4.0)
    assert (mosaic_key_scan_torch(**{name: inputs[name][:, :, :20] for name in INPUT_NAMES})[1][0] == float("-inf")).all()
    check_continuation(mosaic_key_scan_torch, inputs, [0, 20, 21, 70, 71, 72, 100], (1e-5, 1e-5))
    # A decode loop from a given initial state, one step at a time after a prefill.
    inputs = make_scan_inputs(1, 2, 12, 8, seed=5, initial_state=True)
    check_continuation(mosaic_key_scan_torch, inputs, [0, 7, 8, 9, 10, 11, 12], (1e-5, 1e-5))


def check_left_padding(op, dtype=torch.float32, device="cpu"):
    """Zero keys and -inf log norms before the first real step, finite gradients everywhere and none at all to the
    padding (its zero state is a constant), whatever the real steps' gates."""
    padding = 9
    for gate_range in (2.0, 60.0):
        inputs = make_scan_inputs(2, 2, 40, 16, seed=7, left_padding=padding, gate_range=gate_range, dtype=dtype,
                                  device=device)
        keys, log_norm, grads = run_scan(op, inputs, random_grad(inputs))
        assert torch.equal(keys[0, :, :padding], torch.zeros_like(keys[0, :, :padding]))
        assert (log_norm[0, :, :padding] == float("-inf")).all() and torch.isfinite(log_norm[:, :, padding:]).all()
        assert torch.isfinite(keys).all()
        for name, grad in zip(INPUT_NAMES, grads):
            assert torch.isfinite(grad).all(), name
        for grad in grads:
            assert torch.equal(grad[0, :, :padding], torch.zeros_like(grad[0, :, :padding]))


def test_torch_path_left_padding():
    check_left_padding(mosaic_key_scan_torch)


def test_padding_leaves_the_state_unchanged():
    inputs = make_scan_inputs(1, 2, 30, 8)
    for name in INPUT_NAMES:
        inputs[name][:, :, 10:14] = 0
    keys, log_norm = mosaic_key_scan_torch(**inputs)
    assert_close(keys[:, :, 10:14], keys[:, :, 9:10].expand(-1, -1, 4, -1), (1e-6, 1e-6), "keys over padding")
    assert_close(log_norm[:, :, 10:14], log_norm[:, :, 9:10].expand(-1, -1, 4), (1e-6, 1e-6), "log_norm over padding")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_torch_path_half_precision_inputs(dtype):
    inputs = make_scan_inputs(2, 2, 70, 16, dtype=dtype)
    grad_keys = random_grad(inputs)
    keys, log_norm, grads = run_scan(mosaic_key_scan_torch, inputs, grad_keys)
    assert keys.dtype == dtype and log_norm.dtype == torch.float32
    assert [grad.dtype for grad in grads] == [dtype] * 3
    # Computed in fp32 from the same half inputs: within one rounding of the output dtype.
    expected_keys, expected_log_norm, _ = naive_results(inputs, grad_keys)
    assert_close(keys, expected_keys, (1e-2, 1e-2) if dtype == torch.bfloat16 else (1e-3, 1e-3), "keys")
    assert_close(log_norm, expected_log_norm, (1e-5, 1e-6), "log_norm")


def test_initial_state_gets_no_gradient():
    inputs = make_scan_inputs(1, 2, 9, 4, initial_state=True)
    state = [inputs["initial_keys"].requires_grad_(), inputs["initial_log_norm"].requires_grad_()]
    projected = inputs["projected"].requires_grad_()
    keys, log_norm = mosaic_key_scan_torch(**inputs)
    assert not log_norm.requires_grad
    grads = torch.autograd.grad(keys.sum(), [projected, *state], allow_unused=True)
    assert grads[0] is not None and grads[1] is None and grads[2] is None


def test_empty_and_bad_inputs():
    inputs = make_scan_inputs(2, 3, 0, 4)
    keys, log_norm = mosaic_key_scan_torch(**inputs)
    assert keys.shape == (2, 3, 0, 4) and log_norm.shape == (2, 3, 0)
    inputs = make_scan_inputs(2, 3, 5, 4, initial_state=True)
    with pytest.raises(ValueError, match="log_gate"):
        mosaic_key_scan_torch(inputs["projected"], inputs["log_gate"][:, :, :4], inputs["log_decay"])
    with pytest.raises(ValueError, match="together"):
        mosaic_key_scan_torch(inputs["projected"], inputs["log_gate"], inputs["log_decay"], inputs["initial_keys"])
    with pytest.raises(ValueError, match="initial_keys"):
        mosaic_key_scan_torch(inputs["projected"], inputs["log_gate"], inputs["log_decay"],
                              inputs["initial_keys"][..., :3], inputs["initial_log_norm"])


def test_dispatcher_runs_the_pytorch_path_on_cpu_tensors():
    inputs = make_scan_inputs(2, 2, 20, 8, initial_state=True)
    if kernel_backend.kernel_choice(inputs["projected"]) != "torch":
        pytest.skip("this session dispatches CPU tensors to the kernels")
    for got, want in zip(mosaic_key_scan(**inputs), mosaic_key_scan_torch(**inputs)):
        assert torch.equal(got, want)


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
# Interpreter tier
# ----------------------------------------------------------------------------------------------------


KERNEL_CASES = {
    "one_tile": dict(batch=2, heads=2, length=13, width=16),
    # Three tiles of 64 with a ragged tail; a width that is not a power of two.
    "ragged_tiles": dict(batch=1, heads=2, length=150, width=24, gate_range=4.0, max_decay=2.0),
    "initial_state": dict(batch=2, heads=1, length=40, width=8, initial_state=True),
    "left_padding": dict(batch=2, heads=2, length=30, width=16, left_padding=9),
    "single_step": dict(batch=1, heads=1, length=1, width=32, initial_state=True),
}


def check_kernels(scan_kernels, inputs, dtype):
    grad_keys = random_grad(inputs)
    results = run_scan(scan_kernels.mosaic_key_scan_triton, inputs, grad_keys)
    keys, log_norm, grads = results
    assert keys.dtype == dtype and log_norm.dtype == torch.float32 and not log_norm.requires_grad
    assert [grad.dtype for grad in grads] == [dtype] * 3
    check_against(results, run_scan(mosaic_key_scan_torch, inputs, grad_keys), KERNEL_KEYS_TOLERANCE[dtype],
                  KERNEL_LOG_NORM_TOLERANCE[dtype], KERNEL_GRAD_TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", list(KERNEL_CASES))
def test_triton_scan_kernels_match_pytorch_path(interpreted, case, dtype):
    check_kernels(interpreted[0], make_scan_inputs(**KERNEL_CASES[case], dtype=dtype), dtype)


def test_triton_scan_kernels_with_small_tiles(interpreted, monkeypatch):
    # Tiles of 16: the state and the backward's carried gradient cross many tile boundaries.
    monkeypatch.setattr(interpreted[0], "_BLOCK_T", 16)
    inputs = make_scan_inputs(2, 1, 50, 8, gate_range=6.0, max_decay=3.0, left_padding=20, initial_state=True)
    check_kernels(interpreted[0], inputs, torch.float32)


def test_triton_scan_extreme_gates_and_long_strong_decay(interpreted):
    inputs = extreme_inputs(2000)
    grad_keys = random_grad(inputs)
    results = run_scan(interpreted[0].mosaic_key_scan_triton, inputs, grad_keys)
    assert torch.isfinite(results[0]).all() and torch.isfinite(results[1]).all()
    check_against(results, naive_results(inputs, grad_keys), KEYS_TOLERANCE[torch.float32],
                  LOG_NORM_TOLERANCE[torch.float32], GRAD_TOLERANCE[torch.float32])


def test_triton_scan_is_scale_free(interpreted):
    check_scale_free(interpreted[0].mosaic_key_scan_triton)


def test_triton_scan_left_padding(interpreted):
    check_left_padding(interpreted[0].mosaic_key_scan_triton)
    check_left_padding(interpreted[0].mosaic_key_scan_triton, dtype=torch.float16)


def test_triton_scan_continues_from_its_last_state(interpreted):
    op = interpreted[0].mosaic_key_scan_triton
    inputs = make_scan_inputs(2, 2, 100, 8, left_padding=21, gate_range=4.0)
    check_continuation(op, inputs, [0, 20, 21, 70, 71, 72, 100], (1e-5, 1e-5))


def test_triton_dispatcher_uses_kernels(interpreted, monkeypatch, fresh_backend_settings):
    scan_kernels = interpreted[0]
    calls = []
    original = scan_kernels.mosaic_key_scan_triton
    monkeypatch.setattr(scan_kernels, "mosaic_key_scan_triton", lambda *a: calls.append(1) or original(*a))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    kernel_backend.reload_settings()
    inputs = make_scan_inputs(2, 2, 20, 8, initial_state=True)
    grad_keys = random_grad(inputs)
    results = run_scan(mosaic_key_scan, inputs, grad_keys)
    assert calls == [1]
    check_against(results, run_scan(mosaic_key_scan_torch, inputs, grad_keys), KERNEL_KEYS_TOLERANCE[torch.float32],
                  KERNEL_LOG_NORM_TOLERANCE[torch.float32], KERNEL_GRAD_TOLERANCE[torch.float32])
    # float64 (gradcheck) stays on the PyTorch path, which computes in float64.
    as_double = {name: tensor.double() if name in INPUT_NAMES else tensor for name, tensor in inputs.items()}
    assert mosaic_key_scan(**as_double)[0].dtype == torch.float64 and calls == [1]


# ----------------------------------------------------------------------------------------------------
# GPU tier
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("width", [64, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_gpu_scan_kernels(compiled, dtype, width):
    inputs = make_scan_inputs(4, 8, 2048, width, dtype=dtype, device="cuda", left_padding=100, initial_state=True)
    grad_keys = random_grad(inputs)
    keys, log_norm, grads = run_scan(compiled[0].mosaic_key_scan_triton, inputs, grad_keys)
    expected_keys, expected_log_norm, expected_grads = run_scan(mosaic_key_scan_torch, inputs, grad_keys)
    assert keys.dtype == dtype and [grad.dtype for grad in grads] == [dtype] * 3
    assert_relative(keys, expected_keys, GPU_RELATIVE_TOLERANCE[dtype], "keys")
    finite = torch.isfinite(expected_log_norm)
    assert torch.equal(torch.isfinite(log_norm), finite)
    assert_relative(log_norm[finite], expected_log_norm[finite], 1e-6, "log_norm")
    for name, got, want in zip(INPUT_NAMES, grads, expected_grads):
        assert torch.isfinite(got).all(), name
        assert_relative(got, want, GPU_RELATIVE_TOLERANCE[dtype], f"grad of {name}")


def test_gpu_scan_extreme_gates_and_padding(compiled):
    op = compiled[0].mosaic_key_scan_triton
    inputs = extreme_inputs(2000, device="cuda")
    grad_keys = random_grad(inputs)
    keys, log_norm, grads = run_scan(op, inputs, grad_keys)
    expected = naive_results({name: tensor.cpu() for name, tensor in inputs.items()}, grad_keys.cpu())
    check_against((keys.cpu(), log_norm.cpu(), [grad.cpu() for grad in grads]), expected,
                  KEYS_TOLERANCE[torch.float32], LOG_NORM_TOLERANCE[torch.float32], GRAD_TOLERANCE[torch.float32])
    check_left_padding(op, device="cuda")
    check_scale_free(op, device="cuda")
    check_continuation(op, make_scan_inputs(2, 2, 300, 64, left_padding=21, device="cuda"),
                       [0, 20, 21, 200, 201, 202, 300], (1e-5, 1e-5))
