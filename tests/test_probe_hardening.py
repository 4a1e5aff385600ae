"""Third hardening probe (what a skeptical user breaks in real training and serving code).

Every case is its own parametrised test that asserts its own expected outcome class:

- ``error``: the call is refused with an error whose message matches the case's pattern
  (it names what was wrong and what to do);
- ``correct``: the call works and gives the right result (checked against an independent
  computation, never against a value recorded from the code under test);
- ``unchanged``: the call fails and leaves the model / pool / store / files exactly as before.

Run ``python3 tests/test_probe_hardening.py`` for a table of outcomes (clear error / correct /
unchanged / silent wrong / half-changed / unclear) and the counts per class.
"""

from __future__ import annotations

import json
import os
import re
import sys
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton on the CPU (as tests/conftest.py)
sys.path.insert(0, str(Path(__file__).resolve().parent))

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from toy import PROJ, Toy, ids, outputs, plan, randomize_lora  # noqa: E402

import slora  # noqa: E402
from slora import ops  # noqa: E402
from slora.core.patch import lora_layers, plan_for_ranks  # noqa: E402


class NotApplicable(Exception):
    """The failure a case injects does not exist in this version of the code."""


@dataclass
class Case:
    id: str
    cls: int
    expect: str  # "error" | "correct" | "unchanged"
    fn: Callable[[], object]
    match: str = ""


CASES: list[Case] = []
CLASSES = {
    1: "inference mode",
    2: "wrappers / torch.compile",
    3: "modules that skip their forward",
    4: "activation checkpointing",
    5: "atomic files",
    6: "PEFT semantics when loading",
    7: "calibration inputs",
    8: "ops",
    9: "embedded data cache",
}


def case(cls: int, expect: str, match: str = ""):
    def register(fn: Callable[[], object]) -> Callable[[], object]:
        CASES.append(Case(fn.__name__, cls, expect, fn, match))
        return fn

    return register


def outcome(c: Case) -> tuple[str, str]:
    """(outcome class, detail) of running case ``c``."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = c.fn()
    except NotApplicable as exc:
        return "n/a", str(exc)
    except Exception as exc:  # noqa: BLE001 - the probe classifies every failure
        text = f"{type(exc).__name__}: {exc}"
        if c.expect == "error" and re.search(c.match, str(exc), re.I | re.S):
            return "clear error", text
        return "unclear", text
    if c.expect == "error":
        return "silent wrong", f"no error (returned {result!r})"
    if c.expect == "unchanged":
        return ("unchanged", "") if result is True else ("half-changed", str(result))
    return ("correct", "") if result is True else ("silent wrong", str(result))


EXPECTED = {"error": "clear error", "correct": "correct", "unchanged": "unchanged"}


# -- helpers --------------------------------------------------------------------------------------

TOL = dict(atol=1e-5, rtol=1e-5)


def close(a: torch.Tensor, b: torch.Tensor, **tol) -> bool:
    return bool(torch.allclose(a.float(), b.float(), **(tol or TOL)))


def patched_toy(seed: int = 3) -> Toy:
    model = Toy()
    slora.patch(model, plan(model))
    randomize_lora(model, seed)
    return model


def lora_reference(model: Toy, x: torch.Tensor | None = None) -> torch.Tensor:
    """The adapted output computed independently: merge B A into a deep copy's weights."""
    import copy

    ref = copy.deepcopy(model)
    with torch.no_grad():
        for layer in lora_layers(ref).values():
            layer.base_layer.weight += layer.delta_weight()
            layer.merged = True
    return outputs(ref, x)


@cache
def adapter_dir() -> str:
    """A saved adapter of the toy model (random A and B)."""
    path = tempfile.mkdtemp(prefix="slora-probe-")
    slora.save_adapter(patched_toy(), path)
    return path


@cache
def adapter_output() -> torch.Tensor:
    return lora_reference(patched_toy())


def edited_adapter(edit_config=None, edit_tensors=None) -> str:
    """A copy of adapter_dir() with its config and/or tensors edited."""
    from safetensors.torch import load_file, save_file

    src = Path(adapter_dir())
    dst = Path(tempfile.mkdtemp(prefix="slora-probe-edit-"))
    config = json.loads((src / "adapter_config.json").read_text())
    tensors = load_file(str(src / "adapter_model.safetensors"))
    if edit_config:
        edit_config(config)
    if edit_tensors:
        edit_tensors(tensors)
    (dst / "adapter_config.json").write_text(json.dumps(config))
    save_file(tensors, str(dst / "adapter_model.safetensors"))
    return str(dst)


def pool_for(model: nn.Module, **kw) -> slora.AdapterPool:
    return slora.AdapterPool(model, list(PROJ), **kw)


def eager_compile(model: nn.Module) -> nn.Module:
    """torch.compile with the eager backend: dynamo's tracing and guards (what decides which
    code runs) without inductor's compile time."""
    return torch.compile(model, backend="eager")


def same_dir(before: dict[str, bytes], path: str | Path) -> bool | str:
    after = {p.name: p.read_bytes() for p in Path(path).iterdir()}
    return True if after == before else f"files now {sorted(after)}, before {sorted(before)}"


def dir_bytes(path: str | Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in Path(path).iterdir()}


# == 1. inference mode ============================================================================


@case(1, "correct")
def inference_mode_patched_eval():
    model = patched_toy().eval()
    with torch.inference_mode():
        y = model(ids())
    return close(y, adapter_output())


@case(1, "correct")
def inference_mode_patched_train_mode():
    model = patched_toy().train()
    with torch.inference_mode():
        y = model(ids())
    return close(y, adapter_output())


@case(1, "correct")
def inference_mode_grouping_resumes_for_training():
    model = patched_toy()
    with torch.inference_mode():
        model(ids())
    y = model(ids())
    y.sum().backward()
    layer = lora_layers(model)["blocks.0.q_proj"]
    return close(y.detach(), adapter_output()) and layer.group.enabled


@case(1, "correct")
def inference_mode_patch_inside_then_train():
    model = Toy()
    with torch.inference_mode():
        slora.patch(model, plan(model))
    model(ids()).sum().backward()
    return all(layer.lora_A.weight.grad is not None for layer in lora_layers(model).values())


@case(1, "correct")
def inference_mode_load_adapter_inside():
    model = Toy()
    with torch.inference_mode():
        slora.load_adapter(model, adapter_dir())
        y = model(ids())
    return close(y, adapter_output())


@case(1, "correct")
def inference_mode_load_inside_train_outside():
    model = Toy()
    with torch.inference_mode():
        slora.load_adapter(model, adapter_dir())
    model(ids()).sum().backward()
    return all(layer.lora_B.weight.grad is not None for layer in lora_layers(model).values())


@case(1, "correct")
def inference_mode_merge_inside():
    model = patched_toy()
    with torch.inference_mode():
        slora.merge(model)
    return close(outputs(model), adapter_output())


@case(1, "correct")
def inference_mode_save_inside():
    model = patched_toy()
    path = tempfile.mkdtemp()
    with torch.inference_mode():
        slora.save_adapter(model, path)
    fresh = slora.load_adapter(Toy(), path)
    return close(outputs(fresh), adapter_output())


@case(1, "correct")
def inference_mode_analyze_activation():
    data = [ids(seed=s) for s in range(2)]
    ref = slora.analyze(Toy(), data, "activation", list(PROJ), progress=False)
    model = Toy()
    with torch.inference_mode():
        got = slora.analyze(model, data, "activation", list(PROJ), progress=False)
    return got.to_dict() == ref.to_dict()


def _sum_loss(model, batch):
    return model(batch).square().mean()


@case(1, "correct")
def inference_mode_analyze_fisher():
    data = [ids(seed=s) for s in range(2)]
    ref = slora.analyze(Toy(), data, "fisher", list(PROJ), _sum_loss, progress=False)
    model = Toy()
    with torch.inference_mode():
        got = slora.analyze(model, data, "fisher", list(PROJ), _sum_loss, progress=False)
    return got.to_dict() == ref.to_dict()


