"""The A/B entry point shared by the recipes: both arms on the same seed and data, then the comparison."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from transformers.trainer_utils import get_last_checkpoint

from common.cli import strip_flag, with_arm_hub_id, with_default_hub_id
from common.report import HEADLINE_METRICS, comparison_table

Record = dict[str, Any]


def run_ab(argv: list[str], run: Callable[[list[str]], Record], parse_args: Callable[[list[str]], tuple],
           recipe: str, task: str) -> list[Record]:
    """Run the neural and dot arms (outputs in ``<output_dir>/neural`` and ``/dot``) and print the comparison.

    ``recipe`` picks the headline metrics (``"clm"`` / ``"image"``); ``task`` names it in the printed title.
    """
    *_, training_args = parse_args(argv)
    resume = training_args.resume_from_checkpoint
    if resume in ("True", "true"):  # as a single run reads it
        resume = "latest"
    if resume not in (None, "latest"):  # one checkpoint holds one arm: the other's optimizer state would not fit
        raise ValueError(f"--resume_from_checkpoint {resume} names one arm's checkpoint, and --attention ab runs two; "
                         "use --resume_from_checkpoint latest (each arm resumes from its own folder), or resume one "
                         "arm with --attention neural / dot and its --output_dir.")
    if resume == "latest":  # found for both arms before either runs (not after the first one has retrained)
        folders = {arm: os.path.join(training_args.output_dir, arm) for arm in ("neural", "dot")}
        missing = [arm for arm, folder in folders.items()
                   if not os.path.isdir(folder) or get_last_checkpoint(folder) is None]  # fmt: skip
        if missing:
            raise ValueError(f"--resume_from_checkpoint latest: no checkpoint of the {' and '.join(missing)} arm in "
                             f"{training_args.output_dir}/{{{','.join(missing)}}}. Resume the other arm alone with "
                             "--attention and its --output_dir, or drop --resume_from_checkpoint to start both anew.")
    base = with_default_hub_id(strip_flag(strip_flag(argv, "attention"), "output_dir"), training_args.output_dir)
    records = [run(with_arm_hub_id(base, arm) + ["--attention", arm, "--output_dir",
                                                 os.path.join(training_args.output_dir, arm)])
               for arm in ("neural", "dot")]
    if training_args.process_index == 0:
        print(f"\nNeural vs dot-product attention ({task}, same seed and data):\n", flush=True)
        print(comparison_table(records, HEADLINE_METRICS[recipe]), flush=True)
    return records


def main_entry(argv: list[str], run: Callable[[list[str]], Record], parse_args: Callable[[list[str]], tuple],
               recipe: str, task: str, default_output_dir: str) -> list[Record]:
    """No arguments runs the embedded A/B default; ``--attention ab`` runs both arms; otherwise one run."""
    if not argv:
        argv = ["--attention", "ab", "--output_dir", default_output_dir]
    if parse_args(argv)[2].attention == "ab":
        return run_ab(argv, run, parse_args, recipe, task)
    return [run(argv)]
