"""Triton kernels of the sensitivity statistics (backend ``triton``: CUDA, or the CPU under
``TRITON_INTERPRET=1``); semantics in ``reference.py``, arguments checked by the registered ops.

Triton design.  One streaming kernel, ``_sq_stats_kernel``, serves both sides: it reads its
tensor once and produces column sums of squares, per-token sums of squares and, optionally, the
dot product of those per-token sums with a weight vector (the trace term, weights = ‖x_t‖²).
Programs own a [token split × column block] tile; partial results go to small fp32 workspaces
that are summed in a fixed order, so results are deterministic (no atomics).  ``fisher_exact``
is a Triton GEMM that squares (and masks) its operand tiles in registers after loading them, so
dY∘dY and X∘X never exist in memory.

Against cuBLAS (reasoned, not yet measured on a GPU): the torch path squares into two fp32
temporaries and runs an fp32 SGEMM (no TF32 by default, ~67 TFLOP/s on an H200); the fused
kernel multiplies on tensor cores with ``tf32x3`` (fp32-level accuracy at ~1/3 of the TF32 rate,
~165 TFLOP/s), so it should win ~2× on large shapes (T = d_out = d_in = 4096: 137 GFLOP) when
it reaches ~60% of that rate.  cuBLAS with TF32 allowed would be faster again, but its ~1e-3
relative error fails the fp32 contract.  Long-T, small-matrix shapes would want split-K (not
done: ``fisher_exact`` is the validation estimator).  The streaming stats kernel is followed by
up to three tiny torch reductions of its workspaces (a few µs each), which matter only next to
the ~14 µs bandwidth floor of e.g. an 8192×4096 bf16 tensor on an H200.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only without triton
    triton = None

if triton is not None:

    @triton.jit
    def _sq_stats_kernel(
        x_ptr,
        mask_ptr,
        w_ptr,
        col_ptr,
        tok_ptr,
        dot_ptr,
        T,
        D,
        stride_t,
        stride_d,
        tokens_per_split,
        HAS_MASK: tl.constexpr,
        HAS_W: tl.constexpr,
        WRITE_TOK: tl.constexpr,
        COL_DIRECT: tl.constexpr,
        BLOCK_T: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        """One [token split × column block] tile: Σ_t x², Σ_d x² per token, Σ_t w_t Σ_d x².

        Column partials go to ``col_ptr[pid_s, :]`` (or are added in place when there is a
        single split), token partials to ``tok_ptr[pid_d, :]``, the weighted dot to
        ``dot_ptr[pid_s, pid_d]``.  Masked and out-of-range rows load as 0.
        """
        pid_d = tl.program_id(0)
        pid_s = tl.program_id(1)
        n_dblocks = tl.num_programs(0)
        cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
        col_ok = cols < D
        col_off = cols.to(tl.int64) * stride_d
        col_acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        dot_acc = tl.zeros([BLOCK_T], dtype=tl.float32)
        t_start = pid_s * tokens_per_split
        t_end = tl.minimum(t_start + tokens_per_split, T)
        for t0 in range(t_start, t_end, BLOCK_T):
            rows = t0 + tl.arange(0, BLOCK_T)
            in_range = rows < t_end
            keep = in_range
            if HAS_MASK:
                keep = keep & (tl.load(mask_ptr + rows, mask=in_range, other=0) != 0)
            ptrs = x_ptr + rows.to(tl.int64)[:, None] * stride_t + col_off[None, :]
            v = tl.load(ptrs, mask=keep[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
            sq = v * v
            col_acc += tl.sum(sq, axis=0)
            tok = tl.sum(sq, axis=1)
            if WRITE_TOK:
                tl.store(tok_ptr + pid_d.to(tl.int64) * T + rows, tok, mask=in_range)
            if HAS_W:
                dot_acc += tok * tl.load(w_ptr + rows, mask=keep, other=0.0)
        if COL_DIRECT:
            old = tl.load(col_ptr + cols, mask=col_ok, other=0.0)
            tl.store(col_ptr + cols, old + col_acc, mask=col_ok)
        else:
            tl.store(col_ptr + pid_s.to(tl.int64) * D + cols, col_acc, mask=col_ok)
        if HAS_W:
            tl.store(dot_ptr + pid_s * n_dblocks + pid_d, tl.sum(dot_acc, axis=0))

    @triton.jit
    def _fisher_exact_kernel(
        dy_ptr,
        x_ptr,
        mask_ptr,
        out_ptr,
        T,
        n_out,
        D,
        stride_dy_t,
        stride_dy_o,
        stride_x_t,
        stride_x_d,
        stride_out_o,
        stride_out_d,
        HAS_MASK: tl.constexpr,
        PRECISION: tl.constexpr,
        GROUP_O: tl.constexpr,
        BLOCK_O: tl.constexpr,
        BLOCK_D: tl.constexpr,
        BLOCK_T: tl.constexpr,
    ):
        """out[o, d] += Σ_t m_t dy[t, o]² x[t, d]²: a GEMM over tokens whose operand tiles are
        upcast to fp32, squared and masked in registers (never stored squared)."""
        pid = tl.program_id(0)
        n_o = tl.cdiv(n_out, BLOCK_O)
        n_d = tl.cdiv(D, BLOCK_D)
        # Grouped tile order: consecutive programs share dy tiles in L2.
        per_group = GROUP_O * n_d
        first_o = (pid // per_group) * GROUP_O
        group_size = tl.minimum(n_o - first_o, GROUP_O)
        pid_o = first_o + (pid % per_group) % group_size
        pid_d = (pid % per_group) // group_size
        offs_o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
        offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
        o_ok = offs_o < n_out
        d_ok = offs_d < D
        acc = tl.zeros([BLOCK_O, BLOCK_D], dtype=tl.float32)
        for t0 in range(0, T, BLOCK_T):
            rows = t0 + tl.arange(0, BLOCK_T)
            keep = rows < T
            if HAS_MASK:
                keep = keep & (tl.load(mask_ptr + rows, mask=rows < T, other=0) != 0)
            rows64 = rows.to(tl.int64)
            a = tl.load(
                dy_ptr + offs_o.to(tl.int64)[:, None] * stride_dy_o + rows64[None, :] * stride_dy_t,
                mask=o_ok[:, None] & keep[None, :],
                other=0.0,
            ).to(tl.float32)
            b = tl.load(
                x_ptr + rows64[:, None] * stride_x_t + offs_d.to(tl.int64)[None, :] * stride_x_d,
                mask=keep[:, None] & d_ok[None, :],
                other=0.0,
            ).to(tl.float32)
            acc = tl.dot(a * a, b * b, acc, input_precision=PRECISION)
        out_ptrs = (
            out_ptr
            + offs_o.to(tl.int64)[:, None] * stride_out_o
            + offs_d.to(tl.int64)[None, :] * stride_out_d
        )
        out_mask = o_ok[:, None] & d_ok[None, :]
        tl.store(out_ptrs, tl.load(out_ptrs, mask=out_mask, other=0.0) + acc, mask=out_mask)


def _require_triton() -> None:
    if triton is None:
        raise RuntimeError("the 'triton' backend needs the triton package (pip install triton)")


@functools.cache
def _parallel_slots(device: torch.device) -> int:
    """How many programs keep the device busy (a few per SM on CUDA; few in the interpreter)."""
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def _sq_stats_launch(
    x: Tensor,
    row_mask: Tensor | None,
    col_sq: Tensor,
    weights: Tensor | None,
    want_tokens: bool,
    block_t: int | None = None,
    block_d: int | None = None,
    splits: int | None = None,
) -> tuple[Tensor | None, Tensor | None]:
    """Launch ``_sq_stats_kernel``; adds Σ_t x² into ``col_sq`` and returns
    (per-token Σ_d x² or None, Σ_t w_t Σ_d x² as a 1-element fp32 tensor or None)."""
    _require_triton()
    T, D = x.shape
    dev = x.device
    if T == 0 or D == 0:
        tok = torch.zeros(T, dtype=torch.float32, device=dev) if want_tokens else None
        dot = torch.zeros(1, dtype=torch.float32, device=dev) if weights is not None else None
        return tok, dot
    block_d = block_d or min(256, triton.next_power_of_2(D))
    block_t = block_t or max(1, min(64, 8192 // block_d))
    n_dblocks = triton.cdiv(D, block_d)
    t_blocks = triton.cdiv(T, block_t)
    if splits is None:
        splits = triton.cdiv(_parallel_slots(dev), n_dblocks)
    splits = max(1, min(splits, t_blocks))
    tokens_per_split = triton.cdiv(t_blocks, splits) * block_t
    splits = triton.cdiv(T, tokens_per_split)
    col_direct = splits == 1 and col_sq.is_contiguous()
    col_out = col_sq if col_direct else torch.empty(splits, D, dtype=torch.float32, device=dev)
    tok = torch.empty(n_dblocks, T, dtype=torch.float32, device=dev) if want_tokens else None
    dot = (
        torch.empty(splits, n_dblocks, dtype=torch.float32, device=dev)
        if weights is not None
        else None
    )
    mask_u8 = row_mask.contiguous().view(torch.uint8) if row_mask is not None else None
    dummy = col_out
    _sq_stats_kernel[(n_dblocks, splits)](
        x,
        mask_u8 if mask_u8 is not None else dummy,
        weights if weights is not None else dummy,
        col_out,
        tok if tok is not None else dummy,
        dot if dot is not None else dummy,
        T,
        D,
        x.stride(0),
        x.stride(1),
        tokens_per_split,
        HAS_MASK=mask_u8 is not None,
        HAS_W=weights is not None,
        WRITE_TOK=want_tokens,
        COL_DIRECT=col_direct,
        BLOCK_T=block_t,
        BLOCK_D=block_d,
        num_warps=4,
    )
    if not col_direct:
        col_sq += col_out.sum(dim=0)
    if tok is not None:
        tok = tok[0] if n_dblocks == 1 else tok.sum(dim=0)
    if dot is not None:
        dot = dot.sum().reshape(1)
    return tok, dot


def input_stats(x: Tensor, row_mask: Tensor | None, col_sq: Tensor, **launch: int) -> Tensor:
    """Triton ``input_stats``: one read of ``x`` (``launch`` overrides block sizes / splits)."""
    tok, _ = _sq_stats_launch(x, row_mask, col_sq, None, True, **launch)
    return tok


def grad_stats(
    dy: Tensor,
    row_mask: Tensor | None,
    x_token_sq: Tensor,
    row_sq: Tensor,
    trace: Tensor,
    **launch: int,
) -> None:
    """Triton ``grad_stats``: one read of ``dy``, the trace term fused."""
    _, dot = _sq_stats_launch(dy, row_mask, row_sq, x_token_sq.contiguous(), False, **launch)
    trace += dot.reshape(trace.shape)


def fisher_exact(
    dy: Tensor,
    x: Tensor,
    row_mask: Tensor | None,
    diag: Tensor,
    *,
    precision: str | None = None,
    block_o: int | None = None,
    block_d: int | None = None,
    block_t: int | None = None,
) -> None:
    """Triton ``fisher_exact``: one fused GEMM, no squared copies.

    ``precision`` is the fp32 ``tl.dot`` input precision: ``"tf32x3"`` (default on CUDA, fp32
    accuracy on tensor cores), ``"ieee"`` or ``"tf32"``.  A ``diag`` on another device (e.g.
    the CPU) receives the batch's contribution computed on ``dy``'s device.
    """
    _require_triton()
    T, n_out = dy.shape
    D = x.shape[1]
    if T == 0 or n_out == 0 or D == 0:
        return
    on_device = diag.device == dy.device
    out = diag if on_device else torch.zeros(n_out, D, dtype=torch.float32, device=dy.device)
    if precision is None:
        precision = "tf32x3" if dy.device.type == "cuda" else "ieee"
    block_o = block_o or min(128, max(16, triton.next_power_of_2(n_out)))
    block_d = block_d or min(128, max(16, triton.next_power_of_2(D)))
    block_t = block_t or min(32, max(16, triton.next_power_of_2(T)))
    grid = (triton.cdiv(n_out, block_o) * triton.cdiv(D, block_d),)
    mask_u8 = row_mask.contiguous().view(torch.uint8) if row_mask is not None else None
    _fisher_exact_kernel[grid](
        dy,
        x,
        mask_u8 if mask_u8 is not None else out,
        out,
        T,
        n_out,
        D,
        dy.stride(0),
        dy.stride(1),
        x.stride(0),
        x.stride(1),
        out.stride(0),
        out.stride(1),
        HAS_MASK=mask_u8 is not None,
        PRECISION=precision,
        GROUP_O=8,
        BLOCK_O=block_o,
        BLOCK_D=block_d,
        BLOCK_T=block_t,
        num_warps=8 if block_o * block_d >= 128 * 128 else 4,
    )
    if not on_device:
        diag += out.to(diag.device)
