"""Local metrics from factors and the score combination against tests/oracles.py."""

import math

import numpy as np
import oracles
import pytest
import torch
from conftest import seed_of
from oracles import combine as ref_combine

from slora.core.metric_math import (
    dense_share_count,
    dense_topk_sum,
    outer_share_count,
    outer_topk_sum,
)
from slora.core.metrics import MatrixStats, combine, matrix_metrics


def _ref_topk(u, v, k):
    return oracles.topk_sum(np.outer(u.double().numpy(), v.double().numpy()), k)


def _ref_share(u, v, alpha):
    return oracles.share_count(np.outer(u.double().numpy(), v.double().numpy()), alpha)


FACTOR_CASES = [
    ("random", lambda: (torch.rand(13), torch.rand(29))),
    ("heavy tail", lambda: (torch.rand(7) ** 6, torch.rand(50) ** 8)),
    ("with zeros", lambda: (torch.rand(11) * (torch.rand(11) > 0.3), torch.rand(17))),
    ("ties", lambda: (torch.full((6,), 2.0), torch.tensor([1.0, 1.0, 3.0, 3.0, 3.0, 0.5]))),
    ("one row", lambda: (torch.rand(1), torch.rand(40))),
    ("one entry", lambda: (torch.rand(1), torch.rand(1))),
]


@pytest.mark.parametrize("name,make", FACTOR_CASES, ids=[c[0] for c in FACTOR_CASES])
def test_outer_topk_and_share_match_materialised_entries(name, make):
    torch.manual_seed(seed_of(name))
    u, v = make()
    m = u.numel() * v.numel()
    for k in sorted({1, 2, m // 3 + 1, math.ceil(m / 2), m - 1 if m > 1 else 1, m}):
        got, want = outer_topk_sum(u, v, k), _ref_topk(u, v, k)
        assert got == pytest.approx(want, rel=1e-12, abs=1e-300), (k, got, want)
    for alpha in (0.01, 0.5, 0.85, 0.999, 1.0):
        assert outer_share_count(u, v, alpha) == _ref_share(u, v, alpha), alpha


def test_dense_helpers_match_reference():
    e = torch.rand(9, 14, dtype=torch.float64)
    u, v = torch.ones(9), torch.ones(14)
    assert dense_topk_sum(e, 20) == pytest.approx(float(torch.sort(e.flatten()).values[-20:].sum()))
    cum = np.cumsum(np.sort(e.numpy().ravel())[::-1])
    assert dense_share_count(e, 0.7) == int(np.argmax(cum >= 0.7 * cum[-1])) + 1
    assert outer_share_count(u, v, 0.5) == 63  # 126 equal entries: half is 63


def test_factors_must_be_non_negative():
    with pytest.raises(ValueError, match="non-negative"):
        outer_topk_sum(torch.tensor([-1.0, 2.0]), torch.rand(3), 2)


@pytest.mark.parametrize("estimator", ["activation", "fisher", "fisher_exact"])
def test_matrix_metrics_match_token_level_reference(estimator):

    n, d_in, d_out = 37, 11, 6
    x, dy = torch.randn(n, d_in) * 3, torch.randn(n, d_out) * 0.1
    stats = MatrixStats(
        d_in,
        d_out,
        (x.double() ** 2).sum(0).float(),
        (dy.double() ** 2).sum(0).float(),
        ((dy.double() ** 2).sum(1) * (x.double() ** 2).sum(1)).sum().reshape(1).float(),
        ((dy.double() ** 2).T @ (x.double() ** 2)).float(),
        tokens=n,
    )
    got = matrix_metrics(estimator, stats, topk_frac=0.3, alpha=0.85)
    want = oracles.metrics(estimator, x, dy, topk_frac=0.3, alpha=0.85)
    assert got["global"] == pytest.approx(want["global"], rel=1e-5)
    assert got["topk"] == pytest.approx(want["topk"], rel=1e-5)
    assert abs(got["effrank"] - want["effrank"]) <= 1


def test_combine_matches_numpy_and_handles_degenerate_metrics():
    ms = {
        f"m{i}": {"global": float(g), "topk": float(t), "effrank": int(e)}
        for i, (g, t, e) in enumerate(zip(np.random.rand(5), np.random.rand(5), [3, 9, 4, 4, 7]))
    }
    got = combine(ms)
    want = ref_combine(ms)
    for n in ms:
        assert got[n]["score"] == pytest.approx(want[n], rel=1e-12)
    # effrank constant: its σ is 0 and it contributes nothing.
    flat = {n: dict(m, effrank=5) for n, m in ms.items()}
    for n, m in combine(flat).items():
        assert m["score"] == pytest.approx(ref_combine(flat)[n], rel=1e-12)
    zero = {n: {"global": 0.0, "topk": 0.0, "effrank": 0} for n in ms}
    with pytest.raises(ValueError, match="no signal"):
        combine(zero)
