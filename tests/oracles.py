"""The tests' float64 oracles, written for the tests only: the metrics and their combination
(docs/method.md) and the grouped LoRA op.

They materialise everything (token-level tensors, every Hessian-diagonal entry) — slow but
obviously right — and share no code with slora.
"""

from __future__ import annotations

import math

import numpy as np
import torch


def entries(estimator: str, xs: torch.Tensor, dys: torch.Tensor | None) -> np.ndarray:
    """All d_out·d_in diagonal entries from token rows xs [N, d_in] and dys [N, d_out]."""
    x = xs.double()
    n = x.shape[0]
    a = (x**2).sum(0) / n
    if estimator == "activation":
        d_out = dys.shape[1]
        return (2 * a[None, :].expand(d_out, -1)).numpy().copy()
    dy = dys.double()
    if estimator == "fisher":
        g = (dy**2).sum(0) / n
        return torch.outer(g, a).numpy()
    return ((dy**2).T @ (x**2) / n).numpy()


def trace(estimator: str, xs: torch.Tensor, dys: torch.Tensor) -> float:
    x, dy = xs.double(), dys.double()
    n = x.shape[0]
    if estimator == "fisher":
        return float(((dy**2).sum(1) * (x**2).sum(1)).sum() / n)
    return float(entries(estimator, xs, dys).sum())


def metrics(estimator: str, xs, dys, topk_frac=0.5, alpha=0.85) -> dict[str, float]:
    e = np.sort(entries(estimator, xs, dys).ravel())[::-1]
    m = e.size
    k = math.ceil(m * topk_frac)
    cum = np.cumsum(e)
    total = cum[-1]
    eff = int(np.argmax(cum >= alpha * total)) + 1 if total > 0 else 0
    return {"global": trace(estimator, xs, dys), "topk": float(cum[k - 1] / k), "effrank": eff}


def combine(ms: dict[str, dict[str, float]]) -> dict[str, float]:
    """θ per matrix (docs/method.md, "Combination"), with numpy."""

    def w(v):
        v = np.asarray(v, dtype=np.float64)
        return v.std() / v.mean() ** 2

    names = list(ms)
    st = np.array([ms[n]["topk"] for n in names])
    se = np.array([float(ms[n]["effrank"]) for n in names])
    sg = np.array([ms[n]["global"] for n in names])
    sl = w(st) * st + w(se) * se
    theta = w(sg) * sg + (w(sl) if sl.any() else 0.0) * sl
    return dict(zip(names, theta.tolist()))


def multi_lora(x, slots, adapters, sizes) -> torch.Tensor:  # noqa: ANN001
    """The grouped LoRA op from the *unpacked* adapters (``conftest.make_adapters``), token by
    token: ``y[t] = Σ_s scale·B (A x_t)`` for the token's slot (−1 or an empty slot: zeros)."""
    y = torch.zeros(x.shape[0], sum(sizes), dtype=torch.float64)
    for t in range(x.shape[0]):
        k = int(slots[t])
        if k < 0 or adapters[k] is None:
            continue
        col = 0
        for (A, B, scale), d in zip(adapters[k], sizes):
            y[t, col : col + d] = scale * (B.double() @ (A.double() @ x[t].double()))
            col += d
    return y


def _sorted_entries(entries) -> np.ndarray:  # noqa: ANN001
    values = entries.detach().double().cpu().numpy() if torch.is_tensor(entries) else entries
    return np.sort(np.asarray(values, dtype=np.float64).ravel())[::-1]


def topk_sum(entries, k: int) -> float:  # noqa: ANN001
    """Sum of the k largest entries (numpy float64, everything materialised)."""
    return float(_sorted_entries(entries)[:k].sum())


def share_count(entries, alpha: float) -> int:  # noqa: ANN001
    """Smallest c whose c largest entries sum to ≥ alpha · total (0 when the total is 0; α = 1:
    every positive entry, which a rounded cumulative sum may stall before)."""
    e = _sorted_entries(entries)
    cum = np.cumsum(e)
    if cum.size == 0 or cum[-1] <= 0:
        return 0
    if alpha >= 1:
        return int((e > 0).sum())
    return int(np.argmax(cum >= alpha * cum[-1])) + 1
