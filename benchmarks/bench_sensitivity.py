"""pytest-benchmark: the sensitivity-statistics reductions, every backend against the torch path.

    python -m pytest benchmarks/bench_sensitivity.py --benchmark-only \
        [--benchmark-json out.json]

Each op/shape/dtype runs the ``torch`` reference first, then the other backends usable on the
device (``cpp`` on the CPU, ``triton`` on CUDA; the Triton interpreter is not timed), so every
ratio is measured in the same run.  On CUDA each figure sits beside its bytes-moved floor
(bytes that must cross HBM / peak bandwidth; set ``SLORA_PEAK_GBPS`` for GPUs not in the
table).  A summary table is printed at the end of the module.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from slora import ops
from slora.benchmarking import Row, format_table, peak_bandwidth

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
REPS = 20 if CUDA else 1  # calls per timed round (one sync per round on CUDA; see us_per_call)

if CUDA:
    STAT_SHAPES = [(8192, 4096), (8192, 14336), (2048, 1024)]
    STAT_DTYPES = [torch.bfloat16, torch.float32]
    FISHER_SHAPES = [(4096, 4096, 4096), (2048, 1024, 4096)]
else:
    STAT_SHAPES = [(1024, 384), (1024, 1536), (4096, 2048)]
    STAT_DTYPES = [torch.float32, torch.bfloat16]
    FISHER_SHAPES = [(1024, 384, 384)]


def _backends() -> list[str]:
    names = ["torch"]
    if CUDA:
        names.append("triton")
    else:
        from slora.kernels import _native

        if _native.available():
            names.append("cpp")
    return names


BACKENDS = _backends()
_RESULTS: dict[tuple, dict[str, float]] = {}


def _sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def _run(benchmark, key: tuple, backend: str, fn, bytes_moved: int, flops: int = 0) -> None:
    def rounds():
        for _ in range(REPS):
            fn()
        _sync()

    rounds()  # warm-up: compile / build
    benchmark.pedantic(rounds, rounds=10 if CUDA else 30, iterations=1, warmup_rounds=1)
    per_call = benchmark.stats.stats.median / REPS
    entry = _RESULTS.setdefault(key, {})
    entry[backend] = per_call
    info = benchmark.extra_info
    info["us_per_call"] = per_call * 1e6
    info["GB/s"] = bytes_moved / per_call / 1e9
    if flops:
        info["TFLOP/s"] = flops / per_call / 1e12
    if "torch" in entry and backend != "torch":
        info["speedup_vs_torch"] = entry["torch"] / per_call
    peak = peak_bandwidth(DEVICE)
    if peak:
        floor = bytes_moved / peak
        info["floor_us"] = floor * 1e6
        info["fraction_of_bandwidth"] = floor / per_call
        entry[f"{backend}_floor"] = floor


def _mask(tokens: int) -> torch.Tensor:
    mask = torch.rand(tokens, device=DEVICE) > 0.1  # ~10% padding
    mask[0] = True
    return mask


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", STAT_DTYPES, ids=str)
@pytest.mark.parametrize("tokens,features", STAT_SHAPES)
def test_input_stats(benchmark, backend, dtype, tokens, features):
    x = torch.randn(tokens, features, device=DEVICE).to(dtype)
    mask, col = _mask(tokens), torch.zeros(features, device=DEVICE)
    fn = lambda: ops.accumulate_input_stats(x, mask, col, backend=backend)
    moved = x.numel() * x.element_size() + tokens * 5 + features * 8  # x, mask + ‖x_t‖², col
    benchmark.group = f"input_stats {tokens}x{features} {dtype}"
    _run(benchmark, ("input_stats", tokens, features, str(dtype)), backend, fn, moved)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", STAT_DTYPES, ids=str)
@pytest.mark.parametrize("tokens,features", STAT_SHAPES)
def test_grad_stats(benchmark, backend, dtype, tokens, features):
    dy = torch.randn(tokens, features, device=DEVICE).to(dtype)
    mask, x_sq = _mask(tokens), torch.rand(tokens, device=DEVICE)
    row, trace = torch.zeros(features, device=DEVICE), torch.zeros(1, device=DEVICE)
    fn = lambda: ops.accumulate_grad_stats(dy, mask, x_sq, row, trace, backend=backend)
    moved = dy.numel() * dy.element_size() + tokens * 5 + features * 8
    benchmark.group = f"grad_stats {tokens}x{features} {dtype}"
    _run(benchmark, ("grad_stats", tokens, features, str(dtype)), backend, fn, moved)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "cpp"])
@pytest.mark.parametrize("tokens,d_out,d_in", FISHER_SHAPES)
def test_fisher_exact(benchmark, backend, tokens, d_out, d_in):
    dtype = torch.bfloat16 if CUDA else torch.float32
    dy = torch.randn(tokens, d_out, device=DEVICE).to(dtype)
    x = torch.randn(tokens, d_in, device=DEVICE).to(dtype)
    mask, diag = _mask(tokens), torch.zeros(d_out, d_in, device=DEVICE)
    fn = lambda: ops.accumulate_fisher_exact(dy, x, mask, diag, backend=backend)
    moved = (dy.numel() + x.numel()) * dy.element_size() + tokens + diag.numel() * 8
    benchmark.group = f"fisher_exact {tokens}x{d_out}x{d_in} {dtype}"
    key = ("fisher_exact", tokens, d_out, d_in, str(dtype))
    _run(benchmark, key, backend, fn, moved, flops=2 * tokens * d_out * d_in)


@pytest.fixture(scope="module", autouse=True)
def _summary(request):
    yield
    if not _RESULTS:
        return
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
        _print_summary(print)


def _print_summary(write) -> None:
    rows = [
        Row(" ".join(map(str, key)), b, entry[b], entry["torch"], entry.get(f"{b}_floor"))
        for key, entry in _RESULTS.items()
        for b in BACKENDS
        if b in entry and "torch" in entry
    ]
    write("")
    write(f"sensitivity kernels on {torch.cuda.get_device_name() if CUDA else 'CPU'} "
          f"({torch.get_num_threads()} threads)")  # fmt: skip
    write(format_table(rows, baseline="torch"))
