"""Local sensitivity metrics of SPEC §1 computed exactly from rank-1 factors.

For the ``activation`` and ``fisher`` estimators every Hessian-diagonal entry of a d_out×d_in
matrix is a product ``u_i · v_j`` of two non-negative factors (u = 2·1 and v = a for
``activation``; u = g, v = a for ``fisher``).  The top-k sum and the cumulative-share count of
the m = d_out·d_in entries are found without forming them: bisect a threshold τ (in log
space, to float64 resolution) on counts/sums of ``{(i, j): u_i v_j ≥ τ}``, each of which is one
``searchsorted`` over the sorted factors.  Entries inside the final band [τ, τ(1+ε)) are equal
to τ up to rounding, which makes the result exact to float64 precision.

``dense_*`` are the materialising references (also used for ``fisher_exact``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

_MAX_ITERS = 200
_REL_BAND = 4e-16


class _OuterProduct:
    """Sorted factors of the entry set {u_i v_j}, with count/sum queries at a threshold."""

    def __init__(self, u: Tensor, v: Tensor):
        u = u.detach().to("cpu", torch.float64).flatten()
        v = v.detach().to("cpu", torch.float64).flatten()
        if (u < 0).any() or (v < 0).any() or not (u.isfinite().all() and v.isfinite().all()):
            raise ValueError("factors must be finite and non-negative")
        self.u = u[u > 0]
        self.v_asc = torch.sort(v[v > 0]).values
        self.v_suffix = torch.cat(
            [torch.zeros(1, dtype=torch.float64), torch.flip(self.v_asc, [0]).cumsum(0)]
        )
        self.total = float(u.sum() * v.sum())
        self.positive = self.u.numel() * self.v_asc.numel()

    def count_sum_at_least(self, tau: float) -> tuple[int, float]:
        idx = torch.searchsorted(self.v_asc, tau / self.u, side="left")
        counts = self.v_asc.numel() - idx
        return int(counts.sum()), float((self.u * self.v_suffix[counts]).sum())

    def max_entry(self) -> float:
        return float(self.u.max() * self.v_asc[-1])

    def min_entry(self) -> float:
        return float(self.u.min() * self.v_asc[0])

    def threshold(self, predicate) -> tuple[float, int, float]:
        """Bisect the largest τ with ``predicate(count(≥τ), sum(≥τ))`` true.

        Returns (τ, count, sum) of the entries strictly above the final band.
        """
        lo, hi = self.min_entry(), self.max_entry() * (1 + 1e-12)
        if predicate(*self.count_sum_at_least(self.max_entry())):
            lo = self.max_entry()
        for _ in range(_MAX_ITERS):
            if hi <= lo * (1 + _REL_BAND):
                break
            mid = math.sqrt(lo * hi)
            if mid <= lo or mid >= hi:
                break
            if predicate(*self.count_sum_at_least(mid)):
                lo = mid
            else:
                hi = mid
        count_above, sum_above = self.count_sum_at_least(hi)
        return lo, count_above, sum_above


def outer_topk_sum(u: Tensor, v: Tensor, k: int) -> float:
    """Sum of the k largest entries of the outer product ``u vᵀ`` (non-negative factors)."""
    op = _OuterProduct(u, v)
    if k <= 0 or op.positive == 0:
        return 0.0
    if k >= op.positive:
        return op.total
    tau, count_above, sum_above = op.threshold(lambda c, s: c >= k)
    return sum_above + (k - count_above) * tau


def outer_share_count(u: Tensor, v: Tensor, alpha: float) -> int:
    """Smallest c such that the c largest entries of ``u vᵀ`` hold ≥ alpha of their total."""
    op = _OuterProduct(u, v)
    if op.positive == 0:
        return 0
    target = alpha * op.total
    tau, count_above, sum_above = op.threshold(lambda c, s: s >= target)
    if sum_above >= target:
        return max(count_above, 1)
    extra = math.ceil((target - sum_above) / tau - 1e-9)
    return max(count_above + extra, 1)


def dense_topk_sum(entries: Tensor, k: int) -> float:
    """Reference: sum of the k largest entries of a materialised tensor."""
    flat = entries.detach().to(torch.float64).flatten()
    k = min(max(k, 0), flat.numel())
    return float(torch.topk(flat, k).values.sum()) if k else 0.0


def dense_share_count(entries: Tensor, alpha: float) -> int:
    """Reference: smallest c with (sum of the c largest entries) ≥ alpha · total."""
    flat = entries.detach().to(torch.float64).flatten()
    total = float(flat.sum())
    if total <= 0:
        return 0
    cumulative = torch.sort(flat, descending=True).values.cumsum(0)
    c = int(torch.searchsorted(cumulative, torch.tensor([alpha * total], dtype=torch.float64)))
    return min(c + 1, flat.numel())
