"""The demo run: calibrate once, allocate, train every method on every seed, write results."""

from __future__ import annotations

import json
import math
import os
import random
import statistics
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

import slora
from slora.core.allocation import RankPlan
from slora.core.patch import trainable_parameters
from slora.core.report import SensitivityReport
from slora.demo.data import Task, eval_batches, training_order
from slora.demo.methods import prepare
from slora.demo.recipe import BASE_METHODS, COLLAPSE_SHARE, FULL_METHODS, Batch, Recipe
from slora.demo.report import write_plots
from slora.demo.training import evaluate, lora_parameters, train, warm_up_head


def run_one(
    method: str,
    seed: int,
    lr: float,
    task: Task,
    recipe: Recipe,
    plans: dict[str, RankPlan],
    calib: list[Batch],
    eval_set: list[Batch],
    progress: bool = True,
    save_to: Path | None = None,
) -> dict[str, Any]:
    """Fine-tune ``method`` on ``seed`` and evaluate; returns accuracy, sizes and timings."""
    t0, c0 = time.perf_counter(), time.process_time()
    order = training_order(
        task.train, task.lengths, recipe.n_train, seed, recipe.batch_size, recipe.epochs
    )
    batches = [task.encode(chunk, len(chunk))[0] for chunk in order]
    torch.manual_seed(seed)
    model = task.load_model(seed)
    torch.manual_seed(seed)
    prep = prepare(method, model, task, recipe, plans, len(batches), calib, progress)
    trainable = trainable_parameters(prep.model)
    lora = lora_parameters(prep.model)
    torch.manual_seed(seed)  # dropout masks: same stream for every method of a seed
    losses = train(
        prep.model, batches, recipe, lr, prep.on_step, f"{method} s{seed}", progress, task.head
    )
    t1, c1 = time.perf_counter(), time.process_time()
    scores = evaluate(prep.model, eval_set)
    if save_to is not None:
        slora.save_adapter(prep.model, save_to)
    return {
        **scores,
        "collapsed": scores["top_class_share"] >= COLLAPSE_SHARE,
        "trainable_params": trainable,
        **prep.outcome(lora, losses),
        "train_wall_s": t1 - t0,
        "train_cpu_s": c1 - c0,
        "eval_wall_s": time.perf_counter() - t1,
        "eval_cpu_s": time.process_time() - c1,
    }


# --------------------------------------------------------------------------- calibration


def kendall_tau(a: dict[str, float], b: dict[str, float]) -> float | None:
    """Kendall τ-b between two orderings of the same keys (None if undefined)."""
    from scipy.stats import kendalltau

    keys = sorted(a)
    tau = kendalltau([a[k] for k in keys], [b[k] for k in keys]).statistic
    return None if tau is None or math.isnan(tau) else float(tau)


def calibrate(task: Task, recipe: Recipe, progress: bool = True):
    """Sensitivity on the calibration sentences and on their first ``stability_frac``."""
    rng = random.Random(12345)
    pool = list(task.train)
    rng.shuffle(pool)
    idx = pool[: recipe.calib_sentences]
    calib = task.encode(idx, recipe.calib_batch_size)
    few = max(2, math.ceil(len(idx) * recipe.stability_frac))
    calib_few = task.encode(idx[:few], recipe.calib_batch_size)
    torch.manual_seed(0)
    model = task.load_model(0)
    if recipe.calib_head_epochs:
        warm_up_head(model, task, recipe, calib * recipe.calib_head_epochs, progress)
    kwargs = dict(estimator=recipe.estimator, target_modules=task.target_modules)
    report = slora.analyze(model, calib, progress=progress, **kwargs)
    report_few = slora.analyze(model, calib_few, progress=False, **kwargs)
    return report, report_few, calib, len(idx), few


def make_plans(report: SensitivityReport, recipe: Recipe) -> dict[str, RankPlan]:
    """Uniform rank ``avg_rank`` and SRA at the same number of trainable LoRA parameters."""
    return {
        "uniform": slora.allocate(report, avg_rank=recipe.avg_rank, method="uniform"),
        "sensitivity": slora.allocate(report, avg_rank=recipe.avg_rank, budget="params"),
    }


# --------------------------------------------------------------------------- the demo


def _summary(acc: list[float]) -> dict[str, float]:
    return {
        "mean": statistics.fmean(acc),
        "std": statistics.stdev(acc) if len(acc) > 1 else 0.0,
        "min": min(acc),
        "max": max(acc),
    }


def paired(methods: dict[str, dict[str, Any]], base: str = "uniform") -> dict[str, Any]:
    """Per-seed differences against ``base``: mean, spread, wins/ties/losses."""
    out = {}
    if base not in methods:
        return {}
    ref = methods[base]["accuracy"]
    for name, m in methods.items():
        if name == base:
            continue
        diff = [a - b for a, b in zip(m["accuracy"], ref)]
        out[name] = {
            "diff": diff,
            "mean_diff": statistics.fmean(diff),
            "std_diff": statistics.stdev(diff) if len(diff) > 1 else 0.0,
            "wins": sum(d > 0 for d in diff),
            "ties": sum(d == 0 for d in diff),
            "losses": sum(d < 0 for d in diff),
        }
    return out


