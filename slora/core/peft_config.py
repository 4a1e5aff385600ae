"""What a PEFT adapter config says is applied, read as PEFT reads it: ``target_modules`` /
``exclude_modules`` / ``layers_to_transform`` select the LoRA tensors, ``modules_to_save``
the full ones; features slora does not implement are refused by name."""

from __future__ import annotations

import re
from typing import Any


def pattern_value(patterns: dict[str, Any], name: str, default: Any) -> Any:
    """PEFT's rule: the first key k with re.match(r"(.*\\.)?(k)$", name) wins."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _peft_targets(value: Any, name: str) -> bool:
    """PEFT's ``target_modules`` / ``exclude_modules`` rule: a string is a regular expression
    matched against the whole name, a list holds names matched exactly or as a suffix."""
    if isinstance(value, str):
        return re.fullmatch(value, name) is not None
    return any(name == t or name.endswith("." + t) for t in value)


def _layer_index(name: str, pattern: Any) -> int | None:
    """The layer number in ``name`` (PEFT's ``layers_to_transform`` rule): the number after
    a ``layers_pattern`` component (default: any of layers / layer / h / blocks / block)."""
    if isinstance(pattern, str):
        pattern = [pattern]
    names = "|".join(map(re.escape, pattern or ["layers", "layer", "h", "blocks", "block"]))
    match = re.match(rf"(?:.*\.)?(?:{names})\.(\d+)\.", name)
    return int(match.group(1)) if match else None


def check_supported(config: dict[str, Any], keys: list[str], where: str) -> None:
    """Refuse by name the PEFT LoRA variants slora does not implement (their extra weights
    would otherwise be dropped or misapplied silently)."""
    unsupported = []
    if config.get("use_dora") or any("lora_magnitude_vector" in k for k in keys):
        unsupported.append("DoRA (use_dora / lora_magnitude_vector)")
    if config.get("lora_bias") or any(re.search(r"\.lora_B(\.[^.]+)?\.bias$", k) for k in keys):
        unsupported.append("a bias on lora_B (lora_bias)")
    if any("lora_embedding_" in k for k in keys):
        unsupported.append("LoRA on embedding layers (lora_embedding_A / lora_embedding_B)")
    if config.get("layer_replication"):
        unsupported.append("layer_replication")
    if config.get("bias", "none") not in (None, "none"):
        unsupported.append(f"bias={config['bias']!r} (trained base-layer biases)")
    if config.get("trainable_token_indices") or any("trainable_tokens" in k for k in keys):
        unsupported.append("trainable tokens (trainable_token_indices)")
    if config.get("target_parameters"):
        unsupported.append("LoRA on parameters (target_parameters)")
    if config.get("alora_invocation_tokens"):
        unsupported.append("activated LoRA (alora_invocation_tokens)")
    if unsupported:
        raise ValueError(
            f"{where}: this adapter uses {', '.join(unsupported)}, which slora does not "
            "implement (plain LoRA on nn.Linear / Conv1D only); load it with PEFT instead"
        )
    for field_name in ("target_modules", "exclude_modules", "modules_to_save"):
        value = config.get(field_name)
        ok = (
            value is None
            or isinstance(value, str)
            or (isinstance(value, list) and all(isinstance(t, str) for t in value))
        )
        if not ok:
            raise ValueError(
                f"{where}: {field_name} must be a regular expression or a list of module "
                f"names, got {value!r}"
            )
        if isinstance(value, str) and field_name != "modules_to_save":
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(
                    f"{where}: {field_name} {value!r} is not a valid regular expression ({exc})"
                ) from None


def outside_config(
    config: dict[str, Any], a: dict, extra: dict, where: str
) -> tuple[list[str], list[str]]:
    """What PEFT applies is decided by the config: LoRA tensors of modules outside
    ``target_modules`` (or inside ``exclude_modules``) and full tensors of modules outside
    ``modules_to_save`` are ignored (returned here: (LoRA modules, extra tensor keys)), with a
    warning; ``modules_to_save`` overlapping a LoRA target is refused (the file would both
    replace and adapt one module)."""
    targets, excluded = config.get("target_modules"), config.get("exclude_modules")
    if targets == "all-linear":  # PEFT's shorthand: every linear layer (the file's are)
        targets = None
    layers = config.get("layers_to_transform")
    if isinstance(layers, int):
        layers = [layers]
    dropped = [
        n
        for n in a
        if (targets is not None and not _peft_targets(targets, n))
        or (excluded is not None and _peft_targets(excluded, n))
        or (layers is not None and _layer_index(n, config.get("layers_pattern")) not in layers)
    ]
    saved = config.get("modules_to_save") or []
    if isinstance(saved, str):
        saved = [saved]
    overlap = [n for n in a if n not in dropped and _peft_targets(saved, n)]
    overlap += [k for k in extra if k.rsplit(".", 1)[0] in a and k.rsplit(".", 1)[0] not in dropped]
    if overlap:
        raise ValueError(
            f"{where}: modules_to_save overlaps the LoRA targets ({', '.join(overlap[:4])}): "
            "a module cannot be both replaced by a trained copy and adapted; fix the adapter's "
            "config (PEFT refuses such a config too)"
        )
    stray = [k for k in extra if not _peft_targets(saved, k.rsplit(".", 1)[0])]
    if len(dropped) == len(a):
        raise ValueError(
            f"{where}: no LoRA tensor in the file belongs to the config's target_modules "
            f"{targets!r}"
        )
    return dropped, stray
