"""The Triton kernels compile for a real GPU (sm_90 and sm_80), here without one.

The interpreter tests (test_kernels_triton.py) check the numbers but not the compiler: it rejects programs that the
interpreter runs (for instance two return types from one function). ``benchmarks/triton_sass_report.py`` compiles
each kernel with triton's own compiler and reads the machine code with the cuobjdump its NVIDIA backend ships;
run in a subprocess so that TRITON_INTERPRET (set for the other tests) cannot leak into it.
"""

import csv
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.triton
ROOT = Path(__file__).resolve().parents[1]


def _has_nvidia_backend() -> bool:
    if importlib.util.find_spec("triton") is None:
        return False
    try:
        import triton.backends.nvidia as nvidia
    except ImportError:
        return False
    return (Path(nvidia.__file__).parent / "bin" / "cuobjdump").exists()


# the most shared memory one program may take (opt-in), by compute capability: sm_80 (A100) 163 KiB, sm_86 / sm_89
# (RTX 30xx / 40xx, A10, L4) 99 KiB, sm_90 (H100) 227 KiB; a launch asking for more fails on that card
SHARED_MEMORY_BYTES = {80: 163 * 1024, 86: 99 * 1024, 90: 227 * 1024}
needs_nvidia_backend = pytest.mark.skipif(not _has_nvidia_backend(),
                                          reason="triton with its NVIDIA backend (cuobjdump) is not installed")


def _report(tmp_path: Path, arch: int, *options: str) -> list[dict]:
    """Rows of ``triton_sass_report.py --quick --arch <arch> <options>``: one per compiled kernel."""
    out = tmp_path / "sass.csv"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "triton_sass_report.py"), "--quick", "--arch", str(arch),
           "--csv", str(out), *options]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    rows = list(csv.DictReader(out.open()))
    for row in rows:
        assert int(row["registers"]) > 0 and float(row["instructions_per_pair"]) > 0, row
        assert int(row["shared_bytes"]) <= SHARED_MEMORY_BYTES[arch], row
    return rows


@needs_nvidia_backend
@pytest.mark.parametrize("arch,variants", [(90, True), (80, False)])  # H100 (wgmma) with every variant; A100
def test_kernels_compile_for_the_gpu(tmp_path, arch, variants):
    # the A100 compiles each default launch with and without half_mlp (its MMA sums run on mma.sync there), each
    # with and without Gemma 2's logit soft-capping
    rows = _report(tmp_path, arch, *(["--variants"] if variants else ["--half-mlp", "--softcap"]))
    kernels = {(r["kernel"], r["mlp"], r["hidden"], r["activation"], r["dot"], r["dtype"], r["half_mlp"], r["bias"],
                r["softcap"]) for r in rows}  # fmt: skip
    # forward and both backward kernels of: paper relu d' 2 / 16 and the report's 10 variants (two with half_mlp, two
    # with a score bias) on sm_90; paper relu d' 2 / 16 with and without half_mlp, with and without a cap on sm_80
    assert len(kernels) == len(rows) == 3 * (2 + 10 if variants else 2 * 2 * 2)


@needs_nvidia_backend
def test_wide_heads_fit_the_shared_memory_of_sm86(tmp_path):
    """Gemma 3's 256-wide and Gemma 4's 512-wide heads: the default launch of every variant fits the 99 KiB of shared
    memory a program gets on sm_86 / sm_89 (128 x 32 tiles at width 256 asked for 104-112 KiB in the key-side
    backward, which those cards refuse to launch). ``_report`` checks the bytes."""
    rows = _report(tmp_path, 86, "--hidden", "2", "16", "--mask", "--variants", "--v-dim", "256", "512")
    # forward and both backward kernels of paper relu d' 2 / 16 with and without a mask and the 10 variants, per width
    assert sorted({int(r["v_dim"]) for r in rows}) == [256, 512] and len(rows) == 3 * 2 * (4 + 10)
