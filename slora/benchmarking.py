"""The one benchmark harness of ``slora bench`` and ``benchmarks/``: interleaved timing on
``torch.utils.benchmark`` (which synchronises the accelerator around every measurement), the
device's peak memory bandwidth, the limits measured on this machine (the fastest of several
streaming reads, the ``torch.mm`` rate), and one table writer (time, speed-up against the
baseline measured in the same run, share of the bytes floor and of the compute ceiling).

Interleaving — every contender once per round, the order reversed every other round, ``rounds``
rounds, the median per contender — makes load from other jobs on a shared machine and slow
drifts (clock, caches, allocator) hit every contender alike.
"""

from __future__ import annotations

import os
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch.utils.benchmark import Timer
from torch.utils.benchmark.utils.timer import timer as synced_clock  # syncs the accelerator

# Peak HBM bandwidth in GB/s by device-name fragment; SLORA_PEAK_GBPS overrides.
PEAK_GBPS = {"H200": 4800.0, "H100": 3350.0, "A100": 2039.0, "L40S": 864.0, "A10": 600.0}


def peak_bandwidth(device: str | torch.device) -> float | None:
    """Peak memory bandwidth of ``device`` in bytes/s (None when unknown, e.g. the CPU)."""
    if os.environ.get("SLORA_PEAK_GBPS"):
        return float(os.environ["SLORA_PEAK_GBPS"]) * 1e9
    if torch.device(device).type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((gbps * 1e9 for key, gbps in PEAK_GBPS.items() if key in name), None)


