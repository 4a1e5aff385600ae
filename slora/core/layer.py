"""The LoRA layer that ``slora.patch`` puts in place of a target nn.Linear / Conv1D.

Parameter names follow PEFT (``base_layer``, ``lora_A.weight`` [r, d_in], ``lora_B.weight``
[d_out, r]) so a patched model's state dict reads like a PEFT model's.  Adapters of fp16/bf16
bases are kept in fp32 (as PEFT does) for stable training.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from slora.core.targets import is_linear_like, linear_dims


class LoraLinear(nn.Module):
    """``y = base(x) + scale · B A dropout(x)`` around a frozen linear-like ``base_layer``."""

    def __init__(self, base_layer: nn.Module, rank: int, scale: float, dropout: float = 0.0):
        super().__init__()
        if not is_linear_like(base_layer):
            raise TypeError(f"LoraLinear wraps nn.Linear or Conv1D, got {type(base_layer)}")
        if rank < 1:
            raise ValueError(f"LoRA rank must be ≥ 1, got {rank}")
        self.base_layer = base_layer
        self.d_in, self.d_out = linear_dims(base_layer)
        self.rank = int(rank)
        self.scale = float(scale)
        self.fan_in_fan_out = not isinstance(base_layer, nn.Linear)  # Conv1D: W is [d_in, d_out]
        weight = base_layer.weight
        dtype = torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype
        factory = dict(device=weight.device, dtype=dtype)
        self.lora_A = nn.Linear(self.d_in, rank, bias=False, **factory)
        self.lora_B = nn.Linear(rank, self.d_out, bias=False, **factory)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
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
        """scale · B A in the base weight's layout and dtype."""
        delta = (self.lora_B.weight @ self.lora_A.weight) * self.scale
        if self.fan_in_fan_out:
            delta = delta.t()
        return delta.to(self.base_layer.weight.dtype)

    def merge(self) -> None:
        if not self.merged:
            with torch.no_grad():
                self.base_layer.weight += self.delta_weight()
            self.merged = True

    def unmerge(self) -> None:
        if self.merged:
            with torch.no_grad():
                self.base_layer.weight -= self.delta_weight()
            self.merged = False

    def forward(self, x: Tensor) -> Tensor:
        y = self.base_layer(x)
        if self.merged:
            return y
        h = self.lora_dropout(x).to(self.lora_A.weight.dtype)
        return y + (self.lora_B(self.lora_A(h)) * self.scale).to(y.dtype)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, scale={self.scale:g}, merged={self.merged}"
