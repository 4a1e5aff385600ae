"""Token-group metadata of the grouped LoRA ops (layout: docs/kernels.md).

Tokens are visited in *groups* of one slot: either the slots' own groups after a stable sort
of the per-token slots (decode, any token order), or the caller's prefill segments
(``seg_indptr``, ``seg_slots``) in place.  Builders use only fixed-shape device ops and no host
synchronisation, so a server can build a :class:`LoRAMeta` once per step, reuse it for every
layer, and capture it in a CUDA graph or a ``torch.compile`` graph.  Value checks raise
``ValueError`` in eager mode on the CPU and become device asserts on CUDA and under
``torch.compile``.  vLLM's per-token ``token_lora_mapping`` is already a ``token_slots``.

The Triton kernels' *tile map* (which group and which rows each program takes) depends only on
the groups, so it is part of the metadata too: built by the builders on CUDA (``tiles=True``
elsewhere) or by :meth:`LoRAMeta.with_tiles`; a meta without one gets it built per call.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

from slora.kernels import _native
from slora.kernels.multi_lora.packed import PackedAdapters

TILE_M = 16  # token rows per Triton program (the tile map's block)


@dataclass(frozen=True)
class LoRAMeta:
    """Token groups of one slot each: tokens ``order[start : start + len]`` use ``slot``.

    ``order`` (int64 [T]) is None when groups index the tokens directly (segment form).
    ``group_slot`` (−1 = no adapter), ``group_start`` and ``group_len`` are int64 [G].
    ``tile_group`` / ``tile_first`` (int32, ``cdiv(num_tokens, TILE_M) + G`` each, or None):
    the Triton programs' tile map (:func:`tile_map`), built once per step with the groups.
    """

    num_tokens: int
    order: Tensor | None
    group_slot: Tensor
    group_start: Tensor
    group_len: Tensor
    max_slots: int = 0  # the slot count the builder checked against (0 = not known)
    tile_group: Tensor | None = None
    tile_first: Tensor | None = None

    def with_tiles(self) -> LoRAMeta:
        """This metadata with its tile map (itself if it has one): build it once per step,
        not once per layer, and a CUDA call is then just the kernels' two launches."""
        if self.tile_group is not None:
            return self
        tile_group, tile_first = tile_map(self)
        return replace(self, tile_group=tile_group, tile_first=tile_first)


def num_tiles(num_tokens: int, num_groups: int, block_m: int = TILE_M) -> int:
    """Length of the tile map: every group's tiles fit in ``cdiv(T, BM) + G`` whatever the
    group sizes (each group wastes less than one tile), so it is known on the host."""
    return (num_tokens + block_m - 1) // block_m + num_groups


