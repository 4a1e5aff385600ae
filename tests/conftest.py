"""Shared test setup and helpers: the usable backends, one tolerance table keyed by the output
dtype with :func:`assert_close`, and seeded generators.  Test modules import these from here
(``from conftest import ...``), never from one another; the float64 oracles live in
``tests/oracles.py``.

Without CUDA, Triton kernels run in the interpreter: TRITON_INTERPRET must be set before triton
is first imported, so it is set here, at collection time.
"""

from __future__ import annotations

import os
import zlib

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _usable_backends() -> list[str]:
    from slora import ops

    names = []
    for backend in ops.BACKENDS:
        try:
            ops.resolve_backend("cpu", backend)
        except RuntimeError:  # triton without the interpreter, cpp without a native build
            continue
        names.append(backend)
    return names


# The backends that can run on the CPU here (torch always; triton under the interpreter; cpp
# when the native ops build), in slora.ops.BACKENDS order.
BACKENDS = _usable_backends()

# Relative tolerance by the dtype of the OUTPUT compared (inputs already rounded to their dtype,
# the oracle in float64 from those rounded values): a few units in the last place of the
# output's precision, so a kernel that rounds an intermediate to a narrower type fails.
TOL = {
    torch.float64: 1e-12,
    torch.float32: 1e-5,
    torch.float16: 2e-3,  # 11-bit significand: half an ulp is 4.9e-4
    torch.bfloat16: 1e-2,  # 8-bit significand: half an ulp is 3.9e-3
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None,
                 what: str = "") -> None:  # fmt: skip
    """``actual`` equals the float64 ``expected`` within ``TOL[dtype]`` (default: actual's
    dtype) relative to ``expected``'s largest magnitude (at least 1, so all-zero outputs are
    checked absolutely); NaN / inf in ``actual`` (poisoned, unwritten elements) fail."""
    dtype = actual.dtype if dtype is None else dtype
    assert actual.shape == expected.shape, f"{what} shape {actual.shape} != {expected.shape}"
    got = actual.detach().double().cpu()
    assert torch.isfinite(got).all(), f"{what} non-finite (unwritten?) elements in the output"
    scale = max(expected.abs().max().item() if expected.numel() else 0.0, 1.0)
    err = (got - expected.double().cpu()).abs().max().item() if got.numel() else 0.0
    assert err <= TOL[dtype] * scale, f"{what} max error {err:.3g} > {TOL[dtype]} × {scale:.3g}"


def assert_close_rel(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype,
                     what: str = "") -> None:  # fmt: skip
    """Element by element relative (for outputs of one sign and a wide range of magnitudes,
    such as sums of squares): ``|actual - expected| <= TOL[dtype] · |expected|``."""
    got = actual.detach().double().cpu()
    assert torch.isfinite(got).all(), f"{what}: non-finite output"
    torch.testing.assert_close(got, expected.double().cpu(), rtol=TOL[dtype], atol=1e-30,
                               msg=what or None)  # fmt: skip


def check_into_outputs(
    call, ref: torch.Tensor, dtype: torch.dtype, overwrite: bool, gen: torch.Generator
) -> None:
    """``call(out)`` into an output of ``dtype`` and into an fp32 one, each either random
    values to add to or (``overwrite``) NaN that every element must replace, against the
    float64 ``ref`` (the fp32 output with fp32 tolerance)."""
    for out_dtype in {dtype, torch.float32}:
        base = torch.randn(ref.shape, generator=gen).to(out_dtype)
        out = torch.full_like(base, float("nan")) if overwrite else base.clone()
        call(out)
        want = ref if overwrite else ref + base.double()
        assert_close(out, want, out_dtype if out_dtype == dtype else torch.float32)


def seed_of(name: str) -> int:
    """A seed that is the same in every process (``hash(str)`` is salted per process)."""
    return zlib.crc32(name.encode())


def generator(seed: int | str = 0) -> torch.Generator:
    """A CPU generator seeded reproducibly (a string seeds through :func:`seed_of`)."""
    return torch.Generator().manual_seed(seed_of(seed) if isinstance(seed, str) else seed)


def make_adapters(ranks, d_in, sizes, dtype=torch.float32, seed=0):  # noqa: ANN001
    """Random adapters for the multi-LoRA ops: ``ranks[k][s]`` for slot k and slice s (None:
    an empty slot); each entry a list of ``(A [r, d_in], B [d_out_s, r], scale)``."""
    g = generator(seed)
    out = []
    for k, rk in enumerate(ranks):
        if rk is None:
            out.append(None)
            continue
        out.append([
            (torch.randn(r, d_in, generator=g).to(dtype), torch.randn(d, r, generator=g).to(dtype),
             0.25 + 0.5 * k + 0.1 * s)
            for s, (r, d) in enumerate(zip(rk, sizes))
        ])  # fmt: skip
    return out


def pytest_collection_modifyitems(config, items):  # noqa: ANN001
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
