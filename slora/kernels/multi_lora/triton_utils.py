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
# Fewer shrink programs than this leave most of a GPU's SMs idle (an H100 has 132): decode
# batches then take narrower column blocks (x, a few KiB per tile, is re-read from L2).
SHRINK_MIN_PROGRAMS = 256

__all__ = ["BLOCK_M", "SHRINK_MAX_COLS", "SHRINK_MIN_PROGRAMS", "shrink_cols", "tile_map",
           "tile_rows"]  # fmt: skip


def shrink_cols(n_slices: int, r_max: int, n_tiles: int,
                min_programs: int = SHRINK_MIN_PROGRAMS) -> int:  # fmt: skip
    """Columns per shrink program: all ``n_slices · r_max`` (slice, rank) columns rounded up
    to a power of two, capped at :data:`SHRINK_MAX_COLS` for registers — x then read once per
    tile (twice at 3 slices of rank 128) — and halved (down to 16) while the grid would have
    fewer than ``min_programs`` programs: prefill reads x once, decode keeps the GPU busy."""
    cols = n_slices * r_max
    bc = max(16, min(triton.next_power_of_2(cols), SHRINK_MAX_COLS))
    while bc > 16 and n_tiles * triton.cdiv(cols, bc) < min_programs:
        bc //= 2
    return bc


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
