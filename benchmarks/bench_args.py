"""Argument checks shared by the benchmark scripts: a bad flag is an argparse usage error naming it."""

from __future__ import annotations

import argparse

import torch


def positive_int(text: str) -> int:
    """``argparse`` type: an integer >= 1 (a count of repetitions, steps, tokens, threads, ...)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


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
