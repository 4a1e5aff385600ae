"""The multi-LoRA kernels by backend name (imported only when chosen, so that Triton and the
native build stay optional).  Every forward kernel has the signature
``fn(x, w: KernelWeights, meta: LoRAMeta, out, overwrite=False) -> out``: ``out += delta``
(``out = delta`` with ``overwrite``), fp32 accumulation.  Adding a backend: docs/kernels.md."""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable

import torch

from slora.kernels.backend import resolve_backend

FORWARD = {
    "triton": "slora.kernels.multi_lora.triton_backend:multi_lora_triton",
    "cpp": "slora.kernels.multi_lora.cpp_backend:multi_lora_cpp",
    "torch": "slora.kernels.multi_lora.reference:multi_lora_torch",
}
# The gradients are GEMMs on each group's tokens (PyTorch's BLAS) on every backend.
BACKWARD = "slora.kernels.multi_lora.reference:multi_lora_backward_torch"


@functools.cache  # once per target: an import statement costs microseconds on every call
def _load(target: str) -> Callable:
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


@functools.cache  # one lookup per call: a server calls it for every layer of every step
def forward_kernel(device: torch.device, backend: str = "") -> Callable:
    """The forward kernel of ``backend`` ('' = the default for ``device``)."""
    return _load(FORWARD[resolve_backend(device, backend or None)])


def backward_kernel(device: torch.device) -> Callable:
    return _load(BACKWARD)
