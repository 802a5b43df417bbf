"""The learning–forgetting frontier on SmolLM2-135M: which way of fine-tuning gives the most new knowledge for a
given loss of old knowledge (after the sparse memory fine-tuning paper's frontier).

    python -m benchmarks.knowledge_frontier                       # the full grid: 4 methods x 3 learning rates x
                                                                  # with and without replay (about 2 hours on 2 cores)
    python -m benchmarks.knowledge_frontier --methods sparse_memory lora --no-replay-runs

Every run (`modeling_memory.tools.knowledge_frontier.train_and_trace`) trains on the knowledge set's facts, each
statement and question-answer pair a document of its own, and is scored every `--every` steps until recall in the
training phrasing stops rising (`--patience` evaluations) or `--max-steps`: recall in the training phrasing, in
held-out phrasings (questions worded unlike any trained one) and in the training phrasing after unrelated text;
general knowledge kept (the package's probe, and at the end lm-evaluation-harness on the same facts as 4-way
multiple choice); natural-text perplexity. The figure plots recall against knowledge kept, one curve per method;
the table gives each run's best point at >= 95 % kept and its last point. Every run's points are also written, as
each run ends, to outputs/knowledge_frontier/runs.json.
"""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.harness import benchmark_parser, finish_run, markdown_table, start_run
from modeling_memory.tools.knowledge_frontier import (
    LEARNING_RATES,
    METHOD_LABELS,
    METHODS,
    MIN_KEPT,
    best_point,
    compare_at_best_recall,
    method_points,
    percent,
    plot_frontier,
    prepare_data,
    train_and_trace,
)

FIGURE = Path(__file__).resolve().parent / "figures" / "knowledge_frontier.png"
RUNS_FILE = Path("outputs") / "knowledge_frontier" / "runs.json"  # every run's points, written as each run ends


def run_rows(runs: list[dict]) -> list[list]:
    rows = []
    for run in runs:
        best, last = best_point(run), run["points"][-1]
        rows.append([
            METHOD_LABELS[run["method"]], f"{run['learning_rate']:g}", "yes" if run["replay"] else "no",
            last["step"],
            percent(best and best["training phrasing"]), percent(best and best["held-out phrasing"]),
            percent(best and best["after unrelated text"]), best["step"] if best else "-",
            percent(last["training phrasing"]), percent(last["held-out phrasing"]),
            percent(last["general knowledge kept"]), f"{last['perplexity']:.2f}", percent(run.get("harness_acc")),
        ])
    return rows


HEADER = [
    "method", "lr", "replay", "steps", f"recall at >= {MIN_KEPT:.0%} kept: training phrasing", "held-out",
    "after unrelated text", "at step", "last: recall, training phrasing", "held-out", "general knowledge kept",
    "perplexity", "lm-eval acc (general knowledge, 4-way)",
]


def frontier_summary(runs: list[dict]) -> list[str]:
    """One line per (method, replay): its best recall at >= MIN_KEPT kept over all learning rates."""
    lines = []
    for replay in (False, True):
        for method in METHODS:
            candidates = [(best_point(run), run) for run in runs if run["method"] == method and run["replay"] == replay]
            candidates = [(point, run) for point, run in candidates if point is not None]
            if not candidates:
                if any(run["method"] == method and run["replay"] == replay for run in runs):
                    lines.append(f"- {METHOD_LABELS[method]}, {'replay' if replay else 'facts alone'}: no point keeps {MIN_KEPT:.0%}")
                continue
            point, run = max(candidates, key=lambda pair: (pair[0]["training phrasing"], pair[0]["held-out phrasing"]))
            lines.append(
                f"- {METHOD_LABELS[method]}, {'replay' if replay else 'facts alone'}: {point['training phrasing']:.0%} "
                f"(training phrasing), {point['held-out phrasing']:.0%} (held-out) at {point['general knowledge kept']:.0%} "
                f"kept (lr {run['learning_rate']:g}, step {point['step']})"
            )
        lines += _comparisons(runs, replay)
    return lines


def _comparisons(runs: list[dict], replay: bool) -> list[str]:
    """Sparse memory fine-tuning against LoRA and full fine-tuning at the most recall each reaches (any learning
    rate, any step): the general knowledge each keeps there."""
    ours, lines = method_points(runs, "sparse_memory", replay), []
    for other in ("lora", "full"):
        theirs = method_points(runs, other, replay)
        if not ours or not theirs:
            continue
        comparison = compare_at_best_recall(ours, theirs)
        kept = "never recalls as much" if comparison["kept"] is None else f"keeps {comparison['kept']:.0%}"
        lines.append(f"- at the most {METHOD_LABELS[other]} recalls ({comparison['recall']:.0%}, keeping "
                     f"{comparison['other_kept']:.0%}), {METHOD_LABELS['sparse_memory']} {kept}")
    return lines


