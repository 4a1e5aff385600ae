"""Bad input and mid-call failures: every mutating call is all-or-nothing, non-finite numbers,
foreign LoRA, ignored arguments and tied weights are refused with clear messages."""

from __future__ import annotations

import json
import math

import pytest
import torch
from toy import (
    Toy,
    assert_same_model,
    ids,
    outputs,
    plan,
    randomize_lora,
    snapshot,
    targets,
)

import slora
from slora.core import patch as patch_mod
from slora.core import peft_io
from slora.core.layer import LoraLinear
from slora.core.patch import lora_layers, plan_for_ranks


def fail_on_call(monkeypatch, owner, attr, n):
    """Make ``owner.attr`` raise on its n-th call (1-based); earlier calls run normally."""
    original = getattr(owner, attr)
    calls = {"n": 0}

    def wrapper(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            raise RuntimeError("injected failure")
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, attr, wrapper)
    return calls


# -- 1. atomicity ------------------------------------------------------------------------------


@pytest.mark.parametrize("fail_at", [1, 2, 7])
def test_patch_failure_midway_leaves_model_unchanged(monkeypatch, fail_at):
    model = Toy()
    before, out = snapshot(model), outputs(model)
    fail_on_call(monkeypatch, patch_mod, "LoraLinear", fail_at)
    with pytest.raises(RuntimeError, match="injected"):
        slora.patch(model, plan(model))
    monkeypatch.undo()
    assert_same_model(before, snapshot(model))
    assert torch.equal(outputs(model), out)
    slora.patch(model, plan(model))  # and it can be patched afterwards
    assert len(lora_layers(model)) == len(targets(model))


def test_patch_failure_in_last_step_undoes_every_swap(monkeypatch):
    model = Toy()
    before = snapshot(model)
    fail_on_call(monkeypatch, patch_mod, "make_lora_groups", 1)
    with pytest.raises(RuntimeError, match="injected"):
        slora.patch(model, plan(model))
    monkeypatch.undo()
    assert_same_model(before, snapshot(model))


def test_patch_refuses_non_float_weight_second_in_plan():
    model = Toy()
    model.blocks[0].k_proj.weight = torch.nn.Parameter(
        torch.ones(8, 8, dtype=torch.int32), requires_grad=False
    )
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"blocks\.0\.k_proj.*floating-point"):
        slora.patch(model, plan(model))
    assert_same_model(before, snapshot(model))


def test_merge_failure_midway_restores_weights_exactly(monkeypatch):
    model = Toy()
    slora.patch(model, plan(model))
    randomize_lora(model)
    before, out = snapshot(model), outputs(model)
    fail_on_call(monkeypatch, LoraLinear, "delta_weight", 3)
    with pytest.raises(RuntimeError, match="injected"):
        slora.merge(model)
    monkeypatch.undo()
    assert_same_model(before, snapshot(model))
    assert torch.equal(outputs(model), out)
    slora.merge(model)
    torch.testing.assert_close(outputs(model), out, rtol=1e-5, atol=1e-5)


def test_unpatch_failure_midway_leaves_model_patched(monkeypatch):
    model = Toy()
    slora.patch(model, plan(model), modules_to_save=["classifier", "lm_head"])
    randomize_lora(model)
    with torch.no_grad():
        model.classifier.weight.add_(1.0)
        model.lm_head.weight.add_(1.0)
    before, out = snapshot(model), outputs(model)
    state = patch_mod.get_state(model)
    good = state.originals["lm_head"]
    state.originals["lm_head"] = {"weight": torch.zeros(2, 2)}  # fails after the classifier
    with pytest.raises(RuntimeError, match="size mismatch"):
        slora.unpatch(model)
    assert_same_model(before, snapshot(model))
    assert torch.equal(outputs(model), out)
    state.originals["lm_head"] = good
    slora.unpatch(model)
    assert not lora_layers(model)


def test_load_adapter_failure_midway_leaves_model_unchanged(monkeypatch, tmp_path):
    source = Toy()
    slora.patch(source, plan(source), modules_to_save=["classifier"])
    randomize_lora(source)
    with torch.no_grad():
        source.classifier.weight.add_(1.0)
    slora.save_adapter(source, tmp_path)
    model = Toy()
    before = snapshot(model)
    read = peft_io.read_adapter

    def corrupted(path, base):
        adapter = read(path, base)
        second = list(adapter.b)[1]
        adapter.b[second] = adapter.b[second][:3]  # fails on the 2nd module's copy
        return adapter

    monkeypatch.setattr(peft_io, "read_adapter", corrupted)
    with pytest.raises(RuntimeError):
        slora.load_adapter(model, tmp_path)
    monkeypatch.undo()
    assert_same_model(before, snapshot(model))
    slora.load_adapter(model, tmp_path)
    torch.testing.assert_close(outputs(model), outputs(source))


