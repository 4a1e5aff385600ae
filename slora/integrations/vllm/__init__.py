"""vLLM plugin: vLLM's LoRA layers run through slora's grouped kernels at true ranks.

Installed with slora (entry point ``vllm.general_plugins`` → :func:`register`), so every vLLM
process — ``LLM(...)``, ``vllm serve``, the engine core and its workers — loads it with no
change to the user's command.  ``SLORA_VLLM=0`` in the environment leaves vLLM stock.

What it changes (see docs/vllm.md):

- the platform's punica wrapper (``Platform.get_punica_wrapper()``, resolved by
  ``vllm.lora.punica_wrapper.punica_selector``) names a subclass of vLLM's own CPU or GPU
  wrapper whose ``add_lora_linear`` runs every slice of a layer (q/k/v, gate/up) in one
  ``slora.ops.multi_lora`` call, with the token groups built once per step in
  ``update_metadata``;
- ``LoRAModelManager.activate_adapter`` also packs the adapter it just wrote into vLLM's
  padded slot buffers into slora's true-rank storage (:mod:`.storage`), so the kernels never
  read rows past an adapter's rank.

Everything else (embeddings, logits, MoE, fully sharded shrink/expand) stays vLLM's; the
embedding and logits LoRA calls are skipped while no loaded adapter has weights there.
"""

from __future__ import annotations

import logging
import os

logger = logging.getLogger("slora.vllm")

ENV_SWITCH = "SLORA_VLLM"

# vLLM's stock wrapper class -> the slora subclass that replaces it.
_REPLACEMENTS = {
    "vllm.lora.punica_wrapper.punica_cpu.PunicaWrapperCPU": (
        "slora.integrations.vllm.wrapper.SloraPunicaWrapperCPU"
    ),
    "vllm.lora.punica_wrapper.punica_gpu.PunicaWrapperGPU": (
        "slora.integrations.vllm.wrapper.SloraPunicaWrapperGPU"
    ),
}


def enabled() -> bool:
    """False when ``SLORA_VLLM=0`` (or ``false`` / ``off``) is set in the environment."""
    return os.environ.get(ENV_SWITCH, "1").strip().lower() not in ("0", "false", "off", "no")


def register() -> None:
    """The ``vllm.general_plugins`` entry point (runs in every vLLM process; idempotent)."""
    if not enabled():
        logger.info("%s=0: vLLM's stock LoRA kernels stay in place", ENV_SWITCH)
        return
    from vllm.platforms import current_platform

    platform_cls = type(current_platform)
    if getattr(platform_cls, "_slora_patched", False):
        return
    stock = platform_cls.get_punica_wrapper()
    replacement = _REPLACEMENTS.get(stock)
    if replacement is None:
        logger.warning(
            "slora: no grouped-LoRA wrapper for vLLM's %s on %s; vLLM's own kernels stay",
            stock,
            platform_cls.__name__,
        )
        return
    platform_cls.get_punica_wrapper = classmethod(lambda cls: replacement)
    platform_cls._slora_patched = True

    from slora.integrations.vllm.storage import patch_model_manager

    patch_model_manager()
    logger.info("slora: vLLM LoRA layers run through slora's grouped kernels (%s)", replacement)
