"""benchmarks/bench_vllm.py: its schedule, request plans and summary (no vLLM needed), and one
``--quick`` run of a workload pair end to end in the vLLM venv (skipped without it)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "bench_vllm.py"
sys.path.insert(0, str(Path(__file__).parent))
from vllm_scenarios import skip_reason, venv_python  # noqa: E402


@pytest.fixture(scope="module")
def bv():
    spec = importlib.util.spec_from_file_location("bench_vllm", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_vllm"] = module  # dataclasses look their module up while it loads
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("bench_vllm", None)


def test_rounds_run_every_workload_once_in_a_rotated_order(bv):
    names = list(bv.WORKLOADS)
    order = bv.schedule(names, 3)
    rounds = [[w for r, w in order if r == k] for k in range(3)]
    assert all(sorted(r) == sorted(names) for r in rounds)
    assert len({r[0] for r in rounds}) == 3  # each round starts elsewhere
    assert [r for r, _ in order] == sorted(r for r, _ in order)  # rounds run one after another


@pytest.mark.parametrize("requests", [8, 32])
def test_request_plans_use_the_adapters_the_workloads_name(bv, requests):
    def ranks(workload, call=0):
        return [
            None if k is None else bv.RANKS[k % 4]
            for k in bv.adapter_plan(workload, requests, call)
        ]

    assert set(ranks("base")) == set(ranks("lora_unused")) == {None}
    assert set(ranks("r8")) == {8} and set(ranks("r64")) == {64}
    assert set(ranks("four_r8")) == {8} and len(set(bv.adapter_plan("four_r8", requests, 0))) == 4
    mixed = bv.adapter_plan("mixed16", requests, 0)
    assert mixed == bv.adapter_plan("stock_mixed16", requests, 0)
    assert len(set(mixed)) == min(16, requests) and set(ranks("mixed16")) == set(bv.RANKS)
    # churn: the warm-up calls send all 64 adapters; the timed call's adapters were all used
    # before the last 16 distinct adapters of the warm-up, so none of them is still in a slot
    warm = bv.churn_warmup_calls(requests)
    sent = [k for c in range(warm) for k in bv.adapter_plan("churn64", requests, c)]
    assert set(sent) == set(range(64))
    last16 = []
    for k in reversed(sent):
        if k not in last16:
            last16.append(k)
        if len(last16) == 16:
            break
    timed = bv.adapter_plan("churn64", requests, warm)
    assert not set(timed) & set(last16) and len(set(timed)) == requests
    with pytest.raises(ValueError, match="unknown workload"):
        bv.adapter_plan("r9", requests, 0)


def test_ratios_are_taken_per_round_against_the_same_rounds_base(bv):
    """The machine's speed drifts between rounds: each LoRA run is compared with its own
    round's base run, not median with median (81 / 60 = 1.35 here)."""
    tok_s = {"base": (100.0, 50.0, 60.0), "r8": (95.0, 40.0, 81.0), "stock_mixed16": (9.0, 5.0)}
    runs = [{"round": rnd, "workload": w, "tok_s": v}
            for w, vals in tok_s.items() for rnd, v in enumerate(vals)]  # fmt: skip
    s = bv.summarize(runs, ["base", "r8", "stock_mixed16", "r64"])
    assert s["r8"]["runs"] == 3 and s["r8"]["tok_s"] == {"median": 81.0, "min": 40.0, "max": 95.0}
    assert s["r8"]["vs_base"] == pytest.approx({"median": 0.95, "min": 0.8, "max": 81 / 60})
    assert s["r8"]["vs_stock_mixed16"] == pytest.approx(
        {"median": (95 / 9 + 8) / 2, "min": 8.0, "max": 95 / 9}
    )
    assert s["base"]["vs_base"] == {"median": 1.0, "min": 1.0, "max": 1.0}
    assert s["r64"]["runs"] == 0 and s["r64"]["tok_s"] is None
    table = bv.table(s)
    assert "| one rank-8 adapter | 81.0 | 40.0–95.0 | 0.950 | 0.800–1.350 | 9.3× | 3 |" in table
    assert "| one rank-64 adapter | — |" in table


def test_a_results_file_of_another_shape_is_refused(bv, tmp_path):
    path = tmp_path / "r.jsonl"
    shape = bv.Shape()
    rec = {"round": 0, "workload": "base", "tok_s": 1.0, "shape": vars(bv.QUICK)}
    path.write_text(json.dumps(rec) + "\n")
    with pytest.raises(SystemExit, match="another configuration"):
        bv.load_runs(path, shape)
    assert bv.load_runs(path, bv.QUICK) == [rec]


def test_bad_workload_names_are_rejected(bv, capsys):
    with pytest.raises(SystemExit):
        bv.parse_args(["--workloads", "base,r9"])
    assert "r9" in capsys.readouterr().err


@pytest.mark.skipif(skip_reason() is not None, reason=str(skip_reason()))
def test_quick_run_end_to_end_and_resumed(tmp_path):
    """Two workloads (base and one rank-8 adapter), each in its own engine: one JSONL line per
    run, a complete summary with the machine, the table and the plot; a rerun with the same
    --out runs nothing again."""
    out = tmp_path / "v"
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    # the engine core in the run's own process: starts in seconds instead of ~25 s (this
    # checks the pipeline, not the speed; the benchmark itself keeps vLLM's default)
    env = dict(os.environ, PYTHONPATH=path, VLLM_ENABLE_V1_MULTIPROCESSING="0")
    cmd = [str(venv_python()), str(SCRIPT), "--quick", "--workloads", "base,r8", "--out", str(out)]
    first = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert first.returncode == 0, (first.stdout + first.stderr)[-4000:]
    lines = out.with_suffix(".jsonl").read_text().splitlines()
    assert sorted(json.loads(ln)["workload"] for ln in lines) == ["base", "r8"]
    doc = json.loads(out.with_suffix(".json").read_text())
    assert doc["complete"] and set(doc["workloads"]) == {"base", "r8"}
    for w in doc["workloads"].values():
        assert w["runs"] == 1 and w["tok_s"]["median"] > 0 and w["vs_base"]["median"] > 0
    assert {"cpu", "cores", "amx_bf16", "avx512_bf16", "vllm", "torch"} <= set(doc["machine"])
    md = out.with_suffix(".md").read_text()
    assert "one rank-8 adapter" in md and "AMX" in md and "AVX512-BF16" in md
    assert out.with_suffix(".png").stat().st_size > 0
    again = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120, cwd=ROOT)
    assert again.returncode == 0 and "2 runs already" in again.stdout and "0 to do" in again.stdout
    assert out.with_suffix(".jsonl").read_text().splitlines() == lines