@case(1, "correct")
def inference_mode_batches_made_inside_analyze_outside():
    with torch.inference_mode():
        data = [ids(seed=s).clone() for s in range(2)]
    ref = slora.analyze(Toy(), [ids(seed=s) for s in range(2)], "fisher", list(PROJ), _sum_loss,
                        progress=False)  # fmt: skip
    got = slora.analyze(Toy(), data, "fisher", list(PROJ), _sum_loss, progress=False)
    return got.to_dict() == ref.to_dict()


@case(1, "correct")
def no_grad_analyze_fisher():
    data = [ids(seed=s) for s in range(2)]
    ref = slora.analyze(Toy(), data, "fisher", list(PROJ), _sum_loss, progress=False)
    with torch.no_grad():
        got = slora.analyze(Toy(), data, "fisher", list(PROJ), _sum_loss, progress=False)
    return got.to_dict() == ref.to_dict()


@case(1, "correct")
def inference_mode_pool_load_and_use():
    model = Toy()
    pool = pool_for(model)
    with torch.inference_mode():
        pool.load("a", adapter_dir())
        with pool.use("a"):
            y = model(ids())
    return close(y, adapter_output(), atol=1e-4, rtol=1e-4)


@case(1, "correct")
def inference_mode_pool_created_inside_loaded_outside():
    model = Toy()
    with torch.inference_mode():
        pool = pool_for(model)
    pool.load("a", adapter_dir())
    with torch.no_grad(), pool.use("a"):
        y = model(ids())
    return close(y, adapter_output(), atol=1e-4, rtol=1e-4)


def _packed_case(d_in=6, d_out=5, ranks=(2, 3), seed=0):
    g = torch.Generator().manual_seed(seed)
    items = [
        (torch.randn(r, d_in, generator=g), torch.randn(d_out, r, generator=g), 0.5 + k)
        for k, r in enumerate(ranks)
    ]
    return items, g


def _multi_lora_reference(x, slots, items):
    out = torch.zeros(x.shape[0], items[0][1].shape[0], dtype=torch.float64)
    for t, s in enumerate(slots.tolist()):
        if s >= 0:
            A, B, scale = items[s]
            out[t] = scale * (B.double() @ (A.double() @ x[t].double()))
    return out


@case(1, "correct")
def inference_mode_multi_lora_op_all_inference_tensors():
    items, g = _packed_case()
    with torch.inference_mode():
        packed = ops.PackedAdapters.from_list(items)
        x = torch.randn(7, 6, generator=g)
        slots = torch.tensor([0, 1, -1, 1, 0, 0, 1])
        out = torch.full((7, 5), 0.0)
        ops.multi_lora(x, slots, packed, out=out)
    return close(out, _multi_lora_reference(x, slots, items))


@case(1, "correct")
def inference_mode_packed_made_inside_reloaded_outside():
    items, g = _packed_case()
    with torch.inference_mode():
        packed = ops.PackedAdapters.from_list(items)
    packed.load(0, items[1])
    x = torch.randn(4, 6, generator=g)
    slots = torch.tensor([0, 1, 0, -1])
    got = ops.multi_lora(x, slots, packed)
    return close(got, _multi_lora_reference(x, slots, [items[1], items[1]]))


@case(1, "correct")
def inference_mode_lora_slices():
    g = torch.Generator().manual_seed(0)
    As = [torch.randn(2, 6, generator=g), torch.randn(3, 6, generator=g)]
    Bs = [torch.randn(4, 2, generator=g), torch.randn(5, 3, generator=g)]
    with torch.inference_mode():
        x = torch.randn(3, 6, generator=g)
        y = ops.lora_slices(x, As, Bs, [0.5, 2.0])
    ref = torch.cat([0.5 * x @ As[0].t() @ Bs[0].t(), 2.0 * x @ As[1].t() @ Bs[1].t()], -1)
    return close(y, ref, atol=1e-4, rtol=1e-4)


@case(1, "correct")
def inference_mode_input_stats_op():
    with torch.inference_mode():
        x = torch.randn(5, 4)
        col_sq = torch.zeros(4)
        token_sq = ops.accumulate_input_stats(x, None, col_sq)
    return close(col_sq, x.square().sum(0)) and close(token_sq, x.square().sum(1))


@case(1, "correct")
def inference_mode_llama_generate():
    from tiny_models import tiny_llama

    model = tiny_llama()
    names = [n for n, _ in model.named_modules() if n.endswith(("q_proj", "k_proj", "v_proj"))]
    slora.patch(model, plan_for_ranks(model, dict.fromkeys(names, 2)))
    randomize_lora(model)
    prompt = torch.tensor([[5, 7, 9, 11]])
    with torch.no_grad():
        ref = model.generate(prompt, max_new_tokens=4, do_sample=False)
    with torch.inference_mode():
        got = model.generate(prompt, max_new_tokens=4, do_sample=False)
    return torch.equal(got, ref)


# == 2. wrappers and torch.compile ================================================================


def _saved_names(path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(Path(path) / "adapter_model.safetensors"), framework="pt") as f:
        keys = list(f.keys())
    config = json.loads((Path(path) / "adapter_config.json").read_text())
    return keys + list(config["target_modules"]) + list(config["rank_pattern"])


def _plain_names(path) -> bool:
    names = _saved_names(path)
    return not any("_orig_mod" in n or ".module." in n or n.startswith("module.") for n in names)


@case(2, "correct")
def save_through_compile_has_plain_names():
    path = tempfile.mkdtemp()
    slora.save_adapter(eager_compile(patched_toy()), path)
    return _plain_names(path) and close(outputs(slora.load_adapter(Toy(), path)), adapter_output())


@case(2, "correct")
def save_through_dataparallel_has_plain_names():
    path = tempfile.mkdtemp()
    slora.save_adapter(nn.DataParallel(patched_toy()), path)
    return _plain_names(path)


@case(2, "correct")
def load_through_compile():
    model = eager_compile(Toy())
    slora.load_adapter(model, adapter_dir())
    with torch.no_grad():
        y = model(ids())
    return close(y, adapter_output())


@case(2, "correct")
def load_through_dataparallel():
    model = nn.DataParallel(Toy())
    slora.load_adapter(model, adapter_dir())
    with torch.no_grad():
        y = model(ids())
    return close(y, adapter_output())


@case(2, "correct")
def patch_through_compile_after_a_call():
    base = Toy()
    model = eager_compile(base)
    with torch.no_grad():
        model(ids())
    slora.patch(model, plan(base))
    randomize_lora(base)
    with torch.no_grad():
        y = model(ids())
    return close(y, lora_reference(base))


@case(2, "correct")
def merge_and_unpatch_through_compile():
    base = patched_toy()
    model = eager_compile(base)
    slora.merge(model)
    merged = outputs(base)
    slora.unpatch(model)
    return close(merged, adapter_output()) and not lora_layers(base)


@case(2, "correct")
def pool_on_compiled_model():
    model = eager_compile(Toy())
    pool = pool_for(model)
    pool.load("a", adapter_dir())
    with torch.no_grad(), pool.use("a"):
        y = model(ids())
    return close(y, adapter_output(), atol=1e-4, rtol=1e-4)


@case(2, "correct")
def compile_after_pool_base_call_first():
    base = Toy()
    plain = outputs(Toy())
    pool = pool_for(base)
    pool.load("a", adapter_dir())
    model = eager_compile(base)
    with torch.no_grad():
        y0 = model(ids())
        with pool.use("a"):
            y1 = model(ids())
    return close(y0, plain) and close(y1, adapter_output(), atol=1e-4, rtol=1e-4)


