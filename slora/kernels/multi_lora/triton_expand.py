"""Triton expand: ``out[tok, col_s + n] += Σ_j h[pos, s, j] · Bt[k, s][j, n]`` (fp32
accumulation, one read-modify-write of ``out``) for every row tile of every group, every slice
and every block of BN output columns inside the slice."""

from __future__ import annotations

import triton
import triton.language as tl

from slora.kernels.multi_lora.triton_utils import tile_rows


@triton.jit
def expand_kernel(
    h_ptr, bt_ptr, out_ptr, order_ptr, tile_group_ptr, tile_first_ptr,
    group_slot_ptr, group_start_ptr, group_len_ptr,
    rank_ptr, boff_ptr, dout_ptr, col_ptr,
    stride_out, n_slices, h_stride_t, h_stride_s,
    HAS_ORDER: tl.constexpr, PRECISION: tl.constexpr,
    BM: tl.constexpr, BR: tl.constexpr, BN: tl.constexpr,
):  # fmt: skip
    tile = tl.program_id(0)
    s = tl.program_id(1)
    n0 = tl.program_id(2) * BN
    g = tl.load(tile_group_ptr + tile)
    if g < 0:
        return
    slot = tl.load(group_slot_ptr + g)
    r = tl.load(rank_ptr + slot * n_slices + s)
    d_s = tl.load(dout_ptr + s)
    if (r == 0) | (n0 >= d_s):
        return
    pos, tok, row_ok = tile_rows(
        tile, g, tile_first_ptr, group_start_ptr, group_len_ptr, order_ptr, HAS_ORDER, BM
    )
    b_base = tl.load(boff_ptr + slot * n_slices + s)
    col = tl.load(col_ptr + s)
    offs_n = n0 + tl.arange(0, BN)
    n_ok = offs_n < d_s
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for j0 in range(0, r, BR):
        offs_j = j0 + tl.arange(0, BR)
        j_ok = offs_j < r
        ht = tl.load(
            h_ptr + pos[:, None] * h_stride_t + s * h_stride_s + offs_j[None, :],
            mask=row_ok[:, None] & j_ok[None, :],
            other=0.0,
        )
        bt = tl.load(
            bt_ptr + b_base + offs_j[:, None].to(tl.int64) * d_s + offs_n[None, :],
            mask=j_ok[:, None] & n_ok[None, :],
            other=0.0,
        )
        acc = tl.dot(ht, bt.to(tl.float32), acc, input_precision=PRECISION)
    o_ptrs = out_ptr + tok[:, None] * stride_out + col + offs_n[None, :]
    o_mask = row_ok[:, None] & n_ok[None, :]
    prev = tl.load(o_ptrs, mask=o_mask, other=0.0)
    tl.store(o_ptrs, (prev.to(tl.float32) + acc).to(prev.dtype), mask=o_mask)
