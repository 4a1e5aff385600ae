"""The sensitivity statistics as registered torch.library ops: opcheck on every op and backend
(schema and declared mutations, fake implementation, autograd registration, AOT dispatch),
non-differentiability, and tracing with torch.compile."""

from __future__ import annotations

import pytest
import torch
from conftest import BACKENDS
from torch.library import opcheck

from slora import ops


def _inputs(tokens: int, d_in: int, d_out: int, dtype: torch.dtype, masked: bool):
    g = torch.Generator().manual_seed(tokens * 31 + d_in)
    x = (torch.randn(tokens, d_in, generator=g) * 2 + 0.1).to(dtype)
    dy = (torch.randn(tokens, d_out, generator=g) + 0.1).to(dtype)
    mask = torch.rand(tokens, generator=g) > 0.3 if masked else None
    return x, dy, mask


# Odd sizes, one token, a masked bf16 batch; kept tiny: opcheck runs each op several times.
CASES = [(7, 5, 3, torch.float32, True), (1, 9, 4, torch.float32, False),
         (6, 4, 5, torch.bfloat16, True)]  # fmt: skip


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c[:3])) + str(c[3])[-4:])
def test_opcheck_sensitivity_ops(backend, case):
    tokens, d_in, d_out, dtype, masked = case
    x, dy, mask = _inputs(tokens, d_in, d_out, dtype, masked)
    token_sq = (x.float().square().sum(1) + 0.5) * (mask if mask is not None else 1)
    opcheck(torch.ops.slora.input_stats.default, (x, mask, torch.rand(d_in), backend))
    opcheck(
        torch.ops.slora.grad_stats.default,
        (dy, mask, token_sq, torch.rand(d_out), torch.rand(1), backend),
    )
    opcheck(torch.ops.slora.fisher_exact.default, (dy, x, mask, torch.rand(d_out, d_in), backend))
    # With inputs that require grad: the autograd registration is checked too.
    xg, dyg = x.float().requires_grad_(), dy.float().requires_grad_()
    opcheck(torch.ops.slora.input_stats.default, (xg, mask, torch.rand(d_in), backend))
    opcheck(torch.ops.slora.fisher_exact.default, (dyg, xg, None, torch.rand(d_out, d_in), backend))


def test_statistics_are_not_differentiable_and_leave_the_graph_alone():
    x = torch.randn(6, 4, requires_grad=True)
    y = x * 3  # a non-leaf in a live graph, as in the calibration hooks
    col = torch.zeros(4)
    token_sq = ops.accumulate_input_stats(y, None, col, backend="torch")
    assert not token_sq.requires_grad and token_sq.grad_fn is None
    assert not col.requires_grad
    row, trace = torch.zeros(4), torch.zeros(1)
    ops.accumulate_grad_stats(y, None, token_sq, row, trace, backend="torch")
    assert not row.requires_grad and not trace.requires_grad
    y.sum().backward()  # the graph through y is intact
    torch.testing.assert_close(x.grad, torch.full_like(x, 3.0))


def test_ops_trace_with_torch_compile_fullgraph():
    def step(x, dy, mask, col, row, trace, diag):
        token_sq = ops.accumulate_input_stats(x, mask, col)
        ops.accumulate_grad_stats(dy, mask, token_sq, row, trace)
        ops.accumulate_fisher_exact(dy, x, mask, diag)
        return token_sq

    x, dy, mask = _inputs(9, 5, 3, torch.float32, True)
    bufs = [torch.rand(5), torch.rand(3), torch.rand(1), torch.rand(3, 5)]
    want = [b.clone() for b in bufs]
    want_tok = step(x, dy, mask, *want)
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    got_tok = compiled(x, dy, mask, *bufs)
    torch.testing.assert_close(got_tok, want_tok)
    for got, ref in zip(bufs, want):
        torch.testing.assert_close(got, ref)  # the in-place updates survive functionalization


def test_unknown_backend_is_named():
    with pytest.raises(ValueError, match="unknown backend 'cuda'"):
        ops.accumulate_input_stats(torch.randn(2, 3), None, torch.zeros(3), backend="cuda")
