"""The sensitivity statistics as ops of PyTorch's dispatcher (docs/kernels.md,
"Sensitivity statistics ops"):

- ``slora::input_stats(x, row_mask?, col_sq!, backend) -> Tensor``: ``col_sq += Σ_t m_t x_t²``,
  returns ``‖x_t‖²`` (fp32, 0 on masked rows);
- ``slora::grad_stats(dy, row_mask?, x_token_sq, row_sq!, trace!, backend) -> ()``:
  ``row_sq += Σ_t m_t dy_t²``, ``trace += Σ_t ‖dy_t‖² ‖x_t‖²``;
- ``slora::fisher_exact(dy, x, row_mask?, diag!, backend) -> ()``: ``diag += (dy∘dy)ᵀ (x∘x)``
  over unmasked rows (``diag`` may live on another device, e.g. the host).

``!`` marks the accumulators, declared mutated in the schemas (``Tensor(a!)``), so that
``torch.compile`` and functionalization see the in-place updates.  ``backend`` ('' = default)
names the kernel, resolved when the op runs (``slora.kernels.registry.kernel``), so the choice never
enters a traced graph.  Every op has CPU and CUDA kernels, a fake (meta) implementation that
checks the arguments and gives the output's shape, and an autograd registration: statistics are
not differentiable, so the Autograd key falls through and the kernels run without recording a
graph.  (A Python kernel at the Autograd key that re-dispatches below it would do the same for
~30 µs more per call; ``torch.library.custom_op`` costs ~70 µs more.  The calibration pass
calls these ops twice per target matrix and batch, next to a layer's GEMMs of similar size.)
"""

from __future__ import annotations

import torch
from torch import Tensor

from slora.kernels.registry import NOT_DIFFERENTIABLE, kernel, register_backends, register_op
from slora.kernels.sensitivity.torch_backend import (
    validate_fisher_exact,
    validate_grad_stats,
    validate_input_stats,
)

_MODULES = {
    "triton": "slora.kernels.sensitivity.triton_backend",
    "cpp": "slora.kernels.sensitivity.cpp_backend",
    "torch": "slora.kernels.sensitivity.torch_backend",
}
OPS = ("input_stats", "grad_stats", "fisher_exact")
for _op in OPS:
    register_backends(_op, {backend: f"{module}:{_op}" for backend, module in _MODULES.items()})


def _run(op: str, device: torch.device, backend: str, *args: Tensor | None):
    """Run the kernel; without recording a graph when an input requires grad (rare: the
    calibration hooks pass detached tensors, and ``no_grad`` costs a few µs per call)."""
    fn = kernel(op, device, backend)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in args):
        with torch.no_grad():
            return fn(*args)
    return fn(*args)


def _input_stats(x: Tensor, row_mask: Tensor | None, col_sq: Tensor, backend: str) -> Tensor:
    validate_input_stats(x, row_mask, col_sq)
    return _run("input_stats", x.device, backend, x, row_mask, col_sq)


def _grad_stats(dy, row_mask, x_token_sq, row_sq, trace, backend: str) -> None:  # noqa: ANN001
    validate_grad_stats(dy, row_mask, x_token_sq, row_sq, trace)
    _run("grad_stats", dy.device, backend, dy, row_mask, x_token_sq, row_sq, trace)


def _fisher_exact(dy, x, row_mask, diag, backend: str) -> None:  # noqa: ANN001
    validate_fisher_exact(dy, x, row_mask, diag)
    _run("fisher_exact", dy.device, backend, dy, x, row_mask, diag)


def _input_stats_fake(x, row_mask, col_sq, backend):  # noqa: ANN001
    validate_input_stats(x, row_mask, col_sq)
    return x.new_empty(x.shape[0], dtype=torch.float32)


def _grad_stats_fake(dy, row_mask, x_token_sq, row_sq, trace, backend):  # noqa: ANN001
    validate_grad_stats(dy, row_mask, x_token_sq, row_sq, trace)


def _fisher_exact_fake(dy, x, row_mask, diag, backend):  # noqa: ANN001
    validate_fisher_exact(dy, x, row_mask, diag)


_SCHEMAS = {
    "input_stats": "(Tensor x, Tensor? row_mask, Tensor(a!) col_sq, str backend) -> Tensor",
    "grad_stats": "(Tensor dy, Tensor? row_mask, Tensor x_token_sq, Tensor(a!) row_sq, "
    "Tensor(b!) trace, str backend) -> ()",
    "fisher_exact": "(Tensor dy, Tensor x, Tensor? row_mask, Tensor(a!) diag, str backend) -> ()",
}
register_op("input_stats", _input_stats, _input_stats_fake, schema=_SCHEMAS["input_stats"],
            autograd=NOT_DIFFERENTIABLE)  # fmt: skip
register_op("grad_stats", _grad_stats, _grad_stats_fake, schema=_SCHEMAS["grad_stats"],
            autograd=NOT_DIFFERENTIABLE)  # fmt: skip
register_op("fisher_exact", _fisher_exact, _fisher_exact_fake, schema=_SCHEMAS["fisher_exact"],
            autograd=NOT_DIFFERENTIABLE)  # fmt: skip
