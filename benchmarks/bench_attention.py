"""One attention layer on CPU: neural attention backends against torch SDPA and the authors' formulation.

End to end from ``(q, k, v)`` (batch, heads, n, head_dim) to the attention output, one layer, GPT-2-small head
shapes by default (12 heads of 64):

- ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention`` on the unprojected q, k (the floor);
- ``eager``: the authors' formulation re-implemented from their description: project ``q' = q P_q``,
  ``k' = k P_k`` (head_dim -> d'), concatenate every pair ``[q'_i; k'_j]`` into a ``(b, h, n, n, 2d')`` tensor and
  run ``Linear(2d'->d') - ReLU - Linear(d'->d'/2) - ReLU - Linear(d'/2->1)`` on it, softmax, ``@ v``; autograd
  keeps everything;
- ``tiled`` / ``cpp``: ``neural_attention_tiled`` / ``neural_attention_cpp`` with ``mlp="paper"``, relu,
  hidden = d'; the projections and the split first layer (``A = q' W_q + b``, ``B = k' W_k``) are computed inside
  the timed region;
- ``fused-cpp``: ``neural_attention_fused_cpp`` (forward and backward entirely in C++), same inputs as ``cpp``;
- ``cpp-authors``: ``neural_attention_cpp`` with ``mlp="authors"`` on the very weights ``eager`` uses (the first
  ``Linear`` split into its query and key halves; the last layer's bias, which softmax ignores, dropped): the same
  function as ``eager``, fused.

``--position-bias`` adds a learned per-head score bias ``(1, heads, n, n)`` (T5's relative position bias) to every
variant: SDPA's float ``attn_mask``, the authors' scores, the kernels' ``score_bias`` (every fused kernel adds it to
its scores); its gradient is part of forward+backward. ``--softcap CAP`` (Gemma 2's logit soft-capping) and
``--sinks`` (gpt-oss' learned per-head attention sinks) add them to the authors' formulation and the kernels; SDPA has
neither and runs without them (still the floor).

Timing: threads pinned, every variant runs once per repetition in turn (interleaved), median / p20 / p80.
Peak extra memory: each (variant, config) runs once in a fresh subprocess, reporting the peak resident set
during one call minus the resident set before it (inputs already allocated; Linux ``VmHWM`` reset through
``/proc/self/clear_refs``, elsewhere the growth of ``ru_maxrss``). Configs whose predicted memory for ``eager`` exceeds
``--eager-cap-gb`` are skipped for that backend and marked ``skipped (>N GB predicted)``, N the cap.

    python benchmarks/bench_attention.py --quick
    python benchmarks/bench_attention.py --seq-lens 128 256 512 1024 2048 4096 --dims 2 8 16 --batches 1 4
    python benchmarks/bench_attention.py --quick --position-bias --backends sdpa tiled fused-cpp eager
    python benchmarks/bench_attention.py --quick --softcap 50 --sinks
"""

from __future__ import annotations

import argparse
import csv
import importlib
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_args import positive_int  # noqa: E402
from peak_memory import peak_extra_mb  # noqa: E402


def _load_kernel_files():
    """The CPU kernel files, imported as a bare package: the ``hf_neural_attention`` ``__init__`` imports
    transformers, which costs 5-10 s in every memory-probe subprocess (the files need only torch and each other)."""
    package = types.ModuleType("_neural_attention_kernels")
    package.__path__ = [str(ROOT / "hf_neural_attention")]
    sys.modules[package.__name__] = package
    tiled = importlib.import_module(f"{package.__name__}.tiled_neural_attention")
    cpp = importlib.import_module(f"{package.__name__}.cpp_neural_attention")
    fused = importlib.import_module(f"{package.__name__}.fused_cpp_neural_attention")
    return tiled, cpp, fused