@case(2, "correct")
def compile_after_pool_adapter_call_first():
    base = Toy()
    plain = outputs(Toy())
    pool = pool_for(base)
    pool.load("a", adapter_dir())
    model = eager_compile(base)
    with torch.no_grad():
        with pool.use("a"):
            y1 = model(ids())
        y0 = model(ids())
    return close(y0, plain) and close(y1, adapter_output(), atol=1e-4, rtol=1e-4)


@case(2, "correct")
def compile_before_pool_called_before_pool():
    base = Toy()
    model = eager_compile(base)
    with torch.no_grad():
        model(ids())
    pool = pool_for(base)
    pool.load("a", adapter_dir())
    with torch.no_grad(), pool.use("a"):
        y = model(ids())
    return close(y, adapter_output(), atol=1e-4, rtol=1e-4)


@case(2, "correct")
def two_compiled_instances_of_one_class():
    served, plain_model = Toy(), Toy()
    pool = pool_for(served)
    pool.load("a", adapter_dir())
    a, b = eager_compile(plain_model), eager_compile(served)
    with torch.no_grad():
        ya = a(ids())
        with pool.use("a"):
            yb = b(ids())
            ya2 = a(ids())
    plain = outputs(Toy())
    return close(ya, plain) and close(ya2, plain) and close(yb, adapter_output(), atol=1e-4)


@case(2, "correct")
def pool_on_dataparallel():
    model = nn.DataParallel(Toy())
    pool = pool_for(model)
    pool.load("a", adapter_dir())
    with torch.no_grad(), pool.use("a"):
        y = model(ids())
    return close(y, adapter_output(), atol=1e-4, rtol=1e-4)


@case(2, "correct")
def analyze_through_compile_names_plain():
    report = slora.analyze(eager_compile(Toy()), [ids()], "activation", list(PROJ),
                           progress=False)  # fmt: skip
    ref = slora.analyze(Toy(), [ids()], "activation", list(PROJ), progress=False)
    return report.to_dict() == ref.to_dict()


@case(2, "correct")
def analyze_through_dataparallel_names_plain():
    report = slora.analyze(nn.DataParallel(Toy()), [ids()], "fisher", list(PROJ), _sum_loss,
                           progress=False)  # fmt: skip
    ref = slora.analyze(Toy(), [ids()], "fisher", list(PROJ), _sum_loss, progress=False)
    return report.to_dict() == ref.to_dict()


@case(2, "correct")
def save_with_compiled_submodule_has_plain_names():
    model = Toy()
    model.blocks[0] = eager_compile(model.blocks[0])
    names = [n for n, m in model.named_modules() if n.endswith(PROJ)]
    slora.patch(model, plan_for_ranks(model, dict.fromkeys(names, 2)))
    randomize_lora(model)
    ref = lora_reference(model)
    path = tempfile.mkdtemp()
    slora.save_adapter(model, path)
    return _plain_names(path) and close(outputs(slora.load_adapter(Toy(), path)), ref)


def _ddp(model: nn.Module) -> nn.Module:
    import torch.distributed as dist

    if not dist.is_initialized():
        store = Path(tempfile.mkdtemp()) / "store"
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    return nn.parallel.DistributedDataParallel(model)


@case(2, "error", match="DistributedDataParallel.*(plain model|before wrapping)")
def patch_through_ddp_refused():
    slora.patch(_ddp(Toy()), plan(Toy()))


@case(2, "error", match="DistributedDataParallel.*(plain model|before wrapping)")
def load_adapter_through_ddp_refused():
    slora.load_adapter(_ddp(Toy()), adapter_dir())


@case(2, "correct")
def save_through_ddp_has_plain_names():
    path = tempfile.mkdtemp()
    slora.save_adapter(_ddp(patched_toy()), path)
    return _plain_names(path) and close(outputs(slora.load_adapter(Toy(), path)), adapter_output())


# == 3. modules that skip their own forward =======================================================


class AttnModel(nn.Module):
    """nn.MultiheadAttention (out_proj read directly) and a Linear that never runs."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(11, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.ff = nn.Linear(8, 8)
        self.unused = nn.Linear(8, 8)
        self.lm_head = nn.Linear(8, 11)

    def forward(self, x):
        h = self.embed(x)
        h = h + self.attn(h, h, h, need_weights=False)[0]
        return self.lm_head(h + self.ff(h))


def _encoder_layer() -> nn.TransformerEncoderLayer:
    torch.manual_seed(0)
    return nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True).eval()


@case(3, "error", match="out_proj.*(never|directly)")
def analyze_explicit_mha_out_proj_refused():
    slora.analyze(AttnModel(), [ids()], "activation", ["attn.out_proj", "ff"], progress=False)


@case(3, "correct")
def analyze_default_targets_leave_out_mha_out_proj():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = slora.analyze(AttnModel(), [ids()], "activation", progress=False)
    named = any("attn.out_proj" in str(w.message) for w in caught)
    return "attn.out_proj" not in report.modules and "ff" in report.modules and named


@case(3, "correct")
def analyze_reports_a_target_that_never_ran():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = slora.analyze(AttnModel(), [ids()], "activation", ["ff", "unused"],
                               progress=False)  # fmt: skip
    named = any("unused" in str(w.message) and "never ran" in str(w.message) for w in caught)
    return "unused" not in report.modules and named


@case(3, "error", match="no target module ran")
def analyze_all_targets_never_ran():
    slora.analyze(AttnModel(), [ids()], "activation", ["unused"], progress=False)


@case(3, "error", match="out_proj.*never runs")
def patch_plan_with_mha_out_proj_refused():
    model = AttnModel()
    slora.patch(model, plan_for_ranks(model, {"attn.out_proj": 2, "ff": 2}))


@case(3, "correct")
def patch_plan_with_mha_out_proj_rank0_is_fine():
    model = AttnModel()
    slora.patch(model, plan_for_ranks(model, {"attn.out_proj": 0, "ff": 2}))
    return set(lora_layers(model)) == {"ff"}


@case(3, "error", match="never run.*out_proj")
def pool_explicit_mha_out_proj_refused():
    slora.AdapterPool(AttnModel(), ["attn.out_proj"])


@case(3, "correct")
def pool_default_targets_leave_out_mha_out_proj():
    pool = slora.AdapterPool(AttnModel())
    return "attn.out_proj" not in pool.targets and "ff" in pool.targets


@case(3, "correct")
def encoder_layer_eval_fast_path_applies_adapter():
    layer = _encoder_layer()
    slora.patch(layer, plan_for_ranks(layer, {"linear1": 4, "linear2": 4}))
    randomize_lora(layer)
    x = torch.randn(2, 5, 8)
    with torch.no_grad():
        got = layer(x)
        layer.train()  # the regular (non-fused) path: calls linear1 / linear2
        ref = layer(x)
    return close(got, ref, atol=1e-5, rtol=1e-4)


@case(3, "correct")
def encoder_layer_unpatch_restores_fast_path():
    layer = _encoder_layer()
    slora.patch(layer, plan_for_ranks(layer, {"linear1": 2}))
    slora.unpatch(layer)
    return not layer._forward_pre_hooks and not lora_layers(layer)


@case(3, "correct")
def encoder_layer_load_adapter_applies_adapter():
    layer = _encoder_layer()
    slora.patch(layer, plan_for_ranks(layer, {"linear1": 4, "linear2": 4}))
    randomize_lora(layer)
    path = tempfile.mkdtemp()
    slora.save_adapter(layer, path)
    fresh = slora.load_adapter(_encoder_layer(), path)
    x = torch.randn(2, 5, 8)
    with torch.no_grad():
        got = fresh(x)
        layer.train()
        ref = layer(x)
    return close(got, ref, atol=1e-5, rtol=1e-4)


@case(3, "correct")
def patch_from_data_leaves_out_mha_out_proj():
    model = AttnModel()
    slora.patch(model, data=[ids()], estimator="activation", avg_rank=2, min_rank=1)
    return "attn.out_proj" not in lora_layers(model) and "ff" in lora_layers(model)


def _padded_encoder():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
    enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=True).eval()
    x = torch.randn(3, 5, 8)
    pad = torch.zeros(3, 5, dtype=torch.bool)
    pad[1:, 3:] = True
    names = [n for n, _ in enc.named_modules() if n.endswith(("linear1", "linear2"))]
    return enc, x, pad, names


def _regular_path(enc, x, pad):
    """The encoder's output on its regular (unfused, unnested) path: training mode."""
    enc.train()
    try:
        with torch.no_grad():
            return enc(x, src_key_padding_mask=pad)
    finally:
        enc.eval()


