"""Packed storage of LoRA adapters at their true ranks (layout: docs/kernels.md).

Every A[k, s] occupies ``rank`` rows of one ``[rows, d_in]`` buffer and every Bᵀ[k, s]
(``[rank, d_out_s]``, row-major so the expand reads contiguous output columns) one stretch of a
flat buffer — nothing is padded, a rank-0 adapter takes no memory.  Per-(slot, slice) ranks,
offsets and scales are fixed-shape device arrays, so loading or unloading one adapter writes
only its own rows and one metadata row, and the kernels need no host synchronisation.

Two placements: packed (first fit, buffers grow when full: the most adapters per byte) and
fixed regions (``slot_rows=R``: every (slot, slice) owns R rows at a fixed offset, allocated
once; the buffers never move whatever is loaded, as servers that capture CUDA graphs need).
The buffers are always ordinary tensors, made outside inference mode, so adapters load and
unload both inside ``torch.inference_mode()`` and outside it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from slora.kernels.multi_lora.placement import FreeList, mutable_buffers
from slora.kernels.multi_lora.weights import KernelWeights

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# One (A [r, d_in], B [d_out, r], scale) triple per slice; None = rank 0 / no adapter.
SliceAdapter = tuple[Tensor, Tensor, float] | None


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
        slot_rows: int = 0,
    ) -> None:
        outs = [int(d_out)] if isinstance(d_out, int) else [int(d) for d in d_out]
        if d_in <= 0 or not outs or any(d <= 0 for d in outs):
            raise ValueError(f"d_in and every slice's d_out must be positive, got {d_in}, {outs}")
        if max_slots <= 0:
            raise ValueError(f"max_slots must be positive, got {max_slots}")
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {_DTYPES}, got {dtype}")
        if slot_rows < 0 or (slot_rows and (capacity_rows or capacity_b)):
            raise ValueError(
                f"slot_rows must be ≥ 0 and excludes capacity_rows / capacity_b, got "
                f"slot_rows={slot_rows}, capacity_rows={capacity_rows}, capacity_b={capacity_b}"
            )
        self.d_in = int(d_in)
        self.slice_sizes = tuple(outs)
        self.n_slices = len(outs)
        self.col_starts = tuple(int(c) for c in torch.tensor([0, *outs]).cumsum(0)[:-1])
        self.d_out = sum(outs)
        self.max_slots = int(max_slots)
        self.dtype = dtype
        self.slot_rows = int(slot_rows)
        if self.slot_rows:
            capacity_rows = self.max_slots * self.n_slices * self.slot_rows
            capacity_b = self.max_slots * self.slot_rows * self.d_out
        with mutable_buffers():
            self.A = torch.zeros(capacity_rows, self.d_in, dtype=dtype, device=device)
            self.device = dev = self.A.device  # with its index ("cuda:0"), as x.device compares
            self.Bt = torch.zeros(capacity_b, dtype=dtype, device=dev)
            shape = (self.max_slots, self.n_slices)
            self.ranks = torch.zeros(shape, dtype=torch.int32, device=dev)
            self.a_offsets = torch.zeros(shape, dtype=torch.int32, device=dev)
            self.b_offsets = torch.zeros(shape, dtype=torch.int64, device=dev)
            self.scales = torch.zeros(shape, dtype=torch.float32, device=dev)
            self.slice_d_out = torch.tensor(outs, dtype=torch.int32, device=dev)
            self.slice_col = torch.tensor(self.col_starts, dtype=torch.int32, device=dev)
        self._a_free = FreeList(capacity_rows)
        self._b_free = FreeList(capacity_b)
        # host mirror: slot -> [(rank, a_off, b_off, scale) per slice]
        self._host: dict[int, list[tuple[int, int, int, float]]] = {}
        self._max_rank = 0  # a plain int, so that torch.compile guards on it without tracing
        self._rank_floor = 0  # see reserve_rank
        self._rank_limit: int | None = None  # see reserve_rank(limit=True)
        self._weights: KernelWeights | None = None  # see weights()

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
        there; writes only this adapter's rows and metadata row.  All or nothing: if the load
        fails, the slot keeps the adapter it held."""
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
            for label, t in (("A", A), ("B", B)):
                if not isinstance(t, Tensor) or not (t.is_floating_point() or t.numel() == 0):
                    kind = f"{t.dtype} tensor" if isinstance(t, Tensor) else type(t).__name__
                    raise TypeError(
                        f"slot {slot} slice {s}: {label} must be a floating-point tensor, "
                        f"got a {kind}"
                    )
            if A.dim() != 2 or A.shape[1] != self.d_in:
                raise ValueError(
                    f"slot {slot} slice {s}: A must be [r, {self.d_in}], got {tuple(A.shape)}"
                )
            if B.dim() != 2 or B.shape != (d_s, A.shape[0]):
                raise ValueError(
                    f"slot {slot} slice {s}: B must be [{d_s}, {A.shape[0]}] to match A, "
                    f"got {tuple(B.shape)}"
                )
            if not math.isfinite(float(scale)):  # a NaN/Inf scale would poison every output
                raise ValueError(
                    f"slot {slot} slice {s}: scale must be a finite number, got {scale!r}"
                )
            if self._rank_limit is not None and A.shape[0] > self._rank_limit:
                raise ValueError(
                    f"slot {slot} slice {s}: rank {A.shape[0]} exceeds the reserved rank "
                    f"{self._rank_limit} (reserve_rank(limit=True)): calls captured with it "
                    "hold only that many rank columns"
                )
            if self.slot_rows and A.shape[0] > self.slot_rows:
                raise ValueError(
                    f"slot {slot} slice {s}: rank {A.shape[0]} exceeds the {self.slot_rows} "
                    "rows reserved per slot (slot_rows)"
                )
            checked.append((A, B, float(scale)))
        with mutable_buffers():  # converted before anything changes: a failure here changes nothing
            staged = [
                None
                if t is None
                else (
                    t[0].detach().to(dtype=self.dtype, device=self.device),
                    t[1].detach().to(dtype=self.dtype, device=self.device),
                    t[2],
                )
                for t in checked
            ]
            previous = None
            if slot in self._host:  # kept until the new adapter is in (rows may be reused)
                previous = [
                    None if t is None else (t[0].clone(), t[1].clone(), t[2])
                    for t in self.adapter(slot)
                ]
        self.unload(slot)
        host: list[tuple[int, int, int, float]] = []
        try:
            with mutable_buffers():
                for s, trip in enumerate(staged):
                    if trip is None or trip[0].shape[0] == 0:
                        host.append((0, 0, 0, 0.0))
                        continue
                    A, B, scale = trip
                    r, d_s = A.shape[0], self.slice_sizes[s]
                    a_off, b_off = self._place(slot, s, r)
                    host.append((r, a_off, b_off, scale))
                    self.A[a_off : a_off + r].copy_(A)
                    self.Bt[b_off : b_off + r * d_s].view(r, d_s).copy_(B.t())
                self._write_meta(slot, host)
                self._host[slot] = host
        except BaseException:
            self._host[slot] = host + [(0, 0, 0, 0.0)] * (self.n_slices - len(host))
            self.unload(slot)  # frees the rows placed so far
            if previous is not None:
                self.load(slot, previous)
            raise
        self._max_rank = max(self._max_rank, *(h[0] for h in host))

    def unload(self, slot: int) -> None:
        """Free ``slot`` (rank 0 everywhere); other adapters are not touched."""
        self._check_slot(slot)
        host = self._host.get(slot)
        if host is None:
            return
        with mutable_buffers():  # first: if this fails, nothing has changed
            self._write_meta(slot, [(0, 0, 0, 0.0)] * self.n_slices)
        del self._host[slot]
        for s, (r, a_off, b_off, _) in enumerate(host):
            if r and not self.slot_rows:
                self._a_free.release(a_off, r)
                self._b_free.release(b_off, r * self.slice_sizes[s])
        loaded = [r for h in self._host.values() for r, *_ in h]
        self._max_rank = max([self._rank_floor, *loaded])

    def _place(self, slot: int, s: int, r: int) -> tuple[int, int]:
        """Row of A and element of Bᵀ for ``r`` rank components of (``slot``, slice ``s``)."""
        if self.slot_rows:  # fixed regions: slot-major, slices side by side
            a_off = (slot * self.n_slices + s) * self.slot_rows
            b_off = self.slot_rows * (slot * self.d_out + self.col_starts[s])
            return a_off, b_off
        return self._alloc("A", r), self._alloc("Bt", r * self.slice_sizes[s])

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

    def reserve_rank(self, rank: int, *, limit: bool = False) -> None:
        """Keep :attr:`max_rank` at least ``rank`` whatever is loaded: a caller whose calls are
        traced once and replayed (``torch.compile`` without guards, CUDA graphs) then never
        sees it change as adapters come and go.  With ``limit``, a later load of a larger
        rank is refused (a captured call's intermediate holds ``rank`` columns)."""
        if rank < 0:
            raise ValueError(f"rank must be non-negative, got {rank}")
        if limit and self._max_rank > rank:
            raise ValueError(f"an adapter of rank {self._max_rank} is loaded, above {rank}")
        self._rank_floor = int(rank)
        self._rank_limit = int(rank) if limit else None
        self._max_rank = max(self._max_rank, self._rank_floor)

    @property
    def max_rank(self) -> int:
        """Largest rank of any loaded (slot, slice), at least :meth:`reserve_rank`'s; sizes
        the kernels' intermediate buffer."""
        return self._max_rank

    def weights(self) -> KernelWeights:
        """The tensors and sizes the registered ops take (see :class:`KernelWeights`).  Read
        on every call of a server's layers, so kept, and rebuilt only when a buffer was
        reallocated (growth) or the largest rank changed: the other tensors are only ever
        updated in place."""
        w = self._weights
        if w is None or w.A is not self.A or w.Bt is not self.Bt or w.max_rank != self._max_rank:
            w = self._weights = KernelWeights(
                self.A, self.Bt, self.ranks, self.a_offsets, self.b_offsets, self.scales,
                self.slice_d_out, self.slice_col, list(self.slice_sizes), self._max_rank,
            )  # fmt: skip
        return w

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
