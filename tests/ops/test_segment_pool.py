"""segment_pool (docs/ops.md §1.5): every backend against the float64 oracle, gradients included.

The Triton backend's interpreter tests live in test_segment_ops_triton.py.
"""

from __future__ import annotations

import functools

import pytest
import torch

from agiformer_kernels import BackendError, backends, segment_pool
from agiformer_kernels.ops.segment_pool.reference import naive_segment_pool, segment_pool_reference
from tests.ops.test_sliding_window_attention import one_thread
from tests.utils import assert_close


def lengths_of(kind: str, B: int, L: int) -> list[int]:
    """Segment lengths over B rows of L positions: "ones" (every segment one position), "rows" (one segment per
    row), "mixed" (random lengths of mean ~4.5, a new segment at each row start)."""
    if kind == "ones":
        return [1] * (B * L)
    if kind == "rows":
        return [L] * B
    g = torch.Generator().manual_seed(L)
    out = []
    for _ in range(B):
        left = L
        while left:
            n = min(left, int(torch.randint(1, 9, (1,), generator=g)))
            out.append(n)
            left -= n
    return out


def offsets_of(lengths: list[int]) -> torch.Tensor:
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)


def make_inputs(Q, H, D, T, dtype, Dv=None, requires_grad=False):
    g = torch.Generator().manual_seed(T * 100 + D)
    q = torch.randn(Q, H, D, generator=g, dtype=torch.float64)
    k = torch.randn(T, H, D, generator=g, dtype=torch.float64)
    v = torch.randn(T, H, Dv or D, generator=g, dtype=torch.float64)
    return [t.to(dtype).requires_grad_(requires_grad) for t in (q, k, v)]


@functools.lru_cache(maxsize=None)
@one_thread()
def _oracle(Q, H, D, Dv, lengths, rounding):
    q, k, v = (t.to(rounding).double().requires_grad_() for t in make_inputs(Q, H, D, sum(lengths), torch.float64, Dv))
    out = naive_segment_pool(q, k, v, offsets_of(list(lengths)))
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    out.backward(grad)
    return out.detach(), grad, (q.grad, k.grad, v.grad)


def oracle(q, k, v, lengths):
    """The naive float64 output for inputs from make_inputs, the upstream gradient, and the input gradients."""
    rounding = q.dtype if q.dtype in (torch.float16, torch.bfloat16) else torch.float64
    return _oracle(q.shape[0], q.shape[1], q.shape[2], v.shape[2], tuple(lengths), rounding)


def test_naive_matches_dense_mask_softmax():
    """The oracle against a dense [S·Q, T] masked softmax (what the kernels avoid)."""
    lengths = lengths_of("mixed", 2, 30)
    q, k, v = make_inputs(3, 2, 8, 60, torch.float64)
    offsets = offsets_of(lengths)
    seg = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    scores = torch.einsum("qhd,thd->hqt", q, k) / 8**0.5  # [H, Q, T]
    mask = seg.view(1, 1, -1) == torch.arange(len(lengths)).view(-1, 1, 1)  # [S, 1, T]
    p = scores.unsqueeze(1).masked_fill(~mask.unsqueeze(0), float("-inf")).softmax(-1)  # [H, S, Q, T]
    dense = torch.einsum("hsqt,thd->sqhd", p, v)
    assert_close("naive vs dense", naive_segment_pool(q, k, v, offsets), dense)


CASES = [  # (Q, H, D, Dv, kind, B, L)
    (1, 2, 16, 16, "ones", 2, 63),
    (4, 2, 16, 16, "rows", 2, 65),
    (3, 3, 32, 24, "mixed", 2, 65),
    (2, 1, 64, 64, "rows", 1, 1),
    (4, 2, 64, 64, "mixed", 1, 1000),
    (2, 2, 8, 8, "rows", 1, 1000),  # one long segment: several blocks of positions
]


def _id(c):
    Q, H, D, Dv, kind, B, L = c
    return f"Q{Q}-H{H}-D{D}-Dv{Dv}-{kind}-B{B}-L{L}"


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("Q,H,D,Dv,kind,B,L", CASES, ids=[_id(c) for c in CASES])
def test_matches_oracle(backend, dtype, Q, H, D, Dv, kind, B, L):
    lengths = lengths_of(kind, B, L)
    q, k, v = make_inputs(Q, H, D, B * L, dtype, Dv, requires_grad=True)
    ref, grad, ref_grads = oracle(q, k, v, lengths)
    out = segment_pool(q, k, v, offsets_of(lengths), backend=backend)
    assert out.dtype == dtype and out.shape == (len(lengths), Q, H, Dv)
    assert_close("out", out, ref)
    out.backward(grad.to(dtype))
    for name, t, g in zip(("queries", "k", "v"), (q, k, v), ref_grads):
        assert_close(f"d{name}", t.grad, g)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reference_low_precision(dtype):
    lengths = lengths_of("mixed", 1, 65)
    q, k, v = make_inputs(2, 2, 16, 65, dtype)
    out = segment_pool(q, k, v, offsets_of(lengths), backend="reference")
    assert out.dtype == dtype
    assert_close("out", out, oracle(q, k, v, lengths)[0])


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_gradcheck(backend):
    lengths = [1, 3, 1, 7, 2]
    q, k, v = make_inputs(2, 2, 5, sum(lengths), torch.float64, requires_grad=True)
    offsets = offsets_of(lengths)
    with one_thread():
        assert torch.autograd.gradcheck(lambda q, k, v: segment_pool(q, k, v, offsets, scale=0.7, backend=backend),
                                        (q, k, v), eps=1e-6, atol=1e-8)


