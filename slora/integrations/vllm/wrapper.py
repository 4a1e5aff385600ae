"""slora's punica wrappers: vLLM's CPU / GPU wrappers with ``add_lora_linear`` on slora's ops.

A wrapper is shared by all LoRA layers of a model.  Per step, ``update_metadata`` (vLLM's,
then :meth:`SloraWrapperMixin.update_metadata`) turns the per-token slots (−1 = no adapter;
prefill and decode tokens alike) into slora's token groups, written into fixed buffers that
every layer reads (no per-layer metadata, no host sync, fixed addresses for CUDA graphs).
``add_lora_linear`` then runs all slices of a layer in one ``slora.ops.multi_lora`` call
(the C++ op on the CPU, the Triton kernels on CUDA) on the layer's true-rank
:class:`~slora.integrations.vllm.storage.LayerAdapters`.  Calls this path does not cover
(another scale, a caller-provided buffer, LoRA weights in another dtype than the
activations) and every other wrapper method run vLLM's own implementation — except that
``add_lora_embedding`` / ``add_lora_logits`` are skipped while no slot holds weights for that
layer (they would add exact zeros; see :meth:`SloraWrapperMixin.slora_no_weights`).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor

from slora import ops
from slora.integrations.vllm.storage import LayerAdapters

LOGGER = "vllm.slora"  # under vLLM's "vllm" logger: its handler and level apply
_announced = False


def _announce(wrapper: str, device: torch.device) -> None:
    """Say once per process, through vLLM's logger, what serves vLLM's LoRA."""
    global _announced
    if _announced:
        return
    _announced = True
    from slora import __version__

    backend = ops.resolve_backend(device)
    logging.getLogger(LOGGER).info(
        "slora %s is on: vLLM's LoRA linear layers run on slora's grouped kernels at true "
        "ranks (%s, backend %r on %s); SLORA_VLLM=0 gives stock vLLM",
        __version__, wrapper, backend, device.type,
    )  # fmt: skip


class SloraWrapperMixin:
    """The slora part of the wrappers; combined with vLLM's wrapper class below."""

    def _slora_setup(self, max_num_batched_tokens: int, device: Any, lora_config: Any,
                     tiles: bool | None = None) -> None:  # fmt: skip
        """Fixed per-step buffers; ``tiles`` (default: on CUDA) adds the Triton tile map."""
        dev = torch.device(device)
        slots = int(lora_config.max_loras)
        self._slora_slots = slots
        self._slora_layers: dict[int, LayerAdapters | None] = {}
        # embedding / logits LoRA layers (by id of their lora_b_stacked) -> slots holding weights
        self._slora_live: dict[int, set[int]] = {}
        # ordinary tensors even when vLLM builds the wrapper in inference mode: they are also
        # written outside it (tests, run-time adapter loads)
        with torch.inference_mode(False):
            self._slora_order = torch.zeros(max_num_batched_tokens, dtype=torch.int64, device=dev)
            self._slora_group_slot = torch.arange(slots, dtype=torch.int64, device=dev)
            self._slora_group_start = torch.zeros(slots, dtype=torch.int64, device=dev)
            self._slora_group_len = torch.zeros(slots, dtype=torch.int64, device=dev)
            # the Triton kernels' tile map, sized for the largest batch (built once per step)
            self._slora_tiles = dev.type == "cuda" if tiles is None else tiles
            n_tiles = ops.num_tiles(max_num_batched_tokens, slots) if self._slora_tiles else 0
            self._slora_tile_group = torch.full((n_tiles,), -1, dtype=torch.int32, device=dev)
            self._slora_tile_first = torch.zeros(n_tiles, dtype=torch.int32, device=dev)
        self._slora_num_tokens = 0  # this step's real tokens (host int)

    # -- adapters -----------------------------------------------------------------------------

    def slora_register(self, layer: Any) -> None:
        """Give ``layer`` its true-rank storage (None: the layer keeps vLLM's kernels); an
        embedding or logits LoRA layer (one stacked tensor) starts with no live slot."""
        stacked = getattr(layer, "lora_a_stacked", None)
        b_stacked = getattr(layer, "lora_b_stacked", None)
        if isinstance(stacked, Tensor) and isinstance(b_stacked, Tensor):
            self._slora_live.setdefault(id(layer.lora_b_stacked), set())
            return  # vLLM's kernels, skipped while no slot holds weights for this layer
        if not isinstance(stacked, tuple) or not stacked:
            return
        key = id(stacked[0])
        if key not in self._slora_layers:
            supported = LayerAdapters.supports(layer)
            self._slora_layers[key] = LayerAdapters(layer) if supported else None

    def _slora_store(self, layer: Any) -> LayerAdapters | None:
        stacked = getattr(layer, "lora_a_stacked", None)
        if isinstance(stacked, tuple) and stacked:
            return self._slora_layers.get(id(stacked[0]))
        return None

    def slora_load(self, layer: Any, slot: int, rank: int) -> None:
        """Mirror vLLM's freshly written slot ``slot`` of ``layer`` (rank ≤ ``rank``)."""
        self.slora_register(layer)
        store = self._slora_store(layer)
        if store is not None:
            store.load(layer, slot, rank)

    def slora_unload(self, layer: Any, slot: int) -> None:
        """vLLM emptied ``slot``: drop its true-rank copy for ``layer``."""
        store = self._slora_store(layer)
        if store is not None:
            store.unload(slot)

    def slora_tracks_live(self, layer: Any) -> bool:
        """Whether ``layer`` is an embedding / logits LoRA layer whose live slots decide the
        skip (:meth:`slora_no_weights`)."""
        return id(getattr(layer, "lora_b_stacked", None)) in self._slora_live

    def slora_set_live(self, layer: Any, slots: set[int]) -> None:
        """The slots whose adapter has weights for this embedding / logits ``layer``."""
        self._slora_live[id(layer.lora_b_stacked)] = set(slots)

    def slora_storage(self, lora_a_stacked: tuple[Tensor, ...]) -> LayerAdapters | None:
        """The storage of the layer owning ``lora_a_stacked`` (None if it has none)."""
        return self._slora_layers.get(id(lora_a_stacked[0]))

    # -- per-step metadata --------------------------------------------------------------------

    def update_metadata(self, mapping: Any, lora_index_to_id: list[int | None], max_loras: int,
                        vocab_size: int, **kwargs: Any) -> None:  # fmt: skip
        super().update_metadata(mapping, lora_index_to_id, max_loras, vocab_size, **kwargs)  # type: ignore[misc]
        self.slora_set_token_slots(self.token_lora_indices)  # type: ignore[attr-defined]

    def slora_set_token_slots(self, token_slots: Tensor) -> None:
        """Build this step's token groups from the per-token slots (−1 = no adapter) into
        the fixed buffers every layer reads: once per step, sync-free."""
        n = token_slots.shape[0]
        if n > self._slora_order.shape[0]:
            raise ValueError(
                f"token_slots has {n} tokens, more than the {self._slora_order.shape[0]} "
                "the wrapper was built for (max_num_batched_tokens)"
            )
        meta = ops.build_token_meta(token_slots, self._slora_slots, validate=False, tiles=False)
        self._slora_order[:n].copy_(meta.order)
        self._slora_group_start.copy_(meta.group_start)
        self._slora_group_len.copy_(meta.group_len)
        if self._slora_tiles:  # for the largest batch: tiles past this step's are idle (−1)
            full = ops.LoRAMeta(self._slora_order.shape[0], None, meta.group_slot,
                                meta.group_start, meta.group_len).with_tiles()  # fmt: skip
            self._slora_tile_group.copy_(full.tile_group)
            self._slora_tile_first.copy_(full.tile_first)
        self._slora_num_tokens = n

    def slora_meta(self, num_tokens: int) -> ops.LoRAMeta:
        """This step's token groups for a layer input of ``num_tokens`` rows (rows past the
        step's real tokens — CUDA-graph padding — belong to no group and are not read).
        Fewer rows than the step's tokens, or more than the buffers hold, are refused: the
        groups would index rows x does not have."""
        if not self._slora_num_tokens <= num_tokens <= self._slora_order.shape[0]:
            raise ValueError(
                f"the layer input has {num_tokens} rows but this step's token groups cover "
                f"{self._slora_num_tokens} tokens (buffers for at most "
                f"{self._slora_order.shape[0]}, max_num_batched_tokens): set the step's "
                "token slots (update_metadata) for this batch"
            )
        tiles: tuple[Tensor | None, Tensor | None] = (None, None)
        if self._slora_tiles:
            n = ops.num_tiles(num_tokens, self._slora_slots)
            tiles = (self._slora_tile_group[:n], self._slora_tile_first[:n])
        return ops.LoRAMeta(
            num_tokens,
            self._slora_order[:num_tokens],
            self._slora_group_slot,
            self._slora_group_start,
            self._slora_group_len,
            self._slora_slots,
            *tiles,
        )

    # -- the hot path -------------------------------------------------------------------------

    def add_lora_linear(
        self,
        y: Tensor,
        x: Tensor,
        lora_a_stacked: tuple[Tensor, ...],
        lora_b_stacked: tuple[Tensor, ...],
        scale: float,
        output_slices: tuple[int, ...],
        *,
        buffer: Any = None,
        **kwargs: Any,
    ) -> Any:
        """``y[:, slices] += B_slot(t) (A_slot(t) x_t)`` for every token and slice, one call."""
        store = self.slora_storage(lora_a_stacked)
        if store is None or scale != 1.0 or buffer is not None or x.dtype != store.packed.dtype:
            return super().add_lora_linear(  # type: ignore[misc]
                y, x, lora_a_stacked, lora_b_stacked, scale, output_slices, buffer=buffer,
                **kwargs,
            )  # fmt: skip
        y2 = y.view(-1, y.shape[-1])
        x2 = x.reshape(-1, x.shape[-1])
        if not kwargs.get("add_inputs", True):
            y2.zero_()
        ops.multi_lora(x2, None, store.packed, meta=self.slora_meta(x2.shape[0]), out=y2)
        return y

    # -- embedding and logits LoRA --------------------------------------------------------------

    def slora_no_weights(self, lora_b_stacked: Tensor) -> bool:
        """True when no slot holds weights for this embedding / logits layer (adapters rarely
        train ``embed_tokens`` / ``lm_head``): vLLM's padded gather would add exact zeros, so
        it is skipped.  Decided in Python, hence never while a graph is traced or captured
        (vLLM's compiled and CUDA-graph modes run vLLM's path there)."""
        live = self._slora_live.get(id(lora_b_stacked))
        if live is None or live or torch.compiler.is_compiling():
            return False
        return not (lora_b_stacked.is_cuda and torch.cuda.is_current_stream_capturing())

    def add_lora_embedding(self, y: Tensor, x: Tensor, lora_b_stacked: Tensor,
                           add_inputs: bool = True, **kwargs: Any) -> Any:  # fmt: skip
        """``y (+)= x @ B_slot`` of vLLM's embedding LoRA; nothing while no slot has weights."""
        if self.slora_no_weights(lora_b_stacked):
            if not add_inputs:
                y.zero_()
            return y
        return super().add_lora_embedding(y, x, lora_b_stacked, add_inputs, **kwargs)  # type: ignore[misc]

    def add_lora_logits(self, y: Tensor, x: Tensor, lora_a_stacked: Tensor,
                        lora_b_stacked: Tensor, scale: float, *, buffer: Any = None,
                        **kwargs: Any) -> Any:  # fmt: skip
        """``y += B_slot (A_slot x)`` of vLLM's logits LoRA; nothing while no slot has weights."""
        if self.slora_no_weights(lora_b_stacked):
            return y
        return super().add_lora_logits(  # type: ignore[misc]
            y, x, lora_a_stacked, lora_b_stacked, scale, buffer=buffer, **kwargs
        )


