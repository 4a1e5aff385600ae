"""Per-matrix calibration statistics of SPEC §1, reduced inside the forward and backward pass.

Forward side (layer input ``x``, rows = tokens):   col_sq[j] += Σ_t x[t, j]²  and  ‖x_t‖²
Backward side (output gradient ``dy``):             row_sq[i] += Σ_t dy[t, i]²,
                                                    trace     += Σ_t ‖dy_t‖² ‖x_t‖²
``fisher_exact``:                                   diag[i, j] += Σ_t dy[t, i]² x[t, j]²

Padding rows are excluded through ``row_mask`` (True = real token).  Everything accumulates
in fp32 whatever the input dtype; inputs are upcast before squaring so fp16 activations whose
squares overflow fp16 are still correct.  The functions here are the plain PyTorch
implementations (the reference every other backend is tested against); faster backends live
beside them and are chosen by ``slora.ops``.
"""

from __future__ import annotations

import torch
from torch import Tensor


def accumulate_input_stats_torch(x: Tensor, row_mask: Tensor | None, col_sq: Tensor) -> Tensor:
    """``col_sq += Σ_t m_t x_t²`` (in place); returns ``‖x_t‖²`` per row in fp32 (0 where masked)."""
    sq = x.float().square()
    token_sq = sq.sum(dim=1)
    if row_mask is None:
        col_sq += sq.sum(dim=0)
        return token_sq
    weights = row_mask.to(sq.dtype)
    token_sq *= weights
    col_sq.addmv_(sq.t(), weights)
    return token_sq


def accumulate_grad_stats_torch(
    dy: Tensor, row_mask: Tensor | None, x_token_sq: Tensor, row_sq: Tensor, trace: Tensor
) -> None:
    """``row_sq += Σ_t m_t dy_t²`` and ``trace += Σ_t ‖dy_t‖² ‖x_t‖²`` (in place).

    ``x_token_sq`` comes from :func:`accumulate_input_stats_torch` and is already 0 on masked
    rows, so the trace needs no mask.
    """
    sq = dy.float().square()
    if row_mask is None:
        row_sq += sq.sum(dim=0)
    else:
        row_sq.addmv_(sq.t(), row_mask.to(sq.dtype))
    trace += torch.dot(sq.sum(dim=1), x_token_sq).reshape(trace.shape)


def accumulate_fisher_exact_torch(
    dy: Tensor, x: Tensor, row_mask: Tensor | None, diag: Tensor
) -> None:
    """``diag += (dy∘dy)ᵀ (x∘x)`` over unmasked rows (token-level empirical Fisher diagonal)."""
    dy2 = dy.float().square()
    x2 = x.float().square()
    if row_mask is not None:
        dy2 = dy2 * row_mask.to(dy2.dtype)[:, None]
    diag.addmm_(dy2.t().to(diag.dtype), x2.to(diag.dtype))


def check_stat_inputs(x: Tensor, row_mask: Tensor | None, buffer: Tensor, dim: int) -> None:
    """Shape checks shared by every backend (kept out of the hot path of the kernels)."""
    if x.dim() != 2:
        raise ValueError(f"expected a 2-D [tokens, features] tensor, got shape {tuple(x.shape)}")
    if row_mask is not None and row_mask.shape != (x.shape[0],):
        raise ValueError(
            f"row_mask must have shape ({x.shape[0]},) to match the tensor's tokens, "
            f"got {tuple(row_mask.shape)}"
        )
    if buffer.shape != (x.shape[dim],) or buffer.dtype != torch.float32:
        raise ValueError(
            f"accumulator must be float32 of shape ({x.shape[dim]},), "
            f"got {buffer.dtype} {tuple(buffer.shape)}"
        )
