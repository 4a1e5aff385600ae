"""Argument checks shared by the ``slora`` subcommands (argparse ``type=`` callables).

A leaf module: the subcommands (``slora.bench``, ``slora.demo``, ``slora.evaluation``, ...)
import it, and it imports none of them.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable


def checked(kind: type, minimum: float, *, strict: bool = False) -> Callable[[str], float]:
    """An argparse ``type=`` for a finite number ≥ ``minimum`` (> it when ``strict``)."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {kind.__name__}, got {text!r}") from None
        if value != value or value in (float("inf"), float("-inf")):
            raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
        if value < minimum or (strict and value == minimum):
            raise argparse.ArgumentTypeError(
                f"expected a number {'>' if strict else '≥'} {minimum:g}, got {text!r}"
            )
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


POSITIVE_INT = checked(int, 1)
POSITIVE_FLOAT = checked(float, 0, strict=True)


def learning_rates(text: str) -> str:
    """``--lrs``: comma-separated positive numbers (checked here, split by the command)."""
    parts = [x.strip() for x in text.split(",")]
    if not all(parts):
        raise argparse.ArgumentTypeError(f"expected comma-separated learning rates, got {text!r}")
    for part in parts:
        POSITIVE_FLOAT(part)
    return text


def comma_list(choices: tuple[str, ...]) -> Callable[[str], tuple[str, ...]]:
    """An argparse ``type=`` for a non-empty comma-separated subset of ``choices``."""

    def parse(text: str) -> tuple[str, ...]:
        items = tuple(dict.fromkeys(x.strip() for x in text.split(",") if x.strip()))
        bad = [x for x in items if x not in choices]
        if not items or bad:
            raise argparse.ArgumentTypeError(
                f"expected a comma-separated subset of {', '.join(choices)}, got {text!r}"
            )
        return items

    parse.__name__ = "list"
    return parse
