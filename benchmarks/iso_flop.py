"""Small models trained from scratch at equal training FLOPs: does learnt memory beat a dense Llama?

    python -m benchmarks.iso_flop              # about 10 minutes on a 2-core CPU
    python -m benchmarks.iso_flop --kinds baseline pkm   # the baseline and product-key memory only
    python -m benchmarks.iso_flop --kinds baseline mosaic   # the baseline and Memory Mosaics v2: under a minute
    HF_HUB_OFFLINE=0 python -m benchmarks.iso_flop --dataset wikitext --dataset-config wikitext-103-raw-v1   # online

Seven models, each trained on the same stream (natural text mixed with the built-in knowledge set's
statements) until it has spent the same number of training FLOPs:
  - Llama baseline;
  - + Engram (one layer), + chapter memory (one layer), + both, + product-key memory (one layer);
  - Memory Mosaics v2: the same model with every layer's self-attention replaced by short- and long-term
    associative memory (no positional encoding; windows and delays fit the 64-token rows: short-term window 32,
    long-term delay 8..16, see from_scratch.SMALL_MOSAIC_FIELDS);
  - a larger dense Llama (wider MLP) with as many parameters as "+ both".
`--kinds` runs some of them only (the baseline always runs: it sets the budget); such a run writes a
RESULTS.md section of its own.
FLOPs per step are counted by torch's FlopCounterMode on a real training step (forward + backward), so
the memory's router, chapter cross-attention, bank projections, Engram projections and convolution,
the product-key query, sub-key scores, weighted value sum and gated output, and the associative memory's
projections are paid for (on a CPU, not the products inside torch's fused attention kernel, for any model: see
`training_step_flops`); each model gets `budget // flops_per_step` steps. Reported per model, over seeds (mean ±
std): validation loss on held-out natural text, and knowledge recall on held-out probe phrasings and on
the training phrasings (memorisation).

Scaled down honestly for a shared 2-core CPU: hidden 64, 2 layers, a 2,048-token vocabulary (the SmolLM2 tokenizer's
most frequent ids in the training text plus every id of the knowledge set), 64-token rows, batch 8 (half of
it knowledge statements), 150 baseline steps. The seed papers' claims are about models 1000x larger trained 10^5x longer.
"""

from __future__ import annotations

import random
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks import from_scratch
from benchmarks.harness import benchmark_parser, finish_run, markdown_table, start_run
from modeling_memory.data.knowledge import KnowledgeSet
from modeling_memory.tools.evaluation import mean_token_nll

LABELS = {
    "baseline": "Llama baseline", "engram": "+ Engram", "chapters": "+ chapter memory", "both": "+ both",
    "pkm": "+ product-key memory", "mosaic": "Memory Mosaics v2", "dense": "larger dense Llama",
}


def training_step_flops(model, input_ids: torch.Tensor) -> int:
    """FLOPs of one training step (forward + backward) on `input_ids`, counted by torch's FlopCounterMode.

    It counts every matrix product and convolution that actually runs (and the fused attention kernels of a GPU), so the
    memory's router, chapter cross-attention (over the chapters actually gathered), bank projections,
    Engram key/value projections and convolution are all included; elementwise work (norms, softmax,
    gates, the optimizer) and table gathers count zero, as is usual. On a CPU, torch's fused attention kernel
    (`_scaled_dot_product_flash_attention_for_cpu`) is not among the ops FlopCounterMode counts, so the score and
    weighted-value products of every attention-like read (Llama's self-attention, the associative memory's reads)
    count zero for every model alike: about 6% of a step of the baseline or the Memory Mosaics model at 64-token
    rows (measured with the math kernel, whose products are counted).
    """
    model.train()
    with FlopCounterMode(display=False) as counter:
        from_scratch.training_loss(model, input_ids).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def matching_intermediate(args, vocab_size: int, target_params: int) -> int:
    """The MLP width (multiple of 16) whose dense Llama has the parameter count closest to `target_params`."""
    def params(width):
        with torch.device("meta"):
            return from_scratch.small_model(args, vocab_size, "dense", intermediate=width).num_parameters()

    width = args.intermediate
    while params(width + 16) <= target_params:
        width += 16
    return width if target_params - params(width) <= params(width + 16) - target_params else width + 16


