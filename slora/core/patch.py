"""Model walking: ``patch`` inserts LoRA layers by plan, ``merge`` and ``unpatch`` undo it.

Scale rule (``lora_alpha``): by default every module gets the same scale
``lora_alpha / r̄`` whatever its rank, where r̄ is the plan's mean non-zero rank and
``lora_alpha`` defaults to ``2·r̄`` (scale 2, the common alpha = 2r convention at the average
rank).  With ``use_rslora=True`` the scale is ``lora_alpha / √r_w`` (rank-stabilised LoRA),
``lora_alpha`` defaulting to ``2·√r̄``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from slora.core import layer as layer_module
from slora.core import quantized
from slora.core.allocation import RankPlan, allocate
from slora.core.analysis import analyze
from slora.core.checks import finite_number
from slora.core.dist import sharded_parameters
from slora.core.layer import LoraLinear
from slora.core.layer import group_shared_inputs as make_lora_groups
from slora.core.metrics import DEFAULT_ESTIMATOR
from slora.core.targets import is_linear_like, linear_dims, tied_weights
from slora.core.transaction import Transaction, transaction
from slora.core.wrappers import bypassed_forward, keep_forward_called, refuse_ddp, unwrap

STATE_ATTR = "_slora_state"


@dataclass
class PatchState:
    """What ``patch`` changed, so that ``unpatch`` can restore the model exactly."""

    plan: RankPlan
    lora_alpha: float
    use_rslora: bool
    requires_grad: dict[str, bool]
    modules_to_save: list[str] = field(default_factory=list)
    originals: dict[str, dict[str, Any]] = field(default_factory=dict)
    merged: bool = False
    undo_fused: list[Any] = field(default_factory=list)  # undoes keep_forward_called


def scales_for(ranks: dict[str, int], lora_alpha: float | None, use_rslora: bool):
    """Per-module LoRA scale and the effective ``lora_alpha`` (see the module docstring)."""
    active = [r for r in ranks.values() if r > 0]
    if not active:
        raise ValueError("the plan gives every module rank 0: there is nothing to adapt")
    mean = sum(active) / len(active)
    if lora_alpha is None:
        lora_alpha = 2.0 * (math.sqrt(mean) if use_rslora else mean)
    lora_alpha = finite_number("lora_alpha", lora_alpha, positive=True)
    if use_rslora:
        return {n: lora_alpha / math.sqrt(r) for n, r in ranks.items() if r > 0}, lora_alpha
    return {n: lora_alpha / mean for n, r in ranks.items() if r > 0}, lora_alpha


def get_state(model: nn.Module) -> PatchState:
    state = getattr(unwrap(model), STATE_ATTR, None)
    if state is None:
        raise ValueError("this model is not patched by slora (call slora.patch first)")
    return state


def lora_layers(model: nn.Module) -> dict[str, LoraLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLinear)}


def foreign_lora_modules(model: nn.Module) -> list[str]:
    """Modules that carry another library's LoRA (PEFT's ``lora_A``/``lora_B`` layers),
    as ``"name (module.Class)"``; slora must not wrap or hook them."""
    found = []
    for name, module in model.named_modules():
        if isinstance(module, layer_module.LoraLinear):  # not the name: tests patch it here
            continue
        kind = type(module)
        if kind.__module__.startswith("peft.") or (
            hasattr(module, "lora_A") and hasattr(module, "lora_B")
        ):
            found.append(f"{name or '<model>'} ({kind.__module__}.{kind.__qualname__})")
    return found


def check_patchable(model: nn.Module) -> None:
    """Refuse models that already carry LoRA of any kind, or an AdapterPool's hooks."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if getattr(model, STATE_ATTR, None) is not None:
        raise ValueError("this model is already patched by slora; call slora.unpatch first")
    if getattr(model, "_slora_pool", None) is not None:
        raise ValueError("this model serves an AdapterPool; call the pool's close() first")
    sharded = sharded_parameters(model)
    if sharded:
        raise ValueError(
            f"the model's parameters are already sharded (DTensor, e.g. {sharded[0]!r}: FSDP2's "
            "fully_shard or tensor parallelism); new LoRA parameters would not be sharded nor "
            "their gradients reduced. Call slora.patch on the unsharded model, then fully_shard "
            "(docs/distributed.md)"
        )
    foreign = foreign_lora_modules(model)
    if foreign or hasattr(model, "peft_config"):
        raise ValueError(
            "model already carries another library's LoRA layers "
            f"({', '.join(foreign[:3]) or 'peft_config'}); slora would wrap them. Give slora "
            "the plain base model (e.g. peft_model.unload() or merge_and_unload() first)"
        )


