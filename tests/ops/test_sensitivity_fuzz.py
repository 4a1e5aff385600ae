"""Property-based fuzzing of the calibration reductions (slora.ops.accumulate_*) on every
backend against float64: random token counts, widths, masks, dtypes and magnitudes (400² overflows
fp16).  ``SLORA_FUZZ_EXAMPLES`` (default 50) cases per backend; the ``slow``-marked test (run by CI
too) ``SLORA_SLOW_FUZZ_EXAMPLES`` (default 500) on small shapes."""

from __future__ import annotations

import os

import pytest
import torch
from conftest import BACKENDS, assert_close_rel
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from slora import ops

EXAMPLES = int(os.environ.get("SLORA_FUZZ_EXAMPLES", "50"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
SLOW_FUZZ = settings(FUZZ, max_examples=int(os.environ.get("SLORA_SLOW_FUZZ_EXAMPLES", "500")),
                     database=None)  # fmt: skip
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def stats_problems(max_tokens=40, max_width=48):
    return st.tuples(
        st.integers(1, max_tokens),
        st.integers(1, max_width),
        st.integers(1, max_width),
        st.sampled_from(["none", "random", "all_but_one"]),
        st.sampled_from(DTYPES),
        st.sampled_from([1e-3, 1.0, 400.0]),  # 400² overflows fp16
        st.integers(0, 2**16),
    )


@pytest.mark.parametrize("backend", BACKENDS)
@FUZZ
@given(problem=stats_problems())
def test_fuzz_sensitivity_stats(backend, problem):
    check_sensitivity_stats(backend, *problem)


def check_sensitivity_stats(backend, tokens, d_in, d_out, masked, dtype, magnitude, seed):
    """The three calibration reductions against float64, accumulating onto poisoned-free
    random buffers (so a kernel that overwrites instead of adding shows)."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(tokens, d_in, generator=g) * magnitude).to(dtype)
    dy = (torch.randn(tokens, d_out, generator=g) * magnitude).to(dtype)
    mask = None
    if masked == "random":
        mask = torch.rand(tokens, generator=g) > 0.4
    elif masked == "all_but_one":
        mask = torch.zeros(tokens, dtype=torch.bool)
        mask[seed % tokens] = True
    m = torch.ones(tokens, dtype=torch.float64) if mask is None else mask.double()
    x64, dy64 = x.double(), dy.double()
    col0, row0 = torch.rand(d_in), torch.rand(d_out)
    trace0, diag0 = torch.rand(1), torch.rand(d_out, d_in)
    col, row, trace, diag = col0.clone(), row0.clone(), trace0.clone(), diag0.clone()
    token_sq = ops.accumulate_input_stats(x, mask, col, backend=backend)
    ops.accumulate_grad_stats(dy, mask, token_sq, row, trace, backend=backend)
    ops.accumulate_fisher_exact(dy, x, mask, diag, backend=backend)
    want_tok = (x64**2).sum(1) * m
    want = {
        "token_sq": want_tok,
        "col": col0.double() + (x64**2 * m[:, None]).sum(0),
        "row": row0.double() + (dy64**2 * m[:, None]).sum(0),
        "trace": trace0.double() + ((dy64**2).sum(1) * want_tok).sum(),
        "diag": diag0.double() + (dy64**2 * m[:, None]).T @ x64**2,
    }
    got = {"token_sq": token_sq, "col": col, "row": row, "trace": trace, "diag": diag}
    for name, value in got.items():
        assert value.dtype == torch.float32, name
        # fp32 outputs from already-rounded inputs: fp32 tolerance whatever the input dtype
        assert_close_rel(value, want[name], torch.float32, name)


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
@SLOW_FUZZ
@given(problem=stats_problems(max_tokens=12, max_width=12))
def test_slow_fuzz_sensitivity_stats(backend, problem):
    """SLORA_SLOW_FUZZ_EXAMPLES cases per backend of the three calibration reductions."""
    check_sensitivity_stats(backend, *problem)
