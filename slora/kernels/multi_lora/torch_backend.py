"""Plain PyTorch implementations of the grouped LoRA ops (backend ``torch``, the backend of last
resort, and the backward of every backend; the tests compare every backend with the float64
oracle of tests/oracles.py).  fp32 math whatever the input dtype; they read the group
metadata and ranks back to the host (host syncs), which is fine inside an opaque op.

Semantics (docs/kernels.md): for every token t of a group of slot k and every slice s,
``out[t, col_s : col_s + d_s] += scale[k, s] · Bt[k, s]ᵀ (A[k, s] x_t)``.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from slora.kernels.multi_lora.meta import LoRAMeta
from slora.kernels.multi_lora.weights import KernelWeights


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype: fp32 for fp32/fp16/bf16 (float64 stays float64, for gradcheck)."""
    return torch.promote_types(dtype, torch.float32)


def _groups(meta: LoRAMeta, device: torch.device) -> Iterator[tuple[int, Tensor]]:
    """(slot, token indices) of every non-empty group with an adapter."""
    slots = meta.group_slot.tolist()
    starts = meta.group_start.tolist()
    lens = meta.group_len.tolist()
    for slot, start, n in zip(slots, starts, lens):
        if slot < 0 or n == 0:
            continue
        if meta.order is not None:
            yield slot, meta.order[start : start + n]
        else:
            yield slot, torch.arange(start, start + n, device=device)


def _slices(w: KernelWeights, slot: int) -> Iterator[tuple[int, int, int, int, int, float]]:
    """(rank, col, d_s, a_off, b_off, scale) of every non-zero-rank slice of ``slot``."""
    ranks = w.ranks[slot].tolist()
    a_offs = w.a_offsets[slot].tolist()
    b_offs = w.b_offsets[slot].tolist()
    scales = w.scales[slot].tolist()
    for s, (r, col, d_s) in enumerate(zip(ranks, w.col_starts, w.slice_sizes)):
        if r > 0:
            yield r, col, d_s, a_offs[s], b_offs[s], scales[s]


def multi_lora_torch(
    x: Tensor, w: KernelWeights, meta: LoRAMeta, out: Tensor, overwrite: bool = False
) -> Tensor:
    """``out += delta`` (``out = delta`` with ``overwrite``) by a loop over groups and slices."""
    if overwrite:
        out.zero_()
    acc = acc_dtype(x.dtype)
    for slot, idx in _groups(meta, x.device):
        xs = x.index_select(0, idx).to(acc)
        for r, col, d_s, a_off, b_off, scale in _slices(w, slot):
            A = w.A[a_off : a_off + r].to(acc)
            Bt = w.Bt[b_off : b_off + r * d_s].view(r, d_s).to(acc)
            y = (xs @ A.t() * scale) @ Bt
            out[:, col : col + d_s].index_add_(0, idx, y.to(out.dtype))
    return out


def multi_lora_backward_torch(
    grad: Tensor, x: Tensor, w: KernelWeights, meta: LoRAMeta, needs: tuple[bool, bool, bool]
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Gradients of ``delta = multi_lora(x)`` for x, A and Bt, per group and slice as GEMMs on
    the group's tokens (fp32): with h = scale·A x and g = dy_s,
    ``dx += scale·(g Bt_sᵀ) A_s``, ``dA_s += scale·(g Bt_sᵀ)ᵀ x``, ``dBt_s += hᵀ g``."""
    acc = acc_dtype(x.dtype)
    dx = torch.zeros(x.shape, dtype=acc, device=x.device) if needs[0] else None
    dA = torch.zeros(w.A.shape, dtype=acc, device=x.device) if needs[1] else None
    dBt = torch.zeros(w.Bt.shape, dtype=acc, device=x.device) if needs[2] else None
    for slot, idx in _groups(meta, x.device):
        xs = x.index_select(0, idx).to(acc)
        gs = grad.index_select(0, idx).to(acc)
        dxs = torch.zeros_like(xs) if dx is not None else None
        for r, col, d_s, a_off, b_off, scale in _slices(w, slot):
            A = w.A[a_off : a_off + r].to(acc)
            Bt = w.Bt[b_off : b_off + r * d_s].view(r, d_s).to(acc)
            g = gs[:, col : col + d_s]
            dh = (g @ Bt.t()) * scale  # [n, r]
            if dxs is not None:
                dxs.addmm_(dh, A)
            if dA is not None:
                dA[a_off : a_off + r].addmm_(dh.t(), xs)
            if dBt is not None:
                h = (xs @ A.t()) * scale
                dBt[b_off : b_off + r * d_s].view(r, d_s).addmm_(h.t(), g)
        if dx is not None:
            dx.index_add_(0, idx, dxs)
    return dx, dA, dBt