def test_cpu_strided_inputs_and_int64_offsets():
    """k and v as slices of one fused projection, offsets as int64."""
    lengths = lengths_of("mixed", 1, 40)
    fused = torch.randn(40, 2, 32, dtype=torch.float64, requires_grad=True)
    q = torch.randn(3, 2, 16, dtype=torch.float64)
    offsets = offsets_of(lengths).long()
    out = segment_pool(q, fused[..., :16], fused[..., 16:], offsets, backend="cpu")
    ref = naive_segment_pool(q, fused[..., :16], fused[..., 16:], offsets)
    assert_close("out", out, ref)


def test_cpu_declines_half_precision_and_auto_falls_back():
    q, k, v = make_inputs(1, 1, 8, 6, torch.bfloat16)
    offsets = offsets_of([2, 4])
    with pytest.raises(BackendError, match="float32 or float64"):
        segment_pool(q, k, v, offsets, backend="cpu")
    backends._warned.clear()
    with pytest.warns(RuntimeWarning, match="cpu"):
        segment_pool(q, k, v, offsets)


def test_cpu_ops_pass_opcheck_and_compile():
    lengths = [1, 5, 2, 8]
    q, k, v = make_inputs(2, 2, 16, 16, torch.float32, requires_grad=True)
    offsets = offsets_of(lengths)
    segment_pool(q, k, v, offsets, backend="cpu")  # loads the library, its fakes and autograd
    ops = torch.ops.agiformer_kernels
    torch.library.opcheck(ops.segment_pool_fwd, (q, k, v, offsets, 0.25))
    out, lse = ops.segment_pool_fwd(q.detach(), k.detach(), v.detach(), offsets, 0.25)
    torch.library.opcheck(ops.segment_pool_bwd,
                          (torch.randn_like(out), q.detach(), k.detach(), v.detach(), offsets, out, lse, 0.25))

    def fn(q, k, v):
        return segment_pool(q, k, v, offsets, backend="cpu").square().sum()

    eager = fn(q, k, v)
    grads = torch.autograd.grad(eager, (q, k, v))
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")(q, k, v)
    for a, b in zip(torch.autograd.grad(compiled, (q, k, v)), grads):
        assert_close("compiled grad", a, b, tol=1e-6)


def _bad_calls():
    q, k = torch.randn(2, 2, 8), torch.randn(10, 2, 8)
    off = torch.tensor([0, 4, 10], dtype=torch.int32)
    return [
        (lambda: segment_pool(q[0], k, k, off), ValueError, "queries must have 3"),
        (lambda: segment_pool(q, k[:, :1], k, off), ValueError, "k must have shape"),
        (lambda: segment_pool(q, k, k[:5], off), ValueError, "v must have shape"),
        (lambda: segment_pool(q, k.double(), k, off), ValueError, "k has dtype"),
        (lambda: segment_pool(q.long(), k, k, off), TypeError, "queries must be float"),
        (lambda: segment_pool(q, k, k, off.float()), TypeError, "offsets must be an integer"),
        (lambda: segment_pool(q, k, k, off.short()), TypeError, "offsets must be int32 or int64"),
        (lambda: segment_pool(q, k, k, torch.tensor([0], dtype=torch.int32)), ValueError, "offsets must hold"),
        (lambda: segment_pool(q, k, k, torch.tensor([0, 4, 9], dtype=torch.int32)), ValueError, "T = 10"),
        (lambda: segment_pool(q, k, k, torch.tensor([1, 4, 10], dtype=torch.int32)), ValueError, "offsets must run"),
        (lambda: segment_pool(q, k, k, torch.tensor([0, 4, 4, 10], dtype=torch.int32)), ValueError, "empty segments"),
        (lambda: segment_pool(q, k, k, off, scale="x"), TypeError, "scale"),
        (lambda: segment_pool(q, k, k, off, backend="nope"), ValueError, "backend"),
    ]


@pytest.mark.parametrize("i", range(13))
def test_bad_inputs_raise_naming_the_argument(i):
    call, error, match = _bad_calls()[i]
    with pytest.raises(error, match=match):
        call()


def test_reference_never_forms_a_dense_mask():
    """Memory grows with T (the [T, Q, H, Dv] weighted values), not with S·T: 20000 one-position segments."""
    q, k, v = make_inputs(1, 1, 4, 20000, torch.float32)
    out = segment_pool_reference(q, k, v, offsets_of([1] * 20000), scale=0.5)
    assert_close("out", out, v.unsqueeze(1), tol=1e-6)  # one position: the output is its value
