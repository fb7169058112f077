"""Static report of the Triton kernels' machine code for an NVIDIA GPU, compiled here without one.

For each kernel (forward, key-side backward, query-side backward) and launch configuration this compiles the
Triton kernel for the target architecture (default sm_90, the H100), reads the register and spill counts with the
``cuobjdump`` that ships inside triton's NVIDIA backend and the shared memory from triton's metadata, and counts the
SASS instructions of one iteration of the kernel's tile loop, the hidden-unit loop counted ``ceil(d' / unroll)``
times. Divided by the tile's pairs and
multiplied by the threads, that is the instructions a pair costs: the paper MLP's floor is 2 per hidden unit in the
forward pass (a max and a multiply-add) and about 5 per hidden unit in each backward kernel. A static count is not a
timing: it ignores latency, occupancy and memory traffic, so a GPU run (``bench_triton_gpu.py``) has the last word;
it does rank layouts and tile shapes, and it shows spills before a GPU session is spent on them.

Usage::

    python benchmarks/triton_sass_report.py                      # defaults + candidate tiles, d' = 2 / 16
    python benchmarks/triton_sass_report.py --variants           # + every variant at its default launch (spills)
    python benchmarks/triton_sass_report.py --quick --variants   # default launches only (tests/test_triton_compile.py)
    python benchmarks/triton_sass_report.py --csv sass.csv --arch 90
    python benchmarks/triton_sass_report.py --quick --hidden 8 16 --half-mlp   # fp32 vs packed fp16 scores
    python benchmarks/triton_sass_report.py --hidden 2 16 --mask --bias   # a mask's and a score bias's cost, per tile
    python benchmarks/triton_sass_report.py --quick --variants --v-dim 128 256 512 --arch 86   # wide heads' defaults
    python benchmarks/triton_sass_report.py --v-dim 256 --tiles 64x32x4 32x32x4   # candidate tiles at one head size

Needs ``triton`` with its NVIDIA backend (the pip wheel); no GPU, no CUDA toolkit.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import math
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # compile for real

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # repo root

import hf_neural_attention.triton_kernels_neural_attention as tk  # noqa: E402
import hf_neural_attention.triton_neural_attention as tna  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_args import positive_int  # noqa: E402

_POINTER_TYPES = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.uint8: "*u8"}
_SASS_LINE = re.compile(r"\s+/\*([0-9a-f]+)\*/\s+(.*?)\s*;")
_BACK_BRANCH = re.compile(r"BRA\s+(?:`\(|U?P\d,\s*)?(0x[0-9a-f]+)")


def _cuobjdump() -> str:
    import triton.backends.nvidia as nvidia

    return os.path.join(os.path.dirname(nvidia.__file__), "bin", "cuobjdump")


def _arg_type(value) -> str:
    if isinstance(value, torch.Tensor):
        return _POINTER_TYPES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i64" if abs(value) >= 2**31 else "i32"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"unsupported kernel argument {type(value)}")


def compile_kernel(fn, args: list, constexprs: dict, num_warps: int, arch: int):
    """triton.compile ``fn`` for sm_<arch>, specialised as a launch with these arguments would be: pointers 16-byte
    aligned, integers divisible by 16 marked so and integers equal to 1 (unit strides) made constants, as triton's
    launcher does (what lets the compiler vectorise loads)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    runtime = [name for name, p in zip(fn.arg_names, fn.params, strict=True) if not p.is_constexpr]
    if len(runtime) != len(args):
        raise ValueError(f"{fn.__name__}: {len(args)} arguments for {len(runtime)} parameters")
    values = dict(zip(runtime, args, strict=True))
    signature, fixed, attrs = {}, {}, {}
    for i, (name, p) in enumerate(zip(fn.arg_names, fn.params, strict=True)):
        if p.is_constexpr:
            signature[name], fixed[(i,)] = "constexpr", constexprs[name]
            continue
        value = values[name]
        if type(value) is int and value == 1:
            signature[name], fixed[(i,)] = "constexpr", 1
            continue
        signature[name] = _arg_type(value)
        if isinstance(value, torch.Tensor) or (type(value) is int and value % 16 == 0):
            attrs[(i,)] = [["tt.divisibility", 16]]
    source = ASTSource(fn, signature, fixed, attrs)
    options = dict(num_warps=num_warps, **tna.COMPILE_OPTIONS)  # as the kernel launches them
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)


def _cuobjdump_text(kernel, flag: str) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        return subprocess.run([_cuobjdump(), flag, f.name], capture_output=True, text=True, check=True).stdout


def resources(kernel) -> tuple[int, int, int]:
    """(registers per thread, spill stack bytes per thread, shared memory bytes per program)."""
    text = _cuobjdump_text(kernel, "--dump-resource-usage")
    regs, stack = (int(re.search(pattern, text).group(1)) for pattern in (r"REG:(\d+)", r"STACK:(\d+)"))
    return regs, stack, kernel.metadata.shared


