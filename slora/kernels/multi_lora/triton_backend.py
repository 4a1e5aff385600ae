"""Backend ``triton``: the shrink kernel (x·Aᵀ·scale → fp32 h, up to 256 (slice, rank)
columns from one read of x) then the expand kernel (out += h·Bᵀ).  Both grids have fixed
sizes (tiles × column blocks); programs past a group's tokens, an adapter's true rank or a
slice's width return at once, so padding costs no reads.  With the tile map in the metadata
(built once per step), a call is one allocation and two launches."""

from __future__ import annotations

import torch
import triton
from torch import Tensor

from slora.kernels.multi_lora import triton_utils
from slora.kernels.multi_lora.meta import LoRAMeta
from slora.kernels.multi_lora.packed import KernelWeights
from slora.kernels.multi_lora.triton_expand import expand_kernel
from slora.kernels.multi_lora.triton_shrink import shrink_kernel
from slora.kernels.multi_lora.triton_utils import BLOCK_M, shrink_cols

# The expand's dot by weight dtype (docs/kernels.md, "Precision").
EXPAND_DOT = {torch.float32: "ieee", torch.bfloat16: "split", torch.float16: "tf32"}


def multi_lora_triton(
    x: Tensor, w: KernelWeights, meta: LoRAMeta, out: Tensor, overwrite: bool = False
) -> Tensor:
    """``out += delta`` (``out = delta`` with ``overwrite``)."""
    if overwrite:
        out.zero_()
    T = meta.num_tokens
    r_max = w.max_rank
    if T == 0 or r_max == 0:
        return out
    x = x if x.stride(1) == 1 else x.contiguous()
    if out.stride(1) != 1:
        raise ValueError("out must have contiguous rows (stride 1 along the last dimension)")
    if x.device.type == "cpu" and out.dtype == torch.bfloat16:  # the interpreter's bf16 store
        out.copy_(multi_lora_triton(x, w, meta, out.float()))  # truncates: go through fp32
        return out
    meta = meta.with_tiles()  # built once per step by the builders on CUDA: then a no-op
    tile_group, tile_first = meta.tile_group, meta.tile_first
    n_tiles = tile_group.shape[0]
    S = w.n_slices
    h = torch.empty(T, S, r_max, dtype=torch.float32, device=x.device)
    order = meta.order if meta.order is not None else tile_group  # dummy pointer when unused
    fp32 = x.dtype == torch.float32
    # The interpreter's bf16 dot is wrong (numpy has no bf16): upcast there, exactly.
    upcast = x.device.type == "cpu" and x.dtype == torch.bfloat16
    slots = w.ranks.shape[0]
    bc = shrink_cols(S, r_max, n_tiles, triton_utils.SHRINK_MIN_PROGRAMS)
    bk = (32 if bc >= 256 else 64) if fp32 else 64
    br, bn = 16, 64
    groups = (meta.group_slot, meta.group_start, meta.group_len, w.ranks)
    shrink_kernel[(n_tiles, triton.cdiv(S * r_max, bc))](
        x, w.A, h, order, tile_group, tile_first, *groups, w.a_offsets, w.scales,
        T, slots, w.d_in, x.stride(0), S, r_max, h.stride(0),
        HAS_ORDER=meta.order is not None, PRECISION="ieee" if fp32 else "tf32", UPCAST=upcast,
        BM=BLOCK_M, BC=bc, BK=bk, num_warps=8 if bc >= 256 else 4,
    )  # fmt: skip
    expand_kernel[(n_tiles, S, triton.cdiv(max(w.slice_sizes), bn))](
        h, w.Bt, out, order, tile_group, tile_first, *groups,
        w.b_offsets, w.slice_d_out, w.slice_col, T, slots, out.stride(0), S, r_max, h.stride(0),
        HAS_ORDER=meta.order is not None, DOT=EXPAND_DOT[x.dtype], UPCAST=upcast,
        BM=BLOCK_M, BR=br, BN=bn,
    )  # fmt: skip
    return out
