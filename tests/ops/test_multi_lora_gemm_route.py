"""The ``cpp`` backend's GEMM route (csrc/multi_lora_gemm_cpu.cpp): groups of many tokens of
one adapter computed with ATen's matrix multiply.  Which groups take it depends on the CPU
(``cpp_backend.gemm_route``); ``SLORA_CPU_GEMM_MIN_TOKENS`` forces it, so every route is
checked against the float64 oracle on any machine: all groups through the GEMM (1), a mix of
both routes in one call (6), none (0)."""

from __future__ import annotations

import oracles
import pytest
import torch
from conftest import BACKENDS, assert_close, check_into_outputs, generator, make_adapters

from slora.kernels.multi_lora import (
    PackedAdapters,
    build_segment_meta,
    build_token_meta,
    cpp_backend,
)
from slora.kernels.multi_lora.library import forward_kernel

pytestmark = pytest.mark.skipif("cpp" not in BACKENDS, reason="native ops not built")

D_IN, SIZES = 37, [24, 8, 19]
RANKS = [(4, 0, 9), None, (16, 5, 1), (0, 0, 0), (3, 3, 3)]
GROUP_SIZES = [1, 5, 6, 0, 23]  # per slot: below, at and past the forced threshold of 6


@pytest.fixture
def route(monkeypatch, request):  # noqa: ANN001
    """Forces the GEMM threshold (request.param tokens) for the test, then forgets it."""
    monkeypatch.setenv(cpp_backend.GEMM_ENV, str(request.param))
    cpp_backend.reset_gemm_choice()
    yield request.param
    cpp_backend.reset_gemm_choice()


def _case(dtype: torch.dtype, seed: str):
    adapters = make_adapters(RANKS, D_IN, SIZES, dtype=dtype, seed=seed)
    packed = PackedAdapters.from_list(adapters, d_out=SIZES)
    slots = torch.repeat_interleave(torch.arange(len(RANKS)), torch.tensor(GROUP_SIZES))
    slots = torch.cat([slots, torch.full((3,), -1)])  # tokens without an adapter
    return adapters, packed, slots


@pytest.mark.parametrize("route", [1, 6, 0], indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("form", ["tokens", "segments"])
@pytest.mark.parametrize("overwrite", [False, True])
def test_every_route_matches_float64(route, dtype, form, overwrite):
    """Token form (any order, −1 slots) and segment form (an empty segment), adding into a
    random output or overwriting a poisoned one, into x's dtype and into fp32."""
    adapters, packed, slots = _case(dtype, f"gemm-{dtype}-{form}")
    gen = generator(f"gemm-x-{dtype}-{form}-{overwrite}")
    if form == "tokens":
        slots = slots[torch.randperm(slots.numel(), generator=gen)]
        meta = build_token_meta(slots, packed.max_slots)
    else:
        counts = torch.tensor([*GROUP_SIZES, 3])
        indptr = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
        meta = build_segment_meta(indptr, torch.tensor([0, 1, 2, 3, 4, -1]), slots.numel(),
                                  packed.max_slots)  # fmt: skip
    T = slots.numel()
    x = torch.randn(T, D_IN, generator=gen).to(dtype)
    ref = oracles.multi_lora(x, slots, adapters, SIZES)
    fn = forward_kernel(torch.device("cpu"), "cpp")
    check_into_outputs(lambda out: fn(x, packed.weights(), meta, out, overwrite=overwrite),
                       ref, dtype, overwrite, gen)  # fmt: skip


@pytest.mark.parametrize("route", [1], indirect=True)
def test_gemm_route_writes_into_inference_tensors_outside_inference_mode(route):
    """vLLM makes its buffers during warm-up (inference mode) and serves outside it: the
    route writes into such an out like the fused kernel does, and x may require grad."""
    adapters, packed, slots = _case(torch.float32, "gemm-inference")
    with torch.inference_mode():
        out = torch.zeros(slots.numel(), packed.d_out)
    x = torch.randn(slots.numel(), D_IN, requires_grad=True)
    meta = build_token_meta(slots, packed.max_slots)
    forward_kernel(torch.device("cpu"), "cpp")(x, packed.weights(), meta, out)
    assert_close(out, oracles.multi_lora(x.detach(), slots, adapters, SIZES))


@pytest.mark.parametrize("route", [1], indirect=True)
def test_gemm_route_uses_x_with_strided_rows(route):
    adapters, packed, slots = _case(torch.bfloat16, "gemm-strided")
    wide = torch.randn(slots.numel(), 2 * D_IN).to(torch.bfloat16)
    x = wide[:, 5 : 5 + D_IN]
    out = torch.full((slots.numel(), packed.d_out), float("nan"), dtype=torch.bfloat16)
    meta = build_token_meta(slots, packed.max_slots)
    forward_kernel(torch.device("cpu"), "cpp")(x, packed.weights(), meta, out, overwrite=True)
    assert_close(out, oracles.multi_lora(x, slots, adapters, SIZES))


@pytest.mark.parametrize("value", ["-1", "many", "1.5"])
def test_bad_threshold_names_the_variable(monkeypatch, value):
    monkeypatch.setenv(cpp_backend.GEMM_ENV, value)
    cpp_backend.reset_gemm_choice()
    try:
        with pytest.raises(ValueError, match=f"{cpp_backend.GEMM_ENV}='{value}': expected"):
            cpp_backend.gemm_route(torch.bfloat16)
    finally:
        cpp_backend.reset_gemm_choice()


def test_default_choice_follows_the_cpu_table(monkeypatch):
    """Without the variable, a dtype takes the GEMM route only where the table names one of
    the CPU's flags for it; fp32 never."""
    monkeypatch.delenv(cpp_backend.GEMM_ENV, raising=False)
    cpp_backend.reset_gemm_choice()
    monkeypatch.setattr(cpp_backend.cpu_features, "has", lambda flag: flag == "amx_bf16")
    try:
        want = cpp_backend.GEMM_ROUTES[("amx_bf16", torch.bfloat16)]
        assert cpp_backend.gemm_route(torch.bfloat16) == want and want[0] > 0
        assert cpp_backend.gemm_route(torch.float16) == cpp_backend.NEVER  # no amx_fp16
        assert cpp_backend.gemm_route(torch.float32) == cpp_backend.NEVER
    finally:
        cpp_backend.reset_gemm_choice()
