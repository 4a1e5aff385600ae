"""pytest-benchmark: grouped heterogeneous-rank LoRA against the loop and padded baselines.

    python -m pytest benchmarks/bench_multi_lora.py --benchmark-only \
        [--benchmark-json out.json]

Shapes from ANCHORS.md scaled to the device (see ``slora.bench``): CPU d = 2048, 16 adapters
with ranks {8, 16, 32, 64}, decode T = 64 (each token its own slot among 16, shuffled) and
prefill T = 1024 in 8 segments, fp32, plus a 3-slice (q/k/v-like) decode; CUDA d = 4096,
bf16, prefill T = 8192.  Every contender of a case runs in the same session — (a) the loop
over adapters (PEFT), (b) weights gathered per token and padded to the largest rank (vLLM's
PyTorch reference), slora's backends, and on CUDA the Triton kernel on adapters padded to
the largest rank — and a table of ratios (and, on CUDA, the bytes floor at true ranks,
``SLORA_PEAK_GBPS`` overrides the bandwidth) is printed at the end.
"""

from __future__ import annotations

import os

import pytest
import torch

from slora import bench

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
PEAK_GBPS = {"H200": 4800.0, "H100": 3350.0, "A100": 2039.0}


def _cases() -> dict[str, bench.Case]:
    torch.manual_seed(0)
    if CUDA:
        dt, d, t_pre = torch.bfloat16, 4096, 8192
    else:
        dt, d, t_pre = torch.float32, 2048, 1024
    cases = [
        bench.decode_case(64, d, dtype=dt, device=DEVICE),
        bench.prefill_case(t_pre, d, dtype=dt, device=DEVICE),
    ]
    return {c.name: c for c in cases}


CASES = _cases()
_FNS = {name: bench.contenders(case, DEVICE) for name, case in CASES.items()}
PARAMS = [(c, i) for c, fns in _FNS.items() for i in fns]
_RESULTS: dict[str, dict[str, float]] = {}


def _bandwidth() -> float | None:
    if os.environ.get("SLORA_PEAK_GBPS"):
        return float(os.environ["SLORA_PEAK_GBPS"]) * 1e9
    if not CUDA:
        return None
    name = torch.cuda.get_device_name()
    return next((bw * 1e9 for key, bw in PEAK_GBPS.items() if key in name), None)


@pytest.mark.parametrize("case, impl", PARAMS, ids=[f"{c}|{i}" for c, i in PARAMS])
def test_multi_lora(benchmark, case, impl):
    fn = _FNS[case][impl]
    if CUDA:
        inner = fn

        def fn():  # noqa: F811 - synchronised version
            inner()
            torch.cuda.synchronize()

    benchmark.group = case
    slow = impl.startswith("padded gather")
    benchmark.pedantic(fn, rounds=3 if slow else 30, iterations=1, warmup_rounds=1)
    stats = benchmark.stats.stats
    _RESULTS.setdefault(case, {})[impl] = (stats.median, stats.min)


@pytest.fixture(scope="module", autouse=True)
def _summary():
    yield
    if not _RESULTS:
        return
    bw = _bandwidth()
    print(
        f"\nmulti_lora on {DEVICE} ({torch.get_num_threads()} threads); "
        "ratio = best baseline / implementation"
    )
    for case, times in _RESULTS.items():
        base = [
            min(times[b][q] for b in ("loop (PEFT)", "padded gather (vLLM ref)") if b in times)
            for q in (0, 1)
        ]
        floor = bench.floor_seconds(CASES[case], bw) if bw else None
        for impl, (med, low) in times.items():
            extra = f"  {100 * floor / med:5.1f}% of floor" if floor else ""
            print(
                f"  {case:<16} {impl:<34} median {med * 1e3:9.3f} ms ({base[0] / med:6.2f}x)"
                f"  min {low * 1e3:9.3f} ms ({base[1] / low:6.2f}x){extra}"
            )
