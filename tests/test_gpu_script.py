"""benchmarks/gpu/run.sh, tried end to end on the CPU (``--dry-run``: the same driver, tiny
shapes, CUDA tests skipped), and its summariser on a failing and a timed-out step."""

from __future__ import annotations

import importlib.util
import json
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
STEPS = ["cuda_tests", "kernel_bench", "vllm_wrapper", "sensitivity"]


def _summarize():
    spec = importlib.util.spec_from_file_location("summarize", ROOT / "benchmarks/gpu/summarize.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_step_limits_fit_one_lent_gpu_command():
    """The steps' own timeouts add up to at most 450 s (a command may run 600 s)."""
    text = (ROOT / "benchmarks/gpu/run.sh").read_text()
    limits: dict[str, int] = {}
    for line in text.splitlines():
        if line.strip().startswith("step "):
            name, limit = line.split()[1:3]
            limits[name] = max(limits.get(name, 0), int(limit))
    assert list(limits) == [*STEPS, "summary"] and sum(limits.values()) <= 450, limits


def test_dry_run_writes_a_complete_summary(tmp_path):
    pytest.importorskip("transformers")
    proc = subprocess.run(["bash", str(ROOT / "benchmarks/gpu/run.sh"), "--dry-run"],
                          env={**__import__("os").environ, "OUT": str(tmp_path)},
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["log.txt", "summary.json", "summary.md"]
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["dry_run"] is True
    assert [r["name"] for r in s["steps"]] == STEPS
    assert all(r["status"] == "ok" for r in s["steps"]), s["steps"]
    assert s["tests"]["skipped"] >= 3 and s["tests"]["failed"] == 0  # the cuda tests
    rows = s["kernels"]["rows"]
    impls = {r["impl"] for r in rows}
    assert {"loop (PEFT)", "padded gather (vLLM ref)"} <= impls
    assert any(i.endswith("server step (prebuilt, out +=)") for i in impls)
    for r in rows:
        assert r["ms"] > 0 and r["pct_of_floor"] > 0 and r["vs_padded_gather"] > 0
    assert s["vllm_wrapper"]["true_rank_us"] > 0
    assert s["sensitivity"]["overhead"] > 0
    assert [g["goal"][:6] for g in s["goals"]] == ["every ", "decode", "decode", "sensit"]
    md = (tmp_path / "summary.md").read_text()
    for heading in ("## Tests", "## Kernels", "## vLLM wrapper", "## Sensitivity", "## Goals"):
        assert heading in md


def test_summary_names_failures_and_timeouts(tmp_path):
    (tmp_path / "steps.tsv").write_text(
        "dry_run\t0\ncuda_tests\t1\t30\t200\nkernel_bench\t124\t90\t90\n"
    )
    (tmp_path / "junit.xml").write_text(
        '<testsuites><testsuite><testcase classname="tests.a" name="test_ok"/>'
        '<testcase classname="tests.a" name="test_bad"><failure message="x"/></testcase>'
        '<testcase classname="tests.b" name="test_gpu"><skipped/></testcase>'
        "</testsuite></testsuites>"
    )
    _summarize().main(str(tmp_path), str(tmp_path / "out"))
    s = json.loads((tmp_path / "out/summary.json").read_text())
    assert [r["status"] for r in s["steps"]] == ["failed (rc 1)", "timed out"]
    assert s["tests"] == {"passed": 1, "failed": 1, "errors": 0, "skipped": 1,
                          "failures": ["tests.a::test_bad"]}  # fmt: skip
    assert s["kernels"] is None and s["goals"][0]["met"] is False
    md = (tmp_path / "out/summary.md").read_text()
    assert "FAILED tests.a::test_bad" in md and "did not finish" in md
