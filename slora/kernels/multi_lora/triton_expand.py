"""Triton expand: ``out[tok, col_s + n] += Σ_j h[pos, s, j] · Bt[k, s][j, n]`` (fp32
accumulation, one read-modify-write of ``out``) for every row tile of every group, every slice
and every block of BN output columns inside the slice.

The dot (``DOT``, docs/kernels.md "Precision"): ``"ieee"`` for fp32 weights; ``"split"`` for
bf16: the fp32 intermediate is split into two bf16 parts (``h = hi + lo`` to 2⁻¹⁶ relative)
and multiplied by the bf16 B in two bf16 tensor-core dots — more accurate than one TF32 dot
(h rounded to 2⁻¹¹) at the same tensor-core time, B read without conversion; ``"tf32"`` for
fp16 (fp16 B is exact in TF32, and an fp16 h could overflow past 65504)."""

from __future__ import annotations

import triton
import triton.language as tl

from slora.kernels.multi_lora.triton_utils import tile_rows


@triton.jit
def _round_bf16(v):
    """fp32 ``v`` rounded to the nearest bf16 (ties to even), as an fp32 (finite ``v``)."""
    b = v.to(tl.uint32, bitcast=True)
    b = (b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000
    return b.to(tl.float32, bitcast=True)


@triton.jit
def expand_kernel(
    h_ptr, bt_ptr, out_ptr, order_ptr, tile_group_ptr, tile_first_ptr,
    group_slot_ptr, group_start_ptr, group_len_ptr,
    rank_ptr, boff_ptr, dout_ptr, col_ptr,
    num_tokens, max_slots, stride_out, n_slices, r_max, h_stride_t,
    HAS_ORDER: tl.constexpr, DOT: tl.constexpr, UPCAST: tl.constexpr,
    BM: tl.constexpr, BR: tl.constexpr, BN: tl.constexpr,
):  # fmt: skip
    tile = tl.program_id(0)
    s = tl.program_id(1)
    n0 = tl.program_id(2) * BN
    g = tl.load(tile_group_ptr + tile)
    if g < 0:
        return
    slot = tl.load(group_slot_ptr + g)
    if (slot < 0) | (slot >= max_slots):
        return
    r = tl.minimum(tl.load(rank_ptr + slot * n_slices + s), r_max)
    d_s = tl.load(dout_ptr + s)
    if (r <= 0) | (n0 >= d_s):
        return
    pos, tok, row_ok = tile_rows(
        tile, g, tile_first_ptr, group_start_ptr, group_len_ptr, order_ptr, num_tokens,
        HAS_ORDER, BM,
    )  # fmt: skip
    b_base = tl.load(boff_ptr + slot * n_slices + s)
    col = tl.load(col_ptr + s)
    offs_n = n0 + tl.arange(0, BN)
    n_ok = offs_n < d_s
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for j0 in range(0, r, BR):
        offs_j = j0 + tl.arange(0, BR)
        j_ok = offs_j < r
        ht = tl.load(
            h_ptr + pos[:, None] * h_stride_t + s * r_max + offs_j[None, :],
            mask=row_ok[:, None] & j_ok[None, :],
            other=0.0,
        )
        bt = tl.load(
            bt_ptr + b_base + offs_j[:, None].to(tl.int64) * d_s + offs_n[None, :],
            mask=j_ok[:, None] & n_ok[None, :],
            other=0.0,
        )
        if DOT == "split":
            if UPCAST:  # the interpreter (its bf16 casts truncate, its bf16 dot is wrong):
                hi = _round_bf16(ht)  # the GPU's round-to-nearest parts, kept in fp32 and
                lo = _round_bf16(ht - hi)  # multiplied exactly there
                b32 = bt.to(tl.float32)
                acc = tl.dot(hi, b32, acc, input_precision="ieee")
                acc = tl.dot(lo, b32, acc, input_precision="ieee")
            else:
                hi = ht.to(tl.bfloat16)
                lo = (ht - hi.to(tl.float32)).to(tl.bfloat16)
                acc = tl.dot(hi, bt, acc)
                acc = tl.dot(lo, bt, acc)
        else:
            acc = tl.dot(ht, bt.to(tl.float32), acc, input_precision=DOT)
    o_ptrs = out_ptr + tok[:, None] * stride_out + col + offs_n[None, :]
    o_mask = row_ok[:, None] & n_ok[None, :]
    prev = tl.load(o_ptrs, mask=o_mask, other=0.0)
    tl.store(o_ptrs, (prev.to(tl.float32) + acc).to(prev.dtype), mask=o_mask)
