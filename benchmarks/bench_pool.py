"""AdapterPool against PEFT's mixed-batch forward on the embedded MiniLM.

    python benchmarks/bench_pool.py [--repeats 7] [--targets all|qv] [--json out.json]

One batch of 32 sequences × 64 tokens, 16 adapters of ranks {8, 16, 32, 64} (four of each,
sequence b on adapter b mod 16, so no two neighbours share one).  Timed in the same run, in
interleaved rounds (one call of each configuration per round; medians over rounds):

- ``base``        the plain model;
- ``pool_mixed``  slora AdapterPool, 16 adapters mixed in the batch;
- ``pool_r64``    slora AdapterPool, one rank-64 adapter for the whole batch;
- ``peft_mixed``  PEFT's mixed-batch forward (``adapter_names=``) with the same 16 adapters;
- ``kernels_mixed`` the pool's multi_lora calls alone on the captured layer inputs (its time is
  an overhead in itself: pool_mixed overhead − kernels_mixed = the pool's own cost).

The measure is the LoRA overhead: adapted time − base time.  Goals (issue 7, CPU): pool_mixed
overhead ≤ 1/3 of peft_mixed overhead; pool_mixed ≤ pool_r64.  Outputs of pool_mixed and
peft_mixed are compared first (fp32), so the timed work is the same computation.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

RANKS = (8, 16, 32, 64)
N_ADAPTERS, N_SEQ, SEQ_LEN = 16, 32, 64


def write_adapter(path: Path, targets: dict[str, tuple[int, int]], rank: int, seed: int) -> Path:
    """A PEFT-format adapter of one rank on every target (alpha = 2r), random non-zero A, B."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, (d_in, d_out) in targets.items():
        key = f"base_model.model.{name}"
        tensors[f"{key}.lora_A.weight"] = torch.randn(rank, d_in, generator=g) / d_in**0.5
        tensors[f"{key}.lora_B.weight"] = torch.randn(d_out, rank, generator=g) * 0.02
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "adapter_model.safetensors"))
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "r": rank,
        "lora_alpha": 2 * rank,
        "target_modules": sorted(targets),
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
    }
    (path / "adapter_config.json").write_text(json.dumps(config))
    return path


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=7, help="interleaved timed rounds")
    parser.add_argument(
        "--targets", choices=["all", "qv"], default="all",
        help="adapt every encoder linear (default) or only query/value",
    )  # fmt: skip
    parser.add_argument("--backend", default=None, help="multi_lora backend (default: auto)")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args(argv)

    from peft import PeftModel

    import slora
    from slora.benchmarking import measure
    from slora.core.targets import find_targets, linear_dims
    from slora.embedded import load_model

    torch.manual_seed(0)
    base = load_model()
    peft_base = load_model()
    patterns = ["query", "value"] if args.targets == "qv" else [r"bert\.encoder\..*"]
    targets = {n: linear_dims(m) for n, m in find_targets(base, patterns).items()}
    g = torch.Generator().manual_seed(1)
    batch = {
        "input_ids": torch.randint(1000, 20000, (N_SEQ, SEQ_LEN), generator=g),
        "attention_mask": torch.ones(N_SEQ, SEQ_LEN, dtype=torch.long),
    }
    names = [f"a{i}" for i in range(N_ADAPTERS)]
    ranks = {n: RANKS[i % len(RANKS)] for i, n in enumerate(names)}
    mixed = [names[b % N_ADAPTERS] for b in range(N_SEQ)]
    largest = max(names, key=ranks.get)

    with tempfile.TemporaryDirectory() as tmp:
        dirs = {n: write_adapter(Path(tmp) / n, targets, ranks[n], i) for i, n in enumerate(names)}
        pool = slora.AdapterPool(base, list(targets), max_adapters=N_ADAPTERS, backend=args.backend)
        for n in names:
            pool.load(n, dirs[n])
        peft = PeftModel.from_pretrained(peft_base, dirs[names[0]], adapter_name=names[0])
        for n in names[1:]:
            peft.load_adapter(dirs[n], adapter_name=n)
        peft.eval()

    def run_base():
        return base(**batch).logits

    def run_pool_mixed():
        with pool.use(mixed):
            return base(**batch).logits

    def run_pool_r64():
        with pool.use(largest):
            return base(**batch).logits

    def run_peft_mixed():
        return peft(**batch, adapter_names=mixed).logits

    # The multi_lora calls alone (same inputs, slots and packed weights as inside the pool):
    # pool_mixed overhead minus this is the pool's own cost (hooks, routing, validation).
    captured: dict[str, torch.Tensor] = {}
    handles = [
        base.get_submodule(n).register_forward_pre_hook(
            lambda mod, args, n=n: captured.__setitem__(n, args[0].reshape(-1, args[0].shape[-1]))
        )
        for n in targets
    ]
    with torch.inference_mode():
        run_base()
    for h in handles:
        h.remove()
    slots = [pool.adapters[n].slot for n in mixed]
    indptr = torch.arange(N_SEQ + 1) * SEQ_LEN
    outs = {n: torch.zeros(x.shape[0], targets[n][1]) for n, x in captured.items()}

    def run_kernels_mixed():
        for n, x in captured.items():
            slora.ops.multi_lora(
                x, None, pool._packed[n], seg_indptr=indptr, seg_slots=torch.tensor(slots),
                out=outs[n], backend=args.backend,
            )  # fmt: skip

    configs = {
        "base": run_base,
        "pool_mixed": run_pool_mixed,
        "kernels_mixed": run_kernels_mixed,
        "pool_r64": run_pool_r64,
        "peft_mixed": run_peft_mixed,
    }
    with torch.inference_mode():
        ours, theirs = run_pool_mixed(), run_peft_mixed()
        err = (ours - theirs).abs().max().item()
        moved = (ours - run_base()).abs().max().item()
        timings = measure(configs, rounds=args.repeats)  # interleaved, after a warm-up
    times = {k: t.samples for k, t in timings.items()}
    med = {k: t.median for k, t in timings.items()}
    over = {k: med[k] - med["base"] for k in configs if k not in ("base", "kernels_mixed")}
    over["kernels_mixed"] = med["kernels_mixed"]  # already a pure overhead
    result = {
        "shape": f"{N_SEQ} seq x {SEQ_LEN} tok, {N_ADAPTERS} adapters ranks {RANKS}",
        "targets": args.targets,
        "n_target_modules": len(targets),
        "threads": torch.get_num_threads(),
        "backend": slora.ops.resolve_backend("cpu", args.backend),
        "max_abs_diff_pool_vs_peft": err,
        "max_abs_lora_effect": moved,
        "median_s": med,
        "all_s": times,
        "overhead_s": over,
        "overhead_vs_base": {k: v / med["base"] for k, v in over.items()},
        "pool_mixed_over_peft_mixed_overhead": over["pool_mixed"] / over["peft_mixed"],
        "pool_mixed_over_pool_r64_time": med["pool_mixed"] / med["pool_r64"],
        "tokens_per_s": {k: N_SEQ * SEQ_LEN / v for k, v in med.items()},
    }
    print(
        f"{result['shape']}; targets={args.targets} ({len(targets)} modules); "
        f"backend={result['backend']}; threads={result['threads']}; repeats={args.repeats}"
    )
    print(f"pool vs PEFT outputs: max |diff| = {err:.2e} (LoRA effect {moved:.2e})")
    print(f"{'config':<14}{'median ms':>11}{'overhead ms':>13}{'overhead/base':>15}{'tok/s':>10}")
    for k in configs:
        o = over.get(k, 0.0)  # kernels_mixed: its whole time
        print(f"{k:<14}{med[k] * 1e3:>11.1f}{o * 1e3:>13.1f}{o / med['base']:>14.1%}"
              f"{result['tokens_per_s'][k]:>10.0f}")  # fmt: skip
    print(f"pool_mixed overhead / peft_mixed overhead = "
          f"{result['pool_mixed_over_peft_mixed_overhead']:.2f} (goal ≤ 0.33)")  # fmt: skip
    print(
        f"pool_mixed time / pool_r64 time = {result['pool_mixed_over_pool_r64_time']:.2f} "
        "(goal ≤ 1.00)"
    )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