def tile_map(meta: LoRAMeta, block_m: int = TILE_M) -> tuple[Tensor, Tensor]:
    """Map of program tiles to (group, first row in group); group −1 = idle tile.  Fixed
    shapes, no host sync (a searchsorted over the groups' cumulative tile counts)."""
    dev = meta.group_len.device
    active = meta.group_slot >= 0
    tiles = torch.where(active, (meta.group_len + block_m - 1) // block_m, 0)
    ends = torch.cumsum(tiles, 0)
    ids = torch.arange(num_tiles(meta.num_tokens, meta.group_len.shape[0], block_m), device=dev)
    group = torch.searchsorted(ends, ids, right=True)
    valid = group < ends.shape[0]
    g = group.clamp(max=max(ends.shape[0] - 1, 0))
    first = (ids - (ends[g] - tiles[g])) * block_m
    tile_group = torch.where(valid, g, -1).to(torch.int32)
    return tile_group, first.to(torch.int32)


def _finish(meta: LoRAMeta, tiles: bool | None) -> LoRAMeta:
    """Add the tile map when asked (``None``: on CUDA, where the Triton kernels read it)."""
    if tiles is None:
        tiles = meta.group_slot.device.type == "cuda"
    return meta.with_tiles() if tiles else meta


def _check_int_vector(t: Tensor, name: str, length: int | None = None) -> None:
    if t.dim() != 1 or t.dtype.is_floating_point or t.dtype == torch.bool:
        raise ValueError(f"{name} must be a 1-D integer tensor, got {t.dtype} {tuple(t.shape)}")
    if length is not None and t.shape[0] != length:
        raise ValueError(f"{name} must have length {length}, got {t.shape[0]}")


def _check(cond: Tensor, message: str) -> None:
    """Value check: an immediate ValueError in eager mode on the CPU; a sync-free device
    assert on CUDA and under ``torch.compile`` (no host read in a traced graph)."""
    if cond.device.type == "cpu" and not torch.compiler.is_compiling():
        if not bool(cond):
            raise ValueError(message)
    else:
        torch._assert_async(cond, message)


def build_token_meta(
    token_slots: Tensor, max_slots: int, *, validate: bool = True, tiles: bool | None = None
) -> LoRAMeta:
    """Groups of per-token slots (−1 = none, any order): a stable sort by slot and per-slot
    counts — fixed shapes, no host sync.  ``tiles``: add the Triton tile map (default: on
    CUDA)."""
    _check_int_vector(token_slots, "token_slots")
    slots = token_slots.long()
    eager_cpu = slots.device.type == "cpu" and not torch.compiler.is_compiling()
    native = _native.loaded() if eager_cpu else None
    if native is not None:
        # eager CPU: one O(T) counting sort instead of ~6 small torch ops (same result); it
        # checks every slot itself, with the message below, whatever `validate` says
        order, starts, counts = native.token_meta(slots, max_slots)
        group_slot = torch.arange(max_slots, dtype=torch.int64)
        return _finish(
            LoRAMeta(slots.shape[0], order, group_slot, starts, counts, max_slots), tiles
        )
    message = f"token_slots: every slot must be in [-1, {max_slots}) (−1 = no adapter)"
    if validate and slots.numel():
        _check(((slots >= -1) & (slots < max_slots)).all(), message)
    key = slots.where(slots >= 0, max_slots)
    order = torch.sort(key, stable=True).indices
    # counts into a fixed-size buffer (bincount sizes its output from the data: a host sync)
    counts = torch.zeros(max_slots + 1, dtype=torch.int64, device=slots.device)
    counts.index_add_(0, key, torch.ones_like(key))
    starts = torch.cumsum(counts, 0) - counts
    group_slot = torch.arange(max_slots, dtype=torch.int64, device=slots.device)
    meta = LoRAMeta(
        slots.shape[0], order, group_slot, starts[:max_slots], counts[:max_slots], max_slots
    )
    return _finish(meta, tiles)


def build_segment_meta(
    seg_indptr: Tensor,
    seg_slots: Tensor,
    num_tokens: int,
    max_slots: int,
    *,
    validate: bool = True,
    tiles: bool | None = None,
) -> LoRAMeta:
    """Groups from prefill segments: tokens ``seg_indptr[i] : seg_indptr[i+1]`` use
    ``seg_slots[i]`` (−1 = none); segments must cover the tokens in order.  ``tiles``: add
    the Triton tile map (default: on CUDA)."""
    _check_int_vector(seg_indptr, "seg_indptr")
    if seg_indptr.shape[0] < 1:
        raise ValueError("seg_indptr must have at least one entry (it starts with 0)")
    _check_int_vector(seg_slots, "seg_slots", seg_indptr.shape[0] - 1)
    indptr = seg_indptr.long()
    slots = seg_slots.long()
    if validate:
        _check(
            (indptr[0] == 0) & (indptr[-1] == num_tokens) & (indptr.diff() >= 0).all(),
            f"seg_indptr must be non-decreasing from 0 to the number of tokens ({num_tokens}): "
            "the segments must cover the tokens",
        )
        if slots.numel():
            _check(
                ((slots >= -1) & (slots < max_slots)).all(),
                f"seg_slots: every slot must be in [-1, {max_slots}) (−1 = no adapter)",
            )
    meta = LoRAMeta(num_tokens, None, slots, indptr[:-1], indptr.diff(), max_slots)
    return _finish(meta, tiles)


def check_call(x: Tensor, packed: PackedAdapters, meta: LoRAMeta, out: Tensor | None) -> None:
    """Checks of shapes, dtypes and devices (no values: traceable) for a call with ``meta``.
    Runs on every call of a server's layers: each tensor attribute is read once."""
    if not isinstance(packed, PackedAdapters):
        raise TypeError(f"packed must be a PackedAdapters, got {type(packed).__name__}")
    if not isinstance(meta, LoRAMeta):
        raise TypeError(f"meta must be a LoRAMeta, got {type(meta).__name__}")
    shape, dtype, device = x.shape, x.dtype, x.device
    if len(shape) != 2 or shape[1] != packed.d_in:
        raise ValueError(f"x must be [tokens, {packed.d_in}], got {tuple(shape)}")
    if dtype != packed.dtype:
        raise ValueError(f"x has dtype {dtype} but the adapters are {packed.dtype}")
    if device != packed.device:
        raise ValueError(f"x is on {device} but the adapters are on {packed.device}")
    if meta.group_slot.device != device:
        raise ValueError(f"meta is on {meta.group_slot.device} but x is on {device}")
    built_for = max(meta.max_slots, meta.group_slot.shape[0] if meta.order is not None else 0)
    if built_for > packed.max_slots:
        raise ValueError(
            f"meta was built for {built_for} slots but the adapters have {packed.max_slots}: "
            "build it with max_slots=packed.max_slots"
        )
    T, order = shape[0], meta.order
    if meta.num_tokens != T or (order is not None and order.shape[0] != T):
        built = meta.num_tokens if order is None else order.shape[0]
        raise ValueError(
            f"meta was built for {built} tokens but x has {T}: build it for this batch "
            "(build_token_meta / build_segment_meta with the batch's token count)"
        )
    tile_group = meta.tile_group
    if tile_group is not None:
        n = num_tiles(T, meta.group_len.shape[0])
        tile_first = meta.tile_first
        if (
            tile_first is None
            or tile_group.shape != (n,)
            or tile_first.shape != (n,)
            or tile_group.device != device
        ):
            raise ValueError(
                f"meta's tile map must be tile_group and tile_first of [{n}] each "
                f"(cdiv(tokens, {TILE_M}) + groups) on {device}: build it with "
                "meta.with_tiles() for this batch"
            )
    if out is not None:
        if out.shape != (T, packed.d_out) or out.dtype not in (dtype, torch.float32):
            raise ValueError(
                f"out must be [{T}, {packed.d_out}] of dtype {dtype} or float32, "
                f"got {out.dtype} {tuple(out.shape)}"
            )
        if out.device != device:
            raise ValueError(f"out is on {out.device}, x on {device}")
        if out.stride(-1) != 1:
            raise ValueError("out must have contiguous rows (stride 1 along the last dimension)")
        if (
            not torch.compiler.is_compiling()
            and out.numel()
            and x.numel()
            and out.untyped_storage().data_ptr() == x.untyped_storage().data_ptr()
        ):
            raise ValueError(
                "out shares memory with x: the kernel would read inputs it has already "
                "overwritten; pass a separate out (or none)"
            )


def check_and_build_meta(
    x: Tensor,
    token_slots: Tensor | None,
    packed: PackedAdapters,
    seg_indptr: Tensor | None,
    seg_slots: Tensor | None,
    out: Tensor | None,
) -> LoRAMeta:
    """Validate the arguments of ``slora.ops.multi_lora`` (naming the argument and what was
    expected) and build the token-group metadata from the per-token or per-segment slots."""
    if not isinstance(packed, PackedAdapters):
        raise TypeError(f"packed must be a PackedAdapters, got {type(packed).__name__}")
    if x.dim() != 2 or x.shape[1] != packed.d_in:
        raise ValueError(f"x must be [tokens, {packed.d_in}], got {tuple(x.shape)}")
    T = x.shape[0]
    for name, t in (
        ("token_slots", token_slots),
        ("seg_indptr", seg_indptr),
        ("seg_slots", seg_slots),
    ):
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    if seg_indptr is not None or seg_slots is not None:
        if token_slots is not None:
            raise ValueError("pass either token_slots or seg_indptr/seg_slots, not both")
        if seg_indptr is None or seg_slots is None:
            raise ValueError("seg_indptr and seg_slots must be given together")
        meta = build_segment_meta(seg_indptr, seg_slots, T, packed.max_slots)
    elif token_slots is None:
        raise ValueError("token_slots is required unless seg_indptr/seg_slots or meta are given")
    else:
        if token_slots.dim() != 1 or token_slots.shape[0] != T:
            raise ValueError(
                f"token_slots must be 1-D with one slot per token ({T}), "
                f"got shape {tuple(token_slots.shape)}"
            )
        meta = build_token_meta(token_slots, packed.max_slots)
    check_call(x, packed, meta, out)
    return meta
