"""Ahead-of-time compile of the multi-LoRA Triton kernels for sm_90 (Hopper), no GPU needed:
catches lowering errors the interpreter cannot, checks shared memory fits an H100/H200 and that
every bf16 / fp16 dot lowers to tensor-core MMA — in the configurations the backend launches
(``triton_backend.multi_lora_triton``: column blocks of 16 and 256 — and 64 in bf16 —, 4
and 8 warps)."""

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
for dt, prec, dot in (("bf16", "tf32", "split"), ("fp16", "tf32", "tf32"),
                      ("fp32", "ieee", "ieee")):
    for has_order in (True, False):
        for bc in (16, 64, 256) if dt == "bf16" else (16, 256):
            bk = 32 if dt == "fp32" and bc >= 256 else 64
            sig = {"x_ptr": f"*{dt}", "a_ptr": f"*{dt}", "h_ptr": "*fp32", **groups,
                   "aoff_ptr": "*i32", "scale_ptr": "*fp32",
                   **i32("num_tokens", "max_slots", "d_in", "stride_x", "n_slices", "r_max",
                         "h_stride_t")}
            const = {"HAS_ORDER": has_order, "PRECISION": prec, "UPCAST": False,
                     "BM": 16, "BC": bc, "BK": bk}
            warps = 8 if bc >= 256 else 4
            res[f"shrink_{dt}_{has_order}_{bc}"] = build(shrink_kernel, sig, const, warps)
        for out_dt in sorted({dt, "fp32"}):
            sig = {"h_ptr": "*fp32", "bt_ptr": f"*{dt}", "out_ptr": f"*{out_dt}", **groups,
                   "boff_ptr": "*i64", "dout_ptr": "*i32", "col_ptr": "*i32",
                   **i32("num_tokens", "max_slots", "stride_out", "n_slices", "r_max",
                         "h_stride_t")}
            const = {"HAS_ORDER": has_order, "DOT": dot, "UPCAST": False,
                     "BM": 16, "BR": 16, "BN": 64}
            res[f"expand_{dt}_{has_order}_out{out_dt}"] = build(expand_kernel, sig, const)
print(json.dumps(res))
"""


def test_multi_lora_triton_kernels_compile_for_sm90(tmp_path):
    pytest.importorskip("triton")
    res = compile_for_sm90(_AOT, tmp_path)
    assert len(res) == (3 + 2 + 2) * 2 + (2 + 2 + 1) * 2  # shrinks + expands (out: dt, fp32)
    for name, info in res.items():
        assert info["cubin"] > 0, name
        assert info["shared"] <= SM90_SHARED_LIMIT, (name, info["shared"])
        if "fp32" not in name.split("_")[1]:  # fp32 runs in "ieee": no tensor cores by design
            assert info["mma"], f"{name}: tl.dot did not lower to tensor-core MMA"
