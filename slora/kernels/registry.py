"""One way to register an op with PyTorch's dispatcher and one lazy table of its kernels, for
every op family (docs/kernels.md, "Registered ops" and "Adding a backend").

- :func:`register_op` defines ``slora::<name>`` (schema inferred from the implementation's type
  hints, or given), registers the implementation for CPU and CUDA, its fake (meta)
  implementation for tracing, and its autograd behaviour: a backward formula, none (a backward
  through the op is an error), or ``NOT_DIFFERENTIABLE`` (the Autograd key falls through: the
  kernel runs without recording a graph, for statistics and in-place accumulators).  A
  ``torch.library.Library`` fragment rather than ``torch.library.custom_op``, whose Python
  wrapper costs tens of µs per call.
- :func:`register_backends` fills the table ``(op, backend name) -> "module:function"``;
  :func:`kernel` resolves the backend for a device (``slora.kernels.backend``) and imports the
  function on first use, cached per (op, device, backend name), so Triton and the native
  build stay optional and a call costs one dictionary lookup.
- :func:`native` is the native extension, or the one error saying it could not be built
  (``slora.kernels._native.UNAVAILABLE``).
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable, Mapping, Sequence
from types import ModuleType

import torch

from slora.kernels import _native
from slora.kernels.backend import resolve_backend

NAMESPACE = "slora"
NOT_DIFFERENTIABLE = "not differentiable"

_LIB = torch.library.Library(NAMESPACE, "FRAGMENT")
_TABLE: dict[tuple[str, str], str] = {}  # (op, backend name) -> "module:function"


def native() -> ModuleType:
    """The native extension built from ``csrc/`` (building it on first use)."""
    ext = _native.extension()
    if ext is None:
        raise RuntimeError(_native.UNAVAILABLE)
    return ext


def register_backends(op: str, targets: Mapping[str, str]) -> None:
    """Map each backend name of ``op`` to its kernel, ``"package.module:function"``."""
    for backend, target in targets.items():
        _TABLE[(op, backend)] = target


@functools.cache  # once per target: an import statement costs microseconds on every call
def _load(target: str) -> Callable:
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


@functools.cache  # one lookup per call: a server calls it for every layer of every step
def kernel(op: str, device: torch.device | str, backend: str = "") -> Callable:
    """The function running ``op`` for ``backend`` ('' = the default for ``device``)."""
    name = resolve_backend(device, backend or None)
    target = _TABLE.get((op, name))
    if target is None:
        raise RuntimeError(f"op {op!r} has no {name!r} backend")
    return _load(target)


def _no_backward(name: str) -> Callable:
    def backward(ctx, *grads):  # noqa: ANN001, ANN202
        raise RuntimeError(f"{NAMESPACE}::{name} has no gradient formula")

    return backward


def register_op(
    name: str,
    impl: Callable,
    fake: Callable,
    *,
    mutates_args: Sequence[str] = (),
    schema: str | None = None,
    autograd: tuple[Callable, Callable] | str | None = None,
) -> torch._ops.OpOverloadPacket:
    """Define ``slora::<name>`` with ``impl`` on CPU and CUDA and ``fake`` for tracing.

    ``schema`` (e.g. ``"(Tensor x, Tensor(a!) acc) -> ()"``) defaults to the one inferred from
    ``impl``'s type hints with ``mutates_args`` declared mutated.  ``autograd`` is
    ``(backward, setup_context)`` (``torch.library.register_autograd``), ``None`` (a backward
    through the op raises) or :data:`NOT_DIFFERENTIABLE` (required for an op that mutates).
    """
    if schema is None:
        schema = torch.library.infer_schema(impl, mutates_args=tuple(mutates_args))
    _LIB.define(name + schema)
    for key in ("CPU", "CUDA"):
        _LIB.impl(name, impl, key)
    qualname = f"{NAMESPACE}::{name}"
    torch.library.register_fake(qualname, fake, lib=_LIB)
    if autograd == NOT_DIFFERENTIABLE:
        _LIB.impl(name, torch.library.fallthrough_kernel, "Autograd")
    elif mutates_args:
        raise ValueError(f"{qualname} mutates its arguments: autograd must be NOT_DIFFERENTIABLE")
    elif isinstance(autograd, tuple):
        backward, setup_context = autograd
        torch.library.register_autograd(qualname, backward, setup_context=setup_context, lib=_LIB)
    else:
        torch.library.register_autograd(
            qualname, _no_backward(name), setup_context=lambda ctx, inputs, output: None, lib=_LIB
        )
    return getattr(torch.ops.slora, name)
