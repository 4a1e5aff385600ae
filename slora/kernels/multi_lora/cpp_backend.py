"""Backend ``cpp``: the CPU kernel of ``csrc/multi_lora_cpu.cpp`` (shrink + expand fused per
chunk of a group's tokens, OpenMP over chunks, ``torch.get_num_threads()`` threads)."""

from __future__ import annotations

import torch
from torch import Tensor

from slora.kernels._native import extension
from slora.kernels.multi_lora.meta import LoRAMeta
from slora.kernels.multi_lora.packed import KernelWeights


def multi_lora_cpp(
    x: Tensor, w: KernelWeights, meta: LoRAMeta, out: Tensor, overwrite: bool = False
) -> Tensor:
    """``out += delta`` (``out = delta`` with ``overwrite``, so a fresh ``out`` needs no
    zeroing)."""
    ext = extension()
    if ext is None:
        raise RuntimeError("backend 'cpp' requested but the native ops could not be built")
    order = meta.order if meta.order is not None else torch.empty(0, dtype=torch.int64)
    ext.multi_lora(
        x if x.stride(1) == 1 else x.contiguous(),
        w.A, w.Bt, order, meta.group_slot, meta.group_start, meta.group_len,
        w.ranks, w.a_offsets, w.b_offsets, w.scales,
        list(w.slice_sizes), list(w.col_starts), out, overwrite,
    )  # fmt: skip
    return out
