"""The demo's outputs besides results.json: PNG plots and the comparison table."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from slora.core.report import SensitivityReport


def write_plots(doc: dict[str, Any], report: SensitivityReport, out: Path) -> list[Path]:
    from slora.core import plots

    methods = doc["methods"]
    ranks = {m: e["ranks"] for m, e in methods.items() if e.get("ranks")}
    return [
        plots.plot_by_layer(
            {"score θ": report.scores},
            out / "sensitivity_by_layer.png",
            ylabel=f"score θ ({report.estimator})",
            title="Sensitivity per layer and module type",
            log=True,
        ),
        plots.plot_by_layer(
            ranks, out / "ranks.png", ylabel="LoRA rank", title="Allocated ranks", bars=True
        ),
        plots.plot_accuracy(
            {m: e["accuracy"] for m, e in methods.items()},
            doc["seeds"],
            out / "accuracy.png",
            baseline=doc.get("majority_baseline"),
        ),
    ]


def _params_cell(entry: dict[str, Any]) -> str:
    """LoRA parameters trained, and kept at the end where pruning (AdaLoRA) removed some."""
    final = entry.get("final_lora_params") or [entry["lora_params"]]
    if set(final) == {entry["lora_params"]}:
        return f"{entry['lora_params']:,}"
    kept = f"{min(final):,}" if min(final) == max(final) else f"{min(final):,}–{max(final):,}"
    return f"{entry['lora_params']:,} → {kept}"


def format_table(doc: dict[str, Any]) -> str:
    """The comparison as a fixed-width table (one row per method, one column per seed)."""
    seeds = doc["seeds"]
    header = [
        "method",
        "lr",
        "LoRA params (trained → final)",
        *[f"seed {s}" for s in seeds],
        "mean ± sd",
        "Δ vs uniform (paired)",
    ]
    rows = []
    pairs = doc["paired_vs_uniform"]
    for m, e in doc["methods"].items():
        s = e["summary"]
        delta = "—"
        if m in pairs:
            p = pairs[m]
            delta = (
                f"{100 * p['mean_diff']:+.2f} ± {100 * p['std_diff']:.2f} pt "
                f"({p['wins']}/{len(seeds)} won)"
            )
        rows.append(
            [
                m,
                f"{e['lr']:g}",
                _params_cell(e),
                *[f"{a:.4f}" + ("!" if c else "") for a, c in zip(e["accuracy"], e["collapsed"])],
                f"{s['mean']:.4f} ± {s['std']:.4f}",
                delta,
            ]
        )
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))
        )

    st = doc["stability"]
    tau = st["kendall_tau_ranks"]
    lines = [
        f"{doc['model']} on {doc['dataset']}",
        f"{doc['n_train']} training sentences, {doc['n_test']} test sentences of unseen movies; "
        f"majority class {doc['majority_baseline']:.4f}; targets: "
        f"{doc['targets']['matrices']} encoder matrices; head lr = "
        f"{doc['recipe']['head_lr_mult']:g} × the LoRA lr below",
        line(header),
        "  ".join("-" * w for w in widths),
        *[line(r) for r in rows],
        f"allocation stability: Kendall τ(ranks, {100 * st['fraction']:.0f}% vs 100% of the "
        f"calibration) = {'n/a' if tau is None else f'{tau:.3f}'}"
        + (
            f", τ(scores) = {st['kendall_tau_scores']:.3f}"
            if st["kendall_tau_scores"] is not None
            else ""
        ),
        f"wall {doc['timing']['wall_s']:.0f} s, CPU {doc['timing']['cpu_s']:.0f} s "
        f"({doc['timing']['torch_threads']} torch threads); '!' marks a run collapsed to one class",
    ]
    return "\n".join(lines)