_tiled, _cpp, _fused = _load_kernel_files()
cpp_available, neural_attention_cpp = _cpp.cpp_available, _cpp.neural_attention_cpp
neural_attention_tiled = _tiled.neural_attention_tiled
neural_attention_fused_cpp = _fused.neural_attention_fused_cpp

BACKENDS = ("sdpa", "tiled", "cpp", "fused-cpp", "cpp-authors", "eager")
DROPOUT_P = 0.0  # attention dropout of every variant (--dropout); a fixed seed for the fused ones
DTYPE = torch.float32  # of q, k, v and the projection / MLP weights (--dtype)
POSITION_BIAS = False  # a learned (1, heads, n, n) score bias in every variant (--position-bias)
SOFTCAP = None  # Gemma 2's logit soft-cap in every neural variant (--softcap)
SINKS = False  # learned per-head attention sinks (1, heads, 1, 1) in every neural variant (--sinks)
CPP_BACKENDS = ("cpp", "fused-cpp", "cpp-authors")


# ---------------------------------------------------------------------------------------------------------------
# the variants
# ---------------------------------------------------------------------------------------------------------------
def make_problem(batch: int, heads: int, n: int, head_dim: int, d: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(DTYPE).requires_grad_()

    qkv = [rnd(batch, heads, n, head_dim) for _ in range(3)]
    hidden, hidden2 = d, max(d // 2, 1)
    s = 1.0 / math.sqrt(head_dim)
    weights = {
        # projections head_dim -> d' (shared by all heads, as in the authors' code)
        "Pq": rnd(head_dim, d, scale=s),
        "cq": rnd(d, scale=0.1),
        "Pk": rnd(head_dim, d, scale=s),
        "ck": rnd(d, scale=0.1),
        # paper MLP, per head: W_h = [W_q | W_k] (hidden, 2d'), b_h, w_a
        "Wq": rnd(heads, hidden, d, scale=1 / math.sqrt(2 * d)),
        "Wk": rnd(heads, hidden, d, scale=1 / math.sqrt(2 * d)),
        "bh": rnd(heads, hidden, scale=0.1),
        "wa": rnd(heads, hidden, scale=1 / math.sqrt(hidden)),
        # authors' MLP (shared): Linear(2d'->d'), Linear(d'->d'/2), Linear(d'/2->1)
        "L1": torch.nn.Linear(2 * d, d, dtype=DTYPE),
        "L2": torch.nn.Linear(d, hidden2, dtype=DTYPE),
        "L3": torch.nn.Linear(hidden2, 1, dtype=DTYPE),
    }
    weights["bias"] = rnd(1, heads, n, n) if POSITION_BIAS else None
    weights["sinks"] = rnd(1, heads, 1, 1) if SINKS else None
    return qkv, weights


def neural_fused(fn, qkv, wt, causal):
    q, k, v = qkv
    qp = q @ wt["Pq"] + wt["cq"]  # (b, h, n, d')
    kp = k @ wt["Pk"] + wt["ck"]
    A = torch.einsum("bhnd,hmd->bhnm", qp, wt["Wq"]) + wt["bh"][None, :, None, :]
    B = torch.einsum("bhnd,hmd->bhnm", kp, wt["Wk"])
    return fn(A, B, v, wt["wa"], causal=causal, dropout_p=DROPOUT_P, generator_seed=0, score_bias=wt["bias"],
              softcap=SOFTCAP, sinks=wt["sinks"])


def authors_eager(qkv, wt, causal):
    q, k, v = qkv
    n = q.shape[2]
    qp = q @ wt["Pq"] + wt["cq"]
    kp = k @ wt["Pk"] + wt["ck"]
    pair = torch.cat(
        [qp[:, :, :, None, :].expand(-1, -1, -1, n, -1), kp[:, :, None, :, :].expand(-1, -1, n, -1, -1)], dim=-1
    )  # (b, h, n, n, 2d')
    score = wt["L3"](torch.relu(wt["L2"](torch.relu(wt["L1"](pair))))).squeeze(-1)
    if SOFTCAP is not None:
        score = SOFTCAP * torch.tanh(score / SOFTCAP)
    if wt["bias"] is not None:
        score = score + wt["bias"]
    if causal:
        score = score.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf"))
    if wt["sinks"] is None:
        probabilities = torch.softmax(score, dim=-1)
    else:  # one more logit per row, dropped after the softmax (gpt-oss' eager attention)
        column = wt["sinks"].to(score.dtype).expand(*score.shape[:-1], 1)
        probabilities = torch.softmax(torch.cat([score, column], dim=-1), dim=-1)[..., :-1]
    return torch.nn.functional.dropout(probabilities, DROPOUT_P) @ v


def authors_fused(qkv, wt, causal):
    q, k, v = qkv
    d = wt["Pq"].shape[1]
    qp = q @ wt["Pq"] + wt["cq"]
    kp = k @ wt["Pk"] + wt["ck"]
    W1 = wt["L1"].weight  # (d', 2d') acting on [q'; k']
    A = torch.nn.functional.linear(qp, W1[:, :d], wt["L1"].bias)
    B = torch.nn.functional.linear(kp, W1[:, d:])
    W2, b2, w3 = wt["L2"].weight[None], wt["L2"].bias[None], wt["L3"].weight  # shared by all heads
    return neural_attention_cpp(A, B, v, w3, W2, b2, causal=causal, dropout_p=DROPOUT_P, generator_seed=0,
                                score_bias=wt["bias"], softcap=SOFTCAP, sinks=wt["sinks"])


def sdpa(qkv, wt, causal):
    q, k, v = qkv
    bias = wt["bias"]
    if bias is None:
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal, dropout_p=DROPOUT_P)
    if causal:  # SDPA takes is_causal or a mask, not both
        n = q.shape[2]
        bias = bias.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf"))
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), dropout_p=DROPOUT_P)


