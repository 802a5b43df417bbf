"""Benchmarks of the memory ops: ratios measured side by side in one run, written to the "Kernels"
section of benchmarks/RESULTS.md.

CPU (always):
  (a) chapter attention, gathered reference (only the routed chapters) vs a dense formulation (scores over
      the whole bank, a mask keeping only the routed chapters), forward and forward+backward;
  (b) Engram lookup, one fused gather over all heads (`engram_lookup_torch`) vs one `F.embedding` per
      head, gather alone and with the hashing, forward and forward+backward;
  (c) chapter attention time and peak extra memory as the bank grows from 4K to 262K memory tokens at a
      fixed top-k and chapter size;
  (d) Memory Mosaics key scan, the chunked PyTorch path vs the naive step-by-step loop, forward and
      forward+backward.
GPU (when CUDA is available): Triton vs reference forward and forward+backward for the Engram lookup, chapter
attention, the product-key bag and the Memory Mosaics key scan, the Engram lookup's bytes/s as a fraction of the
device-to-device copy bandwidth, and chapter attention FLOP/s vs dense SDPA doing the same FLOPs.

Usage: python -m benchmarks.bench_kernels [--repeats N] [--threads N] [--no-write]
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.benchmark import Timer

from benchmarks.harness import benchmark_parser, finish_run, interleaved_medians, markdown_table, start_run
from modeling_memory.memory_llama.naive_engram import naive_primes_from
from modeling_memory.memory_llama.naive_mosaic_keys import naive_mosaic_key_scan
from modeling_memory.memory_llama.ops_chapter_attention import chapter_attention_torch
from modeling_memory.memory_llama.ops_mosaic_keys import mosaic_key_scan_torch
from modeling_memory.memory_llama.ops_product_keys import product_key_bag_torch
from modeling_memory.memory_llama.ops_engram import (
    EngramHashing,
    engram_history_lengths,
    engram_lookup_torch,
    engram_row_ids,
)


# ------------------------------------------------------------------------------------------------ inputs


def chapter_inputs(num_tokens, num_heads, head_dim, num_chapters, chapter_size, num_shared, top_k, *,
                   device="cpu", dtype=torch.float32, seed=0):
    """query (N, H, D), bank K/V (C, T, H, D), chapter ids (N, shared + k) and weights like the router's."""
    generator = torch.Generator().manual_seed(seed)
    query = torch.randn(num_tokens, num_heads, head_dim, generator=generator)
    keys = torch.randn(num_chapters, chapter_size, num_heads, head_dim, generator=generator)
    values = torch.randn(num_chapters, chapter_size, num_heads, head_dim, generator=generator)
    routed_logits = torch.randn(num_tokens, num_chapters - num_shared, generator=generator)
    top_logits, top_chapters = routed_logits.topk(top_k, dim=-1)
    ids = torch.cat([torch.arange(num_shared).expand(num_tokens, num_shared), top_chapters + num_shared], dim=1)
    weights = torch.cat([torch.full((num_tokens, num_shared), 1.0 / num_shared), top_logits.softmax(-1)], dim=1)
    tensors = [t.to(device=device, dtype=dtype) for t in (query, keys, values)]
    return tensors + [ids.to(device), weights.to(device)]


def dense_chapter_attention(query, bank_keys, bank_values, chapter_ids, chapter_weights, scale):
    """The same op computed densely: scores against every memory token of the bank, softmax within each
    chapter, then a dense (N, C) weight matrix that is zero outside each token's chapters (the mask)."""
    num_tokens = query.shape[0]
    num_chapters = bank_keys.shape[0]
    scores = torch.einsum("nhd,cthd->nhct", query.float(), bank_keys.float()) * scale
    probs = scores.softmax(dim=-1)
    dense_weights = torch.zeros(num_tokens, num_chapters, device=query.device).scatter_add(
        1, chapter_ids, chapter_weights.float()
    )
    weighted = probs * dense_weights[:, None, :, None]
    return torch.einsum("nhct,cthd->nhd", weighted, bank_values.float()).to(query.dtype)


