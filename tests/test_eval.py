"""``slora eval``: group-aware splits, the random control, AdaLoRA's matched budget, the paired
statistics (against scipy), the results schema and resuming, on a tiny model and CSV."""

from __future__ import annotations

import csv
import json
import math
import random
from collections import Counter

import pytest
import torch

import slora
from slora.evaluation import stats
from slora.evaluation.data import read_csv, sentences, split_groups
from slora.evaluation.plans import adalora_matched_triplets, shuffled_plan

WORDS = ["good", "great", "fine", "nice", "bad", "poor", "awful", "dull", "the", "film", "was"]


@pytest.mark.parametrize("seed", range(5))
def test_group_split_keeps_every_group_in_one_split(seed):
    rng = random.Random(seed)
    groups = [f"g{rng.randrange(3 + seed * 7)}" for _ in range(200)]
    train, val, test = split_groups(groups, seed=seed)
    assert sorted(train + val + test) == list(range(len(groups)))
    sides = [{groups[i] for i in part} for part in (train, val, test)]
    assert all(sides) and not (sides[0] & sides[1] or sides[0] & sides[2] or sides[1] & sides[2])
    with pytest.raises(ValueError, match="at least 3 groups"):
        split_groups(["a", "b", "a"])


def test_sentences_split_speeches():
    text = "Thank you so much.Thank you all. We will win! Is it? Yes it is, my friends."
    assert sentences(text, min_words=3) == ["Thank you so much.", "Thank you all.",
                                            "We will win!", "Yes it is, my friends."]  # fmt: skip


def _report(shapes):
    modules = {
        f"m{i}": {
            "d_in": a,
            "d_out": b,
            "global": 1.0,
            "topk": 1.0,
            "effrank": 1,
            "local": 1.0,
            "score": float(1 + (i * 7) % 5),
        }  # fmt: skip
        for i, (a, b) in enumerate(shapes)
    }
    return slora.SensitivityReport("fisher", 10, modules)


def test_random_control_keeps_histogram_and_parameter_count():
    shapes = [(16, 16)] * 6 + [(16, 64)] * 4 + [(64, 16)] * 4
    plan = slora.allocate(_report(shapes), avg_rank=4, budget="params", max_rank=16)
    changed = False
    for seed in range(5):
        shuffled = shuffled_plan(plan, seed)
        assert shuffled.trainable_params == plan.trainable_params
        assert Counter(shuffled.ranks.values()) == Counter(plan.ranks.values())
        for shape in set(shapes):  # ranks only move between matrices of one shape
            names = [n for n in plan.ranks if plan.dims[n] == shape]
            assert sorted(shuffled.ranks[n] for n in names) == sorted(plan.ranks[n] for n in names)
        changed |= shuffled.ranks != plan.ranks
    assert changed


def test_adalora_matched_budget_arithmetic():
    # MiniLM-L6: 24 square 384×384 matrices and 12 FFN 384×1536 / 1536×384 per model
    dims = {f"a{i}": (384, 384) for i in range(24)} | {f"f{i}": (384, 1536) for i in range(12)}
    params = 4 * sum(a + b for a, b in dims.values())  # uniform rank 4: 165,888
    mean_cost = (24 * 769 + 12 * 1921) / 36  # a triplet: a row of A, a column of B, one E
    assert params == 165_888
    assert adalora_matched_triplets(dims, params) == round(params / mean_cost) == 144


def test_adalora_keeps_the_matched_number_of_triplets():
    pytest.importorskip("peft")
    from tiny_models import tiny_bert

    from slora.demo.data import Task
    from slora.demo.methods import prepare
    from slora.demo.recipe import Recipe

    task = Task("tiny", "none", tiny_bert, lambda i, b: [], [], [], [], [], [], None)
    recipe = Recipe(avg_rank=2, adalora_target_triplets=17)
    prep = prepare("adalora", tiny_bert(), task, recipe, {}, 20, [], progress=False)
    allocator = prep.model.base_model.rankallocator
    assert allocator.target_bgt == 17 and allocator.init_bgt == 3 * 12


def test_paired_interval_matches_scipy():
    from scipy.stats import ttest_rel

    rng = random.Random(0)
    a = [0.7 + rng.gauss(0, 0.02) for _ in range(8)]
    b = [x - 0.01 + rng.gauss(0, 0.01) for x in a]
    p = stats.paired(a, b)
    ci = ttest_rel([100 * x for x in a], [100 * x for x in b]).confidence_interval(0.95)
    assert p["ci95_pt"] == pytest.approx([ci.low, ci.high], rel=1e-9)
    assert p["mean_pt"] == pytest.approx(100 * (sum(a) - sum(b)) / 8)
    assert p["wins"] == sum(x > y for x, y in zip(a, b)) and p["seeds"] == 8
    assert stats.paired([0.5], [0.4])["ci95_pt"] is None
    # pooled: per seed the mean over cells, then the interval over seeds
    cells = [{"seeds": [0, 1, 2], "paired_vs_uniform": {"m": {"diff_pt": d}}}
             for d in ([1.0, 2.0, 3.0], [3.0, 0.0, 1.0])]  # fmt: skip
    pooled = stats.pooled(cells, "m")
    per_seed = [2.0, 1.0, 2.0]
    lo, hi = ttest_rel(per_seed, [0.0] * 3).confidence_interval(0.95)
    assert pooled["mean_pt"] == pytest.approx(5 / 3) and pooled["ci95_pt"] == pytest.approx(
        [lo, hi]
    )


