"""Benchmark: the whole sensitivity pass against a plain backward and the naive Σ grad² method.

On the embedded MiniLM model over 8 batches of 16 × 64 tokens:
- ``plain``  forward + backward with frozen weights (activation gradients only): the floor;
- ``slora``  ``slora.analyze(estimator=...)`` — statistics reduced in the pass, report built;
- ``naive``  target weights ``requires_grad``, accumulate ``weight.grad ** 2`` after each batch.

Time: the three methods run interleaved, ``--repeats`` rounds, median per method (interleaving
makes background load hit all of them alike).  Memory: each method runs once more in a fresh
subprocess; peak RSS growth over the state right before the pass (VmHWM reset through
/proc/self/clear_refs after malloc_trim, glibc's mmap threshold fixed so freed tensors leave
RSS), so model loading does not count.

    python benchmarks/sensitivity_pass.py [--estimator fisher] [--repeats 5] [--out DIR]
"""

from __future__ import annotations

import argparse
import ctypes
import datetime as dt
import functools
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

METHODS = ("plain", "slora", "naive")


def _setup(num_batches: int, batch_size: int, seq: int):
    from slora import embedded

    model = embedded.load_model()
    data = embedded.load_sentences()
    train, _ = embedded.split_by_movie(data)
    tok = embedded.load_tokenizer()
    batches = []
    for b in range(num_batches):
        idx = train[b * batch_size : (b + 1) * batch_size]
        enc = tok(
            [data.text[i] for i in idx],
            padding="max_length",
            truncation=True,
            max_length=seq,
            return_tensors="pt",
        )
        enc = dict(enc)
        enc["labels"] = torch.tensor([data.label[i] for i in idx])
        batches.append(enc)
    return model, batches


def _plain(model, batches, estimator):
    model.eval().requires_grad_(False)
    emb = model.get_input_embeddings()
    anchor = torch.zeros((), requires_grad=True)
    handle = model.bert.embeddings.register_forward_hook(lambda m, a, out: out + anchor)
    try:
        for batch in batches:
            model(**batch).loss.backward()
    finally:
        handle.remove()
    del emb


def _slora(model, batches, estimator):
    import slora

    slora.analyze(model, batches, estimator=estimator, progress=False)


def _naive(model, batches, estimator):
    from slora.core.targets import find_targets

    model.eval().requires_grad_(False)
    targets = find_targets(model)
    weights = [m.weight for m in targets.values()]
    for w in weights:
        w.requires_grad_(True)
    acc = [torch.zeros_like(w) for w in weights]
    for batch in batches:
        model(**batch).loss.backward()
        for a, w in zip(acc, weights):
            a.add_(w.grad.square())
            w.grad = None
    for w in weights:
        w.requires_grad_(False)


RUNNERS = {"plain": _plain, "slora": _slora, "naive": _naive}


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(field)


def _memory_child(method: str, estimator: str, num_batches: int, batch_size: int, seq: int):
    model, batches = _setup(num_batches, batch_size, seq)
    RUNNERS[method](model, batches[:1], estimator)  # warm-up (lazy inits, native build)
    import gc

    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")
    start = _rss_kib("VmRSS")
    RUNNERS[method](model, batches, estimator)
    peak = _rss_kib("VmHWM")
    print(json.dumps({"extra_peak_mib": (peak - start) / 1024}))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--estimator", default="fisher")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    shape = (args.batches, args.batch_size, args.seq)
    if args.memory_child:
        _memory_child(args.memory_child, args.estimator, *shape)
        return 0

    from slora import ops
    from slora.benchmarking import measure

    model, batches = _setup(*shape)
    runs = {
        name: functools.partial(RUNNERS[name], model, batches, args.estimator) for name in METHODS
    }
    timings = measure(runs, rounds=args.repeats)  # interleaved, after a warm-up
    times = {name: t.samples for name, t in timings.items()}
    memory = {}
    for name in METHODS:
        cmd = [
            sys.executable,
            __file__,
            "--memory-child",
            name,
            "--estimator",
            args.estimator,
            "--batches",
            str(args.batches),
            "--batch-size",
            str(args.batch_size),
            "--seq",
            str(args.seq),
        ]
        # A fixed mmap threshold makes glibc return every large tensor to the OS when freed,
        # so peak RSS tracks live tensors rather than heap fragmentation.
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stdout
        memory[name] = json.loads(out.strip().splitlines()[-1])["extra_peak_mib"]
    med = {k: t.median for k, t in timings.items()}
    extra = {k: memory[k] - memory["plain"] for k in ("slora", "naive")}
    result = {
        "date": dt.date.today().isoformat(),
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} "
        f"torch threads, torch {torch.__version__}",
        "backend": ops.resolve_backend("cpu"),
        "estimator": args.estimator,
        "shape": {"batches": args.batches, "batch_size": args.batch_size, "seq": args.seq},
        "seconds_median": med,
        "seconds_all": times,
        "peak_extra_mib_over_start": memory,
        "time_ratio_slora_over_plain": med["slora"] / med["plain"],
        "time_ratio_naive_over_plain": med["naive"] / med["plain"],
        "extra_memory_slora_over_naive": extra["slora"] / extra["naive"]
        if extra["naive"]
        else None,
    }
    lines = [
        f"Sensitivity pass, MiniLM-L6, {args.batches}×{args.batch_size}×{args.seq} tokens, "
        f"estimator={args.estimator}, backend={result['backend']}",
        f"{'method':8} {'time s (median)':>16} {'× plain':>8} {'peak MiB over start':>20}",
    ]
    for name in METHODS:
        lines.append(
            f"{name:8} {med[name]:16.3f} {med[name] / med['plain']:8.3f} {memory[name]:20.1f}"
        )
    lines.append(
        f"extra memory over plain: slora {extra['slora']:.1f} MiB, naive {extra['naive']:.1f} MiB "
        f"-> ratio {result['extra_memory_slora_over_naive']:.3f}"
    )
    text = "\n".join(lines)
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"sensitivity_pass_{args.estimator}_{result['backend']}"
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2))
    (out / f"{stem}.md").write_text(
        f"```\n{text}\n```\n\nCommand: `python benchmarks/"
        f"sensitivity_pass.py --estimator {args.estimator}`\n"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
