"""vLLM serving throughput: base model, stock vLLM LoRA, vLLM + slora LoRA (CPU or GPU).

    .venv-vllm/bin/python benchmarks/bench_vllm.py [--rounds 1] [--out benchmarks/results/vllm_cpu]

(``bash scripts/install_vllm_venv.sh`` makes the venv.)  A Llama-shaped model (4 layers,
d=1024, ffn 2816, 16 heads, bf16) with random weights (``load_format="dummy"``, nothing
downloaded); 32 requests × 64 prompt tokens, 32 generated tokens each (``ignore_eos``),
``enforce_eager``.  Engines, one at a time, each in its own process:

- ``base``:  LoRA off;
- ``stock``: LoRA on, vLLM's own kernels (``SLORA_VLLM=0``);
- ``slora``: LoRA on, slora's plugin.

Each LoRA engine (``max_loras=16``, ``max_lora_rank=64``) serves three workloads: 16 adapters
of ranks {8, 16, 32, 64} on all 7 projections, request b on adapter b mod 16 (``mixed16``);
one rank-8 adapter for every request (``r8``); one rank-64 adapter (``r64``).  Each workload
runs once untimed (loads the adapters, warms up) and then ``--rounds`` timed times; the
reported output tok/s is the best round.  The engines' order is base, stock, slora, repeated
``--engine-rounds`` times (interleaved: a loaded machine slows all alike).  Writes
``OUT.json``, ``OUT.md`` (the table, machine, date, command) and ``OUT.png``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RANKS = (8, 16, 32, 64)
N_ADAPTERS, N_REQUESTS, PROMPT_LEN, GEN_LEN = 16, 32, 64, 32
LAYERS, HIDDEN, FFN, HEADS, VOCAB = 4, 1024, 2816, 16, 32000
PROJ = {"self_attn": ("q_proj", "k_proj", "v_proj", "o_proj"),
        "mlp": ("gate_proj", "up_proj", "down_proj")}  # fmt: skip
WORKLOADS = ("mixed16", "r8", "r64")


def write_model(root: Path) -> Path:
    """config.json of the Llama-shaped model (weights: vLLM's dummy loader)."""
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": HIDDEN, "intermediate_size": FFN, "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS, "num_key_value_heads": HEADS, "vocab_size": VOCAB,
        "max_position_embeddings": 512, "rms_norm_eps": 1e-5, "torch_dtype": "bfloat16",
        "hidden_act": "silu", "tie_word_embeddings": False, "bos_token_id": 1,
        "eos_token_id": 2,
    }  # fmt: skip
    (root / "model").mkdir(parents=True, exist_ok=True)
    (root / "model" / "config.json").write_text(json.dumps(config))
    return root / "model"


def write_adapters(root: Path) -> dict[str, Path]:
    """16 adapters (ranks 8, 16, 32, 64, four of each) plus the rank-8 and rank-64 ones."""
    sys.path.insert(0, str(HERE))
    from bench_pool import write_adapter

    dims = {"q_proj": (HIDDEN, HIDDEN), "k_proj": (HIDDEN, HIDDEN), "v_proj": (HIDDEN, HIDDEN),
            "o_proj": (HIDDEN, HIDDEN), "gate_proj": (HIDDEN, FFN), "up_proj": (HIDDEN, FFN),
            "down_proj": (FFN, HIDDEN)}  # fmt: skip
    targets = {
        f"model.layers.{i}.{block}.{p}": dims[p]
        for i in range(LAYERS) for block, projs in PROJ.items() for p in projs
    }  # fmt: skip
    out = {f"a{k}": write_adapter(root / f"a{k}", targets, RANKS[k % 4], k) for k in range(16)}
    out["r8"] = out["a0"]
    out["r64"] = out["a3"]
    return out


def serve(root: Path, engine: str, rounds: int) -> dict[str, float]:
    """One engine (in this process): output tok/s per workload (best of ``rounds``)."""
    import torch
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest

    lora = engine != "base"
    llm = LLM(
        model=str(root / "model"), load_format="dummy", dtype="bfloat16",
        skip_tokenizer_init=True, enforce_eager=True, max_model_len=256,
        max_num_seqs=N_REQUESTS, max_num_batched_tokens=N_REQUESTS * PROMPT_LEN,
        gpu_memory_utilization=0.15 if not torch.cuda.is_available() else 0.5,
        enable_lora=lora, max_loras=N_ADAPTERS if lora else 1, max_lora_rank=64,
        max_cpu_loras=N_ADAPTERS if lora else None, seed=0,
    )  # fmt: skip
    g = torch.Generator().manual_seed(0)
    prompts = [TokensPrompt(prompt_token_ids=torch.randint(3, VOCAB, (PROMPT_LEN,),
                                                           generator=g).tolist())
               for _ in range(N_REQUESTS)]  # fmt: skip
    params = SamplingParams(temperature=0.0, max_tokens=GEN_LEN, ignore_eos=True,
                            detokenize=False)  # fmt: skip
    adapters = {f"a{k}": LoRARequest(f"a{k}", k + 1, str(root / f"a{k}")) for k in range(16)}
    plans = {"base": [None] * N_REQUESTS} if not lora else {
        "mixed16": [adapters[f"a{b % 16}"] for b in range(N_REQUESTS)],
        "r8": [adapters["a0"]] * N_REQUESTS,
        "r64": [adapters["a3"]] * N_REQUESTS,
    }  # fmt: skip
    result = {}
    for name, requests in plans.items():
        llm.generate(prompts, params, lora_request=requests, use_tqdm=False)  # warm-up
        best = 0.0
        for _ in range(rounds):
            t0 = time.perf_counter()
            outs = llm.generate(prompts, params, lora_request=requests, use_tqdm=False)
            dt = time.perf_counter() - t0
            best = max(best, sum(len(o.outputs[0].token_ids) for o in outs) / dt)
        result[name] = best
    llm.llm_engine.engine_core.shutdown()  # no orphaned engine keeps the caller's pipes open
    return result


