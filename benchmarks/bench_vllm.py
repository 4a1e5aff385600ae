"""vLLM serving throughput: the base model against LoRA workloads, each in a fresh engine.

    .venv-vllm/bin/python benchmarks/bench_vllm.py [--repeats 3] [--out benchmarks/results/vllm_cpu]

(``bash scripts/install_vllm_venv.sh`` makes the venv.)  A Llama-shaped model (default 4
layers, d=1024, ffn 2816, 16 heads, bf16) with random weights (``load_format="dummy"``, nothing
downloaded); 32 requests × 64 prompt tokens, 32 generated tokens each (``ignore_eos``),
``enforce_eager``.  Workloads (:data:`WORKLOADS`), LoRA engines with ``max_loras=16``,
``max_lora_rank=64``, ``max_cpu_loras=64``, adapters on all 7 projections:

- ``base``: LoRA off; ``lora_unused``: LoRA on, no request uses an adapter;
- ``r8`` / ``r64``: one rank-8 / rank-64 adapter for every request; ``four_r8``: four rank-8
  adapters (request b on adapter b mod 4); ``mixed16``: 16 adapters of ranks {8, 16, 32, 64}
  (request b on adapter b mod 16); ``stock_mixed16``: the same with stock vLLM LoRA
  (``SLORA_VLLM=0``);
- ``churn64``: 64 adapters (ranks 8–64) through the 16 slots: the warm-up sends every adapter
  once, the timed requests cycle through adapters that have all been evicted since, so vLLM
  loads and evicts slots during the timed run (at most 16 adapters run at a time).

Every run is one workload in its own engine process: start, a short warm-up (every request
once with 2 tokens: adapters loaded, code paths warmed), then one timed ``generate``; output
tok/s = generated tokens / its wall time.  ``--repeats`` rounds, each running every workload
once, the order rotated by one per round (a drifting machine hits every workload alike).  Per
workload: median and range (min–max) of tok/s over rounds, and the ratio to the base model,
taken per round against the same round's base run, then its median and range.

Each run is appended to ``OUT.jsonl`` as it finishes; a rerun with the same ``--out`` skips the
runs already there (resume after an interruption; a file of another configuration is
refused).  Then ``OUT.json`` (summary, machine: CPU model, cores, AMX, AVX512-BF16, vLLM and
torch versions), ``OUT.md`` (median table) and ``OUT.png`` (bars with ranges).  ``--quick``:
a tiny model, 1 round, 8 requests (a smoke test of the pipeline; numbers mean little).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.metadata
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import asdict, dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
RANKS = (8, 16, 32, 64)
PROJ = {"self_attn": ("q_proj", "k_proj", "v_proj", "o_proj"),
        "mlp": ("gate_proj", "up_proj", "down_proj")}  # fmt: skip
MAX_LORAS, MAX_LORA_RANK, N_CHURN = 16, 64, 64
# name -> what the table calls it; the order of the table and of round 0
WORKLOADS = {
    "base": "base model, LoRA off",
    "lora_unused": "LoRA enabled, no request uses it",
    "r8": "one rank-8 adapter",
    "r64": "one rank-64 adapter",
    "four_r8": "four rank-8 adapters",
    "mixed16": "16 adapters, ranks 8–64 mixed",
    "stock_mixed16": "stock vLLM LoRA, 16 adapters mixed",
    "churn64": "64 adapters (ranks 8–64) through 16 slots",
}
STOCK = "stock_mixed16"


@dataclass(frozen=True)
class Shape:
    """Model and request shape of a run (part of every JSONL line: resumes must match)."""

    layers: int = 4
    hidden: int = 1024
    ffn: int = 2816
    heads: int = 16
    vocab: int = 32000
    requests: int = 32
    prompt_len: int = 64
    gen_len: int = 32


QUICK = Shape(layers=2, hidden=128, ffn=256, heads=4, vocab=512, requests=8, prompt_len=16,
              gen_len=8)  # fmt: skip


def write_model(root: Path, shape: Shape) -> Path:
    """config.json of the Llama-shaped model (weights: vLLM's dummy loader)."""
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": shape.hidden, "intermediate_size": shape.ffn,
        "num_hidden_layers": shape.layers, "num_attention_heads": shape.heads,
        "num_key_value_heads": shape.heads, "vocab_size": shape.vocab,
        "max_position_embeddings": 512, "rms_norm_eps": 1e-5, "torch_dtype": "bfloat16",
        "hidden_act": "silu", "tie_word_embeddings": False, "bos_token_id": 1,
        "eos_token_id": 2,
    }  # fmt: skip
    (root / "model").mkdir(parents=True, exist_ok=True)
    (root / "model" / "config.json").write_text(json.dumps(config))
    return root / "model"


