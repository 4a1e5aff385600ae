"""The ``slora eval`` driver: calibrate, pick each method's learning rate on validation,
fine-tune every method on paired seeds, and record every finished run at once (resume).

A run is one (task, average rank, method, seed, learning rate); it is evaluated on the
validation and the test split and written to ``OUT/runs/…json`` as soon as it finishes, so an
interrupted evaluation resumes where it stopped.  The learning-rate sweep (validation accuracy
of the first seed at the sweep budget) reuses the same runs: the chosen rate's run is that
seed's run, nothing is chosen on test data.
"""

from __future__ import annotations

import json
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

import slora
from slora.core.allocation import RankPlan
from slora.core.report import SensitivityReport
from slora.demo.data import Task, eval_batches, training_order
from slora.demo.methods import prepare
from slora.demo.recipe import Batch, Recipe
from slora.demo.training import evaluate, lora_parameters, train
from slora.evaluation import stats
from slora.evaluation.plans import adalora_matched_triplets, shuffled_plan

METHODS = ("uniform", "sensitivity", "random", "adalora", "eva")
PLAN_METHODS = ("uniform", "sensitivity", "random")
# Learning-rate grids picked from on validation (LoRA lr; the fresh head gets head_lr_mult ×).
# AdaLoRA's B·diag(E)·A starts from E = 0 and moves slower per step: its grid starts higher.
# Short runs (the suite trains 30 steps) need rates above the demo's 5e-4.
LR_GRIDS: dict[str, tuple[float, ...]] = {
    "uniform": (2e-3, 5e-3),
    "sensitivity": (2e-3, 5e-3),
    "random": (2e-3, 5e-3),
    "eva": (2e-3, 5e-3),
    "adalora": (5e-3, 1.5e-2),
}


def split_method(method: str) -> tuple[str, str | None]:
    """``"sensitivity@fisher"`` → ``("sensitivity", "fisher")`` (an estimator ablation)."""
    base, _, estimator = method.partition("@")
    return base, estimator or None


@dataclass
class TaskSpec:
    """A task of the evaluation: its data/model, recipe and the average ranks to compare."""

    name: str
    task: Task
    recipe: Recipe
    avg_ranks: list[float]
    majority: dict[str, float] = field(default_factory=dict)


@dataclass
class Settings:
    seeds: list[int]
    methods: tuple[str, ...]
    estimator: str
    lr_grids: dict[str, tuple[float, ...]]
    progress: bool = True


class Store:
    """One JSON file per finished run under ``out/runs``; written atomically."""

    def __init__(self, out: Path):
        self.root = out / "runs"

    def path(self, task: str, avg_rank: float, method: str, seed: int, lr: float) -> Path:
        return self.root / task / f"r{avg_rank:g}" / method / f"seed{seed}_lr{lr:g}.json"

    def get(self, *key: Any) -> dict[str, Any] | None:
        path = self.path(*key)
        return json.loads(path.read_text()) if path.is_file() else None

    def put(self, record: dict[str, Any], *key: Any) -> None:
        path = self.path(*key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(record, indent=1))
        os.replace(tmp, path)