class StandaloneWrapper(SloraWrapperMixin):
    """The slora half of the wrapper without vLLM, for benchmarks: per-token slots are set
    with :meth:`slora_set_token_slots`; layers are anything with vLLM's padded
    ``lora_a_stacked`` / ``lora_b_stacked`` tuples."""

    def __init__(self, max_num_batched_tokens: int, device: Any, max_loras: int,
                 tiles: bool | None = None) -> None:  # fmt: skip
        from types import SimpleNamespace

        config = SimpleNamespace(max_loras=max_loras)
        self._slora_setup(max_num_batched_tokens, device, config, tiles)


def gathered_lora(
    y: Tensor, x: Tensor, lora_b_stacked: Tensor, slots: Tensor, add_inputs: bool = True,
    lora_a_stacked: Tensor | None = None, scale: float = 1.0,
) -> None:  # fmt: skip
    """``y[t] (+)= B_k (s · A_k x_t)`` (or ``x_t @ B_kᵀ`` without A) for token slot ``k =
    slots[t]``, and nothing for ``k = −1``: vLLM's CPU logits / embedding LoRA (a per-token
    gather of the padded slot buffers), except that vLLM's indexes slot −1 as the *last* slot,
    giving requests without an adapter that slot's adapter.  Accumulates in fp32; columns past
    the adapter's width (vocabulary padding) are left alone."""
    y2, x2 = y.view(-1, y.shape[-1]), x.reshape(-1, x.shape[-1]).float()
    live = (slots >= 0)[:, None]
    picked = slots.clamp(min=0)
    if lora_a_stacked is not None:
        A = lora_a_stacked[picked].flatten(1, -2).float()  # [T, r, d_in]
        x2 = scale * torch.einsum("ti,tri->tr", x2, A)
    B = lora_b_stacked[picked].flatten(1, -2).float()  # [T, d_out, r]
    delta = torch.einsum("tr,tor->to", x2, B).masked_fill_(~live, 0.0)
    n = min(delta.shape[1], y2.shape[1])
    if add_inputs:
        y2[:, :n] += delta[:, :n].to(y2.dtype)
    else:
        y2[:, :n] = delta[:, :n].to(y2.dtype)


