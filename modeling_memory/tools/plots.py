"""Plots: the loss curve and the chapter-usage histogram written by `memory-llama train` (the frontier figure
of the demo and the benchmark is `tools.knowledge_frontier.plot_frontier`).

All are drawn with matplotlib's Agg backend (no display needed) and written atomically: a reader
never finds a half-written PNG.
"""

from modeling_memory.tools.safe_write import atomic_file


def agg_pyplot():
    """matplotlib's pyplot on the Agg backend: draws without a display."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(figure, path: str) -> str:
    """Write `figure` to `path` atomically (a reader never finds a half-written PNG); returns `path`."""
    with atomic_file(path) as staging:
        figure.savefig(staging, dpi=120, bbox_inches="tight")
    return path


def plot_loss_curve(log_history: list[dict], path: str) -> str:
    """Training loss (and evaluation loss, when logged) against the step, from `trainer.state.log_history`."""
    train = [(entry["step"], entry["loss"]) for entry in log_history if "loss" in entry and "step" in entry]
    evaluation = [(entry["step"], entry["eval_loss"]) for entry in log_history if "eval_loss" in entry]
    if not train and not evaluation:
        raise ValueError("The log history holds no losses: train with logging_steps small enough to log at least once.")
    plt = agg_pyplot()
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
        return save_figure(figure, path)
    finally:
        plt.close(figure)


def plot_chapter_usage(usage: dict[int, list[float]], path: str) -> str:
    """How often each routed chapter was picked during training, one panel per chapter layer.

    `usage`: layer index -> routed-chapter counts (`MemoryTrainer.memory_health.chapter_usage()`)."""
    if not usage:
        raise ValueError("No chapter usage was recorded: the model has no chapter layers, or health logging was off.")
    plt = agg_pyplot()
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
        return save_figure(figure, path)
    finally:
        plt.close(figure)


__all__ = ["agg_pyplot", "plot_chapter_usage", "plot_loss_curve", "save_figure"]