def test_pool_load_failure_midway_leaves_pool_unchanged(monkeypatch, tmp_path):
    source = Toy()
    slora.patch(source, plan(source))
    randomize_lora(source)
    slora.save_adapter(source, tmp_path / "a")
    randomize_lora(source, seed=4)
    slora.save_adapter(source, tmp_path / "b")
    model = Toy()
    pool = slora.AdapterPool(model, backend="torch")
    pool.load("a", tmp_path / "a")
    with pool.use("a"):
        out_a = outputs(model)
    before = pool_state(pool)
    fail_on_call(monkeypatch, type(next(iter(pool._packed.values()))), "load", 4)
    with pytest.raises(RuntimeError, match="injected"):
        pool.load("b", tmp_path / "b")
    monkeypatch.undo()
    assert pool.loaded == ["a"]
    after = pool_state(pool)
    assert before.keys() == after.keys()
    for key, value in before.items():
        assert torch.equal(value, after[key]), key
    with pool.use("a"):
        assert torch.equal(outputs(model), out_a)
    pool.load("b", tmp_path / "b")
    assert pool.loaded == ["a", "b"]


def pool_state(pool):
    """What the pool serves: per-slot metadata and every loaded adapter's A and B rows (the
    free space of the packed buffers may hold stale rows)."""
    out = {}
    for name, p in pool._packed.items():
        for field in ("ranks", "a_offsets", "b_offsets", "scales"):
            out[f"{name}.{field}"] = getattr(p, field).clone()
        for info in pool.adapters.values():
            for s, trip in enumerate(p.adapter(info.slot)):
                if trip is not None:
                    out[f"{name}.{info.name}.{s}.A"] = trip[0].clone()
                    out[f"{name}.{info.name}.{s}.B"] = trip[1].clone()
    return out


# -- 2. non-finite numbers ---------------------------------------------------------------------


@pytest.mark.parametrize("alpha", [math.nan, math.inf, -math.inf, -1.0, 0.0])
def test_patch_refuses_bad_lora_alpha(alpha):
    model = Toy()
    before = snapshot(model)
    with pytest.raises(ValueError, match="lora_alpha"):
        slora.patch(model, plan(model), lora_alpha=alpha)
    assert_same_model(before, snapshot(model))


def _saved_adapter(tmp_path):
    source = Toy()
    slora.patch(source, plan(source))
    randomize_lora(source)
    slora.save_adapter(source, tmp_path)
    return json.loads((tmp_path / "adapter_config.json").read_text())


@pytest.mark.parametrize(
    "edit, field",
    [
        (lambda c: c["alpha_pattern"].update({"blocks.0.q_proj": math.nan}), "alpha_pattern"),
        (lambda c: c["alpha_pattern"].update({"blocks.1.v_proj": math.inf}), "alpha_pattern"),
        (lambda c: c["alpha_pattern"].update({"blocks.1.v_proj": "2"}), "alpha_pattern"),
        (lambda c: c.update(lora_alpha=math.inf, alpha_pattern={}), "lora_alpha"),
        (lambda c: c.update(r=math.nan), "'r'|r must"),
        (lambda c: c["rank_pattern"].update({"blocks.0.q_proj": "x"}), "rank_pattern"),
        (lambda c: c["rank_pattern"].update({"(": 2}), "regular expression"),
        (lambda c: c.update(use_rslora="no"), "use_rslora"),
    ],
)
def test_adapter_config_numbers_are_checked(tmp_path, edit, field):
    config = _saved_adapter(tmp_path)
    edit(config)
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    model = Toy()
    before = snapshot(model)
    with pytest.raises(ValueError, match=field):
        slora.load_adapter(model, tmp_path)
    assert_same_model(before, snapshot(model))
    with pytest.raises(ValueError, match=field):
        slora.AdapterPool(Toy(), backend="torch").load("x", tmp_path)


@pytest.mark.parametrize("budget", [math.nan, math.inf, -5, 0, "big"])
def test_pool_refuses_bad_memory_budget(budget):
    with pytest.raises(ValueError, match="memory_budget_bytes"):
        slora.AdapterPool(Toy(), memory_budget_bytes=budget)


def _report_dict():
    mods = {
        n: {
            "d_in": 8,
            "d_out": 8,
            "global": 1.0,
            "topk": 0.5,
            "effrank": 3,
            "local": 1.0,
            "score": 1.0 + i,
        }
        for i, n in enumerate(["a", "b"])
    }
    return {"estimator": "fisher", "num_tokens": 10, "modules": mods}


