"""Exact top-k sums and cumulative-share counts of a matrix's sensitivity entries.

The local metrics of docs/method.md ("Metrics") need, per target matrix, the sum of the k
largest Hessian-diagonal entries and the number of largest entries holding a share α of their
total.  This is method math on small float64 vectors (NumPy/torch), not a kernel.

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
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

_MAX_ITERS = 200
_REL_BAND = 4e-16
_BAND_ENUMERATE = 4096


class _OuterProduct:
    """Sorted factors of the entry set {u_i v_j}, with count/sum queries at a threshold.

    Held as float64 NumPy arrays: the queries are tiny, and NumPy's single-threaded
    ``searchsorted`` avoids thread-pool wake-ups that cost milliseconds on a busy machine.
    """

    def __init__(self, u: Tensor, v: Tensor):
        u = u.detach().to("cpu", torch.float64).flatten()
        v = v.detach().to("cpu", torch.float64).flatten()
        if (u < 0).any() or (v < 0).any() or not (u.isfinite().all() and v.isfinite().all()):
            raise ValueError("factors must be finite and non-negative")
        self.total = float(u.sum() * v.sum())
        u, v = u.numpy(), v.numpy()
        self.u = u[u > 0]
        self.v_asc = np.sort(v[v > 0])
        self.v_suffix = np.concatenate([[0.0], np.cumsum(self.v_asc[::-1])])
        self.positive = self.u.size * self.v_asc.size

    def count_sum_at_least(self, tau: float) -> tuple[int, float]:
        counts = self.v_asc.size - np.searchsorted(self.v_asc, tau / self.u, side="left")
        return int(counts.sum()), float((self.u * self.v_suffix[counts]).sum())

    def max_entry(self) -> float:
        return float(self.u.max() * self.v_asc[-1])

    def min_entry(self) -> float:
        return float(self.u.min() * self.v_asc[0])

    def threshold(self, predicate) -> tuple[float, int, float, np.ndarray | None]:
        """Bisect the largest τ with ``predicate(count(≥τ), sum(≥τ))`` true.

        Returns (τ, count, sum) of the entries at or above the upper end ``hi`` of the final
        band [τ, hi), and the band's entries sorted in descending order when there are at most
        ``_BAND_ENUMERATE`` of them (bisection stops as soon as that holds: typically after
        ~10 steps instead of ~60), else None (then all band entries equal τ up to rounding).
        """
        lo, hi = self.min_entry(), self.max_entry() * (1 + 1e-12)
        if predicate(*self.count_sum_at_least(self.max_entry())):
            lo = self.max_entry()
        count_lo, count_hi = self.positive, 0
        for _ in range(_MAX_ITERS):
            if count_lo - count_hi <= _BAND_ENUMERATE or hi <= lo * (1 + _REL_BAND):
                break
            mid = math.sqrt(lo * hi)
            if mid <= lo or mid >= hi:
                break
            count_mid, sum_mid = self.count_sum_at_least(mid)
            if predicate(count_mid, sum_mid):
                lo, count_lo = mid, count_mid
            else:
                hi, count_hi = mid, count_mid
        count_above, sum_above = self.count_sum_at_least(hi)
        band = None
        if self.count_sum_at_least(lo)[0] - count_above <= _BAND_ENUMERATE:
            band = self.entries_between(lo, hi)
        return lo, count_above, sum_above, band

    def entries_between(self, lo: float, hi: float) -> np.ndarray:
        """The entries u_i v_j in [lo, hi), sorted in descending order."""
        first = np.searchsorted(self.v_asc, lo / self.u, side="left")
        lengths = np.searchsorted(self.v_asc, hi / self.u, side="left") - first
        rows = np.repeat(np.arange(self.u.size), lengths)
        cols = np.repeat(first - (np.cumsum(lengths) - lengths), lengths) + np.arange(rows.size)
        return np.sort(self.u[rows] * self.v_asc[cols])[::-1]


def outer_topk_sum(u: Tensor, v: Tensor, k: int) -> float:
    """Sum of the k largest entries of the outer product ``u vᵀ`` (non-negative factors)."""
    op = _OuterProduct(u, v)
    if k <= 0 or op.positive == 0:
        return 0.0
    if k >= op.positive:
        return op.total
    tau, count_above, sum_above, band = op.threshold(lambda c, s: c >= k)
    if band is not None:
        return sum_above + float(band[: k - count_above].sum())
    return sum_above + (k - count_above) * tau


def outer_share_count(u: Tensor, v: Tensor, alpha: float) -> int:
    """Smallest c such that the c largest entries of ``u vᵀ`` hold ≥ alpha of their total."""
    op = _OuterProduct(u, v)
    if op.positive == 0:
        return 0
    if alpha >= 1.0:  # every positive entry adds to the sum (exact; rounding-free)
        return op.positive
    target = alpha * op.total
    tau, count_above, sum_above, band = op.threshold(lambda c, s: s >= target)
    if sum_above >= target:
        return max(count_above, 1)
    if band is not None and band.size:
        reached = int(np.searchsorted(sum_above + np.cumsum(band), target, side="left"))
        return max(count_above + min(reached + 1, band.size), 1)
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
    if alpha >= 1.0:  # every positive entry adds to the sum (exact; rounding-free)
        return int((flat > 0).sum())
    cumulative = torch.sort(flat, descending=True).values.cumsum(0)
    c = int(torch.searchsorted(cumulative, torch.tensor([alpha * total], dtype=torch.float64)))
    return min(c + 1, flat.numel())


def outer_metrics_many(
    factors: Sequence[tuple[Tensor, Tensor]],
    ks: Sequence[int],
    alpha: float,
    device: torch.device | str | None = None,
    vectorised: bool | None = None,
) -> tuple[list[float], list[int]]:
    """Top-k sums and cumulative-share counts of many outer products ``u vᵀ`` in one go.

    Same definitions as :func:`outer_topk_sum` / :func:`outer_share_count` (equal to them up to
    float64 rounding).  Vectorised (default off the CPU), the threshold bisection runs for every
    matrix at once on padded [matrices, length] float64 tensors on ``device`` (default: the
    first factor's device), one batched ``searchsorted`` per step: a report over hundreds of
    matrices costs ~60 device steps instead of a host loop per matrix.  On the CPU the NumPy
    per-matrix path is faster and is used unless ``vectorised=True``.
    Returns ``([topk sum per matrix], [share count per matrix])``.
    """
    if len(ks) != len(factors):
        raise ValueError(f"ks has {len(ks)} entries for {len(factors)} factor pairs")
    if not factors:
        return [], []
    dev = torch.device(device) if device is not None else factors[0][0].device
    if not (vectorised if vectorised is not None else dev.type != "cpu"):
        tops = [outer_topk_sum(u, v, int(k)) for (u, v), k in zip(factors, ks)]
        return tops, [outer_share_count(u, v, alpha) for u, v in factors]
    batch = _BatchedOuter(factors, dev)
    k = torch.tensor([int(x) for x in ks], dtype=torch.float64, device=dev)
    target = alpha * batch.total
    tau_k, cnt_k, sum_k = batch.threshold(lambda c, s: c >= k)
    tau_a, cnt_a, sum_a = batch.threshold(lambda c, s: s >= target)
    values = torch.stack([tau_k, cnt_k, sum_k, tau_a, cnt_a, sum_a, batch.total]).cpu().tolist()
    tops, counts = [], []
    for m, kk in enumerate(ks):
        tk, ck, sk, ta, ca, sa, total = (row[m] for row in values)
        positive = batch.positive[m]
        if kk <= 0 or positive == 0:
            tops.append(0.0)
        elif kk >= positive:
            tops.append(total)
        else:
            tops.append(sk + (kk - int(ck)) * tk)
        if positive == 0:
            counts.append(0)
        elif alpha >= 1.0:
            counts.append(positive)
        elif sa >= alpha * total:
            counts.append(max(int(ca), 1))
        else:
            counts.append(max(int(ca) + math.ceil((alpha * total - sa) / ta - 1e-9), 1))
    return tops, counts


class _BatchedOuter:
    """Padded sorted factors of many entry sets, with batched count/sum queries.

    Row m of ``u`` holds matrix m's positive u factors then zeros (a zero u contributes no
    entries: its query τ/0 = inf counts nothing); row m of ``v_asc`` holds its positive v
    factors in ascending order, left-padded with zeros (never ≥ a positive query).
    """

    def __init__(self, factors: Sequence[tuple[Tensor, Tensor]], device: torch.device):
        f64 = dict(dtype=torch.float64, device=device)
        us, vs, totals, lows, highs, self.positive = [], [], [], [], [], []
        for u, v in factors:
            single = _OuterProduct(u, v)  # validation + the scalar path's exact totals
            us.append(torch.from_numpy(single.u))
            vs.append(torch.from_numpy(single.v_asc))
            totals.append(single.total)
            self.positive.append(single.positive)
            empty = single.positive == 0
            lows.append(1.0 if empty else single.min_entry())
            highs.append(1.0 if empty else single.max_entry())
        n_u = max(1, max(u.numel() for u in us))
        n_v = max(1, max(v.numel() for v in vs))
        self.u = torch.zeros(len(us), n_u, **f64)
        self.v_asc = torch.zeros(len(vs), n_v, **f64)
        for m, (u, v) in enumerate(zip(us, vs)):
            self.u[m, : u.numel()] = u.to(device)
            self.v_asc[m, n_v - v.numel() :] = v.to(device)
        self.v_suffix = torch.cat(
            [torch.zeros(len(vs), 1, **f64), torch.flip(self.v_asc, [1]).cumsum(1)], dim=1
        )
        self.total = torch.tensor(totals, **f64)
        self.low = torch.tensor(lows, **f64)
        self.high = torch.tensor(highs, **f64)
        self.n_v = n_v

    def count_sum_at_least(self, tau: Tensor) -> tuple[Tensor, Tensor]:
        query = tau[:, None] / self.u  # inf where u is padding
        counts = self.n_v - torch.searchsorted(self.v_asc, query, side="left")
        tail = torch.gather(self.v_suffix, 1, counts)
        return counts.sum(dim=1).to(torch.float64), (self.u * tail).nan_to_num(0.0).sum(dim=1)

    def threshold(self, predicate) -> tuple[Tensor, Tensor, Tensor]:
        """Per matrix, the largest τ with ``predicate(count(≥τ), sum(≥τ))`` (see _OuterProduct)."""
        lo, hi = self.low.clone(), self.high * (1 + 1e-12)
        lo = torch.where(predicate(*self.count_sum_at_least(self.high)), self.high, lo)
        for step in range(_MAX_ITERS):
            mid = torch.sqrt(lo * hi)
            active = (hi > lo * (1 + _REL_BAND)) & (mid > lo) & (mid < hi)
            if step % 8 == 0 and not bool(active.any()):
                break
            ok = predicate(*self.count_sum_at_least(mid))
            lo = torch.where(active & ok, mid, lo)
            hi = torch.where(active & ~ok, mid, hi)
        count_above, sum_above = self.count_sum_at_least(hi)
        return lo, count_above, sum_above
