"""The multi-LoRA family as registered torch.library ops: opcheck on every op (schema, fake
implementation, autograd registration, AOT dispatch) and tracing with torch.compile."""

from __future__ import annotations

import oracles
import pytest
import torch
from conftest import BACKENDS, assert_close, make_adapters
from torch.library import opcheck

from slora import ops
from slora.kernels.multi_lora.library import op_args
from slora.ops import PackedAdapters

SIZES = [9, 4]


@pytest.fixture
def problem():
    adapters = make_adapters([(3, 0), None, (5, 2), (1, 6)], 16, SIZES)
    packed = PackedAdapters.from_list(adapters, d_out=SIZES)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(11, 16, generator=gen)
    slots = torch.randint(-1, 4, (11,), generator=gen)
    return adapters, packed, x, slots


@pytest.mark.parametrize("form", ["tokens", "segments"])
def test_opcheck_multi_lora_ops(problem, form):
    _, packed, x, slots = problem
    if form == "tokens":
        meta = ops.build_token_meta(slots, packed.max_slots)
    else:
        meta = ops.build_segment_meta(torch.tensor([0, 4, 4, 11]), torch.tensor([2, 0, -1]), 11, 4)
    args = op_args(packed.weights(), meta)
    A = packed.A.clone().requires_grad_()
    Bt = packed.Bt.clone().requires_grad_()
    xg = x.clone().requires_grad_()
    for be in ("torch", *(b for b in BACKENDS if b == "cpp")):
        opcheck(torch.ops.slora.multi_lora.default, (xg, A, Bt, *args[2:], be))
        opcheck(torch.ops.slora.multi_lora_add.default, (x, *args, be, torch.randn(11, 13)))
    grad = torch.randn(11, 13)
    opcheck(torch.ops.slora.multi_lora_backward.default, (grad, x, *args, [True, True, True]))
    opcheck(torch.ops.slora.multi_lora_backward.default, (grad, x, *args, [True, False, False]))


def test_opcheck_lora_slices_ops():
    As = [torch.randn(r, 12, requires_grad=True) for r in (3, 0, 5)]
    Bs = [torch.randn(d, r, requires_grad=True) for d, r in zip((7, 4, 6), (3, 0, 5))]
    x = torch.randn(9, 12, requires_grad=True)
    opcheck(torch.ops.slora.lora_slices.default, (x, As, Bs, [0.5, 1.0, 2.0]))
    *ys, h = torch.ops.slora.lora_slices(x, As, Bs, [0.5, 1.0, 2.0])
    dy = [torch.randn_like(y) for y in ys]
    for needs in ((True, True), (False, True), (True, False)):
        opcheck(
            torch.ops.slora.lora_slices_backward.default,
            (dy, x.detach(), h.detach(), [a.detach() for a in As], [b.detach() for b in Bs],
             [0.5, 1.0, 2.0], *needs),
        )  # fmt: skip


def test_serving_call_compiles_fullgraph_and_mutates_out(problem):
    """Metadata built once per step, reused by every layer; out += delta in place."""
    adapters, packed, x, slots = problem
    packed2 = PackedAdapters.from_list(
        make_adapters([(2, 2), (4, 1), None, (3, 3)], 16, SIZES, seed=3)
    )

    def step(x, slots, out1, out2):
        meta = ops.build_token_meta(slots, 4)
        ops.multi_lora(x, None, packed, meta=meta, out=out1)
        ops.multi_lora(x, None, packed2, meta=meta, out=out2)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    base1, base2 = torch.randn(11, 13), torch.randn(11, 13)
    out1, out2 = base1.clone(), base2.clone()
    compiled(x, slots, out1, out2)
    assert_close(
        out1, oracles.multi_lora(x, slots, adapters, SIZES) + base1.double(), torch.float32
    )
    want2 = torch.zeros(11, 13)
    ops.multi_lora(x, slots, packed2, out=want2, backend="torch")
    torch.testing.assert_close(out2 - base2, want2, rtol=1e-5, atol=1e-5)


