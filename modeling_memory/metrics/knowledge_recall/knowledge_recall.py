"""Exact-match recall of knowledge probes, as an `evaluate` metric module.

A prediction is the model's greedy continuation of a probe's prompt; it recalls the fact when,
after leading whitespace, it starts with the answer followed by a word boundary ("1953." and
"1953 and" match 1953; "19530" and "caterpillar" do not match 1953 and cat). Matching is case-
and character-exact otherwise.

    metric = evaluate.load(".../metrics/knowledge_recall")
    metric.compute(predictions=[" 1953. He"], references=["1953"])   # {"exact_match": 1.0, ...}
"""

import re

import datasets
import evaluate

_DESCRIPTION = "Exact-match recall: does the continuation start with the answer (whole word)?"
_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[str]`): greedy continuations of the probe prompts.
    references (`list[str]`): the answers.
Returns:
    exact_match (`float`): fraction of predictions that start with their answer as a whole word.
    num_probes (`int`): number of probes scored.
"""
_WORD_CHARACTER = re.compile(r"\w")


def recalled(prediction: str, answer: str) -> bool:
    text = prediction.lstrip()
    if not answer or not text.startswith(answer):
        return False
    rest = text[len(answer) :]
    return not rest or not _WORD_CHARACTER.match(rest[0])


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class KnowledgeRecall(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("string"), "references": datasets.Value("string")}),
        )

    def _compute(self, predictions, references):
        if not predictions:
            raise ValueError("No probes to score.")
        hits = sum(recalled(p, r) for p, r in zip(predictions, references))
        return {"exact_match": hits / len(predictions), "num_probes": len(predictions)}
