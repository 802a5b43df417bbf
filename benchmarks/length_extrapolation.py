"""Length extrapolation: trained on 64-token rows, how do the Llama baseline and Memory Mosaics v2 predict at 4x and
8x that length?

    python -m benchmarks.length_extrapolation          # about 3 minutes on a 2-core CPU

Both models are iso_flop's (from_scratch.small_model "baseline" and "mosaic": hidden 64, 2 layers, MLP 192, a
2,048-token vocabulary of the offline natural text), trained from scratch on 64-token rows of natural text only (no
knowledge statements), at equal training FLOPs (counted by FlopCounterMode as in iso_flop; the baseline's steps set
the budget), on the same batches. Memory Mosaics v2: every layer's self-attention replaced by short-term (window 32)
and long-term (delay 8..16 while training, 8 at inference) associative memory, no positional encoding; the
baseline has rotary positions. Both are built with max_position_embeddings = the longest evaluation, which changes
nothing in training (rotary frequencies do not depend on it).

Evaluated on held-out text cut into rows of 4x and 8x the training length: the mean next-token loss of the tokens
at positions [0, 64), [64, 128), [128, 256), [256, 512) of a row (the first bucket is the trained length), over
seeds (mean ± std), and Memory Mosaics minus Llama per bucket. Beside each, the same tokens read in rows cut to
the training length: the loss each model has on them without extrapolating, so that a bucket's harder text is not
taken for an extrapolation penalty.
"""

from __future__ import annotations

import random
import time

import torch
import torch.nn.functional as F

from benchmarks import from_scratch
from benchmarks.harness import benchmark_parser, finish_run, markdown_table, start_run
from benchmarks.iso_flop import training_step_flops
from modeling_memory.data.natural_text import PYTHON_DOCS, load_natural_text

LABELS = {"baseline": "Llama baseline", "mosaic": "Memory Mosaics v2"}


