"""How large a chapter bank and Engram tables fit on this machine, at the demo's backbone (SmolLM2-135M).

Each size runs in its own subprocess (so its peak resident memory is its own): build the grafted
model, then either one inference forward (batch 1 x 128 tokens, no autograd) or one training step
(batch 4 x 128 tokens, memory and backbone trainable) with the optimizer MemoryTrainer builds: the
tables with sparse row gradients on LazyAdam (two fp32 moments per weight) or RowWiseAdagrad (one fp32
scalar per row), everything else on AdamW. Peak RSS grows linearly with the memory's size; a
least-squares line through the measured points gives the bytes per memory parameter, and the largest
size that fits in the machine's RAM (less 2 GiB of headroom) follows. Sizes are kept small enough to
measure safely; the limits are extrapolated from the fitted line and printed as such.

    python -m benchmarks.limits      # measures, prints the table, writes its section of benchmarks/RESULTS.md
"""

import argparse
import json
import os
import resource
import subprocess
import sys

from benchmarks.harness import benchmark_parser, finish_run, markdown_table, start_run

BANK_TOKENS = (4096, 32768, 131072)  # chapter_num_chapters x chapter_size 32
TABLE_ROWS = (50021, 200003, 400009)  # rows per Engram table (16 tables per layer, 2 layers)
HEADROOM_GIB = 2.0
# Modes: inference, and a training step with each table optimizer of MemoryTrainer.
MODES = {"inference": None, "train, LazyAdam": "adam", "train, RowWiseAdagrad": "rowwise_adagrad"}
BEYOND_LIMITS = (
    "Beyond these sizes the process is ended by the kernel's out-of-memory killer (SIGKILL: no Python traceback, a "
    "half-finished step) or, for a single huge allocation, torch raises `RuntimeError: DefaultCPUAllocator: can't "
    "allocate memory`. A training step allocates no gradient of a table's size (the gradients are sparse): what a "
    "table costs beyond its own 4 bytes per weight is its optimizer state, 8 bytes per weight for LazyAdam's two "
    "moments, 4 bytes per row for RowWiseAdagrad."
)


def run_one(kind: str, size: int, mode: str) -> None:
    """Child process: build, run, print the peak RSS in bytes as JSON."""
    import torch

    from modeling_memory.tools.graft import from_llama, memory_preset
    from modeling_memory.tools.offline_checkpoints import load_smollm2
    from modeling_memory.training.trainer import build_memory_optimizer, memory_parameter_groups

    base, _ = load_smollm2()
    fields = memory_preset(base.config, "chapters" if kind == "bank" else "engram")
    if kind == "bank":
        fields["chapter_num_chapters"] = size // fields["chapter_size"]
    else:
        fields["engram_table_size"] = size
    model = from_llama(base, **fields)
    del base
    memory_params = sum(p.numel() for n, p in model.named_parameters() if "chapter_bank" in n or ".engram.table." in n)
    table_optimizer = MODES[mode]
    ids = torch.randint(0, model.config.vocab_size, (1 if table_optimizer is None else 4, 128))
    if table_optimizer is not None:
        model.train()
        groups = memory_parameter_groups(model, 1e-4, weight_decay=0.0, decay_parameter_names=[])
        optimizer = build_memory_optimizer(groups, table_optimizer, torch.optim.AdamW, {"betas": (0.9, 0.95)})
        model(ids, labels=ids, output_router_logits=True).loss.backward()
        optimizer.step()
    else:
        with torch.no_grad():
            model(ids)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"memory_params": memory_params, "peak_bytes": peak}))


def measure(kind: str, size: int, mode: str) -> dict:
    result = subprocess.run(
        [sys.executable, "-m", __spec__.name, "--child", kind, str(size), mode], capture_output=True, text=True, check=True
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def fit_line(points: list[tuple[int, int]]) -> tuple[float, float]:
    """Least squares peak = intercept + slope * params."""
    n = len(points)
    mean_x = sum(x for x, _ in points) / n
    mean_y = sum(y for _, y in points) / n
    slope = sum((x - mean_x) * (y - mean_y) for x, y in points) / sum((x - mean_x) ** 2 for x, _ in points)
    return mean_y - slope * mean_x, slope


def main() -> None:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--child", nargs=3, metavar=("KIND", "SIZE", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, size, mode = args.child
        run_one(kind, int(size), mode)
        return

    machine, started = start_run(args)
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    budget = ram - HEADROOM_GIB * 2**30
    machine += f", {ram / 2**30:.1f} GiB RAM (budget {budget / 2**30:.1f} GiB after {HEADROOM_GIB:.0f} GiB headroom)"
    print(f"RAM {ram / 2**30:.1f} GiB (budget {budget / 2**30:.1f} GiB)")
    rows = []
    for kind, sizes, unit in (("bank", BANK_TOKENS, "memory tokens"), ("table", TABLE_ROWS, "rows per table")):
        for mode in MODES:
            points = []
            for size in sizes:
                result = measure(kind, size, mode)
                points.append((result["memory_params"], result["peak_bytes"]))
                print(f"  {kind:5} {mode:9} {size:>9,} {unit}: {result['memory_params']:>13,} params, "
                      f"peak {result['peak_bytes'] / 2**30:.2f} GiB", flush=True)
            intercept, slope = fit_line(points)
            max_params = (budget - intercept) / slope
            per_unit = points[-1][0] / sizes[-1]
            rows.append((kind, mode, slope, max_params, max_params / per_unit, unit))
    table = markdown_table(
        ["memory", "mode", "bytes per memory parameter", "largest memory parameters", "largest size"],
        [
            [
                "chapter bank (2 layers, shared)" if kind == "bank" else "Engram tables (2 layers x 16)",
                mode, f"{slope:.1f}", f"{max_params / 1e9:.2f} B", f"{max_units:,.0f} {unit}",
            ]
            for kind, mode, slope, max_params, max_units, unit in rows
        ],
    )
    body = (
        "Peak resident memory measured at three sizes per row and fitted with a line; the largest size is "
        "the line's crossing of the budget (extrapolated). Training: one step with the optimizer MemoryTrainer builds "
        "(tables: sparse row gradients, LazyAdam or RowWiseAdagrad; the rest AdamW), every parameter trainable, "
        "batch 4 x 128 tokens; inference: batch 1 x 128 tokens, no autograd.\n\n" + table + "\n\n" + BEYOND_LIMITS
    )
    print(table)
    finish_run(args, "Memory limits at the demo backbone (SmolLM2-135M)", body, machine, started)


if __name__ == "__main__":
    main()
