"""Paired comparisons across seeds: mean difference in accuracy points with a t-interval."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any


def t_interval(diffs: Sequence[float], level: float = 0.95) -> tuple[float, float] | None:
    """Two-sided t-interval of the mean of ``diffs`` (None for fewer than two values)."""
    if len(diffs) < 2:
        return None
    from scipy.stats import t

    mean = statistics.fmean(diffs)
    half = t.ppf(0.5 + level / 2, len(diffs) - 1) * statistics.stdev(diffs) / math.sqrt(len(diffs))
    return mean - half, mean + half


def paired(acc: Sequence[float], base: Sequence[float]) -> dict[str, Any]:
    """``acc`` against ``base`` seed by seed, in accuracy points (100 × the difference)."""
    if len(acc) != len(base):
        raise ValueError(f"paired seeds differ in number: {len(acc)} vs {len(base)}")
    diffs = [100.0 * (a - b) for a, b in zip(acc, base)]
    ci = t_interval(diffs)
    return {
        "mean_pt": statistics.fmean(diffs) if diffs else None,
        "ci95_pt": list(ci) if ci is not None else None,
        "wins": sum(d > 0 for d in diffs),
        "ties": sum(d == 0 for d in diffs),
        "losses": sum(d < 0 for d in diffs),
        "seeds": len(diffs),
        "diff_pt": diffs,
    }


def pooled(cells: Sequence[dict[str, float | list[float]]], method: str) -> dict[str, Any] | None:
    """Pool a method's paired differences over cells (tasks × budgets): per seed the mean over
    the cells that have it, then the t-interval over seeds (the independent units)."""
    per_seed: dict[int, list[float]] = {}
    for cell in cells:
        entry = cell["paired_vs_uniform"].get(method)
        if entry is None:
            continue
        for seed, d in zip(cell["seeds"], entry["diff_pt"]):
            per_seed.setdefault(seed, []).append(d)
    if not per_seed:
        return None
    n_cells = max(len(v) for v in per_seed.values())
    diffs = [statistics.fmean(v) for s, v in sorted(per_seed.items()) if len(v) == n_cells]
    ci = t_interval(diffs)
    return {
        "mean_pt": statistics.fmean(diffs) if diffs else None,
        "ci95_pt": list(ci) if ci is not None else None,
        "wins": sum(d > 0 for d in diffs),
        "seeds": len(diffs),
        "cells": n_cells,
    }