def _shared_modules(model: nn.Module) -> dict[int, list[str]]:
    paths: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        paths.setdefault(id(module), []).append(name)
    return {k: v for k, v in paths.items() if len(v) > 1}


def _validate_plan(model: nn.Module, plan: RankPlan) -> dict[str, nn.Module]:
    if not isinstance(plan, RankPlan):
        raise TypeError(f"plan must be a slora.RankPlan, got {type(plan).__name__}")
    modules = dict(model.named_modules())
    shared = _shared_modules(model)
    found = {}
    for name, rank in plan.ranks.items():
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
            raise ValueError(f"rank of {name!r} must be an int ≥ 0, got {rank!r}")
        if name not in modules:
            raise ValueError(f"the plan names module {name!r}, which the model does not have")
        module = modules[name]
        if not is_linear_like(module):
            message = quantized.unsupported_message(name, module)
            raise ValueError(f"the plan names a module it cannot adapt: {message}")
        bypass = bypassed_forward(model, name) if rank > 0 else None
        if bypass is not None:
            raise ValueError(
                f"the plan gives a rank to {name!r}, whose forward never runs ({bypass}): "
                "its adapter would be silently ignored. Give it rank 0 or leave it out"
            )
        d_in, d_out = linear_dims(module)
        if name in plan.dims and tuple(plan.dims[name]) != (d_in, d_out):
            raise ValueError(
                f"plan shape for {name!r} is (d_in, d_out)={tuple(plan.dims[name])}, the model "
                f"has {(d_in, d_out)}: the plan was made for another model"
            )
        if rank > 0 and quantized.plain_linear_with_integer_weight(module):
            raise ValueError(
                f"{name!r} has a {module.weight.dtype} weight; LoRA needs a floating-point "
                "base weight (float32/float16/bfloat16/float64)"
            )
        if rank > 0 and len(shared.get(id(module), ())) > 1:
            raise ValueError(
                f"module {name!r} is shared: the same module object is also "
                f"{', '.join(repr(p) for p in shared[id(module)] if p != name)}; patching one "
                "path would leave the others without the adapter"
            )
        found[name] = module
    if not any(r > 0 for r in plan.ranks.values()):
        raise ValueError("the plan gives every module rank 0: there is nothing to adapt")
    return found


def _modules_to_save(model: nn.Module, modules_to_save: Sequence[str] | str | None) -> list[str]:
    saved = [modules_to_save] if isinstance(modules_to_save, str) else list(modules_to_save or [])
    all_modules = dict(model.named_modules())
    tied = tied_weights(model)
    for name in saved:
        if not isinstance(name, str) or name not in all_modules:
            raise ValueError(f"modules_to_save names {name!r}, which the model does not have")
        for pname, _ in all_modules[name].named_parameters(prefix=name):
            others = [o for o in tied.get(pname, []) if not o.startswith(name + ".")]
            if others:
                raise ValueError(
                    f"modules_to_save names {name!r}, whose parameter {pname!r} is tied to "
                    f"{', '.join(others)}: training it would change those too. Untie it first "
                    "or leave it out of modules_to_save"
                )
    return saved


