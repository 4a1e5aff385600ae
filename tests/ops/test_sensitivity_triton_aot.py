"""Ahead-of-time compile of the sensitivity Triton kernels for Hopper (sm_90), no GPU needed.

Triton is the CUDA backend of ``slora::input_stats`` / ``grad_stats`` / ``fisher_exact``; this
catches lowering errors that the interpreter cannot, and checks that the fused ``fisher_exact``
GEMM runs on tensor-core MMA within the per-block shared-memory limit.
"""

import pytest
from triton_aot import SM90_SHARED_LIMIT, compile_for_sm90

_TRITON_AOT = r"""
from slora.kernels.sensitivity import triton_backend as ss

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
    pytest.importorskip("triton")
    res = compile_for_sm90(_TRITON_AOT, tmp_path)
    assert set(res) == {"sq_stats_bf16", "sq_stats_fp32", "fisher_exact_fp32", "fisher_exact_bf16"}
    for name, info in res.items():
        assert info["cubin"] > 0, name
        assert info["shared"] <= SM90_SHARED_LIMIT, (name, info["shared"])
    assert res["fisher_exact_fp32"]["mma"] and res["fisher_exact_bf16"]["mma"]
