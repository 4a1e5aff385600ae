"""The one native build of ``csrc/``: every op family's C++ and CUDA sources in one extension.

The extension is JIT-built on first use (torch's extension tooling: ninja, the host compiler and,
for CUDA sources, nvcc) and cached under ``$SLORA_CACHE`` (default ``~/.cache/slora``), keyed by
the torch version and the set of sources, so installing slora never needs a compiler and never
pulls torch into a build environment.  CUDA sources are compiled only when torch has CUDA, a
device is visible and nvcc is found, for the architecture of the current device
(``TORCH_CUDA_ARCH_LIST`` overrides it).  When the build is impossible slora warns once and the
ops fall back to PyTorch.  ``SLORA_NO_NATIVE=1`` skips native code altogether.

Adding an op family's sources:

1. put them in ``csrc/`` and list them in :data:`FAMILIES` (``cpu``: always built; ``cuda``:
   ``.cu`` files and their ``.cpp`` bindings, built only for CUDA);
2. give each family a ``void register_<family>(pybind11::module_& m)`` that adds its
   functions (and, for CUDA sources, ``register_<family>_cuda``), and call it from
   ``csrc/bindings.cpp`` (CUDA ones inside ``#ifdef SLORA_WITH_CUDA``, which this loader
   defines when it compiles CUDA sources);
3. call the functions through :func:`extension` from the family's Python backend, inside the
   family's registered ``torch.library`` op (docs/kernels.md, "Adding a backend").
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch


@dataclass(frozen=True)
class NativeSources:
    """The ``csrc/`` files of one op family."""

    cpu: tuple[str, ...] = ()
    cuda: tuple[str, ...] = ()


FAMILIES: dict[str, NativeSources] = {
    "multi_lora": NativeSources(cpu=("multi_lora_cpu.cpp",)),
    "sensitivity": NativeSources(cpu=("sensitivity_cpu.cpp",)),
}

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


def cuda_build_possible() -> bool:
    """Whether CUDA sources can be built and run here (torch with CUDA, a device, nvcc)."""
    if torch.version.cuda is None or not torch.cuda.is_available():
        return False
    from torch.utils.cpp_extension import CUDA_HOME

    return CUDA_HOME is not None or shutil.which("nvcc") is not None


def _cuda_arch() -> str:
    """``TORCH_CUDA_ARCH_LIST`` if set, else the current device's compute capability."""
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return os.environ["TORCH_CUDA_ARCH_LIST"]
    major, minor = torch.cuda.get_device_capability()
    return f"{major}.{minor}"


def _warn(exc: Exception) -> None:
    global _warned
    if not _warned:
        first = str(exc).splitlines()[0] if str(exc) else ""
        warnings.warn(
            f"slora: the native C++ ops could not be built ({type(exc).__name__}: {first}); "
            "falling back to PyTorch. Install a C++ compiler and `pip install ninja` to "
            "enable them.",
            RuntimeWarning,
            stacklevel=3,
        )
        _warned = True


@functools.cache
def extension() -> ModuleType | None:
    """The built and imported native extension (cached), or None (one warning per process)."""
    if os.environ.get("SLORA_NO_NATIVE", "") not in ("", "0"):
        return None
    with_cuda = cuda_build_possible()
    sources = ["bindings.cpp"]
    for family in FAMILIES.values():
        sources += family.cpu + (family.cuda if with_cuda else ())
    key = hashlib.sha1("\n".join(sources).encode()).hexdigest()[:8]
    name = f"slora_native_{'cuda_' if with_cuda else ''}{key}"
    try:
        from torch.utils.cpp_extension import load

        defines = ["-DSLORA_WITH_CUDA"] if with_cuda else []
        kwargs: dict = {}
        if with_cuda:
            os.environ["TORCH_CUDA_ARCH_LIST"] = _cuda_arch()
            kwargs["extra_cuda_cflags"] = ["-O3", *defines]
        return load(
            name=name,
            sources=[str(csrc_dir() / s) for s in sources],
            extra_cflags=["-O3", "-fopenmp", "-march=native", "-ffp-contract=fast", *defines],
            extra_ldflags=["-fopenmp"],
            build_directory=str(cache_dir(name)),
            verbose=os.environ.get("SLORA_VERBOSE_BUILD", "") not in ("", "0"),
            **kwargs,
        )
    except Exception as exc:  # noqa: BLE001 - any build failure means "fall back"
        _warn(exc)
        return None


def available() -> bool:
    """Whether the native extension built (building it on first call)."""
    return extension() is not None
