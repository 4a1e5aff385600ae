"""Grouped heterogeneous-rank LoRA (slora.ops.multi_lora / lora_slices) on every backend.

Every backend is checked against a float64 reference computed from the *unpacked* adapters
(so packing is tested too), on awkward shapes: rank 0, ranks and widths that are not
multiples of any block, one token, empty and −1 segments, unsorted tokens, several slices.
Outputs are poisoned before the call so that unwritten elements show.
"""

from __future__ import annotations

import oracles
import pytest
import torch
from conftest import BACKENDS, assert_close, check_into_outputs, generator, make_adapters

from slora import ops
from slora.kernels import multi_lora as ml
from slora.kernels.multi_lora.library import forward_kernel
from slora.ops import PackedAdapters, multi_lora

CASES = {
    # name: (per-slot ranks, d_in, slice sizes, T)
    "mixed": ([(3,), (0,), (17,), (33,), (1,)], 37, [19], 23),
    "qkv": ([(4, 0, 9), (0, 0, 0), (16, 5, 1), None, (20, 20, 2)], 50, [40, 12, 7], 29),
    "one_token": ([(5,), (2,)], 21, [11], 1),
    "blocks": ([(20,), (7,)], 70, [130], 19),  # d_in, d_out, rank past one block
}


def _slots_for(T, K, gen):
    slots = torch.randint(-1, K, (T,), generator=gen)  # unsorted, with −1
    return slots


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
def test_token_slots_fp32_match_float64(backend, case):
    ranks, d_in, sizes, T = CASES[case]
    adapters = make_adapters(ranks, d_in, sizes)
    packed = PackedAdapters.from_list(adapters, d_out=sizes)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(T, d_in, generator=gen)
    slots = _slots_for(T, len(ranks), gen)
    ref = oracles.multi_lora(x, slots, adapters, sizes)
    y = multi_lora(x, slots, packed, backend=backend)
    assert y.shape == (T, sum(sizes)) and y.dtype == torch.float32
    assert_close(y, ref, torch.float32)
    # in place: out += delta, poisoned out (random values: unwritten rows must keep them)
    base = torch.randn(T, sum(sizes), generator=gen)
    out = base.clone()
    assert multi_lora(x, slots, packed, out=out, backend=backend) is out
    assert_close(out, ref + base.double(), torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_x_with_strided_rows(backend):
    """x whose rows are not contiguous (a transposed view, a column slice) gives the same
    result: the backends read it through a contiguous copy, never with the wrong stride."""
    ranks, d_in, sizes, T = CASES["qkv"]
    adapters = make_adapters(ranks, d_in, sizes)
    packed = PackedAdapters.from_list(adapters, d_out=sizes)
    gen = torch.Generator().manual_seed(3)
    slots = _slots_for(T, len(ranks), gen)
    for x in (torch.randn(d_in, T, generator=gen).t(), torch.randn(T, 2 * d_in)[:, ::2]):
        assert x.stride(1) != 1
        assert_close(multi_lora(x, slots, packed, backend=backend),
                     oracles.multi_lora(x, slots, adapters, sizes), torch.float32)  # fmt: skip


def test_slora_backend_environment_variable(monkeypatch):
    """SLORA_BACKEND (read at import) picks the default; the argument wins; a bad value is
    an error naming the variable."""
    from slora.kernels import backend as be

    default = ops.resolve_backend("cpu")
    monkeypatch.setattr(be, "ENV_BACKEND", "torch")
    be._resolve.cache_clear()
    try:
        assert ops.resolve_backend("cpu") == "torch"
        assert ops.resolve_backend(torch.device("cpu"), default) == default
        monkeypatch.setattr(be, "ENV_BACKEND", "fast")
        be._resolve.cache_clear()
        with pytest.raises(ValueError, match="unknown backend 'fast' \\(from SLORA_BACKEND\\)"):
            ops.resolve_backend("cpu")
    finally:
        monkeypatch.undo()
        be._resolve.cache_clear()
    assert ops.resolve_backend("cpu") == default


@pytest.mark.parametrize("backend", BACKENDS)
def test_overwrite_writes_every_element(backend):
    """A fresh output is not zero-filled first: the backend must write every element."""
    ranks, d_in, sizes, T = CASES["qkv"]
    adapters = make_adapters(ranks, d_in, sizes)
    packed = PackedAdapters.from_list(adapters, d_out=sizes)
    x = torch.randn(T, d_in)
    slots = torch.tensor([-1, 1, 3, 0, 4, 2] * 5)[:T]  # −1, all-rank-0 and empty slots
    meta = ml.build_token_meta(slots, packed.max_slots)
    out = torch.full((T, packed.d_out), float("nan"))
    fn = forward_kernel(torch.device("cpu"), backend)
    fn(x, packed.weights(), meta, out, overwrite=True)
    assert_close(out, oracles.multi_lora(x, slots, adapters, sizes), torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(backend, dtype):
    ranks, d_in, sizes, T = CASES["qkv"]
    adapters = make_adapters(ranks, d_in, sizes, dtype=dtype)
    packed = PackedAdapters.from_list(adapters, d_out=sizes)
    x = torch.randn(T, d_in).to(dtype)
    slots = _slots_for(T, len(ranks), torch.Generator().manual_seed(2))
    ref = oracles.multi_lora(x, slots, adapters, sizes)  # from the same rounded inputs
    y = multi_lora(x, slots, packed, backend=backend)
    assert y.dtype == dtype
    assert_close(y, ref, dtype)
    out32 = torch.zeros(T, packed.d_out)  # fp32 output of half inputs
    multi_lora(x, slots, packed, out=out32, backend=backend)
    assert_close(out32, ref, torch.float32 if backend != "triton" else dtype)


@pytest.mark.skipif("cpp" not in BACKENDS, reason="native ops not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("overwrite", [False, True])
def test_cpp_decode_and_prefill_paths(dtype, overwrite):
    """Groups of 1-4 tokens (weights streamed and widened in registers) and of 5-70 tokens
    (weights widened into scratch, 4-token tiles plus a partial one, two chunks), at widths
    past two d_in blocks with ragged vector tails, into an output of the input dtype and
    into an fp32 one."""
    d_in, sizes = 1100, [1000, 37]
    group_sizes = [1, 2, 3, 4, 5, 9, 70]
    ranks = [(13, 6), (1, 0), (4, 9), (64, 3), (7, 7), (2, 17), (5, 1)]
    adapters = make_adapters(ranks, d_in, sizes, dtype=dtype)
    adapters = [[(A / d_in**0.5, B, s) for A, B, s in a] for a in adapters]
    packed = PackedAdapters.from_list(adapters, d_out=sizes)
    gen = torch.Generator().manual_seed(3)
    slots = torch.repeat_interleave(torch.arange(len(group_sizes)), torch.tensor(group_sizes))
    slots = torch.cat([slots, torch.tensor([-1, -1])])
    slots = slots[torch.randperm(len(slots), generator=gen)]
    T = slots.numel()
    x = torch.randn(T, d_in, generator=gen).to(dtype)
    ref = oracles.multi_lora(x, slots, adapters, sizes)
    meta = ml.build_token_meta(slots, packed.max_slots)
    fn = forward_kernel(torch.device("cpu"), "cpp")
    check_into_outputs(lambda out: fn(x, packed.weights(), meta, out, overwrite=overwrite),
                       ref, dtype, overwrite, gen)  # fmt: skip


@pytest.mark.parametrize("backend", BACKENDS)
def test_segments_with_empty_and_none(backend):
    ranks, d_in, sizes, _ = CASES["qkv"]
    adapters = make_adapters(ranks, d_in, sizes)
    packed = PackedAdapters.from_list(adapters, d_out=sizes)
    indptr = torch.tensor([0, 5, 5, 9, 21, 21, 26])  # two empty segments
    seg_slots = torch.tensor([2, 0, -1, 4, 1, 0])
    T = int(indptr[-1])
    x = torch.randn(T, d_in)
    token_slots = torch.repeat_interleave(seg_slots, indptr.diff())
    ref = oracles.multi_lora(x, token_slots, adapters, sizes)
    y = multi_lora(x, None, packed, seg_indptr=indptr, seg_slots=seg_slots, backend=backend)
    assert_close(y, ref, torch.float32)
    # the per-token form of the same batch agrees
    y2 = multi_lora(x, token_slots, packed, backend=backend)
    assert_close(y2, ref, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_tokens_without_adapter_and_no_tokens(backend):
    adapters = make_adapters([(4,), (6,)], 12, [9])
    packed = PackedAdapters.from_list(adapters)
    x = torch.randn(5, 12)
    y = multi_lora(x, torch.full((5,), -1), packed, backend=backend)
    assert torch.equal(y, torch.zeros(5, 9))
    empty = multi_lora(
        torch.randn(0, 12), torch.zeros(0, dtype=torch.long), packed, backend=backend
    )
    assert empty.shape == (0, 9)


@pytest.mark.skipif("cpp" not in BACKENDS, reason="native ops not built")
def test_cpp_threads_do_not_change_the_result():
    # enough work (> 2 × 2^20 multiply-adds) for the kernel to use both threads
    adapters = make_adapters([(8,), (13,), (64,), (1,)], 256, [200])
    packed = PackedAdapters.from_list(adapters)
    x = torch.randn(600, 256)
    slots = torch.randint(-1, 4, (600,))  # groups of ~120 tokens: several chunks each
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = multi_lora(x, slots, packed, backend="cpp")
        torch.set_num_threads(2)
        two = multi_lora(x, slots, packed, backend="cpp")
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)
    assert_close(one, oracles.multi_lora(x, slots, adapters, [200]), torch.float32)


@pytest.mark.skipif("cpp" not in BACKENDS, reason="native ops not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [3, 9, 16, 37, 64, 130])
@pytest.mark.parametrize("overwrite", [False, True])
def test_cpp_one_adapter_split_across_threads(dtype, tokens, overwrite):
    """One adapter serving every token (fewer work items than threads): its slices (a rank-0
    one among them, zeroed when overwriting), then its tokens in tile-aligned parts, are split
    between the threads; every element is written once, by one part, and the result does not
    depend on the thread count.  Sizes give even 3 tokens the > 2 × 2^20 multiply-adds from
    which the kernel wakes a second thread."""
    d_in, sizes = 1024, [8192, 2048, 64]
    adapters = make_adapters([None, (72, 16, 0)], d_in, sizes, dtype=dtype, seed=tokens)
    adapters = [a and [(A / d_in**0.5, B, s) for A, B, s in a] for a in adapters]
    packed = PackedAdapters.from_list(adapters, d_out=sizes)
    gen = generator(f"one adapter {tokens}")
    x = torch.randn(tokens, d_in, generator=gen).to(dtype)
    slots = torch.ones(tokens, dtype=torch.long)
    slots[tokens // 3] = -1  # one token without the adapter, in the middle of the group
    ref = oracles.multi_lora(x, slots, adapters, sizes)
    base = torch.randn(tokens, sum(sizes), generator=gen)
    meta = ml.build_token_meta(slots, packed.max_slots)
    fn = forward_kernel(torch.device("cpu"), "cpp")
    outs = {}
    before = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            out = torch.full_like(base, float("nan")) if overwrite else base.clone()
            outs[threads] = fn(x, packed.weights(), meta, out, overwrite=overwrite)
    finally:
        torch.set_num_threads(before)
    want = ref if overwrite else ref + base.double()
    for threads, out in outs.items():
        assert_close(out, want, torch.float32, what=f"{threads} threads")
    assert torch.equal(outs[1], outs[2]) and torch.equal(outs[1], outs[3])


# --- gradients ------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_multi_lora_gradients_match_plain_autograd(backend):
    ranks, d_in, sizes, T = CASES["qkv"]
    adapters = make_adapters(ranks, d_in, sizes)
    packed = PackedAdapters.from_list(adapters, d_out=sizes)
    packed.A.requires_grad_(True)
    packed.Bt.requires_grad_(True)
    x = torch.randn(T, d_in, requires_grad=True)
    slots = _slots_for(T, len(ranks), torch.Generator().manual_seed(3))
    w = torch.randn(T, packed.d_out)
    (multi_lora(x, slots, packed, backend=backend) * w).sum().backward()

    leaves = [[(A.double().requires_grad_(), B.double().requires_grad_(), s) for A, B, s in a]
              if a is not None else None for a in adapters]  # fmt: skip
    x64 = x.detach().double().requires_grad_()
    (reference_autograd(x64, slots, leaves, sizes) * w.double()).sum().backward()
    assert_close(x.grad, x64.grad, torch.float32)
    for k, a in enumerate(leaves):
        if a is None:
            continue
        for s, (A, B, _) in enumerate(a):
            r, a_off, b_off, _ = packed.host_meta(k)[s]
            if r == 0:
                continue
            gA = packed.A.grad[a_off : a_off + r]
            gB = packed.Bt.grad[b_off : b_off + r * sizes[s]].view(r, sizes[s]).t()
            assert_close(gA, A.grad, torch.float32)
            assert_close(gB, B.grad, torch.float32)


def reference_autograd(x, slots, adapters, sizes):
    rows = []
    for t in range(x.shape[0]):
        k = int(slots[t])
        if k < 0 or adapters[k] is None:
            rows.append(torch.zeros(sum(sizes), dtype=x.dtype))
            continue
        rows.append(torch.cat([s * (B @ (A @ x[t])) for A, B, s in adapters[k]]))
    return torch.stack(rows)


@pytest.mark.parametrize("backend", BACKENDS)
def test_lora_slices_forward_and_gradients(backend):
    d_in, ranks, sizes, scales = 24, [4, 0, 7], [16, 8, 8], [0.5, 2.0, 1.5]
    As = [torch.randn(r, d_in, requires_grad=True) for r in ranks]
    Bs = [torch.randn(d, r, requires_grad=True) for d, r in zip(sizes, ranks)]
    x = torch.randn(2, 5, d_in, requires_grad=True)
    w = torch.randn(2, 5, sum(sizes))
    y = ops.lora_slices(x, As, Bs, scales, backend=backend)
    assert y.shape == (2, 5, sum(sizes))
    (y * w).sum().backward()
    got = [x.grad, *[a.grad for a in As], *[b.grad for b in Bs]]

    xs = x.detach().clone().requires_grad_()
    As2 = [a.detach().clone().requires_grad_() for a in As]
    Bs2 = [b.detach().clone().requires_grad_() for b in Bs]
    plain = torch.cat([s * (xs @ a.t()) @ b.t() for a, b, s in zip(As2, Bs2, scales)], dim=-1)
    torch.testing.assert_close(y, plain, rtol=1e-5, atol=1e-5)
    (plain * w).sum().backward()
    want = [xs.grad, *[a.grad for a in As2], *[b.grad for b in Bs2]]
    for g, h in zip(got, want):
        torch.testing.assert_close(g, h, rtol=1e-5, atol=1e-5)


def test_lora_slices_errors():
    with pytest.raises(ValueError, match="equal length"):
        ops.lora_slices(torch.randn(3, 4), [torch.randn(2, 4)], [], [1.0])
    with pytest.raises(ValueError, match="slice 0"):
        ops.lora_slices(torch.randn(3, 4), [torch.randn(2, 5)], [torch.randn(3, 2)], [1.0])


# --- packing --------------------------------------------------------------------------------


def test_kept_weights_follow_growth_and_rank_changes():
    """weights() is kept between calls (servers read it per layer) but never stale: buffers
    reallocated by growth and a changed largest rank show, and the op computes with them."""
    packed = PackedAdapters(8, 6, max_slots=3)  # no capacity: every load below grows
    assert packed.weights() is packed.weights()
    adapters = [None, None, None]
    for slot, r in ((0, 2), (1, 5)):
        adapters[slot] = (torch.randn(r, 8), torch.randn(6, r), 0.5)
        packed.load(slot, adapters[slot])
        w = packed.weights()
        assert w.A is packed.A and w.Bt is packed.Bt and w.max_rank == r
    packed.unload(1)
    adapters[1] = None
    assert packed.weights().max_rank == 2
    x, slots = torch.randn(5, 8), torch.tensor([0, 1, 0, -1, 2])
    want = oracles.multi_lora(x, slots, [a and [a] for a in adapters], [6])
    for be in BACKENDS:
        assert_close(multi_lora(x, slots, packed, backend=be), want, torch.float32)


def test_packing_is_at_true_ranks_and_rank_zero_is_free():
    adapters = make_adapters([(8, 0), (0, 0), (3, 5)], 10, [6, 4])
    packed = PackedAdapters.from_list(adapters)
    assert packed.A.shape == (8 + 3 + 5, 10)
    assert packed.Bt.numel() == 8 * 6 + 3 * 6 + 5 * 4
    assert packed.nbytes() == (8 * 16 + 3 * 16 + 5 * 14) * 4
    assert packed.ranks.tolist() == [[8, 0], [0, 0], [3, 5]]
    for k, a in enumerate(adapters):
        for got, want in zip(packed.adapter(k), a):
            if want[0].shape[0] == 0:
                assert got is None
            else:
                assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_load_and_unload_touch_only_their_slot():
    adapters = make_adapters([(8,), (4,), (6,)], 10, [6])
    packed = PackedAdapters.from_list(adapters, max_slots=4)
    A_buf = packed.A
    keep = {k: [t.clone() for t in packed.adapter(k)[0][:2]] for k in (0, 2)}
    packed.unload(1)
    assert packed.ranks[1].tolist() == [0]
    new = make_adapters([(3,)], 10, [6], seed=7)[0]
    packed.load(1, new)  # fits in the freed rows: no reallocation
    assert packed.A is A_buf
    for k in (0, 2):
        assert all(torch.equal(a, b) for a, b in zip(packed.adapter(k)[0][:2], keep[k]))
    big = make_adapters([(30,)], 10, [6], seed=8)[0]
    packed.load(3, big)  # needs more room: buffers grow, offsets of others unchanged
    x = torch.randn(9, 10)
    slots = torch.tensor([0, 1, 2, 3, -1, 3, 2, 1, 0])
    want = oracles.multi_lora(x, slots, [adapters[0], new, adapters[2], big], [6])
    assert_close(multi_lora(x, slots, packed, backend="torch"), want, torch.float32)


def test_padded_copy_gives_the_same_result():
    adapters = make_adapters([(8,), (2,), (5,)], 12, [7])
    packed = PackedAdapters.from_list(adapters)
    padded = packed.padded()
    assert padded.ranks.tolist() == [[8], [8], [8]]
    x = torch.randn(6, 12)
    slots = torch.tensor([2, 0, 1, -1, 1, 2])
    torch.testing.assert_close(
        multi_lora(x, slots, padded, backend="torch"), multi_lora(x, slots, packed, backend="torch")
    )


# --- metadata and converters ----------------------------------------------------------------


def test_token_meta_groups_sorted_tokens():
    meta = ml.build_token_meta(torch.tensor([2, -1, 0, 2, 0, 3]), max_slots=4)
    assert meta.group_len.tolist() == [2, 0, 2, 1]
    assert meta.group_start.tolist() == [0, 2, 2, 4]
    assert meta.order[:5].tolist() == [2, 4, 0, 3, 5]  # stable by slot; −1 last


@pytest.mark.skipif("cpp" not in BACKENDS, reason="native ops not built")
@pytest.mark.parametrize("T", [0, 1, 7, 300])
def test_native_token_meta_equals_the_torch_one(monkeypatch, T):
    """Eager CPU calls build the groups with the native counting sort once the extension is
    loaded: the same order, starts and lengths as the torch ops (stable, −1 last)."""
    from slora.kernels import _native

    assert _native.extension() is not None
    slots = torch.randint(-1, 5, (T,), generator=torch.Generator().manual_seed(T))
    native = ml.build_token_meta(slots, max_slots=6)  # slot 5 never used: an empty group
    monkeypatch.setattr(_native, "loaded", lambda: None)
    torch_meta = ml.build_token_meta(slots, max_slots=6)
    for name in ("order", "group_slot", "group_start", "group_len"):
        assert torch.equal(getattr(native, name), getattr(torch_meta, name)), name
    # out-of-range slots: the torch path's ValueError and message, from the native check
    with pytest.raises(ValueError, match=r"every slot must be in \[-1, 6\).*got 6"):
        _native.extension().token_meta(torch.tensor([0, 6]), 6)
    monkeypatch.undo()
    for bad in (6, -2):
        with pytest.raises(ValueError, match=r"token_slots: every slot must be in \[-1, 6\)"):
            ml.build_token_meta(torch.tensor([0, bad, 1]), max_slots=6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_segment_form_with_a_skipped_segment(backend):
    seg_indptr, seg_slots = torch.tensor([0, 3, 4, 8]), torch.tensor([1, -1, 2])
    adapters = make_adapters([(1,), (6,), (2,)], 9, [5])
    packed = PackedAdapters.from_list(adapters)
    x = torch.randn(8, 9)
    y = multi_lora(x, None, packed, seg_indptr=seg_indptr, seg_slots=seg_slots, backend=backend)
    token_slots = torch.tensor([1, 1, 1, -1, 2, 2, 2, 2])
    assert_close(y, oracles.multi_lora(x, token_slots, adapters, [5]), torch.float32)


# --- bad input ------------------------------------------------------------------------------


@pytest.fixture
def small():
    packed = PackedAdapters.from_list(make_adapters([(3,), (2,)], 8, [5]))
    return packed, torch.randn(4, 8)


@pytest.mark.parametrize("bad", [torch.tensor([0, 2, 1, 0]), torch.tensor([0, -2, 1, 0])])
def test_slot_out_of_range(small, bad):
    packed, x = small
    with pytest.raises(ValueError, match=r"token_slots.*\[-1, 2\)"):
        multi_lora(x, bad, packed)


def test_mismatched_sizes(small):
    packed, x = small
    with pytest.raises(ValueError, match="token_slots must be 1-D with one slot per token"):
        multi_lora(x, torch.tensor([0, 1]), packed)
    with pytest.raises(ValueError, match=r"x must be \[tokens, 8\]"):
        multi_lora(torch.randn(4, 7), torch.zeros(4, dtype=torch.long), packed)
    with pytest.raises(ValueError, match="dtype"):
        multi_lora(x.double(), torch.zeros(4, dtype=torch.long), packed)
    with pytest.raises(ValueError, match=r"out must be \[4, 5\]"):
        multi_lora(x, torch.zeros(4, dtype=torch.long), packed, out=torch.zeros(4, 6))
    with pytest.raises(ValueError, match="integer"):
        multi_lora(x, torch.zeros(4), packed)
    with pytest.raises(ValueError, match=r"B must be \[5, 3\]"):
        PackedAdapters.from_list([(torch.randn(3, 8), torch.randn(5, 2), 1.0)])
    with pytest.raises(IndexError, match="slot 2 out of range"):
        packed.load(2, None)


@pytest.mark.parametrize(
    "indptr, slots",
    [
        (torch.tensor([0, 2, 3]), torch.tensor([0, 1])),  # ends before the last token
        (torch.tensor([0, 3, 2, 4]), torch.tensor([0, 1, 0])),  # decreasing
        (torch.tensor([1, 4]), torch.tensor([0])),  # does not start at 0
    ],
)
def test_segments_must_cover_the_tokens(small, indptr, slots):
    packed, x = small
    with pytest.raises(ValueError, match="segments must cover the tokens"):
        multi_lora(x, None, packed, seg_indptr=indptr, seg_slots=slots)


def test_segment_argument_errors(small):
    packed, x = small
    with pytest.raises(ValueError, match="seg_slots must have length 2"):
        multi_lora(x, None, packed, seg_indptr=torch.tensor([0, 2, 4]), seg_slots=torch.tensor([0]))
    with pytest.raises(ValueError, match="seg_slots.*\\[-1, 2\\)"):
        multi_lora(x, None, packed, seg_indptr=torch.tensor([0, 4]), seg_slots=torch.tensor([5]))
    with pytest.raises(ValueError, match="not both"):
        multi_lora(
            x,
            torch.zeros(4, dtype=torch.long),
            packed,
            seg_indptr=torch.tensor([0, 4]),
            seg_slots=torch.tensor([0]),
        )
    with pytest.raises(ValueError, match="token_slots is required"):
        multi_lora(x, None, packed)


# --- CUDA -----------------------------------------------------------------------------------


def _cuda_case(dtype):
    ranks, d_in, sizes, T = CASES["qkv"]
    adapters = make_adapters(ranks, d_in, sizes, dtype=dtype)
    packed = PackedAdapters.from_list(adapters, d_out=sizes, device="cuda")
    x = torch.randn(T, d_in).to(dtype)
    slots = _slots_for(T, len(ranks), torch.Generator().manual_seed(4))
    return packed, x.cuda(), slots.cuda(), oracles.multi_lora(x, slots, adapters, sizes)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_triton_in_a_cuda_graph(dtype):
    """On a GPU: metadata + Triton kernels captured in a CUDA graph (no host sync) and replayed."""
    packed, x, slots, ref = _cuda_case(dtype)
    out = torch.zeros(x.shape[0], packed.d_out, dtype=dtype, device="cuda")
    multi_lora(x, slots, packed, out=out, backend="triton")  # warm-up / compile
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        multi_lora(x, slots, packed, out=out, backend="triton")
    out.zero_()
    graph.replay()
    torch.cuda.synchronize()
    assert_close(out.cpu(), ref, dtype)
