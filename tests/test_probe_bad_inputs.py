"""A probe of bad and edge-case inputs across the API, the CLI, adapter files, the pool and the
kernels, tried as a new user would.  Every case is classified:

* ``clear``: refused with an slora error whose message names the input (the words listed with
  the case) and the object it was given to is exactly as before;
* ``unclear``: refused, but by an error from deep inside (``JSONDecodeError``, ``re.error``,
  ``ZeroDivisionError``, ``AttributeError``...) or with a message that does not name the input;
* ``silent``: accepted although it is wrong (no error at all);
* ``half-modified``: refused, but the model or pool was changed on the way.

Each case is its own test, asserting the class it must get (``expect``, ``clear`` unless
the case says otherwise).  ``python3 tests/test_probe_bad_inputs.py`` prints the counts and
every case that is not clear.
"""

from __future__ import annotations

import atexit
import contextlib
import io
import json
import math
import re
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from toy import Toy, ids, plan, randomize_lora, same_tensor, snapshot

import slora
from slora import ops
from slora.core.patch import plan_for_ranks
from slora.ops import PackedAdapters

NAN, INF = math.nan, math.inf
DEEP_ERRORS = (
    json.JSONDecodeError,
    re.error,
    ZeroDivisionError,
    AttributeError,
    AssertionError,
    NameError,
    UnboundLocalError,
    StopIteration,
    OverflowError,
)


@dataclass
class Case:
    name: str
    run: Callable[[], Any]  # the bad call
    words: tuple[str, ...]  # a clear message names these (case-insensitive)
    subject: Callable[[], Any] | None = None  # what must be unchanged afterwards
    expect: str = "clear"  # the class this case must get (see the module docstring)


