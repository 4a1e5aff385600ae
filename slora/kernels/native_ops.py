"""Python face of the native CPU ops in ``csrc/`` (backend ``cpp``).

Each function here has the signature of the PyTorch reference it replaces.  The extension is
JIT-built on first use (see ``_native.py``); ``available()`` says whether that worked.
"""

from __future__ import annotations

from types import ModuleType

from slora.kernels._native import load_extension

# Source files of the CPU extension; each op adds its .cpp here.
_CPU_SOURCES: tuple[str, ...] = ("bindings.cpp", "multi_lora_cpu.cpp", "sensitivity_cpu.cpp")


def extension() -> ModuleType | None:
    if not _CPU_SOURCES:
        return None
    return load_extension("slora_cpu", _CPU_SOURCES)


def available() -> bool:
    return extension() is not None
