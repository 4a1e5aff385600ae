"""A tiny attention-shaped model (q/k/v, MLP, tied or untied lm_head) for fast robustness tests,
and helpers that snapshot a model or pool exactly."""

from __future__ import annotations

import torch
from torch import nn

import slora
from slora.core.patch import STATE_ATTR

D, VOCAB = 8, 11
PROJ = ("q_proj", "k_proj", "v_proj", "up_proj", "down_proj")


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(D, D) for _ in range(3))
        self.up_proj = nn.Linear(D, 2 * D)
        self.down_proj = nn.Linear(2 * D, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        att = self.q_proj(x) * torch.sigmoid(self.k_proj(x)) + self.v_proj(x)
        x = x + att
        return x + self.down_proj(torch.relu(self.up_proj(x)))


class Toy(nn.Module):
    def __init__(self, tied: bool = False, layers: int = 2, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(VOCAB, D)
        self.blocks = nn.ModuleList(Block() for _ in range(layers))
        self.lm_head = nn.Linear(D, VOCAB, bias=False)
        self.classifier = nn.Linear(D, 3)
        if tied:
            self.lm_head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(x) + self.classifier(x).sum(-1, keepdim=True)

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head


def ids(batch: int = 3, seq: int = 5, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def targets(model: nn.Module, with_head: bool = False) -> list[str]:
    names = [n for b in range(len(model.blocks)) for n in (f"blocks.{b}.{c}" for c in PROJ)]
    return names + (["lm_head"] if with_head else [])


def plan(model: nn.Module, rank: int = 2, with_head: bool = False) -> slora.RankPlan:
    from slora.core.patch import plan_for_ranks

    return plan_for_ranks(model, {n: rank for n in targets(model, with_head)})


def randomize_lora(model: nn.Module, seed: int = 3) -> None:
    """Give every adapter non-zero A and B (a freshly patched model is the identity)."""
    from slora.core.patch import lora_layers

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            for p in (layer.lora_A.weight, layer.lora_B.weight):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def snapshot(model: nn.Module) -> dict:
    """Everything a failed call must leave exactly as it was."""
    return {
        "tree": [(n, type(m).__name__, id(m)) for n, m in model.named_modules()],
        "state": {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()},
        "grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "patched": getattr(model, STATE_ATTR, None),
        "merged": {n: getattr(m, "merged", None) for n, m in model.named_modules()},
    }


def same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Exactly equal, NaN where the other is NaN."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if not a.is_floating_point():
        return torch.equal(a, b)
    return bool(((a == b) | (a.isnan() & b.isnan())).all())


def assert_same_model(before: dict, after: dict) -> None:
    assert before["tree"] == after["tree"]
    assert before["grad"] == after["grad"]
    assert before["patched"] is after["patched"]
    assert before["merged"] == after["merged"]
    assert before["state"].keys() == after["state"].keys()
    for key, value in before["state"].items():
        assert same_tensor(value, after["state"][key]), key


def outputs(model: nn.Module, x: torch.Tensor | None = None) -> torch.Tensor:
    with torch.no_grad():
        return model(ids() if x is None else x)