@pytest.mark.parametrize(
    "key, value, field",
    [
        ("score", math.nan, "score"),
        ("global", math.inf, "global"),
        ("d_in", "8", "d_in"),
        ("d_out", -3, "d_out"),
        ("effrank", 2.5, "effrank"),
        ("topk", None, "topk"),
    ],
)
def test_report_json_fields_are_checked(tmp_path, key, value, field):
    data = _report_dict()
    data["modules"]["b"][key] = value
    path = tmp_path / "report.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=rf"report\.json.*'b'.*{field}"):
        slora.SensitivityReport.from_json(path)


def test_plan_json_is_checked(tmp_path):
    path = tmp_path / "plan.json"
    for bad, field in [
        ({"ranks": {"a": -1}}, "rank of 'a'"),
        ({"ranks": {"a": "x"}}, "rank of 'a'"),
        ({"ranks": {"a": 2}, "avg_rank": math.nan}, "avg_rank"),
        ({"ranks": {"a": 2}, "dims": {"a": [0, 4]}}, "dims of 'a'"),
        ({"ranks": {"a": 2}, "budget": "tokens"}, "budget"),
    ]:
        path.write_text(json.dumps(bad))
        with pytest.raises(ValueError, match=field):
            slora.RankPlan.from_json(path)
    path.write_text("{not json")
    with pytest.raises(ValueError, match=r"plan\.json: not valid JSON .*line 1"):
        slora.RankPlan.from_json(path)


# -- 3. another library's LoRA -----------------------------------------------------------------


def test_patch_refuses_a_model_with_peft_lora_layers():
    from peft import LoraConfig, get_peft_model, inject_adapter_in_model

    cfg = LoraConfig(r=2, target_modules=["q_proj", "v_proj"])
    injected = inject_adapter_in_model(cfg, Toy())
    before = snapshot(injected)
    with pytest.raises(ValueError, match=r"another library's LoRA.*blocks\.0\.q_proj.*peft"):
        slora.patch(injected, plan_for_ranks(injected, {"blocks.0.k_proj": 2}))
    assert_same_model(before, snapshot(injected))
    wrapped = get_peft_model(Toy(), LoraConfig(r=2, target_modules=["q_proj"]))
    for model in (wrapped, wrapped.base_model.model):
        with pytest.raises(ValueError, match="LoRA"):
            slora.patch(model, plan_for_ranks(model, {}))
        with pytest.raises(ValueError, match=r"already carries LoRA layers \(.*peft"):
            slora.AdapterPool(model)


# -- 4. arguments that cannot apply ------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"avg_rank": 4},
        {"estimator": "activation"},
        {"target_modules": ["q_proj"]},
        {"min_rank": 2},
        {"data": [ids()]},
    ],
)
def test_patch_refuses_calibration_arguments_next_to_a_plan(kwargs):
    model = Toy()
    with pytest.raises(ValueError, match=f"plan= and also {next(iter(kwargs))}"):
        slora.patch(model, plan(model), **kwargs)


@pytest.mark.parametrize(
    "argv, option",
    [
        (["analyze", "--batches", "-3"], "--batches"),
        (["analyze", "--batches", "0"], "--batches"),
        (["analyze", "--avg-rank", "nan"], "--avg-rank"),
        (["analyze", "--avg-rank", "-1"], "--avg-rank"),
        (["analyze", "--batch-size", "2.5"], "--batch-size"),
        (["analyze", "--max-length", "0"], "--max-length"),
        (["demo", "--seeds", "0"], "--seeds"),
        (["demo", "--lr", "inf"], "--lr"),
        (["demo", "--lrs", "1e-3,,2e-3"], "--lrs"),
        (["demo", "--threads", "-1"], "--threads"),
        (["demo", "--calib-head-epochs", "-1"], "--calib-head-epochs"),
    ],
)
def test_cli_refuses_out_of_range_numbers(capsys, argv, option):
    from slora.cli import main

    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert f"argument {option}" in capsys.readouterr().err


# -- 5. tied weights ---------------------------------------------------------------------------


