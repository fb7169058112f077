"""End-to-end training throughput: a GPT-2-small-shaped model with neural attention in layer 0 against the same
model unpatched (SDPA everywhere), measured side by side.

Timing: both models live in one process and their training steps are interleaved, so machine noise hits both
alike; we report the median, p20 and p80 of the per-step time, and tokens/s from the median. Memory: each variant
runs once more in a fresh subprocess that reports the peak resident-set growth (``peak_memory.py``) over two
training steps (activations, gradients, optimizer state), from just after the model was built.

    python benchmarks/bench_end_to_end.py --quick          # a few minutes on 2 CPU cores
    python benchmarks/bench_end_to_end.py --seq-len 1024 --batch 4 --steps 10
    python benchmarks/bench_end_to_end.py --device cuda --bf16 --batch 16 --steps 20   # GPU: Triton kernel

On CUDA, peak memory is ``torch.cuda.max_memory_allocated`` over two training steps, in the same process, above
what was allocated before them.
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import transformers
from transformers import GPT2Config, GPT2LMHeadModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from hf_neural_attention import NeuralAttentionConfig, patch_model  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_args import check_device, positive_int  # noqa: E402
from peak_memory import peak_extra_mb  # noqa: E402

VARIANTS = ("sdpa", "neural_d2", "neural_d8", "neural_d16")
FP16_MLP_VARIANTS = ("neural_d8_fp16", "neural_d16_fp16")
"""mlp_precision="fp16": the Triton kernel's packed fp16 MLP (on CPU the same as without the suffix)."""


def gpt2_small(seq_len: int, layers: int) -> GPT2LMHeadModel:
    """GPT-2 small's shape (768 wide, 12 heads of 64, 50257-token vocabulary); dropout off for a fair timing."""
    config = GPT2Config(n_layer=layers, n_positions=max(seq_len, 1024), attn_pdrop=0.0, resid_pdrop=0.0,
                        embd_pdrop=0.0)
    torch.manual_seed(0)
    return GPT2LMHeadModel(config).train()


def make_variant(base: GPT2LMHeadModel, variant: str, backend: str) -> GPT2LMHeadModel:
    model = copy.deepcopy(base)
    if variant != "sdpa":
        proj_dim, _, precision = variant.removeprefix("neural_d").partition("_")
        patch_model(model, layers=[0], config=NeuralAttentionConfig(proj_dim=int(proj_dim), backend=backend,
                                                                    mlp_precision=precision or "fp32"))
    return model


