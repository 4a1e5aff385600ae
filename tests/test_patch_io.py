"""patch → train → save → load (PEFT and slora), merge/unpatch, Trainer, errors."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import MODELS, batches

import slora
from slora.core.layer import LoraLinear


def plan_for(kind, avg_rank=4, **kw):
    model = MODELS[kind]()
    report = slora.analyze(model, batches(kind), progress=False)
    return model, slora.allocate(report, avg_rank=avg_rank, **kw)


def train_steps(model, data, steps=12, lr=1e-2):
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    losses = []
    for i in range(steps):
        loss = model(**data[i % len(data)]).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return model.eval(), losses


def logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


@pytest.mark.parametrize("kind", ["bert", "llama", "gpt2"])
def test_patch_train_save_and_peft_load_reproduce_outputs(kind, tmp_path):
    from peft import PeftModel

    model, plan = plan_for(kind)
    data = batches(kind)
    base_out = logits(model, data[0])
    extra = ["classifier"] if kind == "bert" else None
    slora.patch(model, plan, modules_to_save=extra)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or "classifier" in n for n in trainable)
    n_lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert n_lora == plan.trainable_params
    assert torch.allclose(logits(model, data[0]), base_out)  # B = 0 at init
    model, losses = train_steps(model, data)
    assert sum(losses[-3:]) < sum(losses[:3]), losses
    assert all(p.grad is None for n, p in model.named_parameters() if not p.requires_grad)
    tuned = logits(model, data[0])
    assert not torch.allclose(tuned, base_out, atol=1e-4)

    slora.save_adapter(model, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    active = {n: r for n, r in plan.ranks.items() if r > 0}
    assert cfg["rank_pattern"] == active and sorted(cfg["target_modules"]) == sorted(active)
    assert cfg["r"] == max(active.values()) and cfg["lora_alpha"] == cfg["r"]
    assert cfg["alpha_pattern"] == {n: float(r) for n, r in active.items()}
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    for n, r in active.items():
        assert tensors[f"base_model.model.{n}.lora_A.weight"].shape[0] == r
        assert tensors[f"base_model.model.{n}.lora_B.weight"].shape[1] == r

    peft_model = PeftModel.from_pretrained(MODELS[kind](), tmp_path).eval()
    torch.testing.assert_close(
        logits(peft_model, data[1]), logits(model, data[1]), rtol=1e-5, atol=1e-5
    )
    loaded = slora.load_adapter(MODELS[kind](), tmp_path).eval()
    torch.testing.assert_close(
        logits(loaded, data[2]), logits(model, data[2]), rtol=1e-5, atol=1e-5
    )


def test_one_global_scale_reproduces_outputs_like_vllm(tmp_path):
    """A server that applies lora_alpha / r to every module gets the patched model's output."""
    model, plan = plan_for("llama")
    slora.patch(model, plan)
    model, _ = train_steps(model, batches("llama"), steps=4)
    slora.save_adapter(model, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    scale = cfg["lora_alpha"] / cfg["r"]
    base = MODELS["llama"]()
    with torch.no_grad():
        for name, module in base.named_modules():
            key = f"base_model.model.{name}.lora_A.weight"
            if key in tensors:
                b = tensors[key.replace("lora_A", "lora_B")]
                module.weight += scale * b @ tensors[key]
    data = batches("llama")[0]
    torch.testing.assert_close(logits(base, data), logits(model, data), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("use_rslora", [False, True])
def test_unfolded_scales_and_rslora_round_trip_through_peft(tmp_path, use_rslora):
    from peft import PeftModel

    model, plan = plan_for("bert")
    slora.patch(model, plan, lora_alpha=6.0, use_rslora=use_rslora)
    layers = [m for m in model.modules() if isinstance(m, LoraLinear)]
    scales = {m.scale for m in layers}
    assert len(scales) == (len({m.rank for m in layers}) if use_rslora else 1)
    model, _ = train_steps(model, batches("bert"), steps=3)
    slora.save_adapter(model, tmp_path, fold_scale=False)
    peft_model = PeftModel.from_pretrained(MODELS["bert"](), tmp_path).eval()
    data = batches("bert")[0]
    torch.testing.assert_close(logits(peft_model, data), logits(model, data), rtol=1e-5, atol=1e-5)


def test_merge_and_unpatch():
    model, plan = plan_for("gpt2")
    data = batches("gpt2")
    original = logits(model, data[0])
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    slora.patch(model, plan)
    model, _ = train_steps(model, data, steps=3)
    tuned = logits(model, data[0])
    slora.unpatch(model)
    assert not any(isinstance(m, LoraLinear) for m in model.modules())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    torch.testing.assert_close(logits(model, data[0]), original)
    # merge keeps the tuned function in plain weights
    model2, plan2 = plan_for("gpt2")
    slora.patch(model2, plan2)
    model2, _ = train_steps(model2, data, steps=3)
    tuned2 = logits(model2, data[0])
    slora.merge(model2)
    torch.testing.assert_close(logits(model2, data[0]), tuned2, rtol=1e-5, atol=1e-5)
    slora.unpatch(model2)
    torch.testing.assert_close(logits(model2, data[0]), tuned2, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(tuned, original)


def test_patch_from_data_in_one_call():
    model = MODELS["bert"]()
    slora.patch(model, data=batches("bert"), avg_rank=2, min_rank=0)
    ranks = {n: m.rank for n, m in model.named_modules() if isinstance(m, LoraLinear)}
    assert ranks and sum(ranks.values()) <= 2 * 13


def test_trainer_trains_a_patched_model(tmp_path):
    from torch.utils.data import Dataset
    from transformers import Trainer, TrainingArguments

    model, plan = plan_for("bert")
    slora.patch(model, plan, modules_to_save=["classifier"])
    data = batches("bert", n=4, pad=False)

    class Rows(Dataset):
        def __len__(self):
            return 16

        def __getitem__(self, i):
            b = data[i // 4]
            return {k: v[i % 4] for k, v in b.items()}

    before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n}
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=4,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
    )
    Trainer(model=model, args=args, train_dataset=Rows()).train()
    after = dict(model.named_parameters())
    assert all(not torch.equal(before[n], after[n]) for n in before)


def test_patch_errors():
    model, plan = plan_for("bert")
    with pytest.raises(ValueError, match="needs a plan"):
        slora.patch(model)
    with pytest.raises(TypeError, match="RankPlan"):
        slora.patch(model, {"x": 1})
    bad = slora.RankPlan({"bert.nothing": 2})
    with pytest.raises(ValueError, match="does not have"):
        slora.patch(model, bad)
    with pytest.raises(ValueError, match="expected nn.Linear"):
        slora.patch(model, slora.RankPlan({"bert.embeddings": 2}))
    wrong = slora.RankPlan(dict(plan.ranks), {n: (1, 1) for n in plan.ranks})
    with pytest.raises(ValueError, match="another model"):
        slora.patch(model, wrong)
    with pytest.raises(ValueError, match="rank 0"):
        slora.patch(model, slora.RankPlan(dict.fromkeys(plan.ranks, 0)))
    with pytest.raises(ValueError, match="lora_dropout"):
        slora.patch(model, plan, lora_dropout=1.5)
    assert not any(isinstance(m, LoraLinear) for m in model.modules())  # nothing half-done
    slora.patch(model, plan)
    with pytest.raises(ValueError, match="already patched"):
        slora.patch(model, plan)
    with pytest.raises(ValueError, match="not patched"):
        slora.save_adapter(MODELS["bert"](), "unused")


def test_load_errors_leave_the_model_untouched(tmp_path):
    model, plan = plan_for("llama")
    slora.patch(model, plan)
    good = tmp_path / "good"
    slora.save_adapter(model, good)
    target = MODELS["llama"]()
    state = {k: v.clone() for k, v in target.state_dict().items()}

    def untouched():
        assert not any(isinstance(m, LoraLinear) for m in target.modules())
        assert all(torch.equal(state[k], v) for k, v in target.state_dict().items())

    # pickle only
    pk = tmp_path / "pickle"
    pk.mkdir()
    (pk / "adapter_config.json").write_text((good / "adapter_config.json").read_text())
    torch.save({}, pk / "adapter_model.bin")
    with pytest.raises(ValueError, match="safetensors only"):
        slora.load_adapter(target, pk)
    # truncated file
    tr = tmp_path / "truncated"
    tr.mkdir()
    (tr / "adapter_config.json").write_text((good / "adapter_config.json").read_text())
    raw = (good / "adapter_model.safetensors").read_bytes()
    (tr / "adapter_model.safetensors").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        slora.load_adapter(target, tr)
    # wrong shapes for this base model
    sh = tmp_path / "shape"
    sh.mkdir()
    (sh / "adapter_config.json").write_text((good / "adapter_config.json").read_text())
    tensors = load_file(good / "adapter_model.safetensors")
    key = next(k for k in tensors if k.endswith("lora_A.weight"))
    r = tensors[key].shape[0]
    tensors[key] = torch.randn(r, 5)
    save_file(tensors, sh / "adapter_model.safetensors")
    with pytest.raises(ValueError, match="do not fit the base layer"):
        slora.load_adapter(target, sh)
    shape = load_file(good / "adapter_model.safetensors")[key].shape
    for what, value, match in [
        ("int", torch.ones(shape, dtype=torch.int32), "floating point"),
        ("nan", torch.full(shape, float("nan")), "NaN/Inf"),
    ]:
        folder = tmp_path / what
        folder.mkdir()
        (folder / "adapter_config.json").write_text((good / "adapter_config.json").read_text())
        save_file({**tensors, key: value}, folder / "adapter_model.safetensors")
        with pytest.raises(ValueError, match=match):
            slora.load_adapter(target, folder)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        slora.load_adapter(target, tmp_path / "missing")
    untouched()


@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_grouped_qkv_training_matches_the_plain_path(kind):
    """q/k/v (gate/up) LoRA branches in one grouped call give the same losses and gradients."""
    from slora.core.layer import LoraGroup

    data = batches(kind)
    runs = {}
    for grouped in (False, True):
        model, plan = plan_for(kind)
        torch.manual_seed(3)
        slora.patch(model, plan, group_shared_inputs=grouped)
        groups = {
            id(m.group): m.group for m in model.modules() if isinstance(m, LoraLinear) and m.group
        }
        with torch.no_grad():  # non-zero B so that every gradient path is exercised
            for m in model.modules():
                if isinstance(m, LoraLinear):
                    m.lora_B.weight.normal_(0, 0.1)
        _, losses = train_steps(model, data, steps=5)
        runs[grouped] = (losses, groups)
    plain, grouped = runs[False][0], runs[True][0]
    assert plain == pytest.approx(grouped, rel=1e-5, abs=1e-6)
    groups: dict[int, LoraGroup] = runs[True][1]
    assert groups and all(g.enabled and g.grouped_calls > 0 for g in groups.values())
    assert not runs[False][1]


def test_group_switches_itself_off_when_inputs_differ():
    from torch import nn

    from slora.core.layer import LoraGroup

    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj, self.k_proj = nn.Linear(6, 4), nn.Linear(6, 4)

        def forward(self, x):
            return self.q_proj(x) + self.k_proj(x * 2)  # different inputs

    model = Attn()
    x = torch.randn(3, 6)
    plan = slora.RankPlan({"q_proj": 2, "k_proj": 3})
    slora.patch(model, plan)
    for m in (model.q_proj, model.k_proj):
        nn.init.normal_(m.lora_B.weight)
    want = (
        model.q_proj.base_layer(x)
        + model.k_proj.base_layer(2 * x)
        + (
            model.q_proj.scale * x @ model.q_proj.lora_A.weight.T @ model.q_proj.lora_B.weight.T
            + model.k_proj.scale
            * (2 * x)
            @ model.k_proj.lora_A.weight.T
            @ model.k_proj.lora_B.weight.T
        )
    )
    for _ in range(2):
        torch.testing.assert_close(model(x), want)
    assert isinstance(model.q_proj.group, LoraGroup) and not model.q_proj.group.enabled
