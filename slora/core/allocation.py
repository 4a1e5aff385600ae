"""``slora.allocate``: turn sensitivity scores into one LoRA rank per matrix
(docs/method.md, "Allocation").

SRA gives each matrix a share of the budget proportional to its score θ.  Bounds are met by
water-filling: the continuous solution is r_w = clip(λ·θ_w, lo, hi) with λ found by bisection
so that the budget is met exactly, which redistributes whatever the bounds cut off by the same
proportional rule.  Integers come from largest-remainder rounding (ties: higher θ, then name),
so a rank budget is met exactly and ranks stay monotone in θ.

No degenerate plans: unless ``max_rank`` is given, no matrix gets more than
``MAX_RANK_FACTOR`` × the average rank nor more than ``MAX_SHARE`` of the budget (never less
than the average rank itself).  A plan in which one matrix still takes more than ``MAX_SHARE``
of the budget (the caller's ``max_rank``) gets a warning that names ``max_rank``.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slora.core.checks import finite_number, read_json, whole_number
from slora.core.files import write_json
from slora.core.report import SensitivityReport

METHODS = ("sra", "uniform", "pra")
BUDGETS = ("rank", "params")
# The default cap (``max_rank=None``): a matrix gets at most this many times the average rank
# and at most this share of the budget.  On MiniLM-L6 at avg_rank 4 the activation plan's
# largest rank is 14 (3.5×), so the cap binds only on outliers (docs/method.md, "Allocation").
MAX_RANK_FACTOR = 4.0
MAX_SHARE = 0.25


@dataclass
class RankPlan:
    """One LoRA rank per target matrix (0 = no adapter), with the matrices' shapes."""

    ranks: dict[str, int]
    dims: dict[str, tuple[int, int]] = field(default_factory=dict)  # name -> (d_in, d_out)
    method: str = "sra"
    budget: str = "rank"
    avg_rank: float = 0.0

    @property
    def total_rank(self) -> int:
        return sum(self.ranks.values())

    @property
    def trainable_params(self) -> int:
        """Σ r·(d_in + d_out): the LoRA parameters the plan adds."""
        return sum(r * sum(self.dims[n]) for n, r in self.ranks.items() if n in self.dims)

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "budget": self.budget,
            "avg_rank": self.avg_rank,
            "ranks": dict(self.ranks),
            "dims": {n: list(d) for n, d in self.dims.items()},
        }

    def to_json(self, path: str | Path) -> None:
        write_json(path, self.to_dict())  # beside, then renamed in: never half a file

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "RankPlan") -> RankPlan:
        """Rebuild a plan, checking every field by name (ranks ≥ 0, dims ≥ 1, finite numbers)."""
        if not isinstance(data, dict) or not isinstance(data.get("ranks"), dict):
            raise ValueError(f"{where}: not a RankPlan: expected {{'ranks': {{name: int}}, ...}}")
        ranks = {
            str(n): whole_number(f"rank of {n!r}", r, where=where) for n, r in data["ranks"].items()
        }
        dims = {}
        for n, d in (data.get("dims") or {}).items():
            if not isinstance(d, (list, tuple)) or len(d) != 2:
                raise ValueError(f"{where}: dims of {n!r} must be [d_in, d_out], got {d!r}")
            dims[n] = tuple(whole_number(f"dims of {n!r}", v, minimum=1, where=where) for v in d)
        budget = data.get("budget", "rank")
        if budget not in BUDGETS:
            raise ValueError(f"{where}: budget must be one of {BUDGETS}, got {budget!r}")
        method = data.get("method", "sra")
        if not isinstance(method, str):
            raise ValueError(f"{where}: method must be a string, got {method!r}")
        avg_rank = finite_number("avg_rank", data.get("avg_rank", 0.0), minimum=0.0, where=where)
        return cls(ranks, dims, method, budget, avg_rank)

    @classmethod
    def from_json(cls, path: str | Path) -> RankPlan:
        return cls.from_dict(read_json(path, "rank plan"), where=str(path))

    def to_peft_config(self, **lora_kwargs: Any):
        """A ``peft.LoraConfig`` with ``target_modules``, ``rank_pattern`` and ``alpha_pattern``.

        ``lora_alpha`` (default 2 × the mean rank) is turned into a per-module alpha so that
        every module gets the same scale ``lora_alpha / mean rank`` whatever its rank.
        """
        from peft import LoraConfig

        active = {n: r for n, r in self.ranks.items() if r > 0}
        if not active:
            raise ValueError("the plan gives every module rank 0: there is nothing to adapt")
        mean_rank = sum(active.values()) / len(active)
        alpha = finite_number(
            "lora_alpha", lora_kwargs.pop("lora_alpha", 2.0 * mean_rank), positive=True
        )
        r = max(active.values())
        return LoraConfig(
            r=r,
            lora_alpha=alpha * r / mean_rank,
            target_modules=sorted(active),
            rank_pattern=dict(active),
            alpha_pattern={n: alpha * k / mean_rank for n, k in active.items()},
            **lora_kwargs,
        )


