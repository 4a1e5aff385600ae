"""Backend ``cpp``: the CPU reductions of ``csrc/sensitivity_cpu.cpp`` (one streaming pass per
tensor, fp32 accumulation, deterministic for any thread count).  ``fisher_exact`` has no C++
kernel: it is one GEMM, which PyTorch's BLAS already runs well on the CPU."""

from __future__ import annotations

import torch
from torch import Tensor

from slora.kernels.registry import native
from slora.kernels.sensitivity.torch_backend import fisher_exact  # noqa: F401 - the BLAS path


def input_stats(x: Tensor, row_mask: Tensor | None, col_sq: Tensor) -> Tensor:
    """``col_sq += Σ_t m_t x_t²`` in one pass over ``x``; returns ‖x_t‖² (0 if masked)."""
    token_sq = torch.empty(x.shape[0], dtype=torch.float32)
    target = col_sq if col_sq.is_contiguous() else torch.zeros_like(col_sq)
    mask = row_mask.contiguous() if row_mask is not None else None
    native().sq_stats(x, mask, target, token_sq, None, None)
    if target is not col_sq:
        col_sq += target
    return token_sq


def grad_stats(
    dy: Tensor, row_mask: Tensor | None, x_token_sq: Tensor, row_sq: Tensor, trace: Tensor
) -> None:
    """Row sums of dy² and the trace term Σ_t ‖dy_t‖² ‖x_t‖² in one pass over ``dy``."""
    target = row_sq if row_sq.is_contiguous() else torch.zeros_like(row_sq)
    trace_buf = trace if trace.is_contiguous() else trace.clone()
    mask = row_mask.contiguous() if row_mask is not None else None
    native().sq_stats(dy, mask, target, None, x_token_sq.contiguous(), trace_buf)
    if target is not row_sq:
        row_sq += target
    if trace_buf is not trace:
        trace.copy_(trace_buf)
