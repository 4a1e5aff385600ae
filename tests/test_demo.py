"""``slora demo``: data order, schedule, methods, results schema and outputs.

The pipeline runs on a tiny BERT built from a config and a synthetic labelled token set (no
download, seconds); one slow test runs the real ``slora demo --smoke`` on the embedded default.
"""

from __future__ import annotations

import json
import random
from dataclasses import replace

import pytest
import torch
from tiny_models import VOCAB, tiny_bert

import slora
from slora import demo


def tiny_task(n: int = 96, seed: int = 0) -> demo.Task:
    """Token sequences whose label is whether token 7 occurs: learnable, with varied lengths."""
    rng = random.Random(seed)
    seqs, labels = [], []
    for _ in range(n):
        length = rng.randint(3, 12)
        ids = [rng.randint(8, VOCAB - 1) for _ in range(length)]
        label = rng.random() < 0.5
        if label:
            ids[rng.randrange(length)] = 7
        seqs.append(ids)
        labels.append(int(label))

    def encode(indices: list[int], batch_size: int) -> list[dict[str, torch.Tensor]]:
        out = []
        for s in range(0, len(indices), batch_size):
            chunk = indices[s : s + batch_size]
            width = max(len(seqs[i]) for i in chunk)
            ids = torch.zeros(len(chunk), width, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for row, i in enumerate(chunk):
                ids[row, : len(seqs[i])] = torch.tensor(seqs[i])
                mask[row, : len(seqs[i])] = 1
            out.append(
                {
                    "input_ids": ids,
                    "attention_mask": mask,
                    "labels": torch.tensor([labels[i] for i in chunk]),
                }
            )
        return out

    idx = list(range(n))
    return demo.Task(
        model_name="tiny-bert",
        dataset_name="synthetic",
        load_model=lambda s: tiny_bert(seed=s),
        encode=encode,
        labels=labels,
        lengths=[len(s) for s in seqs],
        train=idx[: n // 2],
        val=idx[n // 2 : 3 * n // 4],
        test=idx[3 * n // 4 :],
        target_modules=[r"bert\.encoder\..*"],
    )


def tiny_recipe(**kw) -> demo.Recipe:
    base = dict(
        lr=5e-3, n_train=32, n_val=16, batch_size=8, eval_batch_size=16, calib_sentences=32,
        calib_batch_size=8, warmup_frac=0.1, avg_rank=2,
    )  # fmt: skip
    return demo.Recipe(**(base | kw))


def test_training_order_depends_on_seed_only_and_buckets_lengths():
    rng = random.Random(1)
    lengths = [rng.randint(1, 50) for _ in range(200)]
    pool = list(range(200))
    a = demo.training_order(pool, lengths, 96, seed=3, batch_size=8)
    b = demo.training_order(pool, lengths, 96, seed=3, batch_size=8)
    c = demo.training_order(pool, lengths, 96, seed=4, batch_size=8)
    assert a == b and a != c
    flat = [i for batch in a for i in batch]
    assert len(flat) == len(set(flat)) == 96 and set(flat) <= set(pool)
    assert all(len(batch) == 8 for batch in a)
    # bucketing: the length spread inside a batch is below that of a random batch
    spread = sum(max(lengths[i] for i in bt) - min(lengths[i] for i in bt) for bt in a) / len(a)
    random.Random(0).shuffle(flat)
    rnd = [flat[j : j + 8] for j in range(0, 96, 8)]
    spread_rnd = sum(max(lengths[i] for i in bt) - min(lengths[i] for i in bt) for bt in rnd) / 12
    assert spread < spread_rnd / 2
    two = demo.training_order(pool, lengths, 96, seed=3, batch_size=8, epochs=2)
    assert len(two) == 24 and sorted(i for bt in two for i in bt) == sorted(flat * 2)


def test_lr_schedule_warms_up_then_decays_to_zero():
    f = demo.lr_lambda(100, 0.1)
    values = [f(s) for s in range(100)]
    assert values[0] == pytest.approx(0.1) and values[9] == pytest.approx(1.0)
    assert all(x >= y for x, y in zip(values[9:], values[10:]))
    assert values[10] == pytest.approx(1.0) and values[-1] == pytest.approx(1 / 90)
    assert demo.lr_lambda(10, 0.0)(0) == pytest.approx(1.0)


def test_evaluate_counts_accuracy_and_detects_collapse():
    class Const(torch.nn.Module):
        def __init__(self, cls):
            super().__init__()
            self.cls = cls

        def forward(self, input_ids, **_):
            logits = torch.zeros(input_ids.shape[0], 2)
            logits[:, self.cls] = 1.0
            return type("Out", (), {"logits": logits})()

    batches = [
        {"input_ids": torch.zeros(4, 3, dtype=torch.long), "labels": torch.tensor([1, 1, 0, 1])}
    ]
    res = demo.evaluate(Const(1), batches)
    assert res == {"accuracy": 0.75, "top_class_share": 1.0}
    assert demo.evaluate(Const(0), batches)["accuracy"] == 0.25
    with pytest.raises(ValueError, match="no evaluation example"):
        demo.evaluate(Const(0), [])


def test_plans_have_the_same_parameter_budget_and_sra_follows_scores():
    task = tiny_task()
    report, report_few, calib, n, few = demo.calibrate(task, tiny_recipe(), progress=False)
    assert few == max(2, round(0.1 * n + 0.49)) and len(calib) == 4
    assert all(not name.startswith("bert.pooler") for name in report.modules)
    assert len(report.modules) == 12  # 2 layers × (q, k, v, o, intermediate, output)
    plans = demo.make_plans(report, tiny_recipe())
    uni, sens = plans["uniform"], plans["sensitivity"]
    assert set(uni.ranks.values()) == {2}
    assert abs(sens.trainable_params - uni.trainable_params) < 2 * max(
        sum(d) for d in uni.dims.values()
    )
    top = max(report.scores, key=report.scores.get)
    assert sens.ranks[top] == max(sens.ranks.values())


def test_kendall_tau():
    assert demo.kendall_tau({"a": 1, "b": 2, "c": 3}, {"a": 10, "b": 20, "c": 30}) == 1.0
    assert demo.kendall_tau({"a": 1, "b": 2, "c": 3}, {"a": 3, "b": 2, "c": 1}) == -1.0
    assert demo.kendall_tau({"a": 1, "b": 1}, {"a": 2, "b": 1}) is None


def test_run_demo_writes_schema_plots_and_a_loadable_adapter(tmp_path):
    task = tiny_task()
    recipe = tiny_recipe()
    doc = demo.run_demo(task, recipe, tmp_path, seeds=[0, 1], progress=False, log=lambda s: None)
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk["seeds"] == [0, 1] and on_disk["model"] == "tiny-bert"
    assert set(on_disk["methods"]) == {"uniform", "sensitivity"}
    for m in on_disk["methods"].values():
        assert len(m["accuracy"]) == 2 and all(0.0 <= a <= 1.0 for a in m["accuracy"])
        assert isinstance(m["trainable_params"], int) and m["trainable_params"] > m["lora_params"]
        assert len(m["ranks"]) == 12 and len(m["collapsed"]) == 2
    uni, sens = on_disk["methods"]["uniform"], on_disk["methods"]["sensitivity"]
    assert abs(uni["lora_params"] - sens["lora_params"]) <= 0.05 * uni["lora_params"]
    p = on_disk["paired_vs_uniform"]["sensitivity"]
    assert p["wins"] + p["ties"] + p["losses"] == 2
    assert p["diff"] == pytest.approx([s - u for s, u in zip(sens["accuracy"], uni["accuracy"])])
    tau = on_disk["stability"]["kendall_tau_ranks"]
    assert tau is None or -1.0 <= tau <= 1.0
    for png in ("sensitivity_by_layer.png", "ranks.png", "accuracy.png"):
        assert (tmp_path / png).stat().st_size > 5000
    assert "sensitivity" in demo.format_table(doc) and "Kendall" in demo.format_table(doc)
    # the adapter is the seed-0 Sensitivity-LoRA run, in PEFT format, with the planned ranks
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["rank_pattern"] == {n: r for n, r in sens["ranks"].items() if r > 0}
    assert "classifier" in cfg["modules_to_save"]
    model = slora.load_adapter(tiny_bert(seed=0), tmp_path / "adapter")
    batch = task.encode(task.test, 64)[0]
    with torch.no_grad():
        pred = model(**{k: v for k, v in batch.items() if k != "labels"}).logits.argmax(-1)
    acc = float((pred == batch["labels"]).float().mean())
    assert acc == pytest.approx(sens["accuracy"][0])


def test_same_seed_gives_the_same_result_and_training_learns(tmp_path):
    task = tiny_task()
    recipe = tiny_recipe(n_train=48, epochs=3)
    plans = demo.make_plans(demo.calibrate(task, recipe, progress=False)[0], recipe)
    ev = demo.eval_batches(task, task.train[:48], 16)
    kw = dict(task=task, recipe=recipe, plans=plans, calib=[], eval_set=ev, progress=False)
    a = demo.run_one("uniform", 0, 5e-3, **kw)
    b = demo.run_one("uniform", 0, 5e-3, **kw)
    assert a["accuracy"] == b["accuracy"] and a["final_loss"] == b["final_loss"]
    untrained = demo.evaluate(task.load_model(0), ev)["accuracy"]
    assert a["final_loss"] < 0.69 or a["accuracy"] > untrained


def test_peft_methods_run_at_the_same_average_rank(tmp_path):
    pytest.importorskip("peft")
    task = tiny_task()
    recipe = tiny_recipe(avg_rank=2, n_train=32)
    report, _, calib, _, _ = demo.calibrate(task, recipe, progress=False)
    plans = demo.make_plans(report, recipe)
    ev = demo.eval_batches(task, task.test, 16)
    kw = dict(task=task, recipe=recipe, plans=plans, calib=calib, eval_set=ev, progress=False)
    ada = demo.run_one("adalora", 0, 5e-3, **kw)
    assert len(ada["ranks"]) == 12 and all(0 <= r <= 3 for r in ada["ranks"].values())
    # AdaLoRA trains init_r = 3 triplets per module, then prunes to the same total rank as
    # uniform (2 per module); its final budget counts only the kept triplets (A row, B column,
    # E entry), so it is comparable with the other methods' LoRA parameters.
    uniform = plans["uniform"]
    assert sum(ada["ranks"].values()) == sum(uniform.ranks.values())
    kept = sum(r * (sum(uniform.dims[n]) + 1) for n, r in ada["ranks"].items())
    assert ada["final_lora_params"] == kept < ada["lora_params"]
    eva = demo.run_one("eva", 0, 5e-3, **kw)
    assert len(eva["ranks"]) == 12 and sum(eva["ranks"].values()) <= 2 * 12
    assert eva["lora_params"] > 0 and 0.0 <= eva["accuracy"] <= 1.0


def test_bad_arguments_are_named(tmp_path):
    task = tiny_task()
    with pytest.raises(ValueError, match="seeds"):
        demo.run_demo(task, tiny_recipe(), tmp_path, seeds=[], progress=False)
    with pytest.raises(ValueError, match="methods"):
        demo.run_demo(task, tiny_recipe(), tmp_path, [0], methods=["lora-fa"], progress=False)
    with pytest.raises(ValueError, match="methods"):
        demo.run_demo(task, tiny_recipe(), tmp_path, [0], methods=[], progress=False)
    with pytest.raises(ValueError, match="lr"):
        demo.run_demo(task, tiny_recipe(lr=0.0), tmp_path, [0], progress=False)
    with pytest.raises(ValueError, match="unknown method"):
        demo.prepare("dora", tiny_bert(), task, tiny_recipe(), {}, 4, [])


def test_smoke_mode_from_the_flag_or_the_environment(monkeypatch):
    from slora.cli import build_parser
    from slora.demo.cli import settings

    monkeypatch.delenv("SLORA_DEMO_SMOKE", raising=False)
    default = settings(build_parser().parse_args(["demo"]))
    assert not default.smoke and default.seeds == [0, 1, 2] and default.recipe == demo.Recipe()
    assert default.methods == ("uniform", "sensitivity") and default.sweep is None
    flag = settings(build_parser().parse_args(["demo", "--smoke"]))
    monkeypatch.setenv("SLORA_DEMO_SMOKE", "1")
    env = settings(build_parser().parse_args(["demo"]))
    for run in (flag, env):
        assert run.smoke and run.seeds == [0] and run.recipe.n_train == 32
        assert run.methods == default.methods  # the same pipeline, shorter
    full = settings(build_parser().parse_args(["demo", "--full"]))
    assert full.seeds == [0] and set(full.sweep) == set(demo.FULL_METHODS)  # smoke still on
    monkeypatch.setenv("SLORA_DEMO_SMOKE", "0")
    assert not settings(build_parser().parse_args(["demo"])).smoke


def test_cli_parses_demo_options():
    from slora.cli import build_parser
    from slora.demo import cli as demo_cli

    args = build_parser().parse_args(["demo", "--out", "x", "--seeds", "4", "--full"])
    assert args.out == "x" and args.seeds == 4 and args.full and args.func is demo_cli.run
    assert build_parser().parse_args(["demo"]).out == "slora-demo"


@pytest.mark.slow
def test_smoke_run_of_the_real_demo(tmp_path, capsys):
    from slora.cli import main

    out = tmp_path / "demo"
    assert main(["demo", "--smoke", "--seeds", "1", "--out", str(out), "--no-progress"]) == 0
    doc = json.loads((out / "results.json").read_text())
    assert doc["targets"]["matrices"] == 36 and doc["n_test"] == 48
    assert set(doc["methods"]) == {"uniform", "sensitivity"}
    assert (out / "adapter" / "adapter_model.safetensors").exists()
    assert "mean ± sd" in capsys.readouterr().out


def test_head_learning_rate_multiplier_applies_to_the_head_only():
    task = tiny_task()
    recipe = tiny_recipe(head_lr_mult=0.0, warmup_frac=0.0)
    plans = demo.make_plans(demo.calibrate(task, recipe, progress=False)[0], recipe)
    model = slora.patch(task.load_model(0), plans["uniform"], modules_to_save=task.head)
    head_before = model.classifier.weight.detach().clone()
    b_before = model.bert.encoder.layer[0].attention.self.query.lora_B.weight.detach().clone()
    batches = task.encode(task.train[:16], 8)
    demo.train(model, batches, recipe, 1e-2, progress=False, head=task.head)
    assert torch.equal(model.classifier.weight, head_before)
    assert not torch.equal(model.bert.encoder.layer[0].attention.self.query.lora_B.weight, b_before)
    demo.train(
        model, batches, replace(recipe, head_lr_mult=1.0), 1e-2, progress=False, head=task.head
    )
    assert not torch.equal(model.classifier.weight, head_before)


def test_head_warm_up_trains_only_the_head_and_changes_calibration():
    task = tiny_task()
    recipe = replace(tiny_recipe(), estimator="fisher")  # the head matters to gradients only
    model = task.load_model(0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    batches = task.encode(task.train[:32], 8)
    demo.warm_up_head(model, task, recipe, batches, progress=False)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {"classifier.weight", "classifier.bias"}
    assert all(p.requires_grad for p in model.parameters())  # flags restored
    cold = demo.calibrate(task, recipe, progress=False)[0]
    warm = demo.calibrate(task, replace(recipe, calib_head_epochs=2), progress=False)[0]
    assert cold.scores != warm.scores


def test_lr_sweep_picks_each_methods_best_on_validation(tmp_path):
    task = tiny_task()
    recipe = tiny_recipe()
    sweep = {"uniform": [1e-4, 5e-3]}
    doc = demo.run_demo(task, recipe, tmp_path, [0], sweep=sweep, progress=False, log=lambda s: 0)
    uni = doc["methods"]["uniform"]
    val = uni["lr_sweep_val_accuracy"]
    assert set(val) == {"0.0001", "0.005"}
    assert val[f"{uni['lr']:g}"] == max(val.values())
    assert doc["methods"]["sensitivity"]["lr"] == recipe.lr
    assert "lr_sweep_val_accuracy" not in doc["methods"]["sensitivity"]