def variant(backend: str):
    if backend == "sdpa":
        return sdpa
    if backend == "eager":
        return authors_eager
    if backend == "cpp-authors":
        return authors_fused
    fn = {"tiled": neural_attention_tiled, "fused-cpp": neural_attention_fused_cpp}.get(backend, neural_attention_cpp)
    return lambda qkv, wt, causal: neural_fused(fn, qkv, wt, causal)


def step(backend, qkv, wt, causal, mode):
    fn = variant(backend)
    if mode == "forward":
        with torch.no_grad():
            fn(qkv, wt, causal)
        return
    for t in qkv:
        t.grad = None
    out = fn(qkv, wt, causal)
    out.sum().backward()


def eager_bytes(batch, heads, n, d):
    """Predicted peak of the authors' formulation, forward+backward: the pair tensor and the activations kept for
    autograd (2d' + d' + d' + d'/2 + d'/2 + ~4 per pair, fp32), their gradients in backward (x ~1.5)."""
    per_pair = 2 * d + 2 * d + 2 * max(d // 2, 1) + 4
    return int(batch * heads * n * n * per_pair * 4 * 1.5)


# ---------------------------------------------------------------------------------------------------------------
# memory probe: one call in a fresh process
# ---------------------------------------------------------------------------------------------------------------
def memory_probe(args) -> None:
    torch.set_num_threads(args.threads)
    if args.probe in CPP_BACKENDS:
        cpp_available()
        _fused.fused_cpp_available()
    qkv, wt = make_problem(args.batch, args.heads, args.seq_len, args.head_dim, args.dim)
    with peak_extra_mb() as peak:
        step(args.probe, qkv, wt, not args.bidirectional, args.mode)
    print(json.dumps({"peak_extra_mb": peak[0]}))


def measure_memory(backend, cfg, args) -> float | None:
    cmd = [
        sys.executable, __file__, "--probe", backend, "--threads", str(args.threads), "--heads", str(args.heads),
        "--head-dim", str(args.head_dim), "--seq-len", str(cfg["n"]), "--dim", str(cfg["d"]),
        "--batch", str(cfg["batch"]), "--mode", cfg["mode"], "--dropout", str(DROPOUT_P),
        "--dtype", str(DTYPE).removeprefix("torch."),
    ]  # fmt: skip
    if args.bidirectional:
        cmd.append("--bidirectional")
    if args.position_bias:
        cmd.append("--position-bias")
    if args.softcap is not None:
        cmd += ["--softcap", str(args.softcap)]
    if args.sinks:
        cmd.append("--sinks")
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800, check=True)
        return json.loads(res.stdout.strip().splitlines()[-1])["peak_extra_mb"]
    except (subprocess.SubprocessError, ValueError, IndexError) as error:
        print(f"memory probe failed for {backend} {cfg}: {error}", file=sys.stderr)
        return None


