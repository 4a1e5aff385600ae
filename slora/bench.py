"""``slora bench``: the grouped heterogeneous-rank LoRA kernels against their baselines.

Shapes are those of a typical multi-adapter server, scaled to the machine: on the CPU
d = 2048, 16 adapters with ranks {8, 16, 32, 64}, decode T = 64 (4 requests per adapter,
shuffled) and prefill T = 1024 in 8 segments, in fp32 and bf16; on CUDA d = 4096, the same
rank mix, decode T = 64 and prefill T = 8192, bf16 (``--dtype`` picks others).
Baselines, timed in the same run: (a) a loop over adapters (PEFT's mixed batch), (b) weights
gathered per token, padded to the largest rank (vLLM's PyTorch reference).  Every case also
gets two limits: its bytes floor — the adapters at true ranks plus x and out, over the GPU's
peak bandwidth, or on the CPU over the bandwidth of the fastest of several streaming reads of
as many bytes (slora's vectorised read, ``torch.sum``, ``torch.amax``, a copy), timed in the
same rounds as the kernels — and its compute floor — the multiply-adds of shrink and expand at
true ranks (2 FLOPs each) over the ``torch.mm`` rate in the case's dtype measured once per run
with the same threads — and the table says which of the two it is nearer.  On CUDA also the
same Triton kernel on adapters padded to the largest rank.  ``--quick``: tiny shapes, for a
smoke test.  Prints a table and writes a PNG (matplotlib, Agg) and a JSON file with the CPU
model and its AMX / AVX512-BF16 flags.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from slora.benchmarking import (
    Row,
    best_read,
    format_table,
    measure,
    mm_ceiling,
    peak_bandwidth,
    streaming_reads,
)
from slora.cli_args import POSITIVE_FLOAT, POSITIVE_INT
from slora.kernels import cpu_features
from slora.kernels.multi_lora import (
    LoRAMeta,
    PackedAdapters,
    build_segment_meta,
    build_token_meta,
)

RANKS = (8, 16, 32, 64)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_TAGS = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
BASELINES = ("loop (PEFT)", "padded gather (vLLM ref)")
FLOOR_READ = "floor read: "  # prefix of the streaming reads timed with the kernels


@dataclass
class Case:
    """One benchmark problem: inputs in every form the contenders need."""

    name: str
    x: Tensor
    token_slots: Tensor
    seg_indptr: Tensor | None
    seg_slots: Tensor | None
    adapters: list[tuple[Tensor, Tensor, float]]
    packed: PackedAdapters

    def step_meta(self) -> LoRAMeta:
        """The token groups built once, as a server does per step for all its layers."""
        if self.seg_indptr is None:
            return build_token_meta(self.token_slots, self.packed.max_slots)
        return build_segment_meta(
            self.seg_indptr, self.seg_slots, self.x.shape[0], self.packed.max_slots
        )


def make_adapters(
    n: int, d_in: int, d_out: int, ranks: Sequence[int], dtype: torch.dtype, device: str
) -> list[tuple[Tensor, Tensor, float]]:
    """``n`` random adapters cycling through ``ranks`` (scale 2/r as with alpha = 2r)."""
    out = []
    for k in range(n):
        r = ranks[k % len(ranks)]
        A = (torch.randn(r, d_in, device=device) / d_in**0.5).to(dtype)
        B = (torch.randn(d_out, r, device=device) / r**0.5).to(dtype)
        out.append((A, B, 2.0 / r))
    return out


def decode_case(
    T: int = 64,
    d: int = 2048,
    n_adapters: int = 16,
    ranks: Sequence[int] = RANKS,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
) -> Case:
    """Decode: one token per request, requests spread evenly over the adapters, shuffled."""
    adapters = make_adapters(n_adapters, d, d, ranks, dtype, device)
    slots = torch.arange(T, device=device) % n_adapters
    slots = slots[torch.randperm(T, device=device)]
    x = torch.randn(T, d, device=device).to(dtype)
    packed = PackedAdapters.from_list(adapters)
    return Case(f"decode T={T}", x, slots, None, None, adapters, packed)


def prefill_case(
    T: int = 1024,
    d: int = 2048,
    n_adapters: int = 16,
    n_segments: int = 8,
    ranks: Sequence[int] = RANKS,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
) -> Case:
    """Prefill: ``n_segments`` sequences of equal length, each with its own adapter."""
    adapters = make_adapters(n_adapters, d, d, ranks, dtype, device)
    seg_slots = torch.arange(n_segments, device=device) % n_adapters  # every rank appears
    bounds = torch.linspace(0, T, n_segments + 1).round().long().to(device)
    token_slots = torch.repeat_interleave(seg_slots, bounds.diff())
    x = torch.randn(T, d, device=device).to(dtype)
    packed = PackedAdapters.from_list(adapters)
    return Case(f"prefill T={T}", x, token_slots, bounds, seg_slots, adapters, packed)


# --- baselines -------------------------------------------------------------------------------


def loop_baseline(x: Tensor, token_slots: Tensor, adapters: list) -> Tensor:
    """PEFT's mixed-batch way: for each adapter present, gather its tokens, two linears,
    scatter back."""
    out = torch.zeros(x.shape[0], adapters[0][1].shape[0], dtype=x.dtype, device=x.device)
    for k in torch.unique(token_slots).tolist():
        if k < 0:
            continue
        A, B, scale = adapters[k]
        idx = (token_slots == k).nonzero().squeeze(1)
        y = torch.nn.functional.linear(torch.nn.functional.linear(x[idx], A), B) * scale
        out.index_add_(0, idx, y)
    return out


def pad_adapters(adapters: list) -> tuple[Tensor, Tensor]:
    """Stacked ``[K, R, d_in]`` / ``[K, d_out, R]`` weights padded to the largest rank R, the
    scale folded into B (vLLM's layout)."""
    R = max(a.shape[0] for a, _, _ in adapters)
    A0, B0, _ = adapters[0]
    Ap = torch.zeros(len(adapters), R, A0.shape[1], dtype=A0.dtype, device=A0.device)
    Bp = torch.zeros(len(adapters), B0.shape[0], R, dtype=B0.dtype, device=B0.device)
    for k, (A, B, s) in enumerate(adapters):
        Ap[k, : A.shape[0]] = A
        Bp[k, :, : A.shape[0]] = B * s
    return Ap, Bp


def padded_baseline(x: Tensor, token_slots: Tensor, Ap: Tensor, Bp: Tensor) -> Tensor:
    """vLLM's PyTorch reference: gather each token's padded weights, batched mat-vecs."""
    idx = token_slots.clamp(min=0)
    h = torch.einsum("ti,tri->tr", x, Ap[idx])
    y = torch.einsum("tr,tor->to", h, Bp[idx])
    return y * (token_slots >= 0).to(y.dtype)[:, None]


def contenders(case: Case, device: str) -> dict[str, Callable[[], object]]:
    """Everything timed on one case, by name."""
    from slora import ops

    Ap, Bp = pad_adapters(case.adapters)
    fns: dict[str, Callable[[], object]] = {
        BASELINES[0]: lambda: loop_baseline(case.x, case.token_slots, case.adapters),
        BASELINES[1]: lambda: padded_baseline(case.x, case.token_slots, Ap, Bp),
    }
    seg = dict(seg_indptr=case.seg_indptr, seg_slots=case.seg_slots)
    slots = None if case.seg_indptr is not None else case.token_slots
    backends = ["triton"] if device == "cuda" else ["cpp", "torch"]
    for be in backends:
        try:
            ops.resolve_backend(device, be)
        except RuntimeError:
            continue
        fns[f"slora {be}"] = lambda be=be: ops.multi_lora(
            case.x, slots, case.packed, **seg, backend=be
        )
    # a server builds the token groups once per step for all its layers (vLLM plugin,
    # AdapterPool): the same kernel with the step's metadata built beforehand
    meta = case.step_meta()
    main = backends[0] if f"slora {backends[0]}" in fns else "torch"
    fns[f"slora {main}, step metadata prebuilt"] = lambda: ops.multi_lora(
        case.x, None, case.packed, meta=meta, backend=main
    )
    # ... and adds the delta into the base layer's output, just computed and still in cache
    # (the vLLM plugin, AdapterPool), rather than writing a freshly allocated one
    y = torch.randn(case.x.shape[0], case.packed.d_out, device=device).to(case.x.dtype)
    fns[f"slora {main}, server step (prebuilt, out +=)"] = lambda: ops.multi_lora(
        case.x, None, case.packed, meta=meta, out=y, backend=main
    )
    if device == "cuda":
        padded = case.packed.padded()
        fns["slora triton, padded to max rank"] = lambda: ops.multi_lora(
            case.x, slots, padded, **seg, backend="triton"
        )
    return fns


def floor_bytes(case: Case) -> int:
    """Bytes the op must move: the active adapters at true ranks, x read, y read and written."""
    active = torch.unique(case.token_slots[case.token_slots >= 0]).tolist()
    el = case.x.element_size()
    weights = sum(case.adapters[k][0].numel() + case.adapters[k][1].numel() for k in active)
    io = case.x.numel() + 2 * case.x.shape[0] * case.packed.d_out
    return (weights + io) * el


def case_flops(case: Case) -> int:
    """FLOPs the op must do: per token with an adapter, shrink and expand at its true rank r,
    2 r (d_in + d_out) (a multiply-add is 2 FLOPs)."""
    ranks = torch.tensor([A.shape[0] for A, _, _ in case.adapters])
    slots = case.token_slots[case.token_slots >= 0].cpu()
    return int(2 * ranks[slots].sum()) * (case.x.shape[1] + case.packed.d_out)


def run_cases(
    cases: list[Case],
    device: str,
    min_time: float,
    bandwidth: float | None,
    ceilings: dict[torch.dtype, float] | None = None,
) -> tuple[list[Row], dict[str, dict]]:
    """Every contender of every case, timed interleaved, against the faster baseline.  The
    bytes floor is the case's bytes over ``bandwidth``, or (None) over the bandwidth of the
    fastest streaming read of as many bytes timed in the same rounds as the contenders; the
    compute floor its FLOPs over ``ceilings[dtype]`` (FLOP/s).  Returns the rows and, per
    case, its bytes, FLOPs and the readers' bandwidths."""
    rows, limits = [], {}
    for case in cases:
        fns = contenders(case, device)
        nbytes, flops = floor_bytes(case), case_flops(case)
        readers = {} if bandwidth is not None else {
            FLOOR_READ + name: r for name, r in streaming_reads(nbytes, device).items()
        }  # fmt: skip
        fns.update({name: fn for name, (fn, _) in readers.items()})
        times = measure(fns, min_time=min_time)
        reads = {name: times.pop(name) for name in readers}
        best_base = min(times[b].median for b in BASELINES)
        bw = bandwidth if bandwidth is not None else best_read(reads, readers)
        ceiling = (ceilings or {}).get(case.x.dtype)
        compute = flops / ceiling if ceiling else None
        rows += [Row(case.name, name, t.median, best_base, nbytes / bw, compute)
                 for name, t in times.items()]  # fmt: skip
        limits[case.name] = {
            "bytes": nbytes, "flops": flops, "floor_gbps": bw / 1e9,
            "read_gbps": {k.removeprefix(FLOOR_READ): readers[k][1] / t.median / 1e9
                          for k, t in reads.items()},
        }  # fmt: skip
    return rows, limits


def plot(rows: list[Row], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = list(dict.fromkeys(r.case for r in rows))
    fig, axes = plt.subplots(1, len(cases), figsize=(6 * len(cases), 4), squeeze=False)
    for ax, case in zip(axes[0], cases):
        sub = [r for r in rows if r.case == case]
        ax.barh([r.impl for r in sub], [r.seconds * 1e3 for r in sub], color="tab:blue")
        if sub[0].floor_seconds is not None:
            ax.axvline(sub[0].floor_seconds * 1e3, color="tab:red", ls="--", label="bytes floor")
        if sub[0].compute_seconds is not None:
            ax.axvline(sub[0].compute_seconds * 1e3, color="tab:green", ls=":",
                       label="compute floor (torch.mm rate)")  # fmt: skip
        if sub[0].floor_seconds is not None or sub[0].compute_seconds is not None:
            ax.legend(fontsize=7)
        ax.set_xscale("log")
        ax.set_xlabel("ms, log scale (lower is better)")
        ax.set_title(case)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``slora bench`` options."""
    parser.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"]
    )
    parser.add_argument(
        "--threads", type=POSITIVE_INT, default=None, help="CPU threads (default: torch's)"
    )
    parser.add_argument(
        "--min-time", type=POSITIVE_FLOAT, default=0.5, help="seconds per measurement"
    )
    parser.add_argument(
        "--dtype",
        action="append",
        choices=sorted(DTYPES),
        help="input dtype, repeatable (default: float32 and bfloat16 on the CPU, bfloat16 on CUDA)",
    )
    parser.add_argument("--out", default=None, help="directory for slora_bench.png / .json")
    parser.add_argument("--plot", default=None, help="PNG path (default: OUT/slora_bench.png)")
    parser.add_argument(
        "--bandwidth",
        type=POSITIVE_FLOAT,
        default=None,
        help="memory bandwidth for the floor, bytes/s (default: the GPU's peak; on the CPU the "
        "fastest of several streaming reads of as many bytes as the case moves, timed in the "
        "same rounds)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="tiny shapes and short timings (a smoke test; the numbers mean little)",
    )


def main(argv: list[str] | None = None) -> int:
    """``python -m slora.bench ARGS``: the same as ``slora bench ARGS``."""
    parser = argparse.ArgumentParser(prog="slora bench", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


def run(args: argparse.Namespace) -> int:
    """Print the kernel benchmark table for this machine and write a PNG plot."""
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cuda, quick = args.device == "cuda", getattr(args, "quick", False)
    names = args.dtype or (["bfloat16"] if cuda else ["float32"] if quick else
                           ["float32", "bfloat16"])  # fmt: skip
    # d, decode / prefill tokens, side of the square torch.mm that sets the compute ceiling
    d, t_dec, t_pre, mm = (256, 16, 128, 256) if quick else \
        (4096, 64, 8192, 4096) if cuda else (2048, 64, 1024, 1024)  # fmt: skip
    min_time = min(args.min_time, 0.02) if quick else args.min_time
    dtypes = [DTYPES[n] for n in dict.fromkeys(names)]
    cases = []
    for dt in dtypes:
        tag = "" if len(dtypes) == 1 else f" {DTYPE_TAGS[dt]}"
        for case in (decode_case(t_dec, d, dtype=dt, device=args.device),
                     prefill_case(t_pre, d, dtype=dt, device=args.device)):  # fmt: skip
            case.name += tag
            cases.append(case)
    cpu = cpu_features.summary()
    flags = ", ".join(f"{f} {'yes' if cpu[f] else 'no'}" for f in ("amx_bf16", "avx512_bf16"))
    print(
        f"slora bench on {args.device} ({torch.get_num_threads()} CPU threads; {cpu['cpu']}, "
        f"{cpu['cores']} logical cores, {flags}), {', '.join(DTYPE_TAGS[dt] for dt in dtypes)}, "
        f"d={d}, 16 adapters with ranks {RANKS}; bytes floor: bytes moved / "
        + ("peak bandwidth" if args.bandwidth or cuda else
           "the fastest of several streaming reads of as many bytes, timed in the same rounds")
        + f"; compute floor: FLOPs / torch.mm rate ({mm}×{mm}×{mm})"
    )  # fmt: skip
    ceilings = {dt: mm_ceiling(dt, args.device, mm, min_time) for dt in dtypes}
    for dt, rate in ceilings.items():
        print(f"compute ceiling {DTYPE_TAGS[dt]}: torch.mm {rate / 1e9:.1f} GFLOP/s")
    bandwidth = args.bandwidth or peak_bandwidth(args.device)
    rows, limits = run_cases(cases, args.device, min_time, bandwidth, ceilings)
    for name, lim in limits.items():
        reads = ", ".join(f"{k} {v:.1f}" for k, v in lim["read_gbps"].items())
        print(f"{name}: {lim['bytes'] / 2**20:.2f} MiB, {lim['flops'] / 1e6:.1f} MFLOP; "
              f"floor bandwidth {lim['floor_gbps']:.1f} GB/s" + (f" (best of {reads})"
                                                                 if reads else ""))  # fmt: skip
    print(format_table(rows))
    out_dir = Path(args.out or ".")
    out_dir.mkdir(parents=True, exist_ok=True)
    plot_path = args.plot or str(out_dir / "slora_bench.png")
    plot(rows, plot_path)
    meta = {"device": args.device, "threads": torch.get_num_threads(), **cpu,
            "torch": torch.__version__, "dtypes": [str(dt) for dt in dtypes], "d": d,
            "quick": quick, "mm_size": mm,
            "mm_gflops": {DTYPE_TAGS[dt]: r / 1e9 for dt, r in ceilings.items()},
            "limits": limits}  # fmt: skip
    if cuda:
        meta["gpu"] = torch.cuda.get_device_name()
    doc = {**meta, "rows": [r.as_dict() for r in rows]}
    (out_dir / "slora_bench.json").write_text(json.dumps(doc, indent=1))
    print(f"plot written to {plot_path}, table to {out_dir / 'slora_bench.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