def _state(obj: Any) -> Any:
    if obj is None:
        return None
    if isinstance(obj, slora.AdapterPool):
        return (
            obj.loaded,
            {
                n: [t.clone() for t in (p.ranks, p.a_offsets, p.b_offsets, p.scales)]
                for n, p in obj._packed.items()
            },
            len(obj._handles),
        )
    return snapshot(obj)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and same_tensor(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a is b or a == b


def classify(case: Case) -> tuple[str, str]:
    subject = case.subject() if case.subject is not None else None
    before = _state(subject)
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            case.run()
    except SystemExit as exc:  # argparse: the message went to stderr
        text = err.getvalue()
        ok = exc.code == 2 and all(w.lower() in text.lower() for w in case.words)
        return ("clear" if ok else "unclear"), text.strip().splitlines()[-1:][0] if text else ""
    except Exception as exc:  # noqa: BLE001 - classifying is the point
        message = f"{type(exc).__name__}: {exc}"
        if subject is not None and not _same(before, _state(subject)):
            return "half-modified", message
        if isinstance(exc, DEEP_ERRORS):
            return "unclear", message
        if all(w.lower() in str(exc).lower() for w in case.words):
            return "clear", message
        return "unclear", message
    return "silent", "no error"


# -- fixtures shared by the cases --------------------------------------------------------------


def _report() -> slora.SensitivityReport:
    mods = {
        n: {
            "d_in": 8,
            "d_out": 8,
            "global": 1.0 + i,
            "topk": 0.5,
            "effrank": 3,
            "local": 1.0,
            "score": 1.0 + i,
        }
        for i, n in enumerate(["a", "b", "c"])
    }
    return slora.SensitivityReport("fisher", 10, mods)


class Workspace:
    """A temporary directory with one good adapter saved from the toy model."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="slora-probe-"))
        source = Toy()
        slora.patch(source, plan(source), modules_to_save=None)
        randomize_lora(source)
        self.good = self.root / "good"
        slora.save_adapter(source, self.good)
        self.count = 0

    def variant(self, config_edit=None, weights_edit=None, remove=()) -> Path:
        """A copy of the good adapter with its config and/or tensors edited."""
        from safetensors.torch import load_file, save_file

        self.count += 1
        out = self.root / f"v{self.count}"
        shutil.copytree(self.good, out)
        if config_edit is not None:
            cfg = json.loads((out / "adapter_config.json").read_text())
            result = config_edit(cfg)
            text = result if isinstance(result, str) else json.dumps(cfg)
            (out / "adapter_config.json").write_text(text)
        if weights_edit is not None:
            tensors = load_file(out / "adapter_model.safetensors")
            weights_edit(tensors)
            save_file(tensors, out / "adapter_model.safetensors")
        for name in remove:
            (out / name).unlink()
        return out

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def _key(t: dict, part: str) -> str:
    return next(k for k in t if part in k)


# -- the cases ---------------------------------------------------------------------------------


def allocate_cases() -> list[Case]:
    rep = _report()
    table = (
        [("avg_rank", v, {"avg_rank": v}) for v in (0, -1, NAN, INF, "4", None, True)]
        + [("min_rank", v, {"min_rank": v}) for v in (-1, 1.5, "1", True)]
        + [("max_rank", v, {"max_rank": v}) for v in (0, -1, 2.5)]
        + [("multiple_of", v, {"multiple_of": v}) for v in (0, -2, 1.5, 16)]
        + [
            ("method", "foo", {"method": "foo"}),
            ("budget", "foo", {"budget": "foo"}),
            ("pra_bands", 0, {"method": "pra", "pra_bands": 0}),
            ("avg_rank", 1000, {"avg_rank": 1000}),
            ("min_rank", 8, {"min_rank": 8, "avg_rank": 1}),
        ]
    )
    cases = [
        Case(f"allocate {field}={value!r}", lambda kw=kw: slora.allocate(rep, **kw), (field,))
        for field, value, kw in table
    ]
    for bad in ("report.json", None, {"modules": {}}):
        cases.append(Case(f"allocate report={bad!r}", lambda b=bad: slora.allocate(b), ("report",)))
    empty = slora.SensitivityReport("fisher", 0, {})
    cases.append(Case("allocate empty report", lambda: slora.allocate(empty), ("no modules",)))
    return cases


def analyze_cases() -> list[Case]:
    model = Toy()
    data = [ids(2, 4, seed=s) for s in range(2)]
    loss = lambda m, b: m(b).pow(2).mean()

    def run(**kw):
        args = {"data": data, "loss_fn": loss, "progress": False, "backend": "torch",
                "estimator": "fisher", **kw}  # fmt: skip
        return lambda: slora.analyze(model, **args)

    cases = [
        Case("analyze estimator='x'", run(estimator="x"), ("estimator",)),
        *[Case(f"analyze topk_frac={v}", run(topk_frac=v), ("topk_frac",)) for v in (0, 1.5, NAN)],
        *[Case(f"analyze alpha={v}", run(alpha=v), ("alpha",)) for v in (0, 2, NAN)],
        *[
            Case(f"analyze max_batches={v}", run(max_batches=v), ("max_batches",))
            for v in (0, -1, 1.5)
        ],
        Case("analyze data=tensor", run(data=ids()), ("data",)),
        Case("analyze data=dict", run(data={"ids": ids()}), ("data",)),
        Case("analyze data=[]", run(data=[]), ("empty",)),
        Case(
            "analyze all-NaN batches",
            lambda: slora.analyze(
                model,
                data,
                "fisher",
                loss_fn=lambda m, b: m(b).sum() * NAN,
                progress=False,
                backend="torch",
            ),
            ("non-finite",),
        ),
        Case("analyze loss vector", run(loss_fn=lambda m, b: m(b).sum(-1)), ("loss_fn", "scalar")),
        Case("analyze loss float", run(loss_fn=lambda m, b: 1.0), ("loss_fn", "scalar")),
        Case("analyze no loss (default loss_fn)", run(loss_fn=None), ("loss",)),
        *[
            Case(f"analyze target_modules={t!r}", run(target_modules=t), ("target_modules",))
            for t in (["nope"], ["q_proj("], [5], [], "embed", [""])
        ],
        Case(
            "analyze model with no Linear",
            lambda: slora.analyze(
                torch.nn.Sequential(torch.nn.ReLU()), [torch.ones(2)], progress=False
            ),
            ("target",),
        ),
    ]
    for c in cases:
        c.subject = lambda: model
    return cases


def patch_cases() -> list[Case]:
    def fresh(tied=False):
        return Toy(tied=tied)

    cases = []

    def add(name, make_model, call, words):
        holder = {}

        def subject():
            holder["m"] = make_model()
            return holder["m"]

        cases.append(Case(name, lambda: call(holder["m"]), words, subject))

    good = lambda m: plan(m)
    add("patch plan='x'", fresh, lambda m: slora.patch(m, "plan"), ("plan",))
    add("patch plan=dict", fresh, lambda m: slora.patch(m, {"a": 1}), ("plan",))
    add(
        "patch plan names missing module",
        fresh,
        lambda m: slora.patch(m, plan_for_ranks(m, {"nope": 2})),
        ("nope",),
    )
    add(
        "patch plan names Embedding",
        fresh,
        lambda m: slora.patch(m, slora.RankPlan({"embed": 2})),
        ("embed", "Linear"),
    )
    add(
        "patch plan rank -1",
        fresh,
        lambda m: slora.patch(m, slora.RankPlan({"blocks.0.q_proj": -1})),
        ("rank", "q_proj"),
    )
    add(
        "patch plan rank 2.5",
        fresh,
        lambda m: slora.patch(m, slora.RankPlan({"blocks.0.q_proj": 2.5})),
        ("rank", "q_proj"),
    )
    add(
        "patch plan dims of another model",
        fresh,
        lambda m: slora.patch(
            m, slora.RankPlan({"blocks.0.q_proj": 2}, {"blocks.0.q_proj": (4, 4)})
        ),
        ("q_proj", "another model"),
    )
    add(
        "patch plan all rank 0",
        fresh,
        lambda m: slora.patch(m, plan_for_ranks(m, {"blocks.0.q_proj": 0})),
        ("rank 0",),
    )
    for v in (NAN, INF, -1.0, 0.0, "2"):
        add(
            f"patch lora_alpha={v!r}",
            fresh,
            lambda m, v=v: slora.patch(m, good(m), lora_alpha=v),
            ("lora_alpha",),
        )
    for v in (-0.1, 1.0, NAN, "0.1"):
        add(
            f"patch lora_dropout={v!r}",
            fresh,
            lambda m, v=v: slora.patch(m, good(m), lora_dropout=v),
            ("lora_dropout",),
        )
    add(
        "patch use_rslora='yes'",
        fresh,
        lambda m: slora.patch(m, good(m), use_rslora="yes"),
        ("use_rslora",),
    )
    for v in (["nope"], [3]):
        add(
            f"patch modules_to_save={v!r}",
            fresh,
            lambda m, v=v: slora.patch(m, good(m), modules_to_save=v),
            ("modules_to_save",),
        )
    add(
        "patch tied modules_to_save",
        lambda: fresh(True),
        lambda m: slora.patch(m, good(m), modules_to_save=["lm_head"]),
        ("lm_head", "tied"),
    )
    for kw in (
        {"avg_rank": 4},
        {"estimator": "activation"},
        {"target_modules": ["q_proj"]},
        {"min_rank": 2},
        {"method": "uniform"},
        {"data": [ids()]},
    ):
        add(
            f"patch plan + {kw}",
            fresh,
            lambda m, kw=kw: slora.patch(m, good(m), **kw),
            (next(iter(kw)),),
        )
    add("patch no plan no data", fresh, lambda m: slora.patch(m), ("plan", "data"))
    add("patch model='x'", fresh, lambda m: slora.patch("model", good(m)), ("model",))

    def patched():
        m = fresh()
        return slora.patch(m, plan(m))

    add("patch twice", patched, lambda m: slora.patch(m, good(m)), ("already patched",))

    def peft_injected():
        from peft import LoraConfig, inject_adapter_in_model

        return inject_adapter_in_model(LoraConfig(r=2, target_modules=["q_proj"]), fresh())

    add(
        "patch over PEFT LoRA",
        peft_injected,
        lambda m: slora.patch(m, plan_for_ranks(m, {"blocks.0.k_proj": 2})),
        ("LoRA", "peft"),
    )

    def int_weight():
        m = fresh()
        m.blocks[0].k_proj.weight = torch.nn.Parameter(
            torch.ones(8, 8, dtype=torch.int32), requires_grad=False
        )
        return m

    add(
        "patch int weight second in plan",
        int_weight,
        lambda m: slora.patch(m, good(m)),
        ("k_proj", "floating"),
    )

    def shared():
        m = fresh()
        m.blocks[1].q_proj = m.blocks[0].q_proj
        return m

    add(
        "patch shared module",
        shared,
        lambda m: slora.patch(m, plan_for_ranks(m, {"blocks.0.q_proj": 2})),
        ("shared",),
    )

    def pooled():
        m = fresh()
        slora.AdapterPool(m, backend="torch")
        return m

    add("patch model serving a pool", pooled, lambda m: slora.patch(m, good(m)), ("AdapterPool",))
    # merge / unpatch / save
    add("merge unpatched", fresh, slora.merge, ("not patched",))
    add("unpatch unpatched", fresh, slora.unpatch, ("not patched",))
    add(
        "save unpatched", fresh, lambda m: slora.save_adapter(m, "/nonexistent/x"), ("not patched",)
    )

    def merged():
        m = patched()
        return slora.merge(m)

    add("save after merge", merged, lambda m: slora.save_adapter(m, "/nonexistent/x"), ("merge",))

    def tied_patched():
        m = fresh(True)
        slora.patch(m, plan(m, with_head=True))
        randomize_lora(m)
        return m

    add("merge tied lm_head", tied_patched, slora.merge, ("lm_head", "tied"))

    def nan_adapter():
        m = patched()
        with torch.no_grad():
            m.blocks[1].v_proj.lora_B.weight.fill_(NAN)
        return m

    add("merge NaN adapter", nan_adapter, slora.merge, ("v_proj", "non-finite"))
    add(
        "to_peft_config lora_alpha=nan",
        fresh,
        lambda m: plan(m).to_peft_config(lora_alpha=NAN),
        ("lora_alpha",),
    )
    return cases


def adapter_file_cases(ws: Workspace) -> list[Case]:
    from safetensors.torch import save_file

    def cfg(fn):
        return lambda: ws.variant(config_edit=fn)

    def wts(fn):
        return lambda: ws.variant(weights_edit=fn)

    def q_alpha(value):
        return lambda c: c["alpha_pattern"].update({"blocks.0.q_proj": value})

    def bad_dir(kind):
        def make():
            out = ws.root / f"{kind}{ws.count}"
            ws.count += 1
            out.mkdir()
            if kind == "bin":
                (out / "adapter_model.bin").write_bytes(b"\x80\x04")
            if kind == "int":
                shutil.copy(ws.good / "adapter_config.json", out)
                save_file(
                    {
                        "base_model.model.blocks.0.q_proj.lora_A.weight": torch.ones(
                            2, 8, dtype=torch.int32
                        )
                    },
                    out / "adapter_model.safetensors",
                )
            return out

        return make

    def truncate():
        out = ws.variant()
        data = (out / "adapter_model.safetensors").read_bytes()
        (out / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
        return out

    table = [
        ("missing directory", lambda: ws.root / "missing", ("does not exist",)),
        ("only adapter_model.bin", bad_dir("bin"), ("pickle",)),
        ("empty directory", bad_dir("empty"), ("adapter_model.safetensors",)),
        (
            "missing config",
            lambda: ws.variant(remove=["adapter_config.json"]),
            ("adapter_config.json",),
        ),
        ("config not JSON", cfg(lambda c: "{oops"), ("adapter_config.json", "JSON")),
        ("config is a list", cfg(lambda c: "[1, 2]"), ("LoRA",)),
        ("peft_type PREFIX", cfg(lambda c: c.update(peft_type="PREFIX_TUNING")), ("LoRA",)),
        *[(f"r={v!r}", cfg(lambda c, v=v: c.update(r=v)), ("r must",)) for v in (NAN, INF, 0, "8")],
        *[
            (
                f"lora_alpha={v!r}",
                cfg(lambda c, v=v: c.update(lora_alpha=v, alpha_pattern={})),
                ("lora_alpha",),
            )
            for v in (NAN, -1, "x")
        ],
        *[
            (f"alpha_pattern={v!r}", cfg(q_alpha(v)), ("alpha_pattern", "q_proj"))
            for v in (NAN, INF, -INF, "2", 0)
        ],
        ("alpha_pattern a list", cfg(lambda c: c.update(alpha_pattern=[1])), ("alpha_pattern",)),
        (
            "rank_pattern value 'x'",
            cfg(lambda c: c["rank_pattern"].update({"blocks.0.q_proj": "x"})),
            ("rank_pattern", "q_proj"),
        ),
        (
            "rank_pattern bad regex",
            cfg(lambda c: c["rank_pattern"].update({"(": 2})),
            ("rank_pattern", "regular expression"),
        ),
        (
            "rank_pattern disagrees",
            cfg(lambda c: c["rank_pattern"].update({"blocks.0.q_proj": 5})),
            ("q_proj", "rank"),
        ),
        ("use_rslora='false'", cfg(lambda c: c.update(use_rslora="false")), ("use_rslora",)),
        ("truncated safetensors", truncate, ("corrupt",)),
        ("int tensors", bad_dir("int"), ("floating point",)),
        (
            "NaN in lora_B",
            wts(lambda t: t[_key(t, "1.v_proj.lora_B")].fill_(NAN)),
            ("non-finite", "v_proj"),
        ),
        (
            "Inf in lora_A",
            wts(lambda t: t[_key(t, "0.up_proj.lora_A")].fill_(INF)),
            ("non-finite", "up_proj"),
        ),
        (
            "wrong prefix",
            wts(lambda t: t.update({"x.lora_A.weight": torch.ones(2, 8)})),
            ("x.lora_A.weight", "base_model.model"),
        ),
        (
            "lora_A without lora_B",
            wts(lambda t: t.pop(_key(t, "0.k_proj.lora_B"))),
            ("k_proj", "incomplete"),
        ),
        (
            "lora_B wrong rank",
            wts(lambda t: t.update({_key(t, "0.k_proj.lora_B"): torch.ones(8, 3)})),
            ("k_proj",),
        ),
        (
            "shaped for another model",
            wts(
                lambda t: t.update(
                    {
                        _key(t, "0.q_proj.lora_A"): torch.ones(2, 5),
                        _key(t, "0.q_proj.lora_B"): torch.ones(5, 2),
                    }
                )
            ),
            ("q_proj", "d_in"),
        ),
        (
            "module the base lacks",
            wts(
                lambda t: t.update(
                    {
                        "base_model.model.nope.lora_A.weight": torch.ones(2, 8),
                        "base_model.model.nope.lora_B.weight": torch.ones(8, 2),
                    }
                )
            ),
            ("nope",),
        ),
        (
            "adapter on an Embedding",
            wts(
                lambda t: t.update(
                    {
                        "base_model.model.embed.lora_A.weight": torch.ones(2, 8),
                        "base_model.model.embed.lora_B.weight": torch.ones(8, 2),
                    }
                )
            ),
            ("embed", "Linear"),
        ),
        (
            "extra tensor of wrong shape",
            wts(lambda t: t.update({"base_model.model.classifier.weight": torch.ones(2, 2)})),
            ("classifier.weight",),
        ),
    ]
    cases = []
    for name, make_dir, words in table:
        holder: dict[str, Any] = {}

        def model_subject(holder=holder, make_dir=make_dir):
            holder["dir"] = make_dir()
            holder["m"] = Toy()
            return holder["m"]

        cases.append(
            Case(
                f"load_adapter: {name}",
                lambda h=holder: slora.load_adapter(h["m"], h["dir"]),
                words,
                model_subject,
            )
        )
        pool_holder: dict[str, Any] = {}

        def pool_subject(holder=pool_holder, make_dir=make_dir):
            holder["dir"] = make_dir()
            holder["pool"] = slora.AdapterPool(Toy(), backend="torch")
            holder["pool"].load("ok", ws.good)
            return holder["pool"]

        cases.append(
            Case(
                f"AdapterPool.load: {name}",
                lambda h=pool_holder: h["pool"].load("new", h["dir"]),
                words,
                pool_subject,
            )
        )
    return cases


def pool_cases(ws: Workspace) -> list[Case]:
    cases = []
    for field, v in [
        ("max_adapters", 0),
        ("max_adapters", -1),
        ("max_adapters", 1.5),
        ("max_adapters", True),
        ("memory_budget_bytes", NAN),
        ("memory_budget_bytes", INF),
        ("memory_budget_bytes", 0),
        ("memory_budget_bytes", -1),
        ("memory_budget_bytes", "1GB"),
        ("dtype", torch.int8),
        ("backend", "cuda"),
    ]:
        cases.append(
            Case(
                f"AdapterPool {field}={v!r}",
                lambda f=field, v=v: slora.AdapterPool(Toy(), **{f: v}),
                (field,),
            )
        )
    cases += [
        Case(
            "AdapterPool target_modules=['nope']",
            lambda: slora.AdapterPool(Toy(), ["nope"]),
            ("nope",),
        ),
        Case(
            "AdapterPool target_modules=['q_proj(']",
            lambda: slora.AdapterPool(Toy(), ["q_proj("]),
            ("q_proj(", "regular expression"),
        ),
        Case("AdapterPool model='x'", lambda: slora.AdapterPool("x"), ("model",)),
    ]
    holder: dict[str, Any] = {}

    def pool_with(names=("ok",), max_adapters=16, budget=None):
        def make():
            m = Toy()
            holder["model"] = m
            holder["pool"] = slora.AdapterPool(
                m, max_adapters=max_adapters, memory_budget_bytes=budget, backend="torch"
            )
            for n in names:
                holder["pool"].load(n, ws.good)
            return holder["pool"]

        return make

    def use_and_run(names, x):
        def run():
            with holder["pool"].use(names):
                holder["model"](x)

        return run

    def unload_in_use():
        with holder["pool"].use("ok"):
            holder["pool"].unload("ok")

    def closed_pool():
        pool = pool_with()()
        pool.close()
        return pool

    cases += [
        Case("pool.load name=''", lambda: holder["pool"].load("", ws.good), ("name",), pool_with()),
        Case(
            "pool.load name=None",
            lambda: holder["pool"].load(None, ws.good),
            ("name",),
            pool_with(),
        ),
        Case("pool.load name=5", lambda: holder["pool"].load(5, ws.good), ("name",), pool_with()),
        Case(
            "pool.load duplicate",
            lambda: holder["pool"].load("ok", ws.good),
            ("already loaded",),
            pool_with(),
        ),
        Case(
            "pool.load over budget",
            lambda: holder["pool"].load("b", ws.good),
            ("memory_budget_bytes",),
            pool_with(names=(), budget=16),
        ),
        Case("pool.use unknown", use_and_run("nope", ids()), ("nope", "not loaded"), pool_with()),
        Case("pool.use []", use_and_run([], ids()), ("use",), pool_with()),
        Case("pool.use [5]", use_and_run([5], ids(1)), ("names",), pool_with()),
        Case(
            "pool.use 2 names, 3 sequences",
            use_and_run(["ok", None], ids(3)),
            ("sequences", "names"),
            pool_with(),
        ),
        Case("pool.unload unknown", lambda: holder["pool"].unload("nope"), ("nope",), pool_with()),
        Case("pool.unload in use", unload_in_use, ("in use",), pool_with()),
        Case(
            "pool.memory_bytes unknown",
            lambda: holder["pool"].memory_bytes("nope"),
            ("nope",),
            pool_with(),
        ),
        Case(
            "pool.load after close",
            lambda: holder["pool"].load("b", ws.good),
            ("closed",),
            closed_pool,
        ),
    ]

    def second_pool():
        m = Toy()
        slora.AdapterPool(m)
        slora.AdapterPool(m)

    def patched_pool():
        m = Toy()
        slora.AdapterPool(slora.patch(m, plan(m)))

    cases += [
        Case("second AdapterPool on a model", second_pool, ("already has an AdapterPool",)),
        Case("AdapterPool on a patched model", patched_pool, ("LoRA",)),
    ]
    return cases


def json_cases(ws: Workspace) -> list[Case]:
    def report_with(edit):
        def run():
            data = _report().to_dict()
            edit(data)
            path = ws.root / f"report{ws.count}.json"
            ws.count += 1
            path.write_text(data if isinstance(data, str) else json.dumps(data))
            slora.SensitivityReport.from_json(path)

        return run

    def plan_with(text):
        def run():
            path = ws.root / f"plan{ws.count}.json"
            ws.count += 1
            path.write_text(text if isinstance(text, str) else json.dumps(text))
            slora.RankPlan.from_json(path)

        return run

    def mod(key, value):
        return lambda d: d["modules"]["b"].update({key: value})

    def not_json():
        path = ws.root / "broken.json"
        path.write_text('{"estimator": ')
        slora.SensitivityReport.from_json(path)

    cases = [
        *[
            Case(f"report {k}={v!r}", report_with(mod(k, v)), (k, "'b'"))
            for k, v in [
                ("score", NAN),
                ("score", -1.0),
                ("global", INF),
                ("d_in", "8"),
                ("d_out", -3),
                ("d_in", 0),
                ("effrank", 2.5),
                ("topk", None),
                ("local", "x"),
            ]
        ],
        Case(
            "report module missing a field",
            report_with(lambda d: d["modules"]["b"].pop("topk")),
            ("'b'", "topk"),
        ),
        Case(
            "report num_tokens=-1", report_with(lambda d: d.update(num_tokens=-1)), ("num_tokens",)
        ),
        Case("report estimator=5", report_with(lambda d: d.update(estimator=5)), ("estimator",)),
        Case("report no modules", report_with(lambda d: d.pop("modules")), ("SensitivityReport",)),
        Case("report not JSON", not_json, ("broken.json", "JSON")),
        Case(
            "report missing file",
            lambda: slora.SensitivityReport.from_json(ws.root / "none.json"),
            ("none.json",),
        ),
        Case("plan rank -1", plan_with({"ranks": {"a": -1}}), ("rank of 'a'",)),
        Case("plan rank 'x'", plan_with({"ranks": {"a": "x"}}), ("rank of 'a'",)),
        Case(
            "plan dims [0, 4]",
            plan_with({"ranks": {"a": 2}, "dims": {"a": [0, 4]}}),
            ("dims of 'a'",),
        ),
        Case("plan dims 'x'", plan_with({"ranks": {"a": 2}, "dims": {"a": "x"}}), ("dims of 'a'",)),
        Case("plan avg_rank NaN", plan_with({"ranks": {"a": 2}, "avg_rank": NAN}), ("avg_rank",)),
        Case("plan budget 'x'", plan_with({"ranks": {"a": 2}, "budget": "x"}), ("budget",)),
        Case("plan no ranks", plan_with({"dims": {}}), ("ranks",)),
        Case("plan not JSON", plan_with("[1,"), ("JSON",)),
    ]
    return cases


def cli_cases() -> list[Case]:
    from slora.cli import main

    table = [
        (["analyze", "--batches", "-3"], "--batches"),
        (["analyze", "--batches", "0"], "--batches"),
        (["analyze", "--batches", "x"], "--batches"),
        (["analyze", "--avg-rank", "nan"], "--avg-rank"),
        (["analyze", "--avg-rank", "-1"], "--avg-rank"),
        (["analyze", "--avg-rank", "inf"], "--avg-rank"),
        (["analyze", "--batch-size", "2.5"], "--batch-size"),
        (["analyze", "--max-length", "0"], "--max-length"),
        (["analyze", "--estimator", "x"], "--estimator"),
        (["analyze", "--budget", "x"], "--budget"),
        (["demo", "--seeds", "0"], "--seeds"),
        (["demo", "--lr", "inf"], "--lr"),
        (["demo", "--lr", "0"], "--lr"),
        (["demo", "--lrs", "1e-3,,2e-3"], "--lrs"),
        (["demo", "--lrs", "1e-3,x"], "--lrs"),
        (["demo", "--threads", "-1"], "--threads"),
        (["demo", "--calib-head-epochs", "-1"], "--calib-head-epochs"),
        (["frobnicate"], "frobnicate"),
        (["bench", "--threads", "0"], "--threads"),
        (["bench", "--min-time", "-1"], "--min-time"),
        (["bench", "--bandwidth", "nan"], "--bandwidth"),
        (["bench", "--device", "tpu"], "--device"),
    ]
    return [Case("slora " + " ".join(a), lambda a=a: main(a), (o,)) for a, o in table]


def kernel_cases() -> list[Case]:
    g = torch.Generator().manual_seed(0)
    A, B = torch.randn(2, 8, generator=g), torch.randn(6, 2, generator=g)

    def packed(scale=1.0):
        return PackedAdapters.from_list([(A, B, scale), None])

    x = torch.randn(4, 8, generator=g)
    slots = torch.tensor([0, -1, 1, 0])
    p = packed()
    bad_scale = lambda s: lambda: ops.multi_lora(x, slots, packed(s), backend="torch")
    return [
        Case(
            "multi_lora slot out of range",
            lambda: ops.multi_lora(x, torch.tensor([0, 2, 0, 0]), p, backend="torch"),
            ("slot",),
        ),
        Case(
            "multi_lora token_slots wrong length",
            lambda: ops.multi_lora(x, torch.tensor([0, 1]), p, backend="torch"),
            ("token_slots",),
        ),
        Case(
            "multi_lora x wrong width",
            lambda: ops.multi_lora(torch.randn(4, 5), slots, p, backend="torch"),
            ("x", "8"),
        ),
        Case(
            "multi_lora x fp16",
            lambda: ops.multi_lora(x.half(), slots, p, backend="torch"),
            ("dtype",),
        ),
        Case(
            "multi_lora segments do not cover x",
            lambda: ops.multi_lora(
                x,
                None,
                p,
                seg_indptr=torch.tensor([0, 2]),
                seg_slots=torch.tensor([0]),
                backend="torch",
            ),
            ("seg_indptr",),
        ),
        Case(
            "multi_lora slots and segments",
            lambda: ops.multi_lora(
                x,
                slots,
                p,
                seg_indptr=torch.tensor([0, 4]),
                seg_slots=torch.tensor([0]),
                backend="torch",
            ),
            ("not both",),
        ),
        Case(
            "multi_lora out wrong shape",
            lambda: ops.multi_lora(x, slots, p, out=torch.zeros(4, 5), backend="torch"),
            ("out",),
        ),
        Case(
            "multi_lora backend='x'", lambda: ops.multi_lora(x, slots, p, backend="x"), ("backend",)
        ),
        *[Case(f"PackedAdapters scale={v}", bad_scale(v), ("scale",)) for v in (NAN, INF)],
        Case("PackedAdapters d_in=0", lambda: PackedAdapters(0, 4, max_slots=2), ("d_in",)),
        Case(
            "PackedAdapters max_slots=0", lambda: PackedAdapters(8, 4, max_slots=0), ("max_slots",)
        ),
        Case(
            "PackedAdapters dtype=int",
            lambda: PackedAdapters(8, 4, max_slots=1, dtype=torch.int32),
            ("dtype",),
        ),
        Case(
            "PackedAdapters.load A wrong width",
            lambda: packed().load(1, (torch.ones(2, 5), torch.ones(6, 2), 1.0)),
            ("A",),
        ),
        Case(
            "PackedAdapters.load B wrong rank",
            lambda: packed().load(1, (A, torch.ones(6, 3), 1.0)),
            ("B",),
        ),
        Case("PackedAdapters.load slot 9", lambda: packed().load(9, (A, B, 1.0)), ("slot",)),
        Case(
            "lora_slices mismatched lists", lambda: ops.lora_slices(x, [A], [B, B], [1.0]), ("As",)
        ),
        Case("lora_slices scale NaN", lambda: ops.lora_slices(x, [A], [B], [NAN]), ("scale",)),
    ]


def all_cases(ws: Workspace) -> list[Case]:
    return (
        allocate_cases()
        + analyze_cases()
        + patch_cases()
        + adapter_file_cases(ws)
        + pool_cases(ws)
        + json_cases(ws)
        + cli_cases()
        + kernel_cases()
    )


def run_probe() -> tuple[Counter, list[tuple[str, str, str]]]:
    ws = Workspace()
    try:
        results = [(c.name, *classify(c)) for c in all_cases(ws)]
    finally:
        ws.close()
    return Counter(kind for _, kind, _ in results), results


def report(counts: Counter, results: list[tuple[str, str, str]]) -> str:
    lines = [
        f"probe: {sum(counts.values())} bad inputs: "
        + ", ".join(
            f"{k} {counts.get(k, 0)}" for k in ("clear", "unclear", "silent", "half-modified")
        )
    ]
    lines += [f"  {kind:13s} {name}: {msg[:160]}" for name, kind, msg in results if kind != "clear"]
    return "\n".join(lines)


_WORKSPACE: list[Workspace] = []


def _cases() -> list[Case]:
    """Every case, built at collection time on one workspace removed when the process ends."""
    ws = Workspace()
    atexit.register(ws.close)
    _WORKSPACE.append(ws)
    return all_cases(ws)


CASES = _cases()


def test_probe_covers_every_area():
    assert len(CASES) >= 250


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input(case: Case):
    kind, message = classify(case)
    assert kind == case.expect, f"{case.name}: {kind}, expected {case.expect} ({message})"


if __name__ == "__main__":
    print(report(*run_probe()))
