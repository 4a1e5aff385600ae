"""Sensitivity metrics from calibration statistics and their combination into scores
(docs/method.md, "Metrics" and "Combination")."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from slora.core.metric_math import (
    dense_share_count,
    dense_topk_sum,
    outer_share_count,
    outer_topk_sum,
)

ESTIMATORS = ("activation", "fisher", "fisher_exact")
# The estimator of analyze / patch / the CLI when none is named (docs/method.md, "Defaults").
DEFAULT_ESTIMATOR = "fisher"


@dataclass
class MatrixStats:
    """Reduced statistics of one target matrix over the calibration tokens it saw.

    ``col_sq`` = Σ_t x_t² (d_in), ``row_sq`` = Σ_t dy_t² (d_out), ``trace`` = Σ_t‖dy_t‖²‖x_t‖²,
    ``diag`` = Σ_t dy_t²x_t²ᵀ (fisher_exact only), ``tokens`` = number of rows counted.
    """

    d_in: int
    d_out: int
    col_sq: Tensor
    row_sq: Tensor | None = None
    trace: Tensor | None = None
    diag: Tensor | None = None
    tokens: int = 0


def matrix_metrics(
    estimator: str, stats: MatrixStats, topk_frac: float = 0.5, alpha: float = 0.85
) -> dict[str, float]:
    """global (trace), topk (mean of the ⌈m·topk_frac⌉ largest entries), effrank of a matrix."""
    n = max(stats.tokens, 1)
    m = stats.d_in * stats.d_out
    k = max(1, math.ceil(m * topk_frac))
    a = stats.col_sq.double().cpu() / n
    if estimator == "activation":
        u = torch.full((stats.d_out,), 2.0, dtype=torch.float64)
        total = float(u.sum() * a.sum())
        top, eff = outer_topk_sum(u, a, k), outer_share_count(u, a, alpha)
    elif estimator == "fisher":
        g = stats.row_sq.double().cpu() / n
        total = float(stats.trace.double().sum()) / n
        top, eff = outer_topk_sum(g, a, k), outer_share_count(g, a, alpha)
    elif estimator == "fisher_exact":
        entries = stats.diag.double().cpu() / n
        total = float(entries.sum())
        top, eff = dense_topk_sum(entries, k), dense_share_count(entries, alpha)
    else:
        raise ValueError(f"unknown estimator {estimator!r}; expected one of {ESTIMATORS}")
    return {"global": total, "topk": top / k, "effrank": int(eff)}


def _weight(values: list[float], metric: str) -> float:
    """σ/μ² of a metric across matrices (0 when σ = 0); μ = 0 means no calibration signal."""
    t = torch.tensor(values, dtype=torch.float64)
    mean = float(t.mean())
    if mean == 0.0:
        raise ValueError(
            f"the {metric!r} sensitivity is 0 for every target matrix: the calibration data gave "
            "no signal (are the gradients all zero, or is the loss independent of the targets?)"
        )
    std = float(t.std(correction=0))
    return std / mean**2


def combine(metrics: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """Add ``local`` = β1·S_T + β2·S_E and ``score`` θ = γ1·S_g + γ2·S_l to every matrix."""
    names = list(metrics)
    top = [metrics[n]["topk"] for n in names]
    eff = [float(metrics[n]["effrank"]) for n in names]
    glob = [metrics[n]["global"] for n in names]
    b1, b2 = _weight(top, "topk"), _weight(eff, "effrank")
    local = [b1 * t + b2 * e for t, e in zip(top, eff)]
    g1 = _weight(glob, "global")
    g2 = _weight(local, "local") if any(local) else 0.0
    out = {}
    for i, name in enumerate(names):
        out[name] = dict(metrics[name], local=local[i], score=g1 * glob[i] + g2 * local[i])
    return out
