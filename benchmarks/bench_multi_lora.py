"""The grouped LoRA op (``slora.ops.multi_lora``) against its baselines: ``slora bench``'s cases
(decode and prefill, fp32 / bf16 / fp16, the loop and padded-gather baselines and the same-run
bytes floor), with the same options.

    python benchmarks/bench_multi_lora.py [--threads 2] [--dtype bfloat16 ...] [--out DIR]

The cases live in ``slora/bench.py`` so that the installed ``slora bench`` command runs them
too; the kernel A/B against a git revision is ``bench_multi_lora_ab_cpu.py``, the Python call's
cost ``bench_multi_lora_call_overhead.py``.
"""

from __future__ import annotations

import sys

from slora.bench import main

if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
