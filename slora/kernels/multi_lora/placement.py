"""Where packed adapters' rows go and how their buffers are written (used by packed.py)."""

from __future__ import annotations

import contextlib

import torch


class FreeList:
    """First-fit allocator of ``[start, start + n)`` ranges in a buffer of ``capacity`` units."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.free: list[tuple[int, int]] = [(0, capacity)] if capacity else []

    def alloc(self, n: int) -> int | None:
        for i, (start, length) in enumerate(self.free):
            if length >= n:
                if length == n:
                    del self.free[i]
                else:
                    self.free[i] = (start + n, length - n)
                return start
        return None

    def release(self, start: int, n: int) -> None:
        if n == 0:
            return
        self.free.append((start, n))
        self.free.sort()
        merged: list[tuple[int, int]] = []
        for s, n_ in self.free:
            if merged and merged[-1][0] + merged[-1][1] == s:
                merged[-1] = (merged[-1][0], merged[-1][1] + n_)
            else:
                merged.append((s, n_))
        self.free = merged

    def grow(self, new_capacity: int) -> None:
        self.release(self.capacity, new_capacity - self.capacity)
        self.capacity = new_capacity


def mutable_buffers() -> contextlib.ExitStack:
    """Context for making and writing the buffers: ordinary tensors, no autograd history.
    Inside ``torch.inference_mode()`` new tensors would be inference tensors, which cannot be
    written outside it (a server loads adapters from both sides: warm-up runs in inference
    mode, a run-time load request does not)."""
    stack = contextlib.ExitStack()
    stack.enter_context(torch.inference_mode(False))
    stack.enter_context(torch.no_grad())
    return stack
