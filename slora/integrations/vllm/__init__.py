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
- ``LoRAModelManager`` (:mod:`.manager`): every slot vLLM writes or empties is mirrored in
  slora's true-rank storage (:mod:`.storage`), so the kernels never read rows past an
  adapter's rank, and the stores' buffers never move once the engine runs.

Everything else (embeddings, logits, MoE, fully sharded shrink/expand) stays vLLM's; the
embedding and logits LoRA calls are skipped while no loaded adapter has weights there.
The process that runs the LoRA layers says once, through vLLM's logger, that slora is on and
which wrapper and backend serve them.
"""

from __future__ import annotations

import logging
import os

ENV_SWITCH = "SLORA_VLLM"
_ON = ("", "1", "true", "on", "yes")
_OFF = ("0", "false", "off", "no")

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
    """Whether the plugin is on: ``SLORA_VLLM`` unset, empty, ``1``, ``true``, ``on`` or ``yes``
    (any case); off for ``0``, ``false``, ``off`` or ``no``; any other value is an error."""
    value = os.environ.get(ENV_SWITCH, "").strip().lower()
    if value in _ON:
        return True
    if value in _OFF:
        return False
    raise ValueError(
        f"{ENV_SWITCH}={os.environ[ENV_SWITCH]!r} is not understood: expected 1/true/on/yes "
        "(slora's kernels, the default) or 0/false/off/no (stock vLLM)"
    )


def register() -> None:
    """The ``vllm.general_plugins`` entry point (runs in every vLLM process; idempotent)."""
    logger = logging.getLogger("vllm.slora")  # under vLLM's "vllm" logger and its handler
    if not enabled():
        logger.info("%s=%s: vLLM's stock LoRA kernels stay in place",
                    ENV_SWITCH, os.environ[ENV_SWITCH])  # fmt: skip
        return
    from vllm.platforms import current_platform

    platform_cls = type(current_platform)
    if getattr(platform_cls, "_slora_patched", False):
        return
    try:
        stock = platform_cls.get_punica_wrapper()
    except NotImplementedError:  # a platform without LoRA support: nothing to replace
        logger.warning("slora: vLLM's %s has no LoRA wrapper; slora stays off",
                       platform_cls.__name__)  # fmt: skip
        return
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

    from slora.integrations.vllm.manager import patch_model_manager

    patch_model_manager()
    logger.debug("slora: vLLM's punica wrapper is now %s", replacement)
