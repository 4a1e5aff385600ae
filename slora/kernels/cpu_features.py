"""What this CPU offers the kernels: its model name and the instruction-set flags that decide
which CPU path is fastest (AMX tiles, AVX512-BF16 / AVX512-FP16 dot products, AVX-512, AVX2).

Read once from ``/proc/cpuinfo`` (Linux); elsewhere the flags are unknown (empty), which
selects the paths that every x86-64 CPU runs.  ``slora env``, ``slora bench`` and the vLLM
benchmark record these facts with their numbers.
"""

from __future__ import annotations

import functools
import os
import platform
from pathlib import Path

# The flags slora's choices depend on, in the words of /proc/cpuinfo.
REPORTED_FLAGS = ("amx_bf16", "amx_fp16", "amx_tile", "avx512_bf16", "avx512_fp16", "avx512f",
                  "avx2")  # fmt: skip


def read_cpuinfo(path: str | Path = "/proc/cpuinfo") -> tuple[str, frozenset[str]]:
    """(model name, flags) from a Linux ``cpuinfo`` file; the platform's name and no flags
    where it cannot be read."""
    model, flags = platform.processor() or platform.machine(), frozenset()
    try:
        text = Path(path).read_text()
    except OSError:
        return model, flags
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and value.strip():
            model = value.strip()
        elif key == "flags" and not flags:
            flags = frozenset(value.split())
    return model, flags


@functools.cache
def _cpuinfo() -> tuple[str, frozenset[str]]:
    return read_cpuinfo()


def cpu_model() -> str:
    """The CPU's model name (``AMD EPYC``, ``Intel(R) Xeon(R) Platinum 8481C``, ...)."""
    return _cpuinfo()[0]


def has(flag: str) -> bool:
    """Whether the CPU reports ``flag`` (a /proc/cpuinfo flag such as ``amx_bf16``)."""
    return flag in _cpuinfo()[1]


def summary(path: str | Path | None = None) -> dict[str, object]:
    """Model, logical cores and the flags slora's choices depend on, for result files (this
    machine's, or those of the ``cpuinfo`` file at ``path``)."""
    model, flags = _cpuinfo() if path is None else read_cpuinfo(path)
    return {"cpu": model, "cores": os.cpu_count(), **{f: f in flags for f in REPORTED_FLAGS}}
