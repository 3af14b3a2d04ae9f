"""sliding_window_attention (docs/ops.md §1.2) and its decode step: every backend against the float64 oracle.

The Triton backend's interpreter tests live in test_sliding_window_attention_triton.py (slow).
"""

from __future__ import annotations

import contextlib
import functools

import pytest
import torch

from agiformer_kernels import BackendError, sliding_window_attention, sliding_window_attention_step
from agiformer_kernels.ops.sliding_window_attention.reference import (
    naive_sliding_window_attention,
    naive_sliding_window_attention_step,
    sliding_window_attention_reference,
)
from tests.utils import assert_close, assert_low_precision_close

CUDA = pytest.mark.gpu


def make_qkv(B, L, H, D, dtype, device="cpu", Dv=None, requires_grad=False):
    """Inputs drawn in float64 from a generator seeded by the shape, then cast: the same shape in
    another dtype holds the same values up to rounding."""
    g = torch.Generator().manual_seed(L * 1000 + D)
    q, k = (torch.randn(B, L, H, D, generator=g, dtype=torch.float64) for _ in range(2))
    v = torch.randn(B, L, H, Dv or D, generator=g, dtype=torch.float64)
    return [t.to(device=device, dtype=dtype).requires_grad_(requires_grad) for t in (q, k, v)]


