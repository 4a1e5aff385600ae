"""Python face of the native sensitivity ops in ``csrc/`` (backend ``cpp``).

Each function here has the signature of the PyTorch reference it replaces.  The one native
extension is JIT-built on first use (see ``_native.py``); ``available()`` says whether that
worked.  The multi-LoRA family's backend lives in ``slora/kernels/multi_lora/cpp_backend.py``.
"""

from __future__ import annotations

from types import ModuleType
from typing import TYPE_CHECKING

from slora.kernels._native import available, extension

if TYPE_CHECKING:
    from torch import Tensor

__all__ = ["available", "extension"]


# --------------------------------------------------------------------------------------------
# Sensitivity statistics (csrc/sensitivity_cpu.cpp); semantics in slora/kernels/sensitivity_stats.


def _sensitivity_ext() -> ModuleType:
    ext = extension()
    if ext is None:
        raise RuntimeError("backend 'cpp' requested but the native ops could not be built")
    return ext


def accumulate_input_stats_cpp(x: Tensor, row_mask: Tensor | None, col_sq: Tensor) -> Tensor:
    """C++ backend of ``accumulate_input_stats_torch``: one pass over ``x``, returns ‖x_t‖²."""
    import torch

    from slora.kernels.sensitivity_stats import validate_input_stats

    validate_input_stats(x, row_mask, col_sq)
    token_sq = torch.empty(x.shape[0], dtype=torch.float32)
    target = col_sq if col_sq.is_contiguous() else torch.zeros_like(col_sq)
    mask = row_mask.contiguous() if row_mask is not None else None
    _sensitivity_ext().sq_stats(x, mask, target, token_sq, None, None)
    if target is not col_sq:
        col_sq += target
    return token_sq


def accumulate_grad_stats_cpp(
    dy: Tensor, row_mask: Tensor | None, x_token_sq: Tensor, row_sq: Tensor, trace: Tensor
) -> None:
    """C++ backend of ``accumulate_grad_stats_torch``: row sums of dy² and the trace term."""
    import torch

    from slora.kernels.sensitivity_stats import validate_grad_stats

    validate_grad_stats(dy, row_mask, x_token_sq, row_sq, trace)
    target = row_sq if row_sq.is_contiguous() else torch.zeros_like(row_sq)
    trace_buf = trace if trace.is_contiguous() else trace.clone()
    mask = row_mask.contiguous() if row_mask is not None else None
    _sensitivity_ext().sq_stats(dy, mask, target, None, x_token_sq.contiguous(), trace_buf)
    if target is not row_sq:
        row_sq += target
    if trace_buf is not trace:
        trace.copy_(trace_buf)


def cuda_reductions() -> ModuleType | None:
    """The CUDA sources of the sensitivity reductions (csrc/sensitivity_reductions.cu), JIT-built
    with nvcc on a CUDA machine for comparison with the Triton kernels; None if impossible."""
    import torch

    if not torch.cuda.is_available():
        return None
    try:
        from torch.utils.cpp_extension import load

        from slora.kernels._native import cache_dir, csrc_dir

        sources = ["sensitivity_reductions_binding.cpp", "sensitivity_reductions.cu"]
        return load(
            name="slora_sens_cuda",
            sources=[str(csrc_dir() / s) for s in sources],
            extra_cflags=["-O3"],
            extra_cuda_cflags=["-O3"],
            build_directory=str(cache_dir("slora_sens_cuda")),
        )
    except Exception:  # noqa: BLE001 - no nvcc / toolkit mismatch: the caller skips
        return None