def patch(
    model: nn.Module,
    plan: RankPlan | None = None,
    *,
    data: Iterable[Any] | None = None,
    avg_rank: float | None = None,
    lora_alpha: float | None = None,
    lora_dropout: float = 0.0,
    use_rslora: bool = False,
    modules_to_save: Sequence[str] | str | None = None,
    group_shared_inputs: bool = True,
    target_modules: Sequence[str] | str | None = None,
    estimator: str | None = None,
    adapter_dtype: torch.dtype | None = None,
    **allocate_kwargs: Any,
) -> nn.Module:
    """Freeze the base model and insert LoRA adapters with the planned ranks (in place).

    Either pass a ``plan`` from :func:`slora.allocate`, or ``data=`` calibration batches (and
    ``avg_rank`` (8), ``estimator`` (``DEFAULT_ESTIMATOR``), ``target_modules`` and other
    :func:`slora.allocate` arguments) to analyse, allocate and patch in one call.
    ``modules_to_save`` (e.g. a classifier head) stay trainable and are saved with the adapter.
    Returns the same model.  All or nothing: if anything fails, the model is left as it was.

    LoRA weights take each base layer's compute dtype (fp16/bf16 promoted to fp32), or
    ``adapter_dtype``; quantized bases (bitsandbytes 4-/8-bit, torchao, other quantized linear
    layers) are patched like float ones (docs/qlora.md).

    A ``torch.compile``-d or ``DataParallel`` model is patched underneath (the wrapper sees
    the change); a DistributedDataParallel one is refused (patch before wrapping).
    """
    refuse_ddp(model, "patch")
    wrapper, model = model, unwrap(model)
    check_patchable(model)
    if adapter_dtype is not None:
        quantized.check_adapter_dtype(adapter_dtype)
    calibration = {
        "data": data,
        "avg_rank": avg_rank,
        "estimator": estimator,
        "target_modules": target_modules,
        **allocate_kwargs,
    }
    if plan is None:
        if data is None:
            raise ValueError("patch needs a plan (from slora.allocate) or data= to calibrate on")
        report = analyze(
            model, data, estimator=estimator or DEFAULT_ESTIMATOR, target_modules=target_modules
        )
        plan = allocate(report, avg_rank=8 if avg_rank is None else avg_rank, **allocate_kwargs)
    else:
        ignored = [k for k, v in calibration.items() if v is not None]
        if ignored:
            raise ValueError(
                f"patch got plan= and also {', '.join(ignored)}, which apply only when patch "
                "calibrates and allocates itself (data=...): drop them, or pass data= instead "
                "of plan="
            )
    apply_plan(
        model,
        plan,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        use_rslora=use_rslora,
        modules_to_save=modules_to_save,
        group_shared_inputs=group_shared_inputs,
        adapter_dtype=adapter_dtype,
    )
    return wrapper


def apply_plan(
    model: nn.Module,
    plan: RankPlan,
    *,
    lora_alpha: float | None = None,
    lora_dropout: float = 0.0,
    use_rslora: bool = False,
    modules_to_save: Sequence[str] | str | None = None,
    group_shared_inputs: bool = True,
    adapter_dtype: torch.dtype | None = None,
    tx: Transaction | None = None,
) -> dict[str, LoraLinear]:
    """Check everything, then insert the LoRA layers through one transaction; returns them."""
    refuse_ddp(model, "load_adapter")
    model = unwrap(model)
    check_patchable(model)
    lora_dropout = finite_number("lora_dropout", lora_dropout, minimum=0.0)
    if lora_dropout >= 1.0:
        raise ValueError(f"lora_dropout must be in [0, 1), got {lora_dropout}")
    if not isinstance(use_rslora, bool):
        raise ValueError(f"use_rslora must be True or False, got {use_rslora!r}")
    targets = _validate_plan(model, plan)
    saved = _modules_to_save(model, modules_to_save)
    scales, alpha = scales_for(plan.ranks, lora_alpha, use_rslora)
    for name, scale in scales.items():
        finite_number(f"the LoRA scale of {name!r} (lora_alpha / rank)", scale, positive=True)
    all_modules = dict(model.named_modules())
    state = PatchState(
        plan=plan,
        lora_alpha=alpha,
        use_rslora=use_rslora,
        requires_grad={n: p.requires_grad for n, p in model.named_parameters()},
        modules_to_save=saved,
        originals={n: copy.deepcopy(all_modules[n].state_dict()) for n in saved},
    )
    with transaction(tx) as tx, torch.inference_mode(False):
        # (inference_mode off: adapters made inside it would be inference tensors, which can
        # be neither trained nor written outside it)
        for param in model.parameters():
            tx.set_requires_grad(param, False)
        # gradients must cross quantized layers correctly (see quantized.keep_gradients)
        tx.on_undo(quantized.keep_model_gradients(model))
        layers = {}
        for name, module in targets.items():
            if plan.ranks[name] > 0:
                rank, scale = plan.ranks[name], scales[name]
                layers[name] = LoraLinear(module, rank, scale, lora_dropout, adapter_dtype)
                tx.set_module(model, name, layers[name])
        for name in saved:
            for param in model.get_submodule(name).parameters():
                tx.set_requires_grad(param, True)
        for layer in layers.values():
            layer.lora_A.requires_grad_(True)
            layer.lora_B.requires_grad_(True)
        if group_shared_inputs:
            make_lora_groups(layers)
        state.undo_fused = keep_forward_called(model, list(layers))
        tx.on_undo(lambda: [undo() for undo in state.undo_fused])
        tx.set_attr(model, STATE_ATTR, state)
    return layers


