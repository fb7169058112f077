"""DeepSpeed ZeRO-2 and ZeRO-3 with a patched model: two CPU processes train exactly as under ZeRO stage 0
(DeepSpeed's plain data parallelism), the scorer's parameters sharded under ZeRO-3. See tests/deepspeed_worker.py.

Needs ``deepspeed`` (installed by the ``dev`` extra); skipped where it is absent.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch.distributed as dist

from tests.test_fsdp2 import REPO, _free_port

pytest.importorskip("deepspeed")


def _train(stage: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1",
           "DS_ACCELERATOR": "cpu"}  # fmt: skip
    env.pop("TRITON_INTERPRET", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), str(REPO / "tests" / "deepspeed_worker.py"), str(stage)]  # fmt: skip
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return json.loads([line for line in done.stdout.splitlines() if line.startswith("{")][-1])


@pytest.mark.slow
@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="torch.distributed with gloo")
def test_zero_stages_train_a_patched_model_like_plain_data_parallelism():
    reference = _train(0)
    largest_update = max(abs(x) for values in reference["scorer_updates"].values() for x in values)
    assert reference["losses"][-1] < reference["losses"][0] and largest_update > 0  # it trained, the scorer too
    assert not reference["partitioned"] and not reference["refused_without_state_dict"]
    for stage in (2, 3):
        report = _train(stage)
        assert report["partitioned"] == (stage == 3), stage
        # ZeRO-3: the adapter comes from the gathered state dict; without it, save_neural_adapter refuses
        assert report["refused_without_state_dict"] == report["sharded_at_save"] == (stage == 3), stage
        assert report["adapter_updates"] == report["scorer_updates"], stage
        for loss, expected in zip(report["losses"], reference["losses"], strict=True):
            assert abs(loss - expected) <= 1e-5 * abs(expected), (stage, report["losses"], reference["losses"])
        for name, expected in reference["scorer_updates"].items():
            diff = max(abs(a - b) for a, b in zip(report["scorer_updates"][name], expected, strict=True))
            assert diff <= 1e-3 * largest_update, (stage, name, diff, largest_update)
