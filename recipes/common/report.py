"""Results of one run, the A/B comparison table, and the final-metrics line every recipe prints."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

RESULTS_FILE = "recipe_results.json"
FINAL_PREFIX = "FINAL METRICS "

HEADLINE_METRICS = {
    "clm": ["eval_loss", "eval_perplexity", "eval_accuracy", "test_sliding_perplexity", "train_runtime"],
    "image": ["eval_loss", "eval_accuracy", "test_loss", "test_accuracy", "train_runtime"],
}
LOWER_IS_BETTER = {"eval_loss", "eval_nll", "eval_perplexity", "test_loss", "test_sliding_perplexity",
                   "test_sliding_nll"}


def eval_curve(log_history: list[dict[str, Any]]) -> list[dict[str, float]]:
    """The evaluation entries of a Trainer's ``log_history`` (step plus every ``eval_*`` value), one per step.

    The final ``evaluate()`` after training logs at the last step again; the later entry wins.
    """
    by_step: dict[int, dict[str, float]] = {}
    for entry in log_history:
        if "step" in entry and any(k.startswith("eval_") for k in entry):
            values = {k: v for k, v in entry.items() if k.startswith("eval_")}
            by_step[entry["step"]] = {"step": entry["step"], **values}
    return [by_step[step] for step in sorted(by_step)]


def write_results(output_dir: str, record: dict[str, Any]) -> Path:
    """Write ``recipe_results.json`` (metrics, settings and eval curve of one run)."""
    path = Path(output_dir) / RESULTS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2, sort_keys=True, default=str))
    return path


def read_results(output_dir: str | Path) -> dict[str, Any]:
    """Read the record written by :func:`write_results`."""
    return json.loads((Path(output_dir) / RESULTS_FILE).read_text())


def final_metrics_line(metrics: dict[str, Any]) -> str:
    """One machine-readable line with the final metrics (same format for every launcher)."""
    return FINAL_PREFIX + json.dumps(metrics, sort_keys=True)


def _fmt(value: float) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if abs(value) >= 1000:
        return f"{value:.0f}"
    return f"{value:.4g}" if abs(value) < 10 else f"{value:.2f}"


def summarize(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    clean = [v for v in values if v is not None and not math.isnan(v)]
    if not clean:
        return float("nan"), float("nan")
    return statistics.fmean(clean), (statistics.stdev(clean) if len(clean) > 1 else 0.0)


def comparison_table(runs: list[dict[str, Any]], metrics: list[str]) -> str:
    """Markdown table: one row per arm, ``mean ± std (n seeds)`` per metric, then the neural - dot difference."""
    arms = [arm for arm in ("neural", "dot") if any(r["attention"] == arm for r in runs)]
    arms += sorted({r["attention"] for r in runs} - set(arms))
    seeds = sorted({r.get("seed") for r in runs}, key=str)
    header = f"| arm (seeds: {', '.join(map(str, seeds))}) | " + " | ".join(metrics) + " |"
    lines = [header, "|" + "---|" * (len(metrics) + 1)]
    means: dict[str, dict[str, float]] = {}
    for arm in arms:
        cells = []
        means[arm] = {}
        for metric in metrics:
            mean, std = summarize([r["metrics"].get(metric, float("nan")) for r in runs if r["attention"] == arm])
            means[arm][metric] = mean
            cells.append(_fmt(mean) + (f" ± {_fmt(std)}" if len(seeds) > 1 else ""))
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    if {"neural", "dot"} <= set(means):
        diffs = [_fmt(means["neural"][m] - means["dot"][m]) for m in metrics]
        lines.append("| neural - dot | " + " | ".join(diffs) + " |")
    return "\n".join(lines)
