"""multi_lora's packed storage under a server's life: fixed-region stores whose buffers never
move whatever is loaded (CUDA graphs replay addresses), and every adapter operation inside and
outside ``torch.inference_mode()`` (a server warms up in inference mode and loads adapters at
run time outside it).  Results are checked against a float64 reference of what is loaded."""

from __future__ import annotations

import random

import oracles
import pytest
import torch
import toy
from conftest import BACKENDS, assert_close, generator

import slora
from slora import ops


def _adapter(gen: torch.Generator, d_in: int, sizes: list[int], ranks: list[int], dtype):
    """One adapter: ``(A [r, d_in], B [d_s, r], scale)`` per slice (r = 0: empty tensors)."""
    return [
        (
            torch.randn(r, d_in, generator=gen).to(dtype),
            (torch.randn(d, r, generator=gen) * 0.3).to(dtype),
            0.5 + s,
        )
        for s, (d, r) in enumerate(zip(sizes, ranks))
    ]


def _reference(loaded: dict, x: torch.Tensor, slots: torch.Tensor, sizes: list[int]):
    """float64 oracle of what is loaded (an unloaded slot adds nothing)."""
    adapters = [loaded.get(k) for k in range(int(slots.max()) + 1)] if slots.numel() else []
    return oracles.multi_lora(x, slots, adapters, sizes)


def _poisoned(rows: int, cols: int) -> torch.Tensor:
    """An output to add into whose unwritten elements would show: zeros after NaN."""
    out = torch.full((rows, cols), float("nan"))
    return out.zero_()


def _pointers(packed: ops.PackedAdapters) -> list[int]:
    return [
        t.data_ptr()
        for t in (
            packed.A,
            packed.Bt,
            packed.ranks,
            packed.a_offsets,
            packed.b_offsets,
            packed.scales,
        )  # fmt: skip
    ]


@pytest.mark.parametrize("backend", BACKENDS)
def test_fixed_regions_never_move(backend):
    """Random loads and unloads at ranks ≤ slot_rows, into any slot, replacing what was
    there: A, Bᵀ and the metadata keep their addresses, and every result is right."""
    d_in, sizes, slots_n, R = 24, [16, 8, 8], 5, 12
    packed = ops.PackedAdapters(d_in, sizes, max_slots=slots_n, slot_rows=R)
    before = _pointers(packed)
    rng, gen = random.Random(0), generator("fixed regions")
    loaded: dict[int, list] = {}
    for step in range(120):
        slot = rng.randrange(slots_n)
        if rng.random() < 0.25:
            packed.unload(slot)
            loaded.pop(slot, None)
        else:
            ranks = [rng.choice([0, 1, 3, R]) for _ in sizes]
            adapter = _adapter(gen, d_in, sizes, ranks, torch.float32)
            packed.load(slot, adapter)
            loaded[slot] = adapter
        assert _pointers(packed) == before, f"a buffer moved at step {step}"
        if step % 15 == 14:
            x = torch.randn(11, d_in, generator=gen)
            token_slots = torch.randint(-1, slots_n, (11,), generator=gen)
            out = _poisoned(11, sum(sizes))
            ops.multi_lora(x, token_slots, packed, out=out, backend=backend)
            assert_close(out, _reference(loaded, x, token_slots, sizes), what=f"step {step}")


def test_first_fit_store_can_move_and_fixed_store_cannot():
    """The sequence that fragments first fit (slot 0 at rank 4, slot 1 at rank 16 in a 32-row
    store, slot 0 reloaded at rank 16) reallocates a packed store; a fixed-region store of the
    same capacity keeps its buffers."""
    gen = generator("first fit")
    first_fit = ops.PackedAdapters(8, 6, max_slots=2, capacity_rows=32, capacity_b=32 * 6)
    fixed = ops.PackedAdapters(8, 6, max_slots=2, slot_rows=16)
    assert fixed.A.shape[0] == 32 and fixed.Bt.shape[0] == 32 * 6
    moved = {}
    for name, packed in (("first_fit", first_fit), ("fixed", fixed)):
        start = _pointers(packed)
        for slot, r in ((0, 4), (1, 16), (0, 16)):
            packed.load(slot, _adapter(gen, 8, [6], [r], torch.float32))
        moved[name] = _pointers(packed) != start
    assert moved == {"first_fit": True, "fixed": False}


