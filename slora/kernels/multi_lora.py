"""Grouped heterogeneous-rank LoRA (SPEC §4): many adapters of different ranks in one launch.

For tokens t, adapter slots k with ranks r_k ≥ 0 and a slot per token (−1 = none)::

    y[t, slice s] += scale[k, s] · B[k, s] (A[k, s] x_t),     k = slot(t)

Several output slices (q/k/v, gate/up) share the input ``x`` and are concatenated along the
output dimension; each (adapter, slice) pair has its own rank, which may be 0.

Layout (:class:`PackedAdapters`): every A[k, s] occupies ``rank`` rows of one ``[rows, d_in]``
buffer and every Bᵀ[k, s] (``[rank, d_out_s]``, row-major so the expand reads contiguous output
columns) one stretch of a flat buffer, both at their *true* rank — nothing is padded and a
rank-0 adapter takes no memory.  Per-(slot, slice) ranks, offsets and scales are fixed-shape
device arrays, so loading or unloading one adapter writes only its own rows and one metadata
row, and the kernels need no host synchronisation (CUDA-graph safe as long as the buffers are
reserved large enough not to grow).

Metadata (:class:`LoRAMeta`): tokens are visited in *groups* of one slot — either the slots'
own groups after a stable sort of the per-token slots (decode, any token order), or the
caller's prefill segments (``seg_indptr``, ``seg_slots``) in place.  Builders use only
fixed-shape device ops.  Converters accept vLLM's ``token_lora_mapping`` and SGLang's
``seg_indptr`` / ``weight_indices`` / ``lora_ranks``.

Backends share the signature ``fn(x, meta, packed, out) -> out`` (``out += delta`` in place,
fp32 accumulation whatever the input dtype): :func:`multi_lora_torch` (the plain PyTorch
reference, a loop over groups), :func:`multi_lora_triton` (shrink + expand kernels that skip
every block past an adapter's true rank) and ``slora.kernels.native_ops.multi_lora_cpp``.
:class:`MultiLoRAFunction` and :class:`LoRASlicesFunction` add gradients for x, A and B.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# One (A [r, d_in], B [d_out, r], scale) triple per slice; None = rank 0 / no adapter.
SliceAdapter = tuple[Tensor, Tensor, float] | None


# --------------------------------------------------------------------------------------------
# Packed storage


class _FreeList:
    """First-fit allocator of ``[start, start + n)`` ranges in a buffer of ``capacity`` units."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.free: list[tuple[int, int]] = [(0, capacity)] if capacity else []

    def alloc(self, n: int) -> int | None:
        for i, (start, length) in enumerate(self.free):
            if length >= n:
                if length == n:
                    del self.free[i]
                else:
                    self.free[i] = (start + n, length - n)
                return start
        return None

    def release(self, start: int, n: int) -> None:
        if n == 0:
            return
        self.free.append((start, n))
        self.free.sort()
        merged: list[tuple[int, int]] = []
        for s, n_ in self.free:
            if merged and merged[-1][0] + merged[-1][1] == s:
                merged[-1] = (merged[-1][0], merged[-1][1] + n_)
            else:
                merged.append((s, n_))
        self.free = merged

    def grow(self, new_capacity: int) -> None:
        self.release(self.capacity, new_capacity - self.capacity)
        self.capacity = new_capacity


