"""slora.analyze against an independent float64 computation on tiny Llama, BERT and GPT-2."""

import copy
import warnings

import oracles
import pytest
import torch
from tiny_models import MODELS, batches

import slora
from slora.core.targets import find_targets


def reference_report(model, data, estimator, names):
    """Metrics and scores from token-level x, dy captured in a float64 copy of the model."""
    m = copy.deepcopy(model).double().eval()
    modules = dict(m.named_modules())
    xs = {n: [] for n in names}
    dys = {n: [] for n in names}
    for batch in data:
        mask = batch["attention_mask"].bool()
        outs = {}

        def hook(name, mask=mask, outs=outs):
            def fn(mod, args, output):
                x = args[0].detach()
                lead = x.shape[:-1]
                keep = mask if lead == mask.shape else torch.ones(lead, dtype=torch.bool)
                xs[name].append(x[keep])
                output.retain_grad()
                outs[name] = (output, keep)

            return fn

        handles = [modules[n].register_forward_hook(hook(n)) for n in names]
        for p in m.parameters():
            p.requires_grad_(True)
        loss = m(**batch).loss
        loss.backward()
        for h in handles:
            h.remove()
        for n, (out, keep) in outs.items():
            dys[n].append(out.grad[keep])
    per = {}
    for n in names:
        x = torch.cat(xs[n])
        dy = torch.cat(dys[n]) if dys[n] else torch.zeros(x.shape[0], 1)
        per[n] = oracles.metrics(estimator, x, dy)
    return per, oracles.combine(per)


@pytest.mark.parametrize("kind", ["bert", "llama", "gpt2"])
@pytest.mark.parametrize("estimator", ["activation", "fisher", "fisher_exact"])
def test_analyze_matches_float64_reference(kind, estimator):
    model = MODELS[kind]()
    data = batches(kind)
    report = slora.analyze(model, data, estimator=estimator, progress=False)
    names = list(report.modules)
    assert names == list(find_targets(model))
    per, theta = reference_report(model, data, estimator, names)
    real_tokens = int(sum(b["attention_mask"].sum() for b in data))
    assert report.num_tokens == real_tokens
    for n in names:
        got = report.modules[n]
        m = got["d_in"] * got["d_out"]
        assert got["global"] == pytest.approx(per[n]["global"], rel=1e-4), n
        assert got["topk"] == pytest.approx(per[n]["topk"], rel=1e-4), n
        assert abs(got["effrank"] - per[n]["effrank"]) <= max(2, 1e-3 * m), n
        assert got["score"] == pytest.approx(theta[n], rel=2e-3), n


@pytest.mark.parametrize("estimator", ["activation", "fisher", "fisher_exact"])
def test_model_comes_back_unchanged(estimator):
    model = MODELS["llama"]().train()
    model.model.embed_tokens.weight.requires_grad_(False)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    slora.analyze(model, batches("llama"), estimator=estimator, progress=False)
    assert model.training
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters()), "a weight received a gradient"
    assert all(not mod._forward_hooks for mod in model.modules()), "a hook was left behind"
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_padding_is_excluded():
    """Changing what sits under padding changes nothing (BERT masks it in attention)."""
    model = MODELS["bert"]()
    data = batches("bert")
    # Exclude the pooler: it sees one vector per sequence, where every row counts.
    targets = [r"bert\.encoder\..*"]
    a = slora.analyze(model, data, "fisher", target_modules=targets, progress=False)
    noisy = copy.deepcopy(data)
    for b in noisy:
        b["input_ids"] = torch.where(b["attention_mask"].bool(), b["input_ids"], 5)
    b = slora.analyze(model, noisy, "fisher", target_modules=targets, progress=False)
    for n in a.modules:
        assert a.modules[n]["global"] == pytest.approx(b.modules[n]["global"], rel=1e-5)
    # ...whereas treating padding as real tokens does change the statistics.
    unmasked = [{k: v for k, v in x.items() if k != "attention_mask"} for x in noisy]
    c = slora.analyze(model, unmasked, "activation", target_modules=targets, progress=False)
    assert c.num_tokens != a.num_tokens or c.modules != a.modules


