"""Numerical edge cases of the calibration pass: half-precision models whose squared
activations overflow fp16, and inputs on every backend that runs on this machine."""

import oracles
import pytest
import torch
from torch import nn

import slora


class TwoLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(12, 20)
        self.down = nn.Linear(20, 7)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def loss_fn(model, batch):
    return (model(batch["x"]).float() ** 2).mean() * 1e-6


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("estimator", ["activation", "fisher", "fisher_exact"])
def test_half_precision_model_with_overflowing_squares(dtype, estimator):
    torch.manual_seed(0)
    model = TwoLayer()
    data = [{"x": torch.randn(2, 5, 12) * 300} for _ in range(2)]  # x² ≈ 9e4 > fp16 max
    half = TwoLayer().to(dtype)
    half.load_state_dict(model.state_dict())
    half_data = [{"x": b["x"].to(dtype)} for b in data]
    report = slora.analyze(half, half_data, estimator, loss_fn=loss_fn, progress=False)
    # Reference: the same half model's activations and gradients, squared in float64.
    xs, dys = {"up": [], "down": []}, {"up": [], "down": []}
    mods = {"up": half.up, "down": half.down}
    for batch in half_data:
        outs = {}

        def capture(name, outs=outs):
            def hook(mod, args, out):
                xs[name].append(args[0].detach().reshape(-1, args[0].shape[-1]))
                out.retain_grad()
                outs[name] = out

            return hook

        hooks = [m.register_forward_hook(capture(n)) for n, m in mods.items()]
        for p in half.parameters():
            p.requires_grad_(True)
        loss_fn(half, batch).backward()
        for h in hooks:
            h.remove()
        for n, o in outs.items():
            dys[n].append(o.grad.detach().reshape(-1, o.shape[-1]))
    for n in mods:
        x, dy = torch.cat(xs[n]).double(), torch.cat(dys[n]).double()
        want = oracles.metrics(estimator, x, dy)
        got = report.modules[n]
        assert torch.isfinite(torch.tensor(got["global"])), "overflowed"
        assert got["global"] == pytest.approx(want["global"], rel=1e-4)
        assert got["topk"] == pytest.approx(want["topk"], rel=1e-4)
