"""Ahead-of-time compile of the sensitivity Triton kernels for Hopper (sm_90), no GPU needed.

Triton is the CUDA backend of ``slora::input_stats`` / ``grad_stats`` / ``fisher_exact``; this
catches lowering errors that the interpreter cannot, and checks that the fused ``fisher_exact``
GEMM runs on tensor-core MMA within the per-block shared-memory limit.
"""

import subprocess
from pathlib import Path

import pytest

_TRITON_AOT = r"""
import json, os, sys
os.environ.pop("TRITON_INTERPRET", None)
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from slora.kernels.sensitivity import triton_backend as ss

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
