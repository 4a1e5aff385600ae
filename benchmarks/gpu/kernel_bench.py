"""GPU check, kernel step: ``slora bench``'s cases (decode and prefill, 16 adapters of ranks
{8, 16, 32, 64}) with its baselines — a loop over adapters (PEFT) and per-token weights padded
to the largest rank (vLLM's padded gather) — timed interleaved in one run, each against the
bytes floor: the device's peak bandwidth when its name is known (H100 3.35 TB/s, H200
4.8 TB/s), else a streaming read of as many bytes timed in the same rounds.

    python benchmarks/gpu/kernel_bench.py --device cuda --json kernels.json [--dry-run]

``--dry-run``: tiny shapes, for trying the GPU script end to end on a CPU.
"""

from __future__ import annotations

import argparse
import json

import torch

from slora.bench import decode_case, prefill_case, run_cases
from slora.benchmarking import mm_ceiling, peak_bandwidth


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", required=True)
    ap.add_argument("--dry-run", action="store_true")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    dev = args.device
    if args.dry_run:
        d, t_dec, t_pre, dtypes, min_time = 64, 8, 32, [torch.float32], 0.0
    else:
        d, t_dec, t_pre, dtypes, min_time = 4096, 64, 8192, [torch.bfloat16], 0.2
    cases = []
    for dt in dtypes:
        for case in (decode_case(t_dec, d, dtype=dt, device=dev),
                     prefill_case(t_pre, d, dtype=dt, device=dev)):  # fmt: skip
            case.name += f" {str(dt).removeprefix('torch.')}"
            cases.append(case)
    peak = peak_bandwidth(dev)
    # the compute ceiling: this run's torch.mm rate per dtype (cuBLAS on the GPU)
    ceilings = {dt: mm_ceiling(dt, dev, size=64 if args.dry_run else 4096) for dt in dtypes}
    rows, limits = run_cases(cases, dev, min_time, peak, ceilings)
    doc = {
        "device": torch.cuda.get_device_name() if dev == "cuda" else "cpu",
        "d": d,
        "floor": "peak bandwidth" if peak else "streaming read, same rounds",
        "peak_GBs": peak / 1e9 if peak else None,
        "mm_tflops": {str(dt).removeprefix("torch."): c / 1e12 for dt, c in ceilings.items()},
        "limits": limits,
        "rows": [r.as_dict() for r in rows],
    }
    with open(args.json, "w") as f:
        json.dump(doc, f, indent=1)
    for r in doc["rows"]:
        print(r)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
