"""Rank allocation invariants (docs/method.md, "Allocation")."""

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import slora
from slora import RankPlan, SensitivityReport


def make_report(scores, dims=None):
    dims = dims or [(64, 64)] * len(scores)
    modules = {
        f"layer{i:02d}.proj": {
            "d_in": d[0],
            "d_out": d[1],
            "global": s,
            "topk": s,
            "effrank": 1,
            "local": s,
            "score": s,
        }
        for i, (s, d) in enumerate(zip(scores, dims))
    }
    return SensitivityReport("fisher", 100, modules)


scores_st = st.lists(
    st.floats(min_value=0.0, max_value=1e6, allow_nan=False, allow_infinity=False),
    min_size=1,
    max_size=24,
)


@pytest.mark.filterwarnings("ignore:slora.allocate")  # explicit max_rank may warn
@settings(max_examples=150, deadline=None)
@given(
    scores=scores_st,
    avg_rank=st.integers(1, 32),
    min_rank=st.integers(0, 4),
    max_extra=st.one_of(st.none(), st.integers(0, 64)),
)
def test_sra_invariants(scores, avg_rank, min_rank, max_extra):
    report = make_report(scores)
    avg_rank = max(avg_rank, min_rank)
    max_rank = None if max_extra is None else max(min_rank, 1, avg_rank) + max_extra
    plan = slora.allocate(report, avg_rank=avg_rank, min_rank=min_rank, max_rank=max_rank)
    ranks = [plan.ranks[n] for n in report.modules]
    assert sum(ranks) == avg_rank * len(scores)
    assert all(min_rank <= r <= (max_rank or 64) for r in ranks)
    theta = list(report.scores.values())
    for i in range(len(ranks)):
        for j in range(len(ranks)):
            if theta[i] > theta[j]:
                assert ranks[i] >= ranks[j], (theta[i], theta[j], ranks[i], ranks[j])
    again = slora.allocate(report, avg_rank=avg_rank, min_rank=min_rank, max_rank=max_rank)
    assert again.ranks == plan.ranks


def test_proportional_when_unbounded():
    # an explicit max_rank replaces the default cap (at most a quarter of the budget)
    plan = slora.allocate(make_report([1.0, 2.0, 3.0, 2.0]), avg_rank=4, min_rank=0, max_rank=64)
    assert list(plan.ranks.values()) == [2, 4, 6, 4]


def test_largest_remainder_and_ties_by_name():
    # Equal scores: 10 ranks over 3 matrices -> 4, 3, 3 with the extra going to the first name.
    plan = slora.allocate(make_report([1.0, 1.0, 1.0]), avg_rank=10 / 3)
    assert list(plan.ranks.values()) == [4, 3, 3]
    plan = slora.allocate(make_report([2.0, 1.0, 1.0, 1.0]), avg_rank=2.5, min_rank=0, max_rank=64)
    # shares 4, 2, 2, 2 exactly
    assert list(plan.ranks.values()) == [4, 2, 2, 2]


def test_water_filling_redistributes_proportionally():
    plan = slora.allocate(make_report([100.0, 1.0, 2.0, 3.0]), avg_rank=6, max_rank=12, min_rank=0)
    r = list(plan.ranks.values())
    assert r[0] == 12 and sum(r) == 24
    # the rest (12) split 1:2:3
    assert r[1:] == [2, 4, 6]


def test_uniform_and_equal_scores_are_uniform():
    rep = make_report([1.0, 5.0, 2.0, 9.0])
    assert set(slora.allocate(rep, avg_rank=8, method="uniform").ranks.values()) == {8}
    assert set(slora.allocate(make_report([3.0] * 4), avg_rank=8).ranks.values()) == {8}


def test_pra_bands_descend_with_score():
    rep = make_report([float(i) for i in range(8)])
    plan = slora.allocate(rep, avg_rank=8, method="pra", min_rank=0)
    r = [plan.ranks[n] for n in rep.modules]
    assert sum(r) == 64
    assert r == sorted(r) and r[-1] > r[0]


def test_multiple_of_keeps_budget_close_and_ranks_aligned():
    rep = make_report([1.0, 3.0, 5.0, 7.0, 2.0])
    plan = slora.allocate(rep, avg_rank=16, multiple_of=8, min_rank=8)
    assert all(r % 8 == 0 and r >= 8 for r in plan.ranks.values())
    assert abs(plan.total_rank - 80) < 8


def test_params_budget_matches_uniform_parameter_count():
    dims = [(64, 64), (64, 256), (256, 64), (32, 32)]
    rep = make_report([4.0, 1.0, 2.0, 8.0], dims)
    plan = slora.allocate(rep, avg_rank=8, budget="params", max_rank=64)
    uniform = slora.allocate(rep, avg_rank=8, budget="params", method="uniform")
    budget = 8 * sum(a + b for a, b in dims)
    assert uniform.trainable_params == budget
    assert budget - min(a + b for a, b in dims) < plan.trainable_params <= budget