def test_rank_above_slot_rows_is_refused_and_keeps_the_old_adapter():
    gen = generator("rank above slot_rows")
    packed = ops.PackedAdapters(8, [6, 4], max_slots=2, slot_rows=4)
    old = _adapter(gen, 8, [6, 4], [3, 2], torch.float32)
    packed.load(1, old)
    with pytest.raises(ValueError, match=r"slot 1 slice 0: rank 5 exceeds the 4 rows .*slot_rows"):
        packed.load(1, _adapter(gen, 8, [6, 4], [5, 1], torch.float32))
    assert [r for r, *_ in packed.host_meta(1)] == [3, 2]
    x, slots = torch.randn(3, 8, generator=gen), torch.tensor([1, -1, 1])
    assert_close(ops.multi_lora(x, slots, packed), _reference({1: old}, x, slots, [6, 4]))
    with pytest.raises(ValueError, match="slot_rows"):
        ops.PackedAdapters(8, 6, max_slots=2, slot_rows=4, capacity_rows=8)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("made_in", ["inference", "normal"])
@pytest.mark.parametrize("slot_rows", [0, 8])
def test_every_operation_in_and_out_of_inference_mode(backend, made_in, slot_rows):
    """A store made in one mode is loaded, served and unloaded in both, from inference tensors
    and ordinary ones (the server that died: made during warm-up, loaded by a request)."""
    gen = generator(f"inference mode {made_in} {slot_rows}")
    d_in, sizes = 16, [12, 4]
    inference = torch.inference_mode()
    with inference if made_in == "inference" else torch.no_grad():
        packed = ops.PackedAdapters(d_in, sizes, max_slots=3, slot_rows=slot_rows)
    assert not packed.A.is_inference() and not packed.ranks.is_inference()
    loaded: dict[int, list] = {}
    for i, mode in enumerate(["normal", "inference", "normal", "inference", "normal"]):
        slot = i % 3
        with torch.inference_mode(mode == "inference"):
            adapter = _adapter(gen, d_in, sizes, [1 + i, 8 - i], torch.float32)
            packed.load(slot, adapter)  # inference tensors in inference mode
            loaded[slot] = adapter
            x = torch.randn(6, d_in, generator=gen)
            token_slots = torch.tensor([0, 1, 2, -1, slot, 0])
            y = _poisoned(6, sum(sizes))
            ops.multi_lora(x, token_slots, packed, out=y, backend=backend)
        assert_close(y, _reference(loaded, x, token_slots, sizes), what=f"call {i} ({mode})")
        with torch.inference_mode(mode != "inference"):
            packed.unload((slot + 1) % 3)
            loaded.pop((slot + 1) % 3, None)


@pytest.mark.parametrize("mode", ["inference", "normal"])
def test_adapter_pool_loads_and_serves_in_and_out_of_inference_mode(tmp_path, mode):
    """AdapterPool.load / use / unload with the pool made in the other mode than the calls."""
    model = toy.Toy()
    patched = slora.patch(toy.Toy(), toy.plan(toy.Toy(), rank=3))
    toy.randomize_lora(patched)
    slora.save_adapter(patched, tmp_path / "a")
    other = "normal" if mode == "inference" else "inference"
    with torch.inference_mode(other == "inference"):
        pool = slora.AdapterPool(model)
    ids = toy.ids()
    with torch.inference_mode(mode == "inference"):
        pool.load("a", tmp_path / "a")
        with pool.use(["a", None, "a"]):
            got = model(ids)
        pool.unload("a")
        pool.load("a", tmp_path / "a")  # reload after unload: the request that killed vLLM
        with pool.use([None, "a", None]):
            got2 = model(ids)
    with torch.no_grad():
        want = patched(ids)
        base = toy.Toy()(ids)
    torch.testing.assert_close(got[[0, 2]], want[[0, 2]], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1], base[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got2[1], want[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got2[[0, 2]], base[[0, 2]], rtol=1e-5, atol=1e-5)