def _cpu_class() -> type:
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

    class SloraPunicaWrapperCPU(SloraWrapperMixin, PunicaWrapperCPU):
        """vLLM's CPU wrapper with LoRA linear layers on slora's C++ op, and its logits /
        embedding LoRA with slot −1 meaning no adapter (:func:`gathered_lora`)."""

        def __init__(self, max_num_batched_tokens: int, max_batches: int, device: Any,
                     **kwargs: Any) -> None:  # fmt: skip
            PunicaWrapperCPU.__init__(self, max_num_batched_tokens, max_batches, device, **kwargs)
            self._slora_setup(max_num_batched_tokens, device, kwargs["lora_config"])
            _announce(type(self).__name__, torch.device(device))

        def add_lora_embedding(self, y: Tensor, x: Tensor, lora_b_stacked: Tensor,
                               add_inputs: bool = True, **kwargs: Any) -> Any:  # fmt: skip
            if self.slora_no_weights(lora_b_stacked):
                return super().add_lora_embedding(y, x, lora_b_stacked, add_inputs, **kwargs)
            gathered_lora(y, x, lora_b_stacked, self.token_lora_indices[: x.shape[0]],
                          add_inputs)  # fmt: skip
            return y

        def add_lora_logits(self, y: Tensor, x: Tensor, lora_a_stacked: Tensor,
                            lora_b_stacked: Tensor, scale: float, *, buffer: Any = None,
                            **kwargs: Any) -> Any:  # fmt: skip
            if self.slora_no_weights(lora_b_stacked):
                return y
            slots = self.sampler_indices
            gathered_lora(y, x, lora_b_stacked, slots, True, lora_a_stacked, scale)
            return y

    return SloraPunicaWrapperCPU


def _gpu_class() -> type:
    from vllm.lora.punica_wrapper.punica_gpu import PunicaWrapperGPU

    class SloraPunicaWrapperGPU(SloraWrapperMixin, PunicaWrapperGPU):  # type: ignore[misc]
        """vLLM's GPU wrapper with LoRA linear layers on slora's Triton kernels."""

        def __init__(self, max_num_batched_tokens: int, max_batches: int, device: Any,
                     **kwargs: Any) -> None:  # fmt: skip
            PunicaWrapperGPU.__init__(self, max_num_batched_tokens, max_batches, device, **kwargs)
            self._slora_setup(max_num_batched_tokens, device, kwargs["lora_config"])
            _announce(type(self).__name__, torch.device(device))

    return SloraPunicaWrapperGPU


_CLASSES = {"SloraPunicaWrapperCPU": _cpu_class, "SloraPunicaWrapperGPU": _gpu_class}


def __getattr__(name: str) -> type:
    """The wrapper classes subclass vLLM's and are built on first use (vLLM imported then)."""
    if name in _CLASSES:
        cls = _CLASSES[name]()
        cls.__module__ = __name__
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
