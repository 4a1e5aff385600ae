"""QLoRA: slora on bitsandbytes 4-bit (nf4 / fp4, double quant) and 8-bit bases, loaded the way
users load them (``from_pretrained(..., quantization_config=BitsAndBytesConfig(...))``), against
PEFT on the same quantized base; a generic quantized linear layer; unsupported-layer errors."""

import json

import pytest
import torch
from tiny_models import batches, bnb_cpu_reason, save_quantizable_llama
from torch import nn

import slora
from slora.core import quantized
from slora.core.layer import LoraLinear
from slora.core.patch import lora_layers, plan_for_ranks
from slora.core.targets import find_targets

REASON = bnb_cpu_reason()
if REASON:
    print(f"tests/test_quantized.py skipped: {REASON}")
pytestmark = pytest.mark.skipif(REASON is not None, reason=REASON or "")

CONFIGS = {
    "nf4": dict(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    ),
    "fp4": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_compute_dtype=torch.float32),
    "int8": dict(load_in_8bit=True),
}
REL_TOL = 1e-4


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A tiny Llama saved to disk (hidden 64, see tiny_models.save_quantizable_llama)."""
    path = tmp_path_factory.mktemp("tiny_llama")
    save_quantizable_llama(path)
    return path


def load(base_dir, kind):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    from transformers.utils import logging

    logging.set_verbosity_error()
    config = BitsAndBytesConfig(**CONFIGS[kind])
    model = AutoModelForCausalLM.from_pretrained(
        base_dir, quantization_config=config, device_map="cpu"
    )
    return model.eval()


def logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def assert_rel_close(actual, expected, tol=REL_TOL):
    err = ((actual - expected).abs().max() / expected.abs().max()).item()
    assert err <= tol, f"max relative error {err:.2e} > {tol:.0e}"


def train(model, data, steps=10, lr=2e-2):
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for i in range(steps):
        loss = model(**data[i % 2]).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return model.eval(), losses


def randomize_lora(model, seed, std=0.2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            for p in (layer.lora_A.weight, layer.lora_B.weight):
                p.copy_(torch.randn(p.shape, generator=g) * std)


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_qlora_patch_train_save_peft_and_slora_load(kind, base_dir, tmp_path):
    from peft import PeftModel

    model = load(base_dir, kind)
    storage = {n: m.weight.dtype for n, m in find_targets(model).items()}
    assert set(storage.values()) == {torch.uint8 if kind != "int8" else torch.int8}
    data = batches("llama", n=3)
    slora.patch(model, data=data, avg_rank=4)
    layers = lora_layers(model)
    assert layers and set(layers) <= set(storage)
    for layer in layers.values():
        assert layer.lora_A.weight.dtype == layer.lora_B.weight.dtype == torch.float32
        assert layer.lora_A.weight.requires_grad and not layer.fan_in_fan_out
    model, losses = train(model, data)
    assert sum(losses[-3:]) < sum(losses[:3]), losses
    slora.save_adapter(model, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["fan_in_fan_out"] is False and set(cfg["rank_pattern"]) == set(layers)
    tuned = logits(model, data[2])

    peft_model = PeftModel.from_pretrained(load(base_dir, kind), tmp_path).eval()
    # bitsandbytes' CPU-only repacked inference kernel (bf16 block scales, no backward) is
    # switched off in slora-patched models; use the same standard kernel on the PEFT side.
    quantized.keep_model_gradients(peft_model)
    assert_rel_close(logits(peft_model, data[2]), tuned)
    loaded = slora.load_adapter(load(base_dir, kind), tmp_path).eval()
    assert_rel_close(logits(loaded, data[2]), tuned)


def layer_inputs(model, names, batch):
    """The input of each named module in one forward of ``model``."""
    seen = {}
    hooks = [
        model.get_submodule(n).register_forward_pre_hook(
            lambda m, args, n=n: seen.setdefault(n, args[0].detach())
        )
        for n in names
    ]
    logits(model, batch)
    for h in hooks:
        h.remove()
    return seen


# LLM.int8 quantizes each layer's input per token (and picks fp16 outlier columns per batch), so
# float-rounding differences of two correct LoRA sums become int8 rounding flips downstream.
END_TO_END_TOL = {"nf4": REL_TOL, "int8": 1e-2}


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_adapter_pool_on_quantized_base_equals_peft_per_sequence(kind, base_dir, tmp_path):
    """Every adapted layer, on the same input, gives PEFT's output for each sequence's adapter
    (≤ 1e-4); the logits of a mixed batch equal PEFT's per sequence."""
    from peft import PeftModel

    data = batches("llama", n=1, batch=4)[0]
    data.pop("labels")
    dirs = {}
    for seed, name in enumerate(("a", "b")):
        model = load(base_dir, kind)
        names = list(find_targets(model))
        ranks = {n: (i + seed) % 3 + 1 if (i + seed) % 4 else 0 for i, n in enumerate(names)}
        slora.patch(model, plan_for_ranks(model, ranks))
        randomize_lora(model, seed)
        dirs[name] = slora.save_adapter(model, tmp_path / name)

    pool_model = load(base_dir, kind)
    peft_model = PeftModel.from_pretrained(load(base_dir, kind), dirs["a"], adapter_name="a")
    peft_model.load_adapter(dirs["b"], adapter_name="b")
    peft_model.eval()
    # Both sides use bitsandbytes' standard kernel: its CPU-only repacked inference kernel
    # rounds activations to bf16, which turns float-rounding differences into ~1e-4 jumps.
    for m in (pool_model, peft_model):
        quantized.keep_model_gradients(m)
    pool = slora.AdapterPool(pool_model, max_adapters=2)
    for name, path in dirs.items():
        pool.load(name, path)
    route = ["a", None, "b", "a"]
    targets = pool.targets
    with pool.use(route):
        mixed = logits(pool_model, data)
        inputs = layer_inputs(pool_model, targets, data)
        with torch.no_grad():
            outputs = {n: pool_model.get_submodule(n)(x) for n, x in inputs.items()}
    pool.close()

    peft_layers = {n: peft_model.base_model.model.get_submodule(n) for n in targets}
    for name in ("a", "b", None):
        if name is None:
            context = peft_model.disable_adapter()
        else:
            peft_model.set_adapter(name)
            context = torch.no_grad()
        with context, torch.no_grad():
            expected = logits(peft_model, data)
            rows = [i for i, n in enumerate(route) if n == name]
            for layer, x in inputs.items():
                assert_rel_close(outputs[layer][rows], peft_layers[layer](x)[rows])
        for b in rows:
            assert_rel_close(mixed[b], expected[b], END_TO_END_TOL[kind])


