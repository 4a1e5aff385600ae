"""Adapters on disk in the PEFT format: ``adapter_config.json`` +
``adapter_model.safetensors``.

By default the per-module scale is folded into ``lora_B`` and every module's alpha equals its
rank, so the scale is 1 both for PEFT (which reads ``rank_pattern``/``alpha_pattern``) and for
servers such as vLLM that apply one global ``lora_alpha / r``.  Loading reads safetensors only
(never pickle) and checks every tensor's name and shape against the config and the base model
before the model is touched.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slora.core.checks import finite_number, read_json, whole_number
from slora.core.dist import full_tensor, sharded_parameters, wait_for_writer, writes_files
from slora.core.files import write_files
from slora.core.patch import apply_plan, get_state, lora_layers, plan_for_ranks
from slora.core.peft_config import check_supported, outside_config, pattern_value
from slora.core.quantized import unsupported_message
from slora.core.targets import is_linear_like, linear_dims
from slora.core.transaction import transaction
from slora.core.wrappers import canonical_name, refuse_ddp, unwrap

_FLOAT_DTYPES = {
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
}
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."


def save_adapter(model: nn.Module, out_dir: str | Path, *, fold_scale: bool = True) -> Path:
    """Write the patched model's adapters (and ``modules_to_save``) in the PEFT format.

    ``fold_scale=False`` keeps B unscaled and writes the scales as ``alpha_pattern`` instead
    (PEFT reproduces it; servers that read only the global alpha do not).  A model sharded by
    FSDP2 (DTensor parameters) is gathered: call this on every process; global rank 0 writes
    one complete adapter and every process returns once it is written.  A
    ``torch.compile``-d, DataParallel or DDP model is saved under the plain model's names.
    Both files are written beside their final names and renamed in together: a failure at any
    point leaves a previous adapter in ``out_dir`` intact.
    """
    from safetensors.torch import save_file

    model = unwrap(model)
    state = get_state(model)
    layers = {canonical_name(n): m for n, m in lora_layers(model).items()}
    if state.merged:
        raise ValueError("the adapters are merged into the base weights; save before slora.merge")
    sharded = bool(sharded_parameters(model))
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"save_adapter: {str(out)!r} exists and is not a directory")
    tensors: dict[str, torch.Tensor] = {}
    ranks, alphas = {}, {}
    for name, layer in layers.items():  # the same order on every process: gathers pair up
        a = full_tensor(layer.lora_A.weight.detach())
        b = full_tensor(layer.lora_B.weight.detach())
        if fold_scale:
            b = b * layer.scale
            alphas[name] = float(layer.rank)
        else:
            alphas[name] = layer.scale * (math.sqrt(layer.rank) if state.use_rslora else layer.rank)
        tensors[f"{PREFIX}{name}.lora_A.weight"] = a.contiguous()
        tensors[f"{PREFIX}{name}.lora_B.weight"] = b.contiguous()
        ranks[name] = layer.rank
    for name in state.modules_to_save:
        for key, value in model.get_submodule(name).state_dict().items():
            tensors[f"{PREFIX}{canonical_name(name)}.{key}"] = full_tensor(
                value.detach()
            ).contiguous()
    r = max(ranks.values())
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": getattr(getattr(model, "config", None), "_name_or_path", None)
        or None,
        "r": r,
        "lora_alpha": float(r) if fold_scale else alphas[max(ranks, key=ranks.get)],
        "target_modules": sorted(ranks),
        "rank_pattern": ranks,
        "alpha_pattern": alphas,
        "use_rslora": bool(state.use_rslora and not fold_scale),
        "fan_in_fan_out": any(layer.fan_in_fan_out for layer in layers.values()),
        "lora_dropout": 0.0,
        "bias": "none",
        "modules_to_save": [canonical_name(n) for n in state.modules_to_save] or None,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    text = json.dumps(config, indent=2)
    if writes_files(sharded):
        write_files(
            out,
            {
                WEIGHTS_NAME: lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}),
                CONFIG_NAME: lambda tmp: tmp.write_text(text),
            },
        )
    wait_for_writer(sharded)
    return out


@dataclass
class AdapterFile:
    """A validated PEFT LoRA adapter: per-module A, B, rank and scale (not yet applied)."""

    config: dict[str, Any]
    a: dict[str, torch.Tensor]
    b: dict[str, torch.Tensor]
    ranks: dict[str, int]
    scales: dict[str, float]
    extra: dict[str, torch.Tensor]  # modules_to_save tensors, keyed "<module>.<param>"


def read_adapter(adapter_dir: str | Path, base_model: nn.Module | None = None) -> AdapterFile:
    """Read and validate a PEFT LoRA adapter directory without touching any model.

    Only ``adapter_model.safetensors`` is read (a pickle-only ``adapter_model.bin`` is refused).
    With ``base_model`` every tensor is checked against the module it targets.
    """
    from safetensors import safe_open

    path = Path(adapter_dir)
    if not path.is_dir():
        raise FileNotFoundError(f"adapter directory {str(path)!r} does not exist")
    cfg_path, weights = path / CONFIG_NAME, path / WEIGHTS_NAME
    if not weights.exists():
        if (path / "adapter_model.bin").exists():
            raise ValueError(
                f"{path}: only a pickle adapter (adapter_model.bin) is present; slora loads "
                "safetensors only, because unpickling can execute code. Convert it with "
                "safetensors where you trust the file."
            )
        raise FileNotFoundError(f"{path}: {WEIGHTS_NAME} is missing")
    if not cfg_path.exists():
        raise FileNotFoundError(f"{path}: {CONFIG_NAME} is missing")
    config = read_json(cfg_path, "PEFT adapter config")
    if not isinstance(config, dict) or config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{cfg_path}: expected a LoRA adapter (peft_type 'LORA')")
    finite_number("r", config.get("r"), positive=True, where=str(cfg_path))
    finite_number("lora_alpha", config.get("lora_alpha"), positive=True, where=str(cfg_path))
    if not isinstance(config.get("use_rslora", False), bool):
        raise ValueError(
            f"{cfg_path}: use_rslora must be true or false, got {config['use_rslora']!r}"
        )
    patterns = {}
    for field_name in ("rank_pattern", "alpha_pattern"):
        value = config.get(field_name) or {}
        if not isinstance(value, dict):
            raise ValueError(
                f"{cfg_path}: {field_name} must map module names to numbers, got {value!r}"
            )
        for key in value:
            try:
                re.compile(key)
            except re.error as exc:
                raise ValueError(
                    f"{cfg_path}: {field_name} key {key!r} is not a valid regular expression "
                    f"({exc})"
                ) from None
        patterns[field_name] = value
    # Pass 1 reads only the header: every check below runs on shape-only "meta" tensors, so a
    # bad file is refused before any tensor memory is allocated.
    try:
        with safe_open(str(weights), framework="pt") as f:
            header = {k: (f.get_slice(k).get_dtype(), f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as exc:  # noqa: BLE001 - safetensors raises several types on corruption
        raise ValueError(f"{weights}: corrupt or truncated safetensors file ({exc})") from exc
    check_supported(config, list(header), str(path))
    bad = {k: dt for k, (dt, _) in header.items() if dt not in _FLOAT_DTYPES}
    if bad:
        raise ValueError(f"{weights}: tensors must be floating point, got {bad}")
    metas = {
        k: torch.empty(shape, dtype=_FLOAT_DTYPES[dt], device="meta")
        for k, (dt, shape) in header.items()
    }
    a, b, extra, where = {}, {}, {}, {}
    for key, value in metas.items():
        if not key.startswith(PREFIX):
            raise ValueError(f"{weights}: tensor {key!r} does not start with {PREFIX!r}")
        inner = key[len(PREFIX) :]
        inner = re.sub(r"\.(lora_[AB])\.[^.]+\.weight$", r".\1.weight", inner)  # ".default."
        if inner.endswith(".lora_A.weight"):
            a[inner[: -len(".lora_A.weight")]] = value
        elif inner.endswith(".lora_B.weight"):
            b[inner[: -len(".lora_B.weight")]] = value
        else:
            extra[inner] = value
        where[id(value)] = key
    if set(a) != set(b):
        missing = sorted(set(a) ^ set(b))
        raise ValueError(f"{weights}: lora_A/lora_B pairs incomplete for {', '.join(missing[:5])}")
    if not a:
        raise ValueError(f"{weights}: no lora_A/lora_B tensors found")
    dropped, stray = outside_config(config, a, extra, str(path))
    ranks, scales = {}, {}
    for name in a:
        if a[name].dim() != 2 or b[name].dim() != 2 or a[name].shape[0] != b[name].shape[1]:
            raise ValueError(
                f"{weights}: {name}: lora_A {tuple(a[name].shape)} and lora_B "
                f"{tuple(b[name].shape)} are not [r, d_in] and [d_out, r] with one r"
            )
        r = int(a[name].shape[0])
        if r == 0:
            raise ValueError(f"{weights}: {name} has rank 0 (empty lora_A/lora_B)")
        if name in dropped:  # not applied: checked against the model only
            ranks[name], scales[name] = r, 1.0
            continue
        expected_r = whole_number(
            f"rank_pattern value for {name!r}",
            pattern_value(patterns["rank_pattern"], name, config["r"]),
            minimum=1,
            where=str(cfg_path),
        )
        if r != expected_r:
            raise ValueError(f"{weights}: {name} has rank {r}, the config says {expected_r}")
        alpha = finite_number(
            f"alpha_pattern value for {name!r}",
            pattern_value(patterns["alpha_pattern"], name, config["lora_alpha"]),
            positive=True,
            where=str(cfg_path),
        )
        ranks[name] = r
        scales[name] = alpha / (math.sqrt(r) if config.get("use_rslora") else r)
    adapter = AdapterFile(config, a, b, ranks, scales, extra)
    if base_model is not None:  # every tensor must fit the model, applied or not
        check_against_model(adapter, base_model)
    if dropped or stray:
        warnings.warn(
            f"{path}: the config's target_modules / modules_to_save do not cover "
            f"{len(dropped) + len(stray)} tensor group(s) in the file "
            f"({', '.join((dropped + stray)[:4])}); as PEFT does, they are not applied",
            UserWarning,
            stacklevel=2,
        )
    for name in dropped:
        for group in (adapter.a, adapter.b, adapter.ranks, adapter.scales):
            del group[name]
    for key in stray:
        del adapter.extra[key]
    # Pass 2: everything checked; now read the tensors.
    try:
        with safe_open(str(weights), framework="pt") as f:
            for group in (adapter.a, adapter.b, adapter.extra):
                for name, meta in group.items():
                    group[name] = f.get_tensor(where[id(meta)])
    except Exception as exc:  # noqa: BLE001
        raise ValueError(f"{weights}: corrupt or truncated safetensors file ({exc})") from exc
    bad = [
        n
        for n in adapter.a
        if not (adapter.a[n].isfinite().all() and adapter.b[n].isfinite().all())
    ]
    if bad:
        raise ValueError(
            f"{weights}: non-finite values (NaN/Inf) in the adapter of {', '.join(bad[:5])}"
        )
    return adapter


def check_against_model(adapter: AdapterFile, model: nn.Module) -> None:
    """Every adapted module exists, is linear-like and has the adapter's shapes."""
    modules = dict(model.named_modules())
    for name in adapter.a:
        module = modules.get(name)
        if module is None:
            raise ValueError(f"adapter module {name!r} is missing from the base model")
        if not is_linear_like(module):
            raise ValueError(f"adapter targets {unsupported_message(name, module)}")
        d_in, d_out = linear_dims(module)
        if tuple(adapter.a[name].shape) != (adapter.ranks[name], d_in) or tuple(
            adapter.b[name].shape
        ) != (d_out, adapter.ranks[name]):
            raise ValueError(
                f"adapter {name}: lora_A {tuple(adapter.a[name].shape)} / lora_B "
                f"{tuple(adapter.b[name].shape)} do not fit the base layer (d_in={d_in}, "
                f"d_out={d_out})"
            )
    params = dict(model.named_parameters()) | dict(model.named_buffers())
    for key, value in adapter.extra.items():
        if key not in params or params[key].shape != value.shape:
            raise ValueError(
                f"adapter tensor {key!r} {tuple(value.shape)} matches no parameter of the base "
                "model with that shape"
            )


def load_adapter(base_model: nn.Module, adapter_dir: str | Path) -> nn.Module:
    """Patch ``base_model`` with a PEFT-format LoRA adapter (validated before any change).

    A ``torch.compile``-d or DataParallel model is patched underneath and returned as given;
    a DistributedDataParallel one is refused (load before wrapping)."""
    refuse_ddp(base_model, "load_adapter")
    wrapper, base_model = base_model, unwrap(base_model)
    adapter = read_adapter(adapter_dir, base_model)
    saved = sorted({key.rsplit(".", 1)[0] for key in adapter.extra})
    plan = plan_for_ranks(base_model, adapter.ranks)
    params = dict(base_model.named_parameters()) | dict(base_model.named_buffers())
    with transaction() as tx:
        layers = apply_plan(base_model, plan, modules_to_save=saved, tx=tx)
        with torch.no_grad():
            for name, layer in layers.items():
                layer.lora_A.weight.copy_(adapter.a[name])
                layer.lora_B.weight.copy_(adapter.b[name])
                layer.scale = adapter.scales[name]
            for key, value in adapter.extra.items():
                tx.modify_tensor(params[key]).copy_(value)
    return wrapper