def write_adapters(root: Path, shape: Shape, n: int) -> None:
    """Adapters ``a0`` … ``a{n-1}``, adapter k of rank RANKS[k mod 4], on every projection."""
    sys.path.insert(0, str(HERE))
    from bench_pool import write_adapter

    h, f = shape.hidden, shape.ffn
    dims = {"q_proj": (h, h), "k_proj": (h, h), "v_proj": (h, h), "o_proj": (h, h),
            "gate_proj": (h, f), "up_proj": (h, f), "down_proj": (f, h)}  # fmt: skip
    targets = {
        f"model.layers.{i}.{block}.{p}": dims[p]
        for i in range(shape.layers) for block, projs in PROJ.items() for p in projs
    }  # fmt: skip
    for k in range(n):
        write_adapter(root / f"a{k}", targets, RANKS[k % 4], k)


def adapter_plan(workload: str, requests: int, call: int) -> list[int | None]:
    """The adapter index of every request of a ``generate`` call (None: the base model)."""
    if workload in ("base", "lora_unused"):
        return [None] * requests
    if workload in ("r8", "r64"):
        return [0 if workload == "r8" else 3] * requests  # RANKS[0] = 8, RANKS[3] = 64
    if workload == "four_r8":
        return [4 * (b % 4) for b in range(requests)]  # a0, a4, a8, a12: rank 8
    if workload in ("mixed16", STOCK):
        return [b % 16 for b in range(requests)]
    if workload == "churn64":
        return [(b + call * requests) % N_CHURN for b in range(requests)]
    raise ValueError(f"unknown workload {workload!r}; expected one of {', '.join(WORKLOADS)}")


def churn_warmup_calls(requests: int) -> int:
    """Warm-up calls of ``churn64``: enough to send every one of the 64 adapters once."""
    return math.ceil(N_CHURN / requests)


def serve(root: Path, workload: str, shape: Shape, result_path: Path) -> dict[str, float]:
    """One workload in one fresh engine (this process): warm-up, then one timed generate;
    the result is written to ``result_path`` before the engine stops."""
    import torch
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest

    start = time.perf_counter()
    lora = workload != "base"
    llm = LLM(
        model=str(root / "model"), load_format="dummy", dtype="bfloat16",
        skip_tokenizer_init=True, enforce_eager=True, max_model_len=256,
        max_num_seqs=shape.requests, max_num_batched_tokens=shape.requests * shape.prompt_len,
        gpu_memory_utilization=0.15 if not torch.cuda.is_available() else 0.5,
        enable_lora=lora, max_loras=MAX_LORAS if lora else 1, max_lora_rank=MAX_LORA_RANK,
        max_cpu_loras=N_CHURN if lora else None, seed=0,
    )  # fmt: skip
    engine_s = time.perf_counter() - start
    g = torch.Generator().manual_seed(0)
    prompts = [TokensPrompt(prompt_token_ids=torch.randint(
        3, shape.vocab, (shape.prompt_len,), generator=g).tolist())
        for _ in range(shape.requests)]  # fmt: skip

    def requests(call: int) -> list:
        return [None if k is None else LoRARequest(f"a{k}", k + 1, str(root / f"a{k}"))
                for k in adapter_plan(workload, shape.requests, call)]  # fmt: skip

    def params(tokens: int):
        return SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True,
                              detokenize=False)  # fmt: skip

    warmups = churn_warmup_calls(shape.requests) if workload == "churn64" else 1
    for call in range(warmups):
        llm.generate(prompts, params(2), lora_request=requests(call), use_tqdm=False)
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params(shape.gen_len), lora_request=requests(warmups),
                        use_tqdm=False)  # fmt: skip
    gen_s = time.perf_counter() - t0
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    result = {"tok_s": tokens / gen_s, "tokens": tokens, "gen_s": gen_s, "engine_s": engine_s}
    result_path.write_text(json.dumps(result))
    # a graceful stop: a killed engine leaves its shared-memory segments in /dev/shm
    llm.llm_engine.engine_core.shutdown()
    return result