def test_min_rank_zero_drops_modules_and_rank_is_capped_by_shape():
    rep = make_report([0.0, 0.0, 10.0], [(64, 64), (64, 64), (4, 64)])
    plan = slora.allocate(rep, avg_rank=4, min_rank=0)
    assert plan.ranks["layer02.proj"] == 4  # min(d_in, d_out) caps it
    assert sum(plan.ranks.values()) == 12


def test_plan_json_round_trip_and_peft_config(tmp_path):
    plan = slora.allocate(make_report([1.0, 2.0, 3.0]), avg_rank=4, min_rank=0)
    plan.to_json(tmp_path / "plan.json")
    again = RankPlan.from_json(tmp_path / "plan.json")
    assert again == plan
    cfg = plan.to_peft_config(lora_alpha=8)
    active = {n: r for n, r in plan.ranks.items() if r}
    assert cfg.rank_pattern == active and set(cfg.target_modules) == set(active)
    mean = sum(active.values()) / len(active)
    for n, r in active.items():  # same scale alpha/r for every module
        assert cfg.alpha_pattern[n] / r == pytest.approx(8 / mean)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(avg_rank=0), "avg_rank"),
        (dict(avg_rank=math.nan), "avg_rank"),
        (dict(min_rank=-1), "min_rank"),
        (dict(max_rank=0), "max_rank"),
        (dict(multiple_of=0), "multiple_of"),
        (dict(method="adalora"), "unknown method"),
        (dict(budget="flops"), "unknown budget"),
        (dict(avg_rank=1, min_rank=2), "budget too small for min_rank"),
        (dict(avg_rank=100, max_rank=8), "budget too large"),
    ],
)
def test_allocation_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        slora.allocate(make_report([1.0, 2.0, 3.0]), **kwargs)


def test_negative_or_nan_scores_are_rejected():
    with pytest.raises(ValueError, match="finite and ≥ 0"):
        slora.allocate(make_report([1.0, -2.0]))
    with pytest.raises(ValueError, match="not a SensitivityReport"):
        SensitivityReport.from_dict({"estimator": "fisher"})


def test_default_cap_keeps_every_matrix_within_a_quarter_of_the_budget():
    # one score dwarfs 36 others (a pooler next to a fresh head): without a cap it takes
    # most of the budget; the default cap stops it at 4 x the average rank
    scores = [400.0] + [0.2 + 0.03 * i for i in range(36)]
    rep = make_report(scores)
    with pytest.warns(UserWarning, match="max_rank="):
        free = slora.allocate(rep, avg_rank=4, max_rank=64)
    assert free.ranks["layer00.proj"] == 64  # the degenerate plan (capped by its shape only)
    plan = slora.allocate(rep, avg_rank=4)
    assert plan.total_rank == 4 * 37
    assert plan.ranks["layer00.proj"] == 16  # 4 x avg_rank
    assert max(plan.ranks.values()) <= 0.25 * plan.total_rank
    ranks = [plan.ranks[n] for n in rep.modules][1:]
    assert ranks == sorted(ranks)  # still monotone in the score
    # few matrices: the quarter-of-the-budget share binds first (never below the average)
    plan = slora.allocate(make_report([100.0] + [1.0] * 7), avg_rank=4)
    assert plan.ranks["layer00.proj"] == 8 and plan.total_rank == 32
    # params budget: the share is counted in parameters
    dims = [(64, 64)] + [(64, 256)] * 7
    plan = slora.allocate(make_report([100.0] + [1.0] * 7, dims), avg_rank=4, budget="params")
    top = plan.ranks["layer00.proj"] * 128
    assert top <= 0.25 * 4 * sum(a + b for a, b in dims)


def test_dominated_plan_warns_and_names_max_rank():
    rep = make_report([400.0] + [1.0] * 11)
    with pytest.warns(UserWarning, match=r"layer00.proj.*max_rank=12"):
        slora.allocate(rep, avg_rank=4, max_rank=64)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        slora.allocate(rep, avg_rank=4)  # the default cap: no warning
        slora.allocate(make_report([400.0, 1.0, 1.0]), avg_rank=4, max_rank=64)  # 3 matrices


@pytest.mark.parametrize("scores,log", [([400.0, 0.2, 1.0], True), ([1.0, 2.0, 50.0], False)])
def test_report_plot_uses_a_log_axis_when_scores_span_decades(tmp_path, monkeypatch, scores, log):
    import matplotlib.axes

    from slora.core import plots

    scales = []
    real = matplotlib.axes.Axes.set_yscale
    monkeypatch.setattr(
        matplotlib.axes.Axes, "set_yscale", lambda ax, v, **k: scales.append(v) or real(ax, v, **k)
    )
    path = plots.plot_report(make_report(scores), None, tmp_path / "s.png")
    assert path.stat().st_size > 0
    assert ("log" in scales) is log
