#!/usr/bin/env bash
# One GPU check in one go, sized for one lent GPU command (10 min; it takes at most 7.5):
#   bash benchmarks/gpu/run.sh [--dry-run]      (OUT defaults to benchmarks/results/gpu-<date>)
# Steps, each under its own `timeout` (limits add up to 440 s) and none stopping the others:
#   cuda_tests     every `-m cuda` test (junit XML: names of failures), 200 s
#   kernel_bench   decode/prefill kernels vs the padded-gather (vLLM) and per-adapter-loop
#                  baselines, % of the HBM bytes floor (benchmarks/gpu/kernel_bench.py), 90 s
#   vllm_wrapper   the vLLM wrapper's decode step at true ranks vs padded to 64, 40 s
#   sensitivity    the sensitivity pass vs a plain backward on a Llama built from a config
#                  in-process (benchmarks/gpu/sensitivity_config.py), 90 s
#   summary        summary.md + summary.json (benchmarks/gpu/summarize.py), 20 s
# $OUT receives three files: summary.md, summary.json and log.txt (every step's output);
# intermediates go to a temporary folder.  The GPU machine has every package this needs
# (torch, triton, transformers, pytest): nothing is installed, slora runs from this tree, and
# the CPU-only native ops are not built (SLORA_NO_NATIVE=1).  --dry-run runs the same driver on
# the CPU with tiny shapes, the CUDA tests skipped (tests/test_gpu_script.py runs it).
set -uo pipefail
cd "$(dirname "$0")/../.."
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
OUT=${OUT:-benchmarks/results/gpu-$(date +%F)}
mkdir -p "$OUT"
WORK=$(mktemp -d)
LOG="$OUT/log.txt"
: > "$LOG"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 SLORA_NO_NATIVE=1
if [ "$DRY" = 1 ]; then
  export CUDA_VISIBLE_DEVICES=""
  DEV=cpu; DRYARG=(--dry-run); TESTS=(tests/ops/test_multi_lora_guards.py); REPEATS=2
else
  DEV=cuda; DRYARG=(); TESTS=(tests/); REPEATS=5
fi
echo -e "dry_run\t$DRY" > "$WORK/steps.tsv"

step() {  # name, timeout seconds, command...: output to the log, status to steps.tsv
  local name=$1 limit=$2; shift 2
  local start=$SECONDS
  echo "== $name (limit ${limit}s)" | tee -a "$LOG"
  timeout -k 5 "$limit" "$@" >> "$LOG" 2>&1
  local rc=$?
  echo -e "$name\t$rc\t$((SECONDS - start))\t$limit" >> "$WORK/steps.tsv"
  echo "   rc=$rc in $((SECONDS - start)) s" | tee -a "$LOG"
}

step cuda_tests 200 python3 -m pytest -q -rA -m cuda -p no:cacheprovider \
  --junitxml="$WORK/junit.xml" "${TESTS[@]}"
step kernel_bench 90 python3 benchmarks/gpu/kernel_bench.py --device "$DEV" \
  --json "$WORK/kernels.json" "${DRYARG[@]}"
if [ "$DRY" = 1 ]; then
  step vllm_wrapper 40 python3 benchmarks/bench_vllm_wrapper.py --device cpu --tokens 8 \
    --iters 3 --json "$WORK/vllm_wrapper.json"
else
  step vllm_wrapper 40 python3 benchmarks/bench_vllm_wrapper.py --device cuda \
    --json "$WORK/vllm_wrapper.json"
fi
step sensitivity 90 python3 benchmarks/gpu/sensitivity_config.py --device "$DEV" \
  --repeats "$REPEATS" --json "$WORK/sensitivity.json" "${DRYARG[@]}"
step summary 20 python3 benchmarks/gpu/summarize.py "$WORK" "$OUT"
cat "$OUT/summary.md" 2>/dev/null || echo "no summary: see $LOG"
rm -rf "$WORK"
