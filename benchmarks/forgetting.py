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
    ReducedVocabulary,
    command_line,
    machine_description,
    markdown_table,
    mean_and_spread,
    reduced_probe_recall,
    small_llama_fields,
    train,
    validation_loss,
    write_section,
)

import torch  # noqa: E402

from modeling_memory import MemoryLlamaConfig, MemoryLlamaForCausalLM  # noqa: E402
from modeling_memory.knowledge import KnowledgeSet  # noqa: E402
from modeling_memory.natural_text import PYTHON_DOCS, load_natural_text  # noqa: E402
from modeling_memory.offline_checkpoints import load_smollm2  # noqa: E402

LABELS = {"baseline": "Llama baseline", "chapters": "+ chapter memory", "both": "+ Engram + chapter memory"}


def build_model(args, vocab_size: int, kind: str, seed: int):
    torch.manual_seed(seed)
    fields = small_llama_fields(vocab_size, args.hidden, args.layers, args.intermediate, 4, args.block_size)
    if kind in ("engram", "both"):
        fields.update(engram_layers=[0], engram_heads_per_order=4, engram_table_size=2053, engram_dim=64)
    if kind in ("chapters", "both"):
        fields.update(
            chapter_layers=[args.layers - 1], chapter_num_chapters=args.chapters, chapter_size=16,
            chapter_top_k=2, chapter_num_shared=1, chapter_num_heads=4,
        )
    return MemoryLlamaForCausalLM(MemoryLlamaConfig(**fields))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default=PYTHON_DOCS, help="natural text: 'python-docs' (offline) or a Hub dataset name")
    parser.add_argument("--dataset-config", default=None)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=120, help="steps of each phase")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--intermediate", type=int, default=192)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--knowledge-rows", type=int, default=4, help="rows of each batch from the phase's knowledge set")
    parser.add_argument("--entities", type=int, default=10)
    parser.add_argument("--chapters", type=int, default=32, help="x 16 tokens per chapter")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads: one is fastest for these tiny models, above all on a busy machine")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    machine = machine_description()
    print(f"machine: {machine}", flush=True)

    _, tokenizer = load_smollm2()
    text = load_natural_text(args.dataset, config_name=args.dataset_config)
    set_a = KnowledgeSet.generate(num_entities=args.entities, seed=0)
    set_b = KnowledgeSet.generate(num_entities=args.entities, seed=1)
    vocabulary = ReducedVocabulary(
        tokenizer, text["train"]["text"], args.vocab, always_keep=set_a.training_documents() + set_b.training_documents()
    )
    train_blocks = vocabulary.blocks(text["train"]["text"], args.block_size)
    validation_blocks = vocabulary.blocks(text["validation"]["text"], args.block_size, max_blocks=128)
    rows_a = vocabulary.document_blocks(set_a.training_documents(), args.block_size)
    rows_b = vocabulary.document_blocks(set_b.training_documents(), args.block_size)

    def mixed_batches(rng, knowledge_rows):
        def next_batch(step):
            text_rows = [rng.randrange(train_blocks.shape[0]) for _ in range(args.batch - args.knowledge_rows)]
            fact_rows = [rng.randrange(knowledge_rows.shape[0]) for _ in range(args.knowledge_rows)]
            return torch.cat([train_blocks[text_rows], knowledge_rows[fact_rows]])

        return next_batch

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
            model = build_model(args, vocabulary.size, kind, seed)
            rng = random.Random(seed)
            start = time.perf_counter()
            train(model, mixed_batches(rng, rows_a), args.steps, args.lr, warmup_steps=20)
            r = results[kind]
            a_mem, a_held = recall(model, set_a)
            r["a_mem_1"].append(a_mem), r["a_held_1"].append(a_held), r["loss_1"].append(validation_loss(model, validation_blocks))
            train(model, mixed_batches(rng, rows_b), args.steps, args.lr, warmup_steps=20)
            a_mem2, a_held2 = recall(model, set_a)
            r["a_mem_2"].append(a_mem2), r["a_held_2"].append(a_held2)
            r["b_mem_2"].append(recall(model, set_b)[0])
            r["loss_2"].append(validation_loss(model, validation_blocks))
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
    elapsed = time.perf_counter() - started
    body = (
        f"Command: `{command_line()}` ({elapsed / 60:.1f} min)\n\nMachine: {machine}.\n\n"
        f"Phase 1: {args.steps} steps on natural text ('{args.dataset}') with knowledge set A ({args.entities} "
        f"fictional people, {len(set_a.probes())} facts) in {args.knowledge_rows} of {args.batch} rows per batch; "
        f"phase 2: {args.steps} steps with knowledge set B (other people, same sentence patterns) instead. "
        f"All parameters trained in both phases; hidden {args.hidden}, {args.layers} layers, vocabulary "
        f"{vocabulary.size:,}, rows of {args.block_size} tokens; {args.seeds} seeds (mean ± std). Recall = exact "
        f"match of the greedy continuation of the training phrasing cut before the answer; retention = recall "
        f"after phase 2 / after phase 1 (per seed).\n\n{table}"
    )
    print(f"done in {elapsed / 60:.1f} min", flush=True)
    if not args.no_write:
        write_section("Forgetting (benchmarks/forgetting.py)", body)


if __name__ == "__main__":
    main()
