"""Property-based fuzzing of the grouped LoRA op (slora.ops.multi_lora) on every backend
against the float64 oracle.

Random slot counts, ranks (0 included, empty slots), widths, slices, token slots (−1
included, any order), prefill segments (empty ones included) and dtypes.  The quick tests run
``SLORA_FUZZ_EXAMPLES`` (default 50) cases per backend and form on shapes up to 48 wide; the
``slow``-marked ones (run by CI too) ``SLORA_SLOW_FUZZ_EXAMPLES`` (default 500) cases per
backend on small shapes (cheap under the Triton interpreter).  Raise either for a
longer run.
"""

from __future__ import annotations

import os

import oracles
import pytest
import torch
from conftest import BACKENDS, assert_close, make_adapters
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from slora.ops import PackedAdapters, multi_lora

EXAMPLES = int(os.environ.get("SLORA_FUZZ_EXAMPLES", "50"))  # × 2 forms per backend
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@st.composite
def problems(draw, max_width=24, max_d_in=40, max_slots=6, max_rank=20):
    n_slices = draw(st.integers(1, 3))
    sizes = draw(st.lists(st.integers(1, max_width), min_size=n_slices, max_size=n_slices))
    d_in = draw(st.integers(1, max_d_in))
    n_slots = draw(st.integers(1, max_slots))
    ranks = [
        None
        if draw(st.integers(0, 7)) == 0
        else draw(st.lists(st.integers(0, max_rank), min_size=n_slices, max_size=n_slices))
        for _ in range(n_slots)
    ]
    if all(r is None or not any(r) for r in ranks):
        ranks[0] = [1] * n_slices
    dtype = draw(st.sampled_from(DTYPES))
    seed = draw(st.integers(0, 2**16))
    return sizes, d_in, ranks, dtype, seed


def _packed(sizes, d_in, ranks, dtype, seed):
    adapters = make_adapters(ranks, d_in, sizes, dtype=dtype, seed=seed)
    packed = PackedAdapters.from_list(adapters, d_out=sizes, dtype=dtype)
    return adapters, packed


@pytest.mark.parametrize("backend", BACKENDS)
@FUZZ
@given(problem=problems(), data=st.data())
def test_fuzz_token_slots(backend, problem, data):
    check_token_slots(backend, problem, data)


def check_token_slots(backend, problem, data, max_tokens=33):
    sizes, d_in, ranks, dtype, seed = problem
    adapters, packed = _packed(sizes, d_in, ranks, dtype, seed)
    T = data.draw(st.integers(1, max_tokens))
    slots = torch.tensor(
        data.draw(st.lists(st.integers(-1, len(ranks) - 1), min_size=T, max_size=T)),
        dtype=torch.int32,
    )
    x = torch.randn(T, d_in, generator=torch.Generator().manual_seed(seed)).to(dtype)
    out = torch.full((T, sum(sizes)), float("nan"), dtype=dtype)
    base = torch.randn(T, sum(sizes), dtype=torch.float64)
    out.copy_(base.to(dtype))
    multi_lora(x, slots, packed, out=out, backend=backend)
    assert_close(
        out, oracles.multi_lora(x, slots, adapters, sizes) + base.to(dtype).double(), dtype
    )


@pytest.mark.parametrize("backend", BACKENDS)
@FUZZ
@given(problem=problems(), data=st.data())
def test_fuzz_segments(backend, problem, data):
    check_segments(backend, problem, data)


def check_segments(backend, problem, data, max_length=9):
    sizes, d_in, ranks, dtype, seed = problem
    adapters, packed = _packed(sizes, d_in, ranks, dtype, seed)
    lengths = data.draw(st.lists(st.integers(0, max_length), min_size=1, max_size=6))
    seg_slots = data.draw(
        st.lists(st.integers(-1, len(ranks) - 1), min_size=len(lengths), max_size=len(lengths))
    )
    T = sum(lengths)
    indptr = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    x = torch.randn(T, d_in, generator=torch.Generator().manual_seed(seed)).to(dtype)
    token_slots = torch.repeat_interleave(torch.tensor(seg_slots), torch.tensor(lengths))
    got = multi_lora(
        x,
        None,
        packed,
        seg_indptr=indptr,
        seg_slots=torch.tensor(seg_slots, dtype=torch.int32),
        backend=backend,
    )
    assert got.shape == (T, sum(sizes))
    if T == 0:
        return
    assert_close(got, oracles.multi_lora(x, token_slots, adapters, sizes), dtype)


# -- long runs on small shapes (slow-marked; CI runs them) --------------------------------------

SLOW_EXAMPLES = int(os.environ.get("SLORA_SLOW_FUZZ_EXAMPLES", "500"))
SLOW_FUZZ = settings(FUZZ, max_examples=SLOW_EXAMPLES, database=None)


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
@SLOW_FUZZ
@given(
    problem=problems(max_width=9, max_d_in=12, max_slots=4, max_rank=6),
    segments=st.booleans(),
    data=st.data(),
)
def test_slow_fuzz_multi_lora(backend, problem, segments, data):
    """SLORA_SLOW_FUZZ_EXAMPLES cases per backend, token slots and prefill segments mixed."""
    if segments:
        check_segments(backend, problem, data, max_length=4)
    else:
        check_token_slots(backend, problem, data, max_tokens=9)
