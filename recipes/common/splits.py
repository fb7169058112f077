"""Holding out a validation split from train, with errors that name the recipe's flags."""

from __future__ import annotations

from math import ceil

import datasets


def hold_out_validation(
    train: datasets.Dataset, percentage: float, validation_flag: str
) -> tuple[datasets.Dataset, datasets.Dataset]:
    """Split ``train`` into (train, validation) with ``percentage`` % of its rows (rounded up) held out, seed 0.

    Args:
        train: the training rows.
        percentage: ``--validation_split_percentage``.
        validation_flag: the recipe's flag that gives validation data instead (named in the errors).

    Raises:
        ValueError: the percentage is outside (0, 100), or ``train`` is too small to keep a row on each side.
    """
    if not 0 < percentage < 100:
        raise ValueError(
            f"--validation_split_percentage {percentage} must lie strictly between 0 and 100: the data has no "
            f"validation split, so that share of the training rows is held out for it (or give {validation_flag})."
        )
    held_out = ceil(percentage / 100 * len(train))  # as datasets rounds a fractional test_size
    if held_out >= len(train):
        raise ValueError(
            f"The training data has {len(train)} row(s): too few to hold out {percentage}% for validation "
            f"(--validation_split_percentage) and still train on at least one. Give more training data, or "
            f"{validation_flag}."
        )
    parts = train.train_test_split(test_size=percentage / 100, seed=0)
    return parts["train"], parts["test"]
