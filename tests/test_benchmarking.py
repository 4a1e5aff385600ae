"""The benchmark harness shared by ``slora bench`` and ``benchmarks/``."""

from __future__ import annotations

import pytest
import torch

from slora import benchmarking as bm


def test_measure_interleaves_rounds_after_one_warm_up():
    calls: list[str] = []
    fns = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    out = bm.measure(fns, rounds=3)
    assert calls == ["a", "b"] + ["a", "b", "b", "a", "a", "b"]  # warm-up, then ABBA rounds
    assert set(out) == {"a", "b"} and all(len(t.samples) == 3 for t in out.values())
    assert all(0 <= t.min <= t.median for t in out.values())
    with pytest.raises(ValueError, match="rounds"):
        bm.measure(fns, rounds=0)


def test_measure_with_min_time_uses_blocked_autorange():
    calls = []
    out = bm.measure({"f": lambda: calls.append(1)}, rounds=2, min_time=0.02)
    assert len(out["f"].samples) == 2 and len(calls) > 3


@pytest.mark.parametrize("min_time", [0.0, 0.02])
def test_measure_runs_with_torchs_thread_count(min_time):
    """torch.utils.benchmark.Timer alone would run every sample on one thread, whatever
    `slora bench --threads` asked for."""
    seen = set()
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        bm.measure({"f": lambda: seen.add(torch.get_num_threads())}, rounds=2, min_time=min_time)
    finally:
        torch.set_num_threads(before)
    assert seen == {2}


def test_peak_bandwidth_override_and_cpu(monkeypatch):
    monkeypatch.delenv("SLORA_PEAK_GBPS", raising=False)
    assert bm.peak_bandwidth("cpu") is None
    monkeypatch.setenv("SLORA_PEAK_GBPS", "100")
    assert bm.peak_bandwidth("cpu") == 100e9


def test_table_reports_speedup_against_the_baseline_and_the_floor():
    rows = [bm.Row("decode", "loop", 2e-3, 2e-3), bm.Row("decode", "slora", 5e-4, 2e-3, 1e-4)]
    text = bm.format_table(rows, baseline="loop")
    head, loop, ours = text.splitlines()
    assert "speed-up vs loop" in head and "% of floor" in head
    assert loop.split()[-1] == "1.00x" and ours.split()[-2:] == ["4.00x", "20.0%"]
    assert rows[1].as_dict() == {
        "case": "decode", "impl": "slora", "ms": 0.5, "speedup_vs_baseline": 4.0,
        "floor_ms": 0.1, "fraction_of_floor": pytest.approx(0.2),
    }  # fmt: skip


def test_bench_times_the_floor_read_in_the_same_rounds_as_the_kernels(monkeypatch):
    """`slora bench` on the CPU: the streaming read that sets the floor is one more contender
    of the interleaved rounds (a drifting machine slows it like the kernels), not a row."""
    from slora import bench

    timed: list[list[str]] = []

    def spy(fns, **kwargs):
        timed.append(list(fns))
        return bm.measure(fns, **kwargs)

    monkeypatch.setattr(bench, "measure", spy)
    case = bench.decode_case(T=8, d=64, n_adapters=4)
    rows = bench.run_cases([case], "cpu", min_time=0.0, bandwidth=None)
    assert len(timed) == 1 and bench.FLOOR_READ in timed[0]
    assert [r.impl for r in rows] == [name for name in timed[0] if name != bench.FLOOR_READ]
    assert all(r.floor_seconds is not None and r.floor_seconds > 0 for r in rows)
    floor = bench.run_cases([case], "cpu", min_time=0.0, bandwidth=1e9)[0].floor_seconds
    assert floor == pytest.approx(bench.floor_bytes(case) / 1e9)  # a given bandwidth: no read
    assert bench.FLOOR_READ not in timed[1]
