"""Backend ``cpp``: the CPU kernel of ``csrc/multi_lora_cpu.cpp`` (shrink + expand fused per
chunk of a group's tokens, OpenMP over chunks, ``torch.get_num_threads()`` threads)."""

from __future__ import annotations

from torch import Tensor

from slora.kernels._native import UNAVAILABLE, extension
from slora.kernels.multi_lora.meta import LoRAMeta
from slora.kernels.multi_lora.weights import KernelWeights


def native_args(
    x: Tensor, w: KernelWeights, meta: LoRAMeta, out: Tensor, overwrite: bool = False
) -> tuple:
    """The native op's positional arguments (x with strided rows is copied there; a None
    order is the identity)."""
    return (
        x, w.A, w.Bt, meta.order, meta.group_slot, meta.group_start, meta.group_len,
        w.ranks, w.a_offsets, w.b_offsets, w.scales, w.slice_sizes, w.col_starts, out, overwrite,
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
