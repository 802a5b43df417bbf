"""The learning–forgetting frontier: how much new knowledge each way of fine-tuning gives for what it costs of old.

One run trains SmolLM2-135M-Instruct on the built-in knowledge set (fictional people) one way, at one learning rate,
with or without natural-text replay, and scores it every few steps (a `TrainerCallback`): recall of the new facts in
the training phrasing, in held-out phrasings, and in the training phrasing after unrelated text; the share of the
general-knowledge probes the base answers correctly that the model still answers; natural-text perplexity. It
stops when recall in the training phrasing has not risen for `patience` evaluations, or at `max_steps`.

Ways (`METHODS`):
- `sparse_memory`: a grafted product-key memory; only the value rows the facts read much more often than background
  text does (TF-IDF, `training.sparse_memory_finetuning`) train, everything else frozen;
- `memory_only`: grafted Engram and chapter memory, the backbone frozen;
- `lora`: LoRA on the base model's attention and MLP projections;
- `full`: every weight of the base model.

The facts are trained as documents of their own (each statement and each question-answer pair), packed with
documents kept apart (`tokenize_and_pack(..., separate_documents=True)`): a fact is learnt in the context a probe
gives it. `benchmarks/knowledge_frontier.py` runs the grid and `memory-llama demo` a reduced one.
"""

from __future__ import annotations

import copy
import os
import tempfile
import time
from dataclasses import dataclass, field

import torch

METHODS = ("sparse_memory", "memory_only", "lora", "full")
METHOD_LABELS = {
    "sparse_memory": "sparse memory FT (product keys)",
    "memory_only": "memory-only (Engram + chapters)",
    "lora": "LoRA r=16",
    "full": "full fine-tuning",
}
# Three learning rates per method, around the one each is usually run at. The product-key values train at
# x pkm_values_lr_multiplier (10), Engram tables at x 5 and the chapter bank at x 2 of these.
LEARNING_RATES = {
    "sparse_memory": (0.1, 0.3, 1.0),
    "memory_only": (1e-3, 3e-3, 1e-2),
    "lora": (3e-4, 1e-3, 3e-3),
    "full": (1e-5, 3e-5, 1e-4),
}
SPARSE_MEMORY_TOP_T = 16000
BACKGROUND_ROWS = 64
LORA_RANK = 16
MIN_KEPT = 0.95  # the frontier's question: the most recall at no more than 5 % of general knowledge lost
CONTEXT_CHARACTERS = 300  # unrelated text before a probe, for recall "inside unrelated text"


@dataclass
class FrontierData:
    """What every run of a frontier shares: the base model, the facts, the rows, the probes."""

    base: torch.nn.Module
    tokenizer: object
    knowledge: object
    fact_rows: object  # packed rows of the facts, documents kept apart
    replay_rows: object  # natural-text rows, as many as fact rows
    background_rows: object  # natural-text rows the slot ranking counts as background
    perplexity_rows: object  # held-out natural text
    known_general: list  # general-knowledge probes the base answers correctly
    probes: dict = field(default_factory=dict)  # name -> probes
    # The base's scores: every run's first point. Every way starts out computing exactly what the base computes (a
    # graft's memory adds zero until trained, which the demo checks on these presets; LoRA's B matrices start at
    # zero), so it is scored once.
    before_training: dict = field(default_factory=dict)


