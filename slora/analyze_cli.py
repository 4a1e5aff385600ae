"""``slora analyze``: the sensitivity table, rank plan and PNG of the embedded default model."""

from __future__ import annotations

import argparse
from pathlib import Path

from slora.cli_args import POSITIVE_FLOAT, POSITIVE_INT
from slora.core.metrics import DEFAULT_ESTIMATOR, ESTIMATORS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``slora analyze`` options (library defaults unless given)."""
    parser.add_argument("--estimator", default=DEFAULT_ESTIMATOR, choices=list(ESTIMATORS))
    parser.add_argument("--avg-rank", type=POSITIVE_FLOAT, default=4)
    parser.add_argument("--budget", default="rank", choices=["rank", "params"])
    parser.add_argument("--batches", type=POSITIVE_INT, default=8)
    parser.add_argument("--batch-size", type=POSITIVE_INT, default=16)
    parser.add_argument("--max-length", type=POSITIVE_INT, default=64)
    parser.add_argument("--out", default="slora-out")


def run(args: argparse.Namespace) -> int:
    """Calibrate the embedded model, print the table and plan, write JSON and the PNG."""
    import slora
    from slora import embedded
    from slora.core.plots import plot_report

    model = embedded.load_model()
    batches = embedded.calibration_batches(args.batches, args.batch_size, args.max_length)
    report = slora.analyze(model, batches, estimator=args.estimator)
    plan = slora.allocate(report, avg_rank=args.avg_rank, budget=args.budget)
    print(report.table(plan.ranks))
    top = max(plan.ranks, key=plan.ranks.get)
    print(
        f"\n{len(plan.ranks)} matrices, total rank {plan.total_rank}, "
        f"{plan.trainable_params:,} LoRA parameters "
        f"(avg_rank={args.avg_rank}, budget={args.budget}); largest: {top} rank "
        f"{plan.ranks[top]} ({100 * plan.ranks[top] / plan.total_rank:.0f}% of the ranks)"
    )
    if args.out:
        from slora.core.files import write_analysis

        plot = lambda path: plot_report(report, plan.ranks, path)  # noqa: E731
        written = write_analysis(Path(args.out), report, plan, plot)  # all three or none
        print(f"wrote {', '.join(map(str, written))}")
    return 0