def test_gradients_merge_and_analysis_on_4bit_equal_the_dequantized_float_model(base_dir):
    """The 4-bit model's LoRA gradients and sensitivity statistics equal those of a float
    model holding the dequantized weights (the same function); also after an eval-mode
    inference, which makes bitsandbytes repack the weights for a gradient-less CPU kernel."""
    data = batches("llama", n=2)
    q = load(base_dir, "fp4")
    logits(q, data[0])  # eval-mode inference first (see slora.core.quantized.keep_gradients)
    # The repacking stored q's block scales in bf16: the float twin is built from q itself.
    dense, q_layers = load(base_dir, "fp4"), find_targets(q)
    bnb_cpu_repacking = next(iter(q_layers.values())).support_avx512bf16_for_cpu
    for name, module in find_targets(dense).items():
        parent, _, child = name.rpartition(".")
        replacement = quantized.dense_copy(q_layers[name])
        x = torch.randn(5, module.in_features)
        torch.testing.assert_close(replacement(x), q_layers[name](x), rtol=1e-5, atol=1e-5)
        setattr(dense.get_submodule(parent), child, replacement)
    for module in q_layers.values():  # dense_copy switched the repacking off: switch it back on
        module.support_avx512bf16_for_cpu = bnb_cpu_repacking
    logits(q, data[0])  # and repack (on AVX512-BF16 CPUs) before analyze and patch

    for estimator in ("activation", "fisher"):
        rq = slora.analyze(q, data, estimator=estimator, progress=False)
        rd = slora.analyze(dense, data, estimator=estimator, progress=False)
        for name, entry in rq.modules.items():
            ref = rd.modules[name]
            assert (entry["d_in"], entry["d_out"]) == (ref["d_in"], ref["d_out"])
            assert entry["score"] == pytest.approx(ref["score"], rel=1e-4)
    with pytest.warns(UserWarning, match="fisher_exact.*MiB"):
        slora.analyze(q, data[:1], estimator="fisher_exact", progress=False)

    ranks = {n: 2 + i % 3 for i, n in enumerate(find_targets(q))}
    for model in (q, dense):
        slora.patch(model, plan_for_ranks(model, ranks))
        randomize_lora(model, seed=3)
        model.train()
        model(**data[0]).loss.backward()
        model.eval()
    for name, layer in lora_layers(q).items():
        ref = lora_layers(dense)[name]
        for p, p_ref in ((layer.lora_A, ref.lora_A), (layer.lora_B, ref.lora_B)):
            assert_rel_close(p.weight.grad, p_ref.weight.grad)
    assert_rel_close(logits(q, data[1]), logits(dense, data[1]))

    adapted = logits(q, data[1])
    with pytest.raises(ValueError, match="quantized base weights.*dequantize=True"):
        slora.merge(q)
    assert all(quantized.is_quantized(m.base_layer) for m in lora_layers(q).values())
    slora.merge(q, dequantize=True)
    assert not any(quantized.is_quantized(m.base_layer) for m in lora_layers(q).values())
    assert_rel_close(logits(q, data[1]), adapted)
    for layer in lora_layers(q).values():
        layer.unmerge()
        assert quantized.is_quantized(layer.base_layer)
    assert_rel_close(logits(q, data[1]), adapted)
    slora.merge(q, dequantize=True)
    slora.unpatch(q)
    assert not lora_layers(q) and not any(
        quantized.is_quantized(m) for m in find_targets(q).values()
    )
    assert_rel_close(logits(q, data[1]), adapted)


