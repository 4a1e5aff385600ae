"""``slora env``: the versions, devices and kernel backends of this machine, for bug reports.

Like ``python -m torch.utils.collect_env``: it prints what decides which code runs — package
versions, the CUDA device, whether the native C++ ops are built (or were built just now, or
failed and why), whether Triton is usable, and the backend each op will use per device.
"""

from __future__ import annotations

import argparse
import functools
import importlib.metadata
import os
import platform
import shutil
import subprocess
import sys

PACKAGES = ("torch", "triton", "transformers", "peft", "numpy", "safetensors", "ninja")
SENSITIVITY_OPS = ("input_stats", "grad_stats", "fisher_exact")
ENV_VARS = (
    "SLORA_BACKEND",
    "SLORA_NO_NATIVE",
    "SLORA_NATIVE_MARCH",
    "SLORA_CPU_GEMM_MIN_TOKENS",
    "SLORA_CACHE",
    "SLORA_DATA",
    "TRITON_INTERPRET",
    "CUDA_VISIBLE_DEVICES",
)


def package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _compiler() -> str:
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if not cxx:
        return "none found (native ops fall back to PyTorch)"
    try:
        out = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=10)
        return f"{cxx}: {out.stdout.splitlines()[0] if out.stdout else 'unknown version'}"
    except (OSError, subprocess.SubprocessError) as exc:
        return f"{cxx}: not runnable ({exc})"


def _cuda() -> list[tuple[str, str]]:
    import torch

    rows = [("torch CUDA build", str(torch.version.cuda))]
    if not torch.cuda.is_available():
        return [*rows, ("CUDA device", "none")]
    for i in range(torch.cuda.device_count()):
        major, minor = torch.cuda.get_device_capability(i)
        rows.append((f"CUDA device {i}", f"{torch.cuda.get_device_name(i)} (sm_{major}{minor})"))
    return rows


def _triton() -> str:
    import torch

    if package_version("triton") == "not installed":
        return "not installed"
    from slora.kernels.backend import triton_usable

    if torch.cuda.is_available():
        return "usable on CUDA"
    if triton_usable("cpu"):
        return "usable on the CPU in interpreter mode (TRITON_INTERPRET=1)"
    return "installed; CPU tensors need TRITON_INTERPRET=1, no CUDA device"


def _native() -> str:
    from slora.kernels import _native

    _native.available()  # builds on first use (announced on stderr) or loads the cache
    return "; ".join(f"{k}: {v}" for k, v in _native.status.items()) or "no native sources"


def _cpu() -> list[tuple[str, str]]:
    """The CPU's model and the units that decide its paths, and from how many tokens of one
    adapter the ``cpp`` backend uses ATen's GEMM (oneDNN: AMX / AVX512-BF16)."""
    import torch

    from slora.kernels import cpu_features
    from slora.kernels.multi_lora import cpp_backend

    facts = cpu_features.summary()
    flags = [flag for flag in cpu_features.REPORTED_FLAGS if facts[flag]]
    routes = []
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        try:
            n, macs = cpp_backend.gemm_route(dtype)
            when = f"≥ {n} tokens and ≥ {macs / 1e6:.0f}M multiply-adds" if n else "never"
            routes.append(f"{str(dtype).removeprefix('torch.')}: {when}")
        except ValueError as exc:  # a bad SLORA_CPU_GEMM_MIN_TOKENS: say so, keep reporting
            routes.append(f"{str(dtype).removeprefix('torch.')}: error ({exc})")
    return [
        ("CPU", f"{facts['cpu']}; {' '.join(flags) or 'no AVX2/AVX-512/AMX flags reported'}"),
        ("CPU GEMM route", ", ".join(routes)),
    ]


def _backends() -> list[tuple[str, str]]:
    """Per op and device: the resolved backend and the function that will run."""
    import torch

    import slora.ops  # noqa: F401 - registers every op's backends
    from slora.kernels import registry
    from slora.kernels.backend import resolve_backend

    names = (*SENSITIVITY_OPS, "multi_lora")
    kernels = {op: functools.partial(registry.kernel, op) for op in names}
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    rows = []
    for op, kernel in kernels.items():
        cells = []
        for device in devices:
            try:
                fn = kernel(torch.device(device))
                where = f"{fn.__module__.rsplit('.', 1)[-1]}.{fn.__name__}"
                cells.append(f"{device}: {resolve_backend(device)} ({where})")
            except Exception as exc:  # noqa: BLE001 - a report, not a check: say what failed
                cells.append(f"{device}: error ({type(exc).__name__}: {exc})")
        rows.append((f"op {op}", ", ".join(cells)))
    return rows


def collect() -> list[tuple[str, str]]:
    """(field, value) rows; never raises for a missing optional package."""
    import torch

    import slora
    from slora import embedded

    rows = [
        ("slora", f"{slora.__version__} ({os.path.dirname(slora.__file__)})"),
        ("python", f"{platform.python_version()} ({sys.executable})"),
        ("platform", f"{platform.platform()}, {os.cpu_count()} CPUs"),
        ("torch threads", str(torch.get_num_threads())),
    ]
    rows += [(name, package_version(name)) for name in PACKAGES]
    rows += _cuda()
    rows.append(("C++ compiler", _compiler()))
    rows.append(("native C++ ops", _native()))
    rows.append(("Triton kernels", _triton()))
    rows += _cpu()
    rows += _backends()
    rows.append(("embedded data", f"{embedded.data_dir()} ({_embedded_state(embedded)})"))
    rows += [(f"${v}", os.environ[v]) for v in ENV_VARS if v in os.environ]
    return rows


def _embedded_state(embedded) -> str:
    try:
        embedded.model_path(), embedded.sentences_path()
    except FileNotFoundError:
        return "not installed: run `python -m slora.embedded`"
    return "installed"


def format_rows(rows: list[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``slora env`` takes no options."""


def run(args: argparse.Namespace | None = None) -> int:
    """Print versions, devices and kernel backends."""
    print(format_rows(collect()))
    return 0


def main() -> int:
    return run()
