"""Exact top-k sums and cumulative-share counts from rank-1 factors (slora/core/metric_math.py)
against the dense float64 oracles of tests/oracles.py (numpy, independent of the module)."""

from __future__ import annotations

import math

import oracles
import pytest
import torch

from slora.core import metric_math as sm


def _dense(u, v):
    return torch.outer(u.double(), v.double())


def _factor_cases():
    g = torch.Generator().manual_seed(1)
    return {
        "random": (torch.rand(13, generator=g), torch.rand(29, generator=g)),
        "wide_range": (
            torch.rand(7, generator=g) ** 8,
            torch.exp(torch.randn(40, generator=g) * 4),
        ),
        "ties": (torch.tensor([3.0, 1.0, 3.0, 2.0, 1.0]), torch.tensor([2.0, 2.0, 1.0, 4.0])),
        "zeros": (torch.tensor([0.0, 2.0, 0.0, 5.0]), torch.tensor([1.0, 0.0, 3.0])),
        "all_equal": (torch.full((6,), 2.0), torch.full((5,), 0.5)),
        "single": (torch.tensor([3.0]), torch.tensor([7.0])),
        "activation": (torch.full((11,), 2.0), torch.rand(17, generator=g)),
    }


@pytest.mark.parametrize("case", list(_factor_cases()))
def test_topk_from_factors_matches_dense(case):
    u, v = _factor_cases()[case]
    m = u.numel() * v.numel()
    dense = _dense(u, v)
    for k in sorted({1, 2, m // 3, math.ceil(m / 2), m - 1, m}):
        if k < 1:
            continue
        want = oracles.topk_sum(dense, k)
        got = sm.outer_topk_sum(u, v, k)
        assert got == pytest.approx(want, rel=1e-12, abs=1e-300), (case, k)


@pytest.mark.parametrize("case", list(_factor_cases()))
def test_share_count_from_factors_matches_dense(case):
    u, v = _factor_cases()[case]
    dense = _dense(u, v)
    for alpha in (1e-9, 0.1, 0.5, 0.85, 0.999):
        assert sm.outer_share_count(u, v, alpha) == oracles.share_count(dense, alpha), (
            case,
            alpha,
        )


def test_share_count_alpha_one_counts_every_positive_entry():
    # α = 1: all positive entries are needed, however tiny (rounding would absorb them in a
    # cumulative sum, so this case is answered exactly rather than numerically).
    u, v = torch.tensor([1.0, 1e-9, 0.0, 0.5]), torch.tensor([1e-12, 2.0, 0.0, 3.0])
    assert sm.outer_share_count(u, v, 1.0) == 9
    assert oracles.share_count(_dense(u, v), 1.0) == 9
    assert sm.outer_metrics_many([(u, v)], [1], 1.0, vectorised=True)[1] == [9]


def test_share_count_alpha_one_on_exact_integers():
    # Integer entries: every partial sum is exact, so α = 1 has one right answer.
    u, v = torch.tensor([0.0, 1.0, 3.0, 2.0]), torch.tensor([2.0, 0.0, 1.0])
    assert sm.outer_share_count(u, v, 1.0) == oracles.share_count(_dense(u, v), 1.0) == 6


def test_metrics_all_zero_factors():
    u, v = torch.zeros(3), torch.rand(4)
    assert sm.outer_topk_sum(u, v, 2) == 0.0 == oracles.topk_sum(_dense(u, v), 2)
    assert sm.outer_share_count(u, v, 0.85) == 0 == oracles.share_count(_dense(u, v), 0.85)


def test_metrics_reject_negative_or_nan_factors():
    with pytest.raises(ValueError, match="non-negative"):
        sm.outer_topk_sum(torch.tensor([1.0, -1.0]), torch.ones(2), 1)
    with pytest.raises(ValueError, match="finite"):
        sm.outer_share_count(torch.ones(2), torch.tensor([float("nan")]), 0.5)


def _large_cases():
    g = torch.Generator().manual_seed(2)
    return {
        # more entries than the band that is enumerated: bisection, then enumeration
        "random_large": (torch.rand(120, generator=g) ** 3, torch.rand(90, generator=g) ** 2),
        # a tie block larger than the enumerated band: the equal-entries fallback
        "tied_large": (torch.full((100,), 2.0), torch.full((90,), 0.5)),
        "activation_large": (torch.full((64,), 2.0), torch.rand(150, generator=g)),
    }


@pytest.mark.parametrize("case", list(_large_cases()))
def test_metrics_large_match_dense(case):
    u, v = _large_cases()[case]
    dense = _dense(u, v)
    m = dense.numel()
    assert m > sm._BAND_ENUMERATE
    for k in (1, m // 7, math.ceil(m / 2), m - 1):
        assert sm.outer_topk_sum(u, v, k) == pytest.approx(oracles.topk_sum(dense, k), rel=1e-12)
    for alpha in (0.3, 0.85, 0.99):
        assert sm.outer_share_count(u, v, alpha) == oracles.share_count(dense, alpha)


@pytest.mark.parametrize("vectorised", [True, False])
def test_batched_metrics_match_dense_and_scalar(vectorised):
    cases = {**_factor_cases(), **_large_cases()}
    factors = list(cases.values())
    ks = [max(1, math.ceil(u.numel() * v.numel() / 2)) for u, v in factors]
    for alpha in (0.5, 0.85):
        tops, counts = sm.outer_metrics_many(factors, ks, alpha, vectorised=vectorised)
        for (u, v), k, top, count in zip(factors, ks, tops, counts):
            dense = _dense(u, v)
            assert top == pytest.approx(oracles.topk_sum(dense, k), rel=1e-12, abs=1e-300)
            assert count == oracles.share_count(dense, alpha)
            assert count == sm.outer_share_count(u, v, alpha)
    assert sm.outer_metrics_many([], [], 0.85) == ([], [])
    with pytest.raises(ValueError, match="ks has"):
        sm.outer_metrics_many(factors, ks[:-1], 0.85)


@pytest.mark.cuda
def test_vectorised_metrics_on_device():
    cases = {**_factor_cases(), **_large_cases()}
    factors = [(u.cuda(), v.cuda()) for u, v in cases.values()]
    ks = [max(1, math.ceil(u.numel() * v.numel() / 2)) for u, v in factors]
    tops, counts = sm.outer_metrics_many(factors, ks, 0.85)
    for (u, v), k, top, count in zip(factors, ks, tops, counts):
        dense = _dense(u, v)
        assert top == pytest.approx(oracles.topk_sum(dense, k), rel=1e-12, abs=1e-300)
        assert count == oracles.share_count(dense, 0.85)
