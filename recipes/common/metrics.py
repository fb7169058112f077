"""The recipes' metrics, loaded through ``evaluate`` from local modules (no Hub access needed)."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import evaluate
import numpy as np

METRICS_DIR = Path(__file__).resolve().parent.parent / "metrics"


def load_metric(name: str) -> evaluate.EvaluationModule:
    """``evaluate.load`` of a metric shipped in ``recipes/metrics/<name>`` (works offline)."""
    path = METRICS_DIR / name
    if not (path / f"{name}.py").is_file():
        raise FileNotFoundError(f"No local metric {name!r} in {METRICS_DIR}.")
    return evaluate.load(str(path))


def perplexity_from_loss(loss: float) -> float:
    """``exp(loss)``, or ``inf`` when it overflows."""
    try:
        return math.exp(loss)
    except OverflowError:
        return float("inf")


def classification_metrics() -> Callable[[Any], dict[str, float]]:
    """``compute_metrics`` for image classification: accuracy of the arg-max logits."""
    accuracy = load_metric("accuracy")

    def compute(eval_pred: Any) -> dict[str, float]:
        logits, labels = eval_pred
        logits = logits[0] if isinstance(logits, tuple) else logits
        return accuracy.compute(predictions=np.argmax(logits, axis=-1), references=labels)

    return compute


def causal_lm_argmax(logits: Any, labels: Any) -> Any:
    """``preprocess_logits_for_metrics`` for causal LM: keep only arg-max ids (saves gathering full logits)."""
    if isinstance(logits, tuple):
        logits = logits[0]
    return logits.argmax(dim=-1)


def causal_lm_metrics() -> Callable[[Any], dict[str, float]]:
    """``compute_metrics`` for causal LM: next-token accuracy (labels shifted by one, -100 ignored)."""
    accuracy = load_metric("accuracy")

    def compute(eval_pred: Any) -> dict[str, float]:
        predictions, labels = eval_pred
        predictions = np.asarray(predictions)[:, :-1].reshape(-1)
        labels = np.asarray(labels)[:, 1:].reshape(-1)
        keep = labels != -100
        return accuracy.compute(predictions=predictions[keep], references=labels[keep])

    return compute
