"""The one native build of ``csrc/``: every op family's C++ and CUDA sources in one extension.

The extension is JIT-built on first use (torch's extension tooling: ninja, the host compiler and,
for CUDA sources, nvcc) and cached under ``$SLORA_CACHE`` (default ``~/.cache/slora``), keyed by
the torch version and the set of sources, so installing slora never needs a compiler and never
pulls torch into a build environment.  CUDA sources are compiled only when torch has CUDA, a
device is visible and nvcc is found, for the architecture of the current device
(``TORCH_CUDA_ARCH_LIST`` overrides it).  A build that has to run says so once on stderr (about a
minute on two cores); loading a cached one is silent.  When the build is impossible slora warns
once and the ops fall back to PyTorch.  ``SLORA_NO_NATIVE=1`` skips native code altogether.
:data:`status` records what happened (``slora env`` prints it).

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
import sys
import time
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
    "multi_lora": NativeSources(cpu=("multi_lora_cpu.cpp", "multi_lora_gemm_cpu.cpp")),
    "sensitivity": NativeSources(cpu=("sensitivity_cpu.cpp",)),
    # benchmarks only: the streaming read behind `slora bench`'s bytes floor
    "stream_read": NativeSources(cpu=("stream_read.cpp",)),
}

# What a call that needs the native ops says when they could not be built (the one place).
UNAVAILABLE = "backend 'cpp' requested but the native ops could not be built (`slora env` says why)"
_warned = False
# extension name -> "cached (dir)", "built now in N s (dir)", "disabled (...)" or "failed: ..."
status: dict[str, str] = {}


def csrc_dir() -> Path:
    """Where the C++/CUDA sources live: ``slora/csrc`` in a wheel, ``csrc/`` in a checkout."""
    here = Path(__file__).resolve().parent.parent
    for candidate in (here / "csrc", here.parent / "csrc"):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError("slora's csrc/ sources were not found next to the package")


def cache_dir(name: str) -> Path:
    """Build directory of ``name``, keyed by the torch version and install location (two
    environments with the same torch compile against different include paths, so sharing one
    directory would rebuild on every switch between them)."""
    root = Path(os.environ.get("SLORA_CACHE", Path.home() / ".cache" / "slora"))
    tag = torch.__version__.replace("+", "_")
    where = hashlib.sha256(str(Path(torch.__file__).resolve().parent).encode()).hexdigest()[:8]
    path = root / f"torch-{tag}-{where}" / name
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


def _stamp(sources: list[str]) -> str:
    """What a build was made from: source paths and modification times (what ninja checks)."""
    return "\n".join(f"{p} {Path(p).stat().st_mtime_ns}" for p in sources)


def _needs_build(build_dir: Path, name: str, sources: list[str]) -> bool:
    """True unless ``build_dir`` holds a library built from exactly these source files."""
    stamp = build_dir / "slora_build_stamp.txt"
    if not (build_dir / f"{name}.so").exists() or not stamp.exists():
        return True
    return stamp.read_text() != _stamp(sources)


STALE_LOCK_SECONDS = 600  # a build takes 1-2 minutes on two cores; a lock this old is orphaned


def clear_stale_lock(build_dir: Path) -> bool:
    """Remove torch's build lock (``build_dir/lock``) when it is older than any build takes.

    torch's JIT build holds that file while it compiles and removes it when done; a build
    that was killed (Ctrl-C, a timeout, an OOM kill) leaves it, and every later process then
    waits on it forever.  Returns whether a lock was removed."""
    lock = build_dir / "lock"
    try:
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return False
    if age < STALE_LOCK_SECONDS:
        return False
    _announce(
        f"removing a build lock left {age / 60:.0f} minutes ago by an unfinished build ({lock})"
    )
    lock.unlink(missing_ok=True)
    return True


def _announce(message: str) -> None:
    """One line on stderr, kept clear of any progress bar being drawn there."""
    from tqdm import tqdm

    tqdm.write(f"slora: {message}", file=sys.stderr)


def _warn(name: str, exc: Exception) -> None:
    global _warned
    first = str(exc).splitlines()[0] if str(exc) else ""
    status[name] = f"failed: {type(exc).__name__}: {first}"
    if not _warned:
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
    with_cuda = cuda_build_possible()
    sources = ["bindings.cpp"]
    for family in FAMILIES.values():
        sources += family.cpu + (family.cuda if with_cuda else ())
    # torch rebuilds when a listed source changes, not when a header does: the headers'
    # contents go into the name, so an edited header gets a fresh build
    headers = b"".join(p.read_bytes() for p in sorted(csrc_dir().glob("*.h")))
    march = os.environ.get("SLORA_NATIVE_MARCH", "native")  # e.g. haswell: the AVX2 paths
    key = hashlib.sha1("\n".join([*sources, march]).encode() + headers).hexdigest()[:8]
    name = f"slora_native_{'cuda_' if with_cuda else ''}{key}"
    if os.environ.get("SLORA_NO_NATIVE", "") not in ("", "0"):
        status[name] = "disabled (SLORA_NO_NATIVE)"
        return None
    try:
        from torch.utils.cpp_extension import load

        defines = ["-DSLORA_WITH_CUDA"] if with_cuda else []
        kwargs: dict = {}
        if with_cuda:
            os.environ["TORCH_CUDA_ARCH_LIST"] = _cuda_arch()
            kwargs["extra_cuda_cflags"] = ["-O3", *defines]
        paths = [str(csrc_dir() / s) for s in sources]
        build_dir = cache_dir(name)
        clear_stale_lock(build_dir)
        building = _needs_build(build_dir, name, paths)
        if building:
            _announce(
                f"building the native C++ ops '{name}' (first use; about a minute on two cores, "
                f"then cached in {build_dir}) ..."
            )
        start = time.perf_counter()
        module = load(
            name=name,
            sources=paths,
            extra_cflags=["-O3", "-fopenmp", f"-march={march}", "-ffp-contract=fast", *defines],
            extra_ldflags=["-fopenmp"],
            build_directory=str(build_dir),
            verbose=os.environ.get("SLORA_VERBOSE_BUILD", "") not in ("", "0"),
            **kwargs,
        )
    except Exception as exc:  # noqa: BLE001 - any build failure means "fall back"
        _warn(name, exc)
        return None
    if building:
        seconds = time.perf_counter() - start
        _announce(f"native C++ ops '{name}' built in {seconds:.0f} s")
        status[name] = f"built now in {seconds:.0f} s ({build_dir})"
        (build_dir / "slora_build_stamp.txt").write_text(_stamp(paths))
    else:
        status[name] = f"cached ({build_dir})"
    return module


def available() -> bool:
    """Whether the native extension built (building it on first call)."""
    return extension() is not None


def loaded() -> ModuleType | None:
    """The native extension if this process already built or loaded it, else None — never
    starts a build (for optional fast paths of code that also runs without it)."""
    return extension() if extension.cache_info().currsize else None
