"""slora's version, written in one place: ``pyproject.toml`` (read from the installed package's
metadata, or from ``pyproject.toml`` itself in a source tree that is not installed)."""

from __future__ import annotations

import re
from importlib import metadata
from pathlib import Path

DISTRIBUTION = "sensitivity-lora"


def _from_pyproject() -> str | None:
    path = Path(__file__).resolve().parent.parent / "pyproject.toml"
    if not path.is_file():
        return None
    project = re.search(r"^\[project\]$(.*?)(?=^\[|\Z)", path.read_text(), re.M | re.S)
    found = re.search(r'^version\s*=\s*"([^"]+)"', project.group(1), re.M) if project else None
    return found.group(1) if found else None


def version() -> str:
    """The installed distribution's version, else ``pyproject.toml``'s, else ``0+unknown``."""
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return _from_pyproject() or "0+unknown"


__version__ = version()
