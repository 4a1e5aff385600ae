"""Models as users hand them over: wrapped (``torch.compile``, ``DataParallel``, DDP), or
holding linear layers whose forward their parent never calls.

Every entry point works on the model under the wrappers, so that names are the plain model's
(a saved adapter never holds ``_orig_mod.`` or ``module.`` names) and hooks sit on the modules
that really run.  Some parents read a child Linear's weight directly instead of calling it
(``nn.MultiheadAttention.out_proj``, ``nn.TransformerEncoderLayer``'s fused inference path):
an adapter or a statistics hook there would never run, so such targets are refused or, for
the fused path, the fused path is switched off for that layer.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

from torch import nn


def _compiled_type() -> type | None:
    try:
        from torch._dynamo.eval_frame import OptimizedModule
    except Exception:  # noqa: BLE001 - dynamo unavailable on some builds
        return None
    return OptimizedModule


def unwrap(model: nn.Module) -> nn.Module:
    """The model under ``torch.compile`` / ``DataParallel`` / ``DistributedDataParallel``."""
    compiled = _compiled_type()
    parallel = (nn.DataParallel, nn.parallel.DistributedDataParallel)
    while True:
        if compiled is not None and isinstance(model, compiled):
            model = model._orig_mod
        elif isinstance(model, parallel):
            model = model.module
        else:
            return model


def refuse_ddp(model: nn.Module, what: str) -> None:
    """DDP registers its parameters when it is built: parameters added later (new adapters)
    would never have their gradients synchronised."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        raise ValueError(
            f"slora's {what} adds trainable parameters, which a DistributedDataParallel built "
            "before "
            "would never synchronise: call it on the plain model (ddp.module, or the model "
            "before wrapping), then wrap the result in DistributedDataParallel"
        )


def canonical_name(name: str) -> str:
    """``name`` without the ``_orig_mod`` steps of submodules compiled in place."""
    return ".".join(part for part in name.split(".") if part != "_orig_mod")


def bypassed_forward(model: nn.Module, name: str) -> str | None:
    """Why the forward of submodule ``name`` never runs (its parent reads its weight
    directly), or None."""
    parent_name, _, child = name.rpartition(".")
    if not name:
        return None
    parent = model.get_submodule(parent_name) if parent_name else model
    if isinstance(parent, nn.MultiheadAttention) and child == "out_proj":
        return (
            "nn.MultiheadAttention reads out_proj.weight directly and never calls "
            "out_proj's forward"
        )
    return None


def drop_bypassed(model: nn.Module, targets: dict[str, nn.Module], explicit: bool, what: str):
    """``targets`` without the modules whose forward never runs: refused when the caller named
    them (``explicit``), left out with a warning naming them otherwise."""
    bad = {n: r for n in targets if (r := bypassed_forward(model, n)) is not None}
    if not bad:
        return targets
    first = next(iter(bad))
    message = (
        f"{what}: {len(bad)} target module(s) never run their own forward, so an adapter there "
        f"would be silently ignored: {', '.join(list(bad)[:4])} ({bad[first]})"
    )
    if explicit:
        raise ValueError(f"{message}; leave them out of target_modules")
    warnings.warn(f"{message}; they are left out", UserWarning, stacklevel=3)
    return {n: m for n, m in targets.items() if n not in bad}


def _no_op(module: nn.Module, args: tuple) -> None:
    return None


def keep_forward_called(model: nn.Module, names: list[str]) -> list[Callable[[], None]]:
    """Keep torch's fused transformer paths from bypassing the modules ``names``.

    ``nn.TransformerEncoderLayer`` in inference reads linear1/linear2's weights without
    calling them unless a hook is attached (torch checks for any): the layers that hold a
    target get a no-op forward pre-hook.  ``nn.TransformerEncoder`` turns padded batches into
    nested tensors, which linear layers with adapters or statistics cannot take row by row:
    the encoders that hold a target stop doing so.  Returns the undo callables.
    """
    undo: list[Callable[[], None]] = []
    seen: set[int] = set()
    for name in names:
        parts = name.split(".")
        for cut in range(len(parts) - 1, -1, -1):
            parent = model.get_submodule(".".join(parts[:cut])) if cut else model
            if id(parent) in seen:
                continue
            if isinstance(parent, nn.TransformerEncoderLayer):
                seen.add(id(parent))
                undo.append(parent.register_forward_pre_hook(_no_op).remove)
            elif isinstance(parent, nn.TransformerEncoder) and getattr(
                parent, "use_nested_tensor", False
            ):
                seen.add(id(parent))
                parent.use_nested_tensor = False
                undo.append(lambda p=parent: setattr(p, "use_nested_tensor", True))
    return undo


def guard_module_hooks() -> None:
    """Make ``torch.compile`` see forward hooks added after compiling.

    By default dynamo does not guard on nn.Module hooks (``skip_nnmodule_hook_guards``): code
    compiled for a module class before a pool hooked an instance of it would keep serving the
    base model, silently.  The pool turns the guard on (once per process) and drops the code
    compiled without it, so every compiled call checks which hooks are present.
    """
    try:
        import torch._dynamo as dynamo
    except Exception:  # noqa: BLE001 - no dynamo: nothing is compiled
        return
    if getattr(dynamo.config, "skip_nnmodule_hook_guards", False):
        dynamo.config.skip_nnmodule_hook_guards = False
        dynamo.reset()
