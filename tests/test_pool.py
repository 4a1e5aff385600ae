"""AdapterPool: mixed-adapter batches equal PEFT per sequence (forward and generate), load /
unload isolation, LRU eviction, and bad input leaving the pool unchanged."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import MODELS, batches

import slora
from slora.core.patch import lora_layers, plan_for_ranks
from slora.core.targets import find_targets

TOL = dict(rtol=1e-5, atol=1e-5)


def slora_adapter(kind, path, rank_of, seed):
    """slora.patch with per-module ranks ``rank_of(i, name)`` (0 = module left out), random
    non-zero B, saved with slora.save_adapter (scale folded into B)."""
    model = MODELS[kind]()
    names = list(find_targets(model))
    ranks = {n: rank_of(i, n) for i, n in enumerate(names)}
    slora.patch(model, plan_for_ranks(model, ranks), use_rslora=seed % 2 == 1)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_A.weight.copy_(torch.randn(layer.lora_A.weight.shape, generator=g) * 0.3)
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g) * 0.3)
    return slora.save_adapter(model, path, fold_scale=seed % 3 != 0)


def peft_adapter(kind, path, seed, **config):
    """PEFT's own get_peft_model(...).save_pretrained, random non-zero A and B."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(MODELS[kind](), LoraConfig(init_lora_weights=False, **config))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    model.save_pretrained(str(path))
    return path


PEFT_CONFIGS = {
    "llama": dict(r=6, lora_alpha=9, target_modules=["q_proj", "v_proj", "down_proj"],
                  rank_pattern={"layers.1.self_attn.v_proj": 3, "down_proj": 2},
                  alpha_pattern={"q_proj": 5}, use_rslora=True),
    "gpt2": dict(r=5, lora_alpha=7, target_modules=["c_attn", "mlp.c_proj"],
                 rank_pattern={"h.0.attn.c_attn": 2}, alpha_pattern={"mlp.c_proj": 3},
                 use_rslora=True, fan_in_fan_out=True),
    "bert": dict(r=4, lora_alpha=6, target_modules=["query", "value", "intermediate.dense"],
                 rank_pattern={"value": 7}, alpha_pattern={"layer.1.attention.self.query": 2},
                 use_rslora=True),
}  # fmt: skip


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """Per model kind: four adapters of different ranks covering different module subsets."""
    out = {}
    for kind in MODELS:
        root = tmp_path_factory.mktemp(kind)
        out[kind] = {
            "all4": slora_adapter(kind, root / "all4", lambda i, n: 4, seed=1),
            "mixed": slora_adapter(kind, root / "mixed", lambda i, n: (i % 4) * 3, seed=2),
            "few": slora_adapter(kind, root / "few", lambda i, n: 8 if i in (0, 3) else 0, 3),
            "peft": peft_adapter(kind, root / "peft", seed=4, **PEFT_CONFIGS[kind]),
        }
    return out