def run_one(root: Path, workload: str, shape: Shape, timeout: float) -> dict[str, float]:
    """One run in a fresh process group (the engine and its workers with it); whatever of the
    group is left when the run ends or its time is up is killed (a hung engine stops nothing
    else).  Raises RuntimeError with the log's tail on failure."""
    env = dict(os.environ, SLORA_VLLM="0" if workload == STOCK else "1")
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    env.pop("TRITON_INTERPRET", None)
    result, log = root / "result.json", root / "run.log"
    result.unlink(missing_ok=True)
    cmd = [sys.executable, __file__, "--serve", workload, "--root", str(root), "--shape",
           json.dumps(asdict(shape)), "--result", str(result)]  # fmt: skip
    with log.open("w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)  # fmt: skip
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            rc = None
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # the group this call started
            proc.wait()
    tail = log.read_text(errors="replace")[-5000:]
    if rc is None:
        raise RuntimeError(f"{workload}: no result within {timeout:.0f} s\n{tail}")
    if rc != 0 or not result.exists():
        raise RuntimeError(f"{workload} failed (exit code {rc}):\n{tail}")
    return json.loads(result.read_text())


def schedule(workloads: list[str], repeats: int) -> list[tuple[int, str]]:
    """(round, workload) in run order: every workload once per round, rotated by one a round."""
    n = len(workloads)
    return [(r, workloads[(r + i) % n]) for r in range(repeats) for i in range(n)]


def load_runs(path: Path, shape: Shape) -> list[dict]:
    """The runs already in ``path`` (JSONL); a file written for another shape is refused."""
    if not path.exists():
        return []
    runs = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]
    other = [r for r in runs if r.get("shape") != asdict(shape)]
    if other:
        raise SystemExit(
            f"{path} holds runs of another configuration ({other[0].get('shape')}, this one "
            f"is {asdict(shape)}): pass another --out or delete the file"
        )
    return runs


def spread(values: list[float]) -> dict[str, float] | None:
    """Median and range of ``values`` (None when empty)."""
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def summarize(runs: list[dict], workloads: list[str]) -> dict[str, dict]:
    """Per workload: tok/s median and range, the per-round ratios to the same round's base
    (and stock vLLM's 16-adapter mix) run, their median and range, and the number of runs."""
    by = {(r["round"], r["workload"]): r["tok_s"] for r in runs}
    out = {}
    for w in workloads:
        rounds = sorted(rnd for rnd, name in by if name == w)

        def ratios(ref: str) -> list[float]:
            return [by[rnd, w] / by[rnd, ref] for rnd in rounds if (rnd, ref) in by]  # noqa: B023

        out[w] = {
            "label": WORKLOADS[w],
            "runs": len(rounds),
            "tok_s": spread([by[rnd, w] for rnd in rounds]),
            "vs_base": spread(ratios("base")),
            "vs_stock_mixed16": spread(ratios(STOCK)),
        }
    return out


