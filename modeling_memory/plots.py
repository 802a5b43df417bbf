"""Training plots written by `memory-llama train`: the loss curve and the chapter-usage histogram.

Both are drawn with matplotlib's Agg backend (no display needed) and written atomically: a reader
never finds a half-written PNG.
"""

import os
import tempfile


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save_atomically(figure, path: str) -> str:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    handle, staging = tempfile.mkstemp(prefix=".plot-", suffix=".png", dir=directory)
    os.close(handle)
    try:
        figure.savefig(staging, dpi=120, bbox_inches="tight")
        os.replace(staging, path)
    finally:
        if os.path.exists(staging):
            os.remove(staging)
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


__all__ = ["plot_chapter_usage", "plot_loss_curve"]
