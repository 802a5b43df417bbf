"""Forgetting: learn knowledge set A, then train on different data; how much of A is kept?

    python benchmarks/forgetting.py            # about 10 minutes on a 2-core CPU

The Mixture-of-Chapters paper reports that learnt memory forgets less under later training (ARC-C
falls 2.7 points vs 6.7 for dense under instruction tuning). Here, small models trained from scratch:

  phase 1: natural text mixed with knowledge set A (fictional people) until A is largely memorised;
  phase 2: the same number of steps on different data: natural text mixed with knowledge set B
           (other fictional people, same sentence patterns: the most interfering kind of new data).

Models: Llama baseline, + chapter memory, + Engram and chapter memory (same backbone, all parameters
trained in both phases, same steps; not iso-FLOP: see iso_flop.py for that). Reported over seeds
(mean ± std): recall of A (training phrasings and held-out probes) after phase 1 and after phase 2,
retention = after / before, recall of B after phase 2, and validation loss on natural text.
Scaled down for a shared 2-core CPU: hidden 64, 2 layers, 2,048-token vocabulary, batch 8 x 64.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    add_small_model_arguments,
    finish_benchmark,
    markdown_table,
    mean_and_spread,
    mixed_batches,
    reduced_probe_recall,
    small_model,
    small_text_data,
    start_benchmark,
    train,
)

import torch  # noqa: E402

from modeling_memory.evaluation import mean_token_nll  # noqa: E402
from modeling_memory.knowledge import KnowledgeSet  # noqa: E402

LABELS = {"baseline": "Llama baseline", "chapters": "+ chapter memory", "both": "+ Engram + chapter memory"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_small_model_arguments(parser, entities=10)
    parser.add_argument("--steps", type=int, default=120, help="steps of each phase")
    args, started, machine = start_benchmark(parser)

    set_a = KnowledgeSet.generate(num_entities=args.entities, seed=0)
    set_b = KnowledgeSet.generate(num_entities=args.entities, seed=1)
    vocabulary, train_blocks, validation_blocks = small_text_data(args, set_a.training_documents() + set_b.training_documents())
    rows_a = vocabulary.document_blocks(set_a.training_documents(), args.block_size)
    rows_b = vocabulary.document_blocks(set_b.training_documents(), args.block_size)

    def recall(model, knowledge):
        return (
            reduced_probe_recall(model, vocabulary, knowledge.probes(held_out=False)),
            reduced_probe_recall(model, vocabulary, knowledge.probes(held_out=True)),
        )

    kinds = list(LABELS)
    keys = ("a_mem_1", "a_held_1", "loss_1", "a_mem_2", "a_held_2", "b_mem_2", "loss_2", "retention")
    results = {kind: {key: [] for key in keys} for kind in kinds}
    for seed in range(args.seeds):
        for kind in kinds:
            model = small_model(args, vocabulary.size, kind, seed)
            rng = random.Random(seed)
            start = time.perf_counter()
            train(model, mixed_batches(rng, train_blocks, rows_a, args.batch, args.knowledge_rows), args.steps, args.lr, warmup_steps=20)
            r = results[kind]
            a_mem, a_held = recall(model, set_a)
            r["a_mem_1"].append(a_mem), r["a_held_1"].append(a_held), r["loss_1"].append(mean_token_nll(model, validation_blocks))
            train(model, mixed_batches(rng, train_blocks, rows_b, args.batch, args.knowledge_rows), args.steps, args.lr, warmup_steps=20)
            a_mem2, a_held2 = recall(model, set_a)
            r["a_mem_2"].append(a_mem2), r["a_held_2"].append(a_held2)
            r["b_mem_2"].append(recall(model, set_b)[0])
            r["loss_2"].append(mean_token_nll(model, validation_blocks))
            r["retention"].append(a_mem2 / a_mem if a_mem > 0 else float("nan"))
            print(
                f"  seed {seed} {LABELS[kind]:<26} A after phase 1 {a_mem:.1%} (held-out {a_held:.1%}); "
                f"after phase 2 {a_mem2:.1%} (held-out {a_held2:.1%}); B {r['b_mem_2'][-1]:.1%}  "
                f"({time.perf_counter() - start:.0f}s)", flush=True,
            )

    def pct(values):
        return mean_and_spread([100 * v for v in values])

    rows = []
    for kind in kinds:
        r = results[kind]
        retention = [v for v in r["retention"] if v == v]
        rows.append([
            LABELS[kind], pct(r["a_mem_1"]), pct(r["a_mem_2"]),
            mean_and_spread(retention) if retention else "n/a",
            f"{pct(r['a_held_1'])} → {pct(r['a_held_2'])}", pct(r["b_mem_2"]),
            f"{statistics.mean(r['loss_1']):.3f} → {statistics.mean(r['loss_2']):.3f}",
        ])
    table = markdown_table(
        ["model", "A recall after phase 1 %", "A recall after phase 2 %", "retention of A",
         "A held-out probes % (1 → 2)", "B recall after phase 2 %", "validation loss (1 → 2)"],
        rows,
    )
    print(table)
    description = (
        f"Phase 1: {args.steps} steps on natural text ('{args.dataset}') with knowledge set A ({args.entities} "
        f"fictional people, {len(set_a.probes())} facts) in {args.knowledge_rows} of {args.batch} rows per batch; "
        f"phase 2: {args.steps} steps with knowledge set B (other people, same sentence patterns) instead. "
        f"All parameters trained in both phases; hidden {args.hidden}, {args.layers} layers, vocabulary "
        f"{vocabulary.size:,}, rows of {args.block_size} tokens; {args.seeds} seeds (mean ± std). Recall = exact "
        f"match of the greedy continuation of the training phrasing cut before the answer; retention = recall "
        f"after phase 2 / after phase 1 (per seed).\n\n{table}"
    )
    finish_benchmark(args, started, machine, "Forgetting (benchmarks/forgetting.py)", description)


if __name__ == "__main__":
    main()
