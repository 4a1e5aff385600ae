"""Ahead-of-time Triton compiles for Hopper (sm_90) with no GPU: the shared part of the
``test_cuda_compile_*`` tests.  A test passes a script body that calls ``build(kernel, sig,
const[, num_warps])`` for each kernel and prints ``json.dumps(res)``;
:func:`compile_for_sm90` runs it in a fresh interpreter (without ``TRITON_INTERPRET``) and
returns ``res``.  Each entry says the
cubin's size, the shared memory per block and whether ``tl.dot`` lowered to tensor-core MMA."""

import json
import os
import subprocess
import sys
from pathlib import Path

PRELUDE = r"""
import json, os
os.environ.pop("TRITON_INTERPRET", None)
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

def build(kernel, sig, const, num_warps=4):
    sig = dict(sig, **{n: "constexpr" for n in const})
    idx = {(kernel.arg_names.index(n),): v for n, v in const.items()}
    out = triton.compile(ASTSource(kernel, sig, idx), target=GPUTarget("cuda", 90, 32),
                         options={"num_warps": num_warps})
    return {"cubin": len(out.asm["cubin"]), "shared": out.metadata.shared,
            "mma": "mma" in out.asm["ptx"]}
"""

# Shared memory per thread block on H100/H200.
SM90_SHARED_LIMIT = 227 * 1024


def compile_for_sm90(body: str, tmp_path: Path) -> dict:
    root = Path(__file__).resolve().parent.parent
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run(
        [sys.executable, "-c", PRELUDE + body],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=root,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])
