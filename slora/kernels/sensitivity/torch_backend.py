"""The sensitivity statistics in plain PyTorch (backend ``torch``), and their argument checks.

Per target matrix the calibration pass reduces, inside the forward and backward pass:

Forward side (layer input ``x``, rows = tokens):   col_sq[j] += Σ_t x[t, j]²  and  ‖x_t‖²
Backward side (output gradient ``dy``):             row_sq[i] += Σ_t dy[t, i]²,
                                                    trace     += Σ_t ‖dy_t‖² ‖x_t‖²
``fisher_exact``:                                   diag[i, j] += Σ_t dy[t, i]² x[t, j]²

Padding rows are excluded through ``row_mask`` (True = real token).  Everything accumulates
in fp32 whatever the input dtype; inputs are upcast before squaring so fp16 activations whose
squares overflow fp16 are still correct.  The tests check every backend against float64 sums
(tests/ops/test_sensitivity.py); the registered ops (``library.py``) check the arguments once
with the ``validate_*`` functions below, then call a backend.
"""

from __future__ import annotations

import torch
from torch import Tensor


def input_stats(x: Tensor, row_mask: Tensor | None, col_sq: Tensor) -> Tensor:
    """``col_sq += Σ_t m_t x_t²`` (in place); returns per-row ``‖x_t‖²`` in fp32 (0 if masked)."""
    sq = x.float().square()
    token_sq = sq.sum(dim=1)
    if row_mask is None:
        col_sq += sq.sum(dim=0)
        return token_sq
    weights = row_mask.to(sq.dtype)
    token_sq *= weights
    col_sq.addmv_(sq.t(), weights)
    return token_sq


def grad_stats(
    dy: Tensor, row_mask: Tensor | None, x_token_sq: Tensor, row_sq: Tensor, trace: Tensor
) -> None:
    """``row_sq += Σ_t m_t dy_t²`` and ``trace += Σ_t ‖dy_t‖² ‖x_t‖²`` (in place).

    ``x_token_sq`` comes from :func:`input_stats` and is already 0 on masked rows, so the trace
    needs no mask.
    """
    sq = dy.float().square()
    if row_mask is None:
        row_sq += sq.sum(dim=0)
    else:
        row_sq.addmv_(sq.t(), row_mask.to(sq.dtype))
    trace += torch.dot(sq.sum(dim=1), x_token_sq).reshape(trace.shape)


def fisher_exact(dy: Tensor, x: Tensor, row_mask: Tensor | None, diag: Tensor) -> None:
    """``diag += (dy∘dy)ᵀ (x∘x)`` over unmasked rows (token-level empirical Fisher diagonal)."""
    dy2 = dy.float().square()
    x2 = x.float().square()
    if row_mask is not None:
        dy2 = dy2 * row_mask.to(dy2.dtype)[:, None]
    if diag.device == dy2.device:
        diag.addmm_(dy2.t(), x2)
    else:
        diag += (dy2.t() @ x2).to(diag.device)


# --------------------------------------------------------------------------------------------
# Argument checks shared by every backend (clear errors naming the tensor).

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_features(name: str, t: Tensor) -> None:
    if t.dim() != 2:
        raise ValueError(f"{name} must be a 2-D [tokens, features] tensor, got {tuple(t.shape)}")
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")


def _check_mask(row_mask: Tensor | None, tokens: int, device: torch.device) -> None:
    if row_mask is None:
        return
    if row_mask.dtype != torch.bool or row_mask.shape != (tokens,):
        raise ValueError(
            f"row_mask must be a bool tensor of shape ({tokens},), "
            f"got {row_mask.dtype} {tuple(row_mask.shape)}"
        )
    if row_mask.device != device:
        raise ValueError(f"row_mask is on {row_mask.device}, expected {device}")


def _check_buffer(name: str, buf: Tensor, shape: tuple[int, ...], device: torch.device) -> None:
    if buf.dtype != torch.float32 or tuple(buf.shape) != shape:
        raise ValueError(
            f"{name} must be a float32 tensor of shape {shape}, got {buf.dtype} {tuple(buf.shape)}"
        )
    if buf.device != device:
        raise ValueError(f"{name} is on {buf.device}, expected {device}")


def validate_input_stats(x: Tensor, row_mask: Tensor | None, col_sq: Tensor) -> None:
    """Check the arguments of ``input_stats``."""
    _check_features("x", x)
    _check_mask(row_mask, x.shape[0], x.device)
    _check_buffer("col_sq", col_sq, (x.shape[1],), x.device)


def validate_grad_stats(
    dy: Tensor, row_mask: Tensor | None, x_token_sq: Tensor, row_sq: Tensor, trace: Tensor
) -> None:
    """Check the arguments of ``grad_stats``."""
    _check_features("dy", dy)
    _check_mask(row_mask, dy.shape[0], dy.device)
    _check_buffer("x_token_sq", x_token_sq, (dy.shape[0],), dy.device)
    _check_buffer("row_sq", row_sq, (dy.shape[1],), dy.device)
    if trace.dtype != torch.float32 or trace.numel() != 1 or trace.device != dy.device:
        raise ValueError(
            f"trace must be a one-element float32 tensor on {dy.device}, "
            f"got {trace.dtype} {tuple(trace.shape)} on {trace.device}"
        )


def validate_fisher_exact(dy: Tensor, x: Tensor, row_mask: Tensor | None, diag: Tensor) -> None:
    """Check the arguments of ``fisher_exact`` (``diag`` may be on another device)."""
    _check_features("dy", dy)
    _check_features("x", x)
    if x.shape[0] != dy.shape[0] or x.device != dy.device:
        raise ValueError(
            f"dy and x must have the same tokens and device, got dy {tuple(dy.shape)} on "
            f"{dy.device} and x {tuple(x.shape)} on {x.device}"
        )
    _check_mask(row_mask, dy.shape[0], dy.device)
    shape = (dy.shape[1], x.shape[1])
    if diag.dtype != torch.float32 or tuple(diag.shape) != shape:
        raise ValueError(
            f"diag must be a float32 tensor of shape {shape}, got {diag.dtype} {tuple(diag.shape)}"
        )
