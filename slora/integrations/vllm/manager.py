"""Hooks on vLLM's ``LoRAModelManager`` that keep slora's stores in step with vLLM's slots.

vLLM changes a slot in four places, all on the engine's own thread between steps:
``_create_lora_modules`` (the LoRA layers are built), ``activate_adapter`` (an adapter is
written into a free slot), ``_deactivate_adapter`` (a slot is emptied: LRU eviction,
``deactivate_adapter``, ``remove_adapter``, a run-time ``/v1/unload_lora_adapter``) and
``remove_all_adapters`` (after the warm-up's dummy adapters).  After each, the true-rank stores
(:mod:`.storage`) and the embedding / logits skip (which slots hold weights for those layers)
are brought back to vLLM's state, so both are right in every state: a fresh engine after its
warm-up, while adapters churn, and after an adapter with ``lm_head`` weights has left.
"""

from __future__ import annotations

import functools
from typing import Any

from slora.integrations.vllm.storage import rank_hint
from slora.integrations.vllm.wrapper import SloraWrapperMixin


def _slora_wrapper(module: Any) -> SloraWrapperMixin | None:
    wrapper = getattr(module, "punica_wrapper", None)
    return wrapper if isinstance(wrapper, SloraWrapperMixin) else None


def _layer_weights(manager: Any, lora_id: int | None, name: str) -> Any:
    """vLLM's weights of adapter ``lora_id`` for module ``name`` (None if it has none).

    Read through the cache's read-only view: a plain lookup in vLLM's LRU cache of adapters
    counts as a use and would change which adapter vLLM evicts next (an adapter that the
    running batch still needs, then missing from the slots)."""
    if lora_id is None:
        return None
    registered = manager._registered_adapters
    lora_model = getattr(registered, "cache", registered).get(lora_id)
    return None if lora_model is None else manager._get_lora_layer_weights(lora_model, name)


def register_layers(manager: Any) -> None:
    """Give every LoRA linear layer of ``manager`` its (empty) true-rank storage."""
    for module in manager.modules.values():
        wrapper = _slora_wrapper(module)
        if wrapper is not None:
            wrapper.slora_register(module)
    refresh_live(manager)


def refresh_live(manager: Any) -> None:
    """Recompute, for every embedding / logits LoRA layer, the slots whose adapter has
    weights there, from vLLM's slot table (never from earlier marks)."""
    slots = list(enumerate(manager.lora_index_to_id))
    for name, module in manager.modules.items():
        wrapper = _slora_wrapper(module)
        if wrapper is not None and wrapper.slora_tracks_live(module):
            live = {k for k, lid in slots if rank_hint(_layer_weights(manager, lid, name)) > 0}
            wrapper.slora_set_live(module, live)


def sync_slot(manager: Any, lora_id: int) -> None:
    """After vLLM wrote adapter ``lora_id`` into its slot, mirror it at true ranks."""
    slot = manager.lora_index_to_id.index(lora_id)
    for name, module in manager.modules.items():
        wrapper = _slora_wrapper(module)
        if wrapper is not None:
            wrapper.slora_load(module, slot, rank_hint(_layer_weights(manager, lora_id, name)))
    refresh_live(manager)


def clear_slots(manager: Any, slots: list[int]) -> None:
    """After vLLM emptied ``slots``: drop their true-rank copies and live marks."""
    for module in manager.modules.values():
        wrapper = _slora_wrapper(module)
        if wrapper is not None:
            for slot in slots:
                wrapper.slora_unload(module, slot)
    refresh_live(manager)


def patch_model_manager() -> None:
    """Wrap the four methods named in the module docstring (idempotent)."""
    from vllm.lora.model_manager import LoRAModelManager

    if getattr(LoRAModelManager, "_slora_patched", False):
        return
    create = LoRAModelManager._create_lora_modules
    activate = LoRAModelManager.activate_adapter
    deactivate = LoRAModelManager._deactivate_adapter
    remove_all = LoRAModelManager.remove_all_adapters

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

    @functools.wraps(deactivate)
    def _deactivate_adapter(self: Any, lora_id: int) -> None:
        before = list(self.lora_index_to_id)
        deactivate(self, lora_id)
        emptied = [k for k, (old, new) in enumerate(zip(before, self.lora_index_to_id))
                   if old is not None and new is None]  # fmt: skip
        if emptied:
            clear_slots(self, emptied)

    @functools.wraps(remove_all)
    def remove_all_adapters(self: Any) -> None:
        remove_all(self)
        clear_slots(self, list(range(len(self.lora_index_to_id))))

    LoRAModelManager._create_lora_modules = _create_lora_modules
    LoRAModelManager.activate_adapter = activate_adapter
    LoRAModelManager._deactivate_adapter = _deactivate_adapter
    LoRAModelManager.remove_all_adapters = remove_all_adapters
    LoRAModelManager._slora_patched = True
