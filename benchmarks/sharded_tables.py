"""Memory tables sharded by row owner: a training step and each process's table memory at 1, 2 and 4 CPU processes
(gloo), for an Engram table larger than one process's share of the machine's RAM when 4 processes share it.

    python -m benchmarks.sharded_tables                    # table of 1.1x RAM / 4 (~6.5 GiB here), ~10 min
    python -m benchmarks.sharded_tables --table-gib 1      # a quicker look

Each launch (`torch.distributed.run`, one per process count, launches interleaved over --rounds) builds a small
MemoryLlama (hidden 256, 4 layers, Engram at layers 0 and 2) whose tables are created straight as each process's
block (`deferred_memory_tables` then `shard_memory_tables`: no process ever holds a whole table), wraps it in DDP
with the tables ignored, and times training steps (RowWiseAdagrad on the tables: one float of state per row, so a
process needs about its block's bytes; AdamW on the rest) on one global batch
of 8 x 128 tokens split over the processes. Replicated data parallel would need the whole table in every process:
4 x the table, more than the machine has.

Reported per process count: the median step time (over the launches' medians) and its ratio to one process, each
process's table bytes and its peak resident memory. Every process computes on one thread, so one process uses one
core of this 2-core machine, two use both, and four share them: the step times show the exchange's cost beside
that, not a scaling law.
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from benchmarks.harness import benchmark_parser, finish_run, markdown_table, start_run
from benchmarks.tables_beyond_memory import machine_ram_bytes

GLOBAL_BATCH, SEQ_LEN, STEPS, WARMUP = 8, 128, 6, 2
PROCESS_COUNTS = (1, 2, 4)


def config_for(table_gib: float):
    from modeling_memory import MemoryLlamaConfig

    engram_dim, heads = 256, 2 * 4  # 2 orders x 4 heads, 32 floats per head row
    rows_per_head = int(table_gib * 2**30 / 4 / (engram_dim // heads) / heads / 2)  # 2 Engram layers
    return MemoryLlamaConfig(
        vocab_size=4096, hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, engram_layers=[0, 2], engram_ngram_orders=[2, 3],
        engram_heads_per_order=4, engram_table_size=rows_per_head, engram_dim=engram_dim,
    )


def worker(table_gib: float, out: str) -> None:
    """One process of a launch: build, shard, train, report."""
    import torch.distributed as dist

    from modeling_memory import MemoryLlamaForCausalLM
    from modeling_memory.memory_llama.table_placement import deferred_memory_tables
    from modeling_memory.training.sharded_tables import keep_tables_out_of_ddp, sharded_tables
    from modeling_memory.training.trainer import build_memory_optimizer, memory_parameter_groups

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    with deferred_memory_tables():
        model = MemoryLlamaForCausalLM(config_for(table_gib))
    model.shard_memory_tables()
    model.set_memory_placement("device")  # creates each block, filled as the model's init fills a table
    tables = sharded_tables(model)
    table_bytes = sum(module.weight.numel() * module.weight.element_size() for module in tables.values())
    groups = memory_parameter_groups(model, learning_rate=1e-3, weight_decay=0.0, decay_parameter_names=[])
    optimizer = build_memory_optimizer(groups, "rowwise_adagrad", torch.optim.AdamW, {})
    keep_tables_out_of_ddp(model, tables)
    trained = torch.nn.parallel.DistributedDataParallel(model)
    generator = torch.Generator().manual_seed(1)
    share = GLOBAL_BATCH // world_size
    times = []
    for step in range(WARMUP + STEPS):
        ids = torch.randint(3, model.config.vocab_size, (GLOBAL_BATCH, SEQ_LEN), generator=generator)
        ids = ids[rank * share : (rank + 1) * share]
        dist.barrier()
        begin = time.perf_counter()
        trained(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        dist.barrier()
        if step >= WARMUP:
            times.append(time.perf_counter() - begin)
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    report = {"step_s": statistics.median(times), "table_bytes": table_bytes, "peak_rss": peak_rss}
    with open(os.path.join(out, f"rank-{rank}.json"), "w") as handle:
        json.dump(report, handle)
    dist.barrier()
    dist.destroy_process_group()


def launch(processes: int, table_gib: float) -> list[dict]:
    with tempfile.TemporaryDirectory() as out:
        command = [
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
            "-m", "benchmarks.sharded_tables", "--worker", out, "--table-gib", str(table_gib),
        ]
        env = dict(os.environ, OMP_NUM_THREADS="1", TRANSFORMERS_VERBOSITY="error")
        result = subprocess.run(command, capture_output=True, text=True, env=env)
        if result.returncode != 0:
            raise RuntimeError(f"{processes} processes failed:\n{result.stderr[-4000:]}")
        reports = []
        for rank in range(processes):
            with open(os.path.join(out, f"rank-{rank}.json")) as handle:
                reports.append(json.load(handle))
        return reports


def main() -> None:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--table-gib", type=float, default=None, help="Engram table size (default: 1.1 x RAM / 4)")
    parser.add_argument("--rounds", type=int, default=2, help="launches per process count, interleaved")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # one process of a launch, writing here
    args = parser.parse_args()
    table_gib = args.table_gib or round(1.1 * machine_ram_bytes() / 4 / 2**30, 1)
    if args.worker is not None:
        worker(table_gib, args.worker)
        return
    machine, started = start_run(args)
    share_gib = machine_ram_bytes() / 4 / 2**30
    print(f"Engram table {table_gib:.1f} GiB; one process's share of RAM with 4 processes: {share_gib:.1f} GiB", flush=True)
    runs = {processes: [] for processes in PROCESS_COUNTS}
    for round_index in range(args.rounds):
        for processes in PROCESS_COUNTS:
            ranks = launch(processes, table_gib)
            runs[processes].append(ranks)
            print(f"round {round_index + 1}, {processes} process(es): step {max(r['step_s'] for r in ranks):.3f} s", flush=True)
    step = {p: statistics.median(max(r["step_s"] for r in ranks) for ranks in runs[p]) for p in PROCESS_COUNTS}
    rows, whole = [], runs[1][-1][0]["table_bytes"]
    for processes in PROCESS_COUNTS:
        ranks = runs[processes][-1]
        block = max(r["table_bytes"] for r in ranks)
        rows.append([
            processes,
            f"{step[processes]:.3f}",
            f"{step[processes] / step[1]:.2f}x",
            f"{block / 2**30:.2f} GiB ({block / whole:.2f} of the table)",
            f"{max(r['peak_rss'] for r in ranks) / 2**30:.2f} GiB",
        ])
    table = markdown_table(["processes", "step (s)", "vs 1 process", "table per process", "peak RSS per process"], rows)
    body = (
        f"An Engram table of {table_gib:.1f} GiB; each of 4 processes has a {share_gib:.1f} GiB share of RAM, so "
        f"replicated data parallel (the whole table in every process: {4 * table_gib:.1f} GiB) would not fit. Global "
        f"batch {GLOBAL_BATCH} x {SEQ_LEN} tokens; DDP (gloo) with the tables sharded by row owner, RowWiseAdagrad on "
        f"them; one thread per process ({os.cpu_count()} cores: one process uses one, two use both, four share them); "
        f"median of {args.rounds} launches per count, each the median of {STEPS} steps.\n\n{table}\n"
    )
    print(body, flush=True)
    finish_run(args, "Tables sharded across processes", body, machine, started)


if __name__ == "__main__":
    main()
