"""Corpus perplexity from summed token negative log-likelihoods, as a local `evaluate` module.

The Hub's ``perplexity`` metric downloads a model by name; this one takes what a recipe already computed:
per-chunk sums of token NLL (nats) and the number of tokens they cover, and returns the token-weighted
corpus values ``nll = sum(nll_sum) / sum(token_count)`` and ``perplexity = exp(nll)``.
"""

import math

import datasets
import evaluate

_DESCRIPTION = """Token-weighted perplexity exp(total NLL / total tokens) from per-chunk NLL sums."""

_KWARGS_DESCRIPTION = """
Args:
    nll_sum (list of float): summed negative log-likelihood (natural log) of the tokens of each chunk.
    token_count (list of int): number of tokens scored in each chunk.
Returns:
    perplexity (float): exp(sum(nll_sum) / sum(token_count)).
    nll (float): sum(nll_sum) / sum(token_count), in nats per token.
    tokens (int): sum(token_count).
Examples:
    >>> metric = evaluate.load("recipes/metrics/perplexity")
    >>> metric.compute(nll_sum=[2.0, 4.0], token_count=[1, 2])["nll"]
    2.0
"""

_CITATION = ""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Perplexity(evaluate.Metric):
    """Perplexity of a corpus from NLL sums (no model download)."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"nll_sum": datasets.Value("float64"), "token_count": datasets.Value("int64")}
            ),
        )

    def _compute(self, nll_sum, token_count) -> dict:
        tokens = int(sum(token_count))
        if tokens <= 0:
            raise ValueError("perplexity needs at least one scored token (sum of token_count is 0)")
        nll = float(sum(nll_sum)) / tokens
        return {"perplexity": math.exp(nll), "nll": nll, "tokens": tokens}
