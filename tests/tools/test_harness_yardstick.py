"""lm-evaluation-harness as the general-knowledge yardstick (modeling_memory/tools/harness.py): the task's rows
follow GENERAL_KNOWLEDGE, and lm-eval's accuracy on a tiny MemoryLlama (memory awake, product-key memory too)
equals the accuracy a plain loop computes from the model's own log-likelihoods."""

import sys

import pytest
import torch

pytest.importorskip("lm_eval")

from conftest import wake_memory
from modeling_memory.data.knowledge import GENERAL_KNOWLEDGE
from modeling_memory.tools.harness import TASK, evaluate_with_harness, general_knowledge_rows, write_harness_tasks
from training_helpers import tiny_model, tiny_tokenizer

PKM = dict(pkm_layers=[1], pkm_num_keys=6, pkm_top_k=3, pkm_heads=2, pkm_key_dim=8)


def test_rows_are_the_general_knowledge_probes_as_four_way_choices(tmp_path):
    rows = general_knowledge_rows()
    assert rows == general_knowledge_rows()  # deterministic
    assert [(row["prompt"], row["choices"][row["gold"]]) for row in rows] == list(GENERAL_KNOWLEDGE)
    assert all(len(set(row["choices"])) == 4 for row in rows)
    folder = write_harness_tasks(tmp_path)
    assert (folder / "general_knowledge.jsonl").read_text().count("\n") == len(GENERAL_KNOWLEDGE)
    assert str(folder / "general_knowledge.jsonl") in (folder / "general_knowledge.yaml").read_text()


def reference_accuracy(model, tokenizer) -> tuple[float, float]:
    """(acc, acc_norm) by a plain loop: each choice's summed log-likelihood after the prompt (and one space),
    argmax over the choices (acc_norm: divided by the choice's length in characters) against the gold index."""
    hits = hits_norm = 0
    rows = general_knowledge_rows()
    for row in rows:
        context = tokenizer(row["prompt"], add_special_tokens=False).input_ids
        scores = []
        for choice in row["choices"]:
            whole = tokenizer(row["prompt"] + " " + choice, add_special_tokens=False).input_ids
            assert whole[: len(context)] == context
            with torch.no_grad():
                logprobs = model(torch.tensor([whole[:-1]])).logits[0].log_softmax(-1)
            scores.append(sum(logprobs[i - 1, whole[i]].item() for i in range(len(context), len(whole))))
        norm = [score / len(choice) for score, choice in zip(scores, row["choices"])]
        hits += max(range(4), key=scores.__getitem__) == row["gold"]
        hits_norm += max(range(4), key=norm.__getitem__) == row["gold"]
    return hits / len(rows), hits_norm / len(rows)


def test_harness_accuracy_equals_a_plain_log_likelihood_loop():
    model = wake_memory(tiny_model(seed=0, **PKM), scale=0.5).eval()
    tokenizer = tiny_tokenizer()
    acc, acc_norm = reference_accuracy(model, tokenizer)
    metrics = evaluate_with_harness(model, tokenizer, batch_size=8)[TASK]
    assert (metrics["acc"], metrics["acc_norm"]) == pytest.approx((acc, acc_norm), abs=1e-9)
    assert not model.training


def test_a_clear_error_without_lm_eval(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` raises ImportError
    with pytest.raises(ImportError, match=r'pip install -e "\.\[harness\]"'):
        evaluate_with_harness(tiny_model(), tiny_tokenizer())
