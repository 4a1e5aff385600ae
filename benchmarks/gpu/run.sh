#!/usr/bin/env bash
# One GPU check in one go: the CUDA tests (among them: opcheck of the Triton path, a decode step
# with prebuilt metadata captured in a CUDA graph, grouped-op gradients, the vLLM wrapper), the
# native build on CUDA (arch from the device), the kernel benchmarks and the whole-pass
# benchmark, then a table in $OUT/summary.md.  Prepared and tried on the CPU; run on the lent GPU with
#   bash benchmarks/gpu/run.sh            (OUT defaults to benchmarks/results/gpu-<date>)
# after `bash benchmarks/gpu/prepare_wheels.sh` here (carry benchmarks/gpu/wheels).
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-benchmarks/results/gpu-$(date +%F)}
mkdir -p "$OUT"
if [ -d benchmarks/gpu/wheels ]; then
  python3 -m pip install --quiet --no-index --find-links benchmarks/gpu/wheels --no-deps \
    benchmarks/gpu/wheels/*.whl 2>&1 | tail -2
fi
python3 -m pip install --quiet --no-deps --no-build-isolation -e . 2>&1 | tail -2
{
  date -u +"date: %F %T UTC"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null \
    || echo "no nvidia-smi"
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
} > "$OUT/machine.txt"
cat "$OUT/machine.txt"

step() {  # name, timeout seconds, command...
  local name=$1 limit=$2; shift 2
  echo "== $name"
  timeout "$limit" "$@" > "$OUT/$name.txt" 2>&1
  local rc=$?
  tail -n 25 "$OUT/$name.txt"
  echo "$name rc=$rc" >> "$OUT/steps.txt"
}

step native_build 240 python3 -c "from slora.kernels import _native as n; \
import sys; e = n.extension(); print('native extension:', e); sys.exit(e is None)"
step cuda_tests 240 python3 -m pytest -q -x -m cuda tests/ -p no:cacheprovider
step kernel_benchmarks 240 python3 -m pytest -q benchmarks/bench_*.py --benchmark-only \
  --benchmark-json="$OUT/benchmarks.json" -p no:cacheprovider
step slora_bench 120 python3 -m slora.cli bench --out "$OUT"
# the vLLM wrapper's CUDA path without vLLM (its tests ran with -m cuda above): one decode step
# at true ranks vs padded to 64, against the bytes floor
step vllm_wrapper_bench 120 python3 benchmarks/bench_vllm_wrapper.py --device cuda \
  --json "$OUT/vllm_wrapper.json"
python3 benchmarks/gpu/summarize.py "$OUT" > "$OUT/summary.md" 2>&1
cat "$OUT/summary.md"
