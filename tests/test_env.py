"""``slora env`` / ``python -m slora env``: the bug-report summary."""

from __future__ import annotations

import importlib.metadata
import re
import subprocess
import sys

from slora import env
from slora.cli import main


def test_env_prints_versions_backends_and_native_state(capsys):
    assert main(["env"]) == 0
    out = capsys.readouterr().out
    for field in ("slora", "torch", "triton", "transformers", "peft", "CUDA device"):
        assert any(line.split("  ")[0].strip() == field for line in out.splitlines()), field
    assert re.search(r"native C\+\+ ops +slora_native_\w+: (cached|built now|disabled)", out)
    for op in ("input_stats", "grad_stats", "fisher_exact", "multi_lora"):
        assert f"op {op}" in out and "cpu: " in out


def test_env_says_not_installed_for_missing_optional_packages(monkeypatch):
    real = importlib.metadata.version

    def version(name):
        if name in ("triton", "transformers", "peft"):
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(importlib.metadata, "version", version)
    rows = dict(env.collect())
    assert rows["triton"] == rows["transformers"] == rows["peft"] == "not installed"
    assert rows["Triton kernels"] == "not installed"
    assert rows["torch"] == real("torch")


def test_python_dash_m_slora_runs_the_cli():
    done = subprocess.run(
        [sys.executable, "-m", "slora", "--help"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0
    assert all(cmd in done.stdout for cmd in ("demo", "analyze", "bench", "env"))
