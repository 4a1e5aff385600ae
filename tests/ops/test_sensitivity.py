"""Sensitivity-statistics kernels (every backend) and factor metrics vs float64 references.

Triton runs under TRITON_INTERPRET=1 without CUDA (set by conftest), so shapes stay small.
Every ``torch.empty`` / ``torch.empty_like`` made while a kernel runs is poisoned with NaN, so a
workspace or output element that a kernel forgets to write shows up in the result.
"""

from __future__ import annotations

import pytest
import torch
from conftest import BACKENDS, assert_close_rel
from tiny_models import MODELS, batches

import slora
from slora import ops
from slora.kernels.sensitivity import triton_backend as tb

DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# (tokens, features, mask kind): odd sizes, one token, all-but-one masked, a multi-block size.
SHAPES = [
    (1, 1, "none"),
    (1, 7, "none"),
    (5, 3, "random"),
    (37, 19, "random"),
    (29, 130, "all_but_one"),
    (70, 261, "random"),
    (3, 513, "none"),
]


@pytest.fixture(autouse=True)
def _poison_empty(monkeypatch):
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def poison(t):
        if t.is_floating_point():
            t.fill_(float("nan"))
        return t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poison(real_empty_like(*a, **k)))


def _mask(kind: str, tokens: int) -> torch.Tensor | None:
    if kind == "none":
        return None
    if kind == "all_but_one":
        mask = torch.zeros(tokens, dtype=torch.bool)
        mask[tokens // 2] = True
        return mask
    mask = torch.rand(tokens) > 0.35
    mask[0] = True
    return mask


def _data(tokens: int, features: int, dtype: torch.dtype, scale: float = 3.0) -> torch.Tensor:
    # Values away from zero (never all zeros) with a spread of magnitudes.
    return (torch.randn(tokens, features, dtype=torch.float64) * scale + 0.1).to(dtype)


def _ref_sq(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    sq = x.double().square()
    return sq if mask is None else sq * mask.double()[:, None]


def _close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """The statistics are fp32 sums of squares of already-rounded inputs: checked at fp32
    tolerance whatever the input dtype (a kernel that squared in bf16 / fp16 fails)."""
    assert actual.dtype == torch.float32, f"{what}: {actual.dtype} output"
    assert_close_rel(actual, expected, torch.float32, what)


def _run_stats(backend, x, mask, **launch):
    """Input side then grad side on random (non-zero) accumulators; returns outputs and refs."""
    tokens, features = x.shape
    col = torch.rand(features) + 0.5
    col0 = col.double().clone()
    if launch:
        tok = tb.input_stats(x, mask, col, **launch)
    else:
        tok = ops.accumulate_input_stats(x, mask, col, backend=backend)
    dy = _data(tokens, features + 3, x.dtype, scale=0.5)
    row = torch.rand(features + 3) + 0.5
    trace = torch.rand(()) + 0.5
    row0, trace0 = row.double().clone(), trace.double().clone()
    if launch:
        tb.grad_stats(dy, mask, tok, row, trace, **launch)
    else:
        ops.accumulate_grad_stats(dy, mask, tok, row, trace, backend=backend)
    sq_x, sq_dy = _ref_sq(x, mask), _ref_sq(dy, mask)
    return {
        "col_sq": (col, col0 + sq_x.sum(0)),
        "token_sq": (tok, sq_x.sum(1)),
        "row_sq": (row, row0 + sq_dy.sum(0)),
        "trace": (trace, trace0 + (sq_dy.sum(1) * sq_x.sum(1)).sum()),
    }


def test_fp32_tolerance_catches_squares_taken_in_bf16():
    # The check must be able to fail: squaring bf16 inputs in bf16 (rounding each square to 8
    # significant bits) is off by ~1e-3 relative; upcasting first is exact to fp32 rounding.
    x = _data(64, 33, torch.bfloat16)
    want = _ref_sq(x, None).sum(0)
    with pytest.raises(AssertionError):
        _close(x.square().float().sum(0), want, "squared in bf16")
    _close(x.float().square().sum(0), want, "squared in fp32")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,features,mask_kind", SHAPES)
def test_stats_match_float64(backend, dtype, tokens, features, mask_kind):
    x = _data(tokens, features, dtype)
    mask = _mask(mask_kind, tokens)
    for name, (got, want) in _run_stats(backend, x, mask).items():
        _close(got, want, f"{backend} {dtype} {name}")
        if name == "token_sq" and mask is not None:
            assert (got[~mask] == 0).all(), "masked tokens must have ‖x_t‖² = 0"


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp16_squares_that_overflow_fp16(backend):
    # |x| ≈ 300..1000: x² ≫ 65504 (fp16 max), so squaring in fp16 would give inf.
    x = (torch.rand(9, 33, dtype=torch.float64) * 700 + 300).to(torch.float16)
    for name, (got, want) in _run_stats(backend, x, _mask("random", 9)).items():
        _close(got, want, f"{backend} {name}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_float64_input_and_strided_views(backend):
    base = _data(23, 40, torch.float64)
    x = base[:, ::2]  # column stride 2
    mask = _mask("random", 46)[::2]  # a strided mask too
    for name, (got, want) in _run_stats(backend, x, mask).items():
        _close(got, want, f"{backend} strided {name}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_tokens(backend):
    x = torch.empty(0, 6)
    col = torch.rand(6)
    before = col.clone()
    tok = ops.accumulate_input_stats(x, None, col, backend=backend)
    assert tok.shape == (0,) and torch.equal(col, before)
    row, trace = torch.rand(4), torch.rand(1)
    row0, trace0 = row.clone(), trace.clone()
    ops.accumulate_grad_stats(torch.empty(0, 4), None, tok, row, trace, backend=backend)
    assert torch.equal(row, row0) and torch.equal(trace, trace0)


@pytest.mark.skipif("triton" not in BACKENDS, reason="triton not usable")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "launch", [dict(block_t=4, block_d=8, splits=3), dict(block_t=2, splits=50)]
)
def test_triton_split_and_column_block_paths(dtype, launch):
    # Several token splits (workspace path) and several column blocks (token partials summed).
    x = _data(41, 27, dtype)
    for name, (got, want) in _run_stats("triton", x, _mask("random", 41), **launch).items():
        _close(got, want, f"triton {launch} {name}")


@pytest.mark.skipif("cpp" not in BACKENDS, reason="native ops not built")
@pytest.mark.parametrize("dtype", DTYPES)
def test_cpp_threads_give_identical_bits(dtype):
    # Large enough (> 2 M elements) for the C++ op to split the rows across threads.
    x = _data(4200, 1100, dtype)
    dy = _data(4200, 530, dtype)
    mask = _mask("random", 4200)
    results = []
    old = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            col, row, trace = torch.zeros(1100), torch.zeros(530), torch.zeros(1)
            tok = ops.accumulate_input_stats(x, mask, col, backend="cpp")
            ops.accumulate_grad_stats(dy, mask, tok, row, trace, backend="cpp")
            results.append((col, tok, row, trace))
    finally:
        torch.set_num_threads(old)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)
    sq_x, sq_dy = _ref_sq(x, mask), _ref_sq(dy, mask)
    want = (sq_x.sum(0), sq_x.sum(1), sq_dy.sum(0), (sq_dy.sum(1) * sq_x.sum(1)).sum().reshape(1))
    for got, ref in zip(results[1], want):
        _close(got, ref, "cpp, several threads")


# ---- fisher_exact --------------------------------------------------------------------------

FISHER_BACKENDS = [b for b in BACKENDS if b != "cpp"]  # cpp falls back to torch (no own op)


@pytest.mark.parametrize("backend", FISHER_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "tokens,d_out,d_in,mask_kind",
    [(1, 1, 1, "none"), (1, 5, 3, "none"), (37, 19, 21, "random"), (70, 33, 130, "all_but_one")],
)
def test_fisher_exact_matches_float64(backend, dtype, tokens, d_out, d_in, mask_kind):
    dy, x = _data(tokens, d_out, dtype, 0.5), _data(tokens, d_in, dtype)
    mask = _mask(mask_kind, tokens)
    diag = torch.rand(d_out, d_in) + 0.5
    want = diag.double() + _ref_sq(dy, mask).t() @ x.double().square()
    ops.accumulate_fisher_exact(dy, x, mask, diag, backend=backend)
    _close(diag, want, f"{backend} fisher_exact")


@pytest.mark.skipif("triton" not in BACKENDS, reason="triton not usable")
def test_fisher_exact_triton_overflowing_fp16_strided_and_blocked():
    dy = (torch.rand(20, 17, dtype=torch.float64) * 500 + 300).to(torch.float16)
    x = _data(20, 50, torch.float16)[:, ::2]
    diag = (torch.rand(25, 17) + 0.5).t()  # a transposed (non-contiguous) accumulator
    want = diag.double() + dy.double().square().t() @ x.double().square()
    tb.fisher_exact(dy, x, None, diag, block_o=16, block_d=16, block_t=16)
    _close(diag, want, "fisher_exact blocked")


# ---- errors --------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_errors_name_the_tensor(backend):
    x, col = torch.randn(4, 3), torch.zeros(3)
    with pytest.raises(ValueError, match="x must be a 2-D"):
        ops.accumulate_input_stats(torch.randn(2, 4, 3), None, col, backend=backend)
    with pytest.raises(TypeError, match="x must be float16"):
        ops.accumulate_input_stats(x.long(), None, col, backend=backend)
    with pytest.raises(ValueError, match="row_mask"):
        ops.accumulate_input_stats(x, torch.ones(4), col, backend=backend)
    with pytest.raises(ValueError, match="row_mask"):
        ops.accumulate_input_stats(x, torch.ones(5, dtype=torch.bool), col, backend=backend)
    with pytest.raises(ValueError, match="col_sq"):
        ops.accumulate_input_stats(x, None, torch.zeros(4), backend=backend)
    with pytest.raises(ValueError, match="col_sq"):
        ops.accumulate_input_stats(x, None, torch.zeros(3, dtype=torch.float64), backend=backend)
    tok = torch.zeros(4)
    with pytest.raises(ValueError, match="x_token_sq"):
        ops.accumulate_grad_stats(
            x, None, torch.zeros(5), torch.zeros(3), torch.zeros(1), backend=backend
        )
    with pytest.raises(ValueError, match="row_sq"):
        ops.accumulate_grad_stats(x, None, tok, torch.zeros(2), torch.zeros(1), backend=backend)
    with pytest.raises(ValueError, match="trace"):
        ops.accumulate_grad_stats(x, None, tok, torch.zeros(3), torch.zeros(2), backend=backend)
    with pytest.raises(ValueError, match="dy and x"):
        ops.accumulate_fisher_exact(x, torch.randn(5, 3), None, torch.zeros(3, 3), backend=backend)
    with pytest.raises(ValueError, match="diag"):
        ops.accumulate_fisher_exact(x, x, None, torch.zeros(3, 4), backend=backend)


# ---- CUDA (run by the GPU script; skipped without a device) --------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,features", [(1, 1), (37, 19), (4099, 4096), (2048, 14336)])
def test_triton_stats_on_device(dtype, tokens, features):
    dev = "cuda"
    x = _data(tokens, features, dtype).to(dev)
    dy = _data(tokens, features + 5, dtype, 0.5).to(dev)
    mask = _mask("random", tokens).to(dev)
    sq_x, sq_dy = _ref_sq(x, mask), _ref_sq(dy, mask)
    want = (sq_x.sum(0), sq_x.sum(1), sq_dy.sum(0), (sq_dy.sum(1) * sq_x.sum(1)).sum())
    col, row, trace = (torch.zeros(features, device=dev), torch.zeros(features + 5, device=dev),
                       torch.zeros(1, device=dev))  # fmt: skip
    tok = ops.accumulate_input_stats(x, mask, col, backend="triton")
    ops.accumulate_grad_stats(dy, mask, tok, row, trace, backend="triton")
    for got, ref, name in zip((col, tok, row, trace[0]), want, ("col", "tok", "row", "trace")):
        _close(got.cpu(), ref.cpu(), f"triton cuda {name}")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_fisher_exact_triton_on_device(dtype):
    dy, x = _data(300, 257, dtype, 0.5).cuda(), _data(300, 129, dtype).cuda()
    mask = _mask("random", 300).cuda()
    diag = torch.rand(257, 129, device="cuda")
    want = diag.double() + _ref_sq(dy, mask).t() @ x.double().square()
    ops.accumulate_fisher_exact(dy, x, mask, diag, backend="triton")
    _close(diag, want, "fisher_exact cuda")
    cpu_diag = torch.zeros(257, 129)  # accumulator on the host
    ops.accumulate_fisher_exact(dy, x, mask, cpu_diag, backend="triton")
    want_host = (_ref_sq(dy, mask).t() @ x.double().square()).cpu()
    _close(cpu_diag, want_host, "fisher_exact host accumulator")


# ---- whole pass: the same report from every backend ----------------------------------------


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "torch"])
@pytest.mark.parametrize("kind", ["bert", "llama"])
@pytest.mark.parametrize("estimator", ["activation", "fisher", "fisher_exact"])
def test_analyze_same_report_on_every_backend(backend, kind, estimator):
    model, data = MODELS[kind](), batches(kind, n=2)
    want = slora.analyze(model, data, estimator=estimator, progress=False, backend="torch")
    got = slora.analyze(model, data, estimator=estimator, progress=False, backend=backend)
    assert got.num_tokens == want.num_tokens
    assert list(got.modules) == list(want.modules)
    for name, ref in want.modules.items():
        row = got.modules[name]
        assert row["effrank"] == ref["effrank"], name
        for key in ("global", "topk", "local", "score"):
            assert row[key] == pytest.approx(ref[key], rel=1e-4, abs=1e-12), (name, key)