def train_step(model: GPT2LMHeadModel, optimizer: torch.optim.Optimizer, ids: torch.Tensor, bf16: bool = False
               ) -> float:
    """Seconds of one optimizer step (bf16: under bf16 autocast, fp32 master weights)."""
    cuda = ids.is_cuda
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=bf16):
        loss = model(ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def fill_defaults(args: argparse.Namespace, quick: dict, full: dict, name: str) -> None:
    """Sizes the user did not give: ``quick`` with ``--quick``, else ``full``; an explicit flag always wins. The
    output defaults to ``results/<name>.csv``, or ``results/quick/<name>.csv`` (not kept) so a quick run keeps the
    results."""
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.output is None:
        args.output = Path(__file__).parent / "results" / ("quick" if args.quick else "") / f"{name}.csv"


def report(rows: list[dict], output: Path, title: str, columns: dict[str, str]) -> None:
    """Write ``rows`` to the CSV ``output`` and print them as a markdown table (``columns``: header -> key)."""
    output.parent.mkdir(parents=True, exist_ok=True)
    with output.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(title)
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(str(row[key]) for key in columns.values()) + " |")
    print(f"wrote {output}")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def cuda_peak_mb(model: GPT2LMHeadModel, optimizer: torch.optim.Optimizer, ids: torch.Tensor, bf16: bool) -> float:
    """Peak CUDA memory (MB) of two training steps above what was allocated before them."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    for _ in range(2):
        train_step(model, optimizer, ids, bf16)
    return (torch.cuda.max_memory_allocated() - base) / 1e6


def measure_memory(args: argparse.Namespace, variant: str) -> float:
    """Peak extra RSS (MB) of one training step of ``variant``, in a fresh process."""
    command = [sys.executable, __file__, "--memory-probe", variant, "--seq-len", str(args.seq_len), "--batch",
               str(args.batch), "--layers", str(args.layers), "--threads", str(args.threads), "--backend",
               args.backend] + (["--bf16"] if args.bf16 else [])
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])["peak_extra_mb"]


def memory_probe(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    model = make_variant(gpt2_small(args.seq_len, args.layers), args.memory_probe, args.backend)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq_len))
    with peak_extra_mb() as peak:
        for _ in range(2):  # includes gradients and optimizer state, identical across variants but for the scorer
            train_step(model, optimizer, ids, args.bf16)
    print(json.dumps({"peak_extra_mb": peak[0]}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-len", type=positive_int, default=None, help="default: 1024 (512 with --quick)")
    parser.add_argument("--batch", type=positive_int, default=1)
    parser.add_argument("--layers", type=positive_int, default=None, help="default: 12 (4 with --quick)")
    parser.add_argument("--steps", type=positive_int, default=None, help="default: 8 (5 with --quick)")
    parser.add_argument("--threads", type=positive_int, default=2)
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS + FP16_MLP_VARIANTS)
    parser.add_argument("--quick", action="store_true", help="seq 512, 4 layers, 5 steps")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (fp32 master weights)")
    parser.add_argument("--output", type=Path, default=None,
                        help="default: results/end_to_end.csv (results/quick/end_to_end.csv with --quick)")
    parser.add_argument("--memory-probe", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    check_device(parser, args.device)
    if args.memory_probe:
        memory_probe(args)
        return
    fill_defaults(args, dict(seq_len=512, layers=4, steps=5), dict(seq_len=1024, layers=12, steps=8), "end_to_end")
    torch.set_num_threads(args.threads)

    base = gpt2_small(args.seq_len, args.layers)
    models = {v: make_variant(base, v, args.backend).to(args.device) for v in args.variants}
    optimizers = {v: torch.optim.AdamW(m.parameters(), lr=1e-4) for v, m in models.items()}
    ids = torch.randint(0, base.config.vocab_size, (args.batch, args.seq_len),
                        generator=torch.Generator().manual_seed(0)).to(args.device)
    cuda = ids.is_cuda
    times: dict[str, list[float]] = {v: [] for v in models}
    for step in range(args.steps + 1):  # step 0 warms up every variant
        for variant, model in models.items():
            elapsed = train_step(model, optimizers[variant], ids, args.bf16)
            if step:
                times[variant].append(elapsed)
    if cuda:
        device = f"{torch.cuda.get_device_name()}{' bf16 autocast' if args.bf16 else ' fp32'}"
    else:
        device = f"cpu ({platform.processor() or platform.machine()}, {args.threads} threads)"

    tokens = args.batch * args.seq_len
    baseline = statistics.median(times["sdpa"]) if "sdpa" in times else None
    rows = []
    for variant, samples in times.items():
        median = statistics.median(samples)
        rows.append({
            "variant": variant, "seq_len": args.seq_len, "batch": args.batch, "layers": args.layers,
            "median_s": round(median, 4), "p20_s": round(percentile(samples, 0.2), 4),
            "p80_s": round(percentile(samples, 0.8), 4), "tokens_per_s": round(tokens / median, 1),
            "throughput_vs_sdpa": round(baseline / median, 3) if baseline else "",
            "peak_extra_mb": round(cuda_peak_mb(models[variant], optimizers[variant], ids, args.bf16) if cuda
                                   else measure_memory(args, variant), 1),
            "device": device,
            "torch": torch.__version__, "transformers": transformers.__version__,
        })
    report(rows, args.output, f"GPT-2-small shape, {args.layers} layers, batch {args.batch} x {args.seq_len} tokens, "
           f"neural attention in layer 0 (backend={args.backend}), {args.steps} interleaved steps, {device}",
           {"variant": "variant", "median s/step": "median_s", "p20": "p20_s", "p80": "p80_s",
            "tokens/s": "tokens_per_s", "vs unpatched": "throughput_vs_sdpa", "peak extra MB": "peak_extra_mb"})

if __name__ == "__main__":
    main()
