"""Backend ``cpp``: the CPU kernels of ``csrc/`` — the fused FMA kernel of
``multi_lora_cpu.cpp`` (shrink + expand per chunk of a group's tokens, OpenMP over chunks,
``torch.get_num_threads()`` threads) and, for groups of many tokens, the GEMM route of
``multi_lora_gemm_cpu.cpp`` (ATen's matrix multiply: oneDNN on AMX tiles or AVX512-BF16 where
the CPU has them).  :func:`gemm_route` decides which groups take the GEMM route."""

from __future__ import annotations

import os

import torch
from torch import Tensor

from slora.kernels import cpu_features
from slora.kernels._native import UNAVAILABLE, extension
from slora.kernels.multi_lora.meta import LoRAMeta
from slora.kernels.multi_lora.weights import KernelWeights

GEMM_ENV = "SLORA_CPU_GEMM_MIN_TOKENS"

# From which group of one adapter ATen's GEMM beats the fused FMA kernel, by the CPU's matrix
# and dot-product units: (tokens, multiply-adds), both needed — the GEMM route costs a few
# ATen calls per slice, which only many multiply-adds repay.  The first flag the CPU reports
# decides; none: never (docs/kernels.md, "The CPU's GEMM route": measurements and how to
# re-measure with benchmarks/bench_multi_lora_gemm_cpu.py).
GEMM_ROUTES: dict[tuple[str, torch.dtype], tuple[int, int]] = {
    # AMX, not measured by this project yet (no AMX machine was available): the route's fixed
    # cost measured on AVX512-BF16 (~60 µs per group of one slice, 2 threads) against the
    # fused kernel's ~110 GFLOP/s per core; 16M multiply-adds take the fused kernel ~150 µs
    ("amx_bf16", torch.bfloat16): (32, 1 << 24),
    ("amx_fp16", torch.float16): (32, 1 << 24),
    # AVX512-BF16 without AMX, measured on AMD EPYC (Zen 4, 2 threads, d = 2048): the GEMM wins
    # only from rank 64 × 256 tokens (1.09×; rank 8 / 16 never up to 512 tokens)
    ("avx512_bf16", torch.bfloat16): (256, 1 << 26),
}
NEVER = (0, 0)

_chosen: dict[torch.dtype, tuple[int, int]] = {}


def gemm_route(dtype: torch.dtype) -> tuple[int, int]:
    """(tokens, multiply-adds) from which the ``cpp`` backend computes one adapter's group with
    ATen's GEMM instead of its fused kernel, for inputs of ``dtype``; (0, 0) = never.

    ``SLORA_CPU_GEMM_MIN_TOKENS`` (an integer ≥ 0) overrides the table for every dtype, with
    no multiply-add minimum: 1 sends every group through the GEMM, 0 none (the tests run both
    routes that way on any CPU)."""
    chosen = _chosen.get(dtype)
    if chosen is None:
        chosen = _chosen[dtype] = _choose(dtype)
    return chosen


def _choose(dtype: torch.dtype) -> tuple[int, int]:
    raw = os.environ.get(GEMM_ENV, "").strip()
    if raw:
        if not raw.isdigit():
            raise ValueError(
                f"{GEMM_ENV}={raw!r}: expected a whole number of tokens ≥ 0 "
                "(1 = every group through ATen's GEMM, 0 = none)"
            )
        return int(raw), 0
    for (flag, table_dtype), route in GEMM_ROUTES.items():
        if table_dtype == dtype and cpu_features.has(flag):
            return route
    return NEVER


def reset_gemm_choice() -> None:
    """Forget the choices made (after changing ``SLORA_CPU_GEMM_MIN_TOKENS``)."""
    _chosen.clear()


def native_args(
    x: Tensor, w: KernelWeights, meta: LoRAMeta, out: Tensor, overwrite: bool = False
) -> tuple:
    """The native op's positional arguments (x with strided rows is copied there; a None
    order is the identity)."""
    return (
        x, w.A, w.Bt, meta.order, meta.group_slot, meta.group_start, meta.group_len,
        w.ranks, w.a_offsets, w.b_offsets, w.scales, w.slice_sizes, w.col_starts, out, overwrite,
        *gemm_route(x.dtype),
    )  # fmt: skip


def multi_lora_cpp(
    x: Tensor, w: KernelWeights, meta: LoRAMeta, out: Tensor, overwrite: bool = False
) -> Tensor:
    """``out += delta`` (``out = delta`` with ``overwrite``, so a fresh ``out`` needs no
    zeroing)."""
    ext = extension()  # registry.native() inlined: one Python frame less on the decode path
    if ext is None:
        raise RuntimeError(UNAVAILABLE)
    ext.multi_lora(*native_args(x, w, meta, out, overwrite))
    return out
