"""The Triton path's risky shapes, once for the GPU (``-m cuda``) and once through the Triton
interpreter on the CPU, with the SAME parametrisation — so every CUDA test has passed on the
CPU before a GPU sees it: several K iterations (d_in ≫ BK) and one (d_in ≤ 50), groups of
several row tiles (≥ 3·16 tokens) and batches of about one tile per group (T ≤ 33), more
(slice, rank) columns than one shrink program takes (two column blocks), both metadata forms
(per-token and segments), fp32 ``out`` with bf16 x, fp16, and slots loaded and unloaded after
a CUDA-graph capture.  Float64 oracle from tests/oracles.py; ``out`` starts from random values
(unwritten rows must keep them) and rows past the batch hold a sentinel that must survive.
"""

from __future__ import annotations

import oracles
import pytest
import torch
from conftest import BACKENDS, assert_close, generator, make_adapters

from slora import ops
from slora.integrations.vllm.wrapper import StandaloneWrapper
from slora.kernels.multi_lora import meta as meta_module
from slora.kernels.multi_lora import triton_utils
from slora.kernels.multi_lora.meta import TILE_M
from slora.ops import PackedAdapters, multi_lora

SHAPES = {
    # name: (per-slot ranks (None = empty slot), d_in, slice sizes, tokens per slot (−1 last),
    #        the shrink's minimum program count: None = the default, which gives small
    #        batches narrow column blocks; 1 = the widest blocks, x read once per tile)
    "multi_k_multi_tile": ([(16, 8), (5, 0), None], 200, [64, 24], [52, 30, 0, 18], None),
    "one_k_one_tile": ([(1,), (20,), (7,)], 40, [48], [9, 14, 3, 7], 1),  # T = 33
    # 3 slices × r_max 96 = 288 (slice, rank) columns: two column blocks of 256
    "two_column_blocks": ([(3, 40, 96), (2, 2, 2)], 48, [16, 16, 20], [17, 3, 0], 1),
}
assert SHAPES["multi_k_multi_tile"][3][0] >= 3 * TILE_M and sum(SHAPES["one_k_one_tile"][3]) <= 33
# (x dtype, out dtype): fp32; bf16 into bf16 and into fp32 (mixed); fp16
DTYPES = [
    (torch.float32, torch.float32),
    (torch.bfloat16, torch.bfloat16),
    (torch.bfloat16, torch.float32),
    (torch.float16, torch.float16),
]
DEVICES = [
    pytest.param("cpu", id="interp"),
    pytest.param("cuda", id="cuda", marks=pytest.mark.cuda),
]
SENTINEL = 7.0  # rows of out past the batch: no kernel may write them


def _need(device: str) -> None:
    if device == "cpu" and "triton" not in BACKENDS:
        pytest.skip("the Triton interpreter runs only where CUDA is absent")


def _case(name: str, dtype: torch.dtype, device: str, segments: bool):
    """Adapters, x and the per-token slots of ``name`` (slots contiguous for segments)."""
    ranks, d_in, sizes, per_slot, _ = SHAPES[name]
    adapters = make_adapters(ranks, d_in, sizes, dtype=dtype, seed=name)
    counts = list(per_slot)
    slots = torch.cat([torch.full((n,), k if k < len(ranks) else -1) for k, n in
                       enumerate(counts)])  # fmt: skip
    g = generator(name)
    if not segments:
        slots = slots[torch.randperm(slots.shape[0], generator=g)]
    x = torch.randn(slots.shape[0], d_in, generator=g).to(dtype)
    packed = PackedAdapters.from_list(adapters, d_out=sizes, max_slots=len(ranks), device=device)
    ref = oracles.multi_lora(x, slots, adapters, sizes)
    return packed, x, slots, ref, counts


def _meta(packed, slots, counts, segments, device, tiles):  # noqa: ANN001
    T = slots.shape[0]
    if not segments:
        return ops.build_token_meta(slots.to(device), packed.max_slots, tiles=tiles)
    indptr = torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()], device=device)
    seg_slots = torch.tensor([k if k < packed.max_slots else -1 for k in range(len(counts))],
                             device=device)  # fmt: skip
    return ops.build_segment_meta(indptr, seg_slots, T, packed.max_slots, tiles=tiles)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtypes", DTYPES, ids=lambda d: f"{d[0]}-{d[1]}".replace("torch.", ""))
