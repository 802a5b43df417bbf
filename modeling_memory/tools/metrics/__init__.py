"""The project's `evaluate` metric modules, shipped as package data and read with `evaluate.load`
from the package folder (the Hub's metrics cannot be fetched offline).

    from modeling_memory.tools.metrics import load_metric
    perplexity = load_metric("perplexity")          # == evaluate.load(<package>/metrics/perplexity)
"""

import os

METRICS = ("perplexity", "knowledge_recall")


def metric_path(name: str) -> str:
    """Folder of a local metric module (holding `<name>.py`)."""
    if name not in METRICS:
        raise ValueError(f"Unknown metric {name!r}; the package ships {', '.join(METRICS)}.")
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), name)


def load_metric(name: str, **kwargs):
    """`evaluate.load` on the packaged metric module `name`; `kwargs` go to `evaluate.load`
    (e.g. `num_process`, `process_id`, `experiment_id` for distributed evaluation)."""
    import evaluate

    return evaluate.load(metric_path(name), **kwargs)


__all__ = ["METRICS", "load_metric", "metric_path"]
