"""Ahead-of-time compile of the multi-LoRA Triton kernels for sm_90 (Hopper), no GPU needed:
catches lowering errors the interpreter cannot, and checks shared memory fits an H100/H200."""

import pytest
from triton_aot import SM90_SHARED_LIMIT, compile_for_sm90

_AOT = r"""
from slora.kernels.multi_lora.triton_expand import expand_kernel
from slora.kernels.multi_lora.triton_shrink import shrink_kernel

i32 = lambda *n: {k: "i32" for k in n}
groups = {"order_ptr": "*i64", "tile_group_ptr": "*i32", "tile_first_ptr": "*i32",
          "group_slot_ptr": "*i64", "group_start_ptr": "*i64", "group_len_ptr": "*i64",
          "rank_ptr": "*i32"}
res = {}
for dt, prec, bk in (("bf16", "tf32", 64), ("fp32", "ieee", 32)):
    for has_order in (True, False):
        sig = {"x_ptr": f"*{dt}", "a_ptr": f"*{dt}", "h_ptr": "*fp32", **groups,
               "aoff_ptr": "*i32", "scale_ptr": "*fp32",
               **i32("d_in", "stride_x", "n_slices", "h_stride_t", "h_stride_s")}
        const = {"HAS_ORDER": has_order, "PRECISION": prec, "UPCAST": False,
                 "BM": 16, "BR": 16, "BK": bk}
        res[f"shrink_{dt}_{has_order}"] = build(shrink_kernel, sig, const)
        sig = {"h_ptr": "*fp32", "bt_ptr": f"*{dt}", "out_ptr": f"*{dt}", **groups,
               "boff_ptr": "*i64", "dout_ptr": "*i32", "col_ptr": "*i32",
               **i32("stride_out", "n_slices", "h_stride_t", "h_stride_s")}
        const = {"HAS_ORDER": has_order, "PRECISION": prec, "BM": 16, "BR": 16, "BN": 64}
        res[f"expand_{dt}_{has_order}"] = build(expand_kernel, sig, const)
print(json.dumps(res))
"""


def test_multi_lora_triton_kernels_compile_for_sm90(tmp_path):
    pytest.importorskip("triton")
    res = compile_for_sm90(_AOT, tmp_path)
    assert len(res) == 8
    for name, info in res.items():
        assert info["cubin"] > 0, name
        assert info["shared"] <= SM90_SHARED_LIMIT, (name, info["shared"])
        if "bf16" in name:  # fp32 runs in "ieee" precision: no tensor cores by design
            assert info["mma"], f"{name}: tl.dot did not lower to tensor-core MMA"
