"""GPU benchmark (and correctness check) of the fused Triton Neural Attention kernel.

One short run (a few minutes on an H100) that

1. checks the kernel against a float64 materialising reference at small, odd shapes on the GPU (forward and
   every gradient; paper / authors MLP, causal, padding mask with fully-masked rows, residual dot term,
   fp32 / bf16), with the default (GPU) block sizes; skip it with ``--skip-check``;
2. times forward and forward+backward of ``neural_attention_triton`` against
   ``torch.nn.functional.scaled_dot_product_attention`` (flash backend, bf16) for n = 1024 .. 8192,
   d' in (2, 16), 12 heads of 64, batch = tokens // n (constant tokens per step), median of repeats with
   CUDA events, peak memory with ``torch.cuda.max_memory_allocated``; the paper MLP also with ``half_mlp=True``
   (kind ``neural_paper_half``: the scores' MLP in packed fp16, unroll 8, and from d' = 8 the backward's relu-mask
   sums on the tensor cores; its error is in the check above; ``--tune`` picks its tiles on their own);
3. writes a CSV (default ``$OUT/bench_triton_gpu.csv`` or ``./bench_triton_gpu.csv``) and prints a markdown table.

Usage::

    python benchmarks/bench_triton_gpu.py                 # check + full sweep
    python benchmarks/bench_triton_gpu.py --check-only
    python benchmarks/bench_triton_gpu.py --lengths 1024 2048 --hidden 16 --mlp paper

Exit status: 0 ok, 1 correctness check failed, 2 no CUDA.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # repo root: the package and tests.reference

from hf_neural_attention import kernels_neural_attention as kernels  # noqa: E402
from tests.reference import kernel_reference  # noqa: E402  (float64 materialising reference)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_args import non_negative_int, positive_int  # noqa: E402

DEVICE = "cuda"


HALF_GRAD_TOL = 5e-2  # norm-wise; interpreter, the fp32 case's shape: 3e-3 to 1.7e-2 (a flipped relu')


def half_launch(launch: dict) -> dict:
    """``launch`` with half_mlp=True and its unroll of 8 (each loop iteration's fp16 sum amortised over 8 units)."""
    return dict(launch, half_mlp=True, unroll=8, bwd_unroll=8)


def relative_error(actual: torch.Tensor, expected: torch.Tensor, norm_wise: bool = False) -> float:
    """max |a - e| / max(1, max |e|), or norm-wise |a - e| / |e| (half_mlp gradients: a relu' that fp16 rounding
    flips moves one entry by dS_ij w_m); inf when ``actual`` is not finite."""
    if not torch.isfinite(actual).all():
        return math.inf
    diff = actual.double() - expected
    if norm_wise:
        return diff.norm().item() / max(expected.norm().item(), 1e-30)
    return diff.abs().max().item() / max(1.0, expected.abs().max().item())


def correctness_check(fn, dev: str = DEVICE, det_len: int = 300, only: str | None = None) -> bool:
    """Each case against the float64 reference, then the backward's determinism; ``only``: the cases whose name
    contains it (the random data of each case stays the same)."""
    g = torch.Generator(device="cpu").manual_seed(0)
    cases = [
        # name, b, h, lq, lk, hidden, vdim, authors, shared, dot, dtype, kwargs, tol
        ("paper relu causal fp32", 2, 3, 77, 131, 3, 64, False, False, 0, torch.float32, dict(causal=True), 1e-4),
        # the default launch of the common case (relu, bf16, no dot term) owns 128 rows: lengths past one block
        ("paper relu causal bf16", 2, 3, 300, 333, 16, 64, False, False, 0, torch.bfloat16, dict(causal=True), 5e-2),
        ("paper relu mask bf16", 1, 2, 150, 97, 2, 64, False, True, 0, torch.bfloat16, dict(), 5e-2),
        # half_mlp: the same shapes as the bf16 rows above, so their errors compare side by side
        ("paper relu causal half", 2, 3, 300, 333, 16, 64, False, False, 0, torch.bfloat16,
         dict(causal=True, half_mlp=True), 5e-2),
        ("paper relu mask half", 1, 2, 150, 97, 2, 64, False, True, 0, torch.bfloat16, dict(half_mlp=True), 5e-2),
        ("paper relu causal fp32 half", 2, 3, 77, 131, 16, 64, False, False, 0, torch.float32,
         dict(causal=True, half_mlp=True), 5e-3),
        ("paper gelu mask fp32", 2, 2, 65, 70, 16, 40, False, True, 0, torch.float32, dict(activation="gelu"), 1e-4),
        (
            "paper silu dot bf16",
            2,
            2,
            100,
            100,
            8,
            64,
            False,
            False,
            64,
            torch.bfloat16,
            dict(activation="silu", causal=True, dot_scale=0.125),
            5e-2,
        ),
        ("authors causal fp32", 1, 2, 90, 140, 16, 64, True, False, 0, torch.float32, dict(causal=True), 1e-4),
        ("authors mask bf16", 2, 2, 33, 97, 2, 64, True, True, 0, torch.bfloat16, dict(), 5e-2),
        (
            "paper tanh dot fp16",
            1,
            2,
            129,
            64,
            16,
            64,
            False,
            False,
            32,
            torch.float16,
            dict(activation="tanh", dot_scale=0.2),
            1e-2,
        ),
        # (last, so the cases above keep their random data) fp16 inputs: the half MLP's relu-mask sums take dS as
        # two bf16 parts (8 <= d' <= 16); with a padding mask
        ("paper relu mask fp16 half", 1, 2, 150, 97, 8, 64, False, True, 0, torch.float16, dict(half_mlp=True), 1e-2),
        # a learned (1, heads, lq, lk) score bias (T5's position bias), its gradient included
        ("paper relu causal bias fp32", 2, 3, 77, 131, 8, 64, False, False, 0, torch.float32, dict(causal=True), 1e-4),
        ("paper relu mask bias bf16", 2, 3, 300, 333, 16, 64, False, False, 0, torch.bfloat16, dict(), 5e-2),
        ("authors causal bias bf16", 1, 2, 90, 140, 8, 64, True, False, 0, torch.bfloat16, dict(causal=True), 5e-2),
        # a batch-shared bias whose dS comes from launches of one batch row each, added into one buffer (the budget
        # that forces them is set for this case only)
        ("paper relu mask bias rows fp32", 3, 2, 77, 131, 8, 64, False, False, 0, torch.float32, dict(), 1e-4),
        # wide heads take smaller default tiles (Llama 128, Gemma 3 256, Gemma 4's global layers 512: _PAPER_TILES)
        ("paper relu causal bf16 wide", 1, 2, 300, 300, 16, 128, False, False, 0, torch.bfloat16, dict(causal=True),
         5e-2),
        ("paper relu mask bf16 wide", 1, 2, 150, 170, 2, 256, False, False, 0, torch.bfloat16, dict(), 5e-2),
        ("paper relu causal fp32 wide", 1, 2, 77, 131, 2, 512, False, False, 0, torch.float32, dict(causal=True),
         1e-4),
        ("paper relu causal bf16 wider", 1, 2, 200, 200, 16, 512, False, False, 0, torch.bfloat16,
         dict(causal=True), 5e-2),
        ("paper silu dot bf16 wide", 1, 2, 100, 100, 8, 256, False, False, 256, torch.bfloat16,
         dict(activation="silu", causal=True, dot_scale=0.06), 5e-2),
        ("authors mask bf16 wide", 1, 2, 33, 97, 2, 512, True, True, 0, torch.bfloat16, dict(), 5e-2),
        # Gemma 2's logit soft-capping (in the kernels: the device's ex2 and approximate division in tanh) and
        # gpt-oss' attention sinks (per head; per token: Inkling 2), folded in on the host
        ("paper relu causal cap sinks fp32", 2, 3, 77, 131, 8, 64, False, False, 0, torch.float32,
         dict(causal=True, softcap=1.5), 1e-4),
        ("paper relu mask cap token sinks bf16", 1, 2, 150, 97, 16, 64, False, False, 0, torch.bfloat16,
         dict(softcap=1.5), 5e-2),
        ("authors causal cap fp32", 1, 2, 90, 140, 16, 64, True, False, 0, torch.float32,
         dict(causal=True, softcap=1.5), 1e-4),
        ("paper relu mask cap sinks bf16 half", 1, 2, 150, 97, 8, 64, False, False, 0, torch.bfloat16,
         dict(softcap=1.5, half_mlp=True), 5e-2),
    ]
    ok = True
    for name, b, h, lq, lk, hid, vd, authors, shared, dot, dtype, kw, tol in cases:

        def r(*shape, scale=1.0, dtype=dtype):
            return (torch.randn(*shape, generator=g) * scale).to(dev, dtype).requires_grad_()

        hw = 1 if shared else h
        t = dict(A=r(b, h, lq, hid), B=r(b, h, lk, hid), V=r(b, h, lk, vd))
        if authors:
            h2 = max(hid // 2, 1)
            t.update(w=r(hw, h2), w2=r(hw, h2, hid, scale=0.5), b2=r(hw, h2, scale=0.3))
        else:
            t.update(w=r(hw, hid))
        if dot:
            t.update(dq=r(b, h, lq, dot, scale=0.5), dk=r(b, h, lk, dot, scale=0.5))
        if "mask" in name:
            m = torch.rand(b, 1, lq, lk, generator=g) > 0.3
            m[0, 0, 5] = False  # a fully masked row
            kw = dict(kw, mask=m.to(dev))
        if "bias" in name:
            t["bias"] = r(1, h, lq, lk, scale=2.0)
        if "sinks" in name:  # logits of 1..3, of the order of the scores: each takes a real share of its row
            t["sinks"] = (1.0 + 2.0 * torch.rand(b if "token" in name else 1, h, lq if "token" in name else 1, 1,
                                                 generator=g)).to(dev, dtype).requires_grad_()
        if only is not None and only not in name:
            torch.randn(b, h, lq, vd, generator=g)  # its incoming gradient's draw: the later cases keep their data
            continue
        args = (t["A"], t["B"], t["V"], t["w"], t.get("w2"), t.get("b2"))
        extra = dict(dot_query=t.get("dq"), dot_key=t.get("dk"), score_bias=t.get("bias"), sinks=t.get("sinks"))
        budget = kernels.BIAS_GRAD_BUFFER_BYTES
        try:  # a case that raises (a compile error, say) fails and the others still run
            if "rows" in name:
                kernels.BIAS_GRAD_BUFFER_BYTES = h * lq * lk * 4
            out = fn(*args, **extra, **kw)
            ref_kw = {k: v for k, v in kw.items() if k != "half_mlp"}  # a kernel setting, not part of the math
            ref = kernel_reference(*args, **extra, **ref_kw)
            go = torch.randn(ref.shape, generator=g).to(dev, out.dtype)  # same values for both
            names = list(t)
            g_k = torch.autograd.grad(out, [t[n] for n in names], go)
            g_r = torch.autograd.grad(ref, [t[n] for n in names], go.double())
            # half_mlp: the operands round to fp16, so a pair whose relu input lies within that rounding of 0 may flip
            # its relu' in backward, moving one gradient entry by dS_ij w_m (interpreter: up to 0.11 of the largest
            # entry): its gradients are compared norm-wise, |g - g_ref| / |g_ref|, against HALF_GRAD_TOL
            half = kw.get("half_mlp", False)
            errs, limits = {}, {}
            for n, a, e in [("out", out, ref), *zip(names, g_k, g_r, strict=True)]:
                norm_wise = half and n != "out"
                errs[n], limits[n] = relative_error(a, e, norm_wise), HALF_GRAD_TOL if norm_wise else tol
            worst = max(errs, key=lambda n: errs[n] / limits[n])
            passed = all(errs[n] <= limits[n] for n in errs)
            ok &= passed
            print(f"[check] {'PASS' if passed else 'FAIL'} {name:28s} worst={worst}:{errs[worst]:.2e} "
                  f"(tol {limits[worst]:.0e}{', norm-wise' if half and worst != 'out' else ''}) "
                  + " ".join(f"{n}={e:.1e}" for n, e in errs.items()))
        except Exception as e:  # noqa: BLE001
            ok = False
            print(f"[check] FAIL {name:28s} {type(e).__name__}: {str(e).splitlines()[0][:160]}")
        finally:
            kernels.BIAS_GRAD_BUFFER_BYTES = budget
    # determinism of the backward pass
    A = torch.randn(2, 4, det_len, 8, device=dev, requires_grad=True)
    B = torch.randn(2, 4, det_len, 8, device=dev, requires_grad=True)
    V = torch.randn(2, 4, det_len, 64, device=dev, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(1, 8, device=dev, requires_grad=True)
    bias = torch.randn(1, 4, det_len, det_len, device=dev, requires_grad=True)
    go = torch.randn(2, 4, det_len, 64, device=dev, dtype=torch.bfloat16)
    det = True
    for kw in (dict(causal=True), dict(causal=True, half_mlp=True), dict(causal=True, score_bias=bias)):
        inputs = (A, B, V, w, *([bias] if "score_bias" in kw else []))
        g1 = torch.autograd.grad(fn(A, B, V, w, **kw), inputs, go)
        g2 = torch.autograd.grad(fn(A, B, V, w, **kw), inputs, go)
        same = all(torch.equal(x, y) for x, y in zip(g1, g2, strict=True))
        what = " (half_mlp)" if "half_mlp" in kw else " (score bias)" if "score_bias" in kw else ""
        print(f"[check] {'PASS' if same else 'FAIL'} backward bitwise deterministic{what}")
        det &= same
    return ok and det


def launch_check(fn, mlp: str, hidden: int, launch: dict, n: int = 300) -> bool:
    """The tuned launch of (mlp, d') against the float64 reference: bf16, causal, n not a multiple of a block.
    ``paper_half``: half_mlp=True, gradients norm-wise (see ``correctness_check``)."""
    g = torch.Generator(device="cpu").manual_seed(1)
    half = mlp == "paper_half"
    if half:
        launch = half_launch(launch)

    def r(*shape, dtype=torch.bfloat16, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(DEVICE, dtype).requires_grad_()

    t = dict(A=r(2, 3, n, hidden), B=r(2, 3, n, hidden), V=r(2, 3, n, 64))
    if mlp == "authors":
        h2 = max(hidden // 2, 1)
        t.update(w=r(3, h2, dtype=torch.float32), w2=r(3, h2, hidden, dtype=torch.float32, scale=0.5),
                 b2=r(3, h2, dtype=torch.float32, scale=0.3))
    else:
        t.update(w=r(3, hidden, dtype=torch.float32))
    args = (t["A"], t["B"], t["V"], t["w"], t.get("w2"), t.get("b2"))
    out = fn(*args, causal=True, **launch)
    ref = kernel_reference(*args, causal=True)
    go = torch.randn(ref.shape, generator=g).to(DEVICE, out.dtype)
    g_k = torch.autograd.grad(out, list(t.values()), go)
    g_r = torch.autograd.grad(ref, list(t.values()), go.double())
    worst = max(relative_error(a, e, norm_wise=half and i > 0)
                for i, (a, e) in enumerate([(out, ref), *zip(g_k, g_r, strict=True)]))
    passed = worst <= 5e-2
    print(f"[check] {'PASS' if passed else 'FAIL'} tuned {mlp} d'={hidden} {launch} worst={worst:.2e} (tol 5e-02)")
    return passed


# ------------------------------------------------------------------------------------------ timing
def time_cuda(fn, repeats: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def peak_mib(fn) -> float:
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def bench_case(kind, n, batch, heads, head_dim, hidden, causal, repeats, warmup, fn=None, launch=None,
               position_bias=False, softcap=None, sinks=False):
    """(forward ms, forward+backward ms, peak MiB of forward+backward) of one case, bf16 inputs.

    kind: "sdpa_flash", "sdpa_bias", "neural_paper", "neural_paper_half" or "neural_authors"; launch: block / warp
    keywords for ``fn`` (``neural_paper_half`` adds half_mlp=True and unroll 8). ``position_bias``: a learned bf16
    ``(1, heads, n, n)`` score bias that gets its gradient (T5's position bias); SDPA takes it as its float
    ``attn_mask`` ("sdpa_bias": flash takes no mask, so its memory-efficient path, the causal mask added to the bias).
    ``softcap`` (Gemma 2) and ``sinks`` (learned per-head ``(1, heads, 1, 1)`` logits, gpt-oss): the neural kernels
    only (flash has neither: SDPA stays the floor).
    """
    launch = launch or {}
    dev, dt = DEVICE, torch.bfloat16
    go = torch.randn(batch, heads, n, head_dim, device=dev, dtype=dt)
    bias = torch.randn(1, heads, n, n, device=dev, dtype=dt, requires_grad=True) if position_bias else None
    if kind == "sdpa_bias":
        q, k, v = (torch.randn(batch, heads, n, head_dim, device=dev, dtype=dt, requires_grad=True) for _ in range(3))
        params = (q, k, v, bias)
        above = torch.ones(n, n, device=dev, dtype=torch.bool).triu(1) if causal else None

        def fwd():
            mask = bias if above is None else bias.masked_fill(above, float("-inf"))
            with torch.nn.attention.sdpa_kernel([torch.nn.attention.SDPBackend.EFFICIENT_ATTENTION]):
                return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.expand(batch, heads, n, n))
    elif kind == "sdpa_flash":
        q, k, v = (torch.randn(batch, heads, n, head_dim, device=dev, dtype=dt, requires_grad=True) for _ in range(3))
        params = (q, k, v)

        def fwd():
            with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    else:
        mlp = kind.split("_")[1]
        A = torch.randn(batch, heads, n, hidden, device=dev, dtype=dt, requires_grad=True)
        B = torch.randn(batch, heads, n, hidden, device=dev, dtype=dt, requires_grad=True)
        v = torch.randn(batch, heads, n, head_dim, device=dev, dtype=dt, requires_grad=True)
        if mlp == "authors":
            h2 = max(hidden // 2, 1)
            w = torch.randn(heads, h2, device=dev, requires_grad=True)
            w2 = torch.randn(heads, h2, hidden, device=dev, requires_grad=True)
            b2 = torch.randn(heads, h2, device=dev, requires_grad=True)
            params = (A, B, v, w, w2, b2)
        else:
            w = torch.randn(heads, hidden, device=dev, requires_grad=True)
            w2 = b2 = None
            params = (A, B, v, w)
        sink = torch.randn(1, heads, 1, 1, device=dev, dtype=dt, requires_grad=True) if sinks else None
        params = (*params, *([bias] if position_bias else []), *([sink] if sinks else []))

        if kind.endswith("_half"):
            launch = half_launch(launch)

        def fwd():
            return fn(A, B, v, w, w2, b2, causal=causal, score_bias=bias, softcap=softcap, sinks=sink, **launch)

    def fwd_bwd():
        out = fwd()
        out.backward(go)
        for p in params:
            p.grad = None

    with torch.no_grad():
        t_fwd = time_cuda(fwd, repeats, warmup)
    t_fb = time_cuda(fwd_bwd, repeats, warmup)
    mem = peak_mib(fwd_bwd)
    return t_fwd, t_fb, mem


# ------------------------------------------------------------------------------------------ tuning
# (BLOCK_M, BLOCK_N, num_warps, unroll) candidates per (MLP, d' <= 4); for the backward kernels (own, step, ...):
# each owns a block of positions (queries or keys) and steps over the other side. Paper MLP: the tiles take the MMA
# register layout, where more owned rows give a thread more rows per loaded column; the sm_90 SASS (compiled here
# without a GPU) ranked these by instructions per (pair, hidden unit) without register spills. Authors' MLP: earlier
# H100 runs (benchmarks/results/gpu_h100/run2). An all-units (BM, BN, d') formulation of the paper MLP was 1.5-2x
# slower and dropped.
CANDIDATES = {
    ("paper", True): [(128, 32, 4, 2), (64, 32, 4, 2), (128, 64, 4, 2), (128, 64, 8, 2), (256, 32, 8, 2)],
    ("paper", False): [(128, 32, 4, 2), (64, 32, 4, 2), (128, 32, 4, 4), (128, 64, 8, 2), (256, 32, 8, 2)],
    # half_mlp (its unroll is 8 whatever the candidate says): the tiles the SASS ranks best at d' = 8 / 16
    ("paper_half", True): [(128, 32, 4, 8), (64, 32, 4, 8)],
    ("paper_half", False): [(128, 32, 4, 8), (64, 64, 4, 8), (64, 32, 4, 8)],
    ("authors", True): [(32, 32, 4, 1), (64, 32, 4, 1), (32, 32, 8, 1)],
    ("authors", False): [(16, 16, 4, 1), (16, 32, 4, 1), (16, 32, 8, 1), (32, 16, 8, 1)],  # d' > 8: the GEMM form
}


def launch_kwargs(fwd_cfg: tuple, bwd_cfg: tuple) -> dict:
    """Keyword arguments of ``neural_attention_triton`` for (BLOCK_M, BLOCK_N, num_warps, unroll) pairs."""
    keys = ("block_m", "block_n", "num_warps", "unroll")
    return {**dict(zip(keys, fwd_cfg, strict=True)), **{f"bwd_{k}": v for k, v in zip(keys, bwd_cfg, strict=True)}}


def tune(fn, mlp, hidden, n, batch, heads, head_dim, causal, repeats, warmup):
    """Time every candidate launch of the forward kernel, then of the backward kernels (forward fixed to the
    best): returns (launch keyword arguments of the fastest forward+backward, rows)."""
    rows = []

    def run(fwd_cfg, bwd_cfg, stage):
        launch = launch_kwargs(fwd_cfg, bwd_cfg)
        try:
            t_fwd, t_fb, _ = bench_case(f"neural_{mlp}", n, batch, heads, head_dim, hidden, causal, repeats,
                                        warmup, fn, launch)
        except Exception as e:  # a config the compiler rejects (out of shared memory, ...): skip it
            print(f"[tune] {mlp} d'={hidden} {stage} {launch}: {type(e).__name__}: {str(e)[:120]}")
            return math.inf, math.inf
        rows.append(dict(mlp=mlp, hidden=hidden, n=n, batch=batch, stage=stage, fwd=str(fwd_cfg),
                         bwd=str(bwd_cfg), fwd_ms=round(t_fwd, 3), bwd_ms=round(t_fb - t_fwd, 3)))
        print(f"[tune] {mlp:7s} d'={hidden:2d} {stage} fwd{fwd_cfg} bwd{bwd_cfg}: "
              f"fwd {t_fwd:7.3f} ms  bwd {t_fb - t_fwd:7.3f} ms", flush=True)
        return t_fwd, t_fb - t_fwd

    cands = CANDIDATES[(mlp, hidden <= 4)]
    fwd_times = {c: run(c, cands[0], "fwd")[0] for c in cands}
    best_fwd = min(fwd_times, key=fwd_times.get)
    bwd_times = {c: run(best_fwd, c, "bwd")[1] for c in cands}
    best_bwd = min(bwd_times, key=bwd_times.get)
    best = (fwd_times[best_fwd] + bwd_times[best_bwd], launch_kwargs(best_fwd, best_bwd))
    print(f"[tune] {mlp} d'={hidden}: best {best[1]} ({best[0]:.3f} ms fwd+bwd)")
    return best[1], rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=positive_int, nargs="+", default=[1024, 2048, 4096, 8192])
    ap.add_argument("--hidden", type=positive_int, nargs="+", default=[2, 16], help="d' (= MLP hidden size)")
    ap.add_argument("--mlp", nargs="+", default=["paper", "authors"], choices=["paper", "authors"])
    ap.add_argument("--heads", type=positive_int, default=12)
    ap.add_argument("--head-dim", type=positive_int, default=64)
    ap.add_argument("--tokens", type=positive_int, default=16384, help="batch = tokens // n")
    ap.add_argument("--no-causal", action="store_true")
    ap.add_argument("--repeats", type=positive_int, default=10)
    ap.add_argument("--warmup", type=non_negative_int, default=2)
    ap.add_argument("--skip-check", action="store_true")
    ap.add_argument("--check-only", action="store_true")
    ap.add_argument("--tune-repeats", type=positive_int, default=5)
    ap.add_argument("--position-bias", action="store_true",
                    help="add a learned (1, heads, n, n) bf16 score bias (T5's) to every kernel; SDPA takes it as its "
                         "attn_mask on the memory-efficient path (kind sdpa_bias; flash takes no mask)")
    ap.add_argument("--softcap", type=float, default=None,
                    help="Gemma 2's logit soft-cap (50) in every neural kernel (SDPA flash has none: still the floor)")
    ap.add_argument("--sinks", action="store_true",
                    help="learned per-head attention sinks (gpt-oss) in every neural kernel (flash has none)")
    ap.add_argument("--tune", action="store_true",
                    help="time the candidate block sizes first (n = 4096) and sweep with the best per (MLP, d')")
    ap.add_argument("--csv", default=str(Path(os.environ.get("OUT", ".")) / "bench_triton_gpu.csv"))
    args = ap.parse_args()
    if args.softcap is not None and not (math.isfinite(args.softcap) and args.softcap > 0):
        ap.error(f"--softcap must be a positive number (Gemma 2 uses 50); got {args.softcap}")

    if not torch.cuda.is_available():
        print("bench_triton_gpu.py needs a CUDA GPU (torch.cuda.is_available() is False); nothing to do.")
        return 2
    os.environ.pop("TRITON_INTERPRET", None)
    from hf_neural_attention.triton_neural_attention import TRITON_AVAILABLE, neural_attention_triton

    if not TRITON_AVAILABLE:
        print("bench_triton_gpu.py needs the `triton` package.")
        return 2
    import triton

    triton_version = triton.__version__
    print(f"# device: {torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton_version}")

    t0 = time.time()
    ok = True
    if not args.skip_check:
        ok = correctness_check(neural_attention_triton)
        print(f"[check] {'ALL PASS' if ok else 'FAILURES'} ({time.time() - t0:.1f}s)")
        if args.check_only:
            return 0 if ok else 1

    causal = not args.no_causal
    launches: dict[tuple[str, int], dict] = {}
    if args.tune:
        tune_rows = []
        for mlp in [*args.mlp, *(["paper_half"] if "paper" in args.mlp else [])]:
            for hidden in args.hidden:
                launch, trows = tune(neural_attention_triton, mlp, hidden, 4096, max(1, args.tokens // 4096),
                                     args.heads, args.head_dim, causal, args.tune_repeats, 1)
                tune_rows += trows
                launches[(mlp, hidden)] = launch
        if not tune_rows:
            print("[tune] every candidate failed; nothing to sweep")
            return 1
        tune_csv = Path(args.csv).with_name(Path(args.csv).stem + "_tune.csv")
        with open(tune_csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(tune_rows[0]))
            writer.writeheader()
            writer.writerows(tune_rows)
        print(f"[tune] done ({time.time() - t0:.0f}s); {tune_csv}")
        if not args.skip_check:  # the chosen launches are correct too
            for (mlp, hidden), launch in launches.items():
                ok &= launch_check(neural_attention_triton, mlp, hidden, launch)

    rows = []
    for n in args.lengths:
        batch = max(1, args.tokens // n)
        kinds = [f"neural_{m}" for m in args.mlp] + (["neural_paper_half"] if "paper" in args.mlp else [])
        cases = [("sdpa_bias" if args.position_bias else "sdpa_flash", 0)]
        cases += [(kind, h) for kind in kinds for h in args.hidden]
        for kind, hidden in cases:
            try:
                t_fwd, t_fb, mem = bench_case(
                    kind,
                    n,
                    batch,
                    args.heads,
                    args.head_dim,
                    hidden,
                    causal,
                    args.repeats,
                    args.warmup,
                    neural_attention_triton,
                    launches.get((kind.removeprefix("neural_"), hidden)),
                    args.position_bias,
                    args.softcap,
                    args.sinks,
                )
                err = ""
            except torch.OutOfMemoryError as e:  # keep going: report the row
                t_fwd = t_fb = mem = float("nan")
                err = f"OOM: {str(e).splitlines()[0][:80]}"
                torch.cuda.empty_cache()
            except Exception as e:  # noqa: BLE001  (one kernel failing must not cost the other rows)
                t_fwd = t_fb = mem = float("nan")
                err = f"{type(e).__name__}: {str(e).splitlines()[0][:80]}"
                ok = False
            launch = launches.get((kind.removeprefix("neural_"), hidden), {})
            if kind.endswith("_half"):
                launch = half_launch(launch)
            row = dict(
                kind=kind,
                n=n,
                batch=batch,
                heads=args.heads,
                head_dim=args.head_dim,
                hidden=hidden,
                causal=causal,
                position_bias=args.position_bias,
                softcap=args.softcap,
                sinks=args.sinks,
                fwd_ms=round(t_fwd, 3),
                fwd_bwd_ms=round(t_fb, 3),
                peak_mem_mib=round(mem, 1),
                launch=" ".join(f"{k}={v}" for k, v in launch.items()),
                device=torch.cuda.get_device_name(),
                torch=torch.__version__,
                triton=triton_version,
                note=err,
            )
            rows.append(row)
            print(
                f"[bench] {kind:16s} n={n:5d} b={batch:3d} d'={hidden:2d} fwd {t_fwd:8.2f} ms  "
                f"fwd+bwd {t_fb:8.2f} ms  peak {mem:8.1f} MiB {err}",
                flush=True,
            )

    Path(args.csv).parent.mkdir(parents=True, exist_ok=True)
    with open(args.csv, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)

    floor = "sdpa_bias" if args.position_bias else "sdpa_flash"
    flash = {r["n"]: r for r in rows if r["kind"] == floor}
    against = "SDPA memory-efficient with the bias as attn_mask" if args.position_bias else "SDPA flash"
    print(
        f"\n### Neural Attention (Triton) vs {against}, bf16, {args.heads}x{args.head_dim}, "
        f"{'causal' if causal else 'full'}, {args.tokens} tokens/step ({torch.cuda.get_device_name()})\n"
    )
    print(f"| kernel | d' | n | batch | fwd ms | fwd+bwd ms | x {floor} (fwd+bwd) | peak MiB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        ratio = r["fwd_bwd_ms"] / flash[r["n"]]["fwd_bwd_ms"] if r["n"] in flash else float("nan")
        hid = "-" if r["kind"] == floor else r["hidden"]
        print(
            f"| {r['kind']} | {hid} | {r['n']} | {r['batch']} | {r['fwd_ms']:.2f} | {r['fwd_bwd_ms']:.2f} | "
            f"{ratio:.1f} | {r['peak_mem_mib']:.0f} |"
        )
    print(f"\nCSV: {args.csv}   total {time.time() - t0:.0f}s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
