"""slora's vLLM punica wrapper without vLLM: the mixin on a stand-in for vLLM's wrapper, on
layers holding vLLM's padded slot buffers, against a float64 reference of vLLM's semantics
(``y[:, slice s] += B_pad[s][k] (A_pad[s][k] x)`` for token slot k, nothing for −1).

Runs on the CPU (the C++ op) and, when present, on CUDA (the Triton kernels) — the GPU
check script runs this file.  The engine itself is tested in tests/test_vllm.py.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from conftest import assert_close
from vllm_scenarios import padded_reference

from slora import ops
from slora.integrations import vllm as plugin
from slora.integrations.vllm import manager
from slora.integrations.vllm.storage import LayerAdapters, effective_rank, rank_hint
from slora.integrations.vllm.wrapper import SloraWrapperMixin

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]  # the GPU script runs -m cuda


class StockWrapper:
    """Stand-in for vLLM's wrapper: per-token slots from the mapping; counts stock calls."""

    def __init__(self) -> None:
        self.token_lora_indices = torch.empty(0, dtype=torch.long)
        self.stock_calls = 0

    def update_metadata(self, mapping, lora_index_to_id, max_loras, vocab_size, **kwargs):
        self.token_lora_indices = mapping

    def add_lora_linear(self, y, x, a, b, scale, output_slices, *, buffer=None, **kwargs):
        self.stock_calls += 1

    def add_lora_embedding(self, y, x, lora_b_stacked, add_inputs=True, **kwargs):
        self.stock_calls += 1
        return y

    def add_lora_logits(self, y, x, lora_a_stacked, lora_b_stacked, scale, *, buffer=None,
                        **kwargs):  # fmt: skip
        self.stock_calls += 1
        return y


class Wrapper(SloraWrapperMixin, StockWrapper):
    def __init__(self, max_tokens: int, device: str, max_loras: int) -> None:
        StockWrapper.__init__(self)
        self._slora_setup(max_tokens, device, SimpleNamespace(max_loras=max_loras))


