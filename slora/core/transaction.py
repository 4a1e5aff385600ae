"""All-or-nothing changes to a model or pool: an undo log that is replayed on failure.

Every mutating call (``patch``, ``load_adapter``, ``merge``, ``unpatch``,
``AdapterPool.load``) makes its changes through one :class:`Transaction`; if anything raises
part-way (a bad module, an interrupt, out of memory), the changes already made are undone in
reverse order and the model or pool is exactly as it was before the call.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

_MISSING = object()


class Transaction:
    """An undo log of changes to modules, attributes, tensors and ``requires_grad`` flags."""

    def __init__(self) -> None:
        self._undo: list[Callable[[], None]] = []

    def on_undo(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` if the transaction fails (after the undos of later changes)."""
        self._undo.append(fn)

    def set_attr(self, obj: Any, name: str, value: Any) -> None:
        """``setattr(obj, name, value)``, undone by restoring (or deleting) the old value."""
        old = obj.__dict__.get(name, _MISSING) if hasattr(obj, "__dict__") else _MISSING
        if old is _MISSING and hasattr(obj, name):
            old = getattr(obj, name)
        setattr(obj, name, value)
        self._undo.append(lambda: _restore_attr(obj, name, old))

    def del_attr(self, obj: Any, name: str) -> None:
        old = getattr(obj, name)
        delattr(obj, name)
        self._undo.append(lambda: setattr(obj, name, old))

    def set_module(self, model: nn.Module, name: str, module: nn.Module) -> None:
        """Put ``module`` at the dotted path ``name`` of ``model``."""
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        old = parent._modules[child]
        setattr(parent, child, module)
        self._undo.append(lambda: setattr(parent, child, old))

    def set_requires_grad(self, param: Tensor, flag: bool) -> None:
        old = param.requires_grad
        param.requires_grad_(flag)
        self._undo.append(lambda: param.requires_grad_(old))

    def modify_tensor(self, tensor: Tensor) -> Tensor:
        """Keep a copy of ``tensor`` to write back on failure; returns ``tensor`` for in-place
        changes.  (The copy costs the tensor's memory until the transaction ends.)"""
        saved = tensor.detach().clone()

        def restore() -> None:
            with torch.no_grad():
                tensor.copy_(saved)

        self._undo.append(restore)
        return tensor

    def rollback(self) -> None:
        """Undo every change, newest first; keeps going if one undo fails, then re-raises."""
        errors = []
        while self._undo:
            try:
                self._undo.pop()()
            except Exception as exc:  # noqa: BLE001 - restore as much as possible
                errors.append(exc)
        if errors:
            raise RuntimeError(f"slora could not undo a failed change completely: {errors[0]}")

    def commit(self) -> None:
        self._undo.clear()


def _restore_attr(obj: Any, name: str, old: Any) -> None:
    if old is _MISSING:
        if hasattr(obj, name):
            delattr(obj, name)
    else:
        setattr(obj, name, old)


@contextmanager
def transaction(tx: Transaction | None = None) -> Iterator[Transaction]:
    """A new transaction that is rolled back if the block raises (or ``tx`` itself, when the
    caller already runs one: an inner step then belongs to the outer all-or-nothing change)."""
    if tx is not None:
        yield tx
        return
    tx = Transaction()
    try:
        yield tx
    except BaseException:
        tx.rollback()
        raise
    tx.commit()
