"""GPU check, sensitivity step: the whole sensitivity pass (``slora.analyze``, Fisher) against a
plain backward (activation gradients only, frozen weights) on a Llama built in-process from a
``LlamaConfig`` (about 170 M parameters: hidden 1024, 8 layers, MLP 2816, vocabulary 32000;
nothing downloaded), random token batches.  The two run interleaved, ``--repeats`` rounds,
median of each; the result is their ratio (goal ≤ 1.05).

    python benchmarks/gpu/sensitivity_config.py --device cuda --json sensitivity.json [--dry-run]

``--dry-run``: a tiny config on the CPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def build(dry: bool, device: str, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    if dry:
        cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=4, vocab_size=256,
                          max_position_embeddings=64)  # fmt: skip
        n_batches, batch, seq = 2, 2, 16
    else:
        cfg = LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                          num_attention_heads=16, num_key_value_heads=16, vocab_size=32000,
                          max_position_embeddings=512)  # fmt: skip
        n_batches, batch, seq = 8, 8, 256
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(device=device, dtype=dtype)
    g = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(n_batches):
        ids = torch.randint(0, cfg.vocab_size, (batch, seq), generator=g).to(device)
        batches.append({"input_ids": ids, "labels": ids})
    return model, batches


def plain(model, batches) -> None:  # noqa: ANN001
    """Forward + backward with frozen weights: gradients reach every activation, no weight."""
    model.eval().requires_grad_(False)
    anchor = torch.zeros((), requires_grad=True, device=next(model.parameters()).device)
    emb = model.get_input_embeddings()
    handle = emb.register_forward_hook(lambda m, a, out: out + anchor)
    try:
        for b in batches:
            model(**b).loss.backward()
    finally:
        handle.remove()


def sensitivity(model, batches) -> None:  # noqa: ANN001
    import slora

    slora.analyze(model, batches, estimator="fisher", progress=False)


def timed(fn, device: str) -> float:  # noqa: ANN001
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", required=True)
    ap.add_argument("--dry-run", action="store_true")
    args = ap.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    model, batches = build(args.dry_run, args.device, dtype)
    runs = {"plain backward": lambda: plain(model, batches),
            "sensitivity pass": lambda: sensitivity(model, batches)}  # fmt: skip
    for fn in runs.values() if not args.dry_run else ():  # warm-up (allocator, kernels)
        fn()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for rnd in range(args.repeats):
        for name in list(runs) if rnd % 2 == 0 else list(runs)[::-1]:
            times[name].append(timed(runs[name], args.device))
    med = {name: statistics.median(t) for name, t in times.items()}
    doc = {
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "model": "LlamaForCausalLM from LlamaConfig" + (" (tiny, dry run)" if args.dry_run else ""),
        "parameters": sum(p.numel() for p in model.parameters()),
        "dtype": str(dtype).removeprefix("torch."),
        "tokens_per_pass": sum(b["input_ids"].numel() for b in batches),
        "seconds": {
            name: {"median": med[name], "min": min(t), "max": max(t)} for name, t in times.items()
        },  # fmt: skip
        "overhead": med["sensitivity pass"] / med["plain backward"],
    }
    with open(args.json, "w") as f:
        json.dump(doc, f, indent=1)
    print(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
