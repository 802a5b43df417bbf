"""Perplexity from per-sequence negative log-likelihoods, as an `evaluate` metric module.

The Hub's perplexity metric runs a model itself (and cannot be fetched offline); this one takes
what the evaluation loop already computed: for each sequence, the summed negative log-likelihood
(nats) of its predicted tokens and how many tokens that was. Perplexity is token-weighted:
exp(sum of NLL / sum of tokens), so sequences of different lengths combine exactly.

    metric = evaluate.load(".../metrics/perplexity")
    metric.compute(nll_sums=[12.3, 40.1], token_counts=[5, 17])
    # {"perplexity": ..., "mean_nll": ..., "num_tokens": 22}
"""

import math

import datasets
import evaluate

_DESCRIPTION = "Token-weighted perplexity from summed negative log-likelihoods and token counts."
_KWARGS_DESCRIPTION = """
Args:
    nll_sums (`list[float]`): per sequence, the sum of -log p(token) in nats over its predicted tokens.
    token_counts (`list[int]`): per sequence, the number of predicted tokens (labels other than -100).
Returns:
    perplexity (`float`): exp(sum(nll_sums) / sum(token_counts)).
    mean_nll (`float`): sum(nll_sums) / sum(token_counts), nats per token.
    num_tokens (`int`): sum(token_counts).
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Perplexity(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"nll_sums": datasets.Value("float64"), "token_counts": datasets.Value("int64")}),
        )

    def _compute(self, nll_sums, token_counts):
        if any(count < 0 for count in token_counts) or any(not math.isfinite(nll) or nll < 0 for nll in nll_sums):
            raise ValueError("nll_sums must be finite and >= 0 and token_counts >= 0.")
        total_tokens = int(sum(token_counts))
        if total_tokens == 0:
            raise ValueError("No tokens to score: every label is -100 (or no sequences were given).")
        mean_nll = float(sum(nll_sums)) / total_tokens
        return {"perplexity": math.exp(mean_nll), "mean_nll": mean_nll, "num_tokens": total_tokens}