class Layer:
    """vLLM's padded slot buffers of one LoRA linear layer (scale folded into B)."""

    def __init__(self, d_in, sizes, max_loras, pad_rank, dtype, device) -> None:
        self.output_slices = tuple(sizes)
        self.lora_a_stacked = tuple(
            torch.zeros(max_loras, 1, pad_rank, d_in, dtype=dtype, device=device) for _ in sizes
        )
        self.lora_b_stacked = tuple(
            torch.zeros(max_loras, 1, d, pad_rank, dtype=dtype, device=device) for d in sizes
        )

    def set_lora(self, slot: int, ranks: list[int], gen: torch.Generator) -> None:
        """What vLLM's set_lora does: zero the slot, copy each slice into its first rows."""
        for a, b, r in zip(self.lora_a_stacked, self.lora_b_stacked, ranks):
            a[slot].zero_()
            b[slot].zero_()
            if r:
                a[slot, 0, :r] = torch.randn(r, a.shape[-1], generator=gen).to(a)
                b[slot, 0, :, :r] = (torch.randn(b.shape[2], r, generator=gen) * 0.3).to(b)

    def reference(self, x: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        return padded_reference(self.lora_a_stacked, self.lora_b_stacked, x, slots)


def _setup(device, dtype, sizes=(24, 8, 8), d_in=40, max_loras=4, pad_rank=16):
    gen = torch.Generator().manual_seed(0)
    wrapper = Wrapper(256, device, max_loras)
    layer = Layer(d_in, sizes, max_loras, pad_rank, dtype, device)
    wrapper.slora_register(layer)
    return wrapper, layer, gen


def _load(wrapper, layer, gen, slot, ranks):
    layer.set_lora(slot, ranks, gen)
    wrapper.slora_load(layer, slot, max(ranks))


def _run(wrapper, layer, slots, dtype, device, gen, **kwargs):
    x = torch.randn(slots.shape[0], layer.lora_a_stacked[0].shape[-1], generator=gen)
    x = x.to(dtype=dtype, device=device)
    y0 = torch.randn(slots.shape[0], sum(layer.output_slices), generator=gen).to(x)
    wrapper.update_metadata(slots.to(device), [], 0, 0)
    y = y0.clone()
    wrapper.add_lora_linear(y, x, layer.lora_a_stacked, layer.lora_b_stacked, 1.0,
                            layer.output_slices, **kwargs)  # fmt: skip
    return y0, y, layer.reference(x, slots.to(device))


def _check(y, expected, dtype):
    assert_close(y, expected, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_add_lora_linear_matches_padded_reference(device, dtype):
    wrapper, layer, gen = _setup(device, dtype)
    _load(wrapper, layer, gen, 0, [3, 0, 5])  # a slice without this adapter (rank 0)
    _load(wrapper, layer, gen, 1, [16, 16, 16])  # the padded rank itself
    _load(wrapper, layer, gen, 2, [1, 7, 2])  # slot 3 stays empty
    for T in (1, 37, 130):  # one decode token; odd sizes; a chunked-prefill step
        slots = torch.randint(-1, 4, (T,), generator=gen)
        y0, y, delta = _run(wrapper, layer, slots, dtype, device, gen)
        _check(y, y0.double() + delta, dtype)
    assert wrapper.stock_calls == 0
    ranks = {tuple(r for r, *_ in layer_ranks) for layer_ranks in _stored(wrapper, layer)}
    assert ranks == {(3, 0, 5), (16, 16, 16), (1, 7, 2), (0, 0, 0)}


def _stored(wrapper, layer):
    store = wrapper.slora_storage(layer.lora_a_stacked)
    return [store.packed.host_meta(k) for k in range(store.packed.max_slots)]


@pytest.mark.parametrize("device", DEVICES)
def test_rows_past_rank_are_never_read(device):
    """NaN in every padded row / column past the adapter's rank (before the load and after
    it): outputs stay finite and equal the reference of the clean buffers.  Within the
    adapter's rank vLLM zero-fills a smaller slice's rows; the storage drops those too."""
    wrapper, layer, gen = _setup(device, torch.float32)
    layer.set_lora(0, [4, 2, 6], gen)
    slots = torch.tensor([0, -1, 0, 0, -1, 0, 0, 0, 0])
    x = torch.randn(9, 40, generator=gen).to(device)
    expected = layer.reference(x, slots.to(device))
    for a, b in zip(layer.lora_a_stacked, layer.lora_b_stacked):
        a[0, 0, 6:] = float("nan")
        b[0, 0, :, 6:] = float("nan")
    wrapper.slora_load(layer, 0, 6)
    for a, b in zip(layer.lora_a_stacked, layer.lora_b_stacked):
        a[0, 0, :] = float("nan")  # after the load, nothing of vLLM's buffers is read
        b[0, 0, :] = float("nan")
    y = torch.zeros(9, 40, device=device)
    wrapper.update_metadata(slots.to(device), [], 0, 0)
    wrapper.add_lora_linear(y, x, layer.lora_a_stacked, layer.lora_b_stacked, 1.0, (24, 8, 8))
    assert torch.isfinite(y).all()
    _check(y, expected, torch.float32)
    assert [[r for r, *_ in m] for m in _stored(wrapper, layer)][0] == [4, 2, 6]


@pytest.mark.parametrize("device", DEVICES)
def test_slot_churn_and_requests_without_adapter(device):
    """Adapters replaced in a slot (other ranks), a slot emptied: the next step sees the new
    contents; tokens with slot −1 get exactly the base output, even with every slot full."""
    wrapper, layer, gen = _setup(device, torch.float32, max_loras=2)
    _load(wrapper, layer, gen, 0, [8, 8, 8])
    _load(wrapper, layer, gen, 1, [2, 3, 4])
    slots = torch.tensor([-1, 0, 1, -1, 1, 0, -1])
    for ranks in ([5, 1, 16], [1, 1, 1], [0, 0, 0]):
        _load(wrapper, layer, gen, 1, ranks)
        y0, y, delta = _run(wrapper, layer, slots, torch.float32, device, gen)
        _check(y, y0.double() + delta, torch.float32)
        none = slots.to(device) < 0
        assert torch.equal(y[none], y0[none])
    assert _stored(wrapper, layer)[1] == [(0, 0, 0, 0.0)] * 3


def test_effective_rank_drops_dead_components():
    A = torch.randn(6, 5)
    B = torch.randn(4, 6)
    A[5] = 0  # component 5: A row zero
    B[:, 4] = 0  # component 4: B column zero
    assert effective_rank(A, B) == 4
    B[:, 1] = 0  # an inner dead component stays (the trim is exact only at the tail)
    assert effective_rank(A, B) == 4
    assert effective_rank(torch.zeros(3, 5), B[:, :3]) == 0
    assert effective_rank(torch.randn(3, 5), torch.randn(4, 3)) == 3  # last component live
    assert effective_rank(torch.zeros(0, 5), torch.zeros(4, 0)) == 0
    A, B = torch.randn(3, 5), torch.randn(4, 3)
    B[:, 2] = 0  # last component dead in B only
    assert effective_rank(A.bfloat16(), B.bfloat16()) == 2


def test_rank_hint_reads_vllm_weights():
    one = SimpleNamespace(lora_a=torch.zeros(7, 3))
    packed = SimpleNamespace(lora_a=[torch.zeros(2, 3), None, torch.zeros(9, 3)])
    assert (rank_hint(one), rank_hint(packed), rank_hint(None)) == (7, 9, 0)


def test_unsupported_calls_run_vllms_kernels():
    """Another scale, a caller's buffer, another dtype, a layer slora does not mirror (fully
    sharded: A's rank dimension differs from B's): vLLM's own add_lora_linear runs."""
    wrapper, layer, gen = _setup("cpu", torch.float32)
    _load(wrapper, layer, gen, 0, [2, 2, 2])
    slots = torch.zeros(3, dtype=torch.long)
    x = torch.randn(3, 40)
    y = torch.zeros(3, 40)
    wrapper.update_metadata(slots, [], 0, 0)
    args = (layer.lora_a_stacked, layer.lora_b_stacked)
    wrapper.add_lora_linear(y, x, *args, 0.5, (24, 8, 8))
    wrapper.add_lora_linear(y, x, *args, 1.0, (24, 8, 8), buffer=torch.zeros(3, 3, 16))
    wrapper.add_lora_linear(y, x.double(), *args, 1.0, (24, 8, 8))
    sharded = Layer(40, (8,), 4, 16, torch.float32, "cpu")
    sharded.lora_a_stacked = (torch.zeros(4, 1, 8, 40),)  # rank sharded over 2 ranks
    wrapper.slora_register(sharded)
    wrapper.add_lora_linear(y[:, :8], x, sharded.lora_a_stacked, sharded.lora_b_stacked, 1.0,
                            (8,))  # fmt: skip
    assert wrapper.stock_calls == 4
    assert torch.equal(y, torch.zeros(3, 40))


class Manager:
    """The part of vLLM's ``LoRAModelManager`` state that slora's hooks read: modules, the
    slot table, registered adapters (here: module name -> weights with ``lora_a``)."""

    def __init__(self, modules: dict, slots: int) -> None:
        self.modules = modules
        self.lora_index_to_id: list[int | None] = [None] * slots
        self._registered_adapters: dict[int, dict] = {}

    def _get_lora_layer_weights(self, lora_model: dict, name: str):
        return lora_model.get(name)

    def activate(self, lora_id: int, weights: dict) -> None:
        """What ``activate_adapter`` does to the state, then slora's hook."""
        self._registered_adapters[lora_id] = weights
        self.lora_index_to_id[self.lora_index_to_id.index(None)] = lora_id
        manager.sync_slot(self, lora_id)

    def deactivate(self, lora_id: int) -> None:
        """What ``_deactivate_adapter`` does to the state, then slora's hook."""
        slot = self.lora_index_to_id.index(lora_id)
        self.lora_index_to_id[slot] = None
        manager.clear_slots(self, [slot])


def test_embedding_and_logits_lora_skipped_while_no_slot_has_weights():
    """vLLM's logits / embedding LoRA layers (one stacked tensor each) add exact zeros until
    an adapter with lm_head / embed_tokens weights is active: skipped until then (a fresh
    engine), vLLM's path while such an adapter holds a slot, skipped again once it is
    deactivated or every adapter removed; layers never registered, and traced calls, always
    run vLLM's path."""
    wrapper = Wrapper(16, "cpu", 4)
    logits = SimpleNamespace(
        lora_a_stacked=torch.zeros(4, 1, 8, 12),
        lora_b_stacked=torch.zeros(4, 1, 50, 8),
        punica_wrapper=wrapper,
    )
    embed = SimpleNamespace(
        lora_a_stacked=torch.zeros(4, 50, 8),
        lora_b_stacked=torch.zeros(4, 1, 12, 8),
        punica_wrapper=wrapper,
    )
    mgr = Manager({"lm_head": logits, "embed_tokens": embed}, 4)
    manager.register_layers(mgr)
    y, x = torch.randn(3, 50), torch.randn(3, 12)
    y0 = y.clone()

    def calls() -> int:
        before = wrapper.stock_calls
        assert wrapper.add_lora_logits(y, x, logits.lora_a_stacked, logits.lora_b_stacked,
                                       1.0) is y  # fmt: skip
        wrapper.add_lora_embedding(torch.zeros(3, 12), torch.zeros(3, 8), embed.lora_b_stacked)
        return wrapper.stock_calls - before

    with_head = {"lm_head": SimpleNamespace(lora_a=torch.ones(8, 12))}
    assert calls() == 0 and torch.equal(y, y0)
    mgr.activate(5, {})  # an adapter without lm_head / embed_tokens weights
    assert calls() == 0
    mgr.activate(7, with_head)  # one with lm_head weights (and none for embed_tokens)
    assert calls() == 1
    mgr.deactivate(7)  # evicted: its slot is empty again
    assert calls() == 0
    mgr.activate(7, with_head)
    mgr.activate(8, {})
    assert calls() == 1
    mgr.lora_index_to_id = [None] * 4  # remove_all_adapters
    manager.clear_slots(mgr, [0, 1, 2, 3])
    assert calls() == 0
    unknown = torch.zeros(4, 1, 50, 8)
    wrapper.add_lora_logits(y, x, logits.lora_a_stacked, unknown, 1.0)
    assert wrapper.stock_calls == 3
    zeroed = torch.ones(3, 12)
    wrapper.add_lora_embedding(zeroed, torch.zeros(3, 8), embed.lora_b_stacked, add_inputs=False)
    assert torch.equal(zeroed, torch.zeros(3, 12))
    mgr.activate(7, with_head)
    manager.clear_slots(mgr, [])  # a hook that changes nothing keeps the marks
    traced = torch.compile(lambda t: wrapper.add_lora_logits(t, x, logits.lora_a_stacked,
                                                             logits.lora_b_stacked, 1.0),
                           backend="eager")  # fmt: skip
    mgr.deactivate(7)
    traced(y.clone())
    assert wrapper.stock_calls == 4


def test_deactivated_slot_is_dropped_from_the_store():
    """A slot vLLM empties is unloaded from the true-rank store (rank 0), the others kept."""
    wrapper, layer, gen = _setup("cpu", torch.float32)
    layer.punica_wrapper = wrapper
    mgr = Manager({"layer": layer}, 4)
    manager.register_layers(mgr)
    for lora_id, ranks in ((3, [2, 5, 1]), (4, [7, 0, 3])):
        slot = mgr.lora_index_to_id.index(None)
        layer.set_lora(slot, ranks, gen)
        mgr.activate(
            lora_id, {"layer": SimpleNamespace(lora_a=[torch.zeros(r, 40) for r in ranks])}
        )
    assert [[r for r, *_ in h] for h in _stored(wrapper, layer)][:2] == [[2, 5, 1], [7, 0, 3]]
    mgr.deactivate(3)
    assert [[r for r, *_ in h] for h in _stored(wrapper, layer)][:2] == [[0, 0, 0], [7, 0, 3]]
    slots = torch.tensor([1, 0, -1, 1])  # a token of the emptied slot would read nothing
    y0, y, delta = _run(wrapper, layer, slots, torch.float32, "cpu", gen)
    _check(y[[0, 2, 3]], (y0.double() + delta)[[0, 2, 3]], torch.float32)
    torch.testing.assert_close(y[1], y0[1])


def test_add_inputs_false_writes_the_delta():
    wrapper, layer, gen = _setup("cpu", torch.float32)
    _load(wrapper, layer, gen, 2, [4, 4, 4])
    slots = torch.tensor([2, -1, 2, 2])
    _, y, delta = _run(wrapper, layer, slots, torch.float32, "cpu", gen, add_inputs=False)
    _check(y, delta, torch.float32)


def test_metadata_built_once_per_step(monkeypatch):
    wrapper, layer, gen = _setup("cpu", torch.float32)
    _load(wrapper, layer, gen, 0, [3, 3, 3])
    calls = []
    build = ops.build_token_meta
    monkeypatch.setattr(ops, "build_token_meta", lambda *a, **k: calls.append(1) or build(*a, **k))
    slots = torch.tensor([0, -1, 0])
    wrapper.update_metadata(slots, [], 0, 0)
    x, y = torch.randn(3, 40), torch.zeros(3, 40)
    for _ in range(4):  # four layers of one step
        wrapper.add_lora_linear(y, x, layer.lora_a_stacked, layer.lora_b_stacked, 1.0,
                                (24, 8, 8))  # fmt: skip
    assert len(calls) == 1


def test_too_many_tokens_is_a_clear_error():
    wrapper, layer, gen = _setup("cpu", torch.float32)
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        wrapper.update_metadata(torch.zeros(300, dtype=torch.long), [], 0, 0)


@pytest.mark.parametrize("device", DEVICES)
def test_add_lora_linear_traces_with_fullgraph(device):
    """The hot path compiles without graph breaks (vLLM compiles the model on CUDA) and
    gives the eager result; the step's metadata stays outside the graph."""
    wrapper, layer, gen = _setup(device, torch.float32)
    _load(wrapper, layer, gen, 1, [6, 2, 9])
    _load(wrapper, layer, gen, 3, [1, 1, 1])
    slots = torch.tensor([1, 3, -1, 1, 1, 3, 0])
    wrapper.update_metadata(slots.to(device), [], 0, 0)
    x = torch.randn(7, 40, generator=gen).to(device)

    def forward(x, y):
        wrapper.add_lora_linear(y, x, layer.lora_a_stacked, layer.lora_b_stacked, 1.0,
                                layer.output_slices)  # fmt: skip
        return y * 1.0

    torch._dynamo.reset()
    compiled = torch.compile(forward, fullgraph=True, backend="aot_eager")
    got = compiled(x, torch.zeros(7, 40, device=device))
    expected = forward(x, torch.zeros(7, 40, device=device))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_switch_off_leaves_vllm_alone(monkeypatch):
    off = ("0", "off", "No", "FALSE")
    on_ = ("1", "", "on", " yes ", "True")
    for value, on in [(v, False) for v in off] + [(v, True) for v in on_]:
        monkeypatch.setenv(plugin.ENV_SWITCH, value)
        assert plugin.enabled() is on
    monkeypatch.delenv(plugin.ENV_SWITCH)
    assert plugin.enabled() is True
    monkeypatch.setenv(plugin.ENV_SWITCH, "0")
    plugin.register()  # returns before importing vLLM (absent from this environment)


@pytest.mark.parametrize("value", ["O", "2", "disable", "of", "0 1"])
def test_switch_refuses_values_it_does_not_document(monkeypatch, value):
    """A typo must not leave the plugin silently on: the error names the variable."""
    monkeypatch.setenv(plugin.ENV_SWITCH, value)
    with pytest.raises(ValueError, match=f"SLORA_VLLM={value!r}.*0/false/off/no"):
        plugin.enabled()
    with pytest.raises(ValueError, match="SLORA_VLLM"):
        plugin.register()


def test_entry_point_is_declared():
    from pathlib import Path

    import tomllib

    meta = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    points = meta["project"]["entry-points"]["vllm.general_plugins"]
    assert points == {"slora": "slora.integrations.vllm:register"}
    assert "vllm" in meta["project"]["optional-dependencies"]


def test_layer_adapters_supports():
    layer = Layer(40, (24, 8), 4, 16, torch.float32, "cpu")
    assert LayerAdapters.supports(layer)
    assert not LayerAdapters.supports(SimpleNamespace(lora_a_stacked=torch.zeros(1)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_a", [True, False])
def test_gathered_lora_gives_slot_minus_one_nothing(dtype, with_a):
    """The CPU logits / embedding LoRA: per-token slot k adds ``B_k (s A_k x)`` (``x B_kᵀ``
    without A), slot −1 nothing — vLLM's own gather indexes −1 as the last slot — and columns
    past the adapter's width (vocabulary padding) stay as they were."""
    from slora.integrations.vllm.wrapper import gathered_lora

    gen = torch.Generator().manual_seed(5)
    slots_n, r, d_in, vocab, pad = 3, 4, 12, 50, 6
    A = torch.randn(slots_n, 1, r, d_in, generator=gen).to(dtype)
    B = torch.randn(slots_n, 1, vocab, r, generator=gen).to(dtype)
    slots = torch.tensor([2, -1, 0, -1, 1, 2])
    x = torch.randn(6, d_in if with_a else r, generator=gen).to(dtype)
    y0 = torch.randn(6, vocab + pad, generator=gen).to(dtype)
    y = y0.clone()
    gathered_lora(y, x, B, slots, True, A if with_a else None, 0.5)
    expected = y0.double().clone()
    for t, k in enumerate(slots.tolist()):
        if k < 0:
            continue
        h = 0.5 * (A[k, 0].double() @ x[t].double()) if with_a else x[t].double()
        expected[t, :vocab] += B[k, 0].double() @ h
    _check(y, expected, dtype)
    assert torch.equal(y[[1, 3]], y0[[1, 3]]) and torch.equal(y[:, vocab:], y0[:, vocab:])
    replaced = torch.full_like(y0, float("nan"))
    gathered_lora(replaced, x, B, slots, False, A if with_a else None, 0.5)
    _check(replaced[:, :vocab], (expected - y0.double())[:, :vocab], dtype)
