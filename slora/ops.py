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
        "torch": "slora.kernels.sensitivity_stats:accumulate_input_stats_torch",
    },
    "grad_stats": {
        "torch": "slora.kernels.sensitivity_stats:accumulate_grad_stats_torch",
    },
    "fisher_exact": {
        "torch": "slora.kernels.sensitivity_stats:accumulate_fisher_exact_torch",
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