@case(3, "correct")
def encoder_padded_nested_path_patched():
    enc, x, pad, names = _padded_encoder()
    slora.patch(enc, plan_for_ranks(enc, dict.fromkeys(names, 2)))
    randomize_lora(enc)
    with torch.no_grad():
        got = enc(x, src_key_padding_mask=pad)
    keep = ~pad
    return close(got[keep], _regular_path(enc, x, pad)[keep], atol=1e-5, rtol=1e-4)


@case(3, "correct")
def encoder_padded_nested_path_analyze():
    enc, x, pad, names = _padded_encoder()
    loss = lambda m, b: m(b, src_key_padding_mask=pad)  # noqa: E731
    report = slora.analyze(enc, [x], "activation", names, loss, progress=False)
    return set(report.modules) == set(names) and enc.use_nested_tensor


@case(3, "correct")
def encoder_padded_nested_path_pool():
    enc, x, pad, names = _padded_encoder()
    slora.patch(enc, plan_for_ranks(enc, dict.fromkeys(names, 2)))
    randomize_lora(enc)
    ref = _regular_path(enc, x, pad)
    path = tempfile.mkdtemp()
    slora.save_adapter(enc, path)
    slora.unpatch(enc)
    pool = slora.AdapterPool(enc, names)
    pool.load("a", path)
    with torch.no_grad(), pool.use("a"):
        got = enc(x, src_key_padding_mask=pad)
    keep = ~pad
    pool.close()
    return close(got[keep], ref[keep], atol=1e-5, rtol=1e-4) and enc.use_nested_tensor


@case(3, "correct")
def encoder_unpatch_restores_nested_path():
    enc, x, pad, names = _padded_encoder()
    slora.patch(enc, plan_for_ranks(enc, dict.fromkeys(names, 2)))
    slora.unpatch(enc)
    return enc.use_nested_tensor is True and not enc.layers[0]._forward_pre_hooks


# == 4. activation checkpointing ==================================================================


class CkptToy(Toy):
    def __init__(self, mode: str | None) -> None:
        super().__init__()
        self.mode = mode

    def forward(self, ids_):
        from torch.utils.checkpoint import checkpoint

        x = self.embed(ids_)
        for block in self.blocks:
            if self.mode is None:
                x = block(x)
            else:
                x = checkpoint(block, x, use_reentrant=self.mode == "reentrant")
        return self.lm_head(x) + self.classifier(x).sum(-1, keepdim=True)


def _same_report(a, b) -> bool | str:
    da, db = a.to_dict(), b.to_dict()
    if da["num_tokens"] != db["num_tokens"] or da["modules"].keys() != db["modules"].keys():
        return f"tokens {da['num_tokens']} vs {db['num_tokens']}"
    for name, m in da["modules"].items():
        for key, value in m.items():
            other = db["modules"][name][key]
            if abs(value - other) > 1e-4 * max(1.0, abs(other)):
                return f"{name}.{key}: {value} vs {other}"
    return True


def _ckpt_case(mode: str, estimator: str):
    data = [ids(seed=s) for s in range(2)]
    loss = None if estimator == "activation" else _sum_loss
    ref = slora.analyze(CkptToy(None), data, estimator, list(PROJ), loss, progress=False)
    got = slora.analyze(CkptToy(mode), data, estimator, list(PROJ), loss, progress=False)
    return _same_report(got, ref)


for _mode in ("reentrant", "non_reentrant"):
    for _est in ("fisher", "activation", "fisher_exact"):

        def _fn(mode=_mode, est=_est):
            return _ckpt_case(mode, est)

        _fn.__name__ = f"checkpoint_{_mode}_{_est}_counts_once"
        case(4, "correct")(_fn)


@case(4, "correct")
def checkpoint_llama_gradient_checkpointing_fisher():
    from tiny_models import batches, tiny_llama

    data = batches("llama", n=2)
    ref = slora.analyze(tiny_llama(), data, "fisher", ["q_proj", "down_proj"], progress=False)
    model = tiny_llama()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model.train()
    got = slora.analyze(model, data, "fisher", ["q_proj", "down_proj"], progress=False)
    return _same_report(got, ref)


@case(4, "correct")
def checkpoint_llama_non_reentrant_fisher():
    from tiny_models import batches, tiny_llama

    data = batches("llama", n=2)
    ref = slora.analyze(tiny_llama(), data, "fisher", ["q_proj", "down_proj"], progress=False)
    model = tiny_llama()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    got = slora.analyze(model, data, "fisher", ["q_proj", "down_proj"], progress=False)
    return _same_report(got, ref)


# == 5. atomic files ==============================================================================


def _failing(monkeypatch_target, attr, fail_on: int):
    """Context: ``monkeypatch_target.attr`` raises on its ``fail_on``-th call."""
    import contextlib

    @contextlib.contextmanager
    def ctx():
        original = getattr(monkeypatch_target, attr)
        calls = {"n": 0}

        def wrapper(*a, **k):
            calls["n"] += 1
            if calls["n"] == fail_on:
                raise OSError("injected failure")
            return original(*a, **k)

        setattr(monkeypatch_target, attr, wrapper)
        try:
            yield
        finally:
            setattr(monkeypatch_target, attr, original)

    return ctx()


def _save_over_old_failing(target, attr, n) -> bool | str:
    path = tempfile.mkdtemp()
    slora.save_adapter(patched_toy(seed=5), path)
    before = dir_bytes(path)
    try:
        with _failing(target, attr, n):
            slora.save_adapter(patched_toy(seed=6), path)
    except OSError:
        return same_dir(before, path)
    raise NotApplicable(f"{attr} is not called while saving")


@case(5, "unchanged")
def save_adapter_fails_serialising_config_old_intact():
    return _save_over_old_failing(json, "dumps", 1)


@case(5, "unchanged")
def save_adapter_fails_writing_weights_old_intact():
    import safetensors.torch

    return _save_over_old_failing(safetensors.torch, "save_file", 1)


@case(5, "unchanged")
def save_adapter_fails_on_first_rename_old_intact():
    return _save_over_old_failing(os, "replace", 1)


@case(5, "unchanged")
def save_adapter_fails_on_second_rename_old_intact():
    return _save_over_old_failing(os, "replace", 2)


@case(5, "unchanged")
def save_adapter_fails_writing_config_old_intact():
    return _save_over_old_failing(Path, "write_text", 1)


