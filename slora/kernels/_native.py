"""JIT build of the native ops in ``csrc/`` (pybind11 + ninja via torch's extension tooling).

Each op file in ``csrc/`` is its own small extension, built on first use and cached under
``$SLORA_CACHE`` (default ``~/.cache/slora``), keyed by the torch version, so installing slora
never needs a compiler and never pulls torch into a build environment.  When the build is
impossible (no compiler, no ninja) slora warns once and the dispatcher falls back to PyTorch.
Set ``SLORA_NO_NATIVE=1`` to skip native ops altogether.
"""

from __future__ import annotations

import functools
import os
import warnings
from pathlib import Path
from types import ModuleType

import torch

_warned = False


def csrc_dir() -> Path:
    """Where the C++/CUDA sources live: ``slora/csrc`` in a wheel, ``csrc/`` in a checkout."""
    here = Path(__file__).resolve().parent.parent
    for candidate in (here / "csrc", here.parent / "csrc"):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError("slora's csrc/ sources were not found next to the package")


def cache_dir(name: str) -> Path:
    root = Path(os.environ.get("SLORA_CACHE", Path.home() / ".cache" / "slora"))
    tag = torch.__version__.replace("+", "_")
    path = root / f"torch-{tag}" / name
    path.mkdir(parents=True, exist_ok=True)
    return path


@functools.cache
def load_extension(name: str, sources: tuple[str, ...]) -> ModuleType | None:
    """Build (once, cached) and import the CPU extension ``name`` from ``csrc/`` sources.

    Returns None, with a single warning per process, if it cannot be built.
    """
    global _warned
    if os.environ.get("SLORA_NO_NATIVE", "") not in ("", "0"):
        return None
    try:
        from torch.utils.cpp_extension import load

        paths = [str(csrc_dir() / s) for s in sources]
        flags = ["-O3", "-fopenmp", "-march=native", "-ffp-contract=fast"]
        return load(
            name=name,
            sources=paths,
            extra_cflags=flags,
            extra_ldflags=["-fopenmp"],
            build_directory=str(cache_dir(name)),
            verbose=os.environ.get("SLORA_VERBOSE_BUILD", "") not in ("", "0"),
        )
    except Exception as exc:  # noqa: BLE001 - any build failure means "fall back"
        if not _warned:
            warnings.warn(
                f"slora: the native C++ ops could not be built ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else ''}); falling back to PyTorch. "
                "Install a C++ compiler and `pip install ninja` to enable them.",
                RuntimeWarning,
                stacklevel=2,
            )
            _warned = True
        return None
