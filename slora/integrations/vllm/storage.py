"""True-rank copies of vLLM's LoRA slots (one store per LoRA linear layer).

vLLM stores every LoRA linear layer's adapters in padded per-slot buffers
(``lora_a_stacked[s]``: ``[max_loras, 1, max_lora_rank, d_in]``, ``lora_b_stacked[s]``:
``[max_loras, 1, d_out_s, max_lora_rank]``, scale already folded into B) and writes a slot in
``LoRAModelManager.activate_adapter``.  Right after it (:mod:`.manager`), :meth:`LayerAdapters.load`
copies the slot's first ``r`` rows of A and columns of B — ``r`` the adapter's true rank,
trailing all-zero rank components dropped — into the layer's
:class:`slora.ops.PackedAdapters`.  Rows past an adapter's rank are never read, not even here.

The store gives every slot a fixed region of ``max_lora_rank`` rows per slice, allocated when
the engine builds its LoRA layers: whatever sequence of adapters (of ranks ≤
``max_lora_rank``) is loaded afterwards, its buffers never move — CUDA graphs captured by vLLM
keep reading the right memory — and the kernels still read only each adapter's true rank.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from slora.ops import PackedAdapters


def effective_rank(A: Tensor, B: Tensor) -> int:
    """1 + the last rank component j with both ``A[j]`` and ``B[:, j]`` nonzero (0 if none):
    components past it add nothing, so dropping them is exact.  The common case — the last
    component is live — reads one row and one column, not the whole adapter (this runs for
    every layer on every adapter load)."""
    r = A.shape[0]
    if r == 0:
        return 0
    if bool(A[r - 1].any()) and bool(B[:, r - 1].any()):
        return r
    live = (A != 0).any(dim=1) & (B != 0).any(dim=0)
    idx = live.nonzero()
    return int(idx[-1, 0]) + 1 if idx.numel() else 0


def rank_hint(weights: Any) -> int:
    """Largest rank among a vLLM ``LoRALayerWeights``' ``lora_a`` tensors ([r, d_in] each,
    a list for packed q/k/v or gate/up modules; None entries for unadapted slices)."""
    if weights is None:
        return 0
    a = weights.lora_a
    tensors = a if isinstance(a, (list, tuple)) else [a]
    return max((int(t.shape[0]) for t in tensors if t is not None), default=0)


class LayerAdapters:
    """The true-rank :class:`PackedAdapters` of one vLLM LoRA linear layer (one slice per
    entry of ``lora_a_stacked``; slot k = vLLM's slot k)."""

    def __init__(self, layer: Any) -> None:
        a0 = layer.lora_a_stacked[0]
        max_loras, _, pad_rank, d_in = a0.shape
        sizes = [int(b.shape[2]) for b in layer.lora_b_stacked]
        self.pad_rank = int(pad_rank)
        # CUDA graphs replay fixed addresses: a fixed region per slot, so the buffers never move
        self.packed = PackedAdapters(
            int(d_in),
            sizes,
            max_slots=int(max_loras),
            dtype=a0.dtype,
            device=a0.device,
            slot_rows=self.pad_rank,
        )
        if a0.device.type == "cuda":  # traced once: the intermediate's size must not change
            self.packed.reserve_rank(self.pad_rank)

    @staticmethod
    def supports(layer: Any) -> bool:
        """Whether ``layer`` is a LoRA linear layer whose slices this storage can mirror
        (fully sharded layers keep rank-sharded A buffers and run vLLM's shrink/expand)."""
        a = getattr(layer, "lora_a_stacked", None)
        b = getattr(layer, "lora_b_stacked", None)
        if not isinstance(a, tuple) or not isinstance(b, tuple) or len(a) != len(b) or not a:
            return False
        if any(t.dim() != 4 for t in (*a, *b)):
            return False
        return all(ta.shape[2] == tb.shape[3] for ta, tb in zip(a, b))

    def load(self, layer: Any, slot: int, rank: int) -> None:
        """Mirror vLLM's slot ``slot`` of ``layer`` (adapter of rank ≤ ``rank``; 0 = empty)."""
        r = min(rank, self.pad_rank)
        slices = []
        for a, b in zip(layer.lora_a_stacked, layer.lora_b_stacked):
            A, B = a[slot, 0, :r], b[slot, 0, :, :r]
            r_s = effective_rank(A, B) if r else 0
            slices.append((A[:r_s], B[:, :r_s], 1.0) if r_s else None)
        if any(s is not None for s in slices):
            self.packed.load(slot, slices)
        else:
            self.packed.unload(slot)

    def unload(self, slot: int) -> None:
        """vLLM emptied ``slot``: no kernel reads it until an adapter is loaded there again."""
        self.packed.unload(slot)