def _tiny_checkpoint(path):
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    path.mkdir(parents=True, exist_ok=True)
    vocab = path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    BertTokenizerFast(vocab_file=str(vocab)).save_pretrained(path)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=5 + len(WORDS), hidden_size=16, num_hidden_layers=2,
                     num_attention_heads=2, intermediate_size=24,
                     max_position_embeddings=32)  # fmt: skip
    BertForSequenceClassification(cfg).save_pretrained(path)
    return path


def _tiny_csv(path):
    rng = random.Random(0)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["review", "stars", "author"])
        for i in range(72):
            label = i % 2
            words = rng.sample(WORDS[:4] if label else WORDS[4:8], 2) + ["the", "film"]
            writer.writerow([" ".join(words), "pos" if label else "neg", f"a{(i // 2) % 12}"])
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    return _tiny_checkpoint(root / "model"), _tiny_csv(root / "data.csv")


def _args(tiny, out, *extra):
    model, data = tiny
    return ["eval", "--csv", str(data), "--text-column", "review", "--label-column", "stars",
            "--group-column", "author", "--model", str(model), "--out", str(out), "--seeds", "2",
            "--n-train", "16", "--max-length", "8", "--no-progress", *extra]  # fmt: skip


def test_eval_writes_the_schema_and_resumes(tiny, tmp_path, monkeypatch, capsys):
    from slora.cli import main
    from slora.evaluation import run as runner

    out = tmp_path / "out"
    args = _args(tiny, out, "--methods", "uniform,sensitivity,random", "--lrs", "1e-3,2e-3")
    assert main(args) == 0
    doc = json.loads((out / "results.json").read_text())
    assert set(doc["methods"]) == {"uniform", "sensitivity", "random"}
    for entry in doc["methods"].values():
        assert len(entry["test_accuracy"]) == 2 and all(0 <= a <= 1 for a in entry["test_accuracy"])
        assert entry["lr"] in (1e-3, 2e-3) and len(entry["lr_sweep_val_accuracy"]) == 2
    for m in ("sensitivity", "random"):
        p = doc["paired_vs_uniform"][m]
        assert {"mean_pt", "ci95_pt", "wins", "seeds"} <= set(p) and p["seeds"] == 2
        assert len(p["ci95_pt"]) == 2 and p["ci95_pt"][0] <= p["mean_pt"] <= p["ci95_pt"][1]
        assert math.isclose(
            p["mean_pt"],
            50
            * sum(
                x - y
                for x, y in zip(
                    doc["methods"][m]["test_accuracy"], doc["methods"]["uniform"]["test_accuracy"]
                )
            ),  # fmt: skip
        )
    params = {doc["methods"][m]["lora_params"] for m in doc["methods"]}
    assert max(params) - min(params) < 16 + 64  # the same budget (params rounding)
    assert (out / "paired_vs_uniform.png").stat().st_size > 0
    assert "Δ test vs uniform" in capsys.readouterr().out
    # 2 sweep lrs × 3 methods at seed 0, then seed 1 at the chosen lr: 9 runs on disk
    assert len(list((out / "runs").rglob("*.json"))) == 9

    calls = []
    real = runner.train_and_evaluate
    monkeypatch.setattr(
        runner, "train_and_evaluate", lambda *a, **k: calls.append(a) or real(*a, **k)
    )
    assert main(args) == 0  # everything on disk: nothing is trained again
    assert (
        calls == [] and json.loads((out / "results.json").read_text())["methods"] == doc["methods"]
    )
    victim = sorted((out / "runs").rglob("seed1_*.json"))[0]
    victim.unlink()
    assert main(args) == 0 and len(calls) == 1  # only the missing run


def test_eval_rejects_bad_columns(tiny, tmp_path, capsys):
    from slora.cli import main

    model, data = tiny
    args = _args(tiny, tmp_path / "o")
    args[args.index("review")] = "text"
    assert main(args) == 2
    assert "--text-column 'text' is not a column" in capsys.readouterr().err
    assert main(["eval", "--out", str(tmp_path / "o")]) == 2
    with pytest.raises(SystemExit):
        main(_args(tiny, tmp_path / "o", "--methods", "uniform,magic"))
    rows = read_csv(data, "review", "stars", "author")
    assert rows.label_names == ["neg", "pos"] and len(set(rows.group)) == 12