def machine() -> dict[str, object]:
    """CPU model, cores, AMX / AVX512-BF16 flags, GPU, vLLM and torch versions."""
    import torch

    from slora.kernels import cpu_features

    info = cpu_features.summary()
    info["gpu"] = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    info["vllm"] = importlib.metadata.version("vllm")
    info["torch"] = torch.__version__
    return info


def machine_line(m: dict) -> str:
    yes = {True: "yes", False: "no"}
    return (f"{m['cpu']}, {m['cores']} logical cores, AMX {yes[bool(m['amx_bf16'])]}, "
            f"AVX512-BF16 {yes[bool(m['avx512_bf16'])]}" + (f", {m['gpu']}" if m["gpu"] else "")
            + f"; vLLM {m['vllm']}, torch {m['torch']}")  # fmt: skip


def table(summary: dict[str, dict]) -> str:
    """Markdown: median and range of tok/s and of the ratios, per workload."""

    def fmt(s: dict | None, spec: str, suffix: str = "") -> tuple[str, str]:
        if s is None:
            return "—", ""
        return f"{s['median']:{spec}}{suffix}", f"{s['min']:{spec}}–{s['max']:{spec}}"

    rows = ["| workload | output tok/s (median) | range | ÷ base model (median) | range "
            "| ÷ stock vLLM, 16 mixed | runs |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]  # fmt: skip
    for s in summary.values():
        tps, tps_r = fmt(s["tok_s"], ".1f")
        base, base_r = fmt(s["vs_base"], ".3f")
        stock, _ = fmt(s["vs_stock_mixed16"], ".1f", "×")
        rows.append(f"| {s['label']} | {tps} | {tps_r} | {base} | {base_r} | {stock} "
                    f"| {s['runs']} |")  # fmt: skip
    return "\n".join(rows)


def plot(summary: dict[str, dict], title: str, path: Path) -> None:
    """Bars: median ratio to the base model per workload, whiskers from min to max."""
    try:
        import matplotlib
    except ImportError:
        print(f"matplotlib is not installed: no {path.name}")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    items = [(s["label"], s["vs_base"], w) for w, s in summary.items() if s["vs_base"]]
    if not items:
        return
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(items) + 1.8))
    y = range(len(items))
    med = [v["median"] for _, v, _ in items]
    err = [[m - v["min"] for m, (_, v, _) in zip(med, items)],
           [v["max"] - m for m, (_, v, _) in zip(med, items)]]  # fmt: skip
    colors = ["#999999" if w == STOCK else "#444444" if w == "base" else "#1f77b4"
              for _, _, w in items]  # fmt: skip
    ax.barh(list(y), med, xerr=err, color=colors, capsize=3)
    for i, m in enumerate(med):
        ax.text(m, i, f" {m:.2f}", va="center", fontsize=8)
    ax.set_yticks(list(y), [label for label, _, _ in items], fontsize=8)
    ax.invert_yaxis()
    ax.axvline(1.0, color="k", lw=0.8, ls="--")
    ax.set_xlabel("output tok/s ÷ base model (median of rounds, whiskers: min–max)")
    ax.set_title("\n".join(textwrap.fill(part, 100) for part in title.split("\n")), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=None, help="rounds (default 3; --quick: 1)")
    ap.add_argument("--workloads", default=",".join(WORKLOADS),
                    help=f"comma-separated subset of {','.join(WORKLOADS)}")  # fmt: skip
    ap.add_argument("--out", default=str(HERE / "results" / "vllm_cpu"),
                    help="path without suffix: OUT.jsonl, OUT.json, OUT.md, OUT.png")  # fmt: skip
    ap.add_argument("--quick", action="store_true", help="tiny model, 1 round (smoke test)")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per run at most")
    for field, default in asdict(Shape()).items():
        ap.add_argument(f"--{field.replace('_', '-')}", type=int, default=None,
                        help=f"model / request shape (default {default})")  # fmt: skip
    ap.add_argument("--serve", choices=tuple(WORKLOADS), help=argparse.SUPPRESS)
    ap.add_argument("--root", help=argparse.SUPPRESS)
    ap.add_argument("--shape", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.workloads = [w for w in args.workloads.split(",") if w]
    unknown = [w for w in args.workloads if w not in WORKLOADS]
    if unknown or not args.workloads:
        ap.error(f"--workloads: unknown {unknown or 'empty'}; expected names from "
                 f"{', '.join(WORKLOADS)}")  # fmt: skip
    args.repeats = args.repeats or (1 if args.quick else 3)
    if args.repeats < 1:
        ap.error(f"--repeats must be ≥ 1, got {args.repeats}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve:
        serve(Path(args.root), args.serve, Shape(**json.loads(args.shape)), Path(args.result))
        os._exit(0)  # skip the rest of vLLM's teardown
    base_shape = QUICK if args.quick else Shape()
    overrides = {k: getattr(args, k) for k in asdict(base_shape) if getattr(args, k)}
    shape = Shape(**{**asdict(base_shape), **overrides})
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    jsonl = out.with_suffix(".jsonl")
    runs = load_runs(jsonl, shape)
    done = {(r["round"], r["workload"]) for r in runs}
    todo = [(r, w) for r, w in schedule(args.workloads, args.repeats) if (r, w) not in done]
    print(f"{len(done)} runs already in {jsonl}, {len(todo)} to do", flush=True)
    failed = []
    if todo:
        uses = {w for _, w in todo} - {"base", "lora_unused"}
        n_adapters = N_CHURN if "churn64" in uses else 16 if uses else 0
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            write_model(root, shape)
            write_adapters(root, shape, n_adapters)
            for i, (rnd, w) in enumerate(todo, 1):
                t0 = time.perf_counter()
                try:
                    res = run_one(root, w, shape, args.timeout)
                except RuntimeError as exc:
                    print(f"[{i}/{len(todo)}] round {rnd} {w}: FAILED\n{exc}", flush=True)
                    failed.append((rnd, w))
                    continue
                date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
                wall = time.perf_counter() - t0
                rec = {"round": rnd, "workload": w, **res, "wall_s": wall, "date": date,
                       "shape": asdict(shape)}  # fmt: skip
                with jsonl.open("a") as fh:
                    fh.write(json.dumps(rec) + "\n")
                runs.append(rec)
                print(f"[{i}/{len(todo)}] round {rnd} {w}: {res['tok_s']:.1f} tok/s "
                      f"(engine start {res['engine_s']:.0f} s, run {rec['wall_s']:.0f} s)",
                      flush=True)  # fmt: skip
    # the workloads asked for and any others already in the file, in the table's order
    shown = [w for w in WORKLOADS if w in args.workloads or any(r["workload"] == w for r in runs)]
    summary = summarize(runs, shown)
    m = machine()
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    command = "python benchmarks/bench_vllm.py " + " ".join(sys.argv[1:] if argv is None else argv)
    doc = {"machine": m, "date": date, "command": command.strip(), "shape": asdict(shape),
           "repeats": args.repeats, "complete": all(summary[w]["runs"] >= args.repeats
                                                    for w in args.workloads),
           "workloads": summary}  # fmt: skip
    out.with_suffix(".json").write_text(json.dumps(doc, indent=1))
    s = shape
    title = (f"vLLM, Llama-shaped {s.layers}×{s.hidden}, bf16, {s.requests} requests × "
             f"({s.prompt_len} prompt + {s.gen_len} generated), "
             f"medians of {args.repeats} rounds")  # fmt: skip
    text = (f"# vLLM serving throughput\n\n{title}.\n\n{machine_line(m)}; {date}\n\n"
            f"`{doc['command']}`\n\n{table(summary)}\n")  # fmt: skip
    out.with_suffix(".md").write_text(text)
    plot(summary, f"{title}\n{machine_line(m).replace('; ', chr(10))}", out.with_suffix(".png"))
    print(text)
    if failed:
        print(f"{len(failed)} runs failed: {failed}; rerun the same command to retry them")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
