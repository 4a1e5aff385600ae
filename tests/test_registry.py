"""slora/kernels/registry.py: one way to register an op and one lazy backend table."""

from __future__ import annotations

import uuid

import pytest
import torch

from slora.kernels import _native, registry
from slora.kernels.multi_lora import cpp_backend
from slora.ops import PackedAdapters, build_token_meta


def _name() -> str:
    return f"test_op_{uuid.uuid4().hex[:8]}"


def test_registered_op_runs_traces_and_differentiates():
    def impl(x: torch.Tensor, scale: float) -> torch.Tensor:
        return x * scale

    def backward(ctx, grad):  # noqa: ANN001
        return grad * ctx.scale, None

    def setup(ctx, inputs, output):  # noqa: ANN001
        ctx.scale = inputs[1]

    op = registry.register_op(_name(), impl, lambda x, scale: torch.empty_like(x),
                              autograd=(backward, setup))  # fmt: skip
    x = torch.randn(5, requires_grad=True)
    op(x, 3.0).sum().backward()
    assert torch.equal(x.grad, torch.full((5,), 3.0))
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():  # the fake implementation answers under tracing
        assert op(torch.empty(2, 7), 2.0).shape == (2, 7)


def test_op_without_a_formula_refuses_backward_and_mutating_ops_must_say_so():
    name = _name()
    op = registry.register_op(name, lambda x: x.clone(), lambda x: torch.empty_like(x),
                              schema="(Tensor x) -> Tensor")  # fmt: skip
    y = op(torch.randn(3, requires_grad=True))
    with pytest.raises(RuntimeError, match=f"slora::{name} has no gradient formula"):
        y.sum().backward()

    def accumulate(x: torch.Tensor, acc: torch.Tensor) -> None:
        acc += x

    with pytest.raises(ValueError, match="NOT_DIFFERENTIABLE"):
        registry.register_op(_name(), accumulate, lambda x, acc: None, mutates_args=("acc",))


def test_backend_table_resolves_lazily_and_names_what_is_missing():
    op = _name()
    registry.register_backends(op, {"torch": "slora.kernels.multi_lora.torch_backend:acc_dtype"})
    fn = registry.kernel(op, torch.device("cpu"), "torch")
    assert fn(torch.bfloat16) == torch.float32
    other = _name()
    registry.register_backends(other, {"triton": "slora.kernels.multi_lora.triton_backend:x"})
    with pytest.raises(RuntimeError, match=f"op '{other}' has no 'torch' backend"):
        registry.kernel(other, torch.device("cpu"), "torch")


def test_the_native_error_is_one_message(monkeypatch):
    packed = PackedAdapters.from_list([[(torch.randn(2, 4), torch.randn(3, 2), 1.0)]])
    x, meta = torch.randn(2, 4), build_token_meta(torch.tensor([0, 0]), 1)
    monkeypatch.setattr(_native, "extension", lambda: None)
    monkeypatch.setattr(cpp_backend, "extension", lambda: None)  # bound on import (hot path)
    with pytest.raises(RuntimeError) as raised:
        registry.native()
    assert str(raised.value) == _native.UNAVAILABLE
    with pytest.raises(RuntimeError) as raised:
        cpp_backend.multi_lora_cpp(x, packed.weights(), meta, torch.zeros(2, 3))
    assert str(raised.value) == _native.UNAVAILABLE
