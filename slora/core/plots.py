"""PNG plots of reports and plans (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path

from slora.core.report import SensitivityReport


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_report(report: SensitivityReport, ranks: dict[str, int] | None, path: str | Path) -> Path:
    """Score θ per matrix (bars, in model order) and, if given, the allocated ranks."""
    plt = _pyplot()
    names = list(report.modules)
    scores = [report.modules[n]["score"] for n in names]
    rows = 2 if ranks else 1
    fig, axes = plt.subplots(
        rows, 1, figsize=(max(8, 0.22 * len(names)), 3.2 * rows), squeeze=False
    )
    axes[0][0].bar(range(len(names)), scores, color="tab:blue")
    axes[0][0].set_ylabel("score θ")
    axes[0][0].set_title(f"Sensitivity per matrix ({report.estimator})")
    if ranks:
        axes[1][0].bar(range(len(names)), [ranks.get(n, 0) for n in names], color="tab:orange")
        axes[1][0].set_ylabel("LoRA rank")
        axes[1][0].set_title("Allocated ranks")
    short = [n.replace("bert.encoder.layer.", "L").replace("model.layers.", "L") for n in names]
    for ax in (row[0] for row in axes):
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(short, rotation=90, fontsize=6)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