def run_demo(
    task: Task,
    recipe: Recipe,
    out: Path,
    seeds: Sequence[int],
    methods: Sequence[str] = BASE_METHODS,
    sweep: Sequence[float] | dict[str, Sequence[float]] | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Calibrate, allocate, fine-tune every method on every seed, evaluate; write ``out``.

    ``sweep``: learning rates to try (one list for every method, or one per method); each
    method's best on the validation movies (seed ``seeds[0]``) is then used on every seed.
    """
    recipe.check()
    if not seeds:
        raise ValueError("seeds must name at least one seed")
    unknown = [m for m in methods if m not in FULL_METHODS]
    if unknown or not methods:
        raise ValueError(f"methods must be a non-empty subset of {FULL_METHODS}, got {methods}")
    out.mkdir(parents=True, exist_ok=True)
    wall0, cpu0 = time.perf_counter(), time.process_time()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    test_idx = task.test if recipe.n_test is None else task.test[: recipe.n_test]
    eval_set = eval_batches(task, test_idx, recipe.eval_batch_size)
    counts = Counter(task.labels[i] for i in test_idx)
    majority = max(counts.values()) / len(test_idx)  # accuracy of always predicting it

    log(f"calibrating on {recipe.calib_sentences} training sentences ({recipe.estimator}) …")
    report, report_few, calib, n_calib, n_few = calibrate(task, recipe, progress)
    plans = make_plans(report, recipe)
    plan_few = slora.allocate(report_few, avg_rank=recipe.avg_rank, budget="params")
    calib_wall, calib_cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    report.to_json(out / "sensitivity.json")
    stability = {
        "fraction": n_few / n_calib,
        "sentences": [n_few, n_calib],
        "kendall_tau_ranks": kendall_tau(plans["sensitivity"].ranks, plan_few.ranks),
        "kendall_tau_scores": kendall_tau(report.scores, report_few.scores),
    }

    grids = {
        m: list(sweep.get(m, [recipe.lr]) if isinstance(sweep, dict) else sweep or [recipe.lr])
        for m in methods
    }
    lrs: dict[str, float] = {m: grids[m][0] for m in methods}
    sweeps: dict[str, dict[str, float]] = {}
    if any(len(g) > 1 for g in grids.values()):
        val_set = eval_batches(task, task.val[: recipe.n_val], recipe.eval_batch_size)
        for m in methods:
            if len(grids[m]) < 2:
                continue
            sweeps[m] = {}
            for lr in grids[m]:
                log(f"lr sweep: {m} lr={lr:g} (seed {seeds[0]}, validation movies)")
                res = run_one(m, seeds[0], lr, task, recipe, plans, calib, val_set, progress)
                sweeps[m][f"{lr:g}"] = res["accuracy"]
            best = max(sweeps[m].values())
            lrs[m] = min(float(k) for k, v in sweeps[m].items() if v == best)

    results: dict[str, dict[str, Any]] = {}
    adapter_dir = out / "adapter"
    for seed in seeds:
        for m in methods:
            save = adapter_dir if (m == "sensitivity" and seed == seeds[0]) else None
            res = run_one(m, seed, lrs[m], task, recipe, plans, calib, eval_set, progress, save)
            entry = results.setdefault(
                m, {"accuracy": [], "top_class_share": [], "collapsed": [], "runs": []}
            )
            entry["accuracy"].append(res["accuracy"])
            entry["top_class_share"].append(res["top_class_share"])
            entry["collapsed"].append(res["collapsed"])
            entry["trainable_params"] = res["trainable_params"]
            entry["lora_params"] = res["lora_params"]
            entry.setdefault("final_lora_params", []).append(res["final_lora_params"])
            entry["lr"] = lrs[m]
            if res["ranks"] is not None:
                entry.setdefault("ranks_per_seed", []).append(res["ranks"])
            entry["runs"].append(
                {k: res[k] for k in ("final_loss", "train_wall_s", "train_cpu_s", "eval_wall_s")}
                | {"eval_cpu_s": res["eval_cpu_s"], "seed": seed}
            )
            log(
                f"  seed {seed} {m:<12} acc {res['accuracy']:.4f}  "
                f"({res['train_wall_s']:.0f} s train, {res['eval_wall_s']:.0f} s eval)"
            )
    for m, entry in results.items():
        per_seed = entry.pop("ranks_per_seed", None)
        if m in plans:
            entry["ranks"] = dict(plans[m].ranks)
        elif per_seed:
            entry["ranks"] = per_seed[0]
            entry["ranks_per_seed"] = per_seed
        entry["summary"] = _summary(entry["accuracy"])
        if m in sweeps:
            entry["lr_sweep_val_accuracy"] = sweeps[m]
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    doc = {
        "model": task.model_name,
        "dataset": task.dataset_name,
        "seeds": list(seeds),
        "methods": results,
        "paired_vs_uniform": paired(results),
        "majority_baseline": majority,
        "n_train": recipe.n_train,
        "n_test": len(test_idx),
        "targets": {
            "patterns": task.target_modules,
            "matrices": len(plans["uniform"].ranks),
            "note": "the library's default targets: every nn.Linear of the encoder; the pooler "
            "(not a default target: next to a fresh head its Fisher score dwarfs the rest) stays "
            "frozen and the classifier head is trained in full for every method",
        },
        "calibration": {
            "estimator": recipe.estimator,
            "sentences": n_calib,
            "tokens": report.num_tokens,
            "wall_s": calib_wall,
            "cpu_s": calib_cpu,
        },
        "stability": stability,
        "recipe": asdict(recipe) | {"lr_per_method": lrs, "lr_sweep": grids},
        "timing": {
            "wall_s": wall,
            "cpu_s": cpu,
            "torch_threads": torch.get_num_threads(),
            "load_average_at_start": load,
        },
    }
    (out / "results.json").write_text(json.dumps(doc, indent=2))
    write_plots(doc, report, out)
    return doc
