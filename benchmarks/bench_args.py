"""Argument checks shared by the benchmark scripts: a bad flag is an argparse usage error naming it."""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch


def int_at_least(minimum: int) -> Callable[[str], int]:
    """An ``argparse`` type: an integer >= ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} must be at least {minimum}")
        return value

    parse.__name__ = f"int_at_least_{minimum}"  # argparse names the type in some messages
    return parse


positive_int = int_at_least(1)  # counts: repetitions, steps, tokens, threads, sizes
non_negative_int = int_at_least(0)  # warm-up repetitions


def check_device(parser: argparse.ArgumentParser, device: str) -> None:
    """Exit with a usage error when ``device`` is not one this torch can run on (before any model is built)."""
    try:
        kind = torch.device(device).type
    except RuntimeError:
        parser.error(f"--device {device}: not a device name (use cpu or cuda)")
    if kind == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {device}: this torch ({torch.__version__}) sees no CUDA GPU; use --device cpu")
    if kind not in ("cpu", "cuda"):
        parser.error(f"--device {device}: the benchmarks run on cpu or cuda")
