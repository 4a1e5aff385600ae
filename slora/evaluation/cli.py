"""``slora eval`` options (``add_arguments``) and entry point (``run``)."""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

from slora.cli_args import POSITIVE_FLOAT, POSITIVE_INT, comma_list, learning_rates
from slora.core.metrics import DEFAULT_ESTIMATOR, ESTIMATORS
from slora.demo.recipe import Recipe

DEFAULT_METHODS = ("uniform", "sensitivity", "random", "adalora")
ALL_METHODS = ("uniform", "sensitivity", "random", "adalora", "eva") + tuple(
    f"sensitivity@{e}" for e in ESTIMATORS
)
# The published suite: task -> average ranks; a recipe sized for one CPU core (docs/method.md).
SUITE = {"rotten_tomatoes": (2.0, 4.0, 8.0), "convention_2012": (4.0,), "debates_2016": (4.0,)}
SUITE_RECIPE = Recipe(n_train=480, max_length=40, n_val=128, n_test=320, calib_sentences=256)
SUITE_SEEDS = 8


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``slora eval`` options."""
    data = parser.add_argument_group("your data (or --suite)")
    data.add_argument("--csv", default=None, help="CSV file with a text and a label column")
    data.add_argument("--text-column", default=None)
    data.add_argument("--label-column", default=None)
    data.add_argument(
        "--group-column",
        default=None,
        help="rows of one group (author, document, …) stay in one split; default: rows",
    )
    parser.add_argument(
        "--suite",
        action="store_true",
        help="the published offline suite: Rotten Tomatoes (r̄ 2, 4, 8), 2012 convention "
        "speeches, 2016 debates (r̄ 4), 8 seeds",
    )
    parser.add_argument("--tasks", type=comma_list(tuple(SUITE)), default=None,
                        help="--suite: a subset of its tasks, comma separated")  # fmt: skip
    parser.add_argument("--out", required=True, help="output directory (resumes if it exists)")
    parser.add_argument("--model", default=None,
                        help="a local Hugging Face checkpoint directory (default: the embedded "
                        "all-MiniLM-L6-v2); a fresh classification head is put on it")  # fmt: skip
    parser.add_argument(
        "--seeds", type=POSITIVE_INT, default=None, help="paired seeds (5; 8 with --suite)"
    )
    parser.add_argument("--avg-rank", type=POSITIVE_FLOAT, default=4.0)
    parser.add_argument("--methods", type=comma_list(ALL_METHODS), default=DEFAULT_METHODS,
                        help=f"comma separated, of {', '.join(ALL_METHODS)} "
                        f"(default {','.join(DEFAULT_METHODS)})")  # fmt: skip
    parser.add_argument("--estimator", default=DEFAULT_ESTIMATOR, choices=list(ESTIMATORS),
                        help="Sensitivity-LoRA's estimator (the library default)")  # fmt: skip
    parser.add_argument("--lrs", type=learning_rates, default=None,
                        help="one learning-rate grid for every method (default: per method, "
                        "picked on validation)")  # fmt: skip
    parser.add_argument("--n-train", type=POSITIVE_INT, default=None,
                        help="training sentences per seed (2000; 480 with --suite)")  # fmt: skip
    parser.add_argument(
        "--max-length", type=POSITIVE_INT, default=None, help="tokens (64; 40 with --suite)"
    )
    parser.add_argument("--threads", type=POSITIVE_INT, default=None, help="torch CPU threads")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def _specs(args: argparse.Namespace, recipe: Recipe):
    from slora.evaluation import data
    from slora.evaluation.run import TaskSpec

    if args.suite:
        names = args.tasks or tuple(SUITE)
        return [
            TaskSpec(
                n, data.make_task(data.SUITE_TASKS[n](), recipe, args.model), recipe, list(SUITE[n])
            )  # fmt: skip
            for n in names
        ]
    table = data.read_csv(args.csv, args.text_column, args.label_column, args.group_column)
    task = data.make_task(table, recipe, args.model)
    return [TaskSpec(table.name, task, recipe, [float(args.avg_rank)])]


def run(args: argparse.Namespace) -> int:
    """Entry point of ``slora eval``."""
    import torch

    from slora.evaluation.report import format_table, plot_paired
    from slora.evaluation.run import LR_GRIDS, Settings, run_eval

    if args.suite == bool(args.csv):
        print("slora eval: give either --csv PATH (with --text-column and --label-column) or "
              "--suite", file=sys.stderr)  # fmt: skip
        return 2
    if args.csv and not (args.text_column and args.label_column):
        print("slora eval: --csv needs --text-column and --label-column", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    recipe = SUITE_RECIPE if args.suite else Recipe()
    recipe = replace(recipe, estimator=args.estimator)
    if args.n_train:
        recipe.n_train = args.n_train
    if args.max_length:
        recipe.max_length = args.max_length
    recipe.check()
    seeds = args.seeds or (SUITE_SEEDS if args.suite else 5)
    grids = dict(LR_GRIDS)
    if args.lrs:
        grid = tuple(float(x) for x in args.lrs.split(","))
        grids = {m: grid for m in grids}
    try:
        specs = _specs(args, recipe)
    except (ValueError, FileNotFoundError) as exc:
        print(f"slora eval: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out)
    settings = Settings(list(range(seeds)), tuple(args.methods), args.estimator, grids,
                        progress=not args.no_progress)  # fmt: skip
    try:
        doc = run_eval(specs, settings, out)
    except ValueError as exc:
        print(f"slora eval: {exc}", file=sys.stderr)
        return 2
    plot_paired(doc, out / "paired_vs_uniform.png")
    table = format_table(doc)
    (out / "table.txt").write_text(table + "\n")
    print()
    print(table)
    print(f"\nwrote {out / 'results.json'}, {out / 'table.txt'}, {out / 'paired_vs_uniform.png'}")
    return 0