def engram_inputs(batch, new_len, orders, heads_per_order, head_dim, table_size, vocab, *, device="cpu",
                  dtype=torch.float32, seed=0):
    """Lookup inputs as the model builds them (EOS breaks, full-range int64 multipliers) and the table."""
    generator = torch.Generator().manual_seed(seed)
    history = max(orders) - 1
    token_ids = torch.randint(0, vocab, (batch, history + new_len), generator=generator)
    boundary = torch.rand(batch, history + new_len, generator=generator) < 0.02
    boundary[:, :history] = True
    bound = (2**63 - 1) // (vocab + 1)
    primes = torch.tensor(naive_primes_from(table_size, heads_per_order * len(orders)))
    hashing = EngramHashing(
        canonical_map=torch.randint(0, vocab, (vocab,), generator=generator).to(device),
        multipliers=(torch.randint(0, bound // 2, (history + 1,), generator=generator, dtype=torch.int64) * 2 + 1).to(device),
        table_primes=primes.to(device),
        table_offsets=(torch.cumsum(primes, 0) - primes).to(device),
        ngram_orders=tuple(orders),
        pad_id=vocab,
    )
    inputs = dict(
        token_ids=token_ids.to(device), history_lengths=engram_history_lengths(boundary, history).to(device), hashing=hashing
    )
    table = torch.nn.Embedding(int(primes.sum()), head_dim).to(device=device, dtype=dtype)
    return inputs, table


def mosaic_key_inputs(batch, heads, length, width, *, device="cpu", dtype=torch.float32, seed=0):
    """u (B, H, T, D), log gates and log decays (B, H, T) as the associative memory makes them: log g = W_g x,
    log lambda = -|W_lambda x|."""
    generator = torch.Generator().manual_seed(seed)
    projected = torch.randn(batch, heads, length, width, generator=generator)
    log_gate = torch.randn(batch, heads, length, generator=generator)
    log_decay = -torch.randn(batch, heads, length, generator=generator).abs()
    return [tensor.to(device=device, dtype=dtype) for tensor in (projected, log_gate, log_decay)]


# ------------------------------------------------------------------------------------------------ helpers


def forward_backward(function, inputs):
    """A closure running function() and a backward into `inputs` (which it turns into leaves that need grad)."""
    for tensor in inputs:
        tensor.requires_grad_(True)

    def run():
        for tensor in inputs:
            tensor.grad = None
        out = function()
        out.backward(torch.ones_like(out))

    return run


def no_grad(function):
    def run():
        with torch.no_grad():
            function()

    return run


def return_freed_memory_at_once() -> None:
    """glibc keeps freed blocks below its (dynamic, up to 32 MiB) mmap threshold for reuse, which hides them
    from the resident-memory peak; a fixed small threshold makes every large tensor an mmap returned on free."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 16)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 1 << 16)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


def peak_extra_memory_mib(function) -> float:
    """Peak resident memory above the current level while function() runs, in MiB (Linux: VmHWM is reset
    through /proc/self/clear_refs; elsewhere the process peak is returned, an upper bound)."""
    def status(key):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1]) / 1024
        return float("nan")

    try:
        Path("/proc/self/clear_refs").write_text("5")  # peak RSS := current RSS
        baseline = status("VmRSS:")
    except OSError:
        baseline = 0.0
    function()
    return status("VmHWM:") - baseline


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f}"


def ms_fine(seconds: float) -> str:
    """GPU timings: tens of microseconds matter."""
    return f"{seconds * 1e3:.3f}"


# ------------------------------------------------------------------------------------------------ CPU


def bench_dense_vs_gathered(repeats: int) -> str:
    n, h, d, t, shared, k = 256, 4, 64, 64, 1, 2
    scale = d**-0.5
    rows = []
    for c in (64, 256):
        query, keys, values, ids, weights = chapter_inputs(n, h, d, c, t, shared, k, seed=c)
        gathered = chapter_attention_torch(query, keys, values, ids, weights, scale)
        dense = dense_chapter_attention(query, keys, values, ids, weights, scale)
        torch.testing.assert_close(gathered, dense, atol=1e-4, rtol=1e-4)  # same op, two formulations
        tensors = [query, keys, values, weights]
        timings = interleaved_medians(
            {
                "gathered fwd": no_grad(lambda: chapter_attention_torch(query, keys, values, ids, weights, scale)),
                "dense fwd": no_grad(lambda: dense_chapter_attention(query, keys, values, ids, weights, scale)),
                "gathered fwd+bwd": forward_backward(
                    lambda: chapter_attention_torch(query, keys, values, ids, weights, scale), tensors),
                "dense fwd+bwd": forward_backward(
                    lambda: dense_chapter_attention(query, keys, values, ids, weights, scale), tensors),
            },
            repeats,
        )
        for mode in ("fwd", "fwd+bwd"):
            gathered_s, dense_s = timings[f"gathered {mode}"], timings[f"dense {mode}"]
            rows.append([f"{c * t:,} ({c} x {t})", f"{c / (shared + k):.0f}x", mode, ms(gathered_s), ms(dense_s),
                         f"{dense_s / gathered_s:.1f}x"])
    table = markdown_table(
        ["memory tokens (C x T)", "dense / gathered FLOPs", "pass", "gathered reference (ms)", "dense + mask (ms)",
         "dense / gathered time"],
        rows,
    )
    return (
        f"**(a) Chapter attention: gathered reference vs dense over the bank with a mask.** N={n} tokens, "
        f"H={h}, D={d}, {shared} shared + top-{k} chapters per token; fp32, median of {repeats}, gradients to "
        f"query, bank K/V and weights in fwd+bwd.\n\n{table}\n"
    )


def bench_fused_vs_per_head_gather(repeats: int) -> str:
    batch, new_len, orders, heads_per_order, d, table_size, vocab = 4, 1024, [2, 3], 8, 32, 65536, 49152
    inputs, table = engram_inputs(batch, new_len, orders, heads_per_order, d, table_size, vocab)
    primes, offsets = inputs["hashing"].table_primes.tolist(), inputs["hashing"].table_offsets.tolist()
    # The baseline keeps one embedding per head (the same rows as the fused table's slices).
    per_head = torch.nn.ModuleList(
        torch.nn.Embedding.from_pretrained(table.weight.detach()[o : o + p].clone(), freeze=False)
        for o, p in zip(offsets, primes)
    )
    rows = engram_row_ids(**inputs)
    local_rows = rows - inputs["hashing"].table_offsets

    def fused_gather():
        return table(rows).flatten(-2)

    def per_head_gather():
        return torch.cat([per_head[h](local_rows[..., h]) for h in range(len(per_head))], dim=-1)

    def fused_lookup():  # dense gradients on both sides: this compares fusing the heads, not gradient layouts
        return engram_lookup_torch(**inputs, table_weight=table.weight, sparse_grad=False)

    def per_head_lookup():
        local = engram_row_ids(**inputs) - inputs["hashing"].table_offsets
        return torch.cat([per_head[h](local[..., h]) for h in range(len(per_head))], dim=-1)

    assert torch.equal(fused_gather(), per_head_gather())
    parameters = [table.weight, *[module.weight for module in per_head]]
    cases = {
        "gather": (fused_gather, per_head_gather),
        "hash + gather": (fused_lookup, per_head_lookup),
    }
    functions = {}
    for name, (fused, baseline) in cases.items():
        functions[f"fused {name} fwd"] = no_grad(fused)
        functions[f"per-head {name} fwd"] = no_grad(baseline)
        functions[f"fused {name} fwd+bwd"] = forward_backward(fused, parameters)
        functions[f"per-head {name} fwd+bwd"] = forward_backward(baseline, parameters)
    timings = interleaved_medians(functions, repeats)
    table_rows = []
    for name in cases:
        for mode in ("fwd", "fwd+bwd"):
            fused_s = timings[f"fused {name} {mode}"]
            baseline_s = timings[f"per-head {name} {mode}"]
            table_rows.append([name, mode, ms(fused_s), ms(baseline_s), f"{baseline_s / fused_s:.2f}x"])
    heads = heads_per_order * len(orders)
    table_md = markdown_table(
        ["work", "pass", "fused, all heads (ms)", f"{heads} x F.embedding (ms)", "per-head / fused"], table_rows
    )
    return (
        f"**(b) Engram lookup: one fused gather vs one F.embedding per head.** B={batch}, S={new_len}, "
        f"orders {orders} x {heads_per_order} heads, D={d} per head, tables of ~{table_size} rows "
        f"({sum(primes)} rows in all), fp32, median of {repeats}.\n\n{table_md}\n"
    )


def bench_bank_growth(repeats: int) -> str:
    n, h, d, t, shared, k = 256, 4, 64, 64, 1, 2
    chapter_counts = [64, 256, 1024, 4096]  # 4K .. 262K memory tokens
    scale = d**-0.5
    functions, peaks = {}, {}
    for c in chapter_counts:
        query, keys, values, ids, weights = chapter_inputs(n, h, d, c, t, shared, k, seed=c)
        forward = no_grad(
            lambda q=query, kk=keys, v=values, i=ids, w=weights: chapter_attention_torch(q, kk, v, i, w, scale)
        )
        train = forward_backward(
            lambda q=query, kk=keys, v=values, i=ids, w=weights: chapter_attention_torch(q, kk, v, i, w, scale),
            [query, weights],
        )
        functions[(c, "fwd")], functions[(c, "fwd+bwd")] = forward, train
        peaks[(c, "fwd")], peaks[(c, "fwd+bwd")] = peak_extra_memory_mib(forward), peak_extra_memory_mib(train)
    # All bank sizes interleaved in one loop, so a change of load on the machine hits every size alike.
    timings = interleaved_medians(functions, repeats)
    first = chapter_counts[0]
    rows = [
        [
            f"{c * t:,}",
            c,
            ms(timings[(c, "fwd")]),
            f"{timings[(c, 'fwd')] / timings[(first, 'fwd')]:.2f}x",
            f"{peaks[(c, 'fwd')]:.0f}",
            ms(timings[(c, "fwd+bwd")]),
            f"{timings[(c, 'fwd+bwd')] / timings[(first, 'fwd+bwd')]:.2f}x",
            f"{peaks[(c, 'fwd+bwd')]:.0f}",
        ]
        for c in chapter_counts
    ]
    table = markdown_table(
        ["memory tokens", "chapters", "fwd (ms)", "fwd growth", "fwd peak extra (MiB)", "fwd+bwd (ms)",
         "fwd+bwd growth", "fwd+bwd peak extra (MiB)"],
        rows,
    )
    last = chapter_counts[-1]
    growth = timings[(last, "fwd")] / timings[(first, "fwd")]
    memory_growth = peaks[(last, "fwd")] / peaks[(first, "fwd")]
    return (
        f"**(c) Chapter attention as the bank grows** (reference op, {shared} shared + top-{k}, T={t}, N={n}, "
        f"H={h}, D={d}, fp32, median of {repeats}, all sizes interleaved). fwd+bwd takes gradients of the query "
        f"and the chapter weights (the bank's own gradient is a dense (C, T, H, D) tensor, O(bank) by nature). "
        f"Peak extra = peak resident memory above the level before the call, the bank itself excluded. "
        f"{last * t:,} vs {first * t:,} memory tokens: forward time {growth:.2f}x, forward peak "
        f"memory {memory_growth:.2f}x (target <= 1.2x).\n\n{table}\n"
    )


def bench_mosaic_key_scan(repeats: int) -> str:
    batch, heads, length, width = 4, 8, 2048, 64
    repeats = min(repeats, 3)  # the naive loop's forward+backward takes about half a second
    inputs = mosaic_key_inputs(batch, heads, length, width)
    chunked = mosaic_key_scan_torch(*inputs)[0]
    torch.testing.assert_close(chunked.double(), naive_mosaic_key_scan(*inputs)[0], atol=1e-5, rtol=1e-5)
    timings = interleaved_medians(
        {
            "chunked fwd": no_grad(lambda: mosaic_key_scan_torch(*inputs)),
            "naive fwd": no_grad(lambda: naive_mosaic_key_scan(*inputs)),
            "chunked fwd+bwd": forward_backward(lambda: mosaic_key_scan_torch(*inputs)[0], inputs),
            "naive fwd+bwd": forward_backward(lambda: naive_mosaic_key_scan(*inputs)[0], inputs),
        },
        repeats,
    )
    rows = []
    for mode in ("fwd", "fwd+bwd"):
        chunked_s, naive_s = timings[f"chunked {mode}"], timings[f"naive {mode}"]
        rows.append([mode, ms(chunked_s), ms(naive_s), f"{naive_s / chunked_s:.1f}x"])
    table = markdown_table(["pass", "chunked PyTorch path, fp32 (ms)", "naive loop, float64 (ms)",
                            "naive / chunked"], rows)
    return (
        f"**(d) Memory Mosaics key scan: chunked PyTorch path vs the naive step-by-step loop.** B={batch}, H={heads}, "
        f"T={length}, D={width}, gradients to u, log gates and log decays in fwd+bwd; median of {repeats}.\n\n"
        f"{table}\n"
    )


# ------------------------------------------------------------------------------------------------ GPU


def cuda_time(function, warmup: int = 3) -> float:
    """Median seconds per call, by torch.utils.benchmark's `Timer.blocked_autorange`: blocks of back-to-back calls,
    the GPU synchronised only at each block's ends (as in a training loop, the host queues the next call's kernels
    while the GPU runs the current ones). Timing one call from an idle GPU would add the host's launch latency to
    every op, which for sub-millisecond ops is most of the figure and says nothing about the kernels (the copy
    bandwidth they are compared to included). The warm-up calls compile the kernels first."""
    for _ in range(warmup):
        function()
    return Timer("function()", globals={"function": function}).blocked_autorange(min_run_time=1.0).median


def graph_time(function) -> float:
    """Seconds per call of function's GPU work alone: the call is captured once in a CUDA graph and replayed,
    so no host-side launch cost is included (function must have run before, so its kernels are compiled)."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        function()
    return cuda_time(graph.replay)


def copy_bandwidth() -> float:
    """Device-to-device copy bytes/s (read + write) of a 1 GiB buffer: the bandwidth the lookup is compared to."""
    source = torch.empty(1 << 28, dtype=torch.float32, device="cuda")
    target = torch.empty_like(source)
    seconds = cuda_time(lambda: target.copy_(source))
    return 2 * source.numel() * source.element_size() / seconds


def bench_gpu() -> str:
    from modeling_memory.memory_llama.kernels_chapter_attention import chapter_attention_triton
    from modeling_memory.memory_llama.kernels_engram import engram_lookup_triton

    dtype = torch.bfloat16
    sections = []

    # Engram lookup.
    batch, new_len, orders, heads_per_order, d = 8, 4096, [2, 3], 8, 32
    inputs, table = engram_inputs(batch, new_len, orders, heads_per_order, d, 1 << 20, 128256, device="cuda", dtype=dtype)
    weight = table.weight
    heads = heads_per_order * len(orders)
    triton_fwd = cuda_time(no_grad(lambda: engram_lookup_triton(**inputs, table_weight=weight)))
    triton_fwd_gpu = graph_time(no_grad(lambda: engram_lookup_triton(**inputs, table_weight=weight)))
    reference_fwd = cuda_time(no_grad(lambda: engram_lookup_torch(**inputs, table_weight=weight)))
    rows = [["fwd", ms_fine(triton_fwd), ms_fine(reference_fwd), f"{reference_fwd / triton_fwd:.2f}x"]]
    # Both give the table a coalesced sparse gradient (the rows read).
    reference_train = cuda_time(forward_backward(lambda: engram_lookup_torch(**inputs, table_weight=weight), [weight]))
    triton_train = cuda_time(forward_backward(lambda: engram_lookup_triton(**inputs, table_weight=weight), [weight]))
    rows.append(["fwd+bwd, sparse gradient", ms_fine(triton_train), ms_fine(reference_train), f"{reference_train / triton_train:.2f}x"])
    tokens = batch * new_len
    # Bytes the fused forward must move: gathered rows and the output, plus ids, history lengths and map reads.
    moved = 2 * tokens * heads * d * weight.element_size() + tokens * (max(orders) * 2 + 1) * 8
    bandwidth = copy_bandwidth()
    sections.append(
        f"**Engram lookup, Triton vs reference** (B={batch}, S={new_len}, {heads} heads x D={d}, tables of ~1M rows, "
        f"bf16).\n\n"
        + markdown_table(["pass", "Triton (ms)", "reference (ms)", "reference / Triton"], rows)
        + f"\n\nFused forward: {moved / triton_fwd / 1e9:.0f} GB/s = {moved / triton_fwd / bandwidth:.0%} of "
        f"the device-to-device copy bandwidth ({bandwidth / 1e9:.0f} GB/s) per call, host launch cost included; "
        f"the kernel alone (CUDA-graph replay, {ms_fine(triton_fwd_gpu)} ms): {moved / triton_fwd_gpu / 1e9:.0f} GB/s = "
        f"{moved / triton_fwd_gpu / bandwidth:.0%}.\n"
    )

    # Chapter attention.
    n, h, d, c, t, shared, k = 16384, 8, 64, 1024, 128, 1, 2
    query, keys, values, ids, weights = chapter_inputs(n, h, d, c, t, shared, k, device="cuda", dtype=dtype)
    scale = d**-0.5
    tensors = [query, keys, values, weights]
    reads = shared + k
    forward_flops = 4 * n * reads * t * h * d  # QK^T and PV
    train_flops = forward_flops * 3.5  # backward: recomputed QK^T, dP, dV, dK, dQ (flash-attention convention)
    timings = {
        "Triton fwd": cuda_time(no_grad(lambda: chapter_attention_triton(query, keys, values, ids, weights, scale))),
        "reference fwd": cuda_time(no_grad(lambda: chapter_attention_torch(query, keys, values, ids, weights, scale))),
        "Triton fwd+bwd": cuda_time(forward_backward(
            lambda: chapter_attention_triton(query, keys, values, ids, weights, scale), tensors)),
        "reference fwd+bwd": cuda_time(forward_backward(
            lambda: chapter_attention_torch(query, keys, values, ids, weights, scale), tensors)),
    }
    # Dense SDPA with the same FLOPs: every token attends to reads * T keys.
    sdpa_q = torch.randn(1, h, n, d, device="cuda", dtype=dtype)
    sdpa_k = torch.randn(1, h, reads * t, d, device="cuda", dtype=dtype)
    sdpa_v = torch.randn(1, h, reads * t, d, device="cuda", dtype=dtype)
    timings["SDPA fwd"] = cuda_time(no_grad(lambda: F.scaled_dot_product_attention(sdpa_q, sdpa_k, sdpa_v)))
    timings["SDPA fwd+bwd"] = cuda_time(forward_backward(
        lambda: F.scaled_dot_product_attention(sdpa_q, sdpa_k, sdpa_v), [sdpa_q, sdpa_k, sdpa_v]))
    rows = []
    for mode, flops in (("fwd", forward_flops), ("fwd+bwd", train_flops)):
        triton_s, reference_s, sdpa_s = timings[f"Triton {mode}"], timings[f"reference {mode}"], timings[f"SDPA {mode}"]
        rows.append([
            mode, ms_fine(triton_s), ms_fine(reference_s), f"{reference_s / triton_s:.2f}x", f"{flops / triton_s / 1e12:.1f}",
            f"{flops / sdpa_s / 1e12:.1f}", f"{sdpa_s / triton_s:.2f}",
        ])
    sections.append(
        f"**Chapter attention, Triton vs reference vs dense SDPA of the same FLOPs** (N={n}, H={h}, D={d}, C={c} x "
        f"T={t}, {shared} shared + top-{k}, bf16; SDPA: {n} queries x {reads * t} keys).\n\n"
        + markdown_table(
            ["pass", "Triton (ms)", "reference (ms)", "reference / Triton", "Triton TFLOP/s", "SDPA TFLOP/s",
             "Triton FLOP/s / SDPA FLOP/s"],
            rows,
        )
        + "\n"
    )
    sections.append(bench_gpu_product_key_bag())
    sections.append(bench_gpu_mosaic_key_scan())
    return "\n".join(sections)


def bench_gpu_product_key_bag() -> str:
    """The product-key memory's weighted embedding bag: Triton vs the PyTorch path, each token reading J value rows
    of a 1M-row table with fp32 softmax weights; fwd+bwd gives the table its sparse row gradient."""
    from modeling_memory.memory_llama.kernels_product_keys import product_key_bag_triton

    generator = torch.Generator().manual_seed(0)
    rows = []
    for tokens, reads, slots, width, dtype in ((4096, 128, 1 << 20, 1024, torch.bfloat16),
                                               (8192, 32, 1 << 20, 1024, torch.bfloat16),
                                               (4096, 128, 1 << 16, 512, torch.float32)):
        values = torch.randn(slots, width, generator=generator).to("cuda", dtype)
        indices = torch.randint(0, slots, (tokens, reads), generator=generator).to("cuda")
        weights = torch.randn(tokens, reads, generator=generator).softmax(-1).to("cuda")
        trained_values, trained_weights = values.clone(), weights.clone()  # forward_backward makes them leaves
        timings = {}
        for name, op in (("Triton", product_key_bag_triton), ("reference", product_key_bag_torch)):
            timings[f"{name} fwd"] = cuda_time(no_grad(lambda op=op: op(values, indices, weights)))
            timings[f"{name} fwd+bwd"] = cuda_time(forward_backward(
                lambda op=op: op(trained_values, indices, trained_weights), [trained_values, trained_weights]))
        gathered = tokens * reads * width * values.element_size()
        shape = f"N={tokens}, J={reads}, {slots:,} rows x {width}, {str(dtype).removeprefix('torch.')}"
        for mode in ("fwd", "fwd+bwd"):
            triton_s, reference_s = timings[f"Triton {mode}"], timings[f"reference {mode}"]
            rate = f"{gathered / triton_s / 1e9:.0f}" if mode == "fwd" else ""
            rows.append([shape, mode, ms_fine(triton_s), ms_fine(reference_s), f"{reference_s / triton_s:.2f}x", rate])
    return (
        "**Product-key bag, Triton vs reference** (the weighted sum of each token's J value rows; gathered GB/s = "
        "rows read per second, the kernel's forward traffic).\n\n"
        + markdown_table(["shape", "pass", "Triton (ms)", "reference (ms)", "reference / Triton", "gathered GB/s"], rows)
        + "\n"
    )


def bench_gpu_mosaic_key_scan() -> str:
    """The Memory Mosaics key scan: Triton vs the chunked PyTorch path, forward and forward+backward (gradients to
    u, log gates and log decays)."""
    from modeling_memory.memory_llama.kernels_mosaic_keys import mosaic_key_scan_triton

    rows = []
    for batch, heads, length, width, dtype in ((4, 8, 2048, 64, torch.bfloat16), (4, 8, 2048, 64, torch.float32),
                                               (8, 16, 4096, 128, torch.bfloat16)):
        inputs = mosaic_key_inputs(batch, heads, length, width, device="cuda", dtype=dtype)
        trained = [tensor.clone() for tensor in inputs]  # forward_backward makes them leaves
        timings = {}
        for name, op in (("Triton", mosaic_key_scan_triton), ("reference", mosaic_key_scan_torch)):
            timings[f"{name} fwd"] = cuda_time(no_grad(lambda op=op: op(*inputs)))
            timings[f"{name} fwd+bwd"] = cuda_time(forward_backward(lambda op=op: op(*trained)[0], trained))
        shape = f"B={batch}, H={heads}, T={length}, D={width}, {str(dtype).removeprefix('torch.')}"
        for mode in ("fwd", "fwd+bwd"):
            triton_s, reference_s = timings[f"Triton {mode}"], timings[f"reference {mode}"]
            rows.append([shape, mode, ms_fine(triton_s), ms_fine(reference_s), f"{reference_s / triton_s:.2f}x"])
    return (
        "**Memory Mosaics key scan, Triton vs reference** (the chunked PyTorch path; one program per sequence and "
        "head walks its tiles of time steps).\n\n"
        + markdown_table(["shape", "pass", "Triton (ms)", "reference (ms)", "reference / Triton"], rows)
        + "\n"
    )


# ------------------------------------------------------------------------------------------------ main


def main() -> None:
    parser = benchmark_parser(__doc__, default_threads=1)  # more threads add tens of ms per op on a shared machine
    parser.add_argument("--repeats", type=int, default=7, help="timed calls per variant (CPU)")
    args = parser.parse_args()
    machine, started = start_run(args)
    torch.manual_seed(0)
    return_freed_memory_at_once()

    parts = []
    for bench in (bench_dense_vs_gathered, bench_fused_vs_per_head_gather, bench_bank_growth, bench_mosaic_key_scan):
        part = bench(args.repeats)
        print(part, flush=True)
        parts.append(part)
    parts.append(
        "Reading the CPU numbers: the gathered reference copies each token's R chapters (N·R·T·H·D values for K "
        "and for V) and is bound by that copy, so on a CPU one large dense GEMM can still win while the bank is "
        "small; the gathered cost stays flat as the bank grows, the dense cost grows with it (C/R times the "
        "FLOPs). A fused gather saves per-call overhead only on a CPU; on a GPU it is one kernel instead of one "
        "per head. The Triton kernels' timings need a GPU (the interpreter says nothing about speed).\n"
    )
    if torch.cuda.is_available():
        part = bench_gpu()
        print(part, flush=True)
        parts.append(part)
    else:
        parts.append("GPU: none on this machine, so no Triton timings.\n")
    finish_run(args, "Kernels", "\n".join(parts), machine, started)


if __name__ == "__main__":
    main()
