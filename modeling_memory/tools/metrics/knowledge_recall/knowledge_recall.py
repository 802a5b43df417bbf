"""Exact-match recall of knowledge probes, as an `evaluate` metric module.

A prediction is the model's greedy continuation of a probe's prompt; it recalls the fact by the
package's one rule, `modeling_memory.data.knowledge.answer_recalled`: after leading whitespace, it starts
with the answer followed by a word boundary ("1953." and "1953 and" match 1953; "19530" and
"caterpillar" do not match 1953 and cat).

    metric = evaluate.load(".../metrics/knowledge_recall")
    metric.compute(predictions=[" 1953. He"], references=["1953"])   # {"exact_match": 1.0, ...}
"""

import datasets
import evaluate

from modeling_memory.data.knowledge import answer_recalled

_DESCRIPTION = "Exact-match recall: does the continuation start with the answer (whole word)?"
_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[str]`): greedy continuations of the probe prompts.
    references (`list[str]`): the answers.
Returns:
    exact_match (`float`): fraction of predictions that start with their answer as a whole word.
    num_probes (`int`): number of probes scored.
"""


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
        hits = sum(answer_recalled(p, r) for p, r in zip(predictions, references))
        return {"exact_match": hits / len(predictions), "num_probes": len(predictions)}
