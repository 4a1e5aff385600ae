"""Training path: the LoRA branches of one adapter's modules that share an input (q/k/v,
gate/up), each slice with its own rank, as one registered op with its own backward.

This is the grouped op for a single slot: every token uses the one adapter, so the grouped
GEMMs become dense ones.  The members' weights are passed as they are (``Tensor[]``), never
copied into a pack.  Forward: one shrink GEMM for all slices (x read once) and one
scaled expand per slice written straight into its output columns; the shrink output ``h`` is
kept for the backward, which is one GEMM for dx and one for every A (over the concatenated
ranks) plus one per slice for dh and dB.  fp32 math whatever the input dtype.

- ``slora::lora_slices(x, As, Bs, scales) -> Tensor[]``: ``[y_0, .., y_{S-1}, h]``, one output
  per slice (so each member's gradient arrives on its own, with no slicing in autograd);
- ``slora::lora_slices_backward(dys, x, h, As, Bs, scales, needs_x, needs_w) -> Tensor[]``:
  ``[dx, dA_0, .., dB_0, ..]``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from slora.kernels.multi_lora.torch_backend import acc_dtype
from slora.kernels.registry import register_op


def _f32(t: Tensor) -> Tensor:
    """At least fp32 (float64 stays float64, for gradcheck)."""
    return t.to(acc_dtype(t.dtype))


def _lora_slices(
    x: Tensor, As: list[Tensor], Bs: list[Tensor], scales: list[float]
) -> list[Tensor]:
    xf = _f32(x)
    h = xf @ torch.cat([_f32(a) for a in As]).t()  # [T, Σ r]: x read once for every slice
    ys, rank = [], 0
    for A, B, scale in zip(As, Bs, scales):
        r = A.shape[0]
        y = xf.new_empty(x.shape[0], B.shape[0])
        torch.addmm(y, h[:, rank : rank + r], _f32(B).t(), beta=0, alpha=scale, out=y)
        ys.append(y.to(x.dtype))
        rank += r
    return [*ys, h]


def _lora_slices_fake(x, As, Bs, scales):  # noqa: ANN001
    T = x.shape[0]
    h = x.new_empty(T, sum(a.shape[0] for a in As), dtype=acc_dtype(x.dtype))
    return [*(x.new_empty(T, b.shape[0]) for b in Bs), h]


def _lora_slices_backward(
    dys: list[Tensor],
    x: Tensor,
    h: Tensor,
    As: list[Tensor],
    Bs: list[Tensor],
    scales: list[float],
    needs_x: bool,
    needs_w: bool,
) -> list[Tensor]:
    dh = torch.empty_like(h)
    dBs, rank = [], 0
    for dy, A, B, scale in zip(dys, As, Bs, scales):
        r = A.shape[0]
        g = _f32(dy)
        dhs = dh[:, rank : rank + r]
        torch.addmm(dhs, g, _f32(B), beta=0, alpha=scale, out=dhs)
        if needs_w:
            dB = torch.addmm(
                h.new_empty(B.shape), g.t(), h[:, rank : rank + r], beta=0, alpha=scale
            )
            dBs.append(dB.to(B.dtype))
        rank += r
    dx = (dh @ torch.cat([_f32(a) for a in As])).to(x.dtype) if needs_x else x.new_empty(0)
    dAs = []
    if needs_w:
        dA_cat = dh.t() @ _f32(x)
        dAs = [g.to(a.dtype, copy=True) for g, a in zip(dA_cat.split([a.shape[0] for a in As]), As)]
    return [dx, *dAs, *dBs]


def _lora_slices_backward_fake(dys, x, h, As, Bs, scales, needs_x, needs_w):  # noqa: ANN001
    dx = torch.empty_like(x) if needs_x else x.new_empty(0)
    weights = [torch.empty_like(t) for t in (*As, *Bs)] if needs_w else []
    return [dx, *weights]


def _setup(ctx, inputs, output) -> None:  # noqa: ANN001
    x, As, Bs, scales = inputs
    ctx.save_for_backward(x, output[-1], *As, *Bs)
    ctx.n, ctx.scales = len(As), scales


def _backward(ctx, grads):  # noqa: ANN001
    x, h, *weights = ctx.saved_tensors
    n = ctx.n
    dys = [  # an unused slice's gradient may come as None
        g if g is not None else x.new_zeros(x.shape[0], B.shape[0])
        for g, B in zip(grads[:n], weights[n:])
    ]
    needs_x = ctx.needs_input_grad[0]
    needs_w = any(_flat(ctx.needs_input_grad[1])) or any(_flat(ctx.needs_input_grad[2]))
    out = torch.ops.slora.lora_slices_backward(
        dys, x, h, weights[:n], weights[n:], ctx.scales, needs_x, needs_w
    )
    dx = out[0] if needs_x else None
    dAs = list(out[1 : 1 + n]) if needs_w else None
    dBs = list(out[1 + n :]) if needs_w else None
    return dx, dAs, dBs, None


def _flat(need: bool | Sequence[bool]) -> list[bool]:
    return [need] if isinstance(need, bool) else list(need)


register_op("lora_slices_backward", _lora_slices_backward, _lora_slices_backward_fake)
register_op("lora_slices", _lora_slices, _lora_slices_fake, autograd=(_backward, _setup))


def lora_slices_torch(
    x: Tensor, As: Sequence[Tensor], Bs: Sequence[Tensor], scales: Sequence[float]
) -> Tensor:
    """Plain PyTorch version of ``slora::lora_slices``'s ``y``: one shrink and one expand
    per slice, fp32 math, differentiable by autograd."""
    parts = [s * (_f32(x) @ _f32(a).t()) @ _f32(b).t() for a, b, s in zip(As, Bs, scales)]
    return torch.cat(parts, dim=-1).to(x.dtype)


def check_slices(x: Tensor, As: Sequence[Tensor], Bs: Sequence[Tensor], scales) -> None:  # noqa: ANN001
    """Validate the arguments of ``slora.ops.lora_slices``."""
    d_in = x.shape[-1]
    if not (len(As) == len(Bs) == len(scales)) or not As:
        raise ValueError(
            f"As, Bs and scales must be non-empty and of equal length, "
            f"got {len(As)}, {len(Bs)}, {len(scales)}"
        )
    for s, scale in enumerate(scales):
        if not math.isfinite(float(scale)):
            raise ValueError(f"scales[{s}] must be a finite number, got {scale!r}")
    for s, (A, B) in enumerate(zip(As, Bs)):
        if A.dim() != 2 or A.shape[1] != d_in or B.dim() != 2 or B.shape[1] != A.shape[0]:
            raise ValueError(
                f"slice {s}: expected A [r, {d_in}] and B [d_out, r], "
                f"got A {tuple(A.shape)} and B {tuple(B.shape)}"
            )
