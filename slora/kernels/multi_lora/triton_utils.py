"""Shared pieces of the Triton shrink and expand kernels: the tile prologue every program runs
(which group, which token rows) and the launch configuration.

Programs are laid out over a fixed-size map of row tiles (``cdiv(T, BM) + G`` tiles whatever
the group sizes; built with the metadata, :func:`slora.kernels.multi_lora.meta.tile_map`), so
grids never depend on data and nothing is read back to the host.  Every index the metadata
supplies is bounded inside the kernels too (rows below the token count, slots below the slot
count, ranks below the intermediate's width): metadata with wrong values gives wrong numbers,
never an out-of-bounds access.
"""

from __future__ import annotations

import triton
import triton.language as tl

from slora.kernels.multi_lora.meta import TILE_M, tile_map

BLOCK_M = TILE_M  # token rows per program
SHRINK_MAX_COLS = 256  # (slice, rank) columns one shrink program computes from one read of x

__all__ = ["BLOCK_M", "SHRINK_MAX_COLS", "shrink_cols", "tile_map", "tile_rows"]


def shrink_cols(n_slices: int, r_max: int) -> int:
    """Columns per shrink program: all ``n_slices · r_max`` (slice, rank) columns rounded up to
    a power of two (x read once per tile), capped at :data:`SHRINK_MAX_COLS` for registers
    (x then read ``cdiv(n_slices · r_max, 256)`` times: twice for 3 slices of rank 128)."""
    return max(16, min(triton.next_power_of_2(n_slices * r_max), SHRINK_MAX_COLS))


@triton.jit
def tile_rows(
    tile, g, tile_first_ptr, group_start_ptr, group_len_ptr, order_ptr, num_tokens,
    HAS_ORDER: tl.constexpr, BM: tl.constexpr,
):  # fmt: skip
    """Rows of tile ``tile`` of group ``g``: their positions in the grouped order (``pos``,
    which indexes the intermediate ``h``), their token indices (``tok``, which index x and
    out) and which of the BM rows exist (``row_ok``: inside the group and the batch)."""
    start = tl.load(group_start_ptr + g).to(tl.int64)
    n = tl.load(group_len_ptr + g)
    rows = tl.load(tile_first_ptr + tile) + tl.arange(0, BM)
    pos = start + rows
    row_ok = (rows < n) & (pos >= 0) & (pos < num_tokens)
    if HAS_ORDER:
        tok = tl.load(order_ptr + pos, mask=row_ok, other=0).to(tl.int64)
        row_ok = row_ok & (tok >= 0) & (tok < num_tokens)
    else:
        tok = pos
    return pos, tok, row_ok