def _continuous(
    scores: list[float], costs: list[int], budget: float, lo: list[int], hi: list[float]
) -> list[float]:
    """x_w = clip(λ θ_w, lo_w, hi_w) with Σ cost_w x_w = budget (bisection on λ)."""

    def spent(lam: float) -> float:
        return sum(c * min(max(lam * s, a), b) for s, c, a, b in zip(scores, costs, lo, hi))

    if sum(scores) == 0:
        scores = [1.0] * len(scores)
    lam_lo, lam_hi = 0.0, 1.0
    while spent(lam_hi) < budget and lam_hi < 1e300:
        lam_hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lam_lo + lam_hi)
        if spent(mid) < budget:
            lam_lo = mid
        else:
            lam_hi = mid
    return [min(max(lam_hi * s, a), b) for s, a, b in zip(scores, lo, hi)]


def _round(
    names: list[str],
    scores: list[float],
    costs: list[int],
    budget: int,
    lo: list[int],
    hi: list[float],
) -> list[int]:
    """Integer units: floors of the continuous solution, then +1 by largest remainder."""
    x = _continuous(scores, costs, budget, lo, hi)
    units = [max(a, math.floor(v + 1e-9)) for v, a in zip(x, lo)]
    left = budget - sum(c * u for c, u in zip(costs, units))
    order = sorted(range(len(names)), key=lambda i: (-(x[i] - units[i]), -scores[i], names[i]))
    progress = True
    while left > 0 and progress:  # a params budget may need more than one pass
        progress = False
        for i in order:
            if units[i] < hi[i] and costs[i] <= left:
                units[i] += 1
                left -= costs[i]
                progress = True
    return units


def _validate(report: SensitivityReport, avg_rank: float, min_rank: int, max_rank, multiple_of):
    if not report.modules:
        raise ValueError("the report has no modules to allocate ranks to")
    if not (isinstance(avg_rank, (int, float)) and avg_rank > 0 and math.isfinite(avg_rank)):
        raise ValueError(f"avg_rank must be a positive number, got {avg_rank!r}")
    if isinstance(avg_rank, bool):
        raise ValueError(f"avg_rank must be a positive number, got {avg_rank!r}")
    if isinstance(min_rank, bool) or not isinstance(min_rank, int) or min_rank < 0:
        raise ValueError(f"min_rank must be an int ≥ 0, got {min_rank!r}")
    if max_rank is not None and (not isinstance(max_rank, int) or max_rank < max(min_rank, 1)):
        raise ValueError(f"max_rank must be an int ≥ max(min_rank, 1), got {max_rank!r}")
    if not isinstance(multiple_of, int) or multiple_of < 1:
        raise ValueError(f"multiple_of must be an int ≥ 1, got {multiple_of!r}")
    bad = [n for n, m in report.modules.items() if not math.isfinite(m["score"]) or m["score"] < 0]
    if bad:
        raise ValueError(f"scores must be finite and ≥ 0; not so for {', '.join(bad[:5])}")


