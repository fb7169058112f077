"""Command-line parsing with recipe presets: preset flags go first, so any flag the user gives wins."""

from __future__ import annotations

import importlib.util
import os
from typing import Any

from transformers import HfArgumentParser


def canonical_flags(argv: list[str]) -> dict[str, str]:
    """``argv`` as ``{flag: value}`` (last one wins), whatever the spelling: ``--a=1`` / ``--a 1``, any order, ``-`` or
    ``_``; a flag without a value reads ``"True"``, several values (``--neural_layers 0 -1``) read ``"0 -1"``. Two
    command lines that set the same things compare equal."""
    flags: dict[str, str] = {}
    name = None
    for arg in argv:
        if arg.startswith("--"):
            name, separator, value = arg[2:].partition("=")
            name = name.replace("-", "_")
            flags[name] = value if separator else "True"
            if separator:
                name = None  # the value came with the flag
        elif name is not None:
            flags[name] = arg if flags[name] == "True" else f"{flags[name]} {arg}"
    return flags


def comparable_flags(argv: list[str]) -> dict[str, str]:
    """``canonical_flags`` with value spellings unified too: ``true`` / ``True`` (and a bare flag), ``false`` /
    ``False``, ``1e-3`` / ``0.001``. Two runs whose flags compare equal set the same things."""
    flags = {}
    for name, value in canonical_flags(argv).items():
        if value.lower() in ("true", "false"):
            value = value.capitalize()
        elif not value.lstrip("+-").isdigit():  # integers as written: "1" and "1.0" may name different things
            try:
                value = repr(float(value))
            except ValueError:
                pass
        flags[name] = value
    return flags


def given_flags(argv: list[str]) -> set[str]:
    """Names of the ``--flags`` present in ``argv`` (``--a=1`` and ``--a 1`` both give ``"a"``)."""
    return set(canonical_flags(argv))


def flag_is_true(argv: list[str], name: str) -> bool:
    """Whether ``argv`` sets the boolean ``--name`` true (``--name``, ``--name True``, ``--name=true``, ...)."""
    return canonical_flags(argv).get(name, "").lower() in ("true", "1", "yes", "y", "t")


def flag_value(argv: list[str], name: str) -> str | None:
    """The value of ``--name VALUE`` / ``--name=VALUE`` in ``argv`` (the last one), or ``None``."""
    return canonical_flags(argv).get(name)


def tensorboard_available() -> bool:
    """Whether TensorBoard logging can be enabled (``tensorboard`` or ``tensorboardX`` importable)."""
    return any(importlib.util.find_spec(name) is not None for name in ("tensorboard", "tensorboardX"))


def accelerator_available() -> bool:
    """Whether torch sees a CUDA/ROCm, XPU or MPS device."""
    import torch

    xpu = getattr(torch, "xpu", None)
    mps = getattr(torch.backends, "mps", None)
    return bool(torch.cuda.is_available() or (xpu is not None and xpu.is_available())
                or (mps is not None and mps.is_available()))


def parse_with_presets(
    dataclass_types: tuple[type, ...], presets: list[list[str]], argv: list[str]
) -> tuple[Any, ...]:
    """Parse ``argv`` after each preset's flags; argparse keeps the last value of a repeated flag.

    TensorBoard reporting is switched on when installed, unless the user passes ``--report_to``. Under
    ``accelerate launch`` the config's mixed precision (bf16 / fp16) presets ``--bf16`` / ``--fp16`` unless the user
    asks for the other one. On a machine
    without an accelerator ``--use_cpu True`` is preset: Trainer then runs distributed over CPU processes (gloo)
    when started by ``accelerate launch`` / ``torchrun`` (without it, such a launch silently trains one
    independent copy per process).
    """
    parser = HfArgumentParser(dataclass_types)
    flat = [flag for preset in presets for flag in preset]
    if not accelerator_available():
        flat += ["--use_cpu", "True", "--dataloader_pin_memory", "False"]
    precision = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    other = {"bf16": "fp16", "fp16": "bf16"}.get(precision)
    if other is not None and not flag_is_true(argv, other):
        # the accelerate config's mixed precision (exported by `accelerate launch`), which Trainer follows anyway:
        # its --bf16 / --fp16 flag must say the same, or DeepSpeed refuses to start (bf16.enabled vs bf16=False).
        # Only the other precision asked for explicitly (--fp16 True under bf16) replaces it.
        flat += [f"--{precision}", "True"]
    if "report_to" not in given_flags(argv):
        flat += ["--report_to", "tensorboard" if tensorboard_available() else "none"]
    user = given_flags(argv)
    if "do_eval" in user and not flag_is_true(argv, "do_eval") and "eval_strategy" not in user:
        # TrainingArguments turns do_eval back on for any eval_strategy but "no", which the presets set
        flat += ["--eval_strategy", "no"]
    return parser.parse_args_into_dataclasses(args=flat + list(argv))


def strip_flag(argv: list[str], name: str, takes_value: bool = True) -> list[str]:
    """``argv`` without ``--name`` (and its value, if ``takes_value``); used when fanning out to arms."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg == f"--{name}":
            skip = takes_value
            continue
        if arg.startswith(f"--{name}="):
            continue
        out.append(arg)
    return out


def with_default_hub_id(argv: list[str], output_dir: str | os.PathLike) -> list[str]:
    """``argv`` with ``--hub_model_id <name of output_dir>`` where it pushes without an id: transformers would name
    each arm's repo after the arm's own folder (``neural``, ``seed_0``), the same in every experiment."""
    if flag_is_true(argv, "push_to_hub") and flag_value(argv, "hub_model_id") is None:
        return argv + ["--hub_model_id", os.path.basename(os.path.abspath(output_dir))]
    return argv


def with_arm_hub_id(argv: list[str], suffix: str) -> list[str]:
    """``argv`` whose ``--hub_model_id`` (if any) gets ``-<suffix>``: each arm of an A/B pushes to a repo of its
    own (without an id, transformers names the repo after the arm's output folder)."""
    hub_id = flag_value(argv, "hub_model_id")
    if hub_id is None:
        return argv
    return strip_flag(argv, "hub_model_id") + ["--hub_model_id", f"{hub_id}-{suffix}"]