@contextlib.contextmanager
def one_thread():
    """Small eager ops (the oracle's loop, gradcheck) run far faster on one thread when the 2 cores
    are shared: OpenMP's hand-offs cost more than the ops."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@functools.lru_cache(maxsize=None)
@one_thread()
def _oracle(B, L, H, D, window, offsets, rounding):
    q, k, v = (t.to(rounding).double().requires_grad_() for t in make_qkv(B, L, H, D, torch.float64))
    cu = None if offsets is None else torch.tensor(offsets, dtype=torch.int32)
    o = naive_sliding_window_attention(q, k, v, window, cu_seqlens=cu)
    grad = torch.randn(o.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    o.backward(grad)
    return o.detach(), grad, (q.grad, k.grad, v.grad)


def oracle(q, k, v, window, cu_seqlens=None):
    """The naive float64 output for inputs from make_qkv, the upstream gradient to use, and the input
    gradients it gives. Cached per shape: the loop over queries is slow and several tests share shapes.
    Half-precision inputs are rounded first; float32 ones are not (their rounding is far below 1e-5)."""
    B, L, H, D = q.shape
    assert v.shape[-1] == D
    rounding = q.dtype if q.dtype in (torch.float16, torch.bfloat16) else torch.float64
    offsets = None if cu_seqlens is None else tuple(cu_seqlens.tolist())
    return _oracle(B, L, H, D, window, offsets, rounding)


def assert_grad_close(name, got, ref):
    """As assert_close; a gradient that is exactly zero in the oracle (window 1, or one key: the output
    is v whatever q and k are) must be zero up to rounding."""
    if float(ref.norm()) == 0.0:
        assert float(got.abs().max()) <= 1e-5, f"{name}: expected zeros, got max {float(got.abs().max()):.3e}"
        return
    assert_close(name, got, ref)


def shape_id(B, L, H, D, W, dtype, cu=False):
    return f"B{B}-L{L}-H{H}-D{D}-W{W}-{str(dtype).split('.')[-1]}" + ("-cu" if cu else "")


# ---------------------------------------------------------------------------------------------
# The window convention, pinned with an explicit mask
# ---------------------------------------------------------------------------------------------

CONVENTION_BACKENDS = [
    "reference",
    "cpu",
    pytest.param("cuda", marks=CUDA),
]


@pytest.mark.parametrize("backend", CONVENTION_BACKENDS)
@pytest.mark.parametrize("window", [1, 3, 8, 20])
def test_window_is_exactly_window_keys(backend, window):
    """q = 0 makes attention uniform over the visible keys and v = identity shows which they are:
    row i must be 1/n on keys i-window < j <= i (n = min(i+1, window) of them) and 0 elsewhere."""
    L = 20
    device = "cuda" if backend == "cuda" else "cpu"
    dtype = torch.float32
    q = torch.zeros(1, L, 1, 16, dtype=dtype, device=device)
    k = torch.randn(1, L, 1, 16, dtype=dtype, device=device)
    v = torch.eye(L, dtype=dtype, device=device).view(1, L, 1, L)
    o = sliding_window_attention(q, k, v, window, backend=backend)[0, :, 0].cpu().double()
    i = torch.arange(L).view(L, 1)
    j = torch.arange(L).view(1, L)
    mask = (j <= i) & (j > i - window)
    assert mask.sum(1).tolist() == [min(r + 1, window) for r in range(L)]
    expected = mask.double() / mask.sum(1, keepdim=True)
    assert_close("uniform attention rows", o, expected, tol=1e-6)


def test_naive_matches_dense_mask_softmax():
    """The oracle itself against softmax over a dense L x L explicit mask (FlashAttention window (w-1, 0))."""
    B, L, H, D, window = 2, 37, 3, 16, 5
    q, k, v = make_qkv(B, L, H, D, torch.float64)
    scores = torch.einsum("bihd,bjhd->bhij", q, k) / D**0.5
    i = torch.arange(L).view(L, 1)
    j = torch.arange(L).view(1, L)
    scores = scores.masked_fill(~((j <= i) & (i - j < window)), float("-inf"))
    dense = torch.einsum("bhij,bjhd->bihd", scores.softmax(-1), v)
    assert_close("naive vs dense mask", naive_sliding_window_attention(q, k, v, window), dense)


# ---------------------------------------------------------------------------------------------
# Reference: the efficient form against the naive oracle
# ---------------------------------------------------------------------------------------------

REFERENCE_SHAPES = [  # (L, window, D): windows 1, small, 64, 128 and >= L at the short lengths
    *[(L, W, D) for L, Ds in [(1, (16,)), (63, (16, 32)), (65, (32, 64))] for W in sorted({1, 7, 64, 128, L + 3})
      for D in Ds],
    *[(1000, W, 64) for W in (1, 128, 1003)],
]


@pytest.mark.parametrize("L,window,D", REFERENCE_SHAPES, ids=[f"L{L}-W{W}-D{D}" for L, W, D in REFERENCE_SHAPES])
def test_reference_matches_naive(L, window, D):
    q, k, v = make_qkv(2, L, 2, D, torch.float64, requires_grad=True)
    ref, grad, ref_grads = oracle(q, k, v, window)
    out = sliding_window_attention_reference(q, k, v, window)
    assert_close("o", out, ref)
    out.backward(grad)
    for name, t, g in zip("qkv", (q, k, v), ref_grads):
        assert_grad_close(f"d{name}", t.grad, g)


CU_SEQLENS = [
    [0, 1, 40, 41, 100],  # one-token sequences between longer ones
    [0, 30, 30, 100],  # an empty sequence
    [0, 100],
]


@pytest.mark.parametrize("offsets", CU_SEQLENS, ids=["short-seqs", "empty-seq", "one-seq"])
@pytest.mark.parametrize("window", [1, 9, 64, 200])
def test_reference_cu_seqlens_matches_naive_and_separate_calls(offsets, window):
    q, k, v = make_qkv(1, 100, 3, 16, torch.float64, requires_grad=True)
    cu = torch.tensor(offsets, dtype=torch.int32)
    # packing means independence: each segment alone gives the same rows as in the pack
    ref, grad, ref_grads = oracle(q, k, v, window, cu)
    out = sliding_window_attention(q, k, v, window, cu_seqlens=cu, backend="reference")
    assert_close("o", out, ref)
    out.backward(grad)
    for name, t, g in zip("qkv", (q, k, v), ref_grads):
        assert_grad_close(f"d{name}", t.grad, g)
    for s, e in zip(offsets[:-1], offsets[1:]):
        if e > s:
            alone = naive_sliding_window_attention(q[:, s:e].detach(), k[:, s:e].detach(), v[:, s:e].detach(), window)
            assert_close(f"segment {s}:{e}", ref[:, s:e], alone)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_reference_low_precision(dtype):
    q, k, v = make_qkv(2, 65, 2, 32, dtype)
    ref, _, _ = oracle(q, k, v, 7)
    out = sliding_window_attention(q, k, v, 7, backend="reference")
    assert out.dtype == dtype
    assert_close("o", out, ref)


def test_reference_value_dim_differs():
    q, k, _ = make_qkv(1, 65, 2, 32, torch.float64)
    v = torch.randn(1, 65, 2, 24, dtype=torch.float64)
    assert_close("o", sliding_window_attention_reference(q, k, v, 9), naive_sliding_window_attention(q, k, v, 9))


# ---------------------------------------------------------------------------------------------
# Kernel backends against the oracle
# ---------------------------------------------------------------------------------------------

KERNEL_CASES = [  # (backend, dtype, B, L, H, D, window, cu_seqlens)
    *[("cpu", dt, 2, L, 2, D, W, None)
      for dt in (torch.float64, torch.float32)
      for L, W, D in [(1, 1, 16), (63, 7, 16), (65, 64, 32), (65, 128, 64), (1000, 128, 64), (1000, 1, 64),
                      (300, 1000, 128), (129, 64, 128)]],
    ("cpu", torch.float32, 2, 1000, 2, 64, 1003, None),  # several key chunks per query block
    ("cpu", torch.float32, 1, 100, 3, 16, 9, [0, 1, 40, 41, 100]),
    ("cpu", torch.float64, 1, 100, 3, 16, 64, [0, 30, 30, 100]),
    *[pytest.param("cuda", dt, 2, L, 2, D, W, cu, marks=CUDA)
      for dt in (torch.float32, torch.float16, torch.bfloat16)
      for L, W, D, cu in [(1, 1, 16, None), (63, 7, 16, None), (65, 64, 32, None), (1000, 128, 64, None),
                          (1000, 1, 64, None), (300, 1000, 128, None), (100, 9, 16, [0, 1, 40, 41, 100])]],
]


def _case_id(c):
    values = c.values if hasattr(c, "values") else c
    backend, dtype, B, L, H, D, W, cu = values
    return f"{backend}-" + shape_id(1 if cu else B, L, H, D, W, dtype, cu is not None)


@pytest.mark.parametrize("backend,dtype,B,L,H,D,window,offsets", KERNEL_CASES, ids=[_case_id(c) for c in KERNEL_CASES])
def test_kernel_matches_oracle(backend, dtype, B, L, H, D, window, offsets):
    device = "cuda" if backend in ("cuda", "triton-gpu") else "cpu"
    B = 1 if offsets else B
    q, k, v = make_qkv(B, L, H, D, dtype, device, requires_grad=True)
    cu = None if offsets is None else torch.tensor(offsets, dtype=torch.int32, device=device)
    ref, grad, ref_grads = oracle(q, k, v, window, cu)
    out = sliding_window_attention(q, k, v, window, cu_seqlens=cu, backend=backend)
    assert out.dtype == dtype and out.device == q.device
    out.backward(grad.to(device=device, dtype=dtype))
    if dtype in (torch.float16, torch.bfloat16):
        # docs/ops.md §3: at most twice the error of the reference run in the same dtype
        qs, ks, vs = (t.detach().clone().requires_grad_() for t in (q, k, v))
        same = sliding_window_attention(qs, ks, vs, window, cu_seqlens=cu, backend="reference")
        same.backward(grad.to(device=device, dtype=dtype))
        assert_low_precision_close("o", out.cpu(), ref, same.cpu())
        # window 1: dq = dk = 0, measured against dv's size (see assert_low_precision_close)
        floor = float(ref_grads[2].norm()) if window == 1 else 0.0
        for name, t, s, g in zip("qkv", (q, k, v), (qs, ks, vs), ref_grads):
            assert_low_precision_close(f"d{name}", t.grad.cpu(), g, s.grad.cpu(), floor if name != "v" else 0.0)
        return
    assert_close("o", out.cpu(), ref)
    for name, t, g in zip("qkv", (q, k, v), ref_grads):
        assert_grad_close(f"d{name}", t.grad.cpu(), g)


def test_cpu_value_dim_differs_and_strided_inputs():
    """q, k, v as slices of one fused projection (non-contiguous), and Dv != D."""
    B, L, H = 2, 130, 3
    fused = torch.randn(B, L, H, 32 + 32 + 24, dtype=torch.float64, requires_grad=True)
    q, k, v = fused[..., :32], fused[..., 32:64], fused[..., 64:]
    assert not q.is_contiguous()
    twin = fused.detach().clone().requires_grad_()
    with one_thread():
        ref = naive_sliding_window_attention(twin[..., :32], twin[..., 32:64], twin[..., 64:], 17)
        grad = torch.randn_like(ref)
        ref.backward(grad)
    out = sliding_window_attention(q, k, v, 17, backend="cpu")
    assert_close("o", out, ref)
    out.backward(grad)
    assert_close("d fused", fused.grad, twin.grad)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("cu", [False, True], ids=["dense", "cu_seqlens"])
def test_gradcheck(backend, cu):
    L = 70  # two query blocks of the C++ kernel, window edges inside both
    q, k, v = make_qkv(1, L, 2, 8, torch.float64, requires_grad=True)
    offsets = torch.tensor([0, 4, 5, 66, L], dtype=torch.int32) if cu else None
    fn = lambda q, k, v: sliding_window_attention(q, k, v, 6, cu_seqlens=offsets, backend=backend)  # noqa: E731
    with one_thread():
        assert torch.autograd.gradcheck(fn, (q, k, v), eps=1e-6, atol=1e-8, fast_mode=True)


def test_cpu_declines_half_precision_and_auto_falls_back():
    q, k, v = make_qkv(1, 10, 1, 16, torch.bfloat16)
    with pytest.raises(BackendError, match="float32 or float64"):
        sliding_window_attention(q, k, v, 4, backend="cpu")
    with pytest.warns(RuntimeWarning, match="cpu"):
        out = sliding_window_attention(q, k, v, 4)
    assert_close("o", out, oracle(q, k, v, 4)[0])


def test_cpu_ops_pass_opcheck():
    q, k, v = make_qkv(1, 70, 2, 16, torch.float32, requires_grad=True)
    seg_start, seg_end = torch.zeros(70, dtype=torch.int32), torch.full((70,), 70, dtype=torch.int32)
    sliding_window_attention(q, k, v, 5, backend="cpu")  # loads the library and registers fake/autograd
    ops = torch.ops.agiformer_kernels
    torch.library.opcheck(ops.sliding_window_attention_fwd, (q, k, v, seg_start, seg_end, 5, 0.25))
    o, lse = ops.sliding_window_attention_fwd(q.detach(), k.detach(), v.detach(), seg_start, seg_end, 5, 0.25)
    torch.library.opcheck(
        ops.sliding_window_attention_bwd, (torch.randn_like(o), q.detach(), k.detach(), v.detach(), o, lse,
                                           seg_start, seg_end, 5, 0.25)
    )
    qs, ks, vs = (torch.randn(2, 2, 16) for _ in range(3))
    caches = (torch.randn(2, 5, 2, 16), torch.randn(2, 5, 2, 16))
    torch.library.opcheck(ops.sliding_window_attention_step, (qs, ks, vs, *caches, torch.tensor([3, 9]), 0.25))


def test_cpu_under_torch_compile():
    class Attention(torch.nn.Module):
        def forward(self, x):
            q, k, v = x.chunk(3, dim=-1)
            return sliding_window_attention(q, k, v, 8, backend="cpu").sum()

    x = torch.randn(1, 50, 2, 48, requires_grad=True)
    eager = Attention()(x)
    eager.backward()
    grad, x.grad = x.grad, None
    compiled = torch.compile(Attention(), fullgraph=True, backend="aot_eager")(x)
    compiled.backward()
    assert_close("compiled", compiled.detach(), eager.detach(), tol=1e-6)
    assert_close("compiled grad", x.grad, grad, tol=1e-6)


# ---------------------------------------------------------------------------------------------
# Input validation
# ---------------------------------------------------------------------------------------------


def _bad_calls():
    q = torch.randn(1, 8, 2, 16)
    return [
        (lambda: sliding_window_attention(q[0], q, q, 4), ValueError, "q must have 4"),
        (lambda: sliding_window_attention(q, q[:, :4], q, 4), ValueError, "k must have shape"),
        (lambda: sliding_window_attention(q, q, q[:, :4], 4), ValueError, "v must have shape"),
        (lambda: sliding_window_attention(q.long(), q, q, 4), TypeError, "q must be float"),
        (lambda: sliding_window_attention(q, q.double(), q, 4), ValueError, "k has dtype"),
        (lambda: sliding_window_attention(q, q, q, 0), ValueError, "window must be >= 1"),
        (lambda: sliding_window_attention(q, q, q, 2.5), TypeError, "window must be an int"),
        (lambda: sliding_window_attention(q, q, q, 4, scale="x"), TypeError, "scale"),
        (lambda: sliding_window_attention(q, q, q, 4, cu_seqlens=torch.tensor([0.0, 8.0])), TypeError, "cu_seqlens"),
        (lambda: sliding_window_attention(q, q, q, 4, cu_seqlens=torch.tensor([0, 5])), ValueError, "cu_seqlens"),
        (lambda: sliding_window_attention(q, q, q, 4, cu_seqlens=torch.tensor([0, 6, 3, 8])), ValueError,
         "cu_seqlens"),
        (lambda: sliding_window_attention(q.expand(2, -1, -1, -1), q.expand(2, -1, -1, -1), q.expand(2, -1, -1, -1),
                                          4, cu_seqlens=torch.tensor([0, 8])), ValueError, "cu_seqlens"),
        (lambda: sliding_window_attention(q, q, q, 4, backend="nope"), ValueError, "backend"),
    ]


@pytest.mark.parametrize("i", range(13))
def test_bad_inputs_raise_naming_the_argument(i):
    call, error, match = _bad_calls()[i]
    with pytest.raises(error, match=match):
        call()


def test_step_bad_inputs():
    q = torch.randn(2, 3, 16)
    cache = torch.zeros(2, 4, 3, 16)
    with pytest.raises(ValueError, match="k_cache"):
        sliding_window_attention_step(q, q, q, cache[:, :, :2], cache, 0)
    with pytest.raises(ValueError, match="v_cache"):
        sliding_window_attention_step(q, q, q, cache, cache[:1], 0)
    with pytest.raises(ValueError, match="pos"):
        sliding_window_attention_step(q, q, q, cache, cache, -1)
    with pytest.raises(TypeError, match="pos"):
        sliding_window_attention_step(q, q, q, cache, cache, 1.0)
    with pytest.raises(ValueError, match="pos"):
        sliding_window_attention_step(q, q, q, cache, cache, torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="k_cache has dtype"):
        sliding_window_attention_step(q, q, q, cache.double(), cache, 0)


# ---------------------------------------------------------------------------------------------
# Decode step
# ---------------------------------------------------------------------------------------------

STEP_BACKENDS = ["reference", "cpu", pytest.param("cuda", marks=CUDA)]


def run_steps(q, k, v, window, backend, starts):
    """Feed [B, L, H, D] token by token; sequence b starts at position starts[b] (a shorter prompt)."""
    B, L, H, D = q.shape
    cache_k = torch.zeros(B, window, H, D, dtype=q.dtype, device=q.device)
    cache_v = torch.zeros(B, window, H, v.shape[-1], dtype=q.dtype, device=q.device)
    outs = []
    for t in range(L):
        pos = torch.tensor([t + s for s in starts], device=q.device) if any(starts) else t
        outs.append(sliding_window_attention_step(q[:, t], k[:, t], v[:, t], cache_k, cache_v, pos, backend=backend))
    return torch.stack(outs, dim=1), cache_k, cache_v


@pytest.mark.parametrize("backend", STEP_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("window,L", [(1, 5), (4, 11), (16, 16), (64, 40)])
def test_step_token_by_token_equals_full_attention(backend, dtype, window, L):
    device = "cuda" if backend == "cuda" else "cpu"
    if backend == "cpu" and dtype == torch.bfloat16:
        pytest.skip("the C++ CPU kernel takes float32/float64 (auto falls back to reference)")
    if backend == "cuda" and dtype == torch.float64:
        pytest.skip("the CUDA kernel takes float16/bfloat16/float32 (auto falls back to reference)")
    q, k, v = make_qkv(2, L, 3, 16, dtype, device)
    out, cache_k, _ = run_steps(q, k, v, window, backend, [0, 0])
    full = sliding_window_attention(q, k, v, window, backend="reference")
    tol = {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 1e-2}[dtype]
    assert_close("step outputs", out.cpu(), full.cpu(), tol=tol)
    # the ring holds exactly the last min(L, window) keys, key t in slot t % window
    for t in range(max(0, L - window), L):
        assert torch.equal(cache_k[:, t % window], k[:, t])


@pytest.mark.parametrize("backend", STEP_BACKENDS)
def test_step_positions_per_sequence(backend):
    """Sequences of one batch at different positions (prompts of different lengths): each sequence's
    prompt is in its ring already, then every call advances all of them by one token."""
    device = "cuda" if backend == "cuda" else "cpu"
    window, L, prompts = 6, 9, [0, 3, 11]
    q, k, v = make_qkv(3, max(prompts) + L, 2, 16, torch.float32, device)
    full = sliding_window_attention(q, k, v, window, backend="reference")
    cache_k = torch.zeros(3, window, 2, 16, device=device)
    cache_v = torch.zeros(3, window, 2, 16, device=device)
    for b, s in enumerate(prompts):
        for p in range(max(0, s - window), s):
            cache_k[b, p % window], cache_v[b, p % window] = k[b, p], v[b, p]
    rows = torch.arange(3, device=device)
    for t in range(L):
        pos = torch.tensor(prompts, device=device) + t
        out = sliding_window_attention_step(q[rows, pos], k[rows, pos], v[rows, pos], cache_k, cache_v, pos,
                                            backend=backend)
        assert_close(f"step {t}", out.cpu(), full[rows, pos].cpu(), tol=1e-6)


def test_step_reference_matches_naive_float64():
    q, k, v = make_qkv(3, 12, 2, 16, torch.float64)
    caches = [torch.randn(3, 5, 2, 16, dtype=torch.float64) for _ in range(2)]
    twins = [c.clone() for c in caches]
    pos = torch.tensor([0, 4, 17])
    for t in range(3):
        a = sliding_window_attention_step(q[:, t], k[:, t], v[:, t], *caches, pos + t, backend="reference")
        b = naive_sliding_window_attention_step(q[:, t], k[:, t], v[:, t], *twins, pos + t)
        assert_close("step", a, b)
    assert torch.equal(caches[0], twins[0]) and torch.equal(caches[1], twins[1])
