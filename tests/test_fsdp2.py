"""FSDP2 with a patched model: two CPU processes (gloo) train exactly like one unsharded process.

The scorer's parameters live inside the attention module of the block FSDP wraps (``_no_split_modules``): sharded
with it, gathered before its forward, their gradients reduced with the block's. See tests/fsdp2_worker.py.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="torch.distributed with gloo")
@pytest.mark.parametrize("backend", ["auto", "tiled"])
def test_fsdp2_sharded_training_equals_single_process(backend):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    env.pop("TRITON_INTERPRET", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), str(REPO / "tests" / "fsdp2_worker.py"), backend]  # fmt: skip
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    report = json.loads([line for line in done.stdout.splitlines() if line.startswith("{")][-1])
    assert report["missing"] == [] and len(report["scorer_keys"]) >= 2
    for sharded_loss, single_loss in report["losses"]:
        assert abs(sharded_loss - single_loss) <= 1e-5 * abs(single_loss)
    assert report["losses"][-1][1] < report["losses"][0][1]  # it trained
    assert report["max_diff"] <= 1e-5
    for key, update in report["scorer_updates"].items():  # trained, and the same training, weight by weight
        assert update > 0 and report["scorer_diffs"][key] <= 1e-2 * update, (key, report["scorer_diffs"][key], update)


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="torch.distributed with gloo")
def test_an_fsdp1_model_saves_its_adapter_from_the_full_state_dict():
    # FSDP1's parameters are flat shards (their shapes are not the scorer's): the adapter's shape check must take
    # the shapes the scorer declares; it refused every weight as "wrong shape" once
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    env.pop("TRITON_INTERPRET", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), str(REPO / "tests" / "fsdp1_worker.py")]  # fmt: skip
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    report = json.loads([line for line in done.stdout.splitlines() if line.startswith("{")][-1])
    assert all(len(shape) == 1 for shape in report["shard_shapes"])  # flat: the case under test
    assert report["names_equal"] and report["values_equal"]
    assert "use_orig_params=False flattened them" in (report["flat_error"] or "")
