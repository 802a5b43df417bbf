"""Plots: the loss curve and the chapter-usage histogram written by `memory-llama train`, and the
results figure of `memory-llama demo`.

Both are drawn with matplotlib's Agg backend (no display needed) and written atomically: a reader
never finds a half-written PNG.
"""

from modeling_memory.tools.safe_write import atomic_file


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save_atomically(figure, path: str) -> str:
    with atomic_file(path) as staging:
        figure.savefig(staging, dpi=120, bbox_inches="tight")
    return path


def plot_loss_curve(log_history: list[dict], path: str) -> str:
    """Training loss (and evaluation loss, when logged) against the step, from `trainer.state.log_history`."""
    train = [(entry["step"], entry["loss"]) for entry in log_history if "loss" in entry and "step" in entry]
    evaluation = [(entry["step"], entry["eval_loss"]) for entry in log_history if "eval_loss" in entry]
    if not train and not evaluation:
        raise ValueError("The log history holds no losses: train with logging_steps small enough to log at least once.")
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(6, 4))
    if train:
        axis.plot(*zip(*train), marker="." if len(train) < 50 else None, label="training loss")
    if evaluation:
        axis.plot(*zip(*evaluation), marker="o", label="evaluation loss")
    axis.set_xlabel("optimizer step")
    axis.set_ylabel("loss (nats per token)")
    axis.set_title("Loss")
    axis.grid(alpha=0.3)
    axis.legend()
    try:
        return _save_atomically(figure, path)
    finally:
        plt.close(figure)


def plot_chapter_usage(usage: dict[int, list[float]], path: str) -> str:
    """How often each routed chapter was picked during training, one panel per chapter layer.

    `usage`: layer index -> routed-chapter counts (`MemoryTrainer.memory_health.chapter_usage()`)."""
    if not usage:
        raise ValueError("No chapter usage was recorded: the model has no chapter layers, or health logging was off.")
    plt = _pyplot()
    figure, axes = plt.subplots(len(usage), 1, figsize=(7, 2.5 * len(usage)), squeeze=False)
    for axis, (layer, counts) in zip(axes[:, 0], sorted(usage.items())):
        total = sum(counts) or 1
        axis.bar(range(len(counts)), [c / total for c in counts], width=0.9)
        axis.axhline(1 / len(counts), color="gray", linestyle="--", linewidth=1, label="uniform")
        axis.set_title(f"layer {layer}: share of routed picks per chapter")
        axis.set_xlabel("routed chapter")
        axis.set_ylabel("share")
        axis.legend()
    figure.tight_layout()
    try:
        return _save_atomically(figure, path)
    finally:
        plt.close(figure)


def _label_bars(axis, bars, labels: list[str], values: list[float]) -> None:
    """Each bar's value above it; a bar of height 0 also gets a short line on the axis, so that it
    reads as "measured: 0" rather than as a missing bar."""
    axis.bar_label(bars, labels=labels, padding=2, fontsize=8)
    for bar, value in zip(bars, values):
        if value == 0:
            axis.hlines(0, bar.get_x(), bar.get_x() + bar.get_width(), colors=bar.get_facecolor(), linewidth=3,
                        clip_on=False, zorder=3)


def _target_bars(axis, values: list[float], labels: list[str], color: str, target: float, target_label: str,
                 limits: tuple[float, float], legend_location: str) -> None:
    """One bar per model, labelled, with a dashed line at the target."""
    bars = axis.bar(range(len(values)), values, 0.6, color=color)
    _label_bars(axis, bars, labels, values)
    axis.axhline(target, color="tab:red", linestyle="--", linewidth=1, label=target_label)
    axis.set_ylim(*limits)
    axis.legend(loc=legend_location)


def plot_demo_results(results: dict[str, dict], losses: dict[str, list[float]], path: str, logging_steps: int) -> str:
    """The demo's figure: knowledge recall, perplexity change, general knowledge kept (all in %, as in the
    printed table) and the training losses.

    `results`: model name -> {"recall_held_out", "recall_training_phrasing", "general_knowledge_kept"
    (fractions 0-1), "perplexity_change" (fraction, relative to the base)}; `losses`: run name -> training
    loss logged every `logging_steps` steps."""
    plt = _pyplot()
    from matplotlib.ticker import PercentFormatter

    figure, (recall_axis, perplexity_axis, kept_axis, loss_axis) = plt.subplots(1, 4, figsize=(22, 5))
    names = list(results)
    positions = range(len(names))

    highest_recall = 0.0
    for offset, key, label in ((-0.2, "recall_training_phrasing", "training phrasing"), (0.2, "recall_held_out", "held-out phrasing")):
        percents = [100 * results[name][key] for name in names]
        highest_recall = max(highest_recall, *percents)
        bars = recall_axis.bar([p + offset for p in positions], percents, 0.4, label=label)
        _label_bars(recall_axis, bars, [f"{value:.1f}%" for value in percents], percents)
    recall_axis.set_ylim(0, max(10.0, 1.2 * highest_recall))  # headroom for the labels; 0 % stays visible
    recall_axis.set_ylabel("recall (% of the new facts, exact match)")
    recall_axis.set_title("new facts learnt (higher is better)")
    recall_axis.legend(loc="upper right")

    changes = [100 * results[name]["perplexity_change"] for name in names]
    _target_bars(perplexity_axis, changes, [f"{value:+.1f}%" for value in changes], "tab:gray", 2.0, "+2 % (target for memory)",
                 (min(0.0, 1.2 * min(changes + [0.0])), 1.2 * max(changes + [2.0]) + 1.0), "upper left")
    perplexity_axis.set_ylabel("perplexity change vs the base (%)")
    perplexity_axis.set_title("held-out natural-text perplexity (lower is better)")

    kept = [100 * results[name]["general_knowledge_kept"] for name in names]
    _target_bars(kept_axis, kept, [f"{value:.0f}%" for value in kept], "tab:green", 95.0, "95 % (target for memory)",
                 (0, 115), "lower left")
    kept_axis.set_ylabel("base's correct answers kept (%)")
    kept_axis.set_title("general knowledge kept (higher is better)")

    for axis in (recall_axis, perplexity_axis, kept_axis):
        axis.yaxis.set_major_formatter(PercentFormatter(xmax=100, decimals=0))
        axis.set_xticks(list(positions), names, rotation=20, ha="right")
        axis.grid(axis="y", alpha=0.3)
        axis.set_axisbelow(True)

    for name, curve in losses.items():
        loss_axis.plot([logging_steps * (i + 1) for i in range(len(curve))], curve, marker=".", label=name)
    loss_axis.set_xlabel("optimizer step")
    loss_axis.set_ylabel("loss (nats per token)")
    loss_axis.set_title("training loss (facts + natural-text replay)")
    loss_axis.grid(alpha=0.3)
    loss_axis.legend()
    figure.tight_layout()
    try:
        return _save_atomically(figure, path)
    finally:
        plt.close(figure)


__all__ = ["plot_chapter_usage", "plot_demo_results", "plot_loss_curve"]
