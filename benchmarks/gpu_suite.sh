#!/usr/bin/env bash
# Every GPU measurement of this repo in one run (a few minutes on an H100): the Triton kernel's correctness check,
# block-size tuning and sweep against SDPA's flash path (bench_triton_gpu.py), the same with a learned score bias
# against SDPA given it as attn_mask (--position-bias), with Gemma 2's soft-cap and gpt-oss' sinks (--softcap
# --sinks), the sweep at wide heads (16 x 128, 8 x 256), torch.compile
# with the Triton kernel (bench_compile.py), then GPT-2-small end to end (bench_end_to_end.py). Results go to $OUT
# (or ./gpu_results).
# Wheels in .whl/ (for instance the transformers version this repo is tested with) are installed into /tmp/site
# first, without touching the system packages.
#
#   bash benchmarks/gpu_suite.sh                        # everything
#   E2E_TIMEOUT=0 COMPILE_TIMEOUT=0 BIAS_TIMEOUT=0 WIDE_TIMEOUT=0 CAP_TIMEOUT=0 bash benchmarks/gpu_suite.sh --mlp authors
#                                     # the kernel only; arguments go to the first bench_triton_gpu.py
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_results}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# the device image's transformers (5.17 in 2026-11) is below pyproject's floor: then carry a wheel of a newer one in
# .whl/ (`pip download --no-deps -d .whl "transformers==5.24.0"`, `.whl/` in .git/info/exclude, run with carry .whl)
if ! python3 -c "import hf_neural_attention" 2>/tmp/import_error.txt; then
  tail -3 /tmp/import_error.txt
  python3 -c "import transformers; print('transformers', transformers.__version__, 'is installed')" 2>/dev/null || true
  echo "hf_neural_attention does not import here: put a wheel of transformers >= the floor in pyproject.toml into .whl/"
  exit 2
fi
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, \
'transformers', transformers.__version__, torch.cuda.get_device_name())"

status=0
timeout "${KERNEL_TIMEOUT:-360}" python3 benchmarks/bench_triton_gpu.py --tune --csv "$OUT/bench_triton_gpu.csv" "$@" \
  2>&1 | tee "$OUT/bench_triton_gpu.log" || status=1
if [ "${BIAS_TIMEOUT:-180}" != 0 ]; then  # a learned T5-style score bias: the kernel against SDPA given it as attn_mask
  timeout "${BIAS_TIMEOUT:-180}" python3 benchmarks/bench_triton_gpu.py --skip-check --position-bias --mlp paper \
    --lengths 1024 4096 --hidden 2 16 --csv "$OUT/bench_triton_gpu_bias.csv" 2>&1 | tee "$OUT/bench_triton_gpu_bias.log" \
    || status=1
fi
if [ "${CAP_TIMEOUT:-150}" != 0 ]; then  # Gemma 2's soft-cap and gpt-oss' sinks in the kernel; flash has neither
  timeout "${CAP_TIMEOUT:-150}" python3 benchmarks/bench_triton_gpu.py --skip-check --softcap 50 --sinks --mlp paper \
    --lengths 1024 4096 --hidden 2 16 --csv "$OUT/bench_triton_gpu_cap.csv" 2>&1 | tee "$OUT/bench_triton_gpu_cap.log" \
    || status=1
fi
if [ "${WIDE_TIMEOUT:-150}" != 0 ]; then  # wide heads (Llama's 128, Gemma 3's 256): their smaller default tiles
  for shape in "16 128" "8 256"; do
    read -r heads head_dim <<< "$shape"
    timeout "${WIDE_TIMEOUT:-150}" python3 benchmarks/bench_triton_gpu.py --skip-check --mlp paper --heads "$heads" \
      --head-dim "$head_dim" --lengths 2048 8192 --hidden 2 16 --csv "$OUT/bench_triton_gpu_head$head_dim.csv" 2>&1 \
      | tee "$OUT/bench_triton_gpu_head$head_dim.log" || status=1
  done
fi
if [ "${COMPILE_TIMEOUT:-150}" != 0 ]; then  # torch.compile(fullgraph) with the Triton kernel: matches eager? faster?
  timeout "${COMPILE_TIMEOUT:-150}" python3 benchmarks/bench_compile.py --device cuda --bf16 --backend triton \
    --seq-len 1024 --batch 8 --layers 4 --steps 6 --output "$OUT/compile_gpu.csv" 2>&1 | tee "$OUT/compile_gpu.log" \
    || status=1
fi
if [ "${E2E_TIMEOUT:-150}" != 0 ]; then
  timeout "${E2E_TIMEOUT:-150}" python3 benchmarks/bench_end_to_end.py --device cuda --bf16 --backend triton \
    --seq-len 1024 --batch 16 --steps 10 --variants sdpa neural_d2 neural_d8 neural_d16 neural_d16_fp16 \
    --output "$OUT/end_to_end_gpu.csv" 2>&1 | tee "$OUT/end_to_end_gpu.log" \
    || status=1
fi
exit $status
