"""The one dispatch point between slora's Python layers and its kernels.

Every op has implementations per backend — ``triton`` (CUDA, or the CPU under
``TRITON_INTERPRET=1``), ``cpp`` (the native CPU ops built from ``csrc/``) and ``torch`` (the
plain PyTorch reference) — registered in ``_IMPLEMENTATIONS`` as ``"module:function"`` so that
optional dependencies are imported only when used.  The backend is chosen, in order, by the
``backend=`` argument, the ``SLORA_BACKEND`` environment variable, and the device (Triton on
CUDA, the C++ op on the CPU when it builds, else PyTorch).  An op that has no implementation
for the chosen backend runs its PyTorch reference.
"""

from __future__ import annotations

import functools
import importlib
import os
from collections.abc import Callable

import torch
from torch import Tensor

BACKENDS = ("triton", "cpp", "torch")

_IMPLEMENTATIONS: dict[str, dict[str, str]] = {
    "input_stats": {
        "triton": "slora.kernels.sensitivity_stats:accumulate_input_stats_triton",
        "cpp": "slora.kernels.native_ops:accumulate_input_stats_cpp",
        "torch": "slora.kernels.sensitivity_stats:accumulate_input_stats_torch",
    },
    "grad_stats": {
        "triton": "slora.kernels.sensitivity_stats:accumulate_grad_stats_triton",
        "cpp": "slora.kernels.native_ops:accumulate_grad_stats_cpp",
        "torch": "slora.kernels.sensitivity_stats:accumulate_grad_stats_torch",
    },
    "fisher_exact": {
        "triton": "slora.kernels.sensitivity_stats:accumulate_fisher_exact_triton",
        "torch": "slora.kernels.sensitivity_stats:accumulate_fisher_exact_torch",
    },
    "multi_lora": {
        "triton": "slora.kernels.multi_lora:multi_lora_triton",
        "cpp": "slora.kernels.native_ops:multi_lora_cpp",
        "torch": "slora.kernels.multi_lora:multi_lora_torch",
    },
}


@functools.cache
def _triton_usable(device_type: str) -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    if device_type == "cuda":
        return True
    return os.environ.get("TRITON_INTERPRET", "") not in ("", "0")


@functools.cache
def _native_usable() -> bool:
    from slora.kernels import native_ops

    return native_ops.available()


def resolve_backend(device: torch.device | str, backend: str | None = None) -> str:
    """Name of the backend that runs ops on ``device`` (see the module docstring)."""
    device_type = torch.device(device).type
    requested = backend or os.environ.get("SLORA_BACKEND") or None
    if requested is not None:
        if requested not in BACKENDS:
            raise ValueError(
                f"unknown backend {requested!r} (from "
                f"{'backend=' if backend else 'SLORA_BACKEND'}); expected one of {BACKENDS}"
            )
        if requested == "triton" and not _triton_usable(device_type):
            raise RuntimeError(
                f"backend 'triton' requested for a {device_type} tensor, but Triton is not "
                "importable or, on the CPU, TRITON_INTERPRET=1 is not set"
            )
        if requested == "cpp" and device_type != "cpu":
            raise RuntimeError(f"backend 'cpp' runs on the CPU only, got a {device_type} tensor")
        if requested == "cpp" and not _native_usable():
            raise RuntimeError("backend 'cpp' requested but the native ops could not be built")
        return requested
    if device_type == "cuda" and _triton_usable("cuda"):
        return "triton"
    if device_type == "cpu" and _native_usable():
        return "cpp"
    return "torch"


@functools.cache
def _load(target: str) -> Callable:
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def implementation(op: str, device: torch.device | str, backend: str | None = None) -> Callable:
    """The callable implementing ``op`` on ``device`` for the resolved backend."""
    table = _IMPLEMENTATIONS[op]
    return _load(table.get(resolve_backend(device, backend), table["torch"]))


# --------------------------------------------------------------------------------------------
# Sensitivity statistics (SPEC §1); see slora/kernels/sensitivity_stats.py for the semantics.


