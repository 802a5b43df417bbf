"""Small models trained from scratch at equal training FLOPs: does learnt memory beat a dense Llama?

    python benchmarks/iso_flop.py              # about 10 minutes on a 2-core CPU
    python benchmarks/iso_flop.py --kinds baseline pkm   # the baseline and product-key memory only
    python benchmarks/iso_flop.py --dataset wikitext --dataset-config wikitext-103-raw-v1   # online

Six models, each trained on the same stream (natural text mixed with the built-in knowledge set's
statements) until it has spent the same number of training FLOPs:
  - Llama baseline;
  - + Engram (one layer), + chapter memory (one layer), + both, + product-key memory (one layer);
  - a larger dense Llama (wider MLP) with as many parameters as "+ both".
`--kinds` runs some of them only (the baseline always runs: it sets the budget); such a run writes a
RESULTS.md section of its own.
FLOPs per step are counted by torch's FlopCounterMode on a real training step (forward + backward), so
the memory's router, chapter cross-attention, bank projections, Engram projections and convolution,
and the product-key query, sub-key scores, weighted value sum and gated output are paid for; each model gets `budget // flops_per_step` steps. Reported per model, over seeds (mean ±
std): validation loss on held-out natural text, and knowledge recall on held-out probe phrasings and on
the training phrasings (memorisation).

Scaled down honestly for a shared 2-core CPU: hidden 64, 2 layers, a 2,048-token vocabulary (the SmolLM2 tokenizer's
most frequent ids in the training text plus every id of the knowledge set), 64-token rows, batch 8 (half of
it knowledge statements), 150 baseline steps. The seed papers' claims are about models 1000x larger trained 10^5x longer.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    add_kinds_argument,
    add_small_model_arguments,
    chosen_kinds,
    finish_benchmark,
    markdown_table,
    mean_and_spread,
    mixed_batches,
    parameter_total,
    reduced_probe_recall,
    results_title,
    small_memory_description,
    small_model,
    small_text_data,
    start_benchmark,
    train,
    training_step_flops,
)

import torch  # noqa: E402

from modeling_memory.tools.evaluation import mean_token_nll  # noqa: E402
from modeling_memory.data.knowledge import KnowledgeSet  # noqa: E402

LABELS = {
    "baseline": "Llama baseline", "engram": "+ Engram", "chapters": "+ chapter memory", "both": "+ both",
    "pkm": "+ product-key memory", "dense": "larger dense Llama",
}


def matching_intermediate(args, vocab_size: int, target_params: int) -> int:
    """The MLP width (multiple of 16) whose dense Llama has the parameter count closest to `target_params`."""
    def params(width):
        with torch.device("meta"):
            return parameter_total(small_model(args, vocab_size, "dense", intermediate=width))

    width = args.intermediate
    while params(width + 16) <= target_params:
        width += 16
    return width if target_params - params(width) <= params(width + 16) - target_params else width + 16


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_small_model_arguments(parser, entities=20)
    add_kinds_argument(parser, LABELS)
    parser.add_argument("--baseline-steps", type=int, default=150, help="steps of the baseline; sets the FLOP budget")
    args, started, machine = start_benchmark(parser)

    knowledge = KnowledgeSet.generate(num_entities=args.entities, seed=0)
    documents = knowledge.training_documents()
    vocabulary, train_blocks, validation_blocks = small_text_data(args, documents)
    knowledge_blocks = vocabulary.document_blocks(documents, args.block_size)
    held_out, memorised = knowledge.probes(held_out=True), knowledge.probes(held_out=False)
    print(
        f"natural text: {train_blocks.numel():,} train / {validation_blocks.numel():,} validation tokens; "
        f"knowledge: {len(knowledge)} people, {len(held_out)} facts, {knowledge_blocks.shape[0]} rows", flush=True,
    )

    kinds = chosen_kinds(args, LABELS)
    dense_width = None
    if "dense" in kinds:
        dense_width = matching_intermediate(args, vocabulary.size, parameter_total(small_model(args, vocabulary.size, "both")))
    sample = train_blocks[: args.batch]
    plans = {}
    for kind in kinds:
        model = small_model(args, vocabulary.size, kind, intermediate=dense_width if kind == "dense" else None)
        plans[kind] = {"params": parameter_total(model), "flops": training_step_flops(model, sample)}
    budget = plans["baseline"]["flops"] * args.baseline_steps
    for kind in kinds:
        plans[kind]["steps"] = max(1, round(budget / plans[kind]["flops"]))
        print(f"  {LABELS[kind]:<22} {plans[kind]['params']:>10,} params  {plans[kind]['flops'] / 1e9:6.2f} GFLOP/step  "
              f"{plans[kind]['steps']} steps", flush=True)

    results = {kind: {"loss": [], "held_out": [], "memorised": [], "seconds": []} for kind in kinds}
    for seed in range(args.seeds):
        for kind in kinds:
            model = small_model(args, vocabulary.size, kind, seed, intermediate=dense_width if kind == "dense" else None)
            rng = random.Random(seed)  # the same data order for every model of a seed
            next_batch = mixed_batches(rng, train_blocks, knowledge_blocks, args.batch, args.knowledge_rows)
            start = time.perf_counter()
            train(model, next_batch, plans[kind]["steps"], args.lr, warmup_steps=20)
            results[kind]["seconds"].append(time.perf_counter() - start)
            results[kind]["loss"].append(mean_token_nll(model, validation_blocks))
            results[kind]["held_out"].append(reduced_probe_recall(model, vocabulary, held_out))
            results[kind]["memorised"].append(reduced_probe_recall(model, vocabulary, memorised))
            print(
                f"  seed {seed} {LABELS[kind]:<22} val loss {results[kind]['loss'][-1]:.3f}  recall held-out "
                f"{results[kind]['held_out'][-1]:.1%} training phrasing {results[kind]['memorised'][-1]:.1%}  "
                f"({results[kind]['seconds'][-1]:.0f}s)", flush=True,
            )

    baseline_loss = sum(results["baseline"]["loss"]) / args.seeds
    rows = []
    for kind in kinds:
        r = results[kind]
        mean_loss = sum(r["loss"]) / args.seeds
        rows.append([
            LABELS[kind], f"{plans[kind]['params']:,}", f"{plans[kind]['flops'] / plans['baseline']['flops']:.2f}x",
            plans[kind]["steps"], mean_and_spread(r["loss"]), f"{mean_loss - baseline_loss:+.3f}",
            mean_and_spread([100 * v for v in r["held_out"]]), mean_and_spread([100 * v for v in r["memorised"]]),
        ])
    table = markdown_table(
        ["model", "parameters", "FLOPs/step", "steps", "validation loss", "vs baseline",
         "held-out probe recall %", "training-phrasing recall %"],
        rows,
    )
    print(table)
    description = (
        f"Equal training FLOPs ({budget / 1e12:.2f} TFLOP per model = {args.baseline_steps} baseline steps; FLOPs "
        f"counted on a real training step, memory included). Hidden {args.hidden}, {args.layers} layers, vocabulary "
        f"{vocabulary.size:,}, batch {args.batch} x {args.block_size} tokens ({args.knowledge_rows} rows of each batch "
        f"from the knowledge set: {len(knowledge)} fictional people, {len(held_out)} facts), natural text "
        f"'{args.dataset}', {args.seeds} seeds (mean ± std). {small_memory_description(args, kinds)}"
        + (f" The larger dense Llama widens the MLP to {dense_width} to match '+ both' in parameters." if dense_width else "")
        + f"\n\n{table}\n\nRecall is exact match of the greedy continuation; held-out probes ask for each "
        f"fact in a phrasing never trained on."
    )
    title = results_title("Iso-FLOP comparison from scratch (benchmarks/iso_flop.py)", kinds, LABELS)
    finish_benchmark(args, started, machine, title, description)


if __name__ == "__main__":
    main()
