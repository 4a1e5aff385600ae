"""slora's vLLM wrapper alone (no vLLM needed): one decode step of a q/k/v LoRA layer through
``add_lora_linear``, adapters at their true ranks against the same adapters padded to 64,
against the bytes floor measured in the same run.

    python benchmarks/bench_vllm_wrapper.py [--device cuda] [--dtype bfloat16] [--json out.json]

16 adapters of ranks {8, 16, 32, 64} (four of each) in vLLM's padded slot buffers
(``max_lora_rank`` 64), mirrored by the wrapper's true-rank store; 64 decode tokens, token t
on adapter t mod 16.  Shapes: d_in 4096 and slices q/k/v 4096/1024/1024 on CUDA; 1024 and
1024/1024/1024 on the CPU.  Floor = (bytes of the 16 adapters' A and B at true ranks + x read
+ y read and written) / bandwidth measured in the same run: on CUDA a large copy (read + write),
on the CPU a streaming read of as many bytes (``torch.sum``, same cache level as the op's).  Goals
(GPU): ≥ 80 % of the floor at true ranks, ≥ 2× the padded time.
"""

from __future__ import annotations

import argparse
import json
import time
from types import SimpleNamespace

import torch

from slora.benchmarking import read_bandwidth
from slora.integrations.vllm.wrapper import StandaloneWrapper

RANKS = (8, 16, 32, 64)
N_ADAPTERS, PAD_RANK = 16, 64


def make_layer(d_in: int, sizes: tuple[int, ...], dtype, device) -> SimpleNamespace:
    """vLLM's padded slot buffers holding 16 adapters (slot k: rank RANKS[k % 4])."""
    g = torch.Generator().manual_seed(0)
    a = tuple(torch.zeros(N_ADAPTERS, 1, PAD_RANK, d_in, dtype=dtype) for _ in sizes)
    b = tuple(torch.zeros(N_ADAPTERS, 1, d, PAD_RANK, dtype=dtype) for d in sizes)
    for k in range(N_ADAPTERS):
        r = RANKS[k % 4]
        for s, d in enumerate(sizes):
            a[s][k, 0, :r] = torch.randn(r, d_in, generator=g).to(dtype) / d_in**0.5
            b[s][k, 0, :, :r] = torch.randn(d, r, generator=g).to(dtype) * 0.02
    move = lambda ts: tuple(t.to(device) for t in ts)  # noqa: E731
    return SimpleNamespace(lora_a_stacked=move(a), lora_b_stacked=move(b), output_slices=sizes)


def timer(device: str, fn, iters: int) -> float:
    """Median seconds per call of fn (CUDA events on CUDA)."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(iters):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def bandwidth(device: str, iters: int) -> float:
    """Bytes/s of a large copy (read + write), the floor's bandwidth."""
    n = (256 if device == "cuda" else 64) * 2**20
    src = torch.empty(n, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    return 2 * n / timer(device, lambda: dst.copy_(src), iters)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16", "float16"))
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--json", help="write the results here too")
    args = ap.parse_args()
    dtype, dev, T = getattr(torch, args.dtype), args.device, args.tokens
    d_in, sizes = (4096, (4096, 1024, 1024)) if dev == "cuda" else (1024, (1024,) * 3)

    layer = make_layer(d_in, sizes, dtype, dev)
    wrapper = StandaloneWrapper(T, dev, N_ADAPTERS)
    wrapper.slora_register(layer)
    for k in range(N_ADAPTERS):
        wrapper.slora_load(layer, k, PAD_RANK)
    store = wrapper.slora_storage(layer.lora_a_stacked)
    wrapper.slora_set_token_slots(torch.arange(T, device=dev) % N_ADAPTERS)
    x = torch.randn(T, d_in, device=dev).to(dtype)
    y = torch.zeros(T, sum(sizes), device=dev, dtype=dtype)
    step = lambda: wrapper.add_lora_linear(y, x, layer.lora_a_stacked,  # noqa: E731
                                           layer.lora_b_stacked, 1.0, sizes)  # fmt: skip
    true_rank = store.packed
    t_true = timer(dev, step, args.iters)
    store.packed = true_rank.padded(PAD_RANK)  # the same work padded to max_lora_rank
    t_padded = timer(dev, step, args.iters)
    store.packed = true_rank

    el = x.element_size()
    nbytes = true_rank.nbytes() + x.numel() * el + 2 * y.numel() * el
    # CPU: a streaming read of as many bytes (they sit in the same cache level as the op's);
    # CUDA: a large copy (HBM)
    bw = read_bandwidth(nbytes, dev) if dev == "cpu" else bandwidth(dev, args.iters)
    floor = nbytes / bw
    result = {
        "device": torch.cuda.get_device_name() if dev == "cuda" else "cpu",
        "dtype": args.dtype, "tokens": T, "d_in": d_in, "slices": list(sizes),
        "true_rank_us": t_true * 1e6, "padded_us": t_padded * 1e6,
        "bytes": nbytes, "bandwidth_GBs": bw / 1e9, "floor_us": floor * 1e6,
        "pct_of_floor": 100 * floor / t_true, "padded_over_true": t_padded / t_true,
    }  # fmt: skip
    print(f"add_lora_linear, {T} decode tokens, 16 adapters r∈{{8,16,32,64}}, {args.dtype} on "
          f"{result['device']}: true ranks {t_true * 1e6:.1f} µs ({result['pct_of_floor']:.0f}%"
          f" of the {floor * 1e6:.1f} µs floor at {bw / 1e9:.0f} GB/s), padded to 64 "
          f"{t_padded * 1e6:.1f} µs ({result['padded_over_true']:.2f}× slower)")  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