@pytest.mark.parametrize("form", ["token", "segment"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_triton_shapes_match_float64(shape, form, dtypes, device, monkeypatch):
    _need(device)
    if SHAPES[shape][4] is not None:
        monkeypatch.setattr(triton_utils, "SHRINK_MIN_PROGRAMS", SHAPES[shape][4])
    dtype, out_dtype = dtypes
    segments = form == "segment"
    packed, x, slots, ref, counts = _case(shape, dtype, device, segments)
    T = x.shape[0]
    # the token form with its tile map prebuilt; the segment form builds it per call on the
    # CPU (the builders add it by default on CUDA)
    meta = _meta(packed, slots, counts, segments, device, True if not segments else None)
    assert (meta.tile_group is not None) == (not segments or device == "cuda")
    base = torch.randn(T, packed.d_out, generator=generator(shape)).to(out_dtype)
    buf = torch.full((T + 5, packed.d_out), SENTINEL, dtype=out_dtype)
    buf[:T] = base
    buf = buf.to(device)
    out = buf[:T]
    assert multi_lora(x.to(device), None, packed, meta=meta, out=out, backend="triton") is out
    got = buf.cpu()
    assert (got[T:] == SENTINEL).all(), "rows past the batch were written"
    assert_close(got[:T], ref + base.double(), out_dtype, what=f"{shape} {form}")
    if out_dtype == dtype:  # the functional form: a fresh output
        y = multi_lora(x.to(device), None, packed, meta=meta, backend="triton")
        assert_close(y, ref, out_dtype, what=f"{shape} {form} functional")


# --- slot churn after a CUDA-graph capture ---------------------------------------------------


CHURN_RANKS = [(4, 12), (16, 1), None, (9, 0)]  # the next adapter of each slot, in turn
CHURN_SIZES, CHURN_D_IN, CHURN_R = [40, 24], 72, 16


def _churn_adapters(step: int, dtype: torch.dtype):
    ranks = CHURN_RANKS[step:] + CHURN_RANKS[:step]
    return make_adapters(ranks, CHURN_D_IN, CHURN_SIZES, dtype=dtype, seed=f"churn{step}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_slot_churn_after_capture(device, dtype):
    """A decode step captured once (prebuilt metadata, fixed-region store, reserved rank) and
    replayed after adapters are loaded and unloaded in place: every replay equals the oracle
    of the adapters loaded then.  On the CPU the same step is re-run eagerly with the same
    metadata and buffers (no graphs in the interpreter)."""
    _need(device)
    slots = torch.tensor([2, 0, -1, 3, 1, 1, 0, 3, 2, 0, 1])
    packed = PackedAdapters(CHURN_D_IN, CHURN_SIZES, max_slots=4, dtype=dtype, device=device,
                            slot_rows=CHURN_R)  # fmt: skip
    packed.reserve_rank(CHURN_R, limit=True)
    meta = ops.build_token_meta(slots.to(device), packed.max_slots, tiles=True)
    x = torch.randn(slots.shape[0], CHURN_D_IN, generator=generator("churn-x")).to(dtype)
    xd = x.to(device)
    out = torch.empty(slots.shape[0], packed.d_out, dtype=dtype, device=device)

    def step() -> None:
        out.zero_()
        multi_lora(xd, None, packed, meta=meta, out=out, backend="triton")

    def load(i: int) -> list:
        adapters = _churn_adapters(i, dtype)
        for k, a in enumerate(adapters):
            if a is None:
                packed.unload(k)
            else:
                packed.load(k, a)
        return adapters

    adapters = load(0)
    run = step
    if device == "cuda":
        step()  # compile outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        run = graph.replay
    for i in range(len(CHURN_RANKS)):
        if i:
            adapters = load(i)
        out.fill_(float("nan"))  # poisoned: the replay must overwrite every element
        run()
        ref = oracles.multi_lora(x, slots, adapters, CHURN_SIZES)
        assert_close(out.cpu(), ref, dtype, what=f"after churn step {i}")


# --- the tile map: built once per step ------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_prebuilt_tile_map_is_not_rebuilt(device, monkeypatch):
    """With the tile map in the metadata a call builds none; without, one per call."""
    _need(device)
    packed, x, slots, ref, counts = _case("one_k_one_tile", torch.float32, device, False)
    built = []
    real = meta_module.tile_map
    monkeypatch.setattr(meta_module, "tile_map", lambda *a: built.append(1) or real(*a))
    meta = ops.build_token_meta(slots.to(device), packed.max_slots, tiles=True)
    assert len(built) == 1
    for _ in range(2):
        y = multi_lora(x.to(device), None, packed, meta=meta, backend="triton")
        assert_close(y, ref, torch.float32)
    assert len(built) == 1, "the call rebuilt a prebuilt tile map"
    bare = ops.build_token_meta(slots.to(device), packed.max_slots, tiles=False)
    assert bare.tile_group is None and len(built) == 1
    assert_close(multi_lora(x.to(device), None, packed, meta=bare, backend="triton"), ref)
    assert len(built) == 2


@pytest.mark.parametrize("device", DEVICES)
def test_vllm_wrapper_step_tile_map(device):
    """The wrapper's per-step map (sized for the largest batch, sliced per layer input) gives
    the oracle's result for the step's tokens and for CUDA-graph padding rows (no group)."""
    _need(device)
    packed, x, slots, ref, _ = _case("multi_k_multi_tile", torch.float32, device, False)
    T = x.shape[0]
    wrapper = StandaloneWrapper(T + 40, device, packed.max_slots, tiles=True)
    wrapper.slora_set_token_slots(slots.to(device))
    for rows in (T, T + 21):  # the step's tokens, then padded rows (zeros: no adapter)
        meta = wrapper.slora_meta(rows)
        assert meta.tile_group.shape == (ops.num_tiles(rows, packed.max_slots),)
        xp = torch.cat([x, torch.randn(rows - T, x.shape[1])]).to(device)
        y = multi_lora(xp, None, packed, meta=meta, backend="triton").cpu()
        assert_close(y[:T], ref, torch.float32)
        assert (y[T:] == 0).all()