def prepare_data(entities: int = 16, seed: int = 0, block_size: int = 64, questions_per_fact: int = 2,
                 perplexity_rows: int = 16) -> FrontierData:
    """Load SmolLM2 (offline) and build the rows and probes of a frontier."""
    from modeling_memory.data.knowledge import KnowledgeSet, general_knowledge_probes
    from modeling_memory.data.natural_text import load_natural_text
    from modeling_memory.data.packing import tokenize_and_pack
    from modeling_memory.tools.evaluation import evaluate_knowledge_recall
    from modeling_memory.tools.offline_checkpoints import load_smollm2

    import datasets

    base, tokenizer = load_smollm2()
    natural_text = load_natural_text()
    knowledge = KnowledgeSet.generate(entities, seed=seed, questions_per_fact=questions_per_fact)
    facts = datasets.Dataset.from_dict({"text": knowledge.fact_documents()})
    fact_rows = tokenize_and_pack(facts, tokenizer, block_size, separate_documents=True)
    natural = tokenize_and_pack(natural_text["train"], tokenizer, block_size, separate_documents=True)
    replay_rows = natural.select(range(len(fact_rows)))
    background_rows = natural.select(range(len(fact_rows), len(fact_rows) + BACKGROUND_ROWS))
    held_out_text = tokenize_and_pack(natural_text["validation"], tokenizer, 128)
    general = general_knowledge_probes()
    answered = evaluate_knowledge_recall(base, tokenizer, general, batch_size=48)["continuations"]
    known_general = [probe for probe, text in zip(general, answered) if probe.is_recalled(text)]
    training_phrasing = knowledge.probes(held_out=False)
    passages = _unrelated_passages(natural_text["validation"]["text"], len(training_phrasing))
    probes = {
        "training phrasing": training_phrasing,
        "held-out phrasing": knowledge.probes(held_out=True),
        "after unrelated text": [
            type(probe)(prompt=f"{passage}\n\n{probe.prompt}", answer=probe.answer, entity=probe.entity, attribute=probe.attribute)
            for probe, passage in zip(training_phrasing, passages)
        ],
    }
    data = FrontierData(base, tokenizer, knowledge, fact_rows, replay_rows, background_rows,
                        held_out_text.select(range(min(perplexity_rows, len(held_out_text)))), known_general, probes)
    data.before_training = evaluate_point(base, data)
    return data


def _unrelated_passages(texts: list[str], count: int) -> list[str]:
    """`count` passages of about CONTEXT_CHARACTERS characters of natural text, each cut at a sentence end."""
    passages = []
    for text in texts:
        text = " ".join(text.split())
        if len(text) < CONTEXT_CHARACTERS:
            continue
        cut = text.rfind(". ", 0, CONTEXT_CHARACTERS)
        passages.append(text[: cut + 1] if cut > 0 else text[:CONTEXT_CHARACTERS])
        if len(passages) == count:
            return passages
    return [passages[i % len(passages)] for i in range(count)]


def evaluate_point(model, data: FrontierData) -> dict:
    """Recall of each probe set, general knowledge kept and natural-text perplexity of `model` now."""
    from modeling_memory.tools.evaluation import evaluate_knowledge_recall, evaluate_perplexity

    was_training = model.training
    model.eval()
    point = {name: evaluate_knowledge_recall(model, data.tokenizer, probes, batch_size=48)["exact_match"]
             for name, probes in data.probes.items()}
    point["general knowledge kept"] = evaluate_knowledge_recall(model, data.tokenizer, data.known_general, batch_size=48)["exact_match"]
    point["perplexity"] = evaluate_perplexity(model, data.tokenizer, data.perplexity_rows, batch_size=8)["perplexity"]
    model.train(was_training)
    return point


def build_model(data: FrontierData, method: str):
    """The model `method` trains (a copy: the base stays as it is) and the Trainer class that trains it."""
    from peft import LoraConfig, get_peft_model
    from torch.utils.data import DataLoader
    from transformers import Trainer, default_data_collator

    from modeling_memory.tools.graft import from_llama, memory_preset
    from modeling_memory.training.peft_modes import BACKBONE_LORA_TARGETS, prepare_model_for_mode
    from modeling_memory.training.sparse_memory_finetuning import select_and_prepare
    from modeling_memory.training.trainer import MemoryTrainer

    if method not in METHODS:
        raise ValueError(f"Unknown method {method!r}; choose from {', '.join(METHODS)}.")
    if method == "sparse_memory":
        model = from_llama(data.base, tokenizer=data.tokenizer, **memory_preset(data.base.config, "pkm"))
        batches = lambda rows: DataLoader(rows.with_format("torch"), batch_size=8, collate_fn=default_data_collator)
        select_and_prepare(model, batches(data.fact_rows), batches(data.background_rows), SPARSE_MEMORY_TOP_T)
        return model, MemoryTrainer
    if method == "memory_only":
        model = from_llama(data.base, tokenizer=data.tokenizer, **memory_preset(data.base.config, "both"))
        return prepare_model_for_mode(model, "memory_only"), MemoryTrainer
    model = copy.deepcopy(data.base).requires_grad_(True)
    if method == "lora":
        config = LoraConfig(r=LORA_RANK, lora_alpha=2 * LORA_RANK, target_modules=list(BACKBONE_LORA_TARGETS))
        return get_peft_model(model, config), Trainer
    return model, Trainer


