"""``slora demo``: its options (``add_arguments``) → recipe, task and run (``run``)."""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from slora.cli_args import POSITIVE_FLOAT, POSITIVE_INT, checked, learning_rates
from slora.demo.data import embedded_task
from slora.demo.recipe import BASE_METHODS, FULL_METHODS, FULL_SWEEP, Recipe
from slora.demo.report import format_table
from slora.demo.run import run_demo


@dataclass
class Settings:
    """What the command line asks of a demo run."""

    recipe: Recipe
    seeds: list[int]
    methods: tuple[str, ...]
    sweep: list[float] | dict[str, tuple[float, ...]] | None
    smoke: bool


def smoke_requested(args: argparse.Namespace) -> bool:
    """``--smoke`` or SLORA_DEMO_SMOKE=1 (how CI runs the README's own command)."""
    return bool(args.smoke) or os.environ.get("SLORA_DEMO_SMOKE", "") not in ("", "0")


def settings(args: argparse.Namespace) -> Settings:
    """The recipe, seeds, methods and learning-rate sweep of ``slora demo ARGS``."""
    recipe = Recipe()
    if args.lr is not None:
        recipe.lr = args.lr
    if args.estimator:
        recipe.estimator = args.estimator
    if args.calib_head_epochs:
        recipe.calib_head_epochs = args.calib_head_epochs
    smoke = smoke_requested(args)
    if smoke:  # the same code path on a few batches: checks the pipeline and its outputs
        recipe = replace(recipe, n_train=32, n_test=48, n_val=32, calib_sentences=32)
        recipe.batch_size = recipe.calib_batch_size = 8
    n_seeds = args.seeds if args.seeds is not None else (1 if smoke else 5 if args.full else 3)
    methods = FULL_METHODS if args.full else BASE_METHODS
    if args.methods:
        methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    sweep = None
    if args.full:
        sweep = [float(x) for x in args.lrs.split(",")] if args.lrs else dict(FULL_SWEEP)
    return Settings(recipe, list(range(n_seeds)), methods, sweep, smoke)


def add_arguments(parser: argparse.ArgumentParser) -> None:
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


def run(args: argparse.Namespace) -> int:
    """Entry point of ``slora demo`` (options from :func:`add_arguments`)."""
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    run = settings(args)
    if not run.seeds:
        print("slora demo: --seeds must be ≥ 1", file=sys.stderr)
        return 2
    out = Path(args.out)
    doc = run_demo(
        embedded_task(run.recipe),
        run.recipe,
        out,
        run.seeds,
        run.methods,
        run.sweep,
        progress=not args.no_progress,
    )
    print()
    print(format_table(doc))
    print(
        f"\nwrote {out / 'results.json'}, {out / 'sensitivity.json'}, the PNG plots and the "
        f"Sensitivity-LoRA adapter (seed {doc['seeds'][0]}) in PEFT format under {out / 'adapter'}"
    )
    collapsed = [m for m, e in doc["methods"].items() if any(e["collapsed"])]
    if collapsed:
        print(f"warning: collapsed to one class: {', '.join(collapsed)}", file=sys.stderr)
    return 0


main = run  # slora.demo.main: the entry point under its earlier name
