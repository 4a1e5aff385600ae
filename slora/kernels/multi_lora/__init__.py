"""Grouped heterogeneous-rank LoRA: many adapters of different ranks in one launch.

For tokens t, adapter slots k with ranks r ≥ 0 and a slot per token (−1 = none)::

    y[t, slice s] += scale[k, s] · B[k, s] (A[k, s] x_t),     k = slot(t)

One concern per module (the contract, layouts and how to add a backend: docs/kernels.md):

- ``packed``: :class:`PackedAdapters` (adapters at their true ranks) and its free lists;
- ``meta``: :class:`LoRAMeta`, the metadata builders and checks;
- ``torch_backend``: the plain PyTorch backend (and the backward of every backend);
- ``triton_utils`` / ``triton_shrink`` / ``triton_expand`` / ``triton_backend``: the Triton
  kernels; ``cpp_backend``: the C++ kernel of ``csrc/multi_lora_cpu.cpp``;
- ``library``: the kernels by backend name and the ``torch.library`` ops
  (``slora::multi_lora``, ``slora::multi_lora_add``, ``slora::multi_lora_backward``) with
  fake implementations and autograd; ``slices``: the training op ``slora::lora_slices``.
"""

from slora.kernels.multi_lora import library, slices  # noqa: F401 - registers the ops
from slora.kernels.multi_lora.meta import (
    LoRAMeta,
    build_segment_meta,
    build_token_meta,
    check_and_build_meta,
)
from slora.kernels.multi_lora.packed import PackedAdapters, SliceAdapter, pack_slices
from slora.kernels.multi_lora.slices import check_slices, lora_slices_torch
from slora.kernels.multi_lora.torch_backend import multi_lora_backward_torch, multi_lora_torch
from slora.kernels.multi_lora.weights import KernelWeights

__all__ = [
    "KernelWeights",
    "LoRAMeta",
    "PackedAdapters",
    "SliceAdapter",
    "build_segment_meta",
    "build_token_meta",
    "check_and_build_meta",
    "check_slices",
    "lora_slices_torch",
    "multi_lora_backward_torch",
    "multi_lora_torch",
    "pack_slices",
]
