"""Cost of the memory against the backbone Llama, measured side by side in one run on SmolLM2-135M.

    python -m benchmarks.throughput --threads 1 --clock cpu   # about 15 minutes on a 2-core CPU

Reports, as ratios memory / backbone:
  1. training step time (forward + backward + optimizer) at the demo configuration
     (`memory_preset(config, "both")`: Engram at layers 2 and 15, chapter memory at 10 and 20): the backbone
     with AdamW; the memory model with the optimizer MemoryTrainer builds (tables: sparse row gradients and
     LazyAdam on the rows read; the rest AdamW); and, for comparison, the memory model with dense table
     gradients and AdamW on every parameter (how it trained before sparse gradients);
  2. peak resident memory of a training run (each variant in a fresh subprocess);
  3. generation: prefill and decode tokens/s (greedy, batch 1);
  4. training step time as the chapter bank grows from 4K to 262K memory tokens, and as the Engram
     tables grow from 1e4 to 1e7 rows per layer (also the inference forward for the bank);
  5. forward + backward time against sequence length;
  6. where the time of a memory training step goes (torch.profiler, top operators).
Timings interleave the variants (A B A B ...) and take medians. `--clock cpu` times this process's CPU
time (with `--threads 1`, the work itself, unaffected by other jobs on a shared machine). Targets (CPU):
step <= 1.15x backbone, <= 1.1x growth from 4K to 262K memory tokens and from 1e4 to 1e7 Engram rows,
decode >= 0.8x backbone tokens/s.
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import time

import torch

from benchmarks.harness import benchmark_parser, finish_run, interleaved_medians, markdown_table, start_run
from modeling_memory import MemoryLlamaForCausalLM
from modeling_memory.tools.graft import from_llama, memory_config_from_llama, memory_preset
from modeling_memory.tools.offline_checkpoints import load_smollm2
from modeling_memory.training.trainer import build_memory_optimizer, memory_parameter_groups, set_sparse_table_gradients

STEP_TARGET, GROWTH_TARGET, DECODE_TARGET = 1.15, 1.1, 0.8
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def demo_models():
    """(backbone LlamaForCausalLM, grafted MemoryLlama, tokenizer) at the demo configuration."""
    base, tokenizer = load_smollm2()
    memory = from_llama(base, tokenizer=tokenizer, **memory_preset(base.config, "both"))
    return base, memory, tokenizer


def memory_variant(base, **overrides):
    """A MemoryLlama with the demo memory fields changed by `overrides`, the backbone weights copied in."""
    fields = memory_preset(base.config, "both")
    fields.update(overrides)
    config = memory_config_from_llama(base.config, **fields)
    model = MemoryLlamaForCausalLM(config)
    model.load_state_dict(base.state_dict(), strict=False)
    return model


def memory_trainer_optimizer(model):
    """The optimizer MemoryTrainer builds (the tables with sparse row gradients on LazyAdam, the rest on AdamW), at a
    learning rate too small to change what is timed."""
    groups = memory_parameter_groups(model, 1e-6, weight_decay=0.0, decay_parameter_names=[])
    return build_memory_optimizer(groups, "adam", torch.optim.AdamW, {"betas": (0.9, 0.95)})


def training_step(model, ids, optimizer=None):
    """A closure running one training step on `ids`; a memory model's loss includes its router losses (asked for,
    as MemoryTrainer does)."""
    router = {"output_router_logits": True} if isinstance(model, MemoryLlamaForCausalLM) else {}

    def step():
        model.train()
        model(ids, labels=ids, **router).loss.backward()
        if optimizer is not None:
            optimizer.step()
        model.zero_grad(set_to_none=True)

    return step


def dense_adamw(model):
    """The memory model as it trained before sparse table gradients: dense gradients, AdamW on every parameter
    (the tables' learning-rate groups kept)."""
    set_sparse_table_gradients(model, False)
    groups = memory_parameter_groups(model, 1e-6, 0.0, [name for name, _ in model.named_parameters()])
    return torch.optim.AdamW(groups, betas=(0.9, 0.95))


def inference_forward(model, ids):
    def forward():
        model.eval()
        with torch.no_grad():
            model(ids)

    return forward


def ratio_rows(medians: dict, baseline: str) -> list[list]:
    return [[name, f"{seconds:.3f}", f"{seconds / medians[baseline]:.2f}x"] for name, seconds in medians.items()]


# ---------------------------------------------------------------------------------------------- peak memory


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far, in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_memory_worker(variant: str, batch: int, seq_len: int, steps: int) -> None:
    """Runs in a fresh subprocess: load one variant, train a few steps, print peak RSS (MiB)."""
    torch.manual_seed(0)
    base, tokenizer = load_smollm2()
    model = base if variant == "backbone" else memory_variant(base)
    if variant != "backbone":
        del base
    loaded = peak_rss_mib()
    optimizer = memory_trainer_optimizer(model)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq_len))
    for _ in range(steps):
        training_step(model, ids, optimizer)()
    print(f"PEAK {loaded:.1f} {peak_rss_mib():.1f}")


