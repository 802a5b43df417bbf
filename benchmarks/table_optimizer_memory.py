"""Peak memory of training a huge Engram-sized table: dense gradient + AdamW (how tables trained before
sparse gradients) vs sparse row gradients + LazyAdam (the default) vs sparse + the lean RowWiseAdagrad.

Each step reads `tokens x heads` random rows of one (rows x dim) fp32 table, as an Engram layer
does. Reports the optimizer state and the peak memory of a training step (CUDA: exact allocator peak;
CPU: peak RSS of a fresh process per optimizer).

    python -m benchmarks.table_optimizer_memory [--rows 4000000 --dim 64 --device cuda]
"""

import argparse
import json
import resource
import subprocess
import sys

import torch

from modeling_memory.training.table_optimizers import LazyAdam, RowWiseAdagrad, optimizer_state_bytes

# Gradient layout and optimizer of each variant.
OPTIMIZERS = {"adamw": "dense gradient, AdamW", "lazy_adam": "sparse, LazyAdam", "rowwise_adagrad": "sparse, RowWiseAdagrad"}


def measure(optimizer_name: str, rows: int, dim: int, tokens: int, heads: int, steps: int, device: str) -> dict:
    """Train one (rows, dim) table for `steps` steps of `tokens x heads` random reads: its optimizer state and peak
    memory in bytes."""
    torch.manual_seed(0)
    table = torch.nn.Embedding(rows, dim, device=device, sparse=optimizer_name != "adamw")
    if optimizer_name == "adamw":
        optimizer = torch.optim.AdamW(table.parameters(), lr=1e-3, weight_decay=0.0)
    elif optimizer_name == "lazy_adam":
        optimizer = LazyAdam(table.parameters(), lr=1e-3)
    else:
        optimizer = RowWiseAdagrad(table.parameters(), lr=1e-2)
    target = torch.randn(tokens, heads * dim, device=device)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    for _ in range(steps):
        ids = torch.randint(0, rows, (tokens, heads), device=device)
        loss = (table(ids).flatten(1) - target).square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    result = {
        "optimizer": optimizer_name,
        "table_bytes": rows * dim * 4,
        "state_bytes": optimizer_state_bytes(optimizer),
        "final_loss": loss.item(),
    }
    if device == "cuda":
        torch.cuda.synchronize()
        result["peak_bytes"] = torch.cuda.max_memory_allocated()
        result["peak_above_start_bytes"] = torch.cuda.max_memory_allocated() - before
    else:
        result["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=4_000_000, help="rows of the table")
    parser.add_argument("--dim", type=int, default=64, help="width of a row")
    parser.add_argument("--tokens", type=int, default=8192, help="tokens per step")
    parser.add_argument("--heads", type=int, default=16, help="rows each token reads")
    parser.add_argument("--steps", type=int, default=5, help="training steps")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--only", choices=list(OPTIMIZERS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.only:  # child process of a CPU measurement
        print(json.dumps(measure(args.only, args.rows, args.dim, args.tokens, args.heads, args.steps, args.device)))
        return
    results = []
    for name in OPTIMIZERS:
        if args.device == "cuda":
            results.append(measure(name, args.rows, args.dim, args.tokens, args.heads, args.steps, "cuda"))
            torch.cuda.empty_cache()
        else:  # a fresh process each, so peak RSS belongs to one optimizer
            command = [sys.executable, "-m", __spec__.name, "--only", name] + [
                f"--{k}={v}" for k, v in vars(args).items() if k not in ("only",)
            ]
            results.append(json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout))
    gib = 2**30
    peak_key = "peak_bytes" if args.device == "cuda" else "peak_rss_bytes"
    print(f"table {args.rows:,} x {args.dim} fp32 = {args.rows * args.dim * 4 / gib:.2f} GiB, device {args.device}")
    print(f"{'gradient, optimizer':<26} {'state GiB':>10} {'state/table':>12} {'peak GiB':>9}")
    for r in results:
        print(f"{OPTIMIZERS[r['optimizer']]:<26} {r['state_bytes'] / gib:>10.3f} {r['state_bytes'] / r['table_bytes']:>12.4f} "
              f"{r[peak_key] / gib:>9.2f}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