def main() -> None:
    parser = benchmark_parser(__doc__, default_threads=1)  # one thread is fastest for these tiny models
    from_scratch.add_small_model_arguments(parser, entities=20)
    from_scratch.add_kinds_argument(parser, LABELS)
    parser.add_argument("--baseline-steps", type=int, default=150, help="steps of the baseline; sets the FLOP budget")
    args = parser.parse_args()
    machine, started = start_run(args)

    knowledge = KnowledgeSet.generate(num_entities=args.entities, seed=0)
    documents = knowledge.training_documents()
    vocabulary, train_blocks, validation_blocks = from_scratch.small_text_data(args, documents)
    knowledge_blocks = vocabulary.document_blocks(documents, args.block_size)
    held_out, memorised = knowledge.probes(held_out=True), knowledge.probes(held_out=False)
    print(
        f"natural text: {train_blocks.numel():,} train / {validation_blocks.numel():,} validation tokens; "
        f"knowledge: {len(knowledge)} people, {len(held_out)} facts, {knowledge_blocks.shape[0]} rows", flush=True,
    )

    kinds = from_scratch.chosen_kinds(args, LABELS)
    dense_width = None
    if "dense" in kinds:
        both_params = from_scratch.small_model(args, vocabulary.size, "both").num_parameters()
        dense_width = matching_intermediate(args, vocabulary.size, both_params)
    sample = train_blocks[: args.batch]
    plans = {}
    for kind in kinds:
        model = from_scratch.small_model(args, vocabulary.size, kind, intermediate=dense_width if kind == "dense" else None)
        plans[kind] = {"params": model.num_parameters(), "flops": training_step_flops(model, sample)}
    budget = plans["baseline"]["flops"] * args.baseline_steps
    for kind in kinds:
        plans[kind]["steps"] = max(1, round(budget / plans[kind]["flops"]))
        print(f"  {LABELS[kind]:<22} {plans[kind]['params']:>10,} params  {plans[kind]['flops'] / 1e9:6.2f} GFLOP/step  "
              f"{plans[kind]['steps']} steps", flush=True)

    results = {kind: {"loss": [], "held_out": [], "memorised": [], "seconds": []} for kind in kinds}
    for seed in range(args.seeds):
        for kind in kinds:
            model = from_scratch.small_model(args, vocabulary.size, kind, seed, intermediate=dense_width if kind == "dense" else None)
            rng = random.Random(seed)  # the same data order for every model of a seed
            next_batch = from_scratch.mixed_batches(rng, train_blocks, knowledge_blocks, args.batch, args.knowledge_rows)
            start = time.perf_counter()
            from_scratch.train(model, next_batch, plans[kind]["steps"], args.lr, warmup_steps=20)
            results[kind]["seconds"].append(time.perf_counter() - start)
            results[kind]["loss"].append(mean_token_nll(model, validation_blocks))
            results[kind]["held_out"].append(from_scratch.reduced_probe_recall(model, vocabulary, held_out))
            results[kind]["memorised"].append(from_scratch.reduced_probe_recall(model, vocabulary, memorised))
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
            plans[kind]["steps"], from_scratch.mean_and_spread(r["loss"]), f"{mean_loss - baseline_loss:+.3f}",
            from_scratch.mean_and_spread([100 * v for v in r["held_out"]]),
            from_scratch.mean_and_spread([100 * v for v in r["memorised"]]),
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
        f"'{args.dataset}', {args.seeds} seeds (mean ± std). {from_scratch.small_memory_description(args, kinds)}"
        + (f" The larger dense Llama widens the MLP to {dense_width} to match '+ both' in parameters." if dense_width else "")
        + f"\n\n{table}\n\nRecall is exact match of the greedy continuation; held-out probes ask for each "
        f"fact in a phrasing never trained on."
    )
    title = from_scratch.results_title("Iso-FLOP comparison from scratch (benchmarks/iso_flop.py)", kinds, LABELS)
    finish_run(args, title, description, machine, started)


if __name__ == "__main__":
    main()
