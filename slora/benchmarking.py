"""The one benchmark harness of ``slora bench`` and ``benchmarks/``: interleaved timing on
``torch.utils.benchmark`` (which synchronises the accelerator around every measurement), the
device's peak memory bandwidth, and one table writer (time, speed-up against the baseline
measured in the same run, share of the bandwidth floor).

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


def streaming_read(
    nbytes: int, device: str | torch.device = "cpu"
) -> tuple[Callable[[], object], int]:
    """A plain streaming read of about ``nbytes`` on ``device`` (``torch.sum`` over an fp32
    buffer) and the bytes it reads: the floor's yardstick where no peak figure is known (the
    CPU), on as many bytes as the kernel moves, so that both run from the same level of the
    memory hierarchy (a few MiB stay in a large L3).  Time it in the same rounds as the kernels
    (:func:`measure`) so that a drifting machine slows both alike."""
    n = max(int(nbytes) // 4, 1 << 14)
    return torch.rand(n, device=device).sum, n * 4


def read_bandwidth(nbytes: int, device: str | torch.device = "cpu", min_time: float = 0.3) -> float:
    """Bytes/s of :func:`streaming_read` of ``nbytes`` on ``device``, timed like the kernels."""
    fn, n = streaming_read(nbytes, device)
    return n / measure({"read": fn}, rounds=3, min_time=min_time)["read"].median


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
    measured in the same run, and optionally the bandwidth floor (bytes / peak bandwidth)."""

    case: str
    impl: str
    seconds: float
    baseline_seconds: float
    floor_seconds: float | None = None

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
        return out


def format_table(rows: Sequence[Row], baseline: str = "best baseline") -> str:
    """Fixed-width table: case, implementation, ms, speed-up vs ``baseline``, % of floor."""
    floor = any(r.floor_seconds is not None for r in rows)
    case_w = max([len("case"), *(len(r.case) for r in rows)]) + 2
    impl_w = max([len("implementation"), *(len(r.impl) for r in rows)]) + 2
    speed = f"speed-up vs {baseline}"
    lines = [
        f"{'case':<{case_w}}{'implementation':<{impl_w}}{'ms':>10}{speed:>{len(speed) + 2}}"
        + (f"{'% of floor':>12}" if floor else "")
    ]
    for r in rows:
        line = (
            f"{r.case:<{case_w}}{r.impl:<{impl_w}}{r.seconds * 1e3:>10.3f}"
            f"{r.baseline_seconds / r.seconds:>{len(speed) + 1}.2f}x"
        )
        if r.floor_seconds is not None:
            line += f"{100 * r.floor_seconds / r.seconds:>11.1f}%"
        lines.append(line)
    return "\n".join(lines)