def tile_loop_instructions(kernel, unit_iterations: int) -> int:
    """SASS instructions of one iteration of the outermost loop (the tile loop), inner loops (the hidden-unit loop)
    counted ``unit_iterations`` times. Both branches of a data-dependent ``if`` count (e.g. masking a partial tile)."""
    instructions = [(int(a, 16), text) for a, text in _SASS_LINE.findall(_cuobjdump_text(kernel, "-sass"))]
    loops = []
    for address, text in instructions:
        target = _BACK_BRANCH.search(text)
        if target and int(target.group(1), 16) < address:
            start = int(target.group(1), 16)
            loops.append((start, address, sum(start <= a <= address for a, _ in instructions)))
    if not loops:
        return len(instructions)
    outer = max(loops, key=lambda loop: loop[2])
    inner = [loop for loop in loops if loop is not outer and outer[0] <= loop[0] and loop[1] <= outer[1]]
    inner_total = sum(loop[2] for loop in inner)
    return outer[2] - inner_total + unit_iterations * inner_total


def inputs(authors: bool, hidden: int, activation: str, dot: bool, mask: bool, dropout: bool, dtype, launch: dict,
           bias: bool | str = False, dv: int = 64, softcap: bool = False):
    """The three kernels' argument lists and constexprs, built by the module's own host code. ``bias``: a learned
    ``(1, heads, n, n)`` score bias (T5's position bias), its gradient written by the query-side backward (``"add"``:
    added to the buffer, as the launches for a batch-shared bias do). ``dv``: the value's (and the dot term's query
    and key's) head size. ``softcap``: Gemma 2's logit soft-capping (a cap of 50)."""
    b, h, n = 1, 2, 256
    q_h, k_h, v = (torch.randn(b, h, n, d, dtype=dtype) for d in (hidden, hidden, dv))
    if authors:
        h2 = max(hidden // 2, 1)
        w, w2, b2 = torch.randn(h, h2), torch.randn(h, h2, hidden), torch.randn(h, h2)
    else:
        w, w2, b2 = torch.randn(h, hidden), None, None
    dq = torch.randn(b, h, n, dv, dtype=dtype) if dot else None
    dk = torch.randn(b, h, n, dv, dtype=dtype) if dot else None
    m = torch.rand(b, 1, n, n) > 0.2 if mask else None
    score_bias = torch.randn(1, h, n, n, dtype=dtype) if bias else None  # the inputs' dtype, as a bf16 T5 passes
    cfg = dict(activation=activation, causal=True, dot_scale=1.0, dropout_p=0.1 if dropout else 0.0, seed=0,
               softcap=50.0 if softcap else None, **launch)
    tensors, scalars, ce, launches = tna._launch_args(q_h, k_h, v, w, w2, b2, dq, dk, m, cfg, score_bias=score_bias)
    ce["UPCAST"] = False
    out = torch.empty(b, h, n, dv)  # the forward writes fp32 (rounded on the host)
    stats = torch.empty(2 if bias else 1, b * h, n)  # (log-sum-exp) or (row max, log denominator)
    d_out = torch.empty(b, h, n, dv, dtype=dtype)
    lead = [*tensors, *scalars, d_out, *d_out.stride()[:3], stats[0], stats[-1], torch.empty(b * h, n)]
    f32 = torch.empty(b, h, n, max(hidden, dv))
    part = torch.empty(1)
    kv_ce, q_ce = tna._backward_constexprs(ce, launches["bwd_"])
    q_ce["BIAS_GRAD"], q_ce["BIAS_ACC"] = bool(bias), bias == "add"
    return {
        "fwd": (tk.fwd_kernel, [*tensors, *scalars, out, stats[0], stats[-1], *out.stride()[:3]], ce, launches[""]),
        "bwd_kv": (tk.bwd_kv_kernel, [*lead, f32, f32, f32, part, part, part, 4], kv_ce, launches["bwd_"]),
        "bwd_q": (tk.bwd_q_kernel, [*lead, f32, f32, torch.empty(b, h, n, n), 0], q_ce, launches["bwd_"]),
    }


def report(authors, hidden, activation, dot, mask, dropout, dtype, launch, arch, bias=False, dv=64,
           softcap=False) -> list[dict]:
    rows = []
    for name, (fn, args, ce, (rows_, cols_, warps, _)) in inputs(
        authors, hidden, activation, dot, mask, dropout, dtype, launch, bias, dv, softcap
    ).items():
        kernel = compile_kernel(fn, args, ce, warps, arch)
        regs, spill, shared = resources(kernel)
        iterations = 1 if authors else math.ceil(hidden / ce["UNROLL"])
        per_pair = tile_loop_instructions(kernel, iterations) * warps * 32 / (rows_ * cols_)
        rows.append(dict(kernel=name, mlp="authors" if authors else "paper", hidden=hidden, activation=activation,
                         dot=dot, mask=mask, dropout=dropout, bias=bias, softcap=softcap,
                         dtype=str(dtype).removeprefix("torch."),
                         half_mlp=bool(launch.get("half_mlp")), v_dim=dv, arch=arch, rows=rows_,
                         cols=cols_, num_warps=warps, unroll=ce["UNROLL"], registers=regs, spill_bytes=spill,
                         shared_bytes=shared, instructions_per_pair=round(per_pair, 1)))  # fmt: skip
        print(f"{name:7s} {rows[-1]['mlp']:7s} d'={hidden:2d} {activation:4s} dot={dot:d} mask={mask:d} "
              f"dropout={dropout:d} bias={bias if bias == 'add' else int(bias)}{' softcap' if softcap else ''} "
              f"{rows[-1]['dtype']:8s}{' half_mlp' if launch.get('half_mlp') else ''} dv={dv} "
              f"tile {rows_}x{cols_} warps {warps} unroll {ce['UNROLL']}: "
              f"{regs:3d} registers, {spill:4d} B spilled, {shared // 1024:3d} KiB shared, "
              f"{per_pair:6.1f} instructions / pair", flush=True)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", type=int, default=90, help="compute capability x10 (90: H100)")
    ap.add_argument("--hidden", type=positive_int, nargs="+", default=[2, 16])
    ap.add_argument("--variants", action="store_true", help="also every MLP / feature / dtype at its default launch")
    ap.add_argument("--quick", action="store_true", help="only the default launch (no candidate tiles)")
    ap.add_argument("--half-mlp", action="store_true", help="also each launch with half_mlp=True (packed fp16 scores)")
    ap.add_argument("--bias", action="store_true", help="also each launch with a learned (1, heads, n, n) score bias")
    ap.add_argument("--mask", action="store_true", help="also each launch with a padding mask")
    ap.add_argument("--softcap", action="store_true", help="also each launch with Gemma 2's logit soft-capping")
    ap.add_argument("--v-dim", type=positive_int, nargs="+", default=[64],
                    help="head sizes of the value (and of the dot term's query and key) to compile for")
    ap.add_argument("--tiles", nargs="+", default=None, metavar="ROWSxCOLSxWARPS",
                    help="candidate tiles instead of the built-in list (e.g. 64x32x4), each with unroll 2")
    ap.add_argument("--csv", default=None)
    args = ap.parse_args()

    rows = []
    # None: the default launch
    tiles = [None] if args.quick else [None, (128, 32, 4, 2), (64, 32, 4, 2), (128, 64, 4, 2), (128, 64, 8, 2)]
    if args.tiles:
        tiles = [None] + [(*map(int, tile.split("x")), 2) for tile in args.tiles]
    for dv, hidden, tile in itertools.product(args.v_dim, args.hidden, tiles):
        launch = {} if tile is None else dict(zip(("block_m", "block_n", "num_warps", "unroll"), tile, strict=True))
        for half in (False, True) if args.half_mlp else (False,):
            for mask in (False, True) if args.mask else (False,):
                for bias, softcap in itertools.product((False, True) if args.bias else (False,),
                                                       (False, True) if args.softcap else (False,)):
                    rows += report(False, hidden, "relu", False, mask, False, torch.bfloat16,
                                   dict(launch, half_mlp=1) if half else launch, args.arch, bias=bias, dv=dv,
                                   softcap=softcap)
    for dv in args.v_dim if args.variants else ():
        for *variant, launch in [
            (False, 16, "relu", False, False, False, torch.bfloat16, {"half_mlp": 1}),  # packed fp16 scores
            # fp16 inputs: its MMA relu-mask sums take dS as two bf16 parts; d' = 12 pads to 16 units
            (False, 12, "relu", True, True, False, torch.float16, {"half_mlp": 1}),
            (False, 16, "gelu", False, False, False, torch.bfloat16, {}),
            (False, 16, "relu", True, True, True, torch.bfloat16, {}),
            (False, 8, "tanh", True, False, True, torch.float16, {}),
            (False, 2, "relu", False, True, False, torch.float32, {}),
            (True, 2, "relu", False, False, False, torch.bfloat16, {}),
            (True, 16, "relu", False, True, False, torch.bfloat16, {}),
        ]:
            rows += report(*variant, launch, args.arch, dv=dv)
        # a learned score bias (T5) with a padding mask; the second as a batch-shared bias whose dS launches add up
        for authors, hidden, bias in ((False, 16, True), (True, 8, "add")):
            rows += report(authors, hidden, "relu", False, True, False, torch.bfloat16, {}, args.arch, bias=bias,
                           dv=dv)
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        print(f"wrote {args.csv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