# ---------------------------------------------------------------------------------------------------------------
# the sweep
# ---------------------------------------------------------------------------------------------------------------
def percentile(values, q):
    values = sorted(values)
    pos = (len(values) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return values[lo] + (values[hi] - values[lo]) * (pos - lo)


def run_sweep(args):
    torch.set_num_threads(args.threads)
    backends = [b for b in args.backends if b not in CPP_BACKENDS or cpp_available()]
    if "fused-cpp" in backends and not _fused.fused_cpp_available():
        backends.remove("fused-cpp")
    if set(args.backends) - set(backends):
        print("cpp backends not built (no compiler?): skipped", file=sys.stderr)
    rows = []
    causal = not args.bidirectional
    for mode in args.modes:
        for batch in args.batches:
            for n in args.seq_lens:
                for d in args.dims:
                    cfg = {"mode": mode, "batch": batch, "n": n, "d": d}
                    qkv, wt = make_problem(batch, args.heads, n, args.head_dim, d)
                    active, skipped = [], []
                    for b in backends:
                        if b == "eager" and eager_bytes(batch, args.heads, n, d) > args.eager_cap_gb * 2**30:
                            skipped.append(b)
                        else:  # SDPA does not depend on d' but reruns side by side with every config
                            active.append(b)
                    times = {b: [] for b in active}
                    for b in active:  # warm-up
                        step(b, qkv, wt, causal, mode)
                    for _ in range(args.reps):
                        for b in active:  # interleaved
                            start = time.perf_counter()
                            step(b, qkv, wt, causal, mode)
                            times[b].append(time.perf_counter() - start)
                    sdpa_med = statistics.median(times["sdpa"]) if "sdpa" in times else None
                    for b in active + skipped:
                        row = dict(cfg, backend=b, threads=args.threads, heads=args.heads, head_dim=args.head_dim,
                                   causal=causal)  # fmt: skip
                        if b in skipped:
                            row.update(status=f"skipped (>{args.eager_cap_gb:g} GB predicted)")
                        else:
                            ts = times[b]
                            med = statistics.median(ts)
                            row.update(
                                status="ok",
                                median_ms=med * 1e3,
                                p20_ms=percentile(ts, 0.2) * 1e3,
                                p80_ms=percentile(ts, 0.8) * 1e3,
                                x_sdpa=med / sdpa_med if sdpa_med else None,
                            )
                            if not args.no_memory:
                                row["peak_extra_mb"] = measure_memory(b, cfg, args)
                        rows.append(row)
                        print(format_row(row), flush=True)
                    del qkv, wt
    return rows


def format_row(r):
    if r["status"] != "ok":
        return f"{r['mode']:>16} b={r['batch']} n={r['n']:>5} d'={r['d']:>2} {r['backend']:>11}: {r['status']}"
    mem = r.get("peak_extra_mb")
    return (
        f"{r['mode']:>16} b={r['batch']} n={r['n']:>5} d'={r['d']:>2} {r['backend']:>11}: "
        f"{r['median_ms']:9.1f} ms [{r['p20_ms']:.1f}, {r['p80_ms']:.1f}]"
        + (f"  {r['x_sdpa']:.2f}x sdpa" if r.get("x_sdpa") else "")
        + (f"  {mem:.0f} MB" if mem is not None else "")
    )


def markdown(rows, env):
    lines = [
        f"Device: {env['cpu']}, {env['threads']} thread(s); torch {env['torch']}; {env['attention']}; "
        f"{env['heads']} heads of {env['head_dim']}, {env.get('dtype', 'float32')}, attention dropout "
        f"{env.get('dropout', 0.0)}" + (", a learned (1, heads, n, n) score bias" if env.get("position_bias") else "")
        + ".",
        "",
        "| mode | batch | n | d' | backend | median ms | p20-p80 ms | x SDPA | peak extra MB |",
        "|---|---:|---:|---:|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['mode']} | {r['batch']} | {r['n']} | {r['d']} | {r['backend']} | {r['status']} | | | |")
            continue
        mem = r.get("peak_extra_mb")
        ratio = "" if r["x_sdpa"] is None else f"{r['x_sdpa']:.2f}"  # no sdpa row in this run: no ratio
        lines.append(
            f"| {r['mode']} | {r['batch']} | {r['n']} | {r['d']} | {r['backend']} | {r['median_ms']:.1f} | "
            f"{r['p20_ms']:.1f}-{r['p80_ms']:.1f} | {ratio} | {'' if mem is None else f'{mem:.0f}'} |"
        )
    return "\n".join(lines)


def plots(rows, out_dir: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r["status"] == "ok"]
    metrics = (("median_ms", "time (ms)", "time"), ("peak_extra_mb", "peak extra memory (MB)", "memory"))
    for metric, label, fname in metrics:
        for mode in sorted({r["mode"] for r in ok}):
            for batch in sorted({r["batch"] for r in ok}):
                sel = [r for r in ok if r["mode"] == mode and r["batch"] == batch and r.get(metric) is not None]
                if not sel:
                    continue
                dims = sorted({r["d"] for r in sel})
                fig, axes = plt.subplots(1, len(dims), figsize=(4.5 * len(dims), 3.8), squeeze=False)
                for ax, d in zip(axes[0], dims, strict=True):
                    for backend in BACKENDS:
                        pts = sorted((r["n"], r[metric]) for r in sel if r["d"] == d and r["backend"] == backend)
                        if pts:
                            ax.plot(*zip(*pts, strict=True), marker="o", label=backend)
                    ax.set_xscale("log", base=2)
                    ax.set_yscale("log")
                    ax.set_title(f"{mode}, batch {batch}, d'={d}")
                    ax.set_xlabel("sequence length n")
                    ax.set_ylabel(label)
                    ax.grid(True, which="both", alpha=0.3)
                    ax.legend()
                fig.tight_layout()
                fig.savefig(out_dir / f"{fname}_{mode}_b{batch}.png", dpi=110)
                plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="n in {256, 1024}, d' in {2, 16}, forward+backward, 3 reps")
    p.add_argument("--seq-lens", type=positive_int, nargs="+", default=None, help="default: 128 256 512 1024 2048 4096")
    p.add_argument("--dims", type=positive_int, nargs="+", default=None, help="d' (hidden = d'); default: 2 8 16")
    p.add_argument("--batches", type=positive_int, nargs="+", default=None, help="default: 1")
    modes = ["forward", "forward+backward"]
    p.add_argument("--modes", nargs="+", default=None, choices=modes, help="default: both")
    p.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=BACKENDS)
    p.add_argument("--heads", type=positive_int, default=12)
    p.add_argument("--head-dim", type=positive_int, default=64)
    p.add_argument("--threads", type=positive_int, default=2)
    p.add_argument("--reps", type=positive_int, default=None, help="default: 7 (3 with --quick)")
    p.add_argument("--bidirectional", action="store_true", help="no causal mask (default: causal, GPT-2)")
    p.add_argument("--dropout", type=float, default=0.0, help="attention dropout probability of every variant")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="inputs and weights")
    p.add_argument("--position-bias", action="store_true",
                   help="a learned (1, heads, n, n) score bias in every variant (T5); writes to results/position_bias")
    p.add_argument("--softcap", type=float, default=None,
                   help="Gemma 2's logit soft-cap in the neural variants (Gemma 2: 50; SDPA runs without)")
    p.add_argument("--sinks", action="store_true",
                   help="learned per-head attention sinks (gpt-oss) in the neural variants (SDPA runs without)")
    p.add_argument("--eager-cap-gb", type=float, default=8.0, help="skip eager where predicted memory exceeds this")
    p.add_argument("--no-memory", action="store_true", help="skip the subprocess memory probes")
    p.add_argument("--output", type=Path, default=None,
                   help="default: benchmarks/results/ (benchmarks/results/quick/ with --quick)")
    # internal: memory probe
    p.add_argument("--probe", choices=BACKENDS, help=argparse.SUPPRESS)
    p.add_argument("--seq-len", type=int, help=argparse.SUPPRESS)
    p.add_argument("--dim", type=int, help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    p.add_argument("--mode", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if not 0.0 <= args.dropout < 1.0:
        p.error(f"--dropout must be in [0, 1); got {args.dropout}")
    if args.softcap is not None and not (math.isfinite(args.softcap) and args.softcap > 0):
        p.error(f"--softcap must be a positive number (Gemma 2 uses 50); got {args.softcap}")
    global DROPOUT_P, DTYPE, POSITION_BIAS, SOFTCAP, SINKS
    DROPOUT_P, DTYPE, POSITION_BIAS = args.dropout, getattr(torch, args.dtype), args.position_bias
    SOFTCAP, SINKS = args.softcap, args.sinks
    if args.probe:
        return memory_probe(args)
    # --quick fills in only what was not given (an explicit flag always wins), and writes apart from the kept results
    defaults = dict(seq_lens=[128, 256, 512, 1024, 2048, 4096], dims=[2, 8, 16], batches=[1], reps=7, modes=modes,
                    output=ROOT / "benchmarks" / "results")
    if args.quick:
        defaults.update(seq_lens=[256, 1024], dims=[2, 16], reps=3, modes=["forward+backward"],
                        output=ROOT / "benchmarks" / "results" / "quick")
    if args.position_bias:  # its own folder: the kept results are without a bias
        defaults["output"] = defaults["output"] / "position_bias"
    if args.softcap is not None or args.sinks:  # likewise
        defaults["output"] = defaults["output"] / "softcap_sinks"
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    torch.set_num_threads(args.threads)
    env = {
        "cpu": platform.processor() or platform.machine(),
        "threads": args.threads,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "attention": "causal" if not args.bidirectional else "bidirectional",
        "dropout": args.dropout,
        "dtype": args.dtype,
        "position_bias": args.position_bias,
        "softcap": args.softcap,
        "sinks": args.sinks,
        "heads": args.heads,
        "head_dim": args.head_dim,
        "cpp_built": cpp_available() if set(CPP_BACKENDS) & set(args.backends) else False,
    }
    try:
        with open("/proc/cpuinfo") as f:
            env["cpu"] = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    print(json.dumps(env))
    rows = run_sweep(args)
    args.output.mkdir(parents=True, exist_ok=True)
    fields = ["mode", "batch", "n", "d", "backend", "status", "median_ms", "p20_ms", "p80_ms", "x_sdpa",
              "peak_extra_mb", "threads", "heads", "head_dim", "causal"]  # fmt: skip
    with open(args.output / "bench_attention.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    table = markdown(rows, env)
    (args.output / "bench_attention.md").write_text(table + "\n")
    (args.output / "environment.json").write_text(json.dumps(env, indent=2) + "\n")
    plots(rows, args.output)
    print()
    print(table)


if __name__ == "__main__":
    main()
