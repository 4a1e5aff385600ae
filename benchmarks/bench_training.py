"""One LoRA training step (forward + backward + AdamW step) of slora against PEFT at the same
per-module ranks and scales, on the embedded MiniLM-L6.

    python benchmarks/bench_training.py [--repeats 15] [--threads 2] [--json out.json]

All 36 encoder Linears get LoRA with ranks cycling through {4, 8, 12, 16} (PEFT:
``rank_pattern`` / ``alpha_pattern`` with the same values, so both compute the same function);
batch 16 × 64 tokens, fp32.  Contenders, timed in interleaved rounds (one step of each per
round, medians over rounds), after checking that their losses and gradients agree:

- ``peft``            PEFT LoRA;
- ``slora``           slora.patch (q/k/v through the grouped op ``slora::lora_slices``);
- ``slora_ungrouped`` slora.patch with ``group_shared_inputs=False`` (every layer on its own).

Reported: ms per step and the ratio to PEFT's (goal: slora ≤ 0.95× PEFT).
"""

from __future__ import annotations

import argparse
import json
import statistics
import zlib

import torch

from slora.benchmarking import measure

RANKS = (4, 8, 12, 16)
SCALE = 2.0


def _targets(model) -> list[str]:  # noqa: ANN001
    return [
        n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".encoder." in n
    ]


def build(kind: str):  # noqa: ANN201
    """(model, trainable parameters) for ``kind``; identical initial A and B across kinds."""
    from slora.embedded import load_model

    model = load_model(num_labels=2, seed=0)
    names = _targets(model)
    ranks = {n: RANKS[i % len(RANKS)] for i, n in enumerate(names)}
    if kind == "peft":
        from peft import LoraConfig, get_peft_model

        cfg = LoraConfig(
            r=8, lora_alpha=16, target_modules=names, lora_dropout=0.0,
            rank_pattern=ranks, alpha_pattern={n: SCALE * r for n, r in ranks.items()},
        )  # fmt: skip
        model = get_peft_model(model, cfg)
    else:
        import slora

        slora.patch(
            model,
            slora.RankPlan(ranks),
            lora_alpha=SCALE * statistics.mean(ranks.values()),  # scale SCALE everywhere
            group_shared_inputs=kind == "slora",
        )
    for name, p in model.named_parameters():  # the same A and B (non-zero) in every kind
        if p.requires_grad and "lora_" in name:
            g = torch.Generator().manual_seed(zlib.crc32(_key(name).encode()))
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    params = [p for p in model.parameters() if p.requires_grad]
    return model.train(), params


def _key(name: str) -> str:
    return name.replace("base_model.model.", "").replace(".default", "")


def lora_grads(model) -> dict[str, torch.Tensor]:  # noqa: ANN001
    out = {}
    for name, p in model.named_parameters():
        if p.requires_grad and p.grad is not None:
            out[_key(name)] = p.grad.detach().clone()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    batch = {
        "input_ids": torch.randint(1000, 20000, (16, 64), generator=g),
        "attention_mask": torch.ones(16, 64, dtype=torch.long),
        "labels": torch.randint(0, 2, (16,), generator=g),
    }
    kinds = ("peft", "slora", "slora_ungrouped")
    runs = {}
    for kind in kinds:
        model, params = build(kind)
        opt = torch.optim.AdamW(params, lr=1e-4)

        def step(model=model, opt=opt) -> float:
            opt.zero_grad(set_to_none=True)
            loss = model(**batch).loss
            loss.backward()
            opt.step()
            return loss.item()

        runs[kind] = (model, step)
    # same function: losses and gradients of one step (before any update) agree
    ref = None
    for kind, (model, _) in runs.items():
        model.eval().zero_grad(set_to_none=True)  # no dropout for the comparison
        model(**batch).loss.backward()
        grads = lora_grads(model)
        if ref is None:
            ref = grads
        else:
            assert grads.keys() == ref.keys(), kind
            for k in ref:
                torch.testing.assert_close(grads[k], ref[k], rtol=1e-3, atol=1e-6, msg=k)
        model.train().zero_grad(set_to_none=True)
    timings = measure({k: runs[k][1] for k in kinds}, rounds=args.repeats)  # interleaved
    med = {k: t.median * 1e3 for k, t in timings.items()}
    print(f"training step, MiniLM-L6, 36 LoRA Linears, ranks {RANKS}, batch 16x64, fp32, "
          f"{torch.get_num_threads()} threads, {args.repeats} interleaved rounds")  # fmt: skip
    for k in kinds:
        print(f"{k:<18}{med[k]:>9.1f} ms   {med[k] / med['peft']:.3f}x PEFT")
    if args.json:
        result = {
            "ms": med,
            "ratio_vs_peft": {k: med[k] / med["peft"] for k in kinds},
            "threads": torch.get_num_threads(),
            "repeats": args.repeats,
        }
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
