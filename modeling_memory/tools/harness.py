"""lm-evaluation-harness (`lm_eval`) as a standard yardstick of the general knowledge a model keeps.

The package's own probes (`general_knowledge_probes`) ask whether a model's greedy continuation starts with the
answer. This runs the same 40 facts through lm-evaluation-harness as a 4-way multiple-choice task scored by
log-likelihood (`acc`: the answer is the likeliest of the four choices; `acc_norm`: per character), so that the
number is computed by a harness others use and can be set beside results reported with it. It needs no network:
the task's data are written from code (`general_knowledge_rows`) into a temporary folder, and lm-eval's own task
YAMLs, which read their data sets from the Hub, are not used.

    model, tokenizer = load_smollm2()
    evaluate_with_harness(model, tokenizer)  # {"memory_llama_general_knowledge": {"acc": ..., "acc_norm": ...}}

Any causal LM instance works: a MemoryLlamaForCausalLM, a PeftModel, a plain LlamaForCausalLM.
Needs lm-eval: `pip install -e ".[harness]"`.
"""

from __future__ import annotations

import json
import random
import tempfile
from pathlib import Path

import yaml

from modeling_memory.data.knowledge import GENERAL_KNOWLEDGE

TASK = "memory_llama_general_knowledge"
TASKS_DIR = Path(__file__).parent / "harness_tasks"
INSTALL_HINT = 'pip install -e ".[harness]"'

# The wrong choices of an item are drawn from the answers of its kind. Each kind lists the answers of
# GENERAL_KNOWLEDGE of that kind, then (where they are fewer than four) wrong answers of the same kind added so
# that every item has three distractors. None of the added words answers its kind's prompts.
_KINDS = {
    "city": ("Paris", "Rome", "Tokyo", "Berlin", "Madrid", "London", "Moscow", "Cairo", "Beijing", "Athens"),
    "country": ("China", "Egypt", "India", "Mexico", "Brazil"),
    "sun or planet": ("Jupiter", "Mercury", "Sun", "Mars", "Saturn", "Moon"),
    "chemical symbol": ("Au", "H2O", "Ag", "Fe", "CO2"),
    "element": ("oxygen", "nitrogen", "carbon", "helium"),
    "process": ("photosynthesis", "digestion", "evaporation", "fermentation"),
    "surname": ("Armstrong", "Shakespeare", "Einstein", "Vinci", "Washington"),
    "river or ocean": ("Nile", "Pacific", "Amazon", "Atlantic", "Danube"),
    "unit of time": ("days", "months", "hours", "years", "minutes"),
    "opposite": ("cold", "down", "small", "dark", "slow"),
    "weekday": ("Wednesday", "Thursday", "Friday", "Sunday"),
    "month": ("March", "April", "June", "October"),
    "number word": ("five", "six", "seven", "three"),
    "colour": ("blue", "green", "red", "yellow"),
    "produce": ("honey", "milk", "wool", "eggs", "silk"),
    "number": ("0", "4", "100", "32", "3"),
}


def general_knowledge_rows(seed: int = 0) -> list[dict]:
    """GENERAL_KNOWLEDGE as multiple-choice rows {"prompt", "choices" (4), "gold" (index), "kind"}, the same for a
    given seed: the answer and three other answers of its kind, in a seeded order."""
    kind_of = {answer: kind for kind, answers in _KINDS.items() for answer in answers}
    rng = random.Random(seed)
    rows = []
    for prompt, answer in GENERAL_KNOWLEDGE:
        if answer not in kind_of:
            raise ValueError(f"The general-knowledge answer {answer!r} has no kind: add it to _KINDS in {__file__}.")
        kind = kind_of[answer]
        choices = [answer] + rng.sample([a for a in _KINDS[kind] if a != answer], 3)
        rng.shuffle(choices)
        rows.append({"prompt": prompt, "choices": choices, "gold": choices.index(answer), "kind": kind})
    return rows


def write_harness_tasks(directory) -> Path:
    """Write the task folder for lm-eval's `include_path` into `directory`: general_knowledge.yaml with an
    absolute `data_files` path, and general_knowledge.jsonl beside it (datasets caches it in datasets_cache/
    there, not in the user's cache). Returns the folder."""
    directory = Path(directory).resolve()
    directory.mkdir(parents=True, exist_ok=True)
    data = directory / "general_knowledge.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in general_knowledge_rows()), encoding="utf-8")
    config = yaml.safe_load((TASKS_DIR / "general_knowledge.yaml").read_text(encoding="utf-8"))
    config["dataset_kwargs"].update(data_files={"test": str(data)}, cache_dir=str(directory / "datasets_cache"))
    (directory / "general_knowledge.yaml").write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return directory


def evaluate_with_harness(model, tokenizer, tasks=(TASK,), batch_size: int = 8, limit=None) -> dict:
    """Run lm-evaluation-harness `tasks` (ours, or any lm-eval task whose data are reachable) on a loaded model.

    Returns {task: {metric: value}}, e.g. {"memory_llama_general_knowledge": {"acc": 0.9, "acc_stderr": 0.05,
    "acc_norm": 0.85, "acc_norm_stderr": 0.06}}. `limit` caps the items per task (an int, or a fraction).
    """
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as error:
        raise ImportError(f"evaluate_with_harness needs lm-evaluation-harness: run `{INSTALL_HINT}`.") from error

    was_training = model.training
    model.eval()
    try:
        with tempfile.TemporaryDirectory(prefix="memory_llama_harness_") as folder:
            # lm-eval's ~14,000 built-in task YAMLs take seconds to index: only when a task asked for is not ours.
            task_manager = TaskManager(
                include_path=str(write_harness_tasks(folder)), include_defaults=any(task != TASK for task in tasks)
            )
            # backend="causal": lm-eval does not know the memory_llama model type and would guess (and warn).
            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, backend="causal")
            output = lm_eval.simple_evaluate(
                model=lm, tasks=list(tasks), task_manager=task_manager, limit=limit, log_samples=False
            )
    finally:
        model.train(was_training)
    # lm-eval keys a metric "acc,none" (metric, filter; "none" is the only filter of a log-likelihood task) beside
    # entries that are not metrics ("alias", "name", "sample_len").
    return {
        task: {key.removesuffix(",none"): value for key, value in metrics.items() if "," in key}
        for task, metrics in output["results"].items()
    }


__all__ = ["TASK", "evaluate_with_harness", "general_knowledge_rows", "write_harness_tasks"]