def calibrate(spec: TaskSpec, estimator: str, out: Path, progress: bool):
    """The task's sensitivity report (cached in ``out/<task>/``) and calibration batches."""
    recipe = spec.recipe
    pool = list(spec.task.train)
    random.Random(12345).shuffle(pool)
    calib = spec.task.encode(pool[: recipe.calib_sentences], recipe.calib_batch_size)
    path = out / spec.name / f"sensitivity_{estimator}.json"
    if path.is_file():
        return SensitivityReport.from_json(path), calib
    torch.manual_seed(0)
    model = spec.task.load_model(0)
    report = slora.analyze(model, calib, estimator=estimator, progress=progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    report.to_json(path)
    return report, calib


def make_plans(
    reports: dict[str, SensitivityReport], default: str, avg_rank: float, seed: int
) -> dict[str, RankPlan]:
    """Uniform, Sensitivity-LoRA (library defaults, the parameter budget of uniform), its
    shuffle for ``seed`` (``random``) and one plan per ablated estimator."""
    base = reports[default]
    plans = {
        "uniform": slora.allocate(base, avg_rank=avg_rank, method="uniform"),
        "sensitivity": slora.allocate(base, avg_rank=avg_rank, budget="params"),
    }
    plans["random"] = shuffled_plan(plans["sensitivity"], seed)
    for est, rep in reports.items():
        plans[f"sensitivity@{est}"] = slora.allocate(rep, avg_rank=avg_rank, budget="params")
    return plans


def train_and_evaluate(
    spec: TaskSpec,
    recipe: Recipe,
    method: str,
    seed: int,
    lr: float,
    plans: dict[str, RankPlan],
    calib: list[Batch],
    sets: dict[str, list[Batch]],
    progress: bool,
) -> dict[str, Any]:
    """Fine-tune one method on one seed (the seed's data order), evaluate on every set."""
    task = spec.task
    t0 = time.perf_counter()
    order = training_order(
        task.train, task.lengths, recipe.n_train, seed, recipe.batch_size, recipe.epochs
    )
    batches = [task.encode(chunk, len(chunk))[0] for chunk in order]
    torch.manual_seed(seed)
    model = task.load_model(seed)
    torch.manual_seed(seed)
    base, _ = split_method(method)
    key = method if method in plans else base
    prep = prepare(key, model, task, recipe, {key: plans[key]} if key in plans else {},
                   len(batches), calib, progress)  # fmt: skip
    lora = lora_parameters(prep.model)
    torch.manual_seed(seed)
    losses = train(prep.model, batches, recipe, lr, prep.on_step, f"{method} s{seed} lr{lr:g}",
                   progress, task.head)  # fmt: skip
    t1 = time.perf_counter()
    scores = {name: evaluate(prep.model, b) for name, b in sets.items()}
    return {
        "method": method,
        "seed": seed,
        "lr": lr,
        **{f"{name}_accuracy": s["accuracy"] for name, s in scores.items()},
        **{f"{name}_top_class_share": s["top_class_share"] for name, s in scores.items()},
        **prep.outcome(lora, losses),
        "train_wall_s": t1 - t0,
        "eval_wall_s": time.perf_counter() - t1,
    }


def sweep_rank(avg_ranks: Sequence[float]) -> float:
    """The budget whose validation runs pick the learning rates (4 if compared, else the first)."""
    return 4.0 if 4.0 in [float(r) for r in avg_ranks] else float(avg_ranks[0])


def cell_methods(methods: Sequence[str], spec: TaskSpec, r: float) -> list[str]:
    """The methods of one cell: estimator ablations (``name@estimator``) run at the sweep
    budget only, every other method at every budget."""
    at_sweep = float(r) == sweep_rank(spec.avg_ranks)
    return [m for m in methods if at_sweep or split_method(m)[1] is None]


def check_resumable(out: Path, fingerprint: dict[str, Any]) -> None:
    """Runs on disk are reused only under the same recipes and estimator (``settings.json``)."""
    path = out / "settings.json"
    if path.is_file():
        old = json.loads(path.read_text())
        if old != fingerprint:
            changed = sorted(
                k for k in set(old) | set(fingerprint) if old.get(k) != fingerprint.get(k)
            )
            raise ValueError(
                f"{out} holds runs made with other settings ({', '.join(changed)} differ); "
                "resume with the same settings or give a new --out"
            )
    else:
        out.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(fingerprint, indent=1))


