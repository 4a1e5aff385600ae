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

from torch import nn

from slora.core.allocation import RankPlan, allocate
from slora.core.analysis import analyze
from slora.core.layer import LoraLinear
from slora.core.layer import group_shared_inputs as make_lora_groups
from slora.core.targets import is_linear_like, linear_dims

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


def scales_for(ranks: dict[str, int], lora_alpha: float | None, use_rslora: bool):
    """Per-module LoRA scale and the effective ``lora_alpha`` (see the module docstring)."""
    active = [r for r in ranks.values() if r > 0]
    mean = sum(active) / len(active)
    if lora_alpha is None:
        lora_alpha = 2.0 * (math.sqrt(mean) if use_rslora else mean)
    if use_rslora:
        return {n: lora_alpha / math.sqrt(r) for n, r in ranks.items() if r > 0}, lora_alpha
    return {n: lora_alpha / mean for n, r in ranks.items() if r > 0}, lora_alpha


def get_state(model: nn.Module) -> PatchState:
    state = getattr(model, STATE_ATTR, None)
    if state is None:
        raise ValueError("this model is not patched by slora (call slora.patch first)")
    return state


def lora_layers(model: nn.Module) -> dict[str, LoraLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLinear)}


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def _validate_plan(model: nn.Module, plan: RankPlan) -> dict[str, nn.Module]:
    if not isinstance(plan, RankPlan):
        raise TypeError(f"plan must be a slora.RankPlan, got {type(plan).__name__}")
    modules = dict(model.named_modules())
    found = {}
    for name, rank in plan.ranks.items():
        if not isinstance(rank, int) or rank < 0:
            raise ValueError(f"rank of {name!r} must be an int ≥ 0, got {rank!r}")
        if name not in modules:
            raise ValueError(f"the plan names module {name!r}, which the model does not have")
        if not is_linear_like(modules[name]):
            raise ValueError(
                f"the plan names {name!r}, a {type(modules[name]).__name__}; expected nn.Linear "
                "or Conv1D"
            )
        d_in, d_out = linear_dims(modules[name])
        if name in plan.dims and tuple(plan.dims[name]) != (d_in, d_out):
            raise ValueError(
                f"plan shape for {name!r} is (d_in, d_out)={tuple(plan.dims[name])}, the model "
                f"has {(d_in, d_out)}: the plan was made for another model"
            )
        found[name] = modules[name]
    if not any(r > 0 for r in plan.ranks.values()):
        raise ValueError("the plan gives every module rank 0: there is nothing to adapt")
    return found


def patch(
    model: nn.Module,
    plan: RankPlan | None = None,
    *,
    data: Iterable[Any] | None = None,
    avg_rank: float = 8,
    lora_alpha: float | None = None,
    lora_dropout: float = 0.0,
    use_rslora: bool = False,
    modules_to_save: Sequence[str] | None = None,
    group_shared_inputs: bool = True,
    target_modules: Sequence[str] | str | None = None,
    estimator: str = "fisher",
    **allocate_kwargs: Any,
) -> nn.Module:
    """Freeze the base model and insert LoRA adapters with the planned ranks (in place).

    Either pass a ``plan`` from :func:`slora.allocate`, or ``data=`` calibration batches (and
    ``avg_rank``) to analyse, allocate and patch in one call.  ``modules_to_save`` (e.g. a
    classifier head) stay trainable and are saved with the adapter.  Returns the same model.
    """
    if getattr(model, STATE_ATTR, None) is not None:
        raise ValueError("this model is already patched by slora; call slora.unpatch first")
    if plan is None:
        if data is None:
            raise ValueError("patch needs a plan (from slora.allocate) or data= to calibrate on")
        report = analyze(model, data, estimator=estimator, target_modules=target_modules)
        plan = allocate(report, avg_rank=avg_rank, **allocate_kwargs)
    elif data is not None or allocate_kwargs:
        raise ValueError("pass either plan= or data= (with allocation arguments), not both")
    if not 0.0 <= lora_dropout < 1.0:
        raise ValueError(f"lora_dropout must be in [0, 1), got {lora_dropout}")
    targets = _validate_plan(model, plan)
    saved = list(modules_to_save or [])
    all_modules = dict(model.named_modules())
    for name in saved:
        if name not in all_modules:
            raise ValueError(f"modules_to_save names {name!r}, which the model does not have")
    scales, alpha = scales_for(plan.ranks, lora_alpha, use_rslora)
    state = PatchState(
        plan=plan,
        lora_alpha=alpha,
        use_rslora=use_rslora,
        requires_grad={n: p.requires_grad for n, p in model.named_parameters()},
        modules_to_save=saved,
        originals={n: copy.deepcopy(all_modules[n].state_dict()) for n in saved},
    )
    model.requires_grad_(False)
    for name, module in targets.items():
        if plan.ranks[name] > 0:
            _set_module(
                model, name, LoraLinear(module, plan.ranks[name], scales[name], lora_dropout)
            )
    for name in saved:
        model.get_submodule(name).requires_grad_(True)
    layers = lora_layers(model)
    for layer in layers.values():
        layer.lora_A.requires_grad_(True)
        layer.lora_B.requires_grad_(True)
    if group_shared_inputs:
        make_lora_groups(layers)
    setattr(model, STATE_ATTR, state)
    return model


def merge(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight (outputs unchanged, LoRA branch skipped)."""
    state = get_state(model)
    for layer in lora_layers(model).values():
        layer.merge()
    state.merged = True
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Remove the LoRA layers and restore ``requires_grad``.

    After :func:`merge` the merged weights (and trained ``modules_to_save``) stay; otherwise the
    model is exactly the base model again.
    """
    state = get_state(model)
    for name, layer in lora_layers(model).items():
        _set_module(model, name, layer.base_layer)
    if not state.merged:
        for name, weights in state.originals.items():
            model.get_submodule(name).load_state_dict(weights)
    for name, param in model.named_parameters():
        param.requires_grad_(state.requires_grad.get(name, param.requires_grad))
    delattr(model, STATE_ATTR)
    return model


def trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def plan_for_ranks(model: nn.Module, ranks: dict[str, int]) -> RankPlan:
    """A RankPlan for explicit ranks (e.g. read from a saved adapter), shapes from the model."""
    modules = dict(model.named_modules())
    dims = {n: linear_dims(modules[n]) for n in ranks if is_linear_like(modules.get(n))}
    return RankPlan(dict(ranks), dims, method="given")