def test_segment_form_compiles_fullgraph(problem):
    adapters, packed, x, _ = problem
    indptr, seg_slots = torch.tensor([0, 3, 3, 11]), torch.tensor([3, 1, 0])
    fn = torch.compile(
        lambda x, i, s: ops.multi_lora(x, None, packed, seg_indptr=i, seg_slots=s),
        fullgraph=True,
        backend="aot_eager",
    )
    token_slots = torch.repeat_interleave(seg_slots, indptr.diff())
    assert_close(
        fn(x, indptr, seg_slots), oracles.multi_lora(x, token_slots, adapters, SIZES), torch.float32
    )


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_ops_opcheck_and_cuda_graph_with_prebuilt_meta(dtype):
    """On a GPU: opcheck of the CUDA (Triton) path, then a decode step — metadata built once,
    two layers adding into their outputs — captured in a CUDA graph and replayed."""
    adapters = make_adapters([(3, 0), None, (5, 2), (1, 6)], 16, SIZES, dtype=dtype)
    packed = PackedAdapters.from_list(adapters, d_out=SIZES, device="cuda")
    gen = torch.Generator().manual_seed(6)
    x_cpu = torch.randn(33, 16, generator=gen).to(dtype)
    slots_cpu = torch.randint(-1, 4, (33,), generator=gen)
    x, slots = x_cpu.cuda(), slots_cpu.cuda()
    meta = ops.build_token_meta(slots, packed.max_slots)
    args = op_args(packed.weights(), meta)
    fresh = torch.zeros(33, 13, dtype=dtype, device="cuda")
    opcheck(torch.ops.slora.multi_lora_add.default, (x, *args, "triton", fresh))
    opcheck(torch.ops.slora.multi_lora.default, (x, *args, "triton"))
    out1 = torch.zeros(33, 13, dtype=dtype, device="cuda")
    out2 = torch.zeros(33, 13, dtype=dtype, device="cuda")

    def step():
        meta = ops.build_token_meta(slots, packed.max_slots)
        ops.multi_lora(x, None, packed, meta=meta, out=out1)
        ops.multi_lora(x, None, packed, meta=meta, out=out2)

    step()  # warm-up / Triton compile
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    out1.zero_()
    out2.zero_()
    graph.replay()
    torch.cuda.synchronize()
    ref = oracles.multi_lora(x_cpu, slots_cpu, adapters, SIZES)
    assert_close(out1.cpu(), ref, dtype)
    assert_close(out2.cpu(), ref, dtype)


@pytest.mark.cuda
def test_cuda_lora_slices_gradients_match_plain_autograd():
    As = [torch.randn(r, 40, device="cuda", requires_grad=True) for r in (4, 0, 9)]
    Bs = [
        torch.randn(d, r, device="cuda", requires_grad=True) for d, r in zip((24, 8, 16), (4, 0, 9))
    ]
    x = torch.randn(3, 7, 40, device="cuda", requires_grad=True)
    y = ops.lora_slices(x, As, Bs, [0.5, 1.0, 2.0])
    w = torch.randn_like(y)
    (y * w).sum().backward()
    leaves = [t.detach().double().requires_grad_() for t in (x, *As, *Bs)]
    x64, A64, B64 = leaves[0], leaves[1:4], leaves[4:]
    plain = torch.cat([s * (x64 @ a.t()) @ b.t() for a, b, s in zip(A64, B64, (0.5, 1.0, 2.0))], -1)
    (plain * w.double()).sum().backward()
    for got, want in zip((x, *As, *Bs), leaves):
        assert_close(got.grad.cpu(), want.grad.cpu(), torch.float32)


def test_gradcheck_float64_torch_path():
    """Exact gradients (float64 finite differences) of both differentiable ops."""
    gen = torch.Generator().manual_seed(8)
    As = [
        torch.randn(r, 6, generator=gen, dtype=torch.float64, requires_grad=True) for r in (2, 0, 3)
    ]
    Bs = [
        torch.randn(d, r, generator=gen, dtype=torch.float64, requires_grad=True)
        for d, r in zip((4, 2, 5), (2, 0, 3))
    ]
    x = torch.randn(5, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    fn = lambda x, *w: tuple(
        torch.ops.slora.lora_slices(x, list(w[:3]), list(w[3:]), [0.5, 1.0, 2.0])[:3]
    )  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, *As, *Bs))

    packed = PackedAdapters.from_list(make_adapters([(2, 1), None, (3, 0)], 6, [4, 3]))
    meta = ops.build_token_meta(torch.tensor([2, -1, 0, 0, 2]), 3)
    _, _, *rest = op_args(packed.weights(), meta)
    A = packed.A.double().requires_grad_()
    Bt = packed.Bt.double().requires_grad_()
    scalars = [t.double() if t.dtype == torch.float32 else t for t in rest[:4]]
    args = (*scalars, *rest[4:])
    assert torch.autograd.gradcheck(
        lambda x, A, Bt: torch.ops.slora.multi_lora(x, A, Bt, *args, "torch"), (x, A, Bt)
    )


def test_second_derivatives_are_refused_naming_the_op(problem):
    """The backward ops have no gradient formula: differentiating through them is an error
    that names the op, never a silently missing term."""
    _, packed, x, slots = problem
    x = x.clone().requires_grad_()
    y = ops.multi_lora(x, slots, packed, backend="torch")
    (gx,) = torch.autograd.grad((y**2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="slora::multi_lora_backward has no gradient formula"):
        gx.sum().backward()
    As = [torch.randn(3, 16, requires_grad=True)]
    ys = torch.ops.slora.lora_slices(x, As, [torch.randn(5, 3)], [1.0])
    (gA,) = torch.autograd.grad((ys[0] ** 2).sum(), As[0], create_graph=True)
    with pytest.raises(RuntimeError, match="slora::lora_slices_backward has no gradient formula"):
        gA.sum().backward()
