"""PNG plots of reports and plans (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path

from slora.core.report import SensitivityReport


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


LOG_SPAN = 100.0  # scores whose largest/smallest positive value exceed this go on a log axis


def spans_decades(values: list[float], span: float = LOG_SPAN) -> bool:
    """True when the positive values span more than ``span`` (a linear axis would show one bar)."""
    positive = [v for v in values if v > 0]
    return len(positive) > 1 and max(positive) > span * min(positive)


def plot_report(report: SensitivityReport, ranks: dict[str, int] | None, path: str | Path) -> Path:
    """Score θ per matrix (bars, in model order; a log axis when they span decades) and, if
    given, the allocated ranks."""
    plt = _pyplot()
    names = list(report.modules)
    scores = [report.modules[n]["score"] for n in names]
    rows = 2 if ranks else 1
    fig, axes = plt.subplots(
        rows, 1, figsize=(max(8, 0.22 * len(names)), 3.2 * rows), squeeze=False
    )
    axes[0][0].bar(range(len(names)), scores, color="tab:blue")
    axes[0][0].set_ylabel("score θ")
    if spans_decades(scores):
        axes[0][0].set_yscale("log")
        axes[0][0].set_ylabel("score θ (log scale)")
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


def split_layer_name(name: str) -> tuple[int, str]:
    """``"bert.encoder.layer.3.attention.self.query"`` → ``(3, "attention.self.query")``.

    The first all-digit component is the layer index; a name without one is layer -1.
    """
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return int(part), ".".join(parts[i + 1 :]) or name
    return -1, name


def plot_by_layer(
    series: dict[str, dict[str, float]],
    path: str | Path,
    ylabel: str,
    title: str,
    *,
    log: bool = False,
    bars: bool = False,
) -> Path:
    """One panel per series (e.g. a method's ranks): value per layer, one colour per module type."""
    plt = _pyplot()
    if not series:
        raise ValueError("plot_by_layer needs at least one series of {module: value}")
    fig, axes = plt.subplots(
        len(series), 1, figsize=(11, 3.0 * len(series)), squeeze=False, sharex=True
    )
    for ax, (label, values) in zip((row[0] for row in axes), series.items()):
        by_type: dict[str, dict[int, float]] = {}
        for name, value in values.items():
            layer, kind = split_layer_name(name)
            by_type.setdefault(kind, {})[layer] = float(value)
        kinds = list(by_type)
        width = 0.8 / max(1, len(kinds))
        for k, kind in enumerate(kinds):
            layers = sorted(by_type[kind])
            ys = [by_type[kind][layer] for layer in layers]
            if bars:
                xs = [layer - 0.4 + width * (k + 0.5) for layer in layers]
                ax.bar(xs, ys, width=width, label=kind)
            else:
                ax.plot(layers, ys, marker="o", label=kind)
        if log and all(v > 0 for v in values.values()):
            ax.set_yscale("log")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{title}: {label}" if len(series) > 1 or bars else title)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    axes[-1][0].set_xlabel("layer")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_accuracy(
    accuracy: dict[str, list[float]],
    seeds: list[int],
    path: str | Path,
    baseline: float | None = None,
) -> Path:
    """Accuracy per method (x) and seed (a line joins each seed's paired runs); mean as a dash."""
    plt = _pyplot()
    methods = list(accuracy)
    fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(methods)), 3.6))
    means = [sum(v) / len(v) for v in accuracy.values()]
    ax.scatter(range(len(methods)), means, marker="_", s=1500, color="k", zorder=3, label="mean")
    for i, seed in enumerate(seeds):
        ax.plot(
            range(len(methods)),
            [accuracy[m][i] for m in methods],
            marker="o",
            label=f"seed {seed}",
        )
    if baseline is not None:
        ax.axhline(baseline, color="tab:red", linestyle="--", label="majority class")
    values = [a for v in accuracy.values() for a in v] + ([baseline] if baseline else [])
    lo, hi = min(values), max(values)
    ax.set_ylim(lo - 0.05 * (hi - lo + 0.01), hi + 0.05 * (hi - lo + 0.01))
    ax.set_xticks(range(len(methods)))
    ax.set_xticklabels(methods)
    ax.set_ylabel("test accuracy")
    ax.set_title("Accuracy per method and seed")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
