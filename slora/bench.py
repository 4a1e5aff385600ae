"""``slora bench``: the grouped heterogeneous-rank LoRA kernels against their baselines.

Shapes are those of a typical multi-adapter server, scaled to the machine: on the CPU
d = 2048, 16 adapters with ranks {8, 16, 32, 64}, decode T = 64 (4 requests per adapter,
shuffled) and prefill T = 1024 in 8 segments, in fp32 and bf16; on CUDA d = 4096, the same
rank mix, decode T = 64 and prefill T = 8192, bf16 (``--dtype`` picks others).
Baselines, timed in the same run: (a) a loop over adapters (PEFT's mixed batch), (b) weights
gathered per token, padded to the largest rank (vLLM's PyTorch reference).  Every case also
gets its bytes floor — the adapters at true ranks plus x and out, over the GPU's peak
bandwidth, or on the CPU over the bandwidth of a streaming read of as many bytes timed in the
same rounds as the kernels — and on CUDA the same Triton kernel on adapters padded to the
largest rank.
Prints a table and writes a PNG (matplotlib, Agg).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from slora.benchmarking import Row, format_table, measure, peak_bandwidth, streaming_read
from slora.cli_args import POSITIVE_FLOAT, POSITIVE_INT
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
FLOOR_READ = "streaming read (floor)"


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


def run_cases(
    cases: list[Case], device: str, min_time: float, bandwidth: float | None
) -> list[Row]:
    """Every contender of every case, timed interleaved, against the faster baseline; the
    floor is the case's bytes over ``bandwidth``, or (None) over the bandwidth of a streaming
    read of as many bytes timed in the same rounds as the contenders."""
    rows = []
    for case in cases:
        fns = contenders(case, device)
        nbytes = floor_bytes(case)
        if bandwidth is None:
            fns[FLOOR_READ], read_bytes = streaming_read(nbytes, device)
        times = measure(fns, min_time=min_time)
        best_base = min(times[b].median for b in BASELINES)
        if bandwidth is None:
            floor = nbytes / (read_bytes / times.pop(FLOOR_READ).median)
        else:
            floor = nbytes / bandwidth
        rows += [Row(case.name, name, t.median, best_base, floor) for name, t in times.items()]
    return rows


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
            floor_ms = sub[0].floor_seconds * 1e3
            ax.axvline(floor_ms, color="tab:red", ls="--", label="bandwidth floor")
            ax.legend()
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
        help="memory bandwidth for the floor, bytes/s (default: the GPU's peak; on the CPU a "
        "streaming read of as many bytes as the case moves, timed in the same rounds)",
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
    if args.device == "cuda":
        names, d, t_pre = args.dtype or ["bfloat16"], 4096, 8192
    else:
        names, d, t_pre = args.dtype or ["float32", "bfloat16"], 2048, 1024
    dtypes = [DTYPES[n] for n in dict.fromkeys(names)]
    cases = []
    for dt in dtypes:
        tag = "" if len(dtypes) == 1 else f" {DTYPE_TAGS[dt]}"
        for case in (decode_case(64, d, dtype=dt, device=args.device),
                     prefill_case(t_pre, d, dtype=dt, device=args.device)):  # fmt: skip
            case.name += tag
            cases.append(case)
    print(
        f"slora bench on {args.device} ({torch.get_num_threads()} CPU threads), "
        f"{', '.join(DTYPE_TAGS[dt] for dt in dtypes)}, d={d}, 16 adapters with ranks {RANKS}; "
        "floor: bytes moved / "
        + (
            "peak bandwidth"
            if args.bandwidth or args.device == "cuda"
            else "streaming-read bandwidth of as many bytes, timed in the same rounds"
        )  # fmt: skip
    )
    rows = run_cases(
        cases, args.device, args.min_time, args.bandwidth or peak_bandwidth(args.device)
    )
    print(format_table(rows))
    out_dir = Path(args.out or ".")
    out_dir.mkdir(parents=True, exist_ok=True)
    plot_path = args.plot or str(out_dir / "slora_bench.png")
    plot(rows, plot_path)
    meta = {"device": args.device, "threads": torch.get_num_threads(),
            "dtypes": [str(dt) for dt in dtypes], "d": d}  # fmt: skip
    if args.device == "cuda":
        meta["gpu"] = torch.cuda.get_device_name()
    doc = {**meta, "rows": [r.as_dict() for r in rows]}
    (out_dir / "slora_bench.json").write_text(json.dumps(doc, indent=1))
    print(f"plot written to {plot_path}, table to {out_dir / 'slora_bench.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