def run_engine(root: Path, engine: str, rounds: int) -> dict[str, float]:
    env = dict(os.environ, SLORA_VLLM="0" if engine == "stock" else "1")
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run(
        [sys.executable, __file__, "--serve", engine, "--root", str(root), "--rounds",
         str(rounds)], capture_output=True, text=True, env=env,
    )  # fmt: skip
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("BENCH ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"engine {engine} failed:\n{(proc.stdout + proc.stderr)[-5000:]}")
    return json.loads(lines[-1][6:])


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return f"{cpu}, {os.cpu_count()} cores" + (f", {gpu}" if gpu else "")


def table(res: dict) -> str:
    base = res["base"]["base"]
    rows = [
        "| engine | workload | output tok/s | vs base |",
        "| --- | --- | ---: | ---: |",
        f"| base model, LoRA off | — | {base:.1f} | 1.00 |",
    ]
    labels = {"mixed16": "16 adapters, ranks {8,16,32,64}, mixed",
              "r8": "one rank-8 adapter", "r64": "one rank-64 adapter"}  # fmt: skip
    for engine, title in (("stock", "stock vLLM LoRA"), ("slora", "vLLM + slora")):
        for w in WORKLOADS:
            tps = res[engine][w]
            rows.append(f"| {title} | {labels[w]} | {tps:.1f} | {tps / base:.3f} |")
    rows.append("")
    rows.append("slora vs stock vLLM LoRA: " + ", ".join(
        f"{w} {res['slora'][w] / res['stock'][w]:.1f}×" for w in WORKLOADS))  # fmt: skip
    return "\n".join(rows)


def plot(res: dict, path: Path) -> None:
    try:
        import matplotlib
    except ImportError:
        print(f"matplotlib is not installed: no {path.name}")
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = res["base"]["base"]
    fig, ax = plt.subplots(figsize=(7, 3.6))
    x = range(len(WORKLOADS))
    for i, (engine, color) in enumerate((("stock", "#999999"), ("slora", "#1f77b4"))):
        vals = [res[engine][w] / base for w in WORKLOADS]
        bars = ax.bar(
            [j + (i - 0.5) * 0.38 for j in x],
            vals,
            0.38,
            color=color,
            label="stock vLLM LoRA" if engine == "stock" else "vLLM + slora",
        )
        ax.bar_label(bars, [f"{v:.2f}" for v in vals], fontsize=8)  # fmt: skip
    ax.axhline(1.0, color="k", lw=0.8, ls="--", label="base model (LoRA off)")
    ax.set_xticks(list(x), ["16 mixed ranks", "one rank 8", "one rank 64"])
    ax.set_ylabel("output tok/s ÷ base model")
    ax.set_title(f"vLLM serving, Llama-shaped 4×1024, bf16 (base {base:.0f} tok/s)", fontsize=10)
    ax.legend(fontsize=8, loc="center right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=1, help="timed runs per workload")
    ap.add_argument("--engine-rounds", type=int, default=1, help="repeats of the engine cycle")
    ap.add_argument(
        "--engines",
        default="base,stock,slora",
        help="comma-separated subset of base,stock,slora (the table needs all three)",
    )
    ap.add_argument("--out", default=str(HERE / "results" / "vllm_cpu"))
    ap.add_argument("--serve", choices=("base", "stock", "slora"), help=argparse.SUPPRESS)
    ap.add_argument("--root", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        print("BENCH " + json.dumps(serve(Path(args.root), args.serve, args.rounds)), flush=True)
        os._exit(0)  # skip vLLM's slow teardown

    res: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_model(root)
        write_adapters(root)
        for _ in range(args.engine_rounds):
            for engine in args.engines.split(","):
                got = run_engine(root, engine, args.rounds)
                print(engine, {k: round(v, 1) for k, v in got.items()}, flush=True)
                res[engine] = {k: max(v, res.get(engine, {}).get(k, 0.0)) for k, v in got.items()}
    if set(res) != {"base", "stock", "slora"}:
        return  # a partial run: printed above, no table
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    command = "python benchmarks/bench_vllm.py " + " ".join(sys.argv[1:])
    import vllm

    meta = {"machine": machine(), "date": date, "command": command.strip(),
            "vllm": vllm.__version__, "results": res}  # fmt: skip
    out.with_suffix(".json").write_text(json.dumps(meta, indent=2))
    text = (f"# vLLM serving throughput\n\n{meta['machine']}; {date}; vLLM {vllm.__version__}\n\n"
            f"`{meta['command']}`\n\n{table(res)}\n")  # fmt: skip
    out.with_suffix(".md").write_text(text)
    plot(res, out.with_suffix(".png"))
    print(text)


if __name__ == "__main__":
    main()
