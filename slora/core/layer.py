"""The LoRA layer that ``slora.patch`` puts in place of a target nn.Linear / Conv1D.

Parameter names follow PEFT (``base_layer``, ``lora_A.weight`` [r, d_in], ``lora_B.weight``
[d_out, r]) so a patched model's state dict reads like a PEFT model's.  A and B are kept in
the base layer's compute dtype, fp16/bf16 promoted to fp32 (as PEFT does) for stable training
— for a quantized base (QLoRA) never in its storage dtype.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from slora.core import quantized
from slora.core.targets import is_conv1d, is_linear_like, linear_dims

# Sibling modules that read the same input in common architectures (q/k/v, gate/up): their
# LoRA branches are computed together by one grouped call (see LoraGroup).
SHARED_INPUT_SETS = (
    frozenset({"q_proj", "k_proj", "v_proj"}),
    frozenset({"query", "key", "value"}),
    frozenset({"gate_proj", "up_proj"}),
    frozenset({"wq", "wk", "wv"}),
    frozenset({"w1", "w3"}),
)


class LoraLinear(nn.Module):
    """``y = base(x) + scale · B A dropout(x)`` around a frozen linear-like ``base_layer``."""

    def __init__(
        self,
        base_layer: nn.Module,
        rank: int,
        scale: float,
        dropout: float = 0.0,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        if not is_linear_like(base_layer):
            raise TypeError(quantized.unsupported_message("base_layer", base_layer))
        if rank < 1:
            raise ValueError(f"LoRA rank must be ≥ 1, got {rank}")
        self.base_layer = base_layer
        self.d_in, self.d_out = linear_dims(base_layer)
        self.rank = int(rank)
        self.scale = float(scale)
        self.fan_in_fan_out = is_conv1d(base_layer)  # Conv1D: W is [d_in, d_out]
        # While merged by dequantizing: the quantized base layer, kept out of the module tree
        # (a tuple is not registered) so that the merged model's state dict is plain float.
        self._quantized_base: tuple[nn.Module, ...] = ()
        factory = dict(
            device=quantized.device_of(base_layer),
            dtype=quantized.adapter_dtype(base_layer, dtype),
        )
        self.lora_A = nn.Linear(self.d_in, rank, bias=False, **factory)
        self.lora_B = nn.Linear(rank, self.d_out, bias=False, **factory)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        self.group: LoraGroup | None = None
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        """A ~ Kaiming-uniform, B = 0: the adapter starts as the identity (PEFT's default)."""
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    @property
    def weight(self) -> Tensor:  # code that reads `module.weight` keeps working
        return self.base_layer.weight

    @property
    def bias(self) -> Tensor | None:
        return getattr(self.base_layer, "bias", None)

    def delta_weight(self) -> Tensor:
        """scale · B A in the base weight's layout and compute dtype."""
        delta = (self.lora_B.weight @ self.lora_A.weight) * self.scale
        if self.fan_in_fan_out:
            delta = delta.t()
        return delta.to(quantized.compute_dtype(self.base_layer))

    def merge(self, dequantize: bool = False) -> None:
        """Fold B A into the base weight.  A quantized base cannot take a float update without
        requantizing it (which rounds most of the update away), so it needs
        ``dequantize=True``: the base becomes a float nn.Linear holding dequant(W) + scale·B A
        (float memory for this layer; :meth:`unmerge` puts the quantized layer back)."""
        if self.merged:
            return
        if quantized.is_quantized(self.base_layer):
            if not dequantize:
                raise ValueError(
                    f"cannot merge into the quantized {type(self.base_layer).__name__} weight "
                    "in place; pass dequantize=True to replace it by a float nn.Linear"
                )
            dense = quantized.dense_copy(self.base_layer)
            self._quantized_base, self.base_layer = (self.base_layer,), dense
        with torch.no_grad():
            self.base_layer.weight += self.delta_weight()
        self.merged = True

    def unmerge(self) -> None:
        if not self.merged:
            return
        if self._quantized_base:
            self.base_layer, self._quantized_base = self._quantized_base[0], ()
        else:
            with torch.no_grad():
                self.base_layer.weight -= self.delta_weight()
        self.merged = False

    def forward(self, x: Tensor) -> Tensor:
        y = self.base_layer(x)
        if self.merged:
            return y
        h = self.group.shrink_for(self, x) if self.group is not None else None
        if h is None:
            h = self.lora_A(self.lora_dropout(x).to(self.lora_A.weight.dtype))
        if h.dtype == y.dtype:  # y + scale · h Bᵀ as one GEMM: no separate scale and add passes
            y2 = torch.addmm(
                y.reshape(-1, self.d_out),
                h.reshape(-1, self.rank),
                self.lora_B.weight.t(),
                alpha=self.scale,
            )
            return y2.view(y.shape)
        return y + (self.lora_B(h) * self.scale).to(y.dtype)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, scale={self.scale:g}, merged={self.merged}"


class LoraGroup:
    """LoRA layers whose base modules read the same input tensor (q/k/v, gate/up).

    The first member called with an input x computes every member's shrink ``h_s = x A_sᵀ``
    in one GEMM over the concatenated ranks (x read once; in the backward one GEMM gives dx
    and one every A's gradient); each member then adds its own expand ``scale · h_s B_sᵀ``
    into its base output in one fused GEMM.  The other members, called next with the *same
    tensor object*, unmodified since (same ``_version``), take their ``h_s``.  If a member
    ever sees a different or modified input while shrinks are pending, the members do not
    share their input after all and the group switches itself off (each layer computes its
    own branch again).  Plain differentiable torch ops: the state machine traces under
    ``torch.compile`` without graph breaks.
    """

    def __init__(self, members: list[LoraLinear]):
        self.members = list(members)
        for m in self.members:
            m.group = self
        self.enabled = True
        self.grouped_calls = 0
        self._input: Tensor | None = None
        self._shrinks: dict[int, Tensor] = {}
        self._version = -1
        self._pending: set[int] = set()

    def _release(self) -> None:
        self._input, self._shrinks, self._pending = None, {}, set()

    def _unmodified(self, x: Tensor) -> bool:
        """x was not modified in place since the grouped call (its version counter is
        unchanged); not checked while torch.compile traces, where the counter is symbolic."""
        return torch.compiler.is_compiling() or x._version == self._version

    def shrink_for(self, layer: LoraLinear, x: Tensor) -> Tensor | None:
        """This layer's ``x A_sᵀ`` (in the LoRA dtype), or None to let the layer compute it."""
        if not self.enabled:
            return None
        if not torch.compiler.is_compiling() and x.is_inference():
            # An inference tensor (made under torch.inference_mode()) has no version counter,
            # so an in-place change between the siblings' calls could not be seen: each layer
            # computes its own shrink (the same result; grouping resumes outside).
            self._release()
            return None
        if self._pending:
            if x is self._input and self._unmodified(x) and id(layer) in self._pending:
                self._pending.discard(id(layer))
                h = self._shrinks[id(layer)]
                if not self._pending:
                    self._release()
                return h
            self.enabled = False  # inputs are not shared: stop grouping
            self._release()
            return None
        weight = torch.cat([m.lora_A.weight for m in self.members])
        h = nn.functional.linear(x.to(weight.dtype), weight)
        self.grouped_calls += 1
        self._input = x
        self._version = -1 if torch.compiler.is_compiling() else x._version
        parts = h.split([m.rank for m in self.members], dim=-1)
        self._shrinks = {id(m): part for m, part in zip(self.members, parts)}
        self._pending = {id(m) for m in self.members} - {id(layer)}
        return self._shrinks[id(layer)]


def group_shared_inputs(layers: dict[str, LoraLinear]) -> list[LoraGroup]:
    """Group sibling LoRA layers named like q/k/v or gate/up (same parent, same d_in, no
    dropout, not merged); see :class:`LoraGroup`."""
    by_parent: dict[tuple[str, int], dict[str, LoraLinear]] = {}
    for name, layer in layers.items():
        parent, _, child = name.rpartition(".")
        if isinstance(layer.lora_dropout, nn.Identity):
            by_parent.setdefault((parent, layer.d_in), {})[child] = layer
    groups = []
    for children in by_parent.values():
        for names in SHARED_INPUT_SETS:
            members = [children[c] for c in sorted(names) if c in children]
            if len(members) > 1:
                groups.append(LoraGroup(members))
    return groups