def streaming_reads(
    nbytes: int, device: str | torch.device = "cpu"
) -> dict[str, tuple[Callable[[], object], int]]:
    """Plain streaming reads of about ``nbytes`` on ``device``, by name, each with the bytes it
    moves: slora's vectorised read (``csrc/stream_read.cpp``, on the CPU when the native ops
    build), ``torch.sum`` and ``torch.amax`` over an fp32 buffer, and a copy (``dst.copy_(src)``
    of ``nbytes / 2``: it reads and writes, both counted).  The bytes floor is the bandwidth of
    the fastest of them (:func:`best_read`), on as many bytes as the kernel moves, so that all
    run from the same level of the memory hierarchy (a few MiB stay in a large L3).  Time them
    in the same rounds as the kernels (:func:`measure`) so that a drifting machine slows all
    alike."""
    n = -(-max(int(nbytes), 1 << 16) // 256) * 64  # fp32 elements, whole 256-byte blocks
    buf = torch.rand(n, device=device)
    src, dst = buf[: n // 2], torch.empty(n // 2, device=device)
    readers: dict[str, tuple[Callable[[], object], int]] = {}
    if torch.device(device).type == "cpu":
        from slora.kernels import _native

        ext = _native.extension()
        if ext is not None:
            readers["read (slora native)"] = (lambda: ext.stream_read(buf), n * 4)
    readers["torch.sum"] = (buf.sum, n * 4)
    readers["torch.amax"] = (buf.amax, n * 4)
    readers["copy_ (read + write)"] = (lambda: dst.copy_(src), 2 * (n // 2) * 4)
    return readers


def best_read(times: Mapping[str, Timing], readers: Mapping[str, tuple[object, int]]) -> float:
    """Bytes/s of the fastest reader (median time per reader): the yardstick of the floor."""
    return max(nbytes / times[name].median for name, (_, nbytes) in readers.items())


def read_bandwidth(nbytes: int, device: str | torch.device = "cpu", min_time: float = 0.3) -> float:
    """Bytes/s of the fastest of :func:`streaming_reads` of ``nbytes`` on ``device``."""
    readers = streaming_reads(nbytes, device)
    times = measure({k: fn for k, (fn, _) in readers.items()}, rounds=3, min_time=min_time)
    return best_read(times, readers)


def mm_ceiling(
    dtype: torch.dtype, device: str | torch.device = "cpu", size: int = 1024,
    min_time: float = 0.5,
) -> float:  # fmt: skip
    """FLOP/s of ``torch.mm`` on two ``size`` × ``size`` matrices of ``dtype`` (compute-bound:
    oneDNN, AMX tiles where the CPU has them), with ``torch.get_num_threads()`` threads: the
    compute ceiling the kernels are compared with."""
    a, b = (torch.randn(size, size, device=device).to(dtype) for _ in range(2))
    t = measure({"mm": lambda: torch.mm(a, b)}, rounds=3, min_time=min_time)["mm"].median
    return 2 * size**3 / t


@dataclass
class Timing:
    """Seconds per call, one sample per round."""

    samples: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def min(self) -> float:
        return min(self.samples)


def measure(
    fns: Mapping[str, Callable[[], object]], *, rounds: int = 5, min_time: float = 0.0
) -> dict[str, Timing]:
    """Time every function of ``fns``, interleaved over ``rounds`` rounds after one warm-up call.

    Each sample is one call (``min_time`` = 0, for runs of a second or more; timed with
    ``torch.utils.benchmark``'s accelerator-synchronised clock) or the median of its blocked
    autorange over ``min_time / rounds`` seconds (kernels).  Both run with
    ``torch.get_num_threads()`` CPU threads.
    """
    if rounds < 1:
        raise ValueError(f"rounds must be ≥ 1, got {rounds}")
    # Timer runs its statement on one thread unless told otherwise: the caller's setting
    threads = torch.get_num_threads()
    timers = {
        name: Timer("fn()", globals={"fn": fn}, num_threads=threads) for name, fn in fns.items()
    }
    for fn in fns.values():
        fn()
    out = {name: Timing([]) for name in fns}
    names = list(fns)
    for rnd in range(rounds):
        for name in names if rnd % 2 == 0 else names[::-1]:
            timer = timers[name]
            if min_time > 0:
                sample = timer.blocked_autorange(min_run_time=min_time / rounds).median
            else:
                start = synced_clock()
                fns[name]()
                sample = synced_clock() - start
            out[name].samples.append(sample)
    return out


@dataclass
class Row:
    """One line of a benchmark table: ``impl`` on ``case``, its time, the baseline's time
    measured in the same run, and optionally the case's bytes floor (bytes / bandwidth) and
    compute floor (FLOPs / the ``torch.mm`` rate of the same run)."""

    case: str
    impl: str
    seconds: float
    baseline_seconds: float
    floor_seconds: float | None = None
    compute_seconds: float | None = None

    @property
    def bound(self) -> str | None:
        """The bound the case is nearer: the larger of its two floors ("bytes" / "compute");
        None unless both are known."""
        if self.floor_seconds is None or self.compute_seconds is None:
            return None
        return "bytes" if self.floor_seconds >= self.compute_seconds else "compute"

    def as_dict(self) -> dict[str, float | str]:
        out: dict[str, float | str] = {
            "case": self.case,
            "impl": self.impl,
            "ms": self.seconds * 1e3,
            "speedup_vs_baseline": self.baseline_seconds / self.seconds,
        }
        if self.floor_seconds is not None:
            out["floor_ms"] = self.floor_seconds * 1e3
            out["fraction_of_floor"] = self.floor_seconds / self.seconds
        if self.compute_seconds is not None:
            out["compute_floor_ms"] = self.compute_seconds * 1e3
            out["fraction_of_compute"] = self.compute_seconds / self.seconds
        if self.bound is not None:
            out["nearer_bound"] = self.bound
        return out


def format_table(rows: Sequence[Row], baseline: str = "best baseline") -> str:
    """Fixed-width table: case, implementation, ms, speed-up vs ``baseline``, and where known
    % of the bytes floor, % of the compute ceiling and the nearer bound.  Shares above 100 %
    are printed as measured (an op faster than a floor shows it, nothing is clipped)."""
    floor = any(r.floor_seconds is not None for r in rows)
    compute = any(r.compute_seconds is not None for r in rows)
    bound = any(r.bound is not None for r in rows)
    case_w = max([len("case"), *(len(r.case) for r in rows)]) + 2
    impl_w = max([len("implementation"), *(len(r.impl) for r in rows)]) + 2
    speed = f"speed-up vs {baseline}"
    lines = [
        f"{'case':<{case_w}}{'implementation':<{impl_w}}{'ms':>10}{speed:>{len(speed) + 2}}"
        + (f"{'% of bytes floor':>18}" if floor else "")
        + (f"{'% of compute':>14}" if compute else "")
        + (f"{'nearer':>9}" if bound else "")
    ]

    def share(floor_s: float | None, width: int) -> str:
        return " " * width if floor_s is None else f"{100 * floor_s / r.seconds:>{width - 1}.1f}%"

    for r in rows:
        line = (
            f"{r.case:<{case_w}}{r.impl:<{impl_w}}{r.seconds * 1e3:>10.3f}"
            f"{r.baseline_seconds / r.seconds:>{len(speed) + 1}.2f}x"
        )
        line += share(r.floor_seconds, 18) if floor else ""
        line += share(r.compute_seconds, 14) if compute else ""
        line += f"{r.bound or '':>9}" if bound else ""
        lines.append(line.rstrip())
    return "\n".join(lines)