class PackedAdapters:
    """LoRA adapters of any ranks packed at their true ranks, one slot per adapter.

    ``A`` is ``[rows, d_in]``; ``Bt`` is flat.  Metadata (device tensors, ``[max_slots,
    n_slices]``): ``ranks`` (int32), ``a_offsets`` (int32 row of A[k, s] in ``A``),
    ``b_offsets`` (int64 element of Bᵀ[k, s] in ``Bt``), ``scales`` (fp32); per slice:
    ``slice_d_out`` and ``slice_col`` (int32 first output column).
    """

    def __init__(
        self,
        d_in: int,
        d_out: int | Sequence[int],
        *,
        max_slots: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        capacity_rows: int = 0,
        capacity_b: int = 0,
    ) -> None:
        outs = [int(d_out)] if isinstance(d_out, int) else [int(d) for d in d_out]
        if d_in <= 0 or not outs or any(d <= 0 for d in outs):
            raise ValueError(f"d_in and every slice's d_out must be positive, got {d_in}, {outs}")
        if max_slots <= 0:
            raise ValueError(f"max_slots must be positive, got {max_slots}")
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {_DTYPES}, got {dtype}")
        self.d_in = int(d_in)
        self.slice_sizes = tuple(outs)
        self.n_slices = len(outs)
        self.col_starts = tuple(int(c) for c in torch.tensor([0, *outs]).cumsum(0)[:-1])
        self.d_out = sum(outs)
        self.max_slots = int(max_slots)
        self.dtype = dtype
        self.device = torch.device(device)
        dev = self.device
        self.A = torch.zeros(capacity_rows, self.d_in, dtype=dtype, device=dev)
        self.Bt = torch.zeros(capacity_b, dtype=dtype, device=dev)
        shape = (self.max_slots, self.n_slices)
        self.ranks = torch.zeros(shape, dtype=torch.int32, device=dev)
        self.a_offsets = torch.zeros(shape, dtype=torch.int32, device=dev)
        self.b_offsets = torch.zeros(shape, dtype=torch.int64, device=dev)
        self.scales = torch.zeros(shape, dtype=torch.float32, device=dev)
        self.slice_d_out = torch.tensor(outs, dtype=torch.int32, device=dev)
        self.slice_col = torch.tensor(self.col_starts, dtype=torch.int32, device=dev)
        self._a_free = _FreeList(capacity_rows)
        self._b_free = _FreeList(capacity_b)
        # host mirror: slot -> [(rank, a_off, b_off, scale) per slice]
        self._host: dict[int, list[tuple[int, int, int, float]]] = {}

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def from_list(
        cls,
        adapters: Sequence[Any],
        *,
        d_out: int | Sequence[int] | None = None,
        max_slots: int | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> PackedAdapters:
        """Pack ``adapters[k]`` into slot k.

        Each entry is ``(A, B, scale)`` (one slice), a sequence of such triples (one per
        slice; ``None`` for a rank-0 slice) or ``None`` (an empty slot).  A is ``[r, d_in]``,
        B ``[d_out_s, r]``.  ``d_out`` is needed only when no entry shows a slice's size.
        """
        entries = [_slices_of(a) for a in adapters]
        known = [e for e in entries if e is not None]
        n_slices = len(known[0]) if known else (1 if isinstance(d_out, int) else len(d_out or []))
        d_in = None
        sizes: list[int | None] = [None] * n_slices
        if d_out is not None:
            sizes = [int(d_out)] if isinstance(d_out, int) else [int(d) for d in d_out]
            n_slices = len(sizes)
        for k, e in enumerate(entries):
            if e is None:
                continue
            if len(e) != n_slices:
                raise ValueError(
                    f"adapters[{k}] has {len(e)} slices, expected {n_slices} like the others"
                )
            for s, trip in enumerate(e):
                if trip is None:
                    continue
                A, B, _ = trip
                d_in = d_in if d_in is not None else A.shape[-1]
                sizes[s] = sizes[s] if sizes[s] is not None else B.shape[0]
                dtype = dtype or A.dtype
                device = device or A.device
        if d_in is None or any(d is None for d in sizes):
            raise ValueError("cannot infer d_in / d_out from the adapters: pass d_out=")
        total_a = sum(t[0].shape[0] for e in known for t in e if t is not None)
        total_b = sum(t[1].numel() for e in known for t in e if t is not None)
        packed = cls(
            d_in,
            [int(d) for d in sizes],  # type: ignore[arg-type]
            max_slots=max_slots or max(len(adapters), 1),
            dtype=dtype or torch.float32,
            device=device or "cpu",
            capacity_rows=total_a,
            capacity_b=total_b,
        )
        for k, e in enumerate(entries):
            if e is not None:
                packed.load(k, e)
        return packed

    # -- load / unload ------------------------------------------------------------------------

    def load(self, slot: int, adapter: Any) -> None:
        """Put ``adapter`` (format as in :meth:`from_list`) into ``slot``, replacing what was
        there; writes only this adapter's rows and metadata row."""
        self._check_slot(slot)
        slices = _slices_of(adapter) or [None] * self.n_slices
        if len(slices) != self.n_slices:
            raise ValueError(
                f"adapter for slot {slot} has {len(slices)} slices, expected {self.n_slices}"
            )
        checked = []
        for s, trip in enumerate(slices):
            if trip is None:
                checked.append(None)
                continue
            A, B, scale = trip
            d_s = self.slice_sizes[s]
            if A.dim() != 2 or A.shape[1] != self.d_in:
                raise ValueError(
                    f"slot {slot} slice {s}: A must be [r, {self.d_in}], got {tuple(A.shape)}"
                )
            if B.dim() != 2 or B.shape != (d_s, A.shape[0]):
                raise ValueError(
                    f"slot {slot} slice {s}: B must be [{d_s}, {A.shape[0]}] to match A, "
                    f"got {tuple(B.shape)}"
                )
            checked.append((A, B, float(scale)))
        self.unload(slot)
        host = []
        for s, trip in enumerate(checked):
            if trip is None or trip[0].shape[0] == 0:
                host.append((0, 0, 0, 0.0))
                continue
            A, B, scale = trip
            r, d_s = A.shape[0], self.slice_sizes[s]
            a_off = self._alloc("A", r)
            b_off = self._alloc("Bt", r * d_s)
            with torch.no_grad():
                self.A[a_off : a_off + r].copy_(A)
                self.Bt[b_off : b_off + r * d_s].view(r, d_s).copy_(B.t())
            host.append((r, a_off, b_off, scale))
        self._host[slot] = host
        self._write_meta(slot, host)

    def unload(self, slot: int) -> None:
        """Free ``slot`` (rank 0 everywhere); other adapters are not touched."""
        self._check_slot(slot)
        host = self._host.pop(slot, None)
        if host is None:
            return
        for s, (r, a_off, b_off, _) in enumerate(host):
            if r:
                self._a_free.release(a_off, r)
                self._b_free.release(b_off, r * self.slice_sizes[s])
        self._write_meta(slot, [(0, 0, 0, 0.0)] * self.n_slices)

    def _alloc(self, which: str, n: int) -> int:
        free = self._a_free if which == "A" else self._b_free
        start = free.alloc(n)
        if start is None:  # grow (reallocates: reserve capacity up front under CUDA graphs)
            old = self.A if which == "A" else self.Bt
            new_cap = max(2 * free.capacity, free.capacity + n)
            shape = (new_cap, self.d_in) if which == "A" else (new_cap,)
            grown = torch.zeros(shape, dtype=self.dtype, device=self.device)
            grown[: free.capacity].copy_(old.detach())
            if which == "A":
                self.A = grown
            else:
                self.Bt = grown
            free.grow(new_cap)
            start = free.alloc(n)
            assert start is not None
        return start

    def _write_meta(self, slot: int, host: list[tuple[int, int, int, float]]) -> None:
        r, a, b, sc = zip(*host)
        self.ranks[slot].copy_(torch.tensor(r, dtype=torch.int32))
        self.a_offsets[slot].copy_(torch.tensor(a, dtype=torch.int32))
        self.b_offsets[slot].copy_(torch.tensor(b, dtype=torch.int64))
        self.scales[slot].copy_(torch.tensor(sc, dtype=torch.float32))

    def _check_slot(self, slot: int) -> None:
        if not 0 <= slot < self.max_slots:
            raise IndexError(f"slot {slot} out of range [0, {self.max_slots})")

    # -- views --------------------------------------------------------------------------------

    def host_meta(self, slot: int) -> list[tuple[int, int, int, float]]:
        """``(rank, a_offset, b_offset, scale)`` per slice of ``slot`` (host copy, no sync)."""
        return self._host.get(slot, [(0, 0, 0, 0.0)] * self.n_slices)

    @property
    def max_rank(self) -> int:
        """Largest rank of any loaded (slot, slice); sizes the kernels' intermediate buffer."""
        return max((r for h in self._host.values() for r, *_ in h), default=0)

    def adapter(self, slot: int) -> list[SliceAdapter]:
        """Views ``(A, B, scale)`` per slice of ``slot`` (None for rank 0)."""
        out: list[SliceAdapter] = []
        for s, (r, a_off, b_off, scale) in enumerate(self.host_meta(slot)):
            d_s = self.slice_sizes[s]
            if r == 0:
                out.append(None)
                continue
            A = self.A[a_off : a_off + r]
            B = self.Bt[b_off : b_off + r * d_s].view(r, d_s).t()
            out.append((A, B, scale))
        return out

    def padded(self, rank: int | None = None) -> PackedAdapters:
        """A copy with every loaded (slot, slice) zero-padded to ``rank`` (default: the
        largest) — the layout of servers that pad to ``max_lora_rank``, for benchmarks."""
        rank = rank if rank is not None else self.max_rank
        items: list[Any] = [None] * self.max_slots
        for slot in self._host:
            sl = []
            for s, trip in enumerate(self.adapter(slot)):
                A = torch.zeros(rank, self.d_in, dtype=self.dtype, device=self.device)
                B = torch.zeros(self.slice_sizes[s], rank, dtype=self.dtype, device=self.device)
                scale = 0.0
                if trip is not None:
                    r = trip[0].shape[0]
                    A[:r], B[:, :r], scale = trip[0], trip[1], trip[2]
                sl.append((A, B, scale))
            items[slot] = sl
        return PackedAdapters.from_list(items, d_out=self.slice_sizes, max_slots=self.max_slots)

    def nbytes(self) -> int:
        """Bytes of the loaded adapters' A and B (true ranks)."""
        el = self.A.element_size()
        return sum(
            r * (self.d_in + self.slice_sizes[s]) * el
            for h in self._host.values()
            for s, (r, *_) in enumerate(h)
        )


def _slices_of(adapter: Any) -> list[SliceAdapter] | None:
    """Normalise one adapter entry to a list of per-slice triples (None = empty slot)."""
    if adapter is None:
        return None
    if isinstance(adapter, tuple) and len(adapter) == 3 and isinstance(adapter[0], Tensor):
        return [adapter]
    return [None if t is None else tuple(t) for t in adapter]  # type: ignore[misc]


# --------------------------------------------------------------------------------------------
# Metadata


@dataclass(frozen=True)
class LoRAMeta:
    """Token groups of one slot each: tokens ``order[start : start + len]`` use ``slot``.

    ``order`` (int64 [T]) is None when groups index the tokens directly (segment form).
    ``group_slot`` (−1 = no adapter), ``group_start`` and ``group_len`` are int64 [G].
    """

    num_tokens: int
    order: Tensor | None
    group_slot: Tensor
    group_start: Tensor
    group_len: Tensor


def _check_int_vector(t: Tensor, name: str, length: int | None = None) -> None:
    if t.dim() != 1 or t.dtype.is_floating_point or t.dtype == torch.bool:
        raise ValueError(f"{name} must be a 1-D integer tensor, got {t.dtype} {tuple(t.shape)}")
    if length is not None and t.shape[0] != length:
        raise ValueError(f"{name} must have length {length}, got {t.shape[0]}")


def _check(cond: Tensor, message: str) -> None:
    """Value check: an immediate ValueError on the CPU, a sync-free device assert on CUDA."""
    if cond.device.type == "cpu":
        if not bool(cond):
            raise ValueError(message)
    else:
        torch._assert_async(cond, message)


def build_token_meta(token_slots: Tensor, max_slots: int, *, validate: bool = True) -> LoRAMeta:
    """Groups of per-token slots (−1 = none, any order): a stable sort by slot and per-slot
    counts — fixed shapes, no host sync."""
    _check_int_vector(token_slots, "token_slots")
    slots = token_slots.long()
    message = f"token_slots: every slot must be in [-1, {max_slots}) (−1 = no adapter)"
    cpu = slots.device.type == "cpu"
    if validate and slots.numel():
        if cpu:  # one reduction, checked on the host (free on the CPU)
            lo, hi = torch.aminmax(slots)
            if lo < -1 or hi >= max_slots:
                raise ValueError(message)
        else:
            _check(((slots >= -1) & (slots < max_slots)).all(), message)
    key = slots.where(slots >= 0, max_slots)
    order = torch.sort(key, stable=True).indices
    if cpu:
        counts = torch.bincount(key, minlength=max_slots + 1)
    else:  # bincount sizes its output from the data (a sync): count into a fixed-size buffer
        counts = torch.zeros(max_slots + 1, dtype=torch.int64, device=slots.device)
        counts.index_add_(0, key, torch.ones_like(key))
    starts = torch.cumsum(counts, 0) - counts
    group_slot = torch.arange(max_slots, dtype=torch.int64, device=slots.device)
    return LoRAMeta(slots.shape[0], order, group_slot, starts[:max_slots], counts[:max_slots])


def build_segment_meta(
    seg_indptr: Tensor, seg_slots: Tensor, num_tokens: int, max_slots: int, *, validate: bool = True
) -> LoRAMeta:
    """Groups from prefill segments: tokens ``seg_indptr[i] : seg_indptr[i+1]`` use
    ``seg_slots[i]`` (−1 = none); segments must cover the tokens in order."""
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
    return LoRAMeta(num_tokens, None, slots, indptr[:-1], indptr.diff())


def from_vllm(token_lora_mapping: Tensor, max_slots: int) -> LoRAMeta:
    """Metadata from vLLM's per-token ``token_lora_mapping`` (−1 = no LoRA)."""
    return build_token_meta(token_lora_mapping, max_slots)


def from_sglang(
    seg_indptr: Tensor,
    weight_indices: Tensor,
    lora_ranks: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """``(seg_indptr, seg_slots)`` from SGLang's batch info: ``weight_indices`` gives each
    segment's slot; slots whose ``lora_ranks`` entry is 0 (SGLang's base-model slot) become −1."""
    _check_int_vector(seg_indptr, "seg_indptr")
    _check_int_vector(weight_indices, "weight_indices", seg_indptr.shape[0] - 1)
    slots = weight_indices.long()
    if lora_ranks is not None:
        _check_int_vector(lora_ranks, "lora_ranks")
        safe = slots.clamp(0, max(lora_ranks.shape[0] - 1, 0))
        slots = torch.where(lora_ranks.long()[safe] == 0, torch.full_like(slots, -1), slots)
    return seg_indptr.long(), slots


# --------------------------------------------------------------------------------------------
# PyTorch reference


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
    if x.dtype != packed.dtype:
        raise ValueError(f"x has dtype {x.dtype} but the adapters are {packed.dtype}")
    if x.device != packed.A.device:
        raise ValueError(f"x is on {x.device} but the adapters are on {packed.A.device}")
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
        raise ValueError("token_slots is required unless seg_indptr/seg_slots are given")
    else:
        if token_slots.dim() != 1 or token_slots.shape[0] != T:
            raise ValueError(
                f"token_slots must be 1-D with one slot per token ({T}), "
                f"got shape {tuple(token_slots.shape)}"
            )
        meta = build_token_meta(token_slots, packed.max_slots)
    if out is not None:
        if out.shape != (T, packed.d_out) or out.dtype not in (x.dtype, torch.float32):
            raise ValueError(
                f"out must be [{T}, {packed.d_out}] of dtype {x.dtype} or float32, "
                f"got {out.dtype} {tuple(out.shape)}"
            )
        if out.device != x.device:
            raise ValueError(f"out is on {out.device}, x on {x.device}")
    return meta


def multi_lora_torch(
    x: Tensor, meta: LoRAMeta, packed: PackedAdapters, out: Tensor, overwrite: bool = False
) -> Tensor:
    """``out += delta`` (``out = delta`` with ``overwrite``) by a loop over groups and slices,
    fp32 math, differentiable in x, A and B.

    Reads the host mirror of the ranks and the groups (host syncs: this is the reference).
    """
    if overwrite:
        out.zero_()
    slots = meta.group_slot.tolist()
    starts = meta.group_start.tolist()
    lens = meta.group_len.tolist()
    for slot, start, n in zip(slots, starts, lens):
        if slot < 0 or n == 0:
            continue
        idx = (
            meta.order[start : start + n]
            if meta.order is not None
            else torch.arange(start, start + n, device=x.device)
        )
        xs = x.index_select(0, idx).float()
        for s, (r, a_off, b_off, scale) in enumerate(packed.host_meta(slot)):
            if r == 0:
                continue
            d_s, col = packed.slice_sizes[s], packed.col_starts[s]
            A = packed.A[a_off : a_off + r].float()
            Bt = packed.Bt[b_off : b_off + r * d_s].view(r, d_s).float()
            y = (xs @ A.t() * scale) @ Bt
            out[:, col : col + d_s].index_add_(0, idx, y.to(out.dtype))
    return out


# --------------------------------------------------------------------------------------------
# Triton kernels (imported lazily so that the module works without Triton)

_BM = 16


def _tile_map(meta: LoRAMeta, block_m: int) -> tuple[Tensor, Tensor]:
    """Fixed-size map of program tiles to (group, first row in group); −1 = idle tile.

    At most ``cdiv(T, BM) + G`` tiles are needed whatever the group sizes, so the grid has
    a fixed size and nothing is read back to the host.
    """
    dev = meta.group_len.device
    active = meta.group_slot >= 0
    tiles = torch.where(active, (meta.group_len + block_m - 1) // block_m, 0)
    ends = torch.cumsum(tiles, 0)
    n_tiles = (meta.num_tokens + block_m - 1) // block_m + meta.group_len.shape[0]
    ids = torch.arange(n_tiles, device=dev)
    group = torch.searchsorted(ends, ids, right=True)
    valid = group < ends.shape[0]
    g = group.clamp(max=max(ends.shape[0] - 1, 0))
    first = (ids - (ends[g] - tiles[g])) * block_m
    tile_group = torch.where(valid, g, -1).to(torch.int32)
    return tile_group, first.to(torch.int32)


_TRITON: dict[str, Any] = {}


def _triton_kernels() -> dict[str, Any]:
    if _TRITON:
        return _TRITON
    import triton
    import triton.language as tl

    @triton.jit
    def shrink_kernel(
        x_ptr, a_ptr, h_ptr, order_ptr, tile_group_ptr, tile_first_ptr,
        group_slot_ptr, group_start_ptr, group_len_ptr,
        rank_ptr, aoff_ptr, scale_ptr,
        d_in, stride_x, n_slices, h_stride_t, h_stride_s,
        HAS_ORDER: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
        BM: tl.constexpr, BR: tl.constexpr, BK: tl.constexpr,
    ):  # fmt: skip
        tile = tl.program_id(0)
        s = tl.program_id(1)
        r0 = tl.program_id(2) * BR
        g = tl.load(tile_group_ptr + tile)
        if g < 0:
            return
        slot = tl.load(group_slot_ptr + g)
        r = tl.load(rank_ptr + slot * n_slices + s)
        if r0 >= r:  # past this adapter's true rank: no work, no reads
            return
        start = tl.load(group_start_ptr + g)
        n = tl.load(group_len_ptr + g)
        rows = tl.load(tile_first_ptr + tile) + tl.arange(0, BM)
        row_ok = rows < n
        pos = start + rows
        if HAS_ORDER:
            tok = tl.load(order_ptr + pos, mask=row_ok, other=0)
        else:
            tok = pos
        tok = tok.to(tl.int64)
        a_row = tl.load(aoff_ptr + slot * n_slices + s).to(tl.int64)
        scale = tl.load(scale_ptr + slot * n_slices + s)
        offs_r = r0 + tl.arange(0, BR)
        r_ok = offs_r < r
        acc = tl.zeros((BM, BR), dtype=tl.float32)
        for k0 in range(0, d_in, BK):
            offs_k = k0 + tl.arange(0, BK)
            k_ok = offs_k < d_in
            xt = tl.load(
                x_ptr + tok[:, None] * stride_x + offs_k[None, :],
                mask=row_ok[:, None] & k_ok[None, :],
                other=0.0,
            )
            at = tl.load(
                a_ptr + (a_row + offs_r)[None, :] * d_in + offs_k[:, None],
                mask=r_ok[None, :] & k_ok[:, None],
                other=0.0,
            )
            if UPCAST:  # exact: bf16 products are exact in fp32
                xt = xt.to(tl.float32)
                at = at.to(tl.float32)
            acc = tl.dot(xt, at, acc, input_precision=PRECISION)
        acc = acc * scale
        h_off = pos.to(tl.int64)[:, None] * h_stride_t + s * h_stride_s + offs_r[None, :]
        tl.store(h_ptr + h_off, acc, mask=row_ok[:, None] & r_ok[None, :])

    @triton.jit
    def expand_kernel(
        h_ptr, bt_ptr, out_ptr, order_ptr, tile_group_ptr, tile_first_ptr,
        group_slot_ptr, group_start_ptr, group_len_ptr,
        rank_ptr, boff_ptr, dout_ptr, col_ptr,
        stride_out, n_slices, h_stride_t, h_stride_s,
        HAS_ORDER: tl.constexpr, PRECISION: tl.constexpr,
        BM: tl.constexpr, BR: tl.constexpr, BN: tl.constexpr,
    ):  # fmt: skip
        tile = tl.program_id(0)
        s = tl.program_id(1)
        n0 = tl.program_id(2) * BN
        g = tl.load(tile_group_ptr + tile)
        if g < 0:
            return
        slot = tl.load(group_slot_ptr + g)
        r = tl.load(rank_ptr + slot * n_slices + s)
        d_s = tl.load(dout_ptr + s)
        if (r == 0) | (n0 >= d_s):
            return
        start = tl.load(group_start_ptr + g)
        n = tl.load(group_len_ptr + g)
        rows = tl.load(tile_first_ptr + tile) + tl.arange(0, BM)
        row_ok = rows < n
        pos = start + rows
        if HAS_ORDER:
            tok = tl.load(order_ptr + pos, mask=row_ok, other=0)
        else:
            tok = pos
        tok = tok.to(tl.int64)
        b_base = tl.load(boff_ptr + slot * n_slices + s)
        col = tl.load(col_ptr + s)
        offs_n = n0 + tl.arange(0, BN)
        n_ok = offs_n < d_s
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for j0 in range(0, r, BR):
            offs_j = j0 + tl.arange(0, BR)
            j_ok = offs_j < r
            ht = tl.load(
                h_ptr + pos.to(tl.int64)[:, None] * h_stride_t + s * h_stride_s + offs_j[None, :],
                mask=row_ok[:, None] & j_ok[None, :],
                other=0.0,
            )
            bt = tl.load(
                bt_ptr + b_base + offs_j[:, None].to(tl.int64) * d_s + offs_n[None, :],
                mask=j_ok[:, None] & n_ok[None, :],
                other=0.0,
            )
            acc = tl.dot(ht, bt.to(tl.float32), acc, input_precision=PRECISION)
        o_ptrs = out_ptr + tok[:, None] * stride_out + col + offs_n[None, :]
        o_mask = row_ok[:, None] & n_ok[None, :]
        prev = tl.load(o_ptrs, mask=o_mask, other=0.0)
        tl.store(o_ptrs, (prev.to(tl.float32) + acc).to(prev.dtype), mask=o_mask)

    _TRITON.update(shrink=shrink_kernel, expand=expand_kernel, cdiv=triton.cdiv)
    return _TRITON


def multi_lora_triton(
    x: Tensor, meta: LoRAMeta, packed: PackedAdapters, out: Tensor, overwrite: bool = False
) -> Tensor:
    """``out += delta`` (``out = delta`` with ``overwrite``) by a Triton shrink
    (x·Aᵀ·scale → fp32 h) and expand (out += h·Bᵀ).

    Both grids have fixed sizes (tiles × slices × blocks); programs past a group's tokens, an
    adapter's true rank or a slice's width return at once, so padding costs no reads.
    """
    if overwrite:
        out.zero_()
    T = meta.num_tokens
    r_max = packed.max_rank
    if T == 0 or r_max == 0:
        return out
    k = _triton_kernels()
    x = x if x.stride(1) == 1 else x.contiguous()
    if out.stride(1) != 1:
        raise ValueError("out must have contiguous rows (stride 1 along the last dimension)")
    tile_group, tile_first = _tile_map(meta, _BM)
    n_tiles = tile_group.shape[0]
    S = packed.n_slices
    h = torch.empty(T, S, r_max, dtype=torch.float32, device=x.device)
    order = meta.order if meta.order is not None else tile_group  # dummy pointer when unused
    fp32 = x.dtype == torch.float32
    precision = "ieee" if fp32 else "tf32"
    # The interpreter's bf16 dot is wrong (numpy has no bf16): upcast there, exactly.
    upcast = x.device.type == "cpu" and x.dtype == torch.bfloat16
    if x.device.type == "cpu" and out.dtype == torch.bfloat16:  # and its bf16 store truncates
        out.copy_(multi_lora_triton(x, meta, packed, out.float()))
        return out
    br = 16
    bk = 32 if fp32 else 64
    bn = 64
    common = (meta.group_slot, meta.group_start, meta.group_len, packed.ranks)
    k["shrink"][(n_tiles, S, k["cdiv"](r_max, br))](
        x, packed.A, h, order, tile_group, tile_first, *common,
        packed.a_offsets, packed.scales,
        packed.d_in, x.stride(0), S, h.stride(0), h.stride(1),
        HAS_ORDER=meta.order is not None, PRECISION=precision, UPCAST=upcast,
        BM=_BM, BR=br, BK=bk,
    )  # fmt: skip
    k["expand"][(n_tiles, S, k["cdiv"](max(packed.slice_sizes), bn))](
        h, packed.Bt, out, order, tile_group, tile_first, *common,
        packed.b_offsets, packed.slice_d_out, packed.slice_col,
        out.stride(0), S, h.stride(0), h.stride(1),
        HAS_ORDER=meta.order is not None, PRECISION=precision, BM=_BM, BR=br, BN=bn,
    )  # fmt: skip
    return out


# --------------------------------------------------------------------------------------------
# Autograd


class MultiLoRAFunction(torch.autograd.Function):
    """delta = multi_lora(x) through any backend's forward; gradients for x, ``packed.A`` and
    ``packed.Bt`` from the differentiable PyTorch reference (training-side path)."""

    @staticmethod
    def forward(ctx, x, A, Bt, meta, packed, fn):  # type: ignore[override]
        ctx.save_for_backward(x, A, Bt)
        ctx.meta, ctx.packed = meta, packed
        out = torch.empty(x.shape[0], packed.d_out, dtype=x.dtype, device=x.device)
        return fn(x, meta, packed, out, overwrite=True)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        x, A, Bt = ctx.saved_tensors
        packed = ctx.packed
        with torch.enable_grad():
            xd, Ad, Btd = (
                t.detach().requires_grad_(need) for t, need in zip((x, A, Bt), ctx.needs_input_grad)
            )
            view = _BufferView(packed, Ad, Btd)
            out = torch.zeros(x.shape[0], packed.d_out, dtype=torch.float32, device=x.device)
            out = multi_lora_torch(xd, ctx.meta, view, out)  # type: ignore[arg-type]
            wanted = [t for t, need in zip((xd, Ad, Btd), ctx.needs_input_grad[:3]) if need]
            grads = iter(torch.autograd.grad(out, wanted, grad.float(), allow_unused=True))
        result = [next(grads) if need else None for need in ctx.needs_input_grad[:3]]
        result = [None if g is None else g.to(t.dtype) for g, t in zip(result, (x, A, Bt))]
        return (*result, None, None, None)


class _BufferView:
    """``packed`` with its A / Bt replaced (same metadata) — for the differentiable reference."""

    def __init__(self, packed: PackedAdapters, A: Tensor, Bt: Tensor) -> None:
        self._packed, self.A, self.Bt = packed, A, Bt

    def __getattr__(self, name: str) -> Any:
        return getattr(self._packed, name)


def multi_lora_autograd(
    x: Tensor, meta: LoRAMeta, packed: PackedAdapters, fn: Callable[..., Tensor]
) -> Tensor:
    """Returned delta (new tensor) that carries gradients for x, packed.A and packed.Bt."""
    return MultiLoRAFunction.apply(x, packed.A, packed.Bt, meta, packed, fn)


class LoRASlicesFunction(torch.autograd.Function):
    """``y = [scale_s · (x A_sᵀ) B_sᵀ]_s`` for every token and slice (one adapter, several
    slices of different ranks sharing x) — forward through a grouped kernel or PyTorch,
    backward in fp32 matmuls."""

    @staticmethod
    def forward(ctx, x, scales, fn, *weights):  # type: ignore[override]
        n = len(weights) // 2
        As, Bs = weights[:n], weights[n:]
        ctx.save_for_backward(x, *weights)
        ctx.scales = scales
        return fn(x, As, Bs, scales)

    @staticmethod
    def backward(ctx, dy):  # type: ignore[override]
        x, *weights = ctx.saved_tensors
        n = len(weights) // 2
        As, Bs = weights[:n], weights[n:]
        xf, dyf = x.float(), dy.float()
        A_cat = torch.cat([a.float() for a in As])
        H = xf @ A_cat.t()
        dH_parts, dBs = [], []
        col = rank = 0
        for A, B, scale in zip(As, Bs, ctx.scales):
            r, d_s = A.shape[0], B.shape[0]
            dy_s = dyf[:, col : col + d_s]
            dH_parts.append(scale * (dy_s @ B.float()))
            dBs.append((scale * (dy_s.t() @ H[:, rank : rank + r])).to(B.dtype))
            col, rank = col + d_s, rank + r
        dH = torch.cat(dH_parts, dim=1)
        dx = (dH @ A_cat).to(x.dtype) if ctx.needs_input_grad[0] else None
        dA_cat = dH.t() @ xf
        dAs = [g.to(A.dtype) for g, A in zip(dA_cat.split([a.shape[0] for a in As]), As)]
        return (dx, None, None, *dAs, *dBs)


def check_slices(x: Tensor, As: Sequence[Tensor], Bs: Sequence[Tensor], scales) -> None:
    """Validate the arguments of ``slora.ops.lora_slices``."""
    d_in = x.shape[-1]
    if not (len(As) == len(Bs) == len(scales)) or not As:
        raise ValueError(
            f"As, Bs and scales must be non-empty and of equal length, "
            f"got {len(As)}, {len(Bs)}, {len(scales)}"
        )
    for s, (A, B) in enumerate(zip(As, Bs)):
        if A.dim() != 2 or A.shape[1] != d_in or B.dim() != 2 or B.shape[1] != A.shape[0]:
            raise ValueError(
                f"slice {s}: expected A [r, {d_in}] and B [d_out, r], "
                f"got A {tuple(A.shape)} and B {tuple(B.shape)}"
            )


def lora_slices_torch(
    x: Tensor, As: Sequence[Tensor], Bs: Sequence[Tensor], scales: Sequence[float]
) -> Tensor:
    """Forward of :class:`LoRASlicesFunction` in PyTorch: one shrink for all slices, one
    expand per slice, fp32 math."""
    xf = x.float()
    H = xf @ torch.cat([a.float() for a in As]).t()
    parts, rank = [], 0
    for A, B, scale in zip(As, Bs, scales):
        r = A.shape[0]
        parts.append(scale * (H[:, rank : rank + r] @ B.float().t()))
        rank += r
    return torch.cat(parts, dim=1).to(x.dtype)


def lora_slices_with(kernel: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """Forward of :class:`LoRASlicesFunction` through a ``multi_lora`` backend kernel: the
    slices become one slot of a temporary pack, and every token one segment of that slot."""

    def forward(x: Tensor, As: Sequence[Tensor], Bs: Sequence[Tensor], scales) -> Tensor:
        packed = pack_slices(As, Bs, scales)
        meta = build_segment_meta(
            torch.tensor([0, x.shape[0]], device=x.device),
            torch.zeros(1, dtype=torch.int64, device=x.device),
            x.shape[0],
            1,
            validate=False,
        )
        out = torch.zeros(x.shape[0], packed.d_out, dtype=x.dtype, device=x.device)
        return kernel(x, meta, packed, out)

    return forward


def pack_slices(
    As: Sequence[Tensor], Bs: Sequence[Tensor], scales: Sequence[float]
) -> PackedAdapters:
    """One slot holding the slices ``(A_s, B_s, scale_s)`` (detached copies)."""
    return PackedAdapters.from_list(
        [[(a.detach(), b.detach(), float(s)) for a, b, s in zip(As, Bs, scales)]],
        d_out=[b.shape[0] for b in Bs],
        dtype=As[0].dtype,
        device=As[0].device,
    )


# --------------------------------------------------------------------------------------------
# CUDA decode kernel from csrc/multi_lora_decode.cu (plain CUDA, loaded through ctypes)

_CUDA_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def build_cuda_decode(out_dir: str | None = None) -> str:
    """Compile ``csrc/multi_lora_decode.cu`` into a shared library with nvcc (cached by path);
    returns its path.  Needs nvcc; the GPU check script calls this once."""
    import shutil
    import subprocess
    from pathlib import Path

    from slora.kernels._native import cache_dir, csrc_dir

    src = csrc_dir() / "multi_lora_decode.cu"
    lib = Path(out_dir or cache_dir("cuda_decode")) / "libslora_decode.so"
    if not lib.exists() or lib.stat().st_mtime < src.stat().st_mtime:
        nvcc = shutil.which("nvcc")
        if nvcc is None:
            raise RuntimeError("nvcc not found: cannot build csrc/multi_lora_decode.cu")
        cmd = [nvcc, "-O3", "-arch=sm_90", "-shared", "-Xcompiler", "-fPIC", str(src)]
        subprocess.run([*cmd, "-o", str(lib)], check=True)
    return str(lib)


def cuda_decode(
    x: Tensor, token_slots: Tensor, packed: PackedAdapters, out: Tensor, lib_path: str
) -> Tensor:
    """``out += delta`` by the CUDA decode kernel (one block per token and slice)."""
    import ctypes

    lib = ctypes.CDLL(lib_path)
    fn = lib.slora_multi_lora_decode
    fn.restype = ctypes.c_int
    if not (x.is_cuda and out.dtype == x.dtype == packed.dtype and x.stride(1) == 1):
        raise ValueError("cuda_decode needs CUDA tensors of the adapters' dtype, rows contiguous")
    slots = token_slots.to(torch.int64).contiguous()
    p = ctypes.c_void_p
    i64 = ctypes.c_int64
    err = fn(
        p(x.data_ptr()), p(packed.A.data_ptr()), p(packed.Bt.data_ptr()), p(out.data_ptr()),
        p(slots.data_ptr()), p(packed.ranks.data_ptr()), p(packed.a_offsets.data_ptr()),
        p(packed.b_offsets.data_ptr()), p(packed.scales.data_ptr()),
        p(packed.slice_d_out.data_ptr()), p(packed.slice_col.data_ptr()),
        i64(x.shape[0]), i64(packed.d_in), i64(packed.n_slices), i64(packed.max_slots),
        i64(x.stride(0)), i64(out.stride(0)), ctypes.c_int(packed.max_rank),
        ctypes.c_int(_CUDA_DTYPES[x.dtype]), p(torch.cuda.current_stream().cuda_stream),
    )  # fmt: skip
    if err != 0:
        raise RuntimeError(f"slora_multi_lora_decode failed with cudaError {err}")
    return out
