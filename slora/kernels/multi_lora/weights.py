"""What a backend reads of a :class:`~slora.kernels.multi_lora.packed.PackedAdapters`."""

from __future__ import annotations

import itertools
from typing import NamedTuple

from torch import Tensor


class KernelWeights(NamedTuple):
    """What a backend reads of a :class:`PackedAdapters`: the buffers, the per-(slot, slice)
    metadata, the slices' widths (device tensors and host ints) and the largest rank."""

    A: Tensor
    Bt: Tensor
    ranks: Tensor
    a_offsets: Tensor
    b_offsets: Tensor
    scales: Tensor
    slice_d_out: Tensor
    slice_col: Tensor
    slice_sizes: list[int]
    max_rank: int

    @property
    def d_in(self) -> int:
        return self.A.shape[1]

    @property
    def n_slices(self) -> int:
        return len(self.slice_sizes)

    @property
    def d_out(self) -> int:
        return sum(self.slice_sizes)

    @property
    def col_starts(self) -> list[int]:
        return list(itertools.accumulate(self.slice_sizes[:-1], initial=0))
