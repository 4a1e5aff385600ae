"""Fine-tuning and evaluation loops of the demo (one method, one seed)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from slora.demo.data import Task
from slora.demo.recipe import Batch, Recipe


def lr_lambda(total_steps: int, warmup_frac: float) -> Callable[[int], float]:
    """Linear warm-up over ``warmup_frac`` of the steps, then linear decay to 0.

    Not transformers' ``get_linear_schedule_with_warmup``: that one gives step 0 a learning
    rate of 0 (warm-up ``s / warm``, here ``(s + 1) / warm``), which would change every
    published demo number; the decay is the same.
    """
    warm = max(1, int(total_steps * warmup_frac)) if warmup_frac > 0 else 0

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return max(0.0, (total_steps - step) / max(1, total_steps - warm))

    return factor


def train(
    model: nn.Module,
    batches: Sequence[Batch],
    recipe: Recipe,
    lr: float,
    on_step: Callable[[int], None] | None = None,
    desc: str = "train",
    progress: bool = True,
    head: Sequence[str] = (),
) -> list[float]:
    """One pass of AdamW over ``batches`` on the trainable parameters; returns the losses.

    Parameters under a module named in ``head`` (however wrapped) get ``recipe.head_lr_mult``
    times the learning rate.
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("the model has no trainable parameter")
    params = [p for _, p in named]
    is_head = [any(f".{h}." in f".{n}" for h in head) for n, _ in named]
    groups = [
        {"params": [p for (_, p), h in zip(named, is_head) if not h], "lr": lr},
        {"params": [p for (_, p), h in zip(named, is_head) if h], "lr": lr * recipe.head_lr_mult},
    ]
    opt = torch.optim.AdamW(
        [g for g in groups if g["params"]], lr=lr, weight_decay=recipe.weight_decay
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(len(batches), recipe.warmup_frac))
    losses = []
    model.train()
    iterator: Any = batches
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(batches, desc=desc, unit="step", leave=False)
    for step, batch in enumerate(iterator):
        loss = model(**batch).loss
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{desc}: the loss is {loss.item()} at step {step}")
        loss.backward()
        if recipe.clip_norm:
            torch.nn.utils.clip_grad_norm_(params, recipe.clip_norm)
        opt.step()
        if on_step is not None:
            on_step(step)
        opt.zero_grad(set_to_none=True)
        sched.step()
        losses.append(float(loss.detach()))
    model.eval()
    return losses


@torch.no_grad()
def evaluate(model: nn.Module, batches: Sequence[Batch]) -> dict[str, float]:
    """Accuracy and the share of the most predicted class (1.0 = collapsed to one class)."""
    model.eval()
    correct, total, counts = 0, 0, {}
    for batch in batches:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        pred = model(**inputs).logits.argmax(-1)
        correct += int((pred == batch["labels"]).sum())
        total += int(pred.numel())
        for c, k in zip(*torch.unique(pred, return_counts=True)):
            counts[int(c)] = counts.get(int(c), 0) + int(k)
    if total == 0:
        raise ValueError("evaluate: no evaluation example")
    return {"accuracy": correct / total, "top_class_share": max(counts.values()) / total}


def lora_parameters(model: nn.Module) -> int:
    """Trainable parameters inside LoRA factors (A, B and AdaLoRA's E), head excluded."""
    return sum(
        p.numel()
        for n, p in model.named_parameters()
        if p.requires_grad and any(k in n for k in ("lora_A", "lora_B", "lora_E"))
    )


def warm_up_head(
    model: nn.Module, task: Task, recipe: Recipe, batches: list[Batch], progress: bool = True
) -> None:
    """Train only the head (a linear probe) so that calibration gradients are not those of a
    random head; the model's ``requires_grad`` flags are restored afterwards."""
    flags = {p: p.requires_grad for p in model.parameters()}
    model.requires_grad_(False)
    for name in task.head:
        model.get_submodule(name).requires_grad_(True)
    try:
        head_recipe = replace(recipe, head_lr_mult=1.0)
        lr = recipe.lr * recipe.head_lr_mult
        train(model, batches, head_recipe, lr, desc="head warm-up", progress=progress)
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