def _half_write(path_self, data, *a, **k):
    """Path.write_text that dies half-way (a full disk, a kill)."""
    with open(path_self, "w") as f:
        f.write(data[: len(data) // 2])
    raise OSError("injected failure: disk full")


def _with_half_write(fn):
    original = Path.write_text
    Path.write_text = _half_write
    try:
        return fn()
    finally:
        Path.write_text = original


@case(5, "unchanged")
def save_adapter_config_half_written_old_intact():
    path = tempfile.mkdtemp()
    slora.save_adapter(patched_toy(seed=5), path)
    before = dir_bytes(path)
    try:
        _with_half_write(lambda: slora.save_adapter(patched_toy(seed=6), path))
    except OSError:
        return same_dir(before, path)
    raise NotApplicable("Path.write_text is not called while saving")


@case(5, "unchanged")
def report_to_json_half_written_old_intact():
    report = slora.analyze(Toy(), [ids()], "activation", list(PROJ), progress=False)
    path = Path(tempfile.mkdtemp()) / "report.json"
    report.to_json(path)
    before = path.read_bytes()
    try:
        _with_half_write(lambda: report.to_json(path))
    except OSError:
        return path.read_bytes() == before and sorted(os.listdir(path.parent)) == ["report.json"]
    raise NotApplicable("Path.write_text is not called by to_json")


@case(5, "unchanged")
def plan_to_json_half_written_old_intact():
    report = slora.analyze(Toy(), [ids()], "activation", list(PROJ), progress=False)
    plan_ = slora.allocate(report, avg_rank=2)
    path = Path(tempfile.mkdtemp()) / "plan.json"
    plan_.to_json(path)
    before = path.read_bytes()
    try:
        _with_half_write(lambda: slora.allocate(report, avg_rank=4).to_json(path))
    except OSError:
        return path.read_bytes() == before
    raise NotApplicable("Path.write_text is not called by to_json")


@case(5, "unchanged")
def save_adapter_interrupted_old_intact():
    path = tempfile.mkdtemp()
    slora.save_adapter(patched_toy(seed=5), path)
    before = dir_bytes(path)
    original = os.replace
    calls = {"n": 0}

    def interrupt(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return original(*a, **k)

    os.replace = interrupt
    try:
        slora.save_adapter(patched_toy(seed=6), path)
    except KeyboardInterrupt:
        return same_dir(before, path)
    finally:
        os.replace = original
    raise NotApplicable("os.replace is not called while saving")


@case(5, "unchanged")
def save_adapter_into_new_dir_fails_leaves_no_adapter_files():
    import safetensors.torch

    path = Path(tempfile.mkdtemp()) / "new"
    try:
        with _failing(safetensors.torch, "save_file", 1):
            slora.save_adapter(patched_toy(), path)
    except OSError:
        return not path.exists() or not any(path.iterdir()) or sorted(os.listdir(path))
    return "the save did not fail"


@case(5, "correct")
def save_adapter_over_other_adapter_is_consistent():
    path = tempfile.mkdtemp()
    other = Toy()
    slora.patch(other, plan_for_ranks(other, {"blocks.0.q_proj": 3}))
    slora.save_adapter(other, path)
    slora.save_adapter(patched_toy(), path)
    leftovers = [p for p in os.listdir(path) if p.startswith(".")]
    return not leftovers and close(outputs(slora.load_adapter(Toy(), path)), adapter_output())


@case(5, "error", match="not a directory")
def save_adapter_onto_a_file():
    path = Path(tempfile.mkdtemp()) / "file"
    path.write_text("x")
    slora.save_adapter(patched_toy(), path)


def _cli_analyze(out: str, avg_rank: str, fail: tuple | None = None) -> None:
    """``slora analyze --out`` with the embedded model and data replaced by tiny ones."""
    from tiny_models import batches, tiny_bert

    from slora import cli, embedded

    saved = embedded.load_model, embedded.calibration_batches
    embedded.load_model = lambda *a, **k: tiny_bert()
    embedded.calibration_batches = lambda *a, **k: batches("bert", n=1)
    try:
        argv = ["analyze", "--estimator", "activation", "--avg-rank", avg_rank, "--out", out]
        if fail is None:
            cli.main(argv)
        else:
            with _failing(*fail):
                cli.main(argv)
    finally:
        embedded.load_model, embedded.calibration_batches = saved


def _cli_failure_keeps_old(fail: tuple) -> bool | str:
    import contextlib
    import io

    out = tempfile.mkdtemp()
    with contextlib.redirect_stdout(io.StringIO()):
        _cli_analyze(out, "2")
        before = dir_bytes(out)
        try:
            _cli_analyze(out, "4", fail)
        except OSError:
            return same_dir(before, out)
    raise NotApplicable(f"{fail[1]} is not called by slora analyze --out")


@case(5, "unchanged")
def cli_analyze_out_plot_failure_keeps_old_files():
    from slora.core import plots

    return _cli_failure_keeps_old((plots, "plot_report", 1))


@case(5, "unchanged")
def cli_analyze_out_plan_write_failure_keeps_old_files():
    return _cli_failure_keeps_old((Path, "write_text", 2))


@case(5, "correct")
def cli_analyze_out_files_agree():
    import contextlib
    import io

    out = tempfile.mkdtemp()
    with contextlib.redirect_stdout(io.StringIO()):
        _cli_analyze(out, "2")
        _cli_analyze(out, "4")
    plan_ = json.loads((Path(out) / "plan.json").read_text())
    names = sorted(os.listdir(out))
    return plan_["avg_rank"] == 4 and names == ["plan.json", "sensitivity.json",
                                                 "sensitivity.png"]  # fmt: skip


# == 6. PEFT semantics when loading ===============================================================


def _set(key, value):
    return lambda c: c.__setitem__(key, value)


def _loaded_names(path) -> set[str]:
    return set(lora_layers(slora.load_adapter(Toy(), path)))


@case(6, "correct")
def config_target_modules_subset_decides():
    path = edited_adapter(_set("target_modules", ["q_proj", "v_proj"]))
    names = _loaded_names(path)
    return names == {f"blocks.{b}.{c}" for b in (0, 1) for c in ("q_proj", "v_proj")} or names


@case(6, "correct")
def config_target_modules_regex_decides():
    path = edited_adapter(_set("target_modules", r".*\.0\.(up|down)_proj"))
    return _loaded_names(path) == {"blocks.0.up_proj", "blocks.0.down_proj"}


@case(6, "correct")
def config_exclude_modules_decides():
    path = edited_adapter(_set("exclude_modules", ["k_proj"]))
    return not any(n.endswith("k_proj") for n in _loaded_names(path))


@case(6, "correct")
def config_target_subset_outputs_match_peft_rule():
    path = edited_adapter(_set("target_modules", ["down_proj"]))
    model = slora.load_adapter(Toy(), path)
    ref = patched_toy()
    with torch.no_grad():
        for name, layer in lora_layers(ref).items():
            if not name.endswith("down_proj"):
                layer.lora_B.weight.zero_()
    return close(outputs(model), lora_reference(ref))


@case(6, "error", match="target_modules")
def config_target_modules_match_no_tensor():
    slora.load_adapter(Toy(), edited_adapter(_set("target_modules", ["o_proj"])))


@case(6, "error", match="modules_to_save overlaps")
def modules_to_save_overlapping_lora_target_refused():
    slora.load_adapter(Toy(), edited_adapter(_set("modules_to_save", ["q_proj"])))


@case(6, "error", match="modules_to_save overlaps")
def saved_base_weight_of_adapted_module_refused():
    def add(t):
        t["base_model.model.blocks.0.q_proj.weight"] = torch.zeros(8, 8)

    cfg = _set("modules_to_save", ["blocks.0.q_proj"])
    slora.load_adapter(Toy(), edited_adapter(cfg, add))


@case(6, "correct")
def extra_tensors_outside_modules_to_save_not_applied():
    def add(t):
        t["base_model.model.classifier.weight"] = torch.ones(3, 8)
        t["base_model.model.classifier.bias"] = torch.ones(3)

    model = slora.load_adapter(Toy(), edited_adapter(None, add))
    return torch.equal(model.classifier.weight, Toy().classifier.weight)


@case(6, "error", match="DoRA")
def use_dora_refused():
    slora.load_adapter(Toy(), edited_adapter(_set("use_dora", True)))


@case(6, "error", match="DoRA")
def dora_magnitude_tensor_refused():
    def add(t):
        t["base_model.model.blocks.0.q_proj.lora_magnitude_vector"] = torch.ones(8)

    slora.load_adapter(Toy(), edited_adapter(None, add))


@case(6, "error", match="lora_bias")
def lora_bias_config_refused():
    slora.load_adapter(Toy(), edited_adapter(_set("lora_bias", True)))


@case(6, "error", match="lora_bias")
def lora_b_bias_tensor_refused():
    def add(t):
        t["base_model.model.blocks.0.q_proj.lora_B.bias"] = torch.ones(8)

    slora.load_adapter(Toy(), edited_adapter(None, add))


@case(6, "error", match="embedding")
def embedding_lora_refused():
    def add(t):
        t["base_model.model.embed.lora_embedding_A"] = torch.ones(2, 11)
        t["base_model.model.embed.lora_embedding_B"] = torch.ones(8, 2)

    slora.load_adapter(Toy(), edited_adapter(None, add))


@case(6, "error", match="DoRA")
def pool_refuses_dora():
    pool_for(Toy()).load("a", edited_adapter(_set("use_dora", True)))


@case(6, "correct")
def pool_honours_config_target_modules():
    pool = pool_for(Toy())
    pool.load("a", edited_adapter(_set("target_modules", ["up_proj"])))
    return set(pool.adapters["a"].ranks) == {"blocks.0.up_proj", "blocks.1.up_proj"}


@case(6, "error", match="layer_replication")
def layer_replication_refused():
    slora.load_adapter(Toy(), edited_adapter(_set("layer_replication", [[0, 1]])))


@case(6, "error", match="rank")
def rank_pattern_disagrees_with_tensor():
    cfg = _set("rank_pattern", {"blocks.0.q_proj": 5})
    slora.load_adapter(Toy(), edited_adapter(cfg))


@case(6, "correct")
def config_all_linear_loads_every_tensor():
    path = edited_adapter(_set("target_modules", "all-linear"))
    return len(_loaded_names(path)) == 10


@case(6, "correct")
def config_layers_to_transform_decides():
    def cfg(c):
        c["layers_to_transform"] = [1]
        c["layers_pattern"] = "blocks"

    return _loaded_names(edited_adapter(cfg)) == {f"blocks.1.{p}" for p in PROJ}


@case(6, "error", match="bias.*not implement")
def config_bias_all_refused():
    slora.load_adapter(Toy(), edited_adapter(_set("bias", "all")))


@case(6, "error", match="trainable tokens")
def trainable_tokens_refused():
    def add(t):
        t["base_model.model.embed.token_adapter.trainable_tokens_delta"] = torch.ones(2, 8)

    slora.load_adapter(Toy(), edited_adapter(None, add))


@case(6, "error", match="target_parameters")
def target_parameters_refused():
    slora.load_adapter(Toy(), edited_adapter(_set("target_parameters", ["blocks.0.q_proj.weight"])))


@case(6, "unchanged")
def refused_adapter_leaves_model_unchanged():
    model = Toy()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        slora.load_adapter(model, edited_adapter(_set("use_dora", True)))
    except ValueError:
        after = model.state_dict()
        return before.keys() == after.keys() and all(torch.equal(before[k], after[k])
                                                      for k in before)  # fmt: skip
    return "not refused"


# == 7. calibration inputs ========================================================================


class PairModel(nn.Module):
    """Called positionally as model(ids, mask), as a TensorDataset batch would be."""

    def __init__(self) -> None:
        super().__init__()
        self.toy = Toy()

    def forward(self, ids_, mask):
        return self.toy(ids_) * mask.unsqueeze(-1)


def _padded_pair():
    x = ids()
    mask = torch.ones_like(x)
    mask[1:, 3:] = 0
    return x, mask


@case(7, "error", match="attention mask.*dict")
def tuple_batch_with_padding_mask_refused():
    slora.analyze(PairModel(), [_padded_pair()], "activation", list(PROJ), progress=False)


@case(7, "error", match="attention mask.*dict")
def list_batch_with_padding_mask_refused():
    slora.analyze(PairModel(), [list(_padded_pair())], "activation", list(PROJ), progress=False)


@case(7, "error", match="attention mask.*dict")
def tuple_batch_with_bool_mask_refused_fisher():
    x, mask = _padded_pair()
    slora.analyze(PairModel(), [(x, mask.bool())], "fisher", list(PROJ),
                  lambda m, b: m(*b).square().mean(), progress=False)  # fmt: skip


@case(7, "correct")
def tuple_batch_without_padding_accepted():
    x = ids()
    got = slora.analyze(PairModel(), [(x, torch.ones_like(x))], "activation", list(PROJ),
                        progress=False)  # fmt: skip
    return got.num_tokens == x.numel()


@case(7, "correct")
def dict_batch_padding_is_masked():
    x, mask = _padded_pair()

    class DictModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.toy = Toy()

        def forward(self, input_ids, attention_mask):
            return self.toy(input_ids)

    got = slora.analyze(DictModel(), [{"input_ids": x, "attention_mask": mask}], "activation",
                        list(PROJ), progress=False)  # fmt: skip
    return got.num_tokens == int(mask.sum())


def _counting_generator(n: int, seen: list):
    for s in range(n):
        seen.append(s)
        yield ids(seed=s)


@case(7, "correct")
def max_batches_consumes_no_extra_generator_batch():
    seen: list[int] = []
    gen = _counting_generator(5, seen)
    slora.analyze(Toy(), gen, "activation", list(PROJ), max_batches=2, progress=False)
    return seen == [0, 1] and next(gen) is not None and seen == [0, 1, 2]


@case(7, "correct")
def max_batches_one_from_iterator():
    seen: list[int] = []
    gen = _counting_generator(3, seen)
    slora.analyze(Toy(), gen, "activation", list(PROJ), max_batches=1, progress=False)
    return seen == [0]


@case(7, "correct")
def max_batches_from_stream_equals_list():
    data = [ids(seed=s) for s in range(4)]
    a = slora.analyze(Toy(), iter(data), "activation", list(PROJ), max_batches=3, progress=False)
    b = slora.analyze(Toy(), data[:3], "activation", list(PROJ), progress=False)
    return a.to_dict() == b.to_dict()


class TupleOut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.toy = Toy()

    def forward(self, input_ids, labels=None):
        logits = self.toy(input_ids)
        return (logits.square().mean(), logits)


@case(7, "error", match="tuple.*loss_fn")
def model_returning_tuple_named():
    slora.analyze(TupleOut(), [{"input_ids": ids(), "labels": ids()}], "fisher", list(PROJ),
                  progress=False)  # fmt: skip


@case(7, "error", match="Tensor.*loss_fn")
def model_returning_tensor_named():
    slora.analyze(Toy(), [ids()], "fisher", list(PROJ), progress=False)


@case(7, "error", match="does not require grad.*no_grad")
def loss_computed_under_no_grad_named():
    def loss_fn(model, batch):
        with torch.no_grad():
            return model(batch).square().mean()

    slora.analyze(Toy(), [ids()], "fisher", list(PROJ), loss_fn, progress=False)


@case(7, "error", match="does not require grad.*detached")
def loss_detached_named():
    slora.analyze(Toy(), [ids()], "fisher", list(PROJ),
                  lambda m, b: m(b).square().mean().detach(), progress=False)  # fmt: skip


@case(7, "error", match="does not require grad")
def loss_under_inference_mode_named():
    def loss_fn(model, batch):
        with torch.inference_mode():
            return model(batch).square().mean()

    slora.analyze(Toy(), [ids()], "fisher_exact", list(PROJ), loss_fn, progress=False)


@case(7, "error", match="attention_mask must be \\[batch, seq\\]")
def four_d_attention_mask_refused():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.toy = Toy()

        def forward(self, input_ids, attention_mask):
            return self.toy(input_ids)

    mask = torch.ones(3, 1, 5, 5, dtype=torch.long)
    slora.analyze(M(), [{"input_ids": ids(), "attention_mask": mask}], "activation", list(PROJ),
                  progress=False)  # fmt: skip


@case(7, "correct")
def attention_mask_as_nested_list_is_masked():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.toy = Toy()

        def forward(self, input_ids, attention_mask):
            return self.toy(input_ids)

    mask = [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]
    got = slora.analyze(M(), [{"input_ids": ids(), "attention_mask": mask}], "activation",
                        list(PROJ), progress=False)  # fmt: skip
    return got.num_tokens == 9


@case(7, "error", match="inference_mode.*activation")
def model_made_in_inference_mode_fisher_named():
    with torch.inference_mode():
        model = Toy()
    slora.analyze(model, [ids()], "fisher", list(PROJ), _sum_loss, progress=False)


@case(7, "error", match="scalar")
def loss_fn_returning_float_named():
    slora.analyze(Toy(), [ids()], "fisher", list(PROJ), lambda m, b: 1.0, progress=False)


# == 8. ops =======================================================================================


def _saved_out_case(backend: str):
    items, g = _packed_case()
    packed = ops.PackedAdapters.from_list(items)
    w = torch.randn(5, requires_grad=True)
    y = torch.randn(4, 5) * w  # y does not require grad itself? it does: saved by the mul below
    z = (y * y).sum()  # autograd saves y
    x = torch.randn(4, 6, generator=g)
    with torch.no_grad():
        ops.multi_lora(x, torch.tensor([0, 1, 0, 1]), packed, out=y, backend=backend)
    z.backward()  # must refuse: y changed after it was saved
    return f"backward ran on a modified y (backend {backend})"


for _backend in ("torch", "cpp", "triton"):

    def _fn(backend=_backend):
        return _saved_out_case(backend)

    _fn.__name__ = f"out_saved_by_autograd_refused_{_backend}"
    case(8, "error", match="modified by an inplace operation")(_fn)


@case(8, "correct")
def out_not_saved_is_updated_correctly():
    items, g = _packed_case()
    packed = ops.PackedAdapters.from_list(items)
    x = torch.randn(4, 6, generator=g)
    slots = torch.tensor([0, 1, -1, 1])
    out = torch.randn(4, 5, generator=g)
    start = out.clone()
    ops.multi_lora(x, slots, packed, out=out)
    return close(out, start.double() + _multi_lora_reference(x, slots, items))


@case(8, "error", match="built for 6 tokens but x has 4")
def segment_meta_for_more_tokens_refused():
    items, g = _packed_case()
    packed = ops.PackedAdapters.from_list(items)
    meta = ops.build_segment_meta(torch.tensor([0, 3, 6]), torch.tensor([0, 1]), 6, 2)
    ops.multi_lora(torch.randn(4, 6, generator=g), None, packed, meta=meta)


@case(8, "error", match="built for 3 tokens but x has 5")
def segment_meta_for_fewer_tokens_refused():
    items, g = _packed_case()
    packed = ops.PackedAdapters.from_list(items)
    meta = ops.build_segment_meta(torch.tensor([0, 1, 3]), torch.tensor([0, 1]), 3, 2)
    out = torch.zeros(5, 5)
    ops.multi_lora(torch.randn(5, 6, generator=g), None, packed, meta=meta, out=out)


@case(8, "error", match="built for 3 tokens but x has 5")
def token_meta_for_other_tokens_refused():
    items, g = _packed_case()
    packed = ops.PackedAdapters.from_list(items)
    meta = ops.build_token_meta(torch.tensor([0, 1, 0]), 2)
    ops.multi_lora(torch.randn(5, 6, generator=g), None, packed, meta=meta)


@case(8, "error", match="built for 6 tokens but x has 4")
def segment_meta_for_more_tokens_refused_with_grad():
    items, g = _packed_case()
    packed = ops.PackedAdapters.from_list(items)
    meta = ops.build_segment_meta(torch.tensor([0, 3, 6]), torch.tensor([0, 1]), 6, 2)
    ops.multi_lora(torch.randn(4, 6, generator=g, requires_grad=True), None, packed, meta=meta)


@case(8, "error", match="built for 4 slots but the adapters have 2")
def token_meta_for_more_slots_refused():
    items, g = _packed_case()
    packed = ops.PackedAdapters.from_list(items)
    meta = ops.build_token_meta(torch.tensor([3, 0, 3]), 4)
    ops.multi_lora(torch.randn(3, 6, generator=g), None, packed, meta=meta)


@case(8, "error", match="built for 4 slots but the adapters have 2")
def segment_meta_for_more_slots_refused():
    items, g = _packed_case()
    packed = ops.PackedAdapters.from_list(items)
    meta = ops.build_segment_meta(torch.tensor([0, 2, 3]), torch.tensor([3, 0]), 3, 4)
    ops.multi_lora(torch.randn(3, 6, generator=g), None, packed, meta=meta)


@case(8, "error", match="shares memory with x")
def out_aliasing_x_refused():
    g = torch.Generator().manual_seed(0)
    items = [(torch.randn(2, 6, generator=g), torch.randn(6, 2, generator=g), 1.0)]
    packed = ops.PackedAdapters.from_list(items)
    x = torch.randn(4, 6, generator=g)
    ops.multi_lora(x, torch.zeros(4, dtype=torch.long), packed, out=x)


def _store_state(packed) -> tuple:
    """What a store serves: metadata, every slot's (A, B, scale) and the buffers' addresses."""
    slots = [
        [None if t is None else (t[0].clone(), t[1].clone(), t[2]) for t in packed.adapter(k)]
        for k in range(packed.max_slots)
    ]
    meta = (packed.ranks, packed.a_offsets, packed.b_offsets, packed.scales)
    return (
        [m.clone() for m in meta], slots, dict(packed._host), packed.max_rank,
        packed.A.data_ptr(), packed.Bt.data_ptr(),
    )  # fmt: skip


def _same(x, y) -> bool:
    if isinstance(x, torch.Tensor):
        return torch.equal(x, y)
    if isinstance(x, (list, tuple)):
        return len(x) == len(y) and all(_same(a, b) for a, b in zip(x, y))
    return x == y


def _same_store(a: tuple, b: tuple) -> bool:
    return _same(a, b)


def _failed_load_keeps_old(bad, slot_rows: int = 0, inject=None) -> bool | str:
    items, _ = _packed_case()
    kwargs = dict(slot_rows=4) if slot_rows else dict(capacity_rows=5, capacity_b=25)
    packed = ops.PackedAdapters(6, 5, max_slots=2, **kwargs)
    packed.load(0, items[0])
    packed.load(1, items[1])
    before = _store_state(packed)
    x = torch.randn(3, 6)
    slots = torch.tensor([0, 1, 0])
    y_before = ops.multi_lora(x, slots, packed)
    try:
        if inject is not None:
            with _failing(packed, inject, 1):
                packed.load(0, bad)
        else:
            packed.load(0, bad)
    except (ValueError, TypeError, RuntimeError, OSError, NotImplementedError):
        y_after = ops.multi_lora(x, slots, packed)
        ok = torch.equal(y_after, y_before)
        if not slot_rows:  # packed placement may move rows; what it serves must not change
            return ok or "served output changed"
        return (ok and _same_store(before, _store_state(packed))) or "store changed"
    return "the load did not fail"


@case(8, "unchanged")
def packed_load_meta_tensor_keeps_old():
    bad = (torch.empty(2, 6, device="meta"), torch.empty(5, 2, device="meta"), 1.0)
    return _failed_load_keeps_old(bad)


@case(8, "unchanged")
def packed_load_int_tensor_refused_keeps_old():
    return _failed_load_keeps_old((torch.ones(2, 6, dtype=torch.int64), torch.ones(5, 2), 1.0))


@case(8, "unchanged")
def packed_load_numpy_refused_keeps_old():
    return _failed_load_keeps_old((torch.ones(2, 6).numpy(), torch.ones(5, 2), 1.0))


@case(8, "unchanged")
def packed_load_fails_writing_meta_keeps_old():
    return _failed_load_keeps_old((torch.ones(3, 6), torch.ones(5, 3), 1.0), inject="_write_meta")


@case(8, "unchanged")
def packed_load_fails_placing_rows_keeps_old():
    return _failed_load_keeps_old((torch.ones(4, 6), torch.ones(5, 4), 1.0), inject="_place")


@case(8, "unchanged")
def packed_slot_rows_load_fails_keeps_old_and_buffers():
    return _failed_load_keeps_old(
        (torch.ones(3, 6), torch.ones(5, 3), 1.0), slot_rows=4, inject="_write_meta"
    )


@case(8, "unchanged")
def packed_slot_rows_meta_tensor_keeps_old():
    bad = (torch.empty(2, 6, device="meta"), torch.empty(5, 2, device="meta"), 1.0)
    return _failed_load_keeps_old(bad, slot_rows=4)


@case(8, "correct")
def packed_failed_load_then_reload_works():
    items, _ = _packed_case()
    packed = ops.PackedAdapters(6, 5, max_slots=2, capacity_rows=5, capacity_b=25)
    packed.load(0, items[0])
    try:
        with _failing(packed, "_write_meta", 1):
            packed.load(0, items[1])
    except OSError:
        pass
    packed.load(1, items[1])
    x = torch.randn(3, 6)
    slots = torch.tensor([0, 1, 0])
    return close(ops.multi_lora(x, slots, packed), _multi_lora_reference(x, slots, items))


# == 9. embedded data cache =======================================================================


def _fake_data(monkeypatch_env: dict) -> tuple[Path, object]:
    """A data directory with a small pinned 'sentences' file and a 'model' directory."""
    import hashlib

    from slora import embedded

    root = Path(tempfile.mkdtemp(prefix="slora-data-"))
    (root / embedded.MODEL_DIR).mkdir()
    files = {
        embedded.SENTENCES_FILE: b"text,category\nnice,fresh\n" * 20,
        f"{embedded.MODEL_DIR}/model.safetensors": b"\x00weights" * 50,
        f"{embedded.MODEL_DIR}/config.json": b'{"model_type": "bert"}',
    }
    for rel, data in files.items():
        (root / rel).write_bytes(data)
    sha = {rel: hashlib.sha256(data).hexdigest() for rel, data in files.items()}
    model_rel = f"{embedded.MODEL_DIR}/model.safetensors"
    config_rel = f"{embedded.MODEL_DIR}/config.json"
    fields = getattr(embedded._Source, "__dataclass_fields__", {})
    more = {"others": ((config_rel, sha[config_rel]),)} if "others" in fields else {}
    sources = (
        embedded._Source("m==1", "m/", embedded.MODEL_DIR, model_rel, sha[model_rel], **more),
        embedded._Source("s==1", "s", embedded.SENTENCES_FILE, embedded.SENTENCES_FILE,
                         sha[embedded.SENTENCES_FILE]),
    )  # fmt: skip
    monkeypatch_env["SOURCES"] = sources
    return root, embedded


def _with_fake_data(damage: Callable[[Path], None], getter: str) -> object:
    from slora import embedded

    env: dict = {}
    root, _ = _fake_data(env)
    old_sources, old_env = embedded.SOURCES, os.environ.get("SLORA_DATA")
    embedded.SOURCES = env["SOURCES"]
    os.environ["SLORA_DATA"] = str(root)
    try:
        getattr(embedded, getter)()  # intact: fine (and stamped)
        damage(root)
        return getattr(embedded, getter)()
    finally:
        embedded.SOURCES = old_sources
        if old_env is None:
            os.environ.pop("SLORA_DATA", None)
        else:
            os.environ["SLORA_DATA"] = old_env


REPAIR = r"rotten_tomatoes_corpus_full\.csv\.bz2.*python -m slora\.embedded"
REPAIR_MODEL = r"all-MiniLM-L6-v2.*python -m slora\.embedded"


def _truncate(rel: str):
    def damage(root: Path):
        path = root / rel
        path.write_bytes(path.read_bytes()[:-7])

    return damage


def _flip(rel: str):
    def damage(root: Path):
        path = root / rel
        data = bytearray(path.read_bytes())
        data[3] ^= 1
        st = path.stat()
        path.write_bytes(bytes(data))
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size and mtime too

    return damage


@case(9, "error", match=REPAIR)
def embedded_truncated_sentences():
    from slora import embedded

    _with_fake_data(_truncate(embedded.SENTENCES_FILE), "sentences_path")


@case(9, "error", match=REPAIR)
def embedded_modified_sentences():
    from slora import embedded

    def damage(root):
        path = root / embedded.SENTENCES_FILE
        path.write_bytes(path.read_bytes().replace(b"fresh", b"rotte"))

    _with_fake_data(damage, "sentences_path")


@case(9, "error", match=REPAIR)
def embedded_foreign_sentences_file():
    from slora import embedded

    def damage(root):
        (root / embedded.SENTENCES_FILE).write_bytes(b"some other csv\n")

    _with_fake_data(damage, "sentences_path")


@case(9, "error", match=REPAIR)
def embedded_directory_in_place_of_file():
    from slora import embedded

    def damage(root):
        (root / embedded.SENTENCES_FILE).unlink()
        (root / embedded.SENTENCES_FILE).mkdir()

    _with_fake_data(damage, "sentences_path")


@case(9, "error", match=REPAIR_MODEL)
def embedded_truncated_model_weights():
    from slora import embedded

    _with_fake_data(_truncate(f"{embedded.MODEL_DIR}/model.safetensors"), "model_path")


@case(9, "error", match=r"config\.json.*python -m slora\.embedded")
def embedded_missing_model_config():
    from slora import embedded

    _with_fake_data(lambda root: (root / embedded.MODEL_DIR / "config.json").unlink(),
                    "model_path")  # fmt: skip


@case(9, "error", match=r"config\.json.*python -m slora\.embedded")
def embedded_foreign_model_config():
    from slora import embedded

    def damage(root):
        (root / embedded.MODEL_DIR / "config.json").write_text('{"model_type": "gpt2"}')

    _with_fake_data(damage, "model_path")


@case(9, "correct")
def embedded_intact_files_pass():
    from slora import embedded

    path = _with_fake_data(lambda root: None, "sentences_path")
    return Path(path).name == embedded.SENTENCES_FILE


@case(9, "error", match=REPAIR)
def embedded_same_size_edit_with_new_mtime():
    from slora import embedded

    def damage(root):
        path = root / embedded.SENTENCES_FILE
        data = bytearray(path.read_bytes())
        data[0] ^= 1
        path.write_bytes(bytes(data))
        st = path.stat()
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))

    _with_fake_data(damage, "sentences_path")


# == the tests ====================================================================================


@pytest.mark.parametrize("c", CASES, ids=[f"{c.cls}-{c.id}" for c in CASES])
def test_probe(c: Case) -> None:
    got, detail = outcome(c)
    assert got == EXPECTED[c.expect], f"{c.id}: expected {EXPECTED[c.expect]}, got {got}: {detail}"


def test_probe_size() -> None:
    assert len(CASES) >= 100
    assert {c.cls for c in CASES} == set(CLASSES)


def main() -> int:
    """Print every case's outcome and the counts per outcome class."""
    rows, counts, bad = [], {}, 0
    for c in CASES:
        got, detail = outcome(c)
        counts[got] = counts.get(got, 0) + 1
        bad += got != EXPECTED[c.expect]
        mark = "ok " if got == EXPECTED[c.expect] else "BAD"
        rows.append(f"{mark} {c.cls} {c.id:<58} {got:<13} {detail[:90]}")
    print("\n".join(rows))
    order = ["clear error", "correct", "unchanged", "silent wrong", "half-changed", "unclear",
             "n/a"]  # fmt: skip
    print(f"\n{len(CASES)} cases: " + ", ".join(f"{k} {counts.get(k, 0)}" for k in order))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