def merge(model: nn.Module, *, dequantize: bool = False) -> nn.Module:
    """Fold every adapter into its base weight (outputs unchanged, LoRA branch skipped).

    Refused for a base weight tied to another parameter (``lm_head`` tied to the input
    embeddings): folding the adapter in would change the other module too.  A quantized base
    weight cannot absorb the update exactly, so quantized layers need ``dequantize=True``: each
    becomes a float nn.Linear (compute dtype) holding dequant(W) + scale·B A — the merged model
    equals the adapted one, at float memory for those layers.  All or nothing.
    """
    wrapper, model = model, unwrap(model)
    state = get_state(model)
    layers = lora_layers(model)
    quantized.check_merge(layers, dequantize)
    tied = tied_weights(model)
    for name, layer in layers.items():
        others = [
            o for o in tied.get(f"{name}.base_layer.weight", []) if not o.startswith(name + ".")
        ]
        if others and not layer.merged:
            raise ValueError(
                f"cannot merge the adapter of {name!r}: its weight is tied to "
                f"{', '.join(others)}, which merging would change too. Keep the adapter "
                "unmerged, or untie the weight first (give the module its own copy and set "
                "config.tie_word_embeddings=False)"
            )
    with transaction() as tx:
        for name, layer in layers.items():
            if layer.merged:
                continue
            with torch.no_grad():
                delta = layer.delta_weight()
                if not delta.isfinite().all():
                    raise ValueError(
                        f"cannot merge the adapter of {name!r}: scale·B·A has non-finite "
                        f"values in the base weight's dtype ({delta.dtype})"
                    )
                if quantized.is_quantized(layer.base_layer):
                    tx.set_attr(layer, "_quantized_base", (layer.base_layer,))
                    tx.set_module(layer, "base_layer", quantized.dense_copy(layer.base_layer))
                    layer.base_layer.weight.add_(delta)
                else:
                    tx.modify_tensor(layer.base_layer.weight).add_(delta)
            tx.set_attr(layer, "merged", True)
        tx.set_attr(state, "merged", True)
    return wrapper


def unpatch(model: nn.Module) -> nn.Module:
    """Remove the LoRA layers and restore ``requires_grad``.

    After :func:`merge` the merged weights (and trained ``modules_to_save``) stay; otherwise the
    model is exactly the base model again.  All or nothing.
    """
    wrapper, model = model, unwrap(model)
    state = get_state(model)
    with transaction() as tx:
        for name, layer in lora_layers(model).items():
            tx.set_module(model, name, layer.base_layer)
        if not state.merged:
            for name, weights in state.originals.items():
                module = model.get_submodule(name)
                for tensor in module.state_dict(keep_vars=True).values():
                    tx.modify_tensor(tensor)
                module.load_state_dict(weights)
        for name, param in model.named_parameters():
            tx.set_requires_grad(param, state.requires_grad.get(name, param.requires_grad))
        tx.del_attr(model, STATE_ATTR)
        for undo in state.undo_fused:
            undo()
    return wrapper


def trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def plan_for_ranks(model: nn.Module, ranks: dict[str, int]) -> RankPlan:
    """A RankPlan for explicit ranks (e.g. read from a saved adapter), shapes from the model."""
    modules = dict(model.named_modules())
    dims = {n: linear_dims(modules[n]) for n in ranks if is_linear_like(modules.get(n))}
    return RankPlan(dict(ranks), dims, method="given")
