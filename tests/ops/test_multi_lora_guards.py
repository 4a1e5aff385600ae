"""Metadata a CPU forgives and a GPU does not: each is refused on the host with a clear
ValueError (values known there: shapes, the store's reserved rank, the wrapper's step size),
or — where only the device knows the values (``validate=False``) — bounded inside the Triton
kernels, so that it gives no out-of-bounds access (rows past the batch keep a sentinel)."""

from __future__ import annotations

import oracles
import pytest
import torch
from conftest import BACKENDS, assert_close, generator, make_adapters

from slora import ops
from slora.integrations.vllm.wrapper import StandaloneWrapper
from slora.ops import PackedAdapters, multi_lora

DEVICES = [
    pytest.param("cpu", id="interp"),
    pytest.param("cuda", id="cuda", marks=pytest.mark.cuda),
]
SIZES, D_IN = [24, 8], 40


def _need(device: str) -> None:
    if device == "cpu" and "triton" not in BACKENDS:
        pytest.skip("the Triton interpreter runs only where CUDA is absent")


def _store(device: str, ranks=((6, 3), (2, 5))):  # noqa: ANN001
    adapters = make_adapters(list(ranks), D_IN, SIZES, seed="guards")
    return adapters, PackedAdapters.from_list(adapters, d_out=SIZES, device=device)


def _padded(T: int, extra: int, device: str):  # noqa: ANN001
    """x and out as the first T rows of taller buffers; out's extra rows hold 7."""
    g = generator(f"guards{T}")
    x_buf = torch.randn(T + extra, D_IN, generator=g)
    out_buf = torch.full((T + extra, sum(SIZES)), 7.0)
    out_buf[:T] = 0.0
    return x_buf, x_buf.to(device)[:T], out_buf.to(device)


@pytest.mark.parametrize("device", DEVICES)
def test_segments_past_the_batch_stay_inside_it(device):
    """Unvalidated segments covering more tokens than x has: rows past x are neither read nor
    written (earlier: read and written out of bounds)."""
    _need(device)
    adapters, packed = _store(device)
    T = 10
    x_buf, x, out_buf = _padded(T, 6, device)
    meta = ops.build_segment_meta(torch.tensor([0, 4, 16], device=device),
                                  torch.tensor([1, 0], device=device), T, 2,
                                  validate=False)  # fmt: skip
    multi_lora(x, None, packed, meta=meta, out=out_buf[:T], backend="triton")
    got = out_buf.cpu()
    assert (got[T:] == 7.0).all(), "rows past the batch were written"
    slots = torch.tensor([1] * 4 + [0] * 6)
    assert_close(got[:T], oracles.multi_lora(x_buf[:T], slots, adapters, SIZES), torch.float32)


@pytest.mark.parametrize("device", DEVICES)
def test_group_slot_past_the_store_is_ignored(device):
    """An unvalidated segment slot ≥ the store's slot count adds nothing (earlier: ranks and
    offsets read past the store's metadata)."""
    _need(device)
    adapters, packed = _store(device)
    T = 8
    x_buf, x, out_buf = _padded(T, 0, device)
    meta = ops.build_segment_meta(torch.tensor([0, 3, 8], device=device),
                                  torch.tensor([5, 1], device=device), T, 2,
                                  validate=False)  # fmt: skip
    multi_lora(x, None, packed, meta=meta, out=out_buf, backend="triton")
    slots = torch.tensor([-1] * 3 + [1] * 5)
    assert_close(out_buf.cpu(), oracles.multi_lora(x_buf, slots, adapters, SIZES), torch.float32)


@pytest.mark.parametrize("device", DEVICES)
def test_rank_above_r_max_is_cut_not_overrun(device):
    """Weights whose ``max_rank`` (the intermediate's width, e.g. captured in a CUDA graph)
    is below a loaded rank: the expand reads at most ``max_rank`` columns of its own slice
    (earlier: the next slice's or token's columns, or past the buffer)."""
    _need(device)
    adapters, packed = _store(device)
    T = 9
    x_buf, x, out_buf = _padded(T, 0, device)
    slots = torch.tensor([0, 1, 0, 0, 1, -1, 1, 0, 0])
    meta = ops.build_token_meta(slots.to(device), 2)
    w = packed.weights()._replace(max_rank=4)
    ops.resolve_backend(device, "triton")
    from slora.kernels.multi_lora.triton_backend import multi_lora_triton

    multi_lora_triton(x, w, meta, out_buf)
    cut = [[(A[:4], B[:, :4], s) for A, B, s in a] for a in adapters]
    assert_close(out_buf.cpu(), oracles.multi_lora(x_buf, slots, cut, SIZES), torch.float32)


def test_reserved_rank_limit_refuses_larger_adapters():
    adapters, packed = _store("cpu")
    with pytest.raises(ValueError, match="rank 6 is loaded, above 4"):
        packed.reserve_rank(4, limit=True)
    packed.reserve_rank(8, limit=True)
    before = packed.A.clone(), packed.ranks.clone()
    big = make_adapters([(9, 1)], D_IN, SIZES, seed="big")[0]
    with pytest.raises(ValueError, match="rank 9 exceeds the reserved rank 8"):
        packed.load(1, big)
    assert torch.equal(packed.A, before[0]) and torch.equal(packed.ranks, before[1])
    assert packed.max_rank == 8


def test_tile_map_of_another_batch_is_refused():
    _, packed = _store("cpu")
    x = torch.randn(20, D_IN)
    meta = ops.build_token_meta(torch.zeros(20, dtype=torch.int64), 2, tiles=True)
    assert meta.tile_group.shape == (ops.num_tiles(20, 2),)
    stale = ops.build_token_meta(torch.zeros(3, dtype=torch.int64), 2, tiles=True)
    bad = ops.LoRAMeta(20, meta.order, meta.group_slot, meta.group_start, meta.group_len, 2,
                       stale.tile_group, stale.tile_first)  # fmt: skip
    with pytest.raises(ValueError, match="tile map must be"):
        multi_lora(x, None, packed, meta=bad)
    half = ops.LoRAMeta(20, meta.order, meta.group_slot, meta.group_start, meta.group_len, 2,
                        meta.tile_group, None)  # fmt: skip
    with pytest.raises(ValueError, match="tile map must be"):
        multi_lora(x, None, packed, meta=half)


def test_segment_meta_for_another_token_count_is_refused():
    _, packed = _store("cpu")
    meta = ops.build_segment_meta(torch.tensor([0, 3, 6]), torch.tensor([0, 1]), 6, 2)
    with pytest.raises(ValueError, match="built for 6 tokens but x has 5"):
        multi_lora(torch.randn(5, D_IN), None, packed, meta=meta)


def test_vllm_wrapper_refuses_rows_its_step_does_not_cover():
    """The wrapper's prebuilt buffers: a step larger than them, and a layer input with fewer
    rows than the step's tokens (groups would index rows past x) or more than the buffers
    hold, are refused on the host."""
    wrapper = StandaloneWrapper(16, "cpu", max_loras=2)
    with pytest.raises(ValueError, match="more than the 16"):
        wrapper.slora_set_token_slots(torch.zeros(17, dtype=torch.int64))
    wrapper.slora_set_token_slots(torch.tensor([0, 1, -1, 1, 0, 0, 1, 1, 0, 1]))
    assert wrapper.slora_meta(10).num_tokens == 10
    assert wrapper.slora_meta(16).num_tokens == 16  # CUDA-graph padding rows: no group
    for rows in (9, 17):
        with pytest.raises(ValueError, match="covers|cover"):
            wrapper.slora_meta(rows)
