"""Benchmark: the sensitivity pass on a 4-bit (QLoRA) base against its plain frozen backward.

The embedded MiniLM model loaded the way QLoRA users load a base
(``from_pretrained(..., quantization_config=BitsAndBytesConfig(load_in_4bit=True,
bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True))``), over the same batches as
``sensitivity_pass.py``:
- ``plain``  forward + backward with the frozen 4-bit weights (activation gradients only);
- ``slora``  ``slora.analyze(estimator=...)`` on that model (statistics reduced in the pass).

Both run bitsandbytes' standard 4-bit kernel (dequantize block, matmul); the methods alternate,
``--repeats`` rounds, median per method, so load from other jobs hits both alike.

    python benchmarks/sensitivity_pass_qlora.py [--estimator fisher] [--repeats 5] [--out DIR]
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import json
import os
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sensitivity_pass import _plain, _setup  # noqa: E402 - sibling benchmark script

QUANT = {
    "4bit": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True),
    "8bit": dict(load_in_8bit=True),
}


def load_quantized(kind: str, compute_dtype: torch.dtype) -> torch.nn.Module:
    from transformers import AutoModelForSequenceClassification, BitsAndBytesConfig
    from transformers.utils import logging

    from slora import embedded
    from slora.core.quantized import keep_model_gradients

    logging.set_verbosity_error()
    extra = {"bnb_4bit_compute_dtype": compute_dtype} if kind == "4bit" else {}
    extra["llm_int8_skip_modules"] = ["classifier"]  # the new head stays float (as in QLoRA)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(
        str(embedded.model_path()),
        num_labels=2,
        quantization_config=BitsAndBytesConfig(**QUANT[kind], **extra),
        device_map="cpu" if not torch.cuda.is_available() else "cuda",
    )
    keep_model_gradients(model)  # the same kernel for both methods (see slora.core.quantized)
    return model.eval()


def _slora(model, batches, estimator):
    import slora

    slora.analyze(model, batches, estimator=estimator, progress=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quantize", choices=sorted(QUANT), default="4bit")
    parser.add_argument("--estimator", default="fisher")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args(argv)

    from slora import ops
    from slora.benchmarking import measure
    from slora.core.targets import find_targets

    _, batches = _setup(args.batches, args.batch_size, args.seq)
    model = load_quantized(args.quantize, torch.float32)
    storage = sorted({str(m.weight.dtype) for m in find_targets(model).values()})
    runs = {
        "plain": functools.partial(_plain, model, batches, args.estimator),
        "slora": functools.partial(_slora, model, batches, args.estimator),
    }
    timings = measure(runs, rounds=args.repeats)  # interleaved, after a warm-up
    med = {k: t.median for k, t in timings.items()}
    ratio = med["slora"] / med["plain"]
    # Under heavy background load the per-round ratio (the two methods run back to back) and
    # the ratio of the fastest runs are steadier than the ratio of medians.
    pairs = zip(timings["slora"].samples, timings["plain"].samples)
    per_round = sorted(s / p for s, p in pairs)
    ratio_round = per_round[len(per_round) // 2]
    ratio_min = timings["slora"].min / timings["plain"].min
    import bitsandbytes

    result = {
        "date": dt.date.today().isoformat(),
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} "
        f"torch threads, torch {torch.__version__}, bitsandbytes {bitsandbytes.__version__}",
        "quantize": args.quantize,
        "storage_dtypes": storage,
        "backend": ops.resolve_backend("cpu"),
        "estimator": args.estimator,
        "shape": {"batches": args.batches, "batch_size": args.batch_size, "seq": args.seq},
        "seconds_median": med,
        "seconds_all": {k: t.samples for k, t in timings.items()},
        "time_ratio_slora_over_plain": ratio,
        "time_ratio_per_round_median": ratio_round,
        "time_ratio_of_fastest_runs": ratio_min,
        "load_average_1min": os.getloadavg()[0],
    }
    text = "\n".join(
        [
            f"Sensitivity pass, MiniLM-L6 {args.quantize} ({QUANT[args.quantize]}), "
            f"{args.batches}×{args.batch_size}×{args.seq} tokens, estimator={args.estimator}, "
            f"backend={result['backend']}",
            f"{'method':8} {'time s (median)':>16} {'× plain':>8}",
            *(f"{n:8} {med[n]:16.3f} {med[n] / med['plain']:8.3f}" for n in runs),
            f"slora / plain: median of per-round ratios {ratio_round:.3f}, fastest runs "
            f"{ratio_min:.3f} ({args.repeats} rounds; 1-min load average "
            f"{result['load_average_1min']:.1f} on {os.cpu_count()} CPUs)",
        ]
    )
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"sensitivity_pass_qlora_{args.quantize}_{args.estimator}_{result['backend']}"
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2))
    (out / f"{stem}.md").write_text(
        f"```\n{text}\n```\n\nCommand: `python benchmarks/sensitivity_pass_qlora.py --quantize "
        f"{args.quantize} --estimator {args.estimator} --batches {args.batches} --batch-size "
        f"{args.batch_size} --seq {args.seq} --repeats {args.repeats}`\n"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
