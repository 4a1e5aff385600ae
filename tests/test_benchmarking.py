"""The benchmark harness shared by ``slora bench`` and ``benchmarks/``."""

from __future__ import annotations

import json

import pytest
import torch

from slora import benchmarking as bm
from slora.kernels import cpu_features


@pytest.fixture
def one_thread():
    """One torch thread for the real runs, restored afterwards: on a shared two-core machine
    every two-thread parallel region of a tiny op can wait on a busy core."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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
    assert "speed-up vs loop" in head and "% of bytes floor" in head
    assert "% of compute" not in head and "nearer" not in head  # unknown: no column
    assert loop.split()[-1] == "1.00x" and ours.split()[-2:] == ["4.00x", "20.0%"]
    assert rows[1].as_dict() == {
        "case": "decode", "impl": "slora", "ms": 0.5, "speedup_vs_baseline": 4.0,
        "floor_ms": 0.1, "fraction_of_floor": pytest.approx(0.2),
    }  # fmt: skip


@pytest.mark.parametrize(
    ("bytes_s", "compute_s", "bound"), [(1e-4, 5e-5, "bytes"), (1e-4, 3e-4, "compute")]
)
def test_rows_name_the_bound_they_are_nearer(bytes_s, compute_s, bound):
    """The nearer bound is the larger floor (the op reaches the higher share of it), and the
    table shows both shares unclipped: an op faster than a floor reads above 100 %."""
    row = bm.Row("prefill", "slora", 2e-4, 1e-3, bytes_s, compute_s)
    assert row.bound == bound
    d = row.as_dict()
    assert d["nearer_bound"] == bound
    assert d["fraction_of_floor"] == pytest.approx(bytes_s / 2e-4)
    assert d["fraction_of_compute"] == pytest.approx(compute_s / 2e-4)
    head, line = bm.format_table([row]).splitlines()
    assert "% of compute" in head and head.split()[-1] == "nearer"
    assert line.split()[-3:] == [f"{100 * bytes_s / 2e-4:.1f}%", f"{100 * compute_s / 2e-4:.1f}%",
                                 bound]  # fmt: skip
    assert bm.Row("c", "i", 1.0, 1.0, 0.5).bound is None  # one floor only: no choice


def _fake_measure(seconds: dict[str, float]):
    """measure() returning fixed medians (names not in ``seconds`` take 1 ms)."""

    def fake(fns, **kwargs):
        return {name: bm.Timing([seconds.get(name, 1e-3)] * 3) for name in fns}

    return fake


def test_streaming_reads_move_the_same_bytes_and_count_a_copy_twice():
    readers = bm.streaming_reads(3 << 20)
    assert {"torch.sum", "torch.amax", "copy_ (read + write)"} <= set(readers)
    moved = {name: n for name, (_, n) in readers.items()}
    assert len(set(moved.values())) == 1 and 3 << 20 <= moved["torch.sum"] < (3 << 20) + 256
    for fn, _ in readers.values():
        fn()  # each reader runs


def test_the_floor_is_the_fastest_reader_so_no_reader_beats_it(monkeypatch):
    """With fake timings: the bytes floor uses the fastest reader's bandwidth, whichever it
    is, so none of the readers — timed as ops on the same bytes — exceeds 100 % of it."""
    from slora import bench

    case = bench.decode_case(T=8, d=64, n_adapters=4)
    names = list(bm.streaming_reads(bench.floor_bytes(case)))
    for fastest in names:
        fake = {bench.FLOOR_READ + n: (1e-4 if n == fastest else 3e-4) for n in names}
        fake["slora cpp"] = 1e-5  # an op faster than the floor: shown as it is, not clipped
        monkeypatch.setattr(bench, "measure", _fake_measure(fake))
        rows, limits = bench.run_cases([case], "cpu", min_time=0.0, bandwidth=None)
        read_gbps = limits[case.name]["read_gbps"]
        assert limits[case.name]["floor_gbps"] == pytest.approx(max(read_gbps.values()))
        assert max(read_gbps, key=read_gbps.get) == fastest
        floor = rows[0].floor_seconds
        nbytes = bench.floor_bytes(case)
        assert floor == pytest.approx(nbytes / (limits[case.name]["floor_gbps"] * 1e9))
        for n in names:  # each reader's own share of the floor over its bytes
            assert nbytes / (read_gbps[n] * 1e9) / fake[bench.FLOOR_READ + n] <= 1 + 1e-9
        assert next(r for r in rows if r.impl == "slora cpp").as_dict()["fraction_of_floor"] > 1


def test_case_flops_and_the_compute_floor(monkeypatch):
    from slora import bench

    case = bench.decode_case(T=8, d=64, n_adapters=4)
    case.token_slots[0] = -1  # a token without an adapter costs nothing
    want = sum(2 * case.adapters[k][0].shape[0] * (64 + 64)
               for k in case.token_slots.tolist() if k >= 0)  # fmt: skip
    assert bench.case_flops(case) == want
    monkeypatch.setattr(bench, "measure", _fake_measure({}))
    rows, _ = bench.run_cases([case], "cpu", 0.0, bandwidth=1e9, ceilings={torch.float32: 1e9})
    assert all(r.compute_seconds == pytest.approx(want / 1e9) for r in rows)
    assert all(r.floor_seconds == pytest.approx(bench.floor_bytes(case) / 1e9) for r in rows)


def test_mm_ceiling_is_flops_over_the_measured_time(monkeypatch):
    monkeypatch.setattr(bm, "measure", _fake_measure({"mm": 2e-3}))
    assert bm.mm_ceiling(torch.bfloat16, size=64) == pytest.approx(2 * 64**3 / 2e-3)


def test_cpu_info_reads_the_model_and_the_matrix_unit_flags(tmp_path):
    path = tmp_path / "cpuinfo"
    path.write_text("processor\t: 0\nmodel name\t: Some Xeon\nflags\t\t: fpu avx512f amx_bf16 "
                    "amx_tile\n\nprocessor\t: 1\nmodel name\t: Some Xeon\n")  # fmt: skip
    info = cpu_features.summary(path)
    assert info["cpu"] == "Some Xeon" and info["amx_bf16"] is True
    assert info["avx512f"] is True and info["avx512_bf16"] is False
    assert cpu_features.summary(tmp_path / "missing")["amx_bf16"] is False


def test_native_stream_read_reads_every_word():
    from slora.kernels import _native

    ext = _native.extension()
    if ext is None:
        pytest.skip("native ops not built")
    t = torch.randint(-(2**62), 2**62, (4096 + 32,), dtype=torch.int64)
    want = 0
    for v in t.tolist():
        want ^= v
    assert ext.stream_read(t) == want
    t[-1] ^= 1  # the last word counts
    assert ext.stream_read(t) == want ^ 1
    with pytest.raises(RuntimeError, match="contiguous"):
        ext.stream_read(t.view(-1, 2)[:, 0])


def test_bench_times_the_floor_reads_in_the_same_rounds_as_the_kernels(monkeypatch, one_thread):
    """`slora bench` on the CPU: the streaming reads that set the floor are more contenders of
    the interleaved rounds (a drifting machine slows them like the kernels), not rows."""
    from slora import bench

    timed: list[list[str]] = []

    def spy(fns, **kwargs):
        timed.append(list(fns))
        return bm.measure(fns, **kwargs)

    monkeypatch.setattr(bench, "measure", spy)
    case = bench.decode_case(T=8, d=64, n_adapters=4)
    rows, _ = bench.run_cases([case], "cpu", min_time=0.0, bandwidth=None)
    reads = [n for n in timed[0] if n.startswith(bench.FLOOR_READ)]
    assert len(timed) == 1 and len(reads) >= 3
    assert [r.impl for r in rows] == [name for name in timed[0] if name not in reads]
    assert all(r.floor_seconds is not None and r.floor_seconds > 0 for r in rows)
    rows, _ = bench.run_cases([case], "cpu", min_time=0.0, bandwidth=1e9)
    assert rows[0].floor_seconds == pytest.approx(bench.floor_bytes(case) / 1e9)  # no read
    assert not any(n.startswith(bench.FLOOR_READ) for n in timed[1])


def test_slora_bench_quick_end_to_end(tmp_path, capsys, one_thread):
    """A real `slora bench --quick`: the table and the JSON carry both limits per case, the
    nearer bound, the compute ceiling and the CPU's model and flags."""
    from slora import bench

    argv = ["--quick", "--device", "cpu", "--threads", "1", "--out", str(tmp_path)]
    assert bench.main(argv) == 0
    text = capsys.readouterr().out
    assert "% of bytes floor" in text and "% of compute" in text and "amx_bf16" in text
    doc = json.loads((tmp_path / "slora_bench.json").read_text())
    assert doc["quick"] and {"cpu", "cores", "amx_bf16", "avx512_bf16"} <= set(doc)
    assert doc["mm_gflops"]["fp32"] > 0
    assert {r["case"] for r in doc["rows"]} == set(doc["limits"]) and len(doc["limits"]) == 2
    for r in doc["rows"]:
        assert r["fraction_of_floor"] > 0 and r["fraction_of_compute"] > 0
        assert r["nearer_bound"] in ("bytes", "compute")
    assert (tmp_path / "slora_bench.png").stat().st_size > 0