def measure_peak_memory(batch: int, seq_len: int) -> dict[str, tuple[float, float]]:
    results = {}
    for variant in ("backbone", "memory"):
        output = subprocess.run(
            [sys.executable, "-m", __spec__.name, "--peak-memory-worker", variant, "--batch", str(batch), "--seq-len", str(seq_len)],
            capture_output=True, text=True, check=True,
        ).stdout
        line = next(line for line in output.splitlines() if line.startswith("PEAK "))
        loaded, peak = map(float, line.split()[1:])
        results[variant] = (loaded, peak)
    return results


# ---------------------------------------------------------------------------------------------- generation


def generation_speed(models: dict, tokenizer, prompt_len: int, new_tokens: int, repeats: int, clock=time.perf_counter):
    """Median prefill and decode tokens/s per model. Prefill = generate 1 token; decode = the rest."""
    prompt = torch.randint(100, tokenizer.vocab_size - 100, (1, prompt_len))
    attention = torch.ones_like(prompt)

    def generate(model, count):
        def run():
            model.generate(
                input_ids=prompt, attention_mask=attention, max_new_tokens=count, min_new_tokens=count,
                do_sample=False, pad_token_id=tokenizer.eos_token_id,
            )

        return run

    functions = {}
    for name, model in models.items():
        model.eval()
        functions[f"{name} prefill"] = generate(model, 1)
        functions[f"{name} full"] = generate(model, new_tokens + 1)
    with torch.no_grad():
        medians = interleaved_medians(functions, repeats, clock=clock)
    speeds = {}
    for name in models:
        prefill = medians[f"{name} prefill"]
        full = medians[f"{name} full"]
        speeds[name] = (prompt_len / prefill, new_tokens / max(full - prefill, 1e-9))
    return speeds


# ---------------------------------------------------------------------------------------------- profile


