"""``torch.compile`` of a patched model: does it match eager mode, and what does it buy?

A GPT-2-shaped model with neural attention in layer 0 and the same model unpatched (SDPA), each run eagerly and
compiled (inductor, ``fullgraph=True``). First the check: from the same weights, one training step of the compiled
model must give eager mode's loss and gradients (dropout off). Then the timing: every variant's training steps are
interleaved, medians / p20 / p80 per step after a warm-up step (compilation happens there and is reported apart).

    python benchmarks/bench_compile.py --quick                          # CPU, a few minutes (fused C++ kernel)
    python benchmarks/bench_compile.py --device cuda --bf16 --backend triton --seq-len 1024 --batch 16
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_args import check_device, positive_int  # noqa: E402
from bench_end_to_end import fill_defaults, gpt2_small, make_variant, percentile, report, train_step  # noqa: E402


def loss_and_grads(model: torch.nn.Module, ids: torch.Tensor, bf16: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One forward/backward from the model's current weights (no optimizer step)."""
    model.zero_grad(set_to_none=True)
    with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=bf16):
        loss = model(ids, labels=ids).loss
    loss.backward()
    return loss.detach().float(), [p.grad.detach().float().clone() for p in model.parameters() if p.grad is not None]


def worst_relative_gradient_gap(eager: list[torch.Tensor], compiled: list[torch.Tensor]) -> float:
    """max over tensors of ``max |g_c - g_e| / max |g_e|``."""
    return max(((c - e).abs().max() / e.abs().max().clamp_min(1e-30)).item()
               for e, c in zip(eager, compiled, strict=True))  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-len", type=positive_int, default=None, help="default: 1024 (256 with --quick)")
    parser.add_argument("--batch", type=positive_int, default=1)
    parser.add_argument("--layers", type=positive_int, default=None, help="default: 12 (2 with --quick)")
    parser.add_argument("--steps", type=positive_int, default=None, help="default: 6 (4 with --quick)")
    parser.add_argument("--threads", type=positive_int, default=2)
    parser.add_argument("--backend", default="auto", help="the neural layer's backend (auto, cpp, tiled, triton)")
    parser.add_argument("--proj-dim", type=positive_int, default=8)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (fp32 master weights)")
    parser.add_argument("--quick", action="store_true", help="seq 256, 2 layers, 4 steps")
    parser.add_argument("--output", type=Path, default=None,
                        help="default: results/compile.csv (results/quick/compile.csv with --quick)")
    args = parser.parse_args()
    check_device(parser, args.device)
    fill_defaults(args, dict(seq_len=256, layers=2, steps=4), dict(seq_len=1024, layers=12, steps=6), "compile")
    torch.set_num_threads(args.threads)

    base = gpt2_small(args.seq_len, args.layers)
    ids = torch.randint(0, base.config.vocab_size, (args.batch, args.seq_len),
                        generator=torch.Generator().manual_seed(0)).to(args.device)
    models, compile_s, checks = {}, {}, {}
    for arm in ("sdpa", f"neural_d{args.proj_dim}"):
        eager = make_variant(base, arm, args.backend).to(args.device)
        eager.loss_type = "ForCausalLM"  # else transformers logs a warning inside forward: a graph break
        compiled = torch.compile(copy.deepcopy(eager), fullgraph=True)
        start = time.perf_counter()
        compiled_loss, compiled_grads = loss_and_grads(compiled, ids, args.bf16)  # compiles forward and backward
        compile_s[arm] = time.perf_counter() - start
        eager_loss, eager_grads = loss_and_grads(eager, ids, args.bf16)
        checks[arm] = (abs(compiled_loss - eager_loss).item(), worst_relative_gradient_gap(eager_grads, compiled_grads))
        models[f"{arm}/eager"], models[f"{arm}/compiled"] = eager, compiled

    optimizers = {name: torch.optim.AdamW(model.parameters(), lr=1e-4) for name, model in models.items()}
    times: dict[str, list[float]] = {name: [] for name in models}
    for step in range(args.steps + 1):  # step 0 warms every variant up (the compiled ones recompile nothing)
        for name, model in models.items():
            elapsed = train_step(model, optimizers[name], ids, args.bf16)
            if step:
                times[name].append(elapsed)

    if ids.is_cuda:
        device = f"{torch.cuda.get_device_name()}{' bf16 autocast' if args.bf16 else ' fp32'}"
    else:
        device = f"cpu ({platform.processor() or platform.machine()}, {args.threads} threads)"
    tokens = args.batch * args.seq_len
    rows = []
    for name, samples in times.items():
        arm, mode = name.split("/")
        median = statistics.median(samples)
        eager_median = statistics.median(times[f"{arm}/eager"])
        loss_gap, grad_gap = checks[arm] if mode == "compiled" else ("", "")
        rows.append({
            "arm": arm, "mode": mode, "backend": args.backend if arm != "sdpa" else "sdpa", "seq_len": args.seq_len,
            "batch": args.batch, "layers": args.layers, "median_s": round(median, 4),
            "p20_s": round(percentile(samples, 0.2), 4), "p80_s": round(percentile(samples, 0.8), 4),
            "tokens_per_s": round(tokens / median, 1), "speedup_vs_eager": round(eager_median / median, 3),
            "compile_s": round(compile_s[arm], 1) if mode == "compiled" else "",
            "loss_gap": f"{loss_gap:.2e}" if loss_gap != "" else "",
            "grad_gap_rel": f"{grad_gap:.2e}" if grad_gap != "" else "",
            "device": device, "torch": torch.__version__, "transformers": transformers.__version__,
        })  # fmt: skip
    report(rows, args.output, f"GPT-2-small shape, {args.layers} layers, batch {args.batch} x {args.seq_len} tokens, "
           f"neural attention in layer 0 (d'={args.proj_dim}, backend={args.backend}), {args.steps} interleaved "
           f"steps, {device}",
           {"arm": "arm", "mode": "mode", "median s/step": "median_s", "p20": "p20_s", "p80": "p80_s",
            "tokens/s": "tokens_per_s", "vs eager": "speedup_vs_eager", "compile s": "compile_s",
            "loss gap": "loss_gap", "grad gap (rel)": "grad_gap_rel"})

if __name__ == "__main__":
    main()
