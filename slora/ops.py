"""slora's public op surface: thin wrappers over ops registered with PyTorch's dispatcher.

Every op has implementations per backend — ``triton`` (CUDA, or the CPU under
``TRITON_INTERPRET=1``), ``cpp`` (the native CPU ops built from ``csrc/``) and ``torch`` (the
plain PyTorch backend).  The backend is chosen, in order, by the ``backend=`` argument, the
``SLORA_BACKEND`` environment variable, and the device (Triton on CUDA, the C++ op on the CPU
when it builds, else PyTorch); see ``slora.kernels.backend``.  The ops, their schemas and the
kernel contract are described in docs/kernels.md.
"""

from __future__ import annotations

import torch
from torch import Tensor

from slora.kernels import sensitivity as _sensitivity  # noqa: F401 - registers the ops
from slora.kernels.backend import BACKENDS, resolve_backend

__all__ = [
    "BACKENDS",
    "LoRAMeta",
    "PackedAdapters",
    "accumulate_fisher_exact",
    "accumulate_grad_stats",
    "accumulate_input_stats",
    "build_segment_meta",
    "build_token_meta",
    "lora_slices",
    "multi_lora",
    "resolve_backend",
]

# --------------------------------------------------------------------------------------------
# Sensitivity statistics: slora/kernels/sensitivity/ (semantics in docs/kernels.md).


def accumulate_input_stats(
    x: Tensor, row_mask: Tensor | None, col_sq: Tensor, backend: str | None = None
) -> Tensor:
    """``col_sq += Σ_t x_t²`` over unmasked rows; returns per-row ``‖x_t‖²`` (fp32, 0 if masked)."""
    return torch.ops.slora.input_stats(x, row_mask, col_sq, backend or "")


def accumulate_grad_stats(
    dy: Tensor,
    row_mask: Tensor | None,
    x_token_sq: Tensor,
    row_sq: Tensor,
    trace: Tensor,
    backend: str | None = None,
) -> None:
    """``row_sq += Σ_t dy_t²`` over unmasked rows and ``trace += Σ_t ‖dy_t‖²‖x_t‖²``."""
    torch.ops.slora.grad_stats(dy, row_mask, x_token_sq, row_sq, trace, backend or "")


def accumulate_fisher_exact(
    dy: Tensor, x: Tensor, row_mask: Tensor | None, diag: Tensor, backend: str | None = None
) -> None:
    """``diag += (dy∘dy)ᵀ(x∘x)`` over unmasked rows (``diag`` may live on another device)."""
    torch.ops.slora.fisher_exact(dy, x, row_mask, diag, backend or "")


# --------------------------------------------------------------------------------------------
# Grouped heterogeneous-rank LoRA: slora/kernels/multi_lora/ (contract in docs/kernels.md).

from slora.kernels.multi_lora import (  # noqa: E402
    LoRAMeta,
    PackedAdapters,
    build_segment_meta,
    build_token_meta,
)
from slora.kernels.multi_lora import library as _ml_lib  # noqa: E402
from slora.kernels.multi_lora import meta as _ml_meta  # noqa: E402
from slora.kernels.multi_lora import slices as _ml_slices  # noqa: E402
from slora.kernels.multi_lora.meta import num_tiles  # noqa: E402, F401 - tile-map length


def multi_lora(
    x: Tensor,
    token_slots: Tensor | None,
    packed: PackedAdapters,
    *,
    seg_indptr: Tensor | None = None,
    seg_slots: Tensor | None = None,
    meta: LoRAMeta | None = None,
    out: Tensor | None = None,
    backend: str | None = None,
) -> Tensor:
    """``y_t += scale · B_slot(t) (A_slot(t) x_t)`` for every token, all adapters in one launch.

    ``x`` is ``[T, d_in]``; slots come per token (``token_slots`` [T], −1 = none, any order),
    per prefill segment (``seg_indptr`` [G+1], ``seg_slots`` [G], with ``token_slots=None``),
    or as a prebuilt ``meta`` (:func:`build_token_meta` / :func:`build_segment_meta`, built
    once per batch and reused for every layer; nothing else is then checked against values,
    so the call traces with ``torch.compile(fullgraph=True)`` and captures in CUDA graphs).
    Returns ``out`` (``[T, Σ slice d_out]``, updated in place by ``slora::multi_lora_add``)
    or a new delta (``slora::multi_lora``), with gradients for x, ``packed.A`` and
    ``packed.Bt`` when they require them.
    """
    if meta is None:
        meta = _ml_meta.check_and_build_meta(x, token_slots, packed, seg_indptr, seg_slots, out)
    else:
        _ml_meta.check_call(x, packed, meta, out)
    name = backend or ""
    if torch.is_grad_enabled() and (
        x.requires_grad or packed.A.requires_grad or packed.Bt.requires_grad
    ):
        delta = torch.ops.slora.multi_lora(x, *_ml_lib.op_args(packed.weights(), meta), name)
        return delta if out is None else out.add_(delta)
    if not torch.compiler.is_compiling():  # eager, no autograd: the ops' kernel directly,
        result = _ml_lib.run_kernel(x, packed.weights(), meta, name, out)  # no dispatcher trip
        if out is not None and not out.is_inference():
            # The native and Triton kernels write through the data pointer: bump the version
            # so that autograd refuses a backward that saved `out` before this write.
            torch.autograd.graph.increment_version(out)
        return result
    args = _ml_lib.op_args(packed.weights(), meta)
    if out is None:
        return torch.ops.slora.multi_lora(x, *args, name)
    torch.ops.slora.multi_lora_add(x, *args, name, out)
    return out


def lora_slices(
    x: Tensor,
    As: list[Tensor] | tuple[Tensor, ...],
    Bs: list[Tensor] | tuple[Tensor, ...],
    scales: list[float] | tuple[float, ...],
    backend: str | None = None,
    *,
    split: bool = False,
) -> Tensor | list[Tensor]:
    """The LoRA branches of modules sharing one input (q/k/v, gate/up) in one grouped op.

    ``x`` is ``[..., d_in]``; slice s has ``A_s`` [r_s, d_in] and ``B_s`` [d_out_s, r_s]
    (r_s may differ, may be 0).  Returns ``[..., Σ d_out_s]`` (with ``split``, the list of
    ``[..., d_out_s]``) with gradients for x, A_s, B_s (``slora::lora_slices``: one adapter's
    slices are dense GEMMs on every backend, so ``backend`` is only validated).
    """
    _ml_slices.check_slices(x, As, Bs, scales)
    if backend is not None:
        resolve_backend(x.device, backend)
    lead = x.shape[:-1]
    *ys, _ = torch.ops.slora.lora_slices(
        x.reshape(-1, x.shape[-1]), list(As), list(Bs), [float(s) for s in scales]
    )
    ys = [y.view(*lead, y.shape[-1]) for y in ys]
    return ys if split else torch.cat(ys, dim=-1)