def accumulate_input_stats(
    x: Tensor, row_mask: Tensor | None, col_sq: Tensor, backend: str | None = None
) -> Tensor:
    """``col_sq += Σ_t x_t²`` over unmasked rows; returns per-row ``‖x_t‖²`` (fp32, 0 if masked)."""
    return implementation("input_stats", x.device, backend)(x, row_mask, col_sq)


def accumulate_grad_stats(
    dy: Tensor,
    row_mask: Tensor | None,
    x_token_sq: Tensor,
    row_sq: Tensor,
    trace: Tensor,
    backend: str | None = None,
) -> None:
    """``row_sq += Σ_t dy_t²`` over unmasked rows and ``trace += Σ_t ‖dy_t‖²‖x_t‖²``."""
    implementation("grad_stats", dy.device, backend)(dy, row_mask, x_token_sq, row_sq, trace)


def accumulate_fisher_exact(
    dy: Tensor, x: Tensor, row_mask: Tensor | None, diag: Tensor, backend: str | None = None
) -> None:
    """``diag += (dy∘dy)ᵀ(x∘x)`` over unmasked rows (``diag`` may live on another device)."""
    implementation("fisher_exact", dy.device, backend)(dy, x, row_mask, diag)


# --------------------------------------------------------------------------------------------
# Grouped heterogeneous-rank LoRA (SPEC §4); see slora/kernels/multi_lora.py for the layout.

from slora.kernels.multi_lora import PackedAdapters  # noqa: E402


def multi_lora(
    x: Tensor,
    token_slots: Tensor | None,
    packed: PackedAdapters,
    *,
    seg_indptr: Tensor | None = None,
    seg_slots: Tensor | None = None,
    out: Tensor | None = None,
    backend: str | None = None,
) -> Tensor:
    """``y_t += scale · B_slot(t) (A_slot(t) x_t)`` for every token, all adapters in one launch.

    ``x`` is ``[T, d_in]``; slots come per token (``token_slots`` [T], −1 = none, any order)
    or per prefill segment (``seg_indptr`` [G+1], ``seg_slots`` [G], with ``token_slots=None``).
    Returns ``out`` (``[T, Σ slice d_out]``, updated in place) or a new delta tensor.  Carries
    gradients for x, ``packed.A`` and ``packed.Bt`` when they require them.
    """
    from slora.kernels import multi_lora as ml

    meta = ml.check_and_build_meta(x, token_slots, packed, seg_indptr, seg_slots, out)
    T = x.shape[0]
    fn = implementation("multi_lora", x.device, backend)
    if torch.is_grad_enabled() and (
        x.requires_grad or packed.A.requires_grad or packed.Bt.requires_grad
    ):
        delta = ml.multi_lora_autograd(x, meta, packed, fn)
        return delta if out is None else out.add_(delta)
    if out is None:  # the backend writes every element: no zero-fill pass
        out = torch.empty(T, packed.d_out, dtype=x.dtype, device=x.device)
        return fn(x, meta, packed, out, overwrite=True)
    return fn(x, meta, packed, out)


def lora_slices(
    x: Tensor,
    As: list[Tensor] | tuple[Tensor, ...],
    Bs: list[Tensor] | tuple[Tensor, ...],
    scales: list[float] | tuple[float, ...],
    backend: str | None = None,
) -> Tensor:
    """The LoRA branches of modules sharing one input (q/k/v, gate/up) in one grouped call.

    ``x`` is ``[..., d_in]``; slice s has ``A_s`` [r_s, d_in] and ``B_s`` [d_out_s, r_s]
    (r_s may differ, may be 0).  Returns ``[..., Σ d_out_s]`` with gradients for x, A_s, B_s.
    """
    from slora.kernels import multi_lora as ml

    ml.check_slices(x, As, Bs, scales)
    d_in = x.shape[-1]
    lead = x.shape[:-1]
    x2 = x.reshape(-1, d_in)
    name = resolve_backend(x.device, backend)
    if name == "torch" or any(w.dtype != x.dtype for w in (*As, *Bs)):
        fn = ml.lora_slices_torch
    else:
        fn = ml.lora_slices_with(implementation("multi_lora", x.device, name))

    y = ml.LoRASlicesFunction.apply(x2, tuple(float(s) for s in scales), fn, *As, *Bs)
    return y.reshape(*lead, y.shape[-1])
