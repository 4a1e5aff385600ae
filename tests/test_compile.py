"""torch.compile over slora: a patched Llama traces with zero graph breaks in slora's layers and
the compiled training step equals eager (loss and every LoRA gradient)."""

from __future__ import annotations

import torch
from tiny_models import batches, tiny_llama

import slora
from slora.core.layer import LoraLinear
from slora.core.targets import find_targets


def _patched_llama():
    model = tiny_llama()
    names = list(find_targets(model, None))
    slora.patch(model, slora.RankPlan({n: 1 + i % 5 for i, n in enumerate(names)}))
    with torch.no_grad():  # non-zero B so that every gradient path is exercised
        for m in model.modules():
            if isinstance(m, LoraLinear):
                m.lora_B.weight.normal_(0, 0.1)
    return model.train()


def _loss_and_grads(model, fn, batch):
    model.zero_grad(set_to_none=True)
    loss = fn(batch["input_ids"], batch["attention_mask"], batch["labels"])
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads


def test_patched_llama_compiles_without_graph_breaks_and_matches_eager():
    model = _patched_llama()
    batch = batches("llama", n=1)[0]

    def step(ids, mask, labels):
        return model(input_ids=ids, attention_mask=mask, labels=labels).loss

    explained = torch._dynamo.explain(step)(
        batch["input_ids"], batch["attention_mask"], batch["labels"]
    )
    assert explained.graph_break_count == 0, [r.reason for r in explained.break_reasons]

    want_loss, want = _loss_and_grads(model, step, batch)
    groups = {id(m.group): m.group for m in model.modules() if isinstance(m, LoraLinear)}
    calls = sum(g.grouped_calls for g in groups.values() if g is not None)
    assert calls > 0  # q/k/v and gate/up shrinks were grouped
    torch._dynamo.reset()
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    got_loss, got = _loss_and_grads(model, compiled, batch)
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-5, atol=1e-6)
    assert got.keys() == want.keys() and len(got) == 28
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6, msg=name)
    # the groups stayed on, grouped again inside the traced step, and released their state
    assert all(g is None or (g.enabled and not g._pending) for g in groups.values())
    assert sum(g.grouped_calls for g in groups.values() if g is not None) > calls
