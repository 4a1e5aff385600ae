"""A/B of the CPU multi-LoRA kernel: ``csrc/multi_lora_cpu.cpp`` (with ``csrc/cpu_vec.h``) at a
git revision against the working tree, both built side by side into one process and timed
interleaved on ``slora bench``'s cases, each against the same-run bytes floor.

    python benchmarks/bench_multi_lora_ab_cpu.py [--base HEAD] [--dtype bfloat16 ...] \
        [--threads 1 2]

For kernel work on a noisy machine: the two builds run in alternating rounds (ABBA), so that a
drifting machine slows both alike, and every ratio to the floor pairs samples of one round.
The kernels are called directly (no Python wrapper, step metadata prebuilt), with fresh
random inputs; the two outputs must agree (bf16/fp16 within 2e-2, fp32 within 1e-4).
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import subprocess
import sys
from pathlib import Path

import torch
from torch.utils.benchmark import Timer

from slora import bench
from slora.kernels import _native
from slora.kernels.multi_lora.cpp_backend import native_args

ROOT = Path(__file__).resolve().parents[1]
# the kernel's files; a revision may lack the later ones (the GEMM route came with 2026-12-07)
FILES = ("multi_lora_cpu.cpp", "cpu_vec.h", "multi_lora_cpu.h", "multi_lora_gemm_cpu.cpp")


def sources(rev: str | None) -> dict[str, str]:
    """The kernel's files at ``rev`` (None: the working tree)."""
    if rev is None:
        return {f: (ROOT / "csrc" / f).read_text() for f in FILES}
    found = {}
    for f in FILES:
        show = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:csrc/{f}"],
                              capture_output=True, text=True)  # fmt: skip
        if show.returncode == 0:
            found[f] = show.stdout
    return found


def build(label: str, files: dict[str, str], march: str):
    """The kernel alone as an extension named after its sources (cached like the real one)."""
    from torch.utils.cpp_extension import load

    key = hashlib.sha1("".join(files.values()).encode() + march.encode()).hexdigest()[:10]
    build_dir = _native.cache_dir(f"ab_multi_lora_{key}")
    for name, text in files.items():
        (build_dir / name).write_text(text)
    (build_dir / "bind.cpp").write_text(
        "#include <torch/extension.h>\n"
        "void register_multi_lora(pybind11::module_& m);\n"
        "PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { register_multi_lora(m); }\n"
    )
    print(f"building {label} ({key}) ...", file=sys.stderr, flush=True)
    return load(
        name=f"ab_multi_lora_{key}",
        sources=[str(build_dir / "bind.cpp")]
        + [str(build_dir / f) for f in files if f.endswith(".cpp")],
        extra_cflags=["-O3", "-fopenmp", f"-march={march}", "-ffp-contract=fast"],
        extra_ldflags=["-fopenmp"],
        build_directory=str(build_dir),
    )


def kernel_args(ext, case: bench.Case, out: torch.Tensor) -> tuple:  # noqa: ANN001
    """The native op's arguments for ``case`` with its step metadata prebuilt (overwrite); an
    empty tensor for a None order, which revisions before 0dbecf7 require, and no GEMM
    threshold for revisions before the GEMM route."""
    args = list(native_args(case.x, case.packed.weights(), case.step_meta(), out, True))
    if args[3] is None:
        args[3] = torch.empty(0, dtype=torch.int64)
    for newer in ("gemm_min_macs", "gemm_min_tokens"):
        if newer not in (ext.multi_lora.__doc__ or ""):
            args.pop()
    return tuple(args)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="HEAD", help="git revision to compare against")
    parser.add_argument("--dtype", action="append", choices=sorted(bench.DTYPES))
    parser.add_argument("--case", action="append", choices=["decode", "decode-one", "prefill"],
                        help="decode-one: 64 decode tokens all on one rank-16 adapter")  # fmt: skip
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--march", default="native")
    args = parser.parse_args(argv)
    kernels = {
        args.base: build(args.base, sources(args.base), args.march),
        "working tree": build("working tree", sources(None), args.march),
    }
    torch.manual_seed(0)
    for name in args.dtype or ["bfloat16"]:
        dtype = bench.DTYPES[name]
        for kind in args.case or ["decode"]:
            if kind == "prefill":
                case = bench.prefill_case(1024, 2048, dtype=dtype, device="cpu")
            else:
                one = kind == "decode-one"
                n, ranks = (1, (16,)) if one else (16, bench.RANKS)
                case = bench.decode_case(64, 2048, n_adapters=n, ranks=ranks, dtype=dtype)
            outs = {label: torch.empty(case.x.shape[0], case.packed.d_out, dtype=dtype)
                    for label in kernels}  # fmt: skip
            fns = {}
            for label, ext in kernels.items():
                kargs = kernel_args(ext, case, outs[label])
                fns[label] = lambda ext=ext, kargs=kargs: ext.multi_lora(*kargs)
                fns[label]()
            a, b = (o.double() for o in outs.values())
            tol = 1e-4 if dtype == torch.float32 else 2e-2
            if not torch.allclose(a, b, rtol=tol, atol=tol):
                raise SystemExit(f"the two kernels disagree on {kind} {name}")
            buf = torch.rand(bench.floor_bytes(case) // 4)
            fns["floor read"] = buf.sum
            for threads in args.threads:
                times: dict[str, list[float]] = {k: [] for k in fns}
                for rnd in range(args.rounds):
                    order = list(fns) if rnd % 2 == 0 else list(fns)[::-1]
                    for k in order:
                        timer = Timer("f()", globals={"f": fns[k]}, num_threads=threads)
                        times[k].append(timer.blocked_autorange(min_run_time=0.05).median)
                line = f"{kind} {name}, {threads} thread(s):"
                for label in kernels:
                    ratio = statistics.median(
                        f / t for f, t in zip(times["floor read"], times[label])
                    )
                    line += (
                        f"  {label} {statistics.median(times[label]) * 1e6:.0f} µs"
                        f" ({ratio:.0%} of floor)"
                    )
                print(line, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