def peft_model(kind, dirs):
    from peft import PeftModel

    names = list(dirs)
    model = PeftModel.from_pretrained(MODELS[kind](), str(dirs[names[0]]), adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(str(dirs[name]), adapter_name=name)
    return model.eval()


def peft_per_sequence(model, names, fn):
    """fn(model, b) run with sequence b's adapter active (base model for None)."""
    outs = []
    for b, name in enumerate(names):
        if name is None:
            with model.disable_adapter():
                outs.append(fn(model, b))
        else:
            model.set_adapter(name)
            outs.append(fn(model, b))
    return outs


def inputs(kind, batch=5, seq=9, seed=1):
    data = batches(kind, n=1, batch=batch, seq=seq, seed=seed)[0]
    data.pop("labels")
    return data


def row(data, b):
    return {k: v[b : b + 1] for k, v in data.items()}


def snapshot(pool, buffers=True):
    """What a load or unload may change: names, bytes, metadata and every loaded adapter's
    rows (and, with ``buffers``, the whole packed buffers, free space included)."""
    packed = {}
    for name, p in pool._packed.items():
        tensors = [p.ranks, p.a_offsets, p.b_offsets, p.scales]
        tensors += [p.A, p.Bt] if buffers else []
        tensors += [t for info in pool.adapters.values() for s in p.adapter(info.slot) if s
                    for t in s[:2]]  # fmt: skip
        packed[name] = [t.clone() for t in tensors]
    return pool.loaded, pool.memory_bytes(), packed


def assert_same(before, after):
    assert before[0] == after[0] and before[1] == after[1]
    for name, tensors in before[2].items():
        assert len(tensors) == len(after[2][name])
        for t0, t1 in zip(tensors, after[2][name]):
            assert torch.equal(t0, t1), name


@pytest.mark.parametrize("kind", ["bert", "llama", "gpt2"])
def test_mixed_batch_equals_peft_per_sequence(kind, adapters):
    dirs = adapters[kind]
    model = MODELS[kind]()
    pool = slora.AdapterPool(model)
    for name, path in dirs.items():
        pool.load(name, path)
    data = inputs(kind, batch=6)
    names = ["mixed", None, "peft", "all4", "few", "mixed"]
    with torch.no_grad():
        base = model(**data).logits
        with pool.use(names):
            ours = model(**data).logits
        after = model(**data).logits
    ref = peft_per_sequence(
        peft_model(kind, dirs), names, lambda m, b: m(**row(data, b)).logits[0].detach()
    )
    for b, name in enumerate(names):
        torch.testing.assert_close(ours[b], ref[b], **TOL, msg=f"sequence {b} ({name})")
        if name is not None:  # the adapters really change the output
            assert not torch.allclose(ours[b], base[b], atol=1e-3), name
    torch.testing.assert_close(ours[1], base[1], rtol=0, atol=0)
    torch.testing.assert_close(after, base, rtol=0, atol=0)  # outside use(): the base model


@pytest.mark.parametrize("backend", ["torch", "triton", "cpp"])
def test_backends_match_peft(backend, adapters):
    if backend == "cpp":
        from slora.kernels import _native

        if not _native.available():
            pytest.skip("native ops unavailable")
    dirs = adapters["llama"]
    model = MODELS["llama"]()
    pool = slora.AdapterPool(model, backend=backend)
    for name in ("peft", "few"):
        pool.load(name, dirs[name])
    data = inputs("llama", batch=3, seq=5)
    names = ["few", "peft", None]
    with torch.no_grad(), pool.use(names):
        ours = model(**data).logits
    ref = peft_per_sequence(
        peft_model("llama", {n: dirs[n] for n in ("peft", "few")}),
        names,
        lambda m, b: m(**row(data, b)).logits[0].detach(),
    )
    for b in range(3):
        torch.testing.assert_close(ours[b], ref[b], **TOL)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_generate_mixed_equals_peft_per_sequence(kind, adapters):
    dirs = adapters[kind]
    model = MODELS[kind]()
    pool = slora.AdapterPool(model)
    for name, path in dirs.items():
        pool.load(name, path)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, 97, (4, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    mask[3, :1] = 0
    data = {"input_ids": ids, "attention_mask": mask}
    names = ["peft", "mixed", None, "few"]
    kw = dict(max_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=0,
              output_scores=True, return_dict_in_generate=True)  # fmt: skip
    with pool.use(names):
        ours = model.generate(**data, **kw)
    assert ours.sequences.shape[1] == 7 + 6
    ref = peft_per_sequence(
        peft_model(kind, dirs), names, lambda m, b: m.generate(**row(data, b), **kw)
    )
    for b, name in enumerate(names):
        assert torch.equal(ours.sequences[b], ref[b].sequences[0]), (b, name)
        for step, (s_ours, s_ref) in enumerate(zip(ours.scores, ref[b].scores)):
            torch.testing.assert_close(s_ours[b], s_ref[0], **TOL, msg=f"{b} {name} {step}")


def test_broadcast_name_and_lookups(adapters):
    dirs = adapters["llama"]
    model = MODELS["llama"]()
    pool = slora.AdapterPool(model)
    assert pool.load("a", dirs["few"]) == []
    pool.load("b", dirs["peft"])
    assert pool.loaded == ["a", "b"] and "a" in pool and len(pool) == 2
    info = pool.adapters["b"]
    cfg = json.loads((dirs["peft"] / "adapter_config.json").read_text())
    tensors = load_file(dirs["peft"] / "adapter_model.safetensors")
    assert set(info.ranks) == {k[len("base_model.model.") : -len(".lora_A.weight")]
                               for k in tensors if k.endswith("lora_A.weight")}  # fmt: skip
    assert info.ranks["model.layers.1.self_attn.v_proj"] == 3 and cfg["use_rslora"]
    assert info.scales["model.layers.0.self_attn.q_proj"] == pytest.approx(5 / 6**0.5)
    assert info.nbytes == 4 * sum(t.numel() for t in tensors.values())
    assert pool.memory_bytes() == pool.memory_bytes("a") + pool.memory_bytes("b")
    assert pool.reserved_bytes() >= pool.memory_bytes()
    data = inputs("llama", batch=3)
    with torch.no_grad():
        with pool.use("b"):
            one = model(**data).logits
        with pool.use(["b"] * 3):
            each = model(**data).logits
        with pool.use(None):
            none = model(**data).logits
        base = model(**data).logits
    torch.testing.assert_close(one, each, rtol=0, atol=0)
    torch.testing.assert_close(none, base, rtol=0, atol=0)
    assert not torch.allclose(one, base, atol=1e-3)
    assert pool.loaded == ["a", "b"]


def test_unload_and_reload_never_touch_other_adapters(adapters):
    dirs = adapters["gpt2"]
    model = MODELS["gpt2"]()
    pool = slora.AdapterPool(model)
    for name in ("all4", "mixed", "few"):
        pool.load(name, dirs[name])
    data = inputs("gpt2", batch=3)
    names = ["all4", None, "few"]

    def rows_of(name):
        info = pool.adapters[name]
        return {m: [t.clone() for s in pool._packed[m].adapter(info.slot) if s for t in s[:2]]
                for m in pool.targets}  # fmt: skip

    def same(r0, r1):
        return all(torch.equal(a, b) for m in r0 for a, b in zip(r0[m], r1[m]))

    keep = {n: rows_of(n) for n in ("all4", "few")}
    with torch.no_grad(), pool.use(names):
        before = model(**data).logits
    pool.unload("mixed")
    assert pool.loaded == ["all4", "few"]
    pool.load("peft", dirs["peft"])  # reuses the freed rows
    pool.load("mixed2", dirs["mixed"])  # and grows the buffers
    with torch.no_grad(), pool.use(names):
        after = model(**data).logits
    assert all(same(keep[n], rows_of(n)) for n in keep)
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    with pytest.raises(KeyError, match="'mixed' is not loaded"):
        pool.unload("mixed")
    with pool.use(["few"]), pytest.raises(RuntimeError, match="in use"):
        pool.unload("few")
    pool.close()  # hooks removed, model is the base model again
    assert not any(m._forward_hooks for m in model.modules())
    with torch.no_grad():
        torch.testing.assert_close(model(**data).logits, MODELS["gpt2"]()(**data).logits)


def test_lru_eviction_spares_adapters_in_use(adapters):
    dirs = adapters["bert"]
    model = MODELS["bert"]()
    pool = slora.AdapterPool(model, max_adapters=2)
    pool.load("a", dirs["all4"])
    pool.load("b", dirs["few"])
    with pool.use(["a"]):  # a becomes the most recently used
        pass
    assert pool.load("c", dirs["mixed"]) == ["b"]
    assert pool.loaded == ["a", "c"]
    with pool.use(["a", None]):  # c is least recent but a is in use: c goes
        assert pool.load("d", dirs["peft"]) == ["c"]
        with pool.use(["d"]):  # both in use: no room, pool unchanged
            before = snapshot(pool)
            with pytest.raises(RuntimeError, match="no room"):
                pool.load("e", dirs["few"])
            assert_same(before, snapshot(pool))
    # memory budget: room for "all4" + "few" but not for a third
    sizes = {n: slora.AdapterPool(MODELS["bert"]()) for n in ("all4", "few", "mixed")}
    for n, p in sizes.items():
        p.load(n, dirs[n])
    budget = sizes["all4"].memory_bytes() + sizes["few"].memory_bytes()
    pool = slora.AdapterPool(MODELS["bert"](), max_adapters=8, memory_budget_bytes=budget)
    pool.load("a", dirs["all4"])
    pool.load("b", dirs["few"])
    assert pool.memory_bytes() == budget
    evicted = pool.load("c", dirs["mixed"])
    assert evicted and evicted[0] == "a" and pool.memory_bytes() <= budget
    small = slora.AdapterPool(MODELS["bert"](), memory_budget_bytes=100)
    with pytest.raises(ValueError, match="more than memory_budget_bytes"):
        small.load("a", dirs["all4"])
    assert small.loaded == []


def test_bad_input_errors_leave_pool_unchanged(adapters, tmp_path):
    dirs = adapters["llama"]
    model = MODELS["llama"]()
    pool = slora.AdapterPool(model)
    pool.load("a", dirs["few"])
    data = inputs("llama", batch=3)
    with pytest.raises(KeyError, match="'nope' is not loaded"):
        with pool.use(["a", "nope", None]):
            pass
    with pytest.raises(ValueError, match="3 sequences .* 2 adapter names"):
        with torch.no_grad(), pool.use(["a", None]):
            model(**data)
    assert pool.in_use == set()
    with pytest.raises(ValueError, match="one adapter name"):
        with pool.use([]):
            pass

    bad = {"pickle": tmp_path / "pickle", "shape": tmp_path / "shape", "nan": tmp_path / "nan"}
    tensors = load_file(dirs["peft"] / "adapter_model.safetensors")
    key = next(k for k in sorted(tensors) if k.endswith("down_proj.lora_B.weight"))
    for path in bad.values():
        path.mkdir()
        config = (dirs["peft"] / "adapter_config.json").read_text()
        (path / "adapter_config.json").write_text(config)
    torch.save({}, bad["pickle"] / "adapter_model.bin")  # a pickle-only adapter
    short = {**tensors, key: tensors[key][:-1].contiguous()}  # B one row short for its module
    save_file(short, str(bad["shape"] / "adapter_model.safetensors"))
    nan = {**tensors, key: tensors[key] * float("nan")}
    save_file(nan, str(bad["nan"] / "adapter_model.safetensors"))
    narrow = slora.AdapterPool(MODELS["llama"](), target_modules=["q_proj"])
    messages = {"pickle": "pickle", "shape": "do not fit the base layer", "nan": "NaN"}
    before = snapshot(pool)
    for what, path in bad.items():
        with pytest.raises(ValueError, match=messages[what]):
            pool.load("b", path)
        assert_same(before, snapshot(pool))
    with pytest.raises(ValueError, match="already loaded"):
        pool.load("a", dirs["peft"])
    with pytest.raises(ValueError, match="does not target"):
        narrow.load("b", dirs["peft"])
    assert narrow.loaded == []
    with pytest.raises(FileNotFoundError):
        pool.load("b", tmp_path / "missing")
    assert_same(before, snapshot(pool))
    with pytest.raises(ValueError, match="already has an AdapterPool"):
        slora.AdapterPool(model)
    with pytest.raises(ValueError, match="max_adapters"):
        slora.AdapterPool(MODELS["llama"](), max_adapters=0)
    with pytest.raises(ValueError, match="already carries LoRA"):
        slora.AdapterPool(slora.load_adapter(MODELS["llama"](), dirs["few"]))


def test_failed_commit_rolls_back(adapters, monkeypatch):
    """An error while writing the packed rows (e.g. out of memory) undoes the partial load."""
    dirs = adapters["llama"]
    pool = slora.AdapterPool(MODELS["llama"]())
    pool.load("a", dirs["all4"])
    before = snapshot(pool, buffers=False)  # the partial rows may stay behind as free space
    target = pool._packed["model.layers.1.self_attn.v_proj"]
    original = type(target).load

    def failing(self, slot, adapter):
        if self is target:
            raise MemoryError("simulated")
        return original(self, slot, adapter)

    monkeypatch.setattr(type(target), "load", failing)
    with pytest.raises(MemoryError):
        pool.load("b", dirs["mixed"])
    monkeypatch.undo()
    assert_same(before, snapshot(pool, buffers=False))
    pool.load("b", dirs["mixed"])
    assert pool.loaded == ["a", "b"]
