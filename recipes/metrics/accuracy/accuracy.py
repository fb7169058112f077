"""Accuracy as a local `evaluate` module (the Hub's `accuracy` cannot be fetched offline).

Load with ``evaluate.load("recipes/metrics/accuracy")``; the API matches the Hub metric:
``compute(predictions=[...], references=[...], normalize=True, sample_weight=None)``.
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """Fraction of predictions equal to their references: (TP + TN) / N for labels of any kind."""

_KWARGS_DESCRIPTION = """
Args:
    predictions (list of int): predicted labels.
    references (list of int): ground-truth labels.
    normalize (bool): if False, return the number of correct predictions instead of the fraction.
    sample_weight (list of float): optional per-example weights.
Returns:
    accuracy (float): the (weighted) fraction, or count, of correct predictions.
Examples:
    >>> metric = evaluate.load("recipes/metrics/accuracy")
    >>> metric.compute(predictions=[0, 1, 1, 2], references=[0, 1, 2, 2])
    {'accuracy': 0.75}
"""

_CITATION = ""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Accuracy(evaluate.Metric):
    """Accuracy without scikit-learn and without network access."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references, normalize: bool = True, sample_weight=None) -> dict:
        correct = np.asarray(predictions) == np.asarray(references)
        weights = np.ones(len(correct)) if sample_weight is None else np.asarray(sample_weight, dtype=float)
        total = float((correct * weights).sum())
        if normalize:
            denominator = float(weights.sum())
            total = total / denominator if denominator else float("nan")
        return {"accuracy": total}
