"""Shared test set-up: deterministic, single-threaded CPU runs (the CI machine has 2 cores)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Triton kernels run on CPU tensors under its interpreter; must be set before triton is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers.utils import logging  # noqa: E402

torch.set_num_threads(1)
logging.set_verbosity_error()


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)
    yield


def pytest_terminal_summary(terminalreporter) -> None:
    """The session's seed, above the result line: README's ``pytest -q`` prints no header."""
    from tests.reference import SEED_OFFSET

    terminalreporter.write_line(f"random inputs of the kernel tests: TEST_SEED={SEED_OFFSET} (set it to replay them)")
