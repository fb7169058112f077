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


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def _cell(values: list[float], expected: int) -> str:
    """``mean ± std`` of the finite ``values`` (no spread for one expected value), with ``(k of n)`` when some of the
    ``expected`` ones are missing or not finite (a diverged seed): the mean is then over fewer seeds."""
    clean = [v for v in values if _finite(v)]
    mean, std = summarize(clean)
    cell = _fmt(mean) + (f" ± {_fmt(std)}" if expected > 1 and clean else "")
    return cell + (f" ({len(clean)} of {expected})" if len(clean) < expected else "")


def comparison_table(runs: list[dict[str, Any]], metrics: list[str]) -> str:
    """Markdown table: one row per arm, ``mean ± std`` over its seeds per metric, then the neural - dot difference
    paired by seed (``mean ± std`` of the per-seed differences, over the seeds where both arms have a finite value)."""
    arms = [arm for arm in ("neural", "dot") if any(r["attention"] == arm for r in runs)]
    arms += sorted({r["attention"] for r in runs} - set(arms))
    seeds = sorted({r.get("seed") for r in runs}, key=str)
    header = f"| arm (seeds: {', '.join(map(str, seeds))}) | " + " | ".join(metrics) + " |"
    lines = [header, "|" + "---|" * (len(metrics) + 1)]
    by_seed: dict[str, dict[Any, dict[str, Any]]] = {arm: {} for arm in arms}
    for run in runs:
        by_seed[run["attention"]][run.get("seed")] = run["metrics"]
    for arm in arms:
        cells = [_cell([m.get(metric, float("nan")) for m in by_seed[arm].values()], len(by_seed[arm]))
                 for metric in metrics]
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    if {"neural", "dot"} <= set(arms):
        paired = sorted(set(by_seed["neural"]) & set(by_seed["dot"]), key=str)
        cells = [_cell([by_seed["neural"][s].get(m, float("nan")) - by_seed["dot"][s].get(m, float("nan"))
                        for s in paired], len(paired)) for m in metrics]  # fmt: skip
        lines.append("| neural - dot | " + " | ".join(cells) + " |")
    return "\n".join(lines)