def allocate(
    report: SensitivityReport,
    avg_rank: float = 8,
    min_rank: int = 1,
    max_rank: int | None = None,
    multiple_of: int = 1,
    method: str = "sra",
    budget: str = "rank",
    *,
    pra_bands: int = 4,
) -> RankPlan:
    """Split a rank budget over the report's matrices by sensitivity (docs/method.md, "Allocation").

    The budget is ``avg_rank × number of matrices`` ranks (``budget="rank"``) or the same
    number of trainable parameters as rank ``avg_rank`` everywhere (``budget="params"``).
    ``method``: ``"sra"`` (proportional to θ), ``"uniform"``, or ``"pra"`` (``pra_bands`` bands
    of matrices sorted by θ, band weights falling linearly from high to low).
    ``max_rank=None`` caps each matrix at ``MAX_RANK_FACTOR`` × ``avg_rank`` and at
    ``MAX_SHARE`` of the budget (at least ``ceil(avg_rank)``); an int replaces that cap.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
    if budget not in BUDGETS:
        raise ValueError(f"unknown budget {budget!r}; expected one of {BUDGETS}")
    if not isinstance(report, SensitivityReport):
        raise TypeError(f"report must be a slora.SensitivityReport, got {type(report).__name__}")
    _validate(report, avg_rank, min_rank, max_rank, multiple_of)
    whole_number("pra_bands", pra_bands, minimum=1)
    names = list(report.modules)
    dims = {n: (int(m["d_in"]), int(m["d_out"])) for n, m in report.modules.items()}
    theta = report.scores
    if method == "uniform" or len(set(theta.values())) == 1:
        weights = [1.0] * len(names)
    elif method == "sra":
        weights = [theta[n] for n in names]
    else:
        ranked = sorted(names, key=lambda n: (-theta[n], n))
        band = {n: i * pra_bands // len(names) for i, n in enumerate(ranked)}
        weights = [float(pra_bands - band[n]) for n in names]
    step = multiple_of
    lo_units = math.ceil(min_rank / step)
    hi_units = []
    auto = _auto_caps(names, dims, avg_rank, min_rank, budget) if max_rank is None else {}
    for n in names:
        limit = min(dims[n])  # a LoRA rank above min(d_in, d_out) adds nothing
        if max_rank is not None:
            limit = min(limit, max_rank)
        elif method != "uniform":
            limit = min(limit, max(auto[n], step * lo_units))
        hi_units.append(limit // step)
        if lo_units > limit // step and min_rank <= limit:
            raise ValueError(
                f"multiple_of={multiple_of} cannot fit {n!r}: its rank may be at most {limit} "
                f"(min(d_in, d_out){' and max_rank' if max_rank is not None else ''}), which "
                f"has no multiple of {multiple_of} ≥ max(min_rank, 1); use multiple_of ≤ {limit}"
            )
    if budget == "rank":
        costs = [1] * len(names)
        total = round(avg_rank * len(names) / step)
    else:
        costs = [sum(dims[n]) * step for n in names]
        total = round(avg_rank * sum(sum(dims[n]) for n in names))
    lo = [min(lo_units, h) for h in hi_units]
    if any(lo_units > h for h in hi_units):
        raise ValueError(
            f"min_rank={min_rank} exceeds max_rank or a matrix's smallest dimension "
            f"(max allowed {min(hi_units) * step})"
        )
    floor_cost = sum(c * a for c, a in zip(costs, lo))
    if floor_cost > total:
        unit = "ranks" if budget == "rank" else "parameters"
        raise ValueError(
            f"budget too small for min_rank={min_rank}: {len(names)} matrices need at least "
            f"{floor_cost * (step if budget == 'rank' else 1)} {unit}, the budget is "
            f"{total * (step if budget == 'rank' else 1)} (avg_rank={avg_rank})"
        )
    ceiling_cost = sum(c * h for c, h in zip(costs, hi_units))
    if ceiling_cost < total:
        raise ValueError(
            f"budget too large: avg_rank={avg_rank} exceeds what max_rank={max_rank} and the "
            f"matrix shapes allow (at most {ceiling_cost * (step if budget == 'rank' else 1)})"
        )
    units = _round(names, weights, costs, total, lo, [float(h) for h in hi_units])
    plan = RankPlan(
        {n: u * step for n, u in zip(names, units)}, dims, method, budget, float(avg_rank)
    )
    _warn_if_dominated(plan, avg_rank, min_rank)
    return plan


def _auto_caps(names, dims, avg_rank: float, min_rank: int, budget: str) -> dict[str, int]:
    """The default ``max_rank`` per matrix: at most ``MAX_RANK_FACTOR`` × ``avg_rank`` and at
    most ``MAX_SHARE`` of the budget (ranks, or parameters for ``budget="params"``), never
    below ``ceil(avg_rank)`` or ``min_rank`` so that the budget can always be spent."""
    floor = max(math.ceil(avg_rank - 1e-9), min_rank)
    factor = math.floor(MAX_RANK_FACTOR * avg_rank + 1e-9)
    caps = {}
    for n in names:
        if budget == "rank":
            share = math.floor(MAX_SHARE * avg_rank * len(names) + 1e-9)
        else:
            total = avg_rank * sum(sum(dims[m]) for m in names)
            share = math.floor(MAX_SHARE * total / sum(dims[n]) + 1e-9)
        caps[n] = max(floor, min(factor, share))
    return caps


def _warn_if_dominated(plan: RankPlan, avg_rank: float, min_rank: int) -> None:
    """Warn when one matrix takes more than ``MAX_SHARE`` of the plan's budget although the
    budget could be spread (more than 1 / MAX_SHARE matrices); name the knob (max_rank)."""
    if len(plan.ranks) * MAX_SHARE <= 1 or not plan.total_rank:
        return
    if plan.budget == "rank":
        cost = {n: 1 for n in plan.ranks}
    else:
        cost = {n: sum(plan.dims[n]) for n in plan.ranks}
    spent = sum(plan.ranks[n] * cost[n] for n in plan.ranks)
    top = max(plan.ranks, key=lambda n: (plan.ranks[n] * cost[n], n))
    share = plan.ranks[top] * cost[top] / spent
    if share <= MAX_SHARE + 1e-9:
        return
    cap = _auto_caps(list(plan.ranks), plan.dims, avg_rank, min_rank, plan.budget)[top]
    if cap >= plan.ranks[top]:  # nothing a cap could change (the average rank itself)
        return
    unit = "ranks" if plan.budget == "rank" else "LoRA parameters"
    warnings.warn(
        f"slora.allocate: {top!r} takes {100 * share:.0f}% of the budget's {unit} (rank "
        f"{plan.ranks[top]} of {plan.total_rank} in total); its score dwarfs the others'. "
        f"Pass max_rank={cap} (or leave max_rank=None, the default cap) to spread the budget, "
        "or leave the module out with target_modules=",
        UserWarning,
        stacklevel=3,
    )
