"""The Triton backend of sliding_window_attention: through the interpreter on CPU tensors, natively
(gpu-marked) on CUDA tensors. Shapes stay small for the interpreter but odd on purpose."""

from __future__ import annotations

import pytest
import torch

from agiformer_kernels import sliding_window_attention, sliding_window_attention_step
from agiformer_kernels.backends import triton_unavailable
from agiformer_kernels.ops.sliding_window_attention.reference import naive_sliding_window_attention
from tests.ops.test_sliding_window_attention import (
    assert_grad_close,
    make_qkv,
    one_thread,
    oracle,
    run_steps,
    shape_id,
)
from tests.utils import assert_close, assert_low_precision_close

pytest.importorskip("triton")

# CPU tensors need the interpreter, which conftest turns on only where there is no GPU
NO_INTERPRETER = pytest.mark.skipif(triton_unavailable("cpu") is not None, reason=str(triton_unavailable("cpu")))
DEVICES = [pytest.param("cpu", marks=NO_INTERPRETER), pytest.param("cuda", marks=pytest.mark.gpu)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [  # (B, L, H, D, window, cu_seqlens)
    (2, 1, 2, 16, 1, None),
    (1, 63, 2, 16, 7, None),
    (1, 65, 2, 32, 64, None),
    (1, 65, 1, 128, 128, None),  # window >= L: causal; the widest head
    (2, 200, 1, 64, 1, None),
    (1, 100, 3, 16, 9, (0, 1, 40, 41, 100)),
    (1, 100, 3, 16, 64, (0, 30, 30, 100)),
]
CASES = [(dev, dt, *s) for dev in ("cpu", "cuda") for dt in DTYPES for s in SHAPES] + [
    ("cpu", torch.float32, 2, 1000, 2, 64, 128, None),
    ("cuda", torch.bfloat16, 2, 1000, 2, 64, 128, None),
    ("cuda", torch.float32, 2, 1000, 2, 64, 1003, None),
]


def _param(case):
    dev, dt, B, L, H, D, W, cu = case
    marks = [pytest.mark.gpu] if dev == "cuda" else [NO_INTERPRETER]
    return pytest.param(*case, marks=marks, id=f"{dev}-" + shape_id(B, L, H, D, W, dt, cu is not None))


@pytest.mark.parametrize("device,dtype,B,L,H,D,window,offsets", [_param(c) for c in CASES])
def test_triton_matches_oracle(device, dtype, B, L, H, D, window, offsets):
    q, k, v = make_qkv(B, L, H, D, dtype, device, requires_grad=True)
    cu = None if offsets is None else torch.tensor(offsets, dtype=torch.int32, device=device)
    ref, grad, ref_grads = oracle(q, k, v, window, cu)
    out = sliding_window_attention(q, k, v, window, cu_seqlens=cu, backend="triton")
    assert out.dtype == dtype
    out.backward(grad.to(device=device, dtype=dtype))
    if dtype == torch.float32:
        assert_close("o", out.cpu(), ref)
        for name, t, g in zip("qkv", (q, k, v), ref_grads):
            assert_grad_close(f"d{name}", t.grad.cpu(), g)
        return
    # docs/ops.md §3 for 16-bit: at most twice the error of the reference run in the same dtype
    qs, ks, vs = (t.detach().clone().requires_grad_() for t in (q, k, v))
    same = sliding_window_attention(qs, ks, vs, window, cu_seqlens=cu, backend="reference")
    same.backward(grad.to(device=device, dtype=dtype))
    assert_low_precision_close("o", out.cpu(), ref, same.cpu())
    for name, t, s, g in zip("qkv", (q, k, v), (qs, ks, vs), ref_grads):
        if float(g.norm()) == 0.0:
            assert_grad_close(f"d{name}", t.grad.cpu().double(), g)
        else:
            assert_low_precision_close(f"d{name}", t.grad.cpu(), g, s.grad.cpu())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("window", [1, 3, 20])
def test_triton_window_is_exactly_window_keys(device, window):
    L = 20
    q = torch.zeros(1, L, 1, 16, device=device)
    k = torch.randn(1, L, 1, 16, device=device)
    v = torch.eye(L, device=device).view(1, L, 1, L)
    o = sliding_window_attention(q, k, v, window, backend="triton")[0, :, 0].cpu().double()
    i, j = torch.arange(L).view(L, 1), torch.arange(L).view(1, L)
    mask = (j <= i) & (j > i - window)
    assert_close("uniform attention rows", o, mask.double() / mask.sum(1, keepdim=True), tol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_triton_strided_inputs_and_value_dim(device):
    fused = torch.randn(1, 70, 2, 16 + 16 + 24, device=device, requires_grad=True)
    q, k, v = fused[..., :16], fused[..., 16:32], fused[..., 32:]
    twin = fused.detach().cpu().double().requires_grad_()
    with one_thread():
        ref = naive_sliding_window_attention(twin[..., :16], twin[..., 16:32], twin[..., 32:], 11)
        grad = torch.randn_like(ref)
        ref.backward(grad)
    out = sliding_window_attention(q, k, v, 11, backend="triton")
    assert_close("o", out.cpu(), ref)
    out.backward(grad.to(device=device, dtype=out.dtype))
    assert_close("d fused", fused.grad.cpu(), twin.grad)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window,L", [(1, 4), (5, 12), (80, 20)])
def test_triton_step_token_by_token_equals_full_attention(device, dtype, window, L):
    q, k, v = make_qkv(2, L, 3, 16, dtype, device)
    out, cache_k, _ = run_steps(q, k, v, window, "triton", [0, 0])
    full = sliding_window_attention(q, k, v, window, backend="reference")
    assert_close("step outputs", out.cpu(), full.cpu(), tol=1e-6 if dtype == torch.float32 else 1e-2)
    for t in range(max(0, L - window), L):
        assert torch.equal(cache_k[:, t % window], k[:, t])


@pytest.mark.parametrize("device", DEVICES)
def test_triton_step_positions_per_sequence(device):
    window, L, prompts = 6, 5, [0, 3, 11]
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
                                            backend="triton")
        assert_close(f"step {t}", out.cpu(), full[rows, pos].cpu(), tol=1e-6)


def test_triton_ops_pass_opcheck():
    """On the GPU where there is one, else through the interpreter."""
    from agiformer_kernels.ops.sliding_window_attention import triton as swa_triton

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    L = 40
    q, k, v = make_qkv(1, L, 2, 16, torch.float32, dev, requires_grad=True)
    seg_start = torch.zeros(L, dtype=torch.int32, device=dev)
    seg_end = torch.full((L,), L, dtype=torch.int32, device=dev)
    torch.library.opcheck(swa_triton.window_fwd, (q, k, v, seg_start, seg_end, 5, 0.25))
    o, lse = swa_triton.window_fwd(q.detach(), k.detach(), v.detach(), seg_start, seg_end, 5, 0.25)
    torch.library.opcheck(
        swa_triton.window_bwd, (torch.randn_like(o), q.detach(), k.detach(), v.detach(), o, lse, seg_start, seg_end,
                                5, 0.25)
    )
    qs, ks, vs = (torch.randn(2, 2, 16, device=dev) for _ in range(3))
    caches = (torch.randn(2, 5, 2, 16, device=dev), torch.randn(2, 5, 2, 16, device=dev))
    torch.library.opcheck(swa_triton.window_step, (qs, ks, vs, *caches, torch.tensor([3, 9], device=dev), 0.25))
