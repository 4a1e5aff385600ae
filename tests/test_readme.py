"""The README works as written: its Python blocks run as they are, and every command it shows
is run by CI or by a test (listed here, so that a new command cannot be added untested)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()

# every command line the README shows -> what runs it
COVERED = {
    "bash scripts/install.sh && slora demo": ".ci/run block 2 (marker ci:main-command)",
    "bash scripts/install.sh test && python3 -m pytest -q -rs": ".ci/run block 1 (ci:test-command)",
    "bash scripts/install_vllm_venv.sh": "scripts/install.sh test (CI block 1)",
    ".venv-vllm/bin/vllm serve MODEL --enable-lora --max-lora-rank 64 --lora-modules "
    "mine=ADAPTER_DIR": "tests/test_vllm_server.py",
}


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def test_every_command_is_run_by_ci_or_a_test():
    shown = {
        line.split("  #")[0].strip()
        for block in _blocks("bash")
        for line in block.splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert shown == set(COVERED), f"commands without a test: {sorted(shown - set(COVERED))}"
    for marker in ("ci:main-command", "ci:test-command"):
        assert f"<!-- {marker} -->\n```bash\n" in README, marker


def test_readme_is_short_and_names_the_pip_package_first():
    lines = README.splitlines()
    assert len(lines) <= 160
    first = next(i for i, line in enumerate(lines) if "sensitivity-lora" in line)
    assert first < 5


def test_the_library_block_runs(tmp_path, monkeypatch):
    from slora import embedded

    try:
        embedded.model_path()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    block = next(b for b in _blocks("python") if "slora.analyze" in b)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(block, "README.md (library)", "exec"), namespace)  # noqa: S102
    assert (tmp_path / "my-adapter" / "adapter_config.json").exists()
    assert (tmp_path / "my-adapter" / "adapter_model.safetensors").exists()
    assert sum(namespace["plan"].ranks.values()) == 4 * len(namespace["plan"].ranks)


def test_the_kernel_block_runs_and_its_two_calls_agree():
    block = next(b for b in _blocks("python") if "multi_lora" in b)
    namespace: dict = {}
    exec(compile(block, "README.md (kernels)", "exec"), namespace)  # noqa: S102
    delta, y = namespace["delta"], namespace["y"]
    expected = torch.zeros(5, 32, dtype=torch.float64)
    adapters = [(namespace["A0"], namespace["B0"], 0.5), (namespace["A1"], namespace["B1"], 1.0)]
    for t, k in enumerate(namespace["token_slots"].tolist()):
        if k >= 0:
            A, B, s = adapters[k]
            expected[t] = s * (B.double() @ (A.double() @ namespace["x"][t].double()))
    torch.testing.assert_close(delta.double(), expected, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(y, delta, rtol=1e-6, atol=1e-6)
