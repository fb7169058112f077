"""The recipes' metrics, loaded through ``evaluate`` from local modules (no Hub access needed)."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import evaluate
import numpy as np
import torch

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


# Each ``compute_metrics`` below also returns the split's loss, computed per sample: Trainer adds a returned "loss"
# after its own, so it becomes the reported ``eval_loss`` / ``test_loss``. Trainer's own averages each batch's mean
# loss, and under ``accelerate launch`` the last batch of a split that the processes cannot share evenly is filled up
# with samples from the split's start: their losses entered those means, though the gathering drops the samples
# themselves (the per-sample values computed here are dropped with them, so the loss is exact).


def _smoothed_cross_entropy(log_p: np.ndarray, labels: np.ndarray, label_smoothing: float) -> np.ndarray:
    """Per-sample cross-entropy from log-probabilities ``(samples, classes)``, label smoothing as Trainer's
    ``LabelSmoother`` (and torch's ``cross_entropy``): ``(1 - eps) * nll + eps * mean over classes of -log p``."""
    nll = -np.take_along_axis(log_p, labels[:, None], axis=-1)[:, 0]
    return (1.0 - label_smoothing) * nll + label_smoothing * -log_p.mean(axis=-1)


def classification_metrics(label_smoothing: float = 0.0) -> Callable[[Any], dict[str, float]]:
    """``compute_metrics`` for image classification: accuracy of the arg-max logits, and the mean cross-entropy
    (with Trainer's ``label_smoothing_factor``, as Trainer computes its loss)."""
    accuracy = load_metric("accuracy")

    def compute(eval_pred: Any) -> dict[str, float]:
        logits, labels = eval_pred
        logits = np.asarray(logits[0] if isinstance(logits, tuple) else logits, dtype=np.float64)
        labels = np.asarray(labels)
        top = logits.max(axis=-1, keepdims=True)
        log_p = logits - top - np.log(np.exp(logits - top).sum(axis=-1, keepdims=True))
        loss = _smoothed_cross_entropy(log_p, labels, label_smoothing).mean()
        return {**accuracy.compute(predictions=np.argmax(logits, axis=-1), references=labels), "loss": float(loss)}

    return compute


def causal_lm_per_block(label_smoothing: float = 0.0) -> Callable[[Any, Any], tuple[Any, ...]]:
    """``preprocess_logits_for_metrics`` for causal LM: per block ``(batch, seq)``, the arg-max ids ``(batch, seq)``
    (gathered instead of the full logits), then ``(batch,)`` each: the summed next-token loss (fp32, labels -100
    ignored, Trainer's ``label_smoothing_factor`` applied as it applies it), the summed next-token negative
    log-likelihood (the same without smoothing: perplexity's) and the number of tokens they sum."""

    def preprocess(logits: Any, labels: Any) -> tuple[Any, ...]:
        if isinstance(logits, tuple):
            logits = logits[0]
        targets = labels[:, 1:]
        scores = logits[:, :-1].float().transpose(1, 2)  # (batch, vocab, seq - 1)

        def summed(smoothing: float) -> Any:  # 0 where ignored
            return torch.nn.functional.cross_entropy(scores, targets, ignore_index=-100, reduction="none",
                                                     label_smoothing=smoothing).sum(dim=1)

        nll = summed(0.0)
        return (logits.argmax(dim=-1), summed(label_smoothing) if label_smoothing else nll, nll,
                (targets != -100).sum(dim=1))

    return preprocess


def causal_lm_metrics() -> Callable[[Any], dict[str, float]]:
    """``compute_metrics`` for causal LM, after ``causal_lm_per_block``: next-token accuracy (labels shifted by one,
    -100 ignored), and per token over the whole split the loss and the negative log-likelihood (they differ only
    with label smoothing; perplexity is exp(nll))."""
    accuracy = load_metric("accuracy")

    def compute(eval_pred: Any) -> dict[str, float]:
        (predictions, loss_sums, nll_sums, token_counts), labels = eval_pred
        predictions = np.asarray(predictions)[:, :-1].reshape(-1)
        labels = np.asarray(labels)[:, 1:].reshape(-1)
        keep = labels != -100
        tokens = max(int(np.asarray(token_counts).sum()), 1)
        per_token = {name: float(np.asarray(sums, dtype=np.float64).sum() / tokens)
                     for name, sums in (("loss", loss_sums), ("nll", nll_sums))}
        return {**accuracy.compute(predictions=predictions[keep], references=labels[keep]), **per_token}

    return compute