def _evaluation_callback(data: FrontierData, every: int, patience: int, points: list, started: float, label: str):
    from transformers import TrainerCallback

    class EvaluateEvery(TrainerCallback):
        """Scores the model every `every` steps; stops once recall in the training phrasing has not risen for
        `patience` evaluations."""

        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step % every:
                return control
            point = {"step": state.global_step, **evaluate_point(model, data)}
            points.append(point)
            print(f"      {label} step {point['step']}: {summarise(point)}  (t={time.perf_counter() - started:.0f}s)", flush=True)
            best = max(p["training phrasing"] for p in points)
            since_best = len(points) - 1 - max(i for i, p in enumerate(points) if p["training phrasing"] == best)
            if since_best >= patience or best == 1.0:
                control.should_training_stop = True
            return control

    return EvaluateEvery()


def summarise(point: dict) -> str:
    return (f"recall {point['training phrasing']:.0%} (training phrasing), {point['held-out phrasing']:.0%} (held-out), "
            f"{point['after unrelated text']:.0%} (after unrelated text); general knowledge kept "
            f"{point['general knowledge kept']:.0%}; perplexity {point['perplexity']:.2f}")


def train_and_trace(data: FrontierData, method: str, learning_rate: float, replay: bool, max_steps: int = 120,
                    every: int = 20, patience: int = 2, batch_size: int = 8, seed: int = 0) -> dict:
    """One run: returns {"method", "learning_rate", "replay", "points": [{"step", measures...}],
    "trainable_parameters", "seconds", "model"}; the first point (step 0) is `data.before_training`."""
    from datasets import concatenate_datasets
    from transformers import default_data_collator, set_seed

    from modeling_memory.training.peft_modes import trainable_parameter_counts
    from modeling_memory.training.trainer import MemoryTrainingArguments

    started = time.perf_counter()
    set_seed(seed)
    model, trainer_class = build_model(data, method)
    trainable = trainable_parameter_counts(model)["total"]  # of a sparse memory table, only its chosen rows
    rows = concatenate_datasets([data.fact_rows, data.replay_rows]) if replay else data.fact_rows
    label = f"{method} lr={learning_rate:g}{' +replay' if replay else ''}"
    points = [{"step": 0, **data.before_training}]
    args = MemoryTrainingArguments(
        output_dir=os.path.join(tempfile.gettempdir(), "memory_llama_frontier"), max_steps=max_steps,
        per_device_train_batch_size=batch_size,
        learning_rate=learning_rate, lr_scheduler_type="constant_with_warmup", warmup_steps=min(5, max_steps // 4),
        weight_decay=0.0, logging_steps=every,
        save_strategy="no", report_to="none", seed=seed, dataloader_pin_memory=False, disable_tqdm=True,
    )
    trainer = trainer_class(model=model, args=args, train_dataset=rows, data_collator=default_data_collator,
                            processing_class=data.tokenizer,
                            callbacks=[_evaluation_callback(data, every, patience, points, started, label)])
    trainer.train()
    return {"method": method, "learning_rate": learning_rate, "replay": replay, "points": points,
            "trainable_parameters": trainable, "seconds": time.perf_counter() - started, "model": model}


def best_point(run: dict, min_kept: float = MIN_KEPT, measure: str = "training phrasing") -> dict | None:
    """The point of a run with the most recall by `measure` (a probe set's name; ties: the other phrasing decides)
    among those keeping at least `min_kept` of general knowledge; None if none does."""
    points = [p for p in run["points"][1:] if p["general knowledge kept"] >= min_kept]
    return max(points, key=lambda p: (p[measure], p["held-out phrasing"] + p["training phrasing"]), default=None)


def most_recall_point(points: list[dict]) -> dict:
    """The point recalling the most in the training phrasing (ties: the one keeping more general knowledge)."""
    return max(points, key=lambda p: (p["training phrasing"], p["general knowledge kept"]))


def kept_at_recall(points: list[dict], recall: float) -> float | None:
    """The most general knowledge kept by any of `points` recalling at least `recall` in the training phrasing;
    None if none recalls that much."""
    return max((p["general knowledge kept"] for p in points if p["training phrasing"] >= recall), default=None)


def compare_at_best_recall(points: list[dict], other_points: list[dict]) -> dict:
    """The frontier's comparison of two methods: at the most recall the other reaches (its best point), how much
    general knowledge each keeps. {"recall", "kept", "other_kept"}; "kept" is None if `points` never recall as
    much. Points are any evaluated points of a method (every learning rate, every step after the first)."""
    other_best = most_recall_point(other_points)
    return {"recall": other_best["training phrasing"], "kept": kept_at_recall(points, other_best["training phrasing"]),
            "other_kept": other_best["general knowledge kept"]}


def method_points(runs: list[dict], method: str, replay: bool) -> list[dict]:
    """Every evaluated point (after training began) of `method`'s runs with or without replay, all learning rates."""
    return [p for run in runs if run["method"] == method and run["replay"] == replay for p in run["points"][1:]]


def percent(share: float | None) -> str:
    """A share as the tables print it: "92%", or "-" for none."""
    return "-" if share is None else f"{share:.0%}"


def plot_frontier(runs: list[dict], path: str, title: str) -> str:
    """Recall (dots: training phrasing, x: held-out) against general knowledge kept: one colour per method, every
    evaluated point of every learning rate, and each method's upper envelope from the base (the star)."""
    from modeling_memory.tools.plots import agg_pyplot, save_figure

    plt = agg_pyplot()
    panels = [replay for replay in (False, True) if any(run["replay"] == replay for run in runs)]
    figure, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels) + 0.5, 5), sharey=True, squeeze=False)
    colours = dict(zip(METHODS, ("tab:red", "tab:purple", "tab:blue", "tab:gray")))
    for axis, replay in zip(axes[0], panels):
        for method in METHODS:
            points = method_points(runs, method, replay)
            if not points:
                continue
            kept = [p["general knowledge kept"] for p in points]
            axis.scatter(kept, [p["training phrasing"] for p in points], color=colours[method], s=14, alpha=0.6)
            axis.scatter(kept, [p["held-out phrasing"] for p in points], color=colours[method], s=14, marker="x", alpha=0.6)
            # Every run starts at the base: the envelope starts there too.
            start = next(run["points"][0] for run in runs if run["method"] == method and run["replay"] == replay)
            envelope = _upper_envelope([(p["general knowledge kept"], p["training phrasing"]) for p in [start, *points]])
            axis.plot(*zip(*envelope), color=colours[method], label=METHOD_LABELS[method])
        base = next(run["points"][0] for run in runs if run["replay"] == replay)
        axis.scatter([base["general knowledge kept"]], [base["training phrasing"]], color="black", marker="*", s=60,
                     zorder=3, label="the base")
        axis.axvline(MIN_KEPT, color="black", linestyle=":", linewidth=1)
        axis.set_xlabel("general knowledge kept (share of what the base answered)")
        axis.set_title("with natural-text replay" if replay else "facts alone (no replay)")
        axis.set_xlim(1.03, -0.03)  # more kept to the left
        axis.set_ylim(-0.03, 1.03)
    axes[0][0].set_ylabel("recall of the new facts (dots: training phrasing, x: held-out)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower center", ncol=3 * len(panels), fontsize=8)  # below the axes, over no point
    figure.suptitle(title, fontsize=10)
    figure.tight_layout(rect=(0, 0.1, 1, 1))
    try:
        return save_figure(figure, path)
    finally:
        plt.close(figure)


def _upper_envelope(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """For each level of knowledge kept, the most recall reached at that level or better (a staircase)."""
    envelope, best = [], -1.0
    for kept, recall in sorted(points, key=lambda p: (-p[0], -p[1])):
        if recall > best:
            best = recall
            envelope.append((kept, recall))
    return envelope


__all__ = [
    "LEARNING_RATES",
    "METHODS",
    "METHOD_LABELS",
    "MIN_KEPT",
    "FrontierData",
    "best_point",
    "build_model",
    "compare_at_best_recall",
    "evaluate_point",
    "kept_at_recall",
    "method_points",
    "most_recall_point",
    "percent",
    "plot_frontier",
    "prepare_data",
    "summarise",
    "train_and_trace",
]
