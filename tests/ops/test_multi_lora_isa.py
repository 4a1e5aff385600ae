"""The CPU kernel's narrower instruction-set path on a wider CPU.  The native build targets
``-march=native``, so on a CPU with AVX512-BF16 the shrink's bf16 dot products run on
``vdpbf16ps`` and the AVX-512 path without it (bf16 widened as even / odd halves, the path of
Ice Lake and Skylake servers) would go untested here: this test builds that variant
(``SLORA_NATIVE_MARCH=icelake-server``, cached separately) and runs the bf16 / fp16 / fp32
kernel tests on it in a fresh process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import BACKENDS

from slora.kernels import cpu_features

TESTS = Path(__file__).resolve().parent


@pytest.mark.skipif("cpp" not in BACKENDS, reason="native ops not built")
@pytest.mark.skipif(
    not cpu_features.has("avx512_bf16"),
    reason="this CPU has no AVX512-BF16: the default build already runs the AVX-512 path "
    "without it (or the AVX2 path)",
)
def test_avx512_path_without_bf16_dot_products():
    env = dict(os.environ, SLORA_NATIVE_MARCH="icelake-server")
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x",
         str(TESTS / "test_multi_lora.py"), str(TESTS / "test_multi_lora_gemm_route.py"),
         "-k", "cpp_decode_and_prefill or one_adapter_split or every_route"],
        capture_output=True, text=True, env=env, timeout=900,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert " passed" in run.stdout and "skipped" not in run.stdout.splitlines()[-1], run.stdout