def save_runs(runs: list[dict], path: Path) -> None:
    """Every run so far, as JSON (written whole, atomically): the figures and tables can be redrawn from it."""
    from modeling_memory.tools.safe_write import atomic_file

    with atomic_file(path) as staging:
        staging.write_text(json.dumps(runs, indent=1))


def main(argv=None) -> None:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--learning-rates", nargs="+", type=float, default=None,
                        help="the same learning rates for every method (default: three per method, LEARNING_RATES)")
    parser.add_argument("--entities", type=int, default=16, help="fictional people (6 facts each)")
    parser.add_argument("--questions-per-fact", type=int, default=2, help="training question-answer pairs per fact (0-2)")
    parser.add_argument("--max-steps", type=int, default=120)
    parser.add_argument("--every", type=int, default=20, help="steps between evaluations")
    parser.add_argument("--patience", type=int, default=2, help="evaluations without a rise in recall before stopping")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--no-replay-runs", action="store_true", help="only the runs on the facts alone")
    parser.add_argument("--no-harness", action="store_true", help="skip lm-evaluation-harness at the end of each run")
    args = parser.parse_args(argv)
    machine, started = start_run(args)

    data = prepare_data(entities=args.entities, questions_per_fact=args.questions_per_fact)
    print(f"{len(data.knowledge)} fictional people, {len(data.probes['training phrasing'])} facts, {len(data.fact_rows)} rows "
          f"of facts; the base answers {len(data.known_general)} general-knowledge probes correctly", flush=True)
    if not args.no_harness:
        from modeling_memory.tools.harness import evaluate_with_harness

        base_acc = next(iter(evaluate_with_harness(data.base, data.tokenizer).values()))["acc"]
        print(f"base lm-eval acc {base_acc:.3f}", flush=True)
    runs = []
    for replay in (False,) if args.no_replay_runs else (False, True):
        for method in args.methods:
            for learning_rate in args.learning_rates or LEARNING_RATES[method]:
                run = train_and_trace(data, method, learning_rate, replay, max_steps=args.max_steps, every=args.every,
                                      patience=args.patience, batch_size=args.batch_size)
                model = run.pop("model")
                if not args.no_harness:
                    acc = next(iter(evaluate_with_harness(model, data.tokenizer).values()))["acc"]
                    run["harness_acc"] = acc / base_acc  # share of the base's accuracy
                    print(f"      lm-eval acc {acc:.3f} ({run['harness_acc']:.0%} of the base's)", flush=True)
                del model
                runs.append(run)
                save_runs(runs, RUNS_FILE)

    base = runs[0]["points"][0]
    figure_path = RUNS_FILE.parent / FIGURE.name if args.no_write else FIGURE  # --no-write leaves the repository alone
    figure = plot_frontier(runs, str(figure_path), f"SmolLM2-135M, {len(data.probes['training phrasing'])} new facts")
    table = markdown_table(HEADER, run_rows(runs))
    summary = "\n".join(frontier_summary(runs))
    print(table, summary, sep="\n\n")
    body = (
        f"{len(data.knowledge)} fictional people ({len(data.probes['training phrasing'])} facts), each fact stated "
        f"3 ways and asked {args.questions_per_fact} ways, every phrasing a document of its own ({len(data.fact_rows)} "
        f"rows of 64 tokens, documents kept apart); replay: as many natural-text rows mixed in. Batch "
        f"{args.batch_size}, evaluated every {args.every} steps, stopped when recall in the training phrasing had not "
        f"risen for {args.patience} evaluations or at {args.max_steps} steps. The base: recall "
        f"{base['training phrasing']:.0%} / {base['held-out phrasing']:.0%} (training / held-out phrasing), perplexity "
        f"{base['perplexity']:.2f}; it answers {len(data.known_general)} of 40 general-knowledge probes. lm-eval acc "
        "is the trained model's accuracy on the same 40 facts as 4-way multiple choice (lm-evaluation-harness), as a "
        "share of the base's.\n\n"
        f"Best recall at >= {MIN_KEPT:.0%} of general knowledge kept, over the learning rates:\n\n{summary}\n\n"
        f"{table}\n\n![knowledge frontier](figures/{Path(figure).name})"
    )
    finish_run(args, "Learning–forgetting frontier (benchmarks/knowledge_frontier.py)", body, machine, started)


if __name__ == "__main__":
    main()
