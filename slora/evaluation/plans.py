"""The compared rank plans besides uniform and Sensitivity-LoRA: the random-allocation control
and AdaLoRA's matched final budget."""

from __future__ import annotations

import random

from slora.core.allocation import RankPlan


def shuffled_plan(plan: RankPlan, seed: int) -> RankPlan:
    """``plan``'s ranks shuffled among matrices of the same shape (d_in, d_out): the same rank
    histogram and the same parameter count, but not the sensitivity's choice of matrices."""
    rng = random.Random(seed)
    by_shape: dict[tuple[int, int], list[str]] = {}
    for name in plan.ranks:
        by_shape.setdefault(tuple(plan.dims[name]), []).append(name)
    ranks = dict(plan.ranks)
    for names in by_shape.values():
        values = [plan.ranks[n] for n in names]
        rng.shuffle(values)
        ranks.update(zip(names, values))
    return RankPlan(ranks, dict(plan.dims), "random", plan.budget, plan.avg_rank)


def adalora_triplet_cost(dims: tuple[int, int]) -> int:
    """Parameters of one AdaLoRA triplet: a row of A (d_in), a column of B (d_out), one E."""
    return dims[0] + dims[1] + 1


def adalora_matched_triplets(dims: dict[str, tuple[int, int]], lora_params: int) -> int:
    """Triplets AdaLoRA keeps so that its final parameters match ``lora_params`` (the other
    methods' Σ r·(d_in + d_out)) when the kept triplets cost what an average one does."""
    if not dims:
        raise ValueError("no target matrices")
    mean_cost = sum(adalora_triplet_cost(d) for d in dims.values()) / len(dims)
    return max(1, round(lora_params / mean_cost))
