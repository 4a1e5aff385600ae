"""The multi-LoRA family's ops in PyTorch's dispatcher (``torch.library``), with fake
implementations for tracing, autograd and declared mutations (docs/kernels.md, "Registered
ops"):

- ``slora::multi_lora(x, <weights>, <meta>, backend) -> Tensor``: the delta, differentiable
  in x, A and Bt;
- ``slora::multi_lora_add(x, <weights>, <meta>, backend, out) -> ()``: ``out += delta`` in
  place (``out`` declared mutated), for servers;
- ``slora::multi_lora_backward(grad, x, <weights>, <meta>, needs) -> (dx, dA, dBt)``.

``<weights>`` is ``A, Bt, ranks, a_offsets, b_offsets, scales, slice_d_out, slice_col,
slice_sizes, max_rank`` (a :class:`KernelWeights`) and ``<meta>`` is ``order, group_slot,
group_start, group_len, tile_group, tile_first`` (a :class:`LoRAMeta`; the Triton tile map
optional: built per call when None).  ``backend`` ('' = default) names the kernel: the op
resolves it when it runs (``slora.kernels.registry.kernel``), so the choice never enters a
traced graph.  Every forward kernel has the signature ``fn(x, w: KernelWeights, meta:
LoRAMeta, out, overwrite=False) -> out``: ``out += delta`` (``out = delta`` with
``overwrite``), fp32 accumulation.  Adding a backend: docs/kernels.md.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from slora.kernels.multi_lora.meta import LoRAMeta
from slora.kernels.multi_lora.packed import KernelWeights
from slora.kernels.registry import NOT_DIFFERENTIABLE, kernel, register_backends, register_op

register_backends(
    "multi_lora",
    {
        "triton": "slora.kernels.multi_lora.triton_backend:multi_lora_triton",
        "cpp": "slora.kernels.multi_lora.cpp_backend:multi_lora_cpp",
        "torch": "slora.kernels.multi_lora.torch_backend:multi_lora_torch",
    },
)
# The gradients are GEMMs on each group's tokens (PyTorch's BLAS) on every backend.
register_backends(
    "multi_lora_backward",
    {"torch": "slora.kernels.multi_lora.torch_backend:multi_lora_backward_torch"},
)


def forward_kernel(device: torch.device, backend: str = "") -> Callable:
    """The forward kernel of ``backend`` ('' = the default for ``device``)."""
    return kernel("multi_lora", device, backend)


# --------------------------------------------------------------------------------------------
# Raw-tensor signatures <-> KernelWeights / LoRAMeta


def _weights(A, Bt, ranks, a_offsets, b_offsets, scales, slice_d_out, slice_col, sizes, r_max):  # noqa: ANN001
    return KernelWeights(
        A, Bt, ranks, a_offsets, b_offsets, scales, slice_d_out, slice_col, list(sizes), r_max
    )


def _meta(num_tokens: int, *groups) -> LoRAMeta:  # noqa: ANN002
    """order, group_slot, group_start, group_len, tile_group, tile_first -> LoRAMeta."""
    return LoRAMeta(num_tokens, *groups[:4], 0, *groups[4:])


def op_args(w: KernelWeights, meta: LoRAMeta) -> tuple:
    """The positional weight and metadata arguments of the ops, in schema order."""
    return (
        *w, meta.order, meta.group_slot, meta.group_start, meta.group_len,
        meta.tile_group, meta.tile_first,
    )  # fmt: skip


def run_kernel(
    x: Tensor, w: KernelWeights, meta: LoRAMeta, backend: str, out: Tensor | None
) -> Tensor:
    """What ``slora::multi_lora`` (``out=None``) or ``slora::multi_lora_add`` computes, called
    without the dispatcher round trip (tens of µs per call): the eager inference fast path."""
    fn = kernel("multi_lora", x.device, backend)
    if out is None:
        fresh = torch.empty(x.shape[0], w.d_out, dtype=x.dtype, device=x.device)
        return fn(x, w, meta, fresh, overwrite=True)
    return fn(x, w, meta, out)


# --------------------------------------------------------------------------------------------
# slora::multi_lora (functional, differentiable)


def _multi_lora(
    x: Tensor,
    A: Tensor,
    Bt: Tensor,
    ranks: Tensor,
    a_offsets: Tensor,
    b_offsets: Tensor,
    scales: Tensor,
    slice_d_out: Tensor,
    slice_col: Tensor,
    slice_sizes: list[int],
    max_rank: int,
    order: Tensor | None,
    group_slot: Tensor,
    group_start: Tensor,
    group_len: Tensor,
    tile_group: Tensor | None,
    tile_first: Tensor | None,
    backend: str,
) -> Tensor:
    w = _weights(A, Bt, ranks, a_offsets, b_offsets, scales, slice_d_out, slice_col,
                 slice_sizes, max_rank)  # fmt: skip
    meta = _meta(x.shape[0], order, group_slot, group_start, group_len, tile_group, tile_first)
    out = torch.empty(x.shape[0], sum(slice_sizes), dtype=x.dtype, device=x.device)
    return kernel("multi_lora", x.device, backend)(x, w, meta, out, overwrite=True)


# The fakes take the arguments after x (after grad, x, A, Bt for the backward) as ``args``, in
# schema order: args[8] is slice_sizes, the backward's args[-1] is needs.


def _multi_lora_fake(x, *args):  # noqa: ANN001
    return x.new_empty(x.shape[0], sum(args[8]))


def _setup(ctx, inputs, output) -> None:  # noqa: ANN001
    x, A, Bt, *rest = inputs
    tensors = [t for t in rest[:12] if isinstance(t, Tensor)]  # up to group_len: no tile map
    ctx.save_for_backward(x, A, Bt, *tensors)
    ctx.has_order = inputs[11] is not None
    ctx.slice_sizes, ctx.max_rank = inputs[9], inputs[10]


def _backward(ctx, grad):  # noqa: ANN001
    x, A, Bt, ranks, a_off, b_off, scales, d_out, col, *meta = ctx.saved_tensors
    order = meta.pop(0) if ctx.has_order else None
    needs = list(ctx.needs_input_grad[:3])
    dx, dA, dBt = torch.ops.slora.multi_lora_backward(
        grad, x, A, Bt, ranks, a_off, b_off, scales, d_out, col, ctx.slice_sizes,
        ctx.max_rank, order, *meta, None, None, needs,
    )  # fmt: skip
    grads = [g if need else None for g, need in zip((dx, dA, dBt), needs)]
    return (*grads, *([None] * 15))


register_op("multi_lora", _multi_lora, _multi_lora_fake, autograd=(_backward, _setup))


# --------------------------------------------------------------------------------------------
# slora::multi_lora_add (in place into out)


def _multi_lora_add(
    x: Tensor,
    A: Tensor,
    Bt: Tensor,
    ranks: Tensor,
    a_offsets: Tensor,
    b_offsets: Tensor,
    scales: Tensor,
    slice_d_out: Tensor,
    slice_col: Tensor,
    slice_sizes: list[int],
    max_rank: int,
    order: Tensor | None,
    group_slot: Tensor,
    group_start: Tensor,
    group_len: Tensor,
    tile_group: Tensor | None,
    tile_first: Tensor | None,
    backend: str,
    out: Tensor,
) -> None:
    w = _weights(A, Bt, ranks, a_offsets, b_offsets, scales, slice_d_out, slice_col,
                 slice_sizes, max_rank)  # fmt: skip
    meta = _meta(x.shape[0], order, group_slot, group_start, group_len, tile_group, tile_first)
    kernel("multi_lora", x.device, backend)(x, w, meta, out)


def _multi_lora_add_fake(x, *args):  # noqa: ANN001
    return None


# in place, for inference: not differentiable (a differentiable call goes to slora::multi_lora)
register_op(
    "multi_lora_add",
    _multi_lora_add,
    _multi_lora_add_fake,
    mutates_args=("out",),
    autograd=NOT_DIFFERENTIABLE,
)


# --------------------------------------------------------------------------------------------
# slora::multi_lora_backward


def _multi_lora_backward(
    grad: Tensor,
    x: Tensor,
    A: Tensor,
    Bt: Tensor,
    ranks: Tensor,
    a_offsets: Tensor,
    b_offsets: Tensor,
    scales: Tensor,
    slice_d_out: Tensor,
    slice_col: Tensor,
    slice_sizes: list[int],
    max_rank: int,
    order: Tensor | None,
    group_slot: Tensor,
    group_start: Tensor,
    group_len: Tensor,
    tile_group: Tensor | None,
    tile_first: Tensor | None,
    needs: list[bool],
) -> tuple[Tensor, Tensor, Tensor]:
    w = _weights(A, Bt, ranks, a_offsets, b_offsets, scales, slice_d_out, slice_col,
                 slice_sizes, max_rank)  # fmt: skip
    meta = _meta(x.shape[0], order, group_slot, group_start, group_len)  # tiles: unused
    grads = kernel("multi_lora_backward", x.device, "torch")(grad, x, w, meta, tuple(needs))
    return tuple(  # type: ignore[return-value]
        g.to(like.dtype) if g is not None else like.new_empty(0)
        for g, like in zip(grads, (x, A, Bt))
    )


def _multi_lora_backward_fake(grad, x, A, Bt, *args):  # noqa: ANN001
    needs = args[-1]
    return tuple(
        torch.empty_like(t) if need else t.new_empty(0) for t, need in zip((x, A, Bt), needs)
    )


register_op("multi_lora_backward", _multi_lora_backward, _multi_lora_backward_fake)
