"""Neural vs dot-product attention: run a recipe for both arms on the same seeds and data, then compare.

    python recipes/compare.py --recipe clm --seeds 0 1 2 --output_dir out/compare-clm -- --smoke
    python recipes/compare.py --recipe image --seeds 0 1 2 --launcher "accelerate launch --num_processes 2" \\
        -- --dataset_name uoft-cs/cifar10 --from_scratch

Arguments after ``--`` go to the recipe unchanged (except ``--attention``, ``--seed`` and ``--output_dir``, which
this script sets per run: ``<output_dir>/<arm>/seed_<seed>``). Writes into ``--output_dir``:

- ``results.csv``: one row per run (arm, seed, every final metric);
- ``results.md``: mean ± sample standard deviation over seeds per arm, the neural - dot difference, and the
  per-seed paired differences;
- ``curve_<metric>.png``: the eval curves (mean over seeds, band = min..max) of each arm.

Without ``--launcher`` the runs happen in this process, one after the other; with it each run is a subprocess
(``--launcher "python"`` for fresh processes, ``"accelerate launch ..."`` for distributed runs).
"""

from __future__ import annotations

import argparse
import csv
import importlib
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common.cli import comparable_flags, with_arm_hub_id, with_default_hub_id  # noqa: E402
from common.report import HEADLINE_METRICS, comparison_table, read_results, summarize  # noqa: E402