def test_tied_lm_head_adapter_trains_saves_serves_but_does_not_merge(tmp_path):
    model = Toy(tied=True)
    embed_before = model.embed.weight.detach().clone()
    slora.patch(model, plan(model, with_head=True))
    randomize_lora(model)
    out = outputs(model)
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"'lm_head'.*tied to embed\.weight"):
        slora.merge(model)
    assert_same_model(before, snapshot(model))
    assert torch.equal(model.embed.weight, embed_before)
    slora.save_adapter(model, tmp_path)
    fresh = slora.load_adapter(Toy(tied=True), tmp_path)
    torch.testing.assert_close(outputs(fresh), out)
    served = Toy(tied=True)
    pool = slora.AdapterPool(served, targets(served, with_head=True), backend="torch")
    pool.load("a", tmp_path)
    with pool.use("a"):
        torch.testing.assert_close(outputs(served), out, rtol=1e-5, atol=1e-5)
    assert torch.equal(served.embed.weight, embed_before)
    slora.unpatch(model)
    assert torch.equal(model.embed.weight, embed_before)
    assert model.lm_head.weight is model.embed.weight


def test_tied_module_refused_in_modules_to_save():
    model = Toy(tied=True)
    with pytest.raises(ValueError, match=r"modules_to_save names 'lm_head'.*tied to embed"):
        slora.patch(model, plan(model), modules_to_save=["lm_head"])


def test_tied_llama_lm_head_merge_refused():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=40,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(cfg).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    slora.patch(model, plan_for_ranks(model, {"lm_head": 2, "model.layers.0.self_attn.q_proj": 2}))
    randomize_lora(model)
    x = torch.randint(0, 40, (2, 5))
    with torch.no_grad():
        out = model(x).logits
    with pytest.raises(ValueError, match=r"lm_head.*tied to model\.embed_tokens\.weight"):
        slora.merge(model)
    with torch.no_grad():
        assert torch.equal(model(x).logits, out)


def test_shared_module_object_refused():
    model = Toy()
    model.blocks[1].q_proj = model.blocks[0].q_proj  # one module at two paths
    with pytest.raises(ValueError, match=r"blocks\.0\.q_proj.*shared.*blocks\.1\.q_proj"):
        slora.patch(model, plan_for_ranks(model, {"blocks.0.q_proj": 2}))


# -- 6. errors a user can act on ---------------------------------------------------------------


def test_multiple_of_that_cannot_fit_is_blamed():
    report = slora.SensitivityReport.from_dict(_report_dict())
    with pytest.raises(ValueError, match=r"multiple_of=16 cannot fit 'a'"):
        slora.allocate(report, avg_rank=2, multiple_of=16)


def test_bad_regex_target_is_named():
    with pytest.raises(ValueError, match=r"'q_proj\(' .*not a valid regular expression"):
        slora.AdapterPool(Toy(), target_modules=["q_proj("])


def test_report_json_not_json(tmp_path):
    path = tmp_path / "r.json"
    path.write_text('{"estimator": ')
    with pytest.raises(ValueError, match=r"r\.json: not valid JSON"):
        slora.SensitivityReport.from_json(path)
    with pytest.raises(FileNotFoundError, match="sensitivity report file"):
        slora.SensitivityReport.from_json(tmp_path / "missing.json")


# -- 7. shared-input grouping ------------------------------------------------------------------


class InPlaceBetweenCalls(torch.nn.Module):
    """q/k/v read the same tensor object, but it is scaled in place between q and k."""

    def __init__(self) -> None:
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = (torch.nn.Linear(8, 8) for _ in range(3))

    def forward(self, x):
        x = x.clone()
        q = self.q_proj(x)
        x.mul_(2.0)
        return torch.cat([q, self.k_proj(x), self.v_proj(x)], -1)


def test_grouping_notices_in_place_changes_between_sibling_calls():
    results = {}
    x = torch.randn(3, 8)
    for grouped in (True, False):
        torch.manual_seed(0)
        model = InPlaceBetweenCalls()
        slora.patch(
            model,
            plan_for_ranks(model, {"q_proj": 2, "k_proj": 3, "v_proj": 1}),
            group_shared_inputs=grouped,
        )
        randomize_lora(model)
        with torch.no_grad():
            results[grouped] = model(x)
    torch.testing.assert_close(results[True], results[False])


@pytest.mark.parametrize("scale", [math.nan, math.inf, -math.inf])
def test_kernel_side_scales_must_be_finite(scale):
    from slora.ops import PackedAdapters

    A, B = torch.randn(2, 8), torch.randn(6, 2)
    packed = PackedAdapters.from_list([(A, B, 1.0), None])
    before = [t.clone() for t in (packed.ranks, packed.scales)]
    with pytest.raises(ValueError, match="slot 1 slice 0: scale must be a finite number"):
        packed.load(1, (A, B, scale))
    assert all(torch.equal(a, b) for a, b in zip(before, (packed.ranks, packed.scales)))
    with pytest.raises(ValueError, match=r"scales\[1\] must be a finite number"):
        slora.ops.lora_slices(torch.randn(3, 8), [A, A], [B, B], [1.0, scale])
