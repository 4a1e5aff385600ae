"""``slora`` command line: ``demo`` (the main job), ``analyze``, ``bench``, ``env``.

Also runs as ``python -m slora`` (no console script needed).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def checked(kind: type, minimum: float, *, strict: bool = False):
    """An argparse ``type=`` for a finite number ≥ ``minimum`` (> it when ``strict``)."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {kind.__name__}, got {text!r}") from None
        if value != value or value in (float("inf"), float("-inf")):
            raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
        if value < minimum or (strict and value == minimum):
            raise argparse.ArgumentTypeError(
                f"expected a number {'>' if strict else '≥'} {minimum:g}, got {text!r}"
            )
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


POSITIVE_INT = checked(int, 1)
POSITIVE_FLOAT = checked(float, 0, strict=True)


def learning_rates(text: str) -> str:
    """``--lrs``: comma-separated positive numbers (checked here, split by the demo)."""
    parts = [x.strip() for x in text.split(",")]
    if not all(parts):
        raise argparse.ArgumentTypeError(f"expected comma-separated learning rates, got {text!r}")
    for part in parts:
        POSITIVE_FLOAT(part)
    return text


def _analyze(args: argparse.Namespace) -> int:
    import slora
    from slora import embedded

    model = embedded.load_model()
    batches = embedded.calibration_batches(args.batches, args.batch_size, args.max_length)
    report = slora.analyze(model, batches, estimator=args.estimator)
    plan = slora.allocate(report, avg_rank=args.avg_rank, budget=args.budget)
    print(report.table(plan.ranks))
    print(
        f"\n{len(plan.ranks)} matrices, total rank {plan.total_rank}, "
        f"{plan.trainable_params:,} LoRA parameters "
        f"(avg_rank={args.avg_rank}, budget={args.budget})"
    )
    if args.out:
        from slora.core.files import write_analysis
        from slora.core.plots import plot_report

        plot = lambda path: plot_report(report, plan.ranks, path)  # noqa: E731
        written = write_analysis(Path(args.out), report, plan, plot)  # all three or none
        print(f"wrote {', '.join(map(str, written))}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    try:
        from slora import bench
    except ImportError as exc:
        print(f"slora bench is not available: {exc}", file=sys.stderr)
        return 1
    return bench.main(args.rest)


def _env(args: argparse.Namespace) -> int:
    from slora import env

    return env.main()


def _demo(args: argparse.Namespace) -> int:
    from slora import demo

    return demo.main(args)


def _demo_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``slora demo`` options (see slora/demo/ for the recipe)."""
    parser.add_argument("--out", default="slora-demo", help="output directory")
    parser.add_argument(
        "--seeds", type=POSITIVE_INT, default=None, help="paired seeds (3; 5 with --full)"
    )
    parser.add_argument(
        "--full",
        action="store_true",
        help="add PEFT AdaLoRA and EVA, 5 seeds, and a learning-rate sweep per method",
    )
    parser.add_argument(
        "--lr", type=POSITIVE_FLOAT, default=None, help="LoRA learning rate (5e-4; head 10×)"
    )
    parser.add_argument(
        "--lrs", type=learning_rates, default=None, help="--full sweep, comma separated"
    )
    parser.add_argument(
        "--estimator", default=None, choices=["activation", "fisher", "fisher_exact"]
    )
    parser.add_argument(
        "--methods", default=None, help="subset, comma separated: uniform,sensitivity,adalora,eva"
    )
    parser.add_argument(
        "--calib-head-epochs",
        type=checked(int, 0),
        default=0,
        help="train the fresh head alone for N epochs of the calibration data before calibrating",
    )
    parser.add_argument("--threads", type=POSITIVE_INT, default=None, help="torch CPU threads")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="a short run of the same pipeline (one seed, a few steps; also SLORA_DEMO_SMOKE=1)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="slora", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    an = sub.add_parser("analyze", help="sensitivity table and ranks on the embedded default")
    for p in (an,):
        p.add_argument(
            "--estimator", default="fisher", choices=["activation", "fisher", "fisher_exact"]
        )
        p.add_argument("--avg-rank", type=POSITIVE_FLOAT, default=4)
        p.add_argument("--budget", default="rank", choices=["rank", "params"])
        p.add_argument("--batches", type=POSITIVE_INT, default=8)
        p.add_argument("--batch-size", type=POSITIVE_INT, default=16)
        p.add_argument("--max-length", type=POSITIVE_INT, default=64)
        p.add_argument("--out", default="slora-out")
    an.set_defaults(func=_analyze)
    demo = sub.add_parser("demo", help="Sensitivity-LoRA vs uniform LoRA on the embedded default")
    _demo_arguments(demo)
    demo.set_defaults(func=_demo)
    bench = sub.add_parser("bench", help="kernel benchmark table for this machine")
    bench.add_argument("rest", nargs=argparse.REMAINDER)
    bench.set_defaults(func=_bench)
    env = sub.add_parser("env", help="versions, devices and kernel backends, for bug reports")
    env.set_defaults(func=_env)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:  # every option after "bench" belongs to slora.bench
        return _bench(argparse.Namespace(rest=argv[1:]))
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
