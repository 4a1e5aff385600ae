"""Calibration batches and losses as ``slora.analyze`` meets them: calling the model, moving
batches, refusing inputs it would silently misread (a padding mask it cannot see), naming the
real cause when a loss cannot give gradients, and reporting targets that never ran."""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from slora.core.metrics import MatrixStats


def default_loss(model: nn.Module, batch: Any) -> Tensor:
    """``model(**batch).loss`` for dict batches (transformers models)."""
    out = call_model(model, batch)
    if isinstance(out, (tuple, list, Tensor)):
        kind = f"a {type(out).__name__}" + (
            f" of {len(out)}" if not isinstance(out, Tensor) else ""
        )
        raise ValueError(
            f"the model returned {kind}, not an output with a .loss field (the default loss "
            "reads model(**batch).loss): pass loss_fn=lambda model, batch: ... returning a "
            "scalar (e.g. model(**batch)[0] for a transformers model called with "
            "return_dict=False and labels)"
        )
    loss = out.get("loss") if isinstance(out, Mapping) else getattr(out, "loss", None)
    if loss is None:
        raise ValueError(
            "the model returned no loss: put labels in each batch, or pass "
            "loss_fn=lambda model, batch: ... returning a scalar"
        )
    return loss


def call_model(model: nn.Module, batch: Any) -> Any:
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def move_to(batch: Any, device: torch.device) -> Any:
    """``batch`` on ``device``; inference tensors (made under ``torch.inference_mode()``)
    become ordinary ones, which autograd can save for the backward."""
    if isinstance(batch, Tensor):
        if batch.is_inference():
            with torch.inference_mode(False):
                batch = batch.clone()
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: move_to(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(move_to(v, device) for v in batch)
    return batch


def join_anchor(calib: Any):
    """Forward hook on an embedding: its output joins the graph through the zero anchor, so
    it requires grad and a reentrant ``torch.utils.checkpoint`` further on recomputes its
    segment in the backward (otherwise the frozen model gives it nothing to differentiate)."""

    def hook(module: nn.Module, args: tuple, output: Tensor) -> Tensor | None:
        if not torch.is_grad_enabled() or not output.is_floating_point():
            return None
        return output + calib.anchor.to(output.dtype)

    return hook


def refuse_inference_parameters(model: nn.Module, estimator: str) -> None:
    """Gradient estimators need a backward, which parameters made under inference mode
    cannot take part in."""
    if estimator != "activation" and any(p.is_inference() for p in model.parameters()):
        raise ValueError(
            f"slora.analyze: the model's parameters were made under torch.inference_mode(), and "
            f"autograd cannot use them (estimator={estimator!r} needs a backward): load the "
            "model outside inference mode, or use estimator='activation'"
        )


def padding_mask(batch: Any) -> Tensor | None:
    """The batch's ``attention_mask`` ([batch, seq], 1 = real token), None if it has none;
    a tuple batch that looks padded, or a mask of another shape, is refused."""
    if isinstance(batch, (tuple, list)):
        refuse_positional_mask(batch)
    mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
    if mask is None:
        return None
    mask = torch.as_tensor(mask)
    if mask.dim() not in (1, 2):
        raise ValueError(
            "slora.analyze: attention_mask must be [batch, seq] (1 = real token, 0 = "
            f"padding), got shape {tuple(mask.shape)}; pass a 4-D attention mask under "
            "another key and a [batch, seq] padding mask as attention_mask"
        )
    return mask


def refuse_positional_mask(batch: tuple | list) -> None:
    """A tuple batch ``(input_ids, attention_mask, ...)`` is called positionally, so slora
    cannot tell which element masks padding: refuse it when an element looks like a mask
    with padding in it, rather than count the padding as tokens."""
    first = batch[0] if batch else None
    if not isinstance(first, Tensor) or first.dim() < 2 or first.is_floating_point():
        return
    for k, t in enumerate(batch[1:], start=1):
        if (
            isinstance(t, Tensor)
            and t.shape == first.shape
            and not t.is_floating_point()
            and bool(((t == 0) | (t == 1)).all())
            and not bool(t.bool().all())
        ):
            raise ValueError(
                f"slora.analyze: calibration batch is a {type(batch).__name__} whose element "
                f"{k} looks like an attention mask with padding (0/1 values, the shape "
                f"{tuple(first.shape)} of element 0); slora masks padding only in dict batches "
                "(key 'attention_mask') and would count the padded positions as tokens. Pass "
                "each batch as a dict, e.g. {'input_ids': ids, 'attention_mask': mask, "
                "'labels': labels}"
            )


def checked_stats(calib: Any, estimator: str) -> dict[str, MatrixStats]:
    """Every target's statistics; a target whose forward never ran (its parent reads its
    weight without calling it, or the data never reaches it) is left out of the report with a
    warning rather than given the minimum rank, and one that no gradient reached is named."""
    never = [n for n, c in calib.collectors.items() if c.total.tokens == 0]
    if len(never) == len(calib.collectors):
        raise ValueError(
            "slora.analyze: no target module ran its forward during calibration "
            f"({', '.join(never[:4])}): the model reads their weights without calling them, "
            "or the batches never reach them; pick target_modules that the model calls"
        )
    if never:
        warnings.warn(
            f"slora.analyze: {len(never)} target module(s) never ran their forward during "
            f"calibration and are left out of the report (no rank): {', '.join(never[:6])}. "
            "Their parent reads the weight without calling the module (a fused fast path) or "
            "the batches never reach them",
            UserWarning,
            stacklevel=3,
        )
    if estimator != "activation":
        dark = [
            n
            for n, c in calib.collectors.items()
            if c.total.tokens and c.ever_hooked and not c.ever_fired
        ]
        if dark:
            warnings.warn(
                f"slora.analyze: no gradient reached {len(dark)} target module(s) "
                f"({', '.join(dark[:6])}): their outputs do not affect the loss, so their "
                "gradient statistics are zero",
                UserWarning,
                stacklevel=3,
            )
    return {name: c.total for name, c in calib.collectors.items() if name not in never}


def device_of(module: nn.Module) -> torch.device:
    """Where the model computes: its first parameter's device, or, when its weights are
    offloaded (accelerate leaves them on the meta device and brings them in per layer), the
    execution device of accelerate's hooks."""
    for param in module.parameters():
        if param.device.type != "meta":
            return param.device
    for sub in module.modules():
        device = getattr(getattr(sub, "_hf_hook", None), "execution_device", None)
        if device is not None:
            return torch.device(device if not isinstance(device, int) else f"cuda:{device}")
    return torch.device("cpu")


def progress_bar(iterable: Iterable, total: int | None, enabled: bool, desc: str):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, unit="batch", leave=False)