@torch.no_grad()
def token_losses(model, rows: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """Next-token loss of every token of `rows` (N, S): (N, S) float64, NaN at position 0 (never predicted)."""
    model.eval()
    losses = torch.full(rows.shape, float("nan"), dtype=torch.float64)
    for start in range(0, rows.shape[0], batch_size):
        ids = rows[start : start + batch_size]
        logits = model(ids).logits[:, :-1].float()
        nll = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
        losses[start : start + batch_size, 1:] = nll.double()
    return losses


def position_buckets(train_length: int, eval_length: int) -> list[tuple[int, int]]:
    """[0, L), [L, 2L), [2L, 4L), ... up to `eval_length` (L = `train_length`): the trained length, then doublings."""
    buckets, low, high = [], 0, train_length
    while low < eval_length:
        buckets.append((low, min(high, eval_length)))
        low, high = high, 2 * high
    return buckets


def bucket_means(losses: torch.Tensor, buckets) -> list[float]:
    """Mean of the token losses (N, S) at the positions of each bucket, over rows; NaN (unpredicted) left out."""
    return [float(losses[:, low:high].nanmean()) for low, high in buckets]


def main() -> None:
    parser = benchmark_parser(__doc__, default_threads=1)  # one thread is fastest for these tiny models
    parser.add_argument("--dataset", default=PYTHON_DOCS, help="natural text: 'python-docs' (offline) or a Hub dataset name")
    parser.add_argument("--dataset-config", default=None)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--intermediate", type=int, default=192)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--block-size", type=int, default=64, help="training length")
    parser.add_argument("--eval-factors", type=int, nargs="+", default=[4, 8], help="evaluation lengths / training length")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--baseline-steps", type=int, default=600, help="steps of the baseline; sets the FLOP budget")
    parser.add_argument("--lr", type=float, default=3e-3)
    args = parser.parse_args()
    machine, started = start_run(args)

    vocabulary, train_rows, _ = from_scratch.small_text_data(args, knowledge_documents=[])
    validation_text = load_natural_text(args.dataset, config_name=args.dataset_config)["validation"]["text"]
    lengths = [factor * args.block_size for factor in args.eval_factors]
    evaluation_rows = {length: vocabulary.blocks(validation_text, length) for length in lengths}
    print(f"natural text: {train_rows.numel():,} training tokens; held-out rows: "
          + ", ".join(f"{rows.shape[0]} x {length}" for length, rows in evaluation_rows.items()), flush=True)

    context = max(lengths)
    sample = train_rows[: args.batch]
    plans = {}
    for kind in LABELS:
        model = from_scratch.small_model(args, vocabulary.size, kind, context=context)
        plans[kind] = {"params": model.num_parameters(), "flops": training_step_flops(model, sample)}
    budget = plans["baseline"]["flops"] * args.baseline_steps
    for kind in LABELS:
        plans[kind]["steps"] = max(1, round(budget / plans[kind]["flops"]))
        print(f"  {LABELS[kind]:<18} {plans[kind]['params']:>9,} params  {plans[kind]['flops'] / 1e9:6.2f} GFLOP/step  "
              f"{plans[kind]['steps']} steps", flush=True)

    # losses[kind][length]: per seed, the bucket means of that evaluation length; cut[kind][length]: the same of the
    # same tokens read in rows of the training length (each model's loss on them without extrapolating).
    losses = {kind: {length: [] for length in lengths} for kind in LABELS}
    cut = {kind: {length: [] for length in lengths} for kind in LABELS}
    for seed in range(args.seeds):
        for kind in LABELS:
            model = from_scratch.small_model(args, vocabulary.size, kind, seed, context=context)
            rng = random.Random(seed)  # the same batches for both models of a seed

            def next_batch(step):
                return train_rows[[rng.randrange(train_rows.shape[0]) for _ in range(args.batch)]]

            start = time.perf_counter()
            from_scratch.train(model, next_batch, plans[kind]["steps"], args.lr, warmup_steps=20)
            seconds = time.perf_counter() - start
            for length in lengths:
                buckets, held_out = position_buckets(args.block_size, length), evaluation_rows[length]
                losses[kind][length].append(bucket_means(token_losses(model, held_out), buckets))
                cut_rows = token_losses(model, held_out.reshape(-1, args.block_size)).reshape(held_out.shape)
                cut[kind][length].append(bucket_means(cut_rows, buckets))
            print(f"  seed {seed} {LABELS[kind]:<18} " + "  ".join(
                f"{length}: " + " ".join(f"{value:.2f}" for value in losses[kind][length][-1])
                + " (cut: " + " ".join(f"{value:.2f}" for value in cut[kind][length][-1]) + ")" for length in lengths
            ) + f"  ({seconds:.0f}s)", flush=True)

    tables = []
    for length in lengths:
        buckets = position_buckets(args.block_size, length)
        rows = []
        for kind in LABELS:
            for name, results in ((LABELS[kind], losses), (f"{LABELS[kind]}, in {args.block_size}-token rows", cut)):
                per_bucket = zip(*results[kind][length])  # bucket -> values over seeds
                rows.append([name, *(from_scratch.mean_and_spread(values) for values in per_bucket)])
        for name, results in (("Memory Mosaics minus Llama", losses),
                              (f"Memory Mosaics minus Llama, in {args.block_size}-token rows", cut)):
            means = {kind: [sum(values) / len(values) for values in zip(*results[kind][length])] for kind in LABELS}
            rows.append([name, *(f"{mosaic - llama:+.3f}" for mosaic, llama in zip(means["mosaic"], means["baseline"]))])
        table = markdown_table(["model", *(f"positions {low}-{high}" for low, high in buckets)], rows)
        print(f"rows of {length} tokens ({length // args.block_size}x the training length):\n{table}")
        tables.append(f"Rows of {length} tokens ({length // args.block_size}x the training length, "
                      f"{evaluation_rows[length].shape[0]} held-out rows):\n\n{table}")

    plan_table = markdown_table(
        ["model", "parameters", "FLOPs/step", "steps"],
        [[LABELS[kind], f"{plans[kind]['params']:,}", f"{plans[kind]['flops'] / plans['baseline']['flops']:.2f}x",
          plans[kind]["steps"]] for kind in LABELS],
    )
    description = (
        f"Trained at {args.block_size} tokens on natural text '{args.dataset}' (vocabulary {vocabulary.size:,}), equal "
        f"training FLOPs ({budget / 1e12:.2f} TFLOP per model = {args.baseline_steps} baseline steps of batch "
        f"{args.batch}), the same batches; hidden {args.hidden}, {args.layers} layers, MLP {args.intermediate}, "
        f"{args.seeds} seeds (mean ± std). {from_scratch.mosaic_description(args)} The Llama baseline "
        f"has rotary positions; both are built with max_position_embeddings {context}.\n\n{plan_table}\n\n"
        "Mean next-token loss (nats) of the tokens at each range of positions of held-out rows; \"in "
        f"{args.block_size}-token rows\": the same tokens when the rows are cut to the training length (the model's "
        "loss on them without extrapolating; a cut row's first token is left out).\n\n"
        + "\n\n".join(tables)
    )
    finish_run(args, "Length extrapolation (benchmarks/length_extrapolation.py)", description, machine, started)


if __name__ == "__main__":
    main()
