"""Shared pieces of the Triton shrink and expand kernels: the host-side tile map and the tile
prologue every program runs (which group, which token rows).

Programs are laid out over a fixed-size map of row tiles (at most ``cdiv(T, BM) + G`` tiles
whatever the group sizes), so grids never depend on data and nothing is read back to the host.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from slora.kernels.multi_lora.meta import LoRAMeta

BLOCK_M = 16  # token rows per program


def tile_map(meta: LoRAMeta, block_m: int = BLOCK_M) -> tuple[Tensor, Tensor]:
    """Map of program tiles to (group, first row in group); group −1 = idle tile."""
    dev = meta.group_len.device
    active = meta.group_slot >= 0
    tiles = torch.where(active, (meta.group_len + block_m - 1) // block_m, 0)
    ends = torch.cumsum(tiles, 0)
    n_tiles = (meta.num_tokens + block_m - 1) // block_m + meta.group_len.shape[0]
    ids = torch.arange(n_tiles, device=dev)
    group = torch.searchsorted(ends, ids, right=True)
    valid = group < ends.shape[0]
    g = group.clamp(max=max(ends.shape[0] - 1, 0))
    first = (ids - (ends[g] - tiles[g])) * block_m
    tile_group = torch.where(valid, g, -1).to(torch.int32)
    return tile_group, first.to(torch.int32)


@triton.jit
def tile_rows(
    tile, g, tile_first_ptr, group_start_ptr, group_len_ptr, order_ptr,
    HAS_ORDER: tl.constexpr, BM: tl.constexpr,
):  # fmt: skip
    """Rows of tile ``tile`` of group ``g``: their positions in the grouped order (``pos``,
    which indexes the intermediate ``h``), their token indices (``tok``, which index x and
    out) and which of the BM rows exist (``row_ok``)."""
    start = tl.load(group_start_ptr + g)
    n = tl.load(group_len_ptr + g)
    rows = tl.load(tile_first_ptr + tile) + tl.arange(0, BM)
    row_ok = rows < n
    pos = start + rows
    if HAS_ORDER:
        tok = tl.load(order_ptr + pos, mask=row_ok, other=0)
    else:
        tok = pos
    return pos.to(tl.int64), tok.to(tl.int64), row_ok
