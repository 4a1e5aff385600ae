#!/usr/bin/env bash
# On the CPU machine: download the small pure-Python wheels the GPU check needs into
# benchmarks/gpu/wheels/ (git-ignored), so that the GPU machine — which reaches no registry —
# can install them offline.  Pass the folder to the device tool's `carry`.
set -euo pipefail
cd "$(dirname "$0")"
rm -rf wheels && mkdir wheels
python3 -m pip download --quiet --no-deps -d wheels \
  peft safetensors pytest pytest-benchmark py-cpuinfo hypothesis sortedcontainers tqdm \
  accelerate psutil ninja pybind11 iniconfig pluggy
du -sh wheels