def run_eval(
    specs: list[TaskSpec],
    settings: Settings,
    out: Path,
    log: Callable[[str], None] = print,
    on_round: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Every task × budget × method × seed, resumable; returns (and writes) results.json."""
    out.mkdir(parents=True, exist_ok=True)
    check_resumable(out, {
        "estimator": settings.estimator,
        "recipes": {spec.name: asdict(replace(spec.recipe, avg_rank=0)) for spec in specs},
        "models": {spec.name: spec.task.model_name for spec in specs},
        "splits": {spec.name: [len(spec.task.train), len(spec.task.val), len(spec.task.test)]
                   for spec in specs},
    })  # fmt: skip
    store = Store(out)
    wall0 = time.perf_counter()
    seeds, methods = settings.seeds, settings.methods
    grids = {m: tuple(settings.lr_grids.get(split_method(m)[0], (1e-3,))) for m in methods}
    n_runs = sum(
        sum(len(cell_methods(methods, spec, r)) for r in spec.avg_ranks) * len(seeds)
        + sum(len(grids[m]) - 1 for m in methods if len(grids[m]) > 1)
        for spec in specs
    )
    bar = _bar(n_runs, settings.progress)
    state: dict[str, Any] = {}
    for spec in specs:  # calibration and plans per task (cached on disk)
        estimators = {settings.estimator} | {split_method(m)[1] for m in methods} - {None}
        reports, calib = {}, None
        for est in sorted(estimators):
            log(f"[{spec.name}] calibrating ({est}) on {spec.recipe.calib_sentences} sentences")
            reports[est], calib = calibrate(spec, est, out, settings.progress)
        sets = {
            "val": eval_batches(spec.task, spec.task.val, spec.recipe.eval_batch_size),
            "test": eval_batches(spec.task, spec.task.test, spec.recipe.eval_batch_size),
        }
        for name, idx in (("val", spec.task.val), ("test", spec.task.test)):
            counts = [spec.task.labels[i] for i in idx]
            spec.majority[name] = max(counts.count(c) for c in set(counts)) / len(counts)
        state[spec.name] = (reports, calib, sets)

    def one(spec: TaskSpec, r: float, method: str, seed: int, lr: float) -> dict[str, Any]:
        key = (spec.name, r, method, seed, lr)
        record = store.get(*key)
        if record is None:
            reports, calib, sets = state[spec.name]
            plans = make_plans(reports, settings.estimator, r, seed)
            recipe = replace(spec.recipe, avg_rank=r)
            if split_method(method)[0] == "adalora":
                params = plans["uniform"].trainable_params
                recipe.adalora_target_triplets = adalora_matched_triplets(plans["uniform"].dims,
                                                                         params)  # fmt: skip
            bar.set_description(f"{spec.name} r{r:g} {method} s{seed} lr{lr:g}")
            record = train_and_evaluate(spec, recipe, method, seed, lr, plans, calib, sets,
                                        False)  # fmt: skip
            store.put(record, *key)
        bar.update(1)
        return record

    chosen: dict[tuple[str, str], float] = {}
    sweeps: dict[tuple[str, str], dict[str, float]] = {}
    for spec in specs:  # learning rates on validation (first seed, sweep budget)
        r = sweep_rank(spec.avg_ranks)
        for m in methods:
            if len(grids[m]) == 1:
                chosen[spec.name, m] = grids[m][0]
                continue
            acc = {lr: one(spec, r, m, seeds[0], lr)["val_accuracy"] for lr in grids[m]}
            sweeps[spec.name, m] = {f"{lr:g}": a for lr, a in acc.items()}
            chosen[spec.name, m] = min(lr for lr, a in acc.items() if a == max(acc.values()))
            log(
                f"[{spec.name}] {m}: lr {chosen[spec.name, m]:g} (validation accuracy "
                f"{sweeps[spec.name, m]})"
            )

    records: dict[tuple, dict[str, Any]] = {}
    doc: dict[str, Any] = {}
    for seed in seeds:  # seed rounds: every task and budget gets seed s before seed s+1
        for spec in specs:
            for r in spec.avg_ranks:
                for m in cell_methods(methods, spec, r):
                    records[spec.name, float(r), m, seed] = one(spec, float(r), m, seed,
                                                                chosen[spec.name, m])  # fmt: skip
        doc = results(specs, settings, records, chosen, sweeps, time.perf_counter() - wall0)
        (out / "results.json").write_text(json.dumps(doc, indent=1))
        if on_round is not None:
            on_round(doc)
    bar.close()
    return doc


def _bar(total: int, progress: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="slora eval", unit="run", disable=not progress)


def results(
    specs: list[TaskSpec],
    settings: Settings,
    records: dict[tuple, dict[str, Any]],
    chosen: dict[tuple[str, str], float],
    sweeps: dict[tuple[str, str], dict[str, float]],
    wall_s: float,
) -> dict[str, Any]:
    """results.json: one cell per task × budget, paired differences, pooled differences."""
    cells = []
    for spec in specs:
        for r in spec.avg_ranks:
            r = float(r)
            methods = cell_methods(settings.methods, spec, r)
            done = [s for s in settings.seeds
                    if all((spec.name, r, m, s) in records for m in methods)]  # fmt: skip
            entry: dict[str, Any] = {}
            for m in methods:
                runs = [records[spec.name, r, m, s] for s in done]
                entry[m] = {
                    "test_accuracy": [x["test_accuracy"] for x in runs],
                    "val_accuracy": [x["val_accuracy"] for x in runs],
                    "test_top_class_share": [x["test_top_class_share"] for x in runs],
                    "lr": chosen[spec.name, m],
                    "lora_params": runs[0]["lora_params"] if runs else None,
                    "final_lora_params": [x["final_lora_params"] for x in runs],
                    "ranks": runs[0]["ranks"] if runs else None,
                    "train_wall_s": [x["train_wall_s"] for x in runs],
                }
                if (spec.name, m) in sweeps:
                    entry[m]["lr_sweep_val_accuracy"] = sweeps[spec.name, m]
            pairs = {}
            if "uniform" in entry:
                base = entry["uniform"]["test_accuracy"]
                pairs = {m: stats.paired(e["test_accuracy"], base)
                         for m, e in entry.items() if m != "uniform"}  # fmt: skip
            cells.append({
                "task": spec.name, "avg_rank": r, "seeds": done, "methods": entry,
                "paired_vs_uniform": pairs, "majority": dict(spec.majority),
                "n_train": spec.recipe.n_train, "n_val": len(spec.task.val),
                "n_test": len(spec.task.test), "model": spec.task.model_name,
            })  # fmt: skip
    others = [m for m in settings.methods if m != "uniform"]
    doc: dict[str, Any] = {
        "cells": cells,
        "pooled_vs_uniform": {m: stats.pooled(cells, m) for m in others},
        "estimator": settings.estimator,
        "methods_compared": list(settings.methods),
        "seeds": list(settings.seeds),
        "recipe": {s.name: asdict(s.recipe) for s in specs},
        "lr_grids": {m: list(settings.lr_grids.get(split_method(m)[0], ()))
                     for m in settings.methods},
        "timing": {"wall_s": wall_s, "torch_threads": torch.get_num_threads(),
                   "runs_train_wall_s": sum(x["train_wall_s"] for x in records.values())},
    }  # fmt: skip
    if len(cells) == 1:
        doc["methods"] = cells[0]["methods"]
        doc["paired_vs_uniform"] = cells[0]["paired_vs_uniform"]
    return doc
