"""What the Python call around the CPU multi-LoRA kernel costs, layer by layer.

    python benchmarks/bench_multi_lora_call_overhead.py [--threads 2] [--rounds 15] \
        [--dtype bfloat16]

Times, interleaved, the native op called directly and every wrapper above it — ``cpp_backend``,
``run_kernel`` (backend resolved, weights gathered), ``slora.ops.multi_lora(out=…)`` (checks
too) and ``slora.ops.multi_lora`` with a fresh output — each minus the direct call of the same
round (the median of those paired differences).  Two batches: ``slora bench``'s decode case
with no token routed to an adapter (the kernel returns at once: the wrappers' cost with warm
caches), and the same case routed as usual (right after a 4.7 MB kernel has streamed through
the caches, as in a server).  Step metadata is prebuilt; accumulate mode (``out +=``).
"""

from __future__ import annotations

import argparse
import statistics

import torch

from slora import bench, ops
from slora.benchmarking import measure
from slora.kernels._native import extension
from slora.kernels.multi_lora import build_token_meta
from slora.kernels.multi_lora.cpp_backend import multi_lora_cpp, native_args
from slora.kernels.multi_lora.library import run_kernel


def ladder(case: bench.Case, meta, out: torch.Tensor) -> dict:  # noqa: ANN001
    """The native call and each wrapper above it, on ``case`` with ``meta`` (out +=)."""
    ext, packed, x = extension(), case.packed, case.x
    w = packed.weights()
    args = native_args(x, w, meta, out)
    return {
        "native op": lambda: ext.multi_lora(*args),
        "cpp_backend": lambda: multi_lora_cpp(x, w, meta, out),
        "run_kernel": lambda: run_kernel(x, packed.weights(), meta, "", out),
        "ops.multi_lora(out=)": lambda: ops.multi_lora(x, None, packed, meta=meta, out=out),
        "ops.multi_lora, fresh out": lambda: ops.multi_lora(x, None, packed, meta=meta),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(bench.DTYPES))
    args = parser.parse_args(argv)
    if extension() is None:
        raise SystemExit("the native ops could not be built; nothing to measure")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    case = bench.decode_case(dtype=bench.DTYPES[args.dtype])
    out = torch.randn(case.x.shape[0], case.packed.d_out).to(case.x.dtype)
    no_adapter = build_token_meta(torch.full_like(case.token_slots, -1), case.packed.max_slots)
    print(f"{args.dtype} decode T={case.x.shape[0]}, d=2048, {args.threads} thread(s), "
          f"{args.rounds} interleaved rounds; µs per call (median), and minus the native op "
          "of the same round (median of the paired differences)")  # fmt: skip
    for label, meta in (("no token routed", no_adapter), ("routed", case.step_meta())):
        times = measure(ladder(case, meta, out), rounds=args.rounds, min_time=0.05 * args.rounds)
        native = times["native op"].samples
        print(f"\n{label}:")
        for name, t in times.items():
            extra = statistics.median(s - n for s, n in zip(t.samples, native))
            print(f"  {name:28s} {t.median * 1e6:8.1f} µs   {extra * 1e6:+7.1f} µs")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
