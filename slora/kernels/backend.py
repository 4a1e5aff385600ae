"""Which backend runs an op: ``triton`` (CUDA, or the CPU under ``TRITON_INTERPRET=1``),
``cpp`` (the native CPU ops built from ``csrc/``) or ``torch`` (plain PyTorch: the families'
``torch_backend.py``).

Chosen, in order, by the op's ``backend`` argument, the ``SLORA_BACKEND`` environment variable
(read when slora is imported), and the device (Triton on CUDA, the C++ ops on the CPU when they
build, else PyTorch).  Ops resolve the name when they run, inside their registered
implementation, so the choice never enters a traced graph.
"""

from __future__ import annotations

import functools
import os

import torch

BACKENDS = ("triton", "cpp", "torch")


@functools.cache
def triton_usable(device_type: str) -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    if device_type == "cuda":
        return True
    return os.environ.get("TRITON_INTERPRET", "") not in ("", "0")


@functools.cache
def native_usable() -> bool:
    from slora.kernels import _native

    return _native.available()


# Read once, when slora is imported: an ``os.environ`` lookup of a missing key costs about a
# microsecond, on every op call.
ENV_BACKEND = os.environ.get("SLORA_BACKEND") or None


def resolve_backend(device: torch.device | str, backend: str | None = None) -> str:
    """Name of the backend that runs ops on ``device`` (see the module docstring)."""
    device_type = device.type if isinstance(device, torch.device) else torch.device(device).type
    return _resolve(device_type, backend or None)


@functools.cache  # its inputs are fixed once the process runs (errors are not cached)
def _resolve(device_type: str, backend: str | None) -> str:
    requested = backend or ENV_BACKEND
    if requested is not None:
        if requested not in BACKENDS:
            raise ValueError(
                f"unknown backend {requested!r} (from "
                f"{'backend=' if backend else 'SLORA_BACKEND'}); expected one of {BACKENDS}"
            )
        if requested == "triton" and not triton_usable(device_type):
            raise RuntimeError(
                f"backend 'triton' requested for a {device_type} tensor, but Triton is not "
                "importable or, on the CPU, TRITON_INTERPRET=1 is not set"
            )
        if requested == "cpp" and device_type != "cpu":
            raise RuntimeError(f"backend 'cpp' runs on the CPU only, got a {device_type} tensor")
        if requested == "cpp" and not native_usable():
            from slora.kernels._native import UNAVAILABLE

            raise RuntimeError(UNAVAILABLE)
        return requested
    if device_type == "cuda" and triton_usable("cuda"):
        return "triton"
    if device_type == "cpu" and native_usable():
        return "cpp"
    return "torch"