class Int8WeightOnlyLinear(nn.Module):
    """A quantized linear layer that is not an nn.Linear: int8 weight, per-row fp32 scales."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        scale = linear.weight.detach().abs().amax(dim=1, keepdim=True) / 127
        self.register_buffer("qweight", (linear.weight.detach() / scale).round().to(torch.int8))
        self.register_buffer("scales", scale)
        self.bias = linear.bias

    def forward(self, x):
        return nn.functional.linear(x, self.qweight.float() * self.scales, self.bias)


class PackedInt4Linear(nn.Module):
    """Quantized storage without in_features/out_features: slora cannot know its shape."""

    def __init__(self):
        super().__init__()
        self.register_buffer("qweight", torch.zeros(8, 4, dtype=torch.int32))

    def forward(self, x):
        return x


def _swap_linears(model, factory):
    for name, module in list(find_targets(model).items()):
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, factory(module))
    return model


def test_generic_quantized_linear_patch_train_save_load_pool(tmp_path):
    from tiny_models import tiny_llama

    data = batches("llama", n=2)
    make = lambda: _swap_linears(tiny_llama(), Int8WeightOnlyLinear)
    model = make()
    report = slora.analyze(model, data, progress=False)
    assert report.modules["model.layers.0.mlp.down_proj"]["d_in"] == 48
    slora.patch(model, slora.allocate(report, avg_rank=3))
    assert all(m.lora_A.weight.dtype == torch.float32 for m in lora_layers(model).values())
    model, losses = train(model, data)
    assert sum(losses[-3:]) < sum(losses[:3]), losses
    with pytest.raises(TypeError, match="cannot dequantize Int8WeightOnlyLinear"):
        slora.merge(model, dequantize=True)
    assert not any(m.merged for m in lora_layers(model).values())
    slora.save_adapter(model, tmp_path)
    tuned = logits(model, data[1])
    assert_rel_close(logits(slora.load_adapter(make(), tmp_path).eval(), data[1]), tuned, 1e-5)
    base = make()
    pool = slora.AdapterPool(base)
    pool.load("t", tmp_path)
    with pool.use("t"):
        assert_rel_close(logits(base, data[1]), tuned, 1e-5)
    pool.close()


def test_unsupported_quantized_layer_is_named_with_what_is_supported():
    from tiny_models import tiny_llama

    model = tiny_llama()
    model.model.layers[0].mlp.down_proj = PackedInt4Linear()
    expected = (
        r"PackedInt4Linear \(Tensor of dtype torch.int32\).*no integer in_features.*"
        r"expected nn.Linear or a subclass \(bitsandbytes Linear4bit"
    )
    with pytest.raises(TypeError, match=expected):
        slora.analyze(model, batches("llama", n=1), progress=False)
    with pytest.raises(TypeError, match=expected):
        find_targets(model, ["down_proj"])  # matches only layer 1's, and layer 0's unsupported
    with pytest.raises(TypeError, match=expected):
        find_targets(model, ["layers.0.mlp.down_proj"])
    with pytest.raises(TypeError, match=expected):
        LoraLinear(model.model.layers[0].mlp.down_proj, rank=2, scale=1.0)
    with pytest.raises(ValueError, match="adapter_dtype must be a floating"):
        slora.patch(
            tiny_llama(), plan_for_ranks(tiny_llama(), {"lm_head": 2}), adapter_dtype=torch.int8
        )
