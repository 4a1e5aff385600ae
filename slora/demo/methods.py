"""The compared methods: slora rank plans, PEFT AdaLoRA and PEFT EVA, ready to train."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch import nn

import slora
from slora.core.allocation import RankPlan
from slora.demo.data import Task
from slora.demo.recipe import FULL_METHODS, Batch, Recipe


@dataclass
class Prepared:
    """A trainable model, its per-step hook, and how to read its ranks and its final LoRA
    parameter count after training (None: the count before training holds)."""

    model: nn.Module
    on_step: Callable[[int], None] | None = None
    ranks: Callable[[], dict[str, int]] | None = None
    final_params: Callable[[], int] | None = None

    def outcome(self, lora_params: int, losses: Sequence[float]) -> dict:
        """What every run records of its model after training: LoRA parameters before and
        after (AdaLoRA prunes), the ranks, and the loss over the last tenth of the steps."""
        return {
            "lora_params": lora_params,
            "final_lora_params": self.final_params() if self.final_params else lora_params,
            "ranks": self.ranks() if self.ranks else None,
            "final_loss": statistics.fmean(losses[-max(1, len(losses) // 10) :]),
        }


def _adalora_kept(pm: nn.Module) -> dict[str, tuple[int, int]]:
    """Per AdaLoRA module: (triplets kept, i.e. nonzero E entries; parameters per triplet).

    A kept triplet is one row of A, one column of B and one E entry; pruned triplets stay
    allocated but are masked to zero, so they are not part of the final budget.
    """
    out = {}
    for name, mod in pm.named_modules():
        e = getattr(mod, "lora_E", None)
        if e is not None and "default" in e:
            a, b = mod.lora_A["default"], mod.lora_B["default"]
            kept = int((e["default"].detach() != 0).sum())
            out[name.removeprefix("base_model.model.")] = (kept, a.shape[1] + b.shape[0] + 1)
    return out


def _target_names(model: nn.Module, task: Task) -> list[str]:
    from slora.core.targets import find_targets

    return list(find_targets(model, task.target_modules))


def prepare(
    method: str,
    model: nn.Module,
    task: Task,
    recipe: Recipe,
    plans: dict[str, RankPlan],
    total_steps: int,
    calib: list[Batch],
    progress: bool = True,
) -> Prepared:
    """Turn a fresh base model into the trainable model of ``method``."""
    if method in plans:
        slora.patch(model, plans[method], modules_to_save=task.head)
        return Prepared(model, ranks=lambda: dict(plans[method].ranks))
    names = _target_names(model, task)
    r = max(1, round(recipe.avg_rank))
    if method == "adalora":
        from peft import AdaLoraConfig, get_peft_model

        init_r = math.ceil(1.5 * r)
        tinit = int(0.1 * total_steps)
        tfinal = int(0.3 * total_steps)
        if tinit >= total_steps - tfinal:
            tinit, tfinal = 0, 0
        cfg = AdaLoraConfig(
            task_type="SEQ_CLS",
            target_r=r,
            init_r=init_r,
            lora_alpha=2 * init_r,  # scale lora_alpha / init_r = 2, as for the LoRA methods
            target_modules=names,
            modules_to_save=list(task.head),
            total_step=max(2, total_steps),
            tinit=tinit,
            tfinal=tfinal,
            deltaT=max(1, total_steps // 50),
            orth_reg_weight=recipe.adalora_orth_reg,
            lora_dropout=0.0,
        )
        pm = get_peft_model(model, cfg)
        if recipe.adalora_target_triplets is not None:
            pm.base_model.rankallocator.target_bgt = int(recipe.adalora_target_triplets)

        return Prepared(
            pm,
            on_step=lambda s: pm.base_model.update_and_allocate(s),
            ranks=lambda: {n: k for n, (k, _) in _adalora_kept(pm).items()},
            final_params=lambda: sum(k * c for k, c in _adalora_kept(pm).values()),
        )
    if method == "eva":
        from peft import EvaConfig, LoraConfig, get_peft_model, initialize_lora_eva_weights

        cfg = LoraConfig(
            task_type="SEQ_CLS",
            r=r,
            lora_alpha=2 * r,
            target_modules=names,
            modules_to_save=list(task.head),
            init_lora_weights="eva",
            eva_config=EvaConfig(rho=recipe.eva_rho),
            lora_dropout=0.0,
        )
        pm = get_peft_model(model, cfg, low_cpu_mem_usage=True)
        unlabelled = [{k: v for k, v in b.items() if k != "labels"} for b in calib]
        initialize_lora_eva_weights(pm, dataloader=unlabelled, show_progress_bar=progress)

        def eva_ranks() -> dict[str, int]:
            out = {}
            for n, mod in pm.named_modules():
                a = getattr(mod, "lora_A", None)
                if isinstance(a, nn.ModuleDict) and "default" in a:
                    out[n.removeprefix("base_model.model.")] = int(a["default"].weight.shape[0])
            return out

        return Prepared(pm, ranks=eva_ranks)
    raise ValueError(f"unknown method {method!r}; expected one of {FULL_METHODS}")
