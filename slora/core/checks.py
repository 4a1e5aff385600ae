"""Argument checks shared by the API, the JSON readers and the CLI.

Each helper returns the checked value (converted to ``float`` / ``int``) or raises a
``ValueError`` that names the field, says what was wrong and what is expected.  Booleans are
never accepted as numbers, and NaN / ±inf are refused everywhere a number comes in: a NaN
scale turns every output into NaN, an infinite budget silently switches a limit off.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


def finite_number(
    name: str,
    value: Any,
    *,
    positive: bool = False,
    minimum: float | None = None,
    maximum: float | None = None,
    where: str = "",
) -> float:
    """``value`` as a finite float (optionally > 0 and/or within [minimum, maximum])."""
    label = f"{where}: {name}" if where else name
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{label} must be a number, got {value!r} ({type(value).__name__})")
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"{label} must be a finite number, got {value!r}")
    if positive and number <= 0:
        raise ValueError(f"{label} must be > 0, got {value!r}")
    if minimum is not None and number < minimum:
        raise ValueError(f"{label} must be ≥ {minimum:g}, got {value!r}")
    if maximum is not None and number > maximum:
        raise ValueError(f"{label} must be ≤ {maximum:g}, got {value!r}")
    return number


def whole_number(name: str, value: Any, *, minimum: int = 0, where: str = "") -> int:
    """``value`` as an int ≥ ``minimum`` (integral floats such as 4.0 from JSON are accepted)."""
    label = f"{where}: {name}" if where else name
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{label} must be an integer ≥ {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{label} must be an integer ≥ {minimum}, got {value!r}")
    return value


def read_json(path: str | Path, what: str) -> Any:
    """Parse a JSON file; a missing file or bad JSON names the file and what it should hold."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} file {str(path)!r} does not exist") from None
    except (IsADirectoryError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: cannot read it as a {what} JSON file ({exc})") from exc
    try:  # NaN / Infinity parse here; the field checks refuse them by name
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(
            f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno}); "
            f"expected a {what} as written by slora"
        ) from exc
