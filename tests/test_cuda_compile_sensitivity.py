"""Compile-only check of csrc/sensitivity_reductions.cu for sm_90 (runs where nvcc exists)."""

import shutil
import subprocess
from pathlib import Path

import pytest

NVCC = shutil.which("nvcc")
SOURCE = Path(__file__).resolve().parent.parent / "csrc" / "sensitivity_reductions.cu"

pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc not found")


def _nvcc(*args: str) -> subprocess.CompletedProcess:
    cmd = [NVCC, "-std=c++17", "-O3", "-arch=sm_90", "-Werror", "all-warnings", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def test_compiles_for_sm90_with_launchers(tmp_path):
    obj = tmp_path / "sensitivity_reductions.o"
    proc = _nvcc("-Xcompiler", "-Wall,-Werror", "-c", str(SOURCE), "-o", str(obj))
    assert proc.returncode == 0, proc.stderr
    assert obj.stat().st_size > 0
    nm = shutil.which("nm")
    if nm is not None:
        symbols = subprocess.run([nm, str(obj)], capture_output=True, text=True).stdout
        for name in ("slora_sq_stats_f32", "slora_sq_stats_f16", "slora_sq_stats_bf16"):
            assert f" T {name}" in symbols, f"{name} not exported"


def test_cubin_holds_kernels_for_every_dtype(tmp_path):
    cubin = tmp_path / "sensitivity_reductions.cubin"
    proc = _nvcc("-cubin", str(SOURCE), "-o", str(cubin))
    assert proc.returncode == 0, proc.stderr
    data = cubin.read_bytes()
    assert data[:4] == b"\x7fELF"
    # One instantiation of the streaming kernel per input type (mangled template names).
    assert data.count(b"sq_stats_kernelIfE") >= 1
    assert data.count(b"sq_stats_kernelI6__halfE") >= 1
    assert data.count(b"sq_stats_kernelI13__nv_bfloat16E") >= 1
    assert b"combine_kernel" in data


def test_torch_binding_syntax_checks_against_torch_headers():
    # The binding that lets the GPU script run the CUDA sources; no CUDA torch needed here.
    import sysconfig

    from torch.utils.cpp_extension import include_paths

    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no host C++ compiler")
    cuda_include = Path(NVCC).resolve().parent.parent / "include"
    includes = [*include_paths(), sysconfig.get_paths()["include"], "/usr/local/cuda/include"]
    if cuda_include.is_dir():
        includes.append(str(cuda_include))
    cmd = [cxx, "-std=c++20", "-fsyntax-only", "-Wall", "-DTORCH_EXTENSION_NAME=slora_sens_cuda"]
    cmd += [f"-I{p}" for p in includes]
    cmd.append(str(SOURCE.with_name("sensitivity_reductions_binding.cpp")))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]


_TRITON_AOT = r"""
import json, os, sys
os.environ.pop("TRITON_INTERPRET", None)
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from slora.kernels import sensitivity_stats as ss

def build(kernel, sig, const):
    sig = dict(sig, **{n: "constexpr" for n in const})
    idx = {(kernel.arg_names.index(n),): v for n, v in const.items()}
    out = triton.compile(ASTSource(kernel, sig, idx), target=GPUTarget("cuda", 90, 32))
    return {"cubin": len(out.asm["cubin"]), "shared": out.metadata.shared,
            "mma": "mma" in out.asm["ptx"]}

res = {}
ints = lambda *n: {k: "i32" for k in n}
for dt, flags in (("bf16", True), ("fp32", False)):
    sig = {"x_ptr": f"*{dt}", "mask_ptr": "*u8", "w_ptr": "*fp32", "col_ptr": "*fp32",
           "tok_ptr": "*fp32", "dot_ptr": "*fp32",
           **ints("T", "D", "stride_t", "stride_d", "tokens_per_split")}
    const = {"HAS_MASK": flags, "HAS_W": flags, "WRITE_TOK": not flags, "COL_DIRECT": not flags,
             "BLOCK_T": 32, "BLOCK_D": 256}
    res[f"sq_stats_{dt}"] = build(ss._sq_stats_kernel, sig, const)
for dt in ("fp32", "bf16"):
    sig = {"dy_ptr": f"*{dt}", "x_ptr": f"*{dt}", "mask_ptr": "*u8", "out_ptr": "*fp32",
           **ints("T", "n_out", "D", "stride_dy_t", "stride_dy_o", "stride_x_t", "stride_x_d",
                  "stride_out_o", "stride_out_d")}
    const = {"HAS_MASK": True, "PRECISION": "tf32x3", "GROUP_O": 8, "BLOCK_O": 128,
             "BLOCK_D": 128, "BLOCK_T": 32}
    res[f"fisher_exact_{dt}"] = build(ss._fisher_exact_kernel, sig, const)
print(json.dumps(res))
"""


def test_triton_kernels_compile_for_sm90(tmp_path):
    # Ahead-of-time Triton compile for Hopper (no GPU needed): catches lowering errors that the
    # interpreter cannot, and checks the GEMM uses tensor-core MMA within shared memory.
    import json
    import os
    import sys

    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run(
        [sys.executable, "-c", _TRITON_AOT],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(res) == {"sq_stats_bf16", "sq_stats_fp32", "fisher_exact_fp32", "fisher_exact_bf16"}
    for name, info in res.items():
        assert info["cubin"] > 0, name
        assert info["shared"] <= 227 * 1024, (name, info["shared"])  # H100/H200 per-block limit
    assert res["fisher_exact_fp32"]["mma"] and res["fisher_exact_bf16"]["mma"]
