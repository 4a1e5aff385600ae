"""True-rank copies of vLLM's LoRA slots, kept in step with vLLM's model manager.

vLLM stores every LoRA linear layer's adapters in padded per-slot buffers
(``lora_a_stacked[s]``: ``[max_loras, 1, max_lora_rank, d_in]``, ``lora_b_stacked[s]``:
``[max_loras, 1, d_out_s, max_lora_rank]``, scale already folded into B) and writes a slot in
``LoRAModelManager.activate_adapter``.  Right after it, :func:`sync_slot` copies the slot's
first ``r`` rows of A and columns of B — ``r`` the adapter's true rank, trailing all-zero
rank components dropped — into one :class:`slora.ops.PackedAdapters` per layer.  Rows past an
adapter's rank are never read, not even here.
"""

from __future__ import annotations

import functools
from typing import Any

from torch import Tensor

from slora.ops import PackedAdapters


def effective_rank(A: Tensor, B: Tensor) -> int:
    """1 + the last rank component j with both ``A[j]`` and ``B[:, j]`` nonzero (0 if none):
    components past it add nothing, so dropping them is exact."""
    live = (A != 0).any(dim=1) & (B != 0).any(dim=0)
    idx = live.nonzero()
    return int(idx[-1, 0]) + 1 if idx.numel() else 0


def rank_hint(weights: Any) -> int:
    """Largest rank among a vLLM ``LoRALayerWeights``' ``lora_a`` tensors ([r, d_in] each,
    a list for packed q/k/v or gate/up modules; None entries for unadapted slices)."""
    if weights is None:
        return 0
    a = weights.lora_a
    tensors = a if isinstance(a, (list, tuple)) else [a]
    return max((int(t.shape[0]) for t in tensors if t is not None), default=0)


class LayerAdapters:
    """The true-rank :class:`PackedAdapters` of one vLLM LoRA linear layer (one slice per
    entry of ``lora_a_stacked``; slot k = vLLM's slot k)."""

    def __init__(self, layer: Any) -> None:
        a0 = layer.lora_a_stacked[0]
        max_loras, _, pad_rank, d_in = a0.shape
        sizes = [int(b.shape[2]) for b in layer.lora_b_stacked]
        # CUDA graphs replay fixed addresses: reserve the worst case so the buffers never move.
        reserve = a0.device.type == "cuda"
        self.pad_rank = int(pad_rank)
        self.packed = PackedAdapters(
            int(d_in),
            sizes,
            max_slots=int(max_loras),
            dtype=a0.dtype,
            device=a0.device,
            capacity_rows=max_loras * pad_rank * len(sizes) if reserve else 0,
            capacity_b=max_loras * pad_rank * sum(sizes) if reserve else 0,
        )
        if reserve:  # and traced once: the intermediate buffer's size must not change either
            self.packed.reserve_rank(self.pad_rank)

    @staticmethod
    def supports(layer: Any) -> bool:
        """Whether ``layer`` is a LoRA linear layer whose slices this storage can mirror
        (fully sharded layers keep rank-sharded A buffers and run vLLM's shrink/expand)."""
        a = getattr(layer, "lora_a_stacked", None)
        b = getattr(layer, "lora_b_stacked", None)
        if not isinstance(a, tuple) or not isinstance(b, tuple) or len(a) != len(b) or not a:
            return False
        if any(t.dim() != 4 for t in (*a, *b)):
            return False
        return all(ta.shape[2] == tb.shape[3] for ta, tb in zip(a, b))

    def load(self, layer: Any, slot: int, rank: int) -> None:
        """Mirror vLLM's slot ``slot`` of ``layer`` (adapter of rank ≤ ``rank``; 0 = empty)."""
        r = min(rank, self.pad_rank)
        slices = []
        for a, b in zip(layer.lora_a_stacked, layer.lora_b_stacked):
            A, B = a[slot, 0, :r], b[slot, 0, :, :r]
            r_s = effective_rank(A, B) if r else 0
            slices.append((A[:r_s], B[:, :r_s], 1.0) if r_s else None)
        if any(s is not None for s in slices):
            self.packed.load(slot, slices)
        else:
            self.packed.unload(slot)


def _slora_wrapper(module: Any) -> Any:
    from slora.integrations.vllm.wrapper import SloraWrapperMixin

    wrapper = getattr(module, "punica_wrapper", None)
    return wrapper if isinstance(wrapper, SloraWrapperMixin) else None


def register_layers(manager: Any) -> None:
    """Give every LoRA linear layer of ``manager`` its (empty) true-rank storage."""
    for module in manager.modules.values():
        wrapper = _slora_wrapper(module)
        if wrapper is not None:
            wrapper.slora_register(module)


def sync_slot(manager: Any, lora_id: int) -> None:
    """After vLLM wrote adapter ``lora_id`` into its slot, mirror it at true ranks."""
    slot = manager.lora_index_to_id.index(lora_id)
    lora_model = manager._registered_adapters[lora_id]
    for name, module in manager.modules.items():
        wrapper = _slora_wrapper(module)
        if wrapper is not None:
            weights = manager._get_lora_layer_weights(lora_model, name)
            wrapper.slora_load(module, slot, rank_hint(weights))


def patch_model_manager() -> None:
    """Hook :func:`register_layers` after ``LoRAModelManager._create_lora_modules`` and
    :func:`sync_slot` after ``activate_adapter`` (idempotent)."""
    from vllm.lora.model_manager import LoRAModelManager

    if getattr(LoRAModelManager, "_slora_patched", False):
        return
    create, activate = LoRAModelManager._create_lora_modules, LoRAModelManager.activate_adapter

    @functools.wraps(create)
    def _create_lora_modules(self: Any) -> None:
        create(self)
        register_layers(self)

    @functools.wraps(activate)
    def activate_adapter(self: Any, lora_id: int) -> bool:
        activated = activate(self, lora_id)
        if activated:
            sync_slot(self, lora_id)
        return activated

    LoRAModelManager._create_lora_modules = _create_lora_modules
    LoRAModelManager.activate_adapter = activate_adapter
    LoRAModelManager._slora_patched = True