def test_loss_fn_and_max_batches():
    model = MODELS["bert"]()
    data = batches("bert", n=4)
    calls = []

    def loss_fn(m, batch):
        calls.append(1)
        out = m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        return out.logits.pow(2).mean()

    report = slora.analyze(model, data, "fisher", loss_fn=loss_fn, max_batches=2, progress=False)
    assert len(calls) == 2
    assert report.num_tokens == int(sum(b["attention_mask"].sum() for b in data[:2]))


def test_non_finite_batch_is_skipped_and_result_equals_clean_run():
    model = MODELS["bert"]()
    data = batches("bert", n=3)

    def loss_fn(m, batch):
        loss = m(**batch).loss
        return loss * float("nan") if batch.get("poison") else loss

    poisoned = [data[0], dict(data[1], poison=True), data[2]]
    clean = slora.analyze(model, [data[0], data[2]], "fisher", loss_fn=loss_fn, progress=False)
    with pytest.warns(RuntimeWarning, match="batch 1"):
        got = slora.analyze(model, poisoned, "fisher", loss_fn=loss_fn, progress=False)
    for n in clean.modules:
        assert got.modules[n]["score"] == pytest.approx(clean.modules[n]["score"], rel=1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match="no usable calibration batch"):
            slora.analyze(
                model,
                [dict(d, poison=True) for d in data],
                "fisher",
                loss_fn=loss_fn,
                progress=False,
            )


def test_report_json_round_trip(tmp_path):
    report = slora.analyze(MODELS["gpt2"](), batches("gpt2"), progress=False)
    report.to_json(tmp_path / "r.json")
    again = slora.SensitivityReport.from_json(tmp_path / "r.json")
    assert again.to_dict() == report.to_dict()
    assert set(report.to_dict()) == {"estimator", "num_tokens", "modules"}
    assert set(next(iter(report.to_dict()["modules"].values()))) == {
        "d_in",
        "d_out",
        "global",
        "topk",
        "effrank",
        "local",
        "score",
    }
    table = report.table()
    assert all(n in table for n in report.modules)


BAD_INPUTS = [
    (dict(estimator="hessian"), ValueError, "unknown estimator"),
    (dict(target_modules=["nonexistent_proj"]), ValueError, "matches no nn.Linear"),
    (dict(target_modules=["embeddings"]), ValueError, "only non-linear"),
    (dict(max_batches=0), ValueError, "max_batches"),
    (dict(topk_frac=0.0), ValueError, "topk_frac"),
    (dict(data=[]), ValueError, "calibration data is empty"),
    (dict(data="all_padding"), ValueError, "all padding"),
    (dict(data="single_dict"), TypeError, "iterable of batches"),
    (dict(loss_fn=lambda m, b: m(**b).logits, estimator="fisher"), TypeError, "scalar"),
    (dict(data="no_labels", estimator="fisher"), ValueError, "no loss"),
]


@pytest.mark.parametrize("kwargs,exc,match", BAD_INPUTS, ids=[b[2] for b in BAD_INPUTS])
def test_bad_input_errors(kwargs, exc, match):
    model = MODELS["bert"]()
    data = batches("bert", n=1)
    special = kwargs.get("data")
    if special == "all_padding":
        kwargs["data"] = [dict(data[0], attention_mask=torch.zeros_like(data[0]["attention_mask"]))]
    elif special == "single_dict":
        kwargs["data"] = data[0]
    elif special == "no_labels":
        kwargs["data"] = [{k: v for k, v in data[0].items() if k != "labels"}]
    kwargs.setdefault("data", data)
    with pytest.raises(exc, match=match):
        slora.analyze(model, progress=False, **kwargs)
    assert all(not mod._forward_hooks for mod in model.modules())
