"""``slora eval`` outputs besides results.json: the stdout table and the PNG of the paired
differences against uniform LoRA with their 95 % intervals."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from slora.demo.recipe import COLLAPSE_SHARE


def _params(entry: dict[str, Any]) -> str:
    final = entry["final_lora_params"]
    if not final:
        return "—"
    if set(final) == {entry["lora_params"]}:
        return f"{entry['lora_params']:,}"
    lo, hi = min(final), max(final)
    kept = f"{lo:,}" if lo == hi else f"{lo:,}–{hi:,}"
    return f"{entry['lora_params']:,} → {kept}"


def _delta(p: dict[str, Any] | None) -> str:
    if not p or p.get("mean_pt") is None:
        return "—"
    ci = p.get("ci95_pt")
    interval = f" [{ci[0]:+.2f}, {ci[1]:+.2f}]" if ci else ""
    return f"{p['mean_pt']:+.2f}{interval} pt, {p['wins']}/{p['seeds']} won"


def format_table(doc: dict[str, Any]) -> str:
    """One block per task × budget: method, lr, LoRA parameters, accuracies, paired Δ."""
    lines = []
    header = ["method", "lr", "LoRA params (trained → kept)", "val acc", "test acc ± sd",
              "collapsed", "Δ test vs uniform [95% CI]"]  # fmt: skip
    for cell in doc["cells"]:
        rows = []
        for m, e in cell["methods"].items():
            acc, val = e["test_accuracy"], e["val_accuracy"]
            sd = statistics.stdev(acc) if len(acc) > 1 else 0.0
            rows.append([
                m, f"{e['lr']:g}", _params(e),
                f"{statistics.fmean(val):.4f}" if val else "—",
                f"{statistics.fmean(acc):.4f} ± {sd:.4f}" if acc else "—",
                f"{sum(x >= COLLAPSE_SHARE for x in e['test_top_class_share'])}/{len(acc)}",
                _delta(cell["paired_vs_uniform"].get(m)),
            ])  # fmt: skip
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

        def line(cells: list[str], widths: list[int] = widths) -> str:
            return "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))
            )

        lines += [
            f"{cell['task']}, average rank {cell['avg_rank']:g}: {len(cell['seeds'])} paired "
            f"seeds, {cell['n_train']} training / {cell['n_val']} validation / {cell['n_test']} "
            f"test sentences (majority class {cell['majority'].get('test', float('nan')):.4f})",
            line(header),
            "  ".join("-" * w for w in widths),
            *[line(r) for r in rows],
            "",
        ]
    pooled = {m: p for m, p in doc.get("pooled_vs_uniform", {}).items() if p}
    if len(doc["cells"]) > 1 and pooled:
        lines.append("pooled over the cells (per seed the mean over cells, t-interval over seeds):")
        lines += [f"  {m:<24} {_delta(p)}" for m, p in pooled.items()]
    t = doc["timing"]
    lines.append(
        f"wall {t['wall_s']:.0f} s ({t['torch_threads']} torch threads); collapsed: runs that "
        f"predict one class for ≥ {100 * COLLAPSE_SHARE:.0f} % of the test sentences"
    )
    return "\n".join(lines)


def plot_paired(doc: dict[str, Any], path: str | Path) -> Path:
    """Paired test-accuracy differences vs uniform (points) with 95 % intervals, per cell."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = []  # (label, method, mean, lo, hi)
    for cell in doc["cells"]:
        for m, p in cell["paired_vs_uniform"].items():
            if p.get("mean_pt") is None:
                continue
            lo, hi = p["ci95_pt"] or (p["mean_pt"], p["mean_pt"])
            rows.append((f"{cell['task']} r̄={cell['avg_rank']:g}", m, p["mean_pt"], lo, hi))
    for m, p in (doc.get("pooled_vs_uniform") or {}).items():
        if p and len(doc["cells"]) > 1 and p.get("mean_pt") is not None:
            lo, hi = p["ci95_pt"] or (p["mean_pt"], p["mean_pt"])
            rows.append(("pooled", m, p["mean_pt"], lo, hi))
    methods = list(dict.fromkeys(r[1] for r in rows))
    colors = {m: f"C{i}" for i, m in enumerate(methods)}
    fig, ax = plt.subplots(figsize=(8, 0.32 * max(4, len(rows)) + 1.2))
    for y, (_cell, m, mean, lo, hi) in enumerate(rows):
        ax.errorbar(mean, y, xerr=[[mean - lo], [hi - mean]], fmt="o", color=colors[m],
                    capsize=3, label=m if m not in [r[1] for r in rows[:y]] else None)  # fmt: skip
    ax.axvline(0.0, color="black", lw=0.8)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([f"{label}: {m}" for label, m, *_ in rows], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("test accuracy − uniform LoRA, points (paired seeds, 95% t-interval)")
    ax.set_title("slora eval: paired differences against uniform LoRA")
    if rows:
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
