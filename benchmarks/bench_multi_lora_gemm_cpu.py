"""Where the ``cpp`` backend's GEMM route pays: the fused FMA kernel against ATen's GEMM
(oneDNN: AMX tiles or AVX512-BF16 where the CPU has them) on one adapter's group of n tokens,
timed interleaved, for the table ``GEMM_ROUTES`` in slora/kernels/multi_lora/cpp_backend.py.

    python benchmarks/bench_multi_lora_gemm_cpu.py [--dtype bfloat16 ...] [--rank 8 16 64] \
        [--tokens 4 8 16 32 64 128 256 512] [--d 2048] [--threads 2] [--rounds 7] [--out DIR]

Both routes are the same native op called directly with the step metadata prebuilt, only its
GEMM thresholds differ (never; every group); their outputs must agree.  Per
(dtype, rank, n): the median and range over rounds of each route's time and of the per-round
ratio fused / GEMM (> 1: the GEMM is faster), then, per dtype, the smallest n from which the
GEMM is faster for every rank and every larger n measured, and the fewest multiply-adds
(n · r · 2d) of a case from which the GEMM wins in every larger case: the two thresholds of
the table.  Results (with the CPU and its AMX / AVX512-BF16 flags) go to DIR/gemm_crossover.json
and a PNG.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
from torch.utils.benchmark import Timer

from slora import bench
from slora.kernels import _native, cpu_features
from slora.kernels.multi_lora.cpp_backend import native_args


def time_routes(case: bench.Case, threads: int, rounds: int) -> dict[str, list[float]]:
    """Seconds per call of each route, one sample per round (order reversed every round)."""
    ext = _native.extension()
    outs = {route: torch.empty(case.x.shape[0], case.packed.d_out, dtype=case.x.dtype)
            for route in ("fused", "gemm")}  # fmt: skip
    fns = {}
    for route, out in outs.items():
        args = list(native_args(case.x, case.packed.weights(), case.step_meta(), out, True))
        args[-2:] = (0, 0) if route == "fused" else (1, 0)
        fns[route] = lambda args=args: ext.multi_lora(*args)
        fns[route]()
    tol = 1e-4 if case.x.dtype == torch.float32 else 2e-2
    fused, gemm = outs["fused"].double(), outs["gemm"].double()
    if not torch.allclose(fused, gemm, rtol=tol, atol=tol * fused.abs().max().item()):
        raise SystemExit(f"the two routes disagree on {case.name} {case.x.dtype}")
    times: dict[str, list[float]] = {route: [] for route in fns}
    for rnd in range(rounds):
        for route in list(fns)[:: 1 if rnd % 2 == 0 else -1]:
            timer = Timer("f()", globals={"f": fns[route]}, num_threads=threads)
            times[route].append(timer.blocked_autorange(min_run_time=0.05).median)
    return times


def crossover(rows: list[dict], dtype: str) -> int:
    """Smallest n from which the GEMM wins (median ratio > 1) at every rank and every larger n
    measured; 0 when it never does."""
    ns = sorted({r["tokens"] for r in rows if r["dtype"] == dtype})
    best = 0
    for n in reversed(ns):
        if all(r["ratio_median"] > 1 for r in rows if r["dtype"] == dtype and r["tokens"] == n):
            best = n
        else:
            break
    return best


def crossover_macs(rows: list[dict], dtype: str) -> int:
    """Fewest multiply-adds from which the GEMM wins in every case with as many or more; 0 when
    it never wins in the largest case."""
    sub = sorted((r for r in rows if r["dtype"] == dtype), key=lambda r: r["macs"])
    best = 0
    for r in reversed(sub):
        if r["ratio_median"] <= 1:
            break
        best = r["macs"]
    return best


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dtypes = sorted({r["dtype"] for r in rows})
    fig, axes = plt.subplots(1, len(dtypes), figsize=(5 * len(dtypes), 3.6), squeeze=False)
    for ax, dtype in zip(axes[0], dtypes):
        for rank in sorted({r["rank"] for r in rows}):
            sub = [r for r in rows if r["dtype"] == dtype and r["rank"] == rank]
            ns = [r["tokens"] for r in sub]
            ax.plot(ns, [r["ratio_median"] for r in sub], marker="o", label=f"rank {rank}")
            ax.fill_between(ns, [r["ratio_min"] for r in sub], [r["ratio_max"] for r in sub],
                            alpha=0.2)  # fmt: skip
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set(xscale="log", xlabel="tokens of one adapter", title=dtype,
               ylabel="fused time / GEMM time (> 1: GEMM faster)")  # fmt: skip
        ax.legend(fontsize=8)
    fig.suptitle(cpu_features.cpu_model(), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", action="append", choices=sorted(bench.DTYPES))
    parser.add_argument("--rank", type=int, nargs="+", default=[8, 16, 64])
    parser.add_argument("--tokens", type=int, nargs="+", default=[4, 8, 16, 32, 64, 128, 256, 512])
    parser.add_argument("--d", type=int, default=2048, help="d_in = d_out")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--out", default="benchmarks/results/gemm_crossover")
    args = parser.parse_args(argv)
    if _native.extension() is None:
        raise SystemExit("the native ops could not be built (`slora env` says why)")
    machine = {**cpu_features.summary(), "threads": args.threads, "torch": torch.__version__}
    print(json.dumps(machine))
    rows = []
    for name in args.dtype or ["bfloat16", "float32"]:
        for rank in args.rank:
            for n in args.tokens:
                torch.manual_seed(n * 1000 + rank)
                case = bench.decode_case(n, args.d, n_adapters=1, ranks=(rank,),
                                         dtype=bench.DTYPES[name])  # fmt: skip
                t = time_routes(case, args.threads, args.rounds)
                ratios = [f / g for f, g in zip(t["fused"], t["gemm"])]
                row = {"dtype": name, "rank": rank, "tokens": n, "macs": n * rank * 2 * args.d,
                       "fused_us": statistics.median(t["fused"]) * 1e6,
                       "gemm_us": statistics.median(t["gemm"]) * 1e6,
                       "ratio_median": statistics.median(ratios),
                       "ratio_min": min(ratios), "ratio_max": max(ratios)}  # fmt: skip
                rows.append(row)
                print(f"{name:>9} r={rank:<3} n={n:<5} fused {row['fused_us']:9.1f} µs  "
                      f"GEMM {row['gemm_us']:9.1f} µs  fused/GEMM {row['ratio_median']:.2f} "
                      f"[{row['ratio_min']:.2f}, {row['ratio_max']:.2f}]", flush=True)  # fmt: skip
    result = {
        "machine": machine,
        "d": args.d,
        "rows": rows,
        "crossover_tokens": {name: crossover(rows, name) for name in {r["dtype"] for r in rows}},
        "crossover_macs": {name: crossover_macs(rows, name) for name in {r["dtype"] for r in rows}},
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gemm_crossover.json").write_text(json.dumps(result, indent=1))
    plot(rows, out / "gemm_crossover.png")
    print("crossover (0 = the GEMM never wins): tokens", json.dumps(result["crossover_tokens"]),
          "multiply-adds", json.dumps(result["crossover_macs"]))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