def profile_step(model, ids, optimizer, top: int = 12) -> str:
    """Top operators (self CPU time) of one training step (optimizer included), as a markdown table."""
    from torch.profiler import ProfilerActivity, profile

    step = training_step(model, ids, optimizer)
    step()  # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        step()
    events = sorted(profiler.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    rows = [[e.key, e.count, f"{e.self_cpu_time_total / 1e3:.0f}", f"{e.self_cpu_time_total / total:.1%}"] for e in events[:top]]
    return markdown_table(["operator", "calls", "self CPU ms", "share"], rows)


# ---------------------------------------------------------------------------------------------- main


def main() -> None:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3, help="timed repetitions of the main comparison")
    parser.add_argument("--sweep-repeats", type=int, default=2, help="timed repetitions in the sweeps")
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--chapters", type=int, nargs="+", default=[128, 1024, 8192], help="x 32 tokens: 4K to 262K")
    parser.add_argument("--engram-rows", type=int, nargs="+", default=[10_000, 100_000, 1_000_000, 10_000_000])
    parser.add_argument("--clock", choices=list(CLOCKS), default="wall",
                        help="wall time, or this process's CPU time (steadier on a shared machine, with --threads 1)")
    parser.add_argument("--peak-memory-worker", choices=["backbone", "memory"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    clock = CLOCKS[args.clock]
    if args.peak_memory_worker:
        peak_memory_worker(args.peak_memory_worker, args.batch, args.seq_len, steps=2)
        return

    machine, started = start_run(args)
    torch.manual_seed(0)
    base, memory, tokenizer = demo_models()
    ids = torch.randint(0, base.config.vocab_size, (args.batch, args.seq_len))
    sections = []

    print(f"[1/6] training step (fwd + bwd + optimizer), batch {args.batch} x {args.seq_len} tokens ...", flush=True)
    dense_memory = memory_variant(base)
    step_timings = interleaved_medians(
        {
            "backbone (AdamW)": training_step(base, ids, memory_trainer_optimizer(base)),
            "memory (demo config; sparse tables, LazyAdam + AdamW)": training_step(memory, ids, memory_trainer_optimizer(memory)),
            "memory, dense table gradients + AdamW (before)": training_step(dense_memory, ids, dense_adamw(dense_memory)),
        },
        args.repeats, clock=clock,
    )
    del dense_memory  # its optimizer state goes with it
    names = list(step_timings)
    step_ratio = step_timings[names[1]] / step_timings[names[0]]
    table = markdown_table(["model", "median s/step", "vs backbone"], ratio_rows(step_timings, names[0]))
    print(table, flush=True)
    sections.append(
        f"### Training step at the demo configuration (batch {args.batch} x {args.seq_len}, fwd + bwd + optimizer, "
        f"median of {args.repeats})\n\n{table}\n\nTarget <= {STEP_TARGET}x: "
        f"**{'met' if step_ratio <= STEP_TARGET else 'missed'}** ({step_ratio:.2f}x)."
    )

    print("[2/6] peak memory (fresh subprocess per variant) ...", flush=True)
    peaks = measure_peak_memory(args.batch, args.seq_len)
    rows = [
        [name, f"{loaded:.0f}", f"{peak:.0f}", f"{peak - loaded:.0f}", f"{peak / peaks['backbone'][1]:.2f}x"]
        for name, (loaded, peak) in peaks.items()
    ]
    table = markdown_table(["model", "RSS after load MiB", "peak RSS MiB", "training extra MiB", "peak vs backbone"], rows)
    print(table, flush=True)
    sections.append(
        f"### Peak resident memory, 2 training steps (backbone: AdamW; memory: LazyAdam tables + AdamW), "
        f"batch {args.batch} x {args.seq_len}\n\n{table}"
    )

    print("[3/6] generation (greedy, batch 1, prompt 128, 32 new tokens) ...", flush=True)
    speeds = generation_speed({"backbone": base, "memory": memory}, tokenizer, 128, 32, args.repeats, clock)
    rows = [
        [name, f"{prefill:.0f}", f"{prefill / speeds['backbone'][0]:.2f}x", f"{decode:.1f}", f"{decode / speeds['backbone'][1]:.2f}x"]
        for name, (prefill, decode) in speeds.items()
    ]
    table = markdown_table(["model", "prefill tok/s", "vs backbone", "decode tok/s", "vs backbone"], rows)
    print(table, flush=True)
    decode_ratio = speeds["memory"][1] / speeds["backbone"][1]
    sections.append(
        f"### Generation (greedy, batch 1, 128-token prompt, 32 new tokens, median of {args.repeats})\n\n{table}\n\n"
        f"Target decode >= {DECODE_TARGET}x: **{'met' if decode_ratio >= DECODE_TARGET else 'missed'}** ({decode_ratio:.2f}x)."
    )

    print("[4/6] scaling with memory size (training steps) ...", flush=True)
    backbone_step = training_step(base, ids, memory_trainer_optimizer(base))
    bank_models = {f"{c * 32:,} memory tokens": memory_variant(base, chapter_num_chapters=c) for c in args.chapters}
    train_fns = {"backbone": backbone_step, **{n: training_step(m, ids, memory_trainer_optimizer(m)) for n, m in bank_models.items()}}
    bank_train = interleaved_medians(train_fns, args.sweep_repeats, clock=clock)
    infer_fns = {"backbone": inference_forward(base, ids), **{n: inference_forward(m, ids) for n, m in bank_models.items()}}
    bank_infer = interleaved_medians(infer_fns, args.sweep_repeats, clock=clock)
    first_bank, largest_bank = next(iter(bank_models)), list(bank_models)[-1]
    rows = []
    for name in train_fns:
        rows.append([
            name, f"{bank_train[name]:.2f}", f"{bank_train[name] / bank_train['backbone']:.2f}x",
            f"{bank_train[name] / bank_train[first_bank]:.2f}x" if name != "backbone" else "",
            f"{bank_infer[name]:.3f}", f"{bank_infer[name] / bank_infer['backbone']:.2f}x",
        ])
    bank_table = markdown_table(
        ["chapter bank", "training step s", "vs backbone", "vs 4K bank", "inference fwd s", "vs backbone"], rows
    )
    bank_growth = bank_train[largest_bank] / bank_train[first_bank]
    print(bank_table, flush=True)
    del bank_models, train_fns, infer_fns

    del backbone_step  # and the backbone's AdamW state: the Engram sweep needs the memory

    # Built one at a time and timed in pairs with the smallest, so that only two tables (and their Adam state) live.
    engram_names = [f"{rows_per_layer:.0e} rows/layer" for rows_per_layer in args.engram_rows]
    smallest = memory_variant(base, engram_table_size=max(3, args.engram_rows[0] // 16))
    smallest_step = training_step(smallest, ids, memory_trainer_optimizer(smallest))
    engram_rows_out, engram_growth = [], 1.0
    for name, rows_per_layer in zip(engram_names[1:], args.engram_rows[1:]):
        model = memory_variant(base, engram_table_size=max(3, rows_per_layer // 16))
        timings = interleaved_medians(
            {engram_names[0]: smallest_step, name: training_step(model, ids, memory_trainer_optimizer(model))},
            args.sweep_repeats, clock=clock,
        )
        del model
        engram_growth = timings[name] / timings[engram_names[0]]
        if not engram_rows_out:
            engram_rows_out.append([engram_names[0], f"{timings[engram_names[0]]:.2f}", "1.00x"])
        engram_rows_out.append([name, f"{timings[name]:.2f}", f"{engram_growth:.2f}x"])
        print(f"    {engram_rows_out[-1]}", flush=True)
    del smallest, smallest_step
    engram_table = markdown_table(["Engram tables", "training step s", "vs 1e4 rows"], engram_rows_out)
    print(engram_table, flush=True)
    sections.append(
        f"### Scaling with memory size (training steps: fwd + bwd + optimizer, batch {args.batch} x {args.seq_len}, "
        f"median of {args.sweep_repeats})\n\n"
        f"Chapter bank (demo configuration otherwise; 32 tokens per chapter, 2 routed + 1 shared read per token):\n\n"
        f"{bank_table}\n\nTarget <= {GROWTH_TARGET}x growth from 4K to 262K memory tokens (training): "
        f"**{'met' if bank_growth <= GROWTH_TARGET else 'missed'}** ({bank_growth:.2f}x). Training reads only the rows of the "
        f"chapters the batch reads (a sparse bank gradient, LazyAdam on those rows) and folds the key/value projections "
        f"into the query and output when that is cheaper; what still grows with the bank is the router (one logit per "
        f"chapter). Inference projects the whole bank once and reuses it.\n\n"
        f"Engram (demo configuration otherwise; 16 tables per layer, 2 layers; rows are per layer; each size timed "
        f"beside the smallest):\n\n{engram_table}\n\nTarget <= {GROWTH_TARGET}x growth from 1e4 to 1e7 rows: "
        f"**{'met' if engram_growth <= GROWTH_TARGET else 'missed'}** ({engram_growth:.2f}x)."
    )

    print("[5/6] scaling with sequence length ...", flush=True)
    seq_rows = []
    for seq_len in args.seq_lens:
        seq_ids = torch.randint(0, base.config.vocab_size, (1, seq_len))
        timings = interleaved_medians(
            {"backbone": training_step(base, seq_ids), "memory": training_step(memory, seq_ids)}, args.sweep_repeats, clock=clock
        )
        seq_rows.append([seq_len, f"{timings['backbone']:.2f}", f"{timings['memory']:.2f}",
                         f"{timings['memory'] / timings['backbone']:.2f}x"])
        print(f"    {seq_rows[-1]}", flush=True)
    table = markdown_table(["sequence length", "backbone fwd+bwd s", "memory fwd+bwd s", "ratio"], seq_rows)
    sections.append(f"### Scaling with sequence length (fwd + bwd, batch 1, demo configuration, median of {args.sweep_repeats})\n\n{table}")

    print("[6/6] profile of one memory training step ...", flush=True)
    profile_table = profile_step(memory, ids, memory_trainer_optimizer(memory))
    print(profile_table, flush=True)
    sections.append(f"### Where a memory training step's time goes (demo configuration, torch.profiler, self CPU time)\n\n{profile_table}")

    body = (
        f"The machine is shared with other work, so absolute times are noisy; the ratios come from interleaved runs in "
        f"one process{', timed by this process CPU time' if args.clock == 'cpu' else ''}.\n\n"
        + "\n\n".join(sections)
    )
    finish_run(args, "Throughput and cost (benchmarks/throughput.py)", body, machine, started)


if __name__ == "__main__":
    main()
