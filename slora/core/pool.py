"""Serving many adapters of different ranks on one base model (docs/api.md, "AdapterPool").

``AdapterPool`` puts one forward hook on each target linear, once.  Outside a ``use`` context
the hooks return at once and the model is the plain base model; inside, each target adds
``multi_lora(x, slots, packed)`` to its base output, where the slot of every token is the slot
of its sequence's adapter (sequence b = index b of the input's leading dimension, which holds
for a prefill ``[B, S, d]``, a decode step ``[B, 1, d]`` and a pooled ``[B, d]`` alike).

Every adapter owns one slot index shared by all layers; its A and B live at their true ranks
in one :class:`~slora.ops.PackedAdapters` per layer (modules the adapter does not cover have
rank 0 in its slot and take no memory), so loading or unloading writes only that adapter's rows.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from slora import ops
from slora.core import quantized
from slora.core.checks import finite_number, whole_number
from slora.core.patch import foreign_lora_modules
from slora.core.peft_io import read_adapter
from slora.core.targets import find_targets, linear_dims
from slora.core.transaction import transaction
from slora.core.wrappers import (
    drop_bypassed,
    guard_module_hooks,
    keep_forward_called,
    unwrap,
)

POOL_ATTR = "_slora_pool"
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class AdapterInfo:
    """A loaded adapter: its slot, per-module ranks and scales, and the bytes of its A and B."""

    name: str
    slot: int
    ranks: dict[str, int]
    scales: dict[str, float]
    nbytes: int
    source: str


@dataclass
class _Batch:
    """One active ``use`` context: the slot of every sequence and the layers it touches."""

    slots: list[int] | None  # per sequence; None = one slot for every row
    slot: int  # the broadcast slot when ``slots`` is None
    layers: frozenset[str]
    names: tuple[str, ...]
    routes: dict[tuple[int, int, torch.device, int], dict[str, object]] = field(
        default_factory=dict
    )

    def route(
        self, n_seq: int, per_seq: int, device: torch.device, max_slots: int
    ) -> dict[str, object]:
        """multi_lora arguments for ``n_seq`` sequences of ``per_seq`` rows: the token-group
        metadata, built once per batch shape and reused by every layer (cached)."""
        key = (n_seq, per_seq, device, max_slots)
        hit = self.routes.get(key)
        if hit is not None:
            return hit
        slots = self.slots if self.slots is not None else [self.slot] * n_seq
        if per_seq == 1:  # decode: group the tokens of each adapter (weights read once)
            token_slots = torch.tensor(slots, dtype=torch.int64, device=device)
            meta = ops.build_token_meta(token_slots, max_slots)
        else:  # prefill: sequences are contiguous row ranges; merge runs of one slot
            starts, run_slots = [0], []
            for b, s in enumerate(slots):
                if run_slots and run_slots[-1] == s:
                    starts[-1] = (b + 1) * per_seq
                else:
                    run_slots.append(s)
                    starts.append((b + 1) * per_seq)
            meta = ops.build_segment_meta(
                torch.tensor(starts, dtype=torch.int64, device=device),
                torch.tensor(run_slots, dtype=torch.int64, device=device),
                n_seq * per_seq,
                max_slots,
            )
        route = {"token_slots": None, "meta": meta}
        self.routes[key] = route
        return route


class AdapterPool:
    """Many PEFT-format LoRA adapters of any ranks served on one model, one per sequence.

    ``max_adapters`` adapters are held at once; ``memory_budget_bytes`` (optional) bounds the
    bytes of their A and B.  Loading past either limit evicts the least recently used adapters
    that no active ``use`` context needs (``load`` returns their names).  ``backend`` picks the
    ``multi_lora`` implementation (see :mod:`slora.ops`).

    A ``torch.compile``-d, DataParallel or DDP model may be given (the pool hooks the model
    underneath), and the model may be compiled before or after the pool is made: the hooks
    run outside the compiled graph, so ``use`` takes effect at every call.
    """

    def __init__(
        self,
        model: nn.Module,
        target_modules: Sequence[str] | str | None = None,
        *,
        max_adapters: int = 16,
        memory_budget_bytes: int | None = None,
        backend: str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        model = unwrap(model)
        foreign = foreign_lora_modules(model)
        if getattr(model, "_slora_state", None) is not None:
            foreign.insert(0, "slora.patch layers")
        if foreign or hasattr(model, "peft_config"):
            raise ValueError(
                f"model already carries LoRA layers ({', '.join(foreign[:3]) or 'peft_config'}); "
                "give AdapterPool the plain base model"
            )
        if getattr(model, POOL_ATTR, None) is not None:
            raise ValueError("model already has an AdapterPool; call its close() first")
        max_adapters = whole_number("max_adapters", max_adapters, minimum=1)
        if memory_budget_bytes is not None:
            memory_budget_bytes = finite_number(
                "memory_budget_bytes", memory_budget_bytes, positive=True
            )
        if dtype is not None and dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {_DTYPES}, got {dtype}")
        targets = find_targets(model, target_modules)
        targets = drop_bypassed(model, targets, target_modules is not None, "AdapterPool")
        self.model = model
        self.max_adapters = max_adapters
        self.memory_budget_bytes = memory_budget_bytes
        self.backend = backend
        self._dims: dict[str, tuple[int, int]] = {}
        self._packed: dict[str, ops.PackedAdapters] = {}
        for name, module in targets.items():
            device = quantized.device_of(module)
            ops.resolve_backend(device, backend)  # a bad backend fails here, not later
            self._dims[name] = linear_dims(module)
            d_in, d_out = self._dims[name]
            # The layer's compute dtype (never a quantized weight's storage dtype).
            layer_dtype = dtype or quantized.compute_dtype(module)
            layer_dtype = layer_dtype if layer_dtype in _DTYPES else torch.float32
            # One spare slot: a new adapter is written before any eviction, so a failed load
            # can always be rolled back.
            self._packed[name] = ops.PackedAdapters(
                d_in, d_out, max_slots=max_adapters + 1, dtype=layer_dtype, device=device
            )
        self._records: OrderedDict[str, AdapterInfo] = OrderedDict()  # LRU order, oldest first
        self._in_use: dict[str, int] = {}
        self._lock = threading.RLock()
        self._local = threading.local()
        guard_module_hooks()  # compiled code must see the hooks (slora/core/wrappers.py)
        self._handles = [
            targets[name].register_forward_hook(self._make_hook(name), with_kwargs=True)
            for name in self._packed
        ]
        self._undo_fused = keep_forward_called(model, list(self._packed))
        setattr(model, POOL_ATTR, self)

    # -- lookups ------------------------------------------------------------------------------

    @property
    def targets(self) -> list[str]:
        """Names of the prepared target modules."""
        return list(self._packed)

    @property
    def loaded(self) -> list[str]:
        """Loaded adapter names, least recently used first."""
        return list(self._records)

    @property
    def adapters(self) -> dict[str, AdapterInfo]:
        """Loaded adapters by name, least recently used first."""
        return dict(self._records)

    @property
    def in_use(self) -> set[str]:
        """Adapters needed by an active ``use`` context (never evicted or unloaded)."""
        return {n for n, c in self._in_use.items() if c > 0}

    def __contains__(self, name: object) -> bool:
        return name in self._records

    def __len__(self) -> int:
        return len(self._records)

    def memory_bytes(self, name: str | None = None) -> int:
        """Bytes of the A and B of adapter ``name`` (all adapters when None), at true ranks."""
        if name is None:
            return sum(r.nbytes for r in self._records.values())
        return self._record(name).nbytes

    def reserved_bytes(self) -> int:
        """Bytes of the packed buffers as allocated (≥ :meth:`memory_bytes`: free space kept
        for later loads)."""
        return sum(
            p.A.numel() * p.A.element_size() + p.Bt.numel() * p.Bt.element_size()
            for p in self._packed.values()
        )

    def _check_open(self) -> None:
        if not self._handles:
            raise RuntimeError("this AdapterPool is closed")

    def _record(self, name: str) -> AdapterInfo:
        if name not in self._records:
            raise KeyError(f"adapter {name!r} is not loaded (loaded: {self.loaded})")
        return self._records[name]

    # -- load / unload --------------------------------------------------------------------------

    def load(self, name: str, adapter_dir: str | Path) -> list[str]:
        """Read the PEFT adapter in ``adapter_dir`` into the pool under ``name``.

        Everything is validated before the pool changes (a failed load leaves it as it was).
        Returns the names of the adapters evicted to make room.
        """
        if not isinstance(name, str) or not name:
            raise ValueError(f"adapter name must be a non-empty string, got {name!r}")
        with self._lock:
            self._check_open()
            if name in self._records:
                raise ValueError(f"adapter {name!r} is already loaded; unload it first")
            adapter = read_adapter(adapter_dir, self.model)
            if adapter.extra:
                keys = ", ".join(sorted(adapter.extra)[:4])
                raise ValueError(
                    f"adapter {name!r} ({adapter_dir}) also replaces base weights "
                    f"(modules_to_save: {keys}); a pool shares one base model between "
                    "sequences and serves LoRA weights only"
                )
            outside = sorted(set(adapter.a) - set(self._packed))
            if outside:
                raise ValueError(
                    f"adapter {name!r} adapts {', '.join(outside[:4])}, which this pool does not "
                    "target; create the pool with target_modules= covering them"
                )
            weights = {}
            nbytes = 0
            for module, A in adapter.a.items():
                B = adapter.b[module]  # read_adapter has checked shapes and finiteness
                packed = self._packed[module]
                weights[module] = (A.to(packed.dtype), B.to(packed.dtype), adapter.scales[module])
                if not (
                    weights[module][0].isfinite().all() and weights[module][1].isfinite().all()
                ):
                    raise ValueError(
                        f"adapter {name!r}: the weights of {module!r} overflow the pool's dtype "
                        f"{packed.dtype}; create the pool with dtype=torch.float32"
                    )
                nbytes += A.numel() * packed.A.element_size() + B.numel() * packed.A.element_size()
            evict = self._plan_eviction(name, nbytes)
            slot = self._free_slot()
            with transaction() as tx:  # a failed load leaves every slot as it was
                for module, weight in weights.items():
                    packed = self._packed[module]
                    tx.on_undo(lambda packed=packed: packed.unload(slot))
                    packed.load(slot, weight)
                tx.on_undo(lambda: self._records.pop(name, None))
                self._records[name] = AdapterInfo(
                    name=name,
                    slot=slot,
                    ranks=dict(adapter.ranks),
                    scales=dict(adapter.scales),
                    nbytes=nbytes,
                    source=str(adapter_dir),
                )
            for old in evict:  # only once the new adapter is in (its slot is the spare one)
                self._drop(old)
            return evict

    def unload(self, name: str) -> None:
        """Remove adapter ``name``; the other adapters' rows and slots are not touched."""
        with self._lock:
            self._record(name)
            if self._in_use.get(name, 0) > 0:
                raise RuntimeError(f"adapter {name!r} is in use by an active use() context")
            self._drop(name)

    def _drop(self, name: str) -> None:
        record = self._records.pop(name)
        for module in record.ranks:
            self._packed[module].unload(record.slot)

    def _free_slot(self) -> int:
        used = {r.slot for r in self._records.values()}
        return next(s for s in range(self.max_adapters + 1) if s not in used)

    def _plan_eviction(self, name: str, nbytes: int) -> list[str]:
        """Least recently used adapters not in use whose removal makes room for ``nbytes``."""
        budget = self.memory_budget_bytes
        if budget is not None and nbytes > budget:
            raise ValueError(
                f"adapter {name!r} needs {nbytes} bytes, more than memory_budget_bytes={budget}"
            )
        count, total = len(self._records) + 1, self.memory_bytes() + nbytes
        evict: list[str] = []
        for old, record in self._records.items():
            if count <= self.max_adapters and (budget is None or total <= budget):
                break
            if self._in_use.get(old, 0) > 0:
                continue
            evict.append(old)
            count, total = count - 1, total - record.nbytes
        if count > self.max_adapters or (budget is not None and total > budget):
            raise RuntimeError(
                f"no room for adapter {name!r} ({nbytes} bytes): max_adapters="
                f"{self.max_adapters}, memory_budget_bytes={budget}, and the adapters in use "
                f"({sorted(self.in_use)}) cannot be evicted"
            )
        return evict

    # -- serving --------------------------------------------------------------------------------

    @contextmanager
    def use(self, names: Sequence[str | None] | str | None) -> Iterator[None]:
        """Within the block, sequence b of every forward uses adapter ``names[b]`` (None =
        base model).  A single name (or None) applies to every sequence whatever the batch
        size.

        The batch is the leading dimension of each target's input, so ``model(**batch)`` and
        every step of ``model.generate`` keep each sequence's adapter.  For
        ``num_return_sequences=k`` or beam search pass each name k times (rows are expanded
        per sequence).
        """
        if names is None or isinstance(names, str):
            names_list: list[str | None] = [names]
            broadcast = True
        else:
            names_list = list(names)
            broadcast = False
            if not names_list:
                raise ValueError("use() needs one adapter name (or None) per sequence, got []")
        with self._lock:
            self._check_open()
            for n in names_list:
                if n is not None and not isinstance(n, str):
                    raise TypeError(f"adapter names must be str or None, got {type(n).__name__}")
                if n is not None and n not in self._records:
                    raise KeyError(f"adapter {n!r} is not loaded (loaded: {self.loaded})")
            active = sorted({n for n in names_list if n is not None})
            for n in active:
                self._records.move_to_end(n)
                self._in_use[n] = self._in_use.get(n, 0) + 1
            slots = [-1 if n is None else self._records[n].slot for n in names_list]
            layers = frozenset(m for n in active for m in self._records[n].ranks)
        batch = _Batch(
            slots=None if broadcast else slots,
            slot=slots[0],
            layers=layers,
            names=tuple(names_list),
        )
        stack = self._stack()
        stack.append(batch)
        try:
            yield
        finally:
            stack.pop()
            with self._lock:
                for n in active:
                    self._in_use[n] -= 1
                    if not self._in_use[n]:
                        del self._in_use[n]

    def _stack(self) -> list[_Batch]:
        stack = getattr(self._local, "stack", None)
        if stack is None:
            stack = self._local.stack = []
        return stack

    def _make_hook(self, module_name: str):
        packed = self._packed[module_name]

        # Run outside any torch.compile graph: which adapters apply is thread-local state set
        # by use(), which a compiled graph would otherwise freeze at its first call.
        @torch.compiler.disable
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Tensor) -> Tensor | None:
            stack = getattr(self._local, "stack", None)
            if not stack or module_name not in stack[-1].layers:
                return None
            x = args[0] if args else next(iter(kwargs.values()))
            return self._apply(module_name, packed, stack[-1], x, output)

        return hook

    def _apply(
        self, module_name: str, packed: ops.PackedAdapters, batch: _Batch, x: Tensor, y: Tensor
    ) -> Tensor | None:
        n_seq = x.shape[0] if x.dim() > 1 else 1
        if batch.slots is not None and n_seq != len(batch.slots):
            raise ValueError(
                f"{module_name}: the input has {n_seq} sequences (leading dimension of "
                f"{tuple(x.shape)}) but use() was given {len(batch.slots)} adapter names: "
                "pass one name (or None) per sequence"
            )
        x2 = x.reshape(-1, x.shape[-1])
        if x2.shape[0] == 0:
            return None
        route = batch.route(n_seq, x2.shape[0] // n_seq, x2.device, packed.max_slots)
        if x2.dtype != packed.dtype:
            x2 = x2.to(packed.dtype)
        needs_grad = torch.is_grad_enabled() and (x.requires_grad or y.requires_grad)
        if not needs_grad and y.is_contiguous() and y.dtype in (x2.dtype, torch.float32):
            out = y.view(-1, y.shape[-1])
            ops.multi_lora(x2, packed=packed, out=out, backend=self.backend, **route)
            return None  # y updated in place
        delta = ops.multi_lora(x2, packed=packed, backend=self.backend, **route)
        return y + delta.view(y.shape).to(y.dtype)

    def close(self) -> None:
        """Remove the hooks and free the adapters; the model is the plain base model again."""
        with self._lock:
            if self.in_use:
                raise RuntimeError(f"adapters {sorted(self.in_use)} are in use")
            for handle in self._handles:
                handle.remove()
            for undo in self._undo_fused:
                undo()
            self._handles, self._undo_fused = [], []
            self._records.clear()
            self._packed.clear()
            if getattr(self.model, POOL_ATTR, None) is self:
                delattr(self.model, POOL_ATTR)

    def __repr__(self) -> str:
        return (
            f"AdapterPool({len(self._packed)} target modules, {len(self)}/{self.max_adapters} "
            f"adapters loaded, {self.memory_bytes()} bytes)"
        )
