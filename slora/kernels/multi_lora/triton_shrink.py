"""Triton shrink: ``h[pos, s, j] = scale[k, s] · x_tok · A[k, s][j]`` in fp32 for every row
tile of every group (slot k), all slices s and ranks j < rank(k, s) at once.

One program computes a block of BC (slice, rank) columns — all ``S · r_max`` of them up to 256
for large batches — so each tile of x is read once for every slice and rank (earlier: once per
16 ranks and per slice, 12 reads at 3 slices of rank 64); small batches take narrower blocks
for more programs (``triton_utils.shrink_cols``).  Column c is slice ``c // r_max``, rank row
``c % r_max``; columns past a slot's true rank are masked, so they read nothing."""

from __future__ import annotations

import triton
import triton.language as tl

from slora.kernels.multi_lora.triton_utils import tile_rows


@triton.jit
def shrink_kernel(
    x_ptr, a_ptr, h_ptr, order_ptr, tile_group_ptr, tile_first_ptr,
    group_slot_ptr, group_start_ptr, group_len_ptr,
    rank_ptr, aoff_ptr, scale_ptr,
    num_tokens, max_slots, d_in, stride_x, n_slices, r_max, h_stride_t,
    HAS_ORDER: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BM: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr,
):  # fmt: skip
    tile = tl.program_id(0)
    g = tl.load(tile_group_ptr + tile)
    if g < 0:
        return
    slot = tl.load(group_slot_ptr + g)
    if (slot < 0) | (slot >= max_slots):
        return
    offs_c = tl.program_id(1) * BC + tl.arange(0, BC)
    c_ok = offs_c < n_slices * r_max
    s_c = offs_c // r_max
    j_c = offs_c % r_max
    meta_off = slot * n_slices + s_c
    r_c = tl.minimum(tl.load(rank_ptr + meta_off, mask=c_ok, other=0), r_max)
    live = c_ok & (j_c < r_c)
    if tl.max(live.to(tl.int32), axis=0) == 0:  # past every slice's true rank: no reads
        return
    pos, tok, row_ok = tile_rows(
        tile, g, tile_first_ptr, group_start_ptr, group_len_ptr, order_ptr, num_tokens,
        HAS_ORDER, BM,
    )  # fmt: skip
    a_row = tl.load(aoff_ptr + meta_off, mask=live, other=0).to(tl.int64) + j_c
    scale = tl.load(scale_ptr + meta_off, mask=live, other=0.0)
    acc = tl.zeros((BM, BC), dtype=tl.float32)
    for k0 in range(0, d_in, BK):
        offs_k = k0 + tl.arange(0, BK)
        k_ok = offs_k < d_in
        xt = tl.load(
            x_ptr + tok[:, None] * stride_x + offs_k[None, :],
            mask=row_ok[:, None] & k_ok[None, :],
            other=0.0,
        )
        at = tl.load(
            a_ptr + a_row[None, :] * d_in + offs_k[:, None],
            mask=live[None, :] & k_ok[:, None],
            other=0.0,
        )
        if UPCAST:  # the interpreter's bf16 dot is wrong; bf16 products are exact in fp32
            xt = xt.to(tl.float32)
            at = at.to(tl.float32)
        acc = tl.dot(xt, at, acc, input_precision=PRECISION)
    acc = acc * scale[None, :]
    h_off = pos[:, None] * h_stride_t + offs_c[None, :]
    tl.store(h_ptr + h_off, acc, mask=row_ok[:, None] & live[None, :])
