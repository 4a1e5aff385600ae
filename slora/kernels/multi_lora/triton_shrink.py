"""Triton shrink: ``h[pos, s, :r] = scale[k, s] · x_tok A[k, s]ᵀ`` in fp32, for every row tile
of every group (slot k), every slice s and every block of BR rank rows below the true rank."""

from __future__ import annotations

import triton
import triton.language as tl

from slora.kernels.multi_lora.triton_utils import tile_rows


@triton.jit
def shrink_kernel(
    x_ptr, a_ptr, h_ptr, order_ptr, tile_group_ptr, tile_first_ptr,
    group_slot_ptr, group_start_ptr, group_len_ptr,
    rank_ptr, aoff_ptr, scale_ptr,
    d_in, stride_x, n_slices, h_stride_t, h_stride_s,
    HAS_ORDER: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BM: tl.constexpr, BR: tl.constexpr, BK: tl.constexpr,
):  # fmt: skip
    tile = tl.program_id(0)
    s = tl.program_id(1)
    r0 = tl.program_id(2) * BR
    g = tl.load(tile_group_ptr + tile)
    if g < 0:
        return
    slot = tl.load(group_slot_ptr + g)
    r = tl.load(rank_ptr + slot * n_slices + s)
    if r0 >= r:  # past this adapter's true rank: no work, no reads
        return
    pos, tok, row_ok = tile_rows(
        tile, g, tile_first_ptr, group_start_ptr, group_len_ptr, order_ptr, HAS_ORDER, BM
    )
    a_row = tl.load(aoff_ptr + slot * n_slices + s).to(tl.int64)
    scale = tl.load(scale_ptr + slot * n_slices + s)
    offs_r = r0 + tl.arange(0, BR)
    r_ok = offs_r < r
    acc = tl.zeros((BM, BR), dtype=tl.float32)
    for k0 in range(0, d_in, BK):
        offs_k = k0 + tl.arange(0, BK)
        k_ok = offs_k < d_in
        xt = tl.load(
            x_ptr + tok[:, None] * stride_x + offs_k[None, :],
            mask=row_ok[:, None] & k_ok[None, :],
            other=0.0,
        )
        at = tl.load(
            a_ptr + (a_row + offs_r)[None, :] * d_in + offs_k[:, None],
            mask=r_ok[None, :] & k_ok[:, None],
            other=0.0,
        )
        if UPCAST:  # exact: bf16 products are exact in fp32
            xt = xt.to(tl.float32)
            at = at.to(tl.float32)
        acc = tl.dot(xt, at, acc, input_precision=PRECISION)
    acc = acc * scale
    h_off = pos[:, None] * h_stride_t + s * h_stride_s + offs_r[None, :]
    tl.store(h_ptr + h_off, acc, mask=row_ok[:, None] & r_ok[None, :])