RECIPES = {"clm": "run_clm", "image": "run_image_classification"}
ARMS = ("neural", "dot")


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """This script's options, and the recipe's arguments (everything after ``--``)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", choices=sorted(RECIPES), required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--output_dir", default=None, help="Default: out/compare-<recipe>.")
    parser.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS))
    parser.add_argument("--launcher", default=None, help='Run each arm as a subprocess, e.g. "accelerate launch".')
    parser.add_argument("--metrics", nargs="+", default=None, help="Table columns (default: the recipe's headline).")
    parser.add_argument("--overwrite", action="store_true", help="Rerun runs that already have results.")
    if "--" in argv:
        split = argv.index("--")
        own, recipe_args = argv[:split], argv[split + 1 :]
    else:
        own, recipe_args = argv, []
    args = parser.parse_args(own)
    for forbidden in ("--attention", "--seed", "--output_dir"):
        if any(a == forbidden or a.startswith(forbidden + "=") for a in recipe_args):
            raise SystemExit(f"compare.py sets {forbidden} itself; remove it from the recipe arguments.")
    args.output_dir = args.output_dir or f"out/compare-{args.recipe}"
    return args, recipe_args


def arm_arguments(output_dir: str, recipe_args: list[str], arm: str, seed: int) -> tuple[list[str], Path]:
    """The recipe arguments of one arm and seed, and the folder they write to."""
    out = Path(output_dir) / arm / f"seed_{seed}"
    pushed = with_arm_hub_id(with_default_hub_id(recipe_args, output_dir), f"{arm}-seed{seed}")
    run_args = pushed + ["--attention", arm, "--seed", str(seed), "--output_dir", str(out)]
    return run_args, out


def run_one(args: argparse.Namespace, recipe_args: list[str], arm: str, seed: int) -> dict[str, Any]:
    """One recipe run (in process or through the launcher); returns its results record."""
    run_args, out = arm_arguments(args.output_dir, recipe_args, arm, seed)
    if not args.overwrite and (out / "recipe_results.json").is_file():
        previous = read_results(out)
        if "argv" not in previous or comparable_flags(previous["argv"]) != comparable_flags(run_args):
            # results of other settings must not enter this table
            made_with = shlex.join(previous["argv"]) if "argv" in previous else "arguments it did not record"
            raise SystemExit(f"{out} holds results made with other recipe arguments ({made_with}); pass --overwrite "
                             "to rerun, or another --output_dir.")
        return previous
    if args.launcher:
        script = Path(__file__).resolve().parent / f"{RECIPES[args.recipe]}.py"
        launcher = shlex.split(args.launcher)
        if launcher == ["python"]:
            launcher = [sys.executable]
        command = launcher + [str(script)] + run_args
        print("+ " + shlex.join(command), flush=True)
        subprocess.run(command, check=True)
    else:
        importlib.import_module(RECIPES[args.recipe]).run(run_args)
    return read_results(out)


def write_csv(records: list[dict[str, Any]], path: Path) -> None:
    """One row per run: recipe, arm, seed and every scalar final metric."""
    keys = sorted({k for r in records for k, v in r["metrics"].items() if isinstance(v, (int, float))})
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["recipe", "attention", "seed", *keys])
        for r in records:
            writer.writerow([r["recipe"], r["attention"], r["seed"], *(r["metrics"].get(k, "") for k in keys)])


def paired_lines(records: list[dict[str, Any]], metrics: list[str]) -> list[str]:
    """Per-seed neural - dot differences (the comparison is paired: same seed, same data, same init)."""
    by_key = {(r["attention"], r["seed"]): r["metrics"] for r in records}
    seeds = sorted({r["seed"] for r in records})
    lines = ["| seed | " + " | ".join(f"Δ {m}" for m in metrics) + " |", "|" + "---|" * (len(metrics) + 1)]
    for seed in seeds:
        if ("neural", seed) in by_key and ("dot", seed) in by_key:
            cells = [by_key[("neural", seed)].get(m, float("nan")) - by_key[("dot", seed)].get(m, float("nan"))
                     for m in metrics]
            lines.append(f"| {seed} | " + " | ".join(f"{c:.4g}" for c in cells) + " |")
    return lines


def write_markdown(records: list[dict[str, Any]], metrics: list[str], path: Path, title: str) -> str:
    """The comparison table (mean ± std over seeds) and the paired per-seed differences."""
    text = "\n".join([
        f"# {title}", "", comparison_table(records, metrics), "",
        "Mean ± sample standard deviation over seeds. Paired differences (neural - dot) per seed:", "",
        *paired_lines(records, metrics), "",
    ])
    path.write_text(text)
    return text


def plot_curves(records: list[dict[str, Any]], output_dir: Path) -> list[Path]:
    """``curve_<metric>.png`` per eval metric: mean over seeds per arm, shaded min..max band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted({k for r in records for point in r["eval_curve"] for k in point
                    if k.startswith("eval_") and not k.endswith(("runtime", "per_second"))})
    paths = []
    for name in names:
        fig, ax = plt.subplots(figsize=(6, 4))
        for arm in ARMS:
            curves: dict[int, list[float]] = {}
            for r in records:
                if r["attention"] == arm:
                    for point in r["eval_curve"]:
                        if name in point:
                            curves.setdefault(point["step"], []).append(point[name])
            if not curves:
                continue
            steps = sorted(curves)
            mean = [summarize(curves[s])[0] for s in steps]
            runs = sum(r["attention"] == arm for r in records)
            ax.plot(steps, mean, marker="o", markersize=3, label=f"{arm} ({runs} seed{'s' if runs > 1 else ''})")
            ax.fill_between(steps, [min(curves[s]) for s in steps], [max(curves[s]) for s in steps], alpha=0.2)
        ax.set_xlabel("training step")
        ax.set_ylabel(name)
        ax.set_title(f"{name}: neural vs dot-product attention")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = output_dir / f"curve_{name}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run every (arm, seed), then write the CSV, the markdown table and the plots."""
    args, recipe_args = parse(list(sys.argv[1:] if argv is None else argv))
    output_dir = Path(args.output_dir)
    records = []
    for seed in args.seeds:
        for arm in args.arms:
            records.append(run_one(args, recipe_args, arm, seed))
            processes = sorted({r["metrics"].get("n_processes", 1) for r in records})
            if len(processes) > 1:  # a reused run and a new one under another launcher: other global batches
                raise SystemExit(f"The runs in {output_dir} were made with different numbers of processes "
                                 f"{processes}, so with different global batches: they do not pool into one table. "
                                 "Rerun them under one launcher with --overwrite, or use another --output_dir.")
    if int(os.environ.get("RANK", "0")) != 0:
        return {"records": records}
    output_dir.mkdir(parents=True, exist_ok=True)
    write_csv(records, output_dir / "results.csv")
    reported = {k for r in records for k, v in r["metrics"].items() if isinstance(v, (int, float))}
    # the headline's test_* columns exist only when the runs had a test pass
    metrics = args.metrics or [m for m in HEADLINE_METRICS[records[0]["recipe"]] if m in reported]
    unknown = [m for m in metrics if m not in reported]
    if unknown:  # a typo would fill its column with nan; the runs are saved, so a corrected rerun reuses them
        raise SystemExit(f"--metrics {' '.join(unknown)}: no run reported {'it' if len(unknown) == 1 else 'them'}. "
                         f"The runs report: {', '.join(sorted(reported))}. Rerun with those names (the finished "
                         f"runs are reused; all their metrics are in {output_dir / 'results.csv'}).")
    text = write_markdown(records, metrics, output_dir / "results.md",
                          f"{args.recipe}: neural vs dot-product attention, seeds {args.seeds}")
    plots = plot_curves(records, output_dir)
    print(text)
    print(f"Wrote {output_dir / 'results.csv'}, {output_dir / 'results.md'} and {len(plots)} plot(s).")
    return {"records": records, "plots": plots}


if __name__ == "__main__":
    main()
