"""torch.distributed in the core: sharded (DTensor) parameters and which process writes files.

FSDP2 (``torch.distributed.fsdp.fully_shard``) and tensor parallelism turn parameters into
``DTensor`` shards.  Reading one whole (to save an adapter) is a collective: every process of
the mesh must call it, in the same order; the file is then written once, by global rank 0.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def is_sharded(tensor: Tensor) -> bool:
    """Whether ``tensor`` is a DTensor (FSDP2 / tensor-parallel shard)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return False
    return isinstance(tensor, DTensor)


def sharded_parameters(model: nn.Module) -> list[str]:
    """Names of ``model``'s parameters that are DTensor shards."""
    return [n for n, p in model.named_parameters() if is_sharded(p)]


def full_tensor(tensor: Tensor) -> Tensor:
    """The whole tensor of a DTensor (a collective: every process calls it), else itself."""
    return tensor.full_tensor() if is_sharded(tensor) else tensor


def writes_files(sharded: bool) -> bool:
    """Whether this process writes a file built from (possibly) sharded tensors: global rank 0
    when the model is sharded under an initialised process group, otherwise every caller."""
    if not sharded or not torch.distributed.is_initialized():
        return True
    return torch.distributed.get_rank() == 0


def wait_for_writer(sharded: bool) -> None:
    """Every process returns only once rank 0 has written (a sharded model's save)."""
    if sharded and torch.distributed.is_initialized():
        torch.distributed.barrier()
