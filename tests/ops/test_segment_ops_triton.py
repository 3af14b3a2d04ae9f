"""The Triton backends of entropy_segments, segment_pool and vq_nearest: through the interpreter on CPU tensors,
natively (gpu-marked) on CUDA tensors. Shapes stay small for the interpreter but odd on purpose."""

from __future__ import annotations

import pytest
import torch

from agiformer_kernels import entropy_segments, segment_pool, vq_nearest
from agiformer_kernels.backends import triton_unavailable
from agiformer_kernels.ops.entropy_segments.reference import naive_entropy, naive_starts
from tests.ops.test_entropy_segments import make_logits
from tests.ops.test_segment_pool import lengths_of, make_inputs, offsets_of, oracle
from tests.ops.test_vq_nearest import assert_nearest
from tests.ops.test_vq_nearest import make_inputs as make_vq
from tests.utils import assert_close, assert_low_precision_close

pytest.importorskip("triton")

NO_INTERPRETER = pytest.mark.skipif(triton_unavailable("cpu") is not None, reason=str(triton_unavailable("cpu")))
DEVICES = [pytest.param("cpu", marks=NO_INTERPRETER), pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("B,L,V,masked", [(2, 1, 256, False), (1, 65, 257, True), (1, 40, 2000, False)])
def test_entropy_triton(device, B, L, V, masked):
    x = make_logits(B, L, V, torch.float32, masked).to(device)
    entropy, starts = entropy_segments(x, rule="delta", threshold=4.0, delta=0.2, max_len=6, backend="triton")
    assert entropy.dtype == torch.float32
    assert_close("entropy", entropy.cpu(), naive_entropy(x.cpu().double()))
    assert torch.equal(starts.cpu(), naive_starts(entropy.cpu(), rule="delta", threshold=4.0, delta=0.2, max_len=6))
    entropy16, _ = entropy_segments(x.bfloat16(), rule="global", threshold=4.0, backend="triton")
    assert_close("entropy bf16", entropy16.cpu(), naive_entropy(x.cpu().bfloat16().double()), tol=1e-5)


POOL_CASES = [(1, 2, 16, 16, "ones", 1, 33), (3, 2, 32, 24, "mixed", 2, 65), (4, 1, 64, 64, "rows", 1, 40)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("Q,H,D,Dv,kind,B,L", POOL_CASES, ids=[f"Q{c[0]}-D{c[2]}-{c[4]}-L{c[6]}" for c in POOL_CASES])
def test_segment_pool_triton(device, dtype, Q, H, D, Dv, kind, B, L):
    lengths = lengths_of(kind, B, L)
    q, k, v = (t.to(device).detach().requires_grad_() for t in make_inputs(Q, H, D, B * L, dtype, Dv))
    offsets = offsets_of(lengths).to(device)
    ref, grad, ref_grads = oracle(q, k, v, lengths)
    out = segment_pool(q, k, v, offsets, backend="triton")
    out.backward(grad.to(device=device, dtype=dtype))
    if dtype == torch.float32:
        assert_close("out", out.cpu(), ref)
        for name, t, g in zip(("queries", "k", "v"), (q, k, v), ref_grads):
            assert_close(f"d{name}", t.grad.cpu(), g)
        return
    qs, ks, vs = (t.detach().clone().requires_grad_() for t in (q, k, v))
    same = segment_pool(qs, ks, vs, offsets, backend="reference")
    same.backward(grad.to(device=device, dtype=dtype))
    assert_low_precision_close("out", out.cpu(), ref, same.cpu())
    for name, t, s, g in zip(("queries", "k", "v"), (q, k, v), (qs, ks, vs), ref_grads):
        assert_low_precision_close(f"d{name}", t.grad.cpu(), g, s.grad.cpu())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("N,K,D", [(1, 1, 8), (65, 77, 24), (100, 130, 70)])
def test_vq_nearest_triton(device, dtype, N, K, D):
    z, codebook = make_vq(N, K, D, dtype)
    index, dist = vq_nearest(z.to(device), codebook.to(device), backend="triton")
    assert_nearest(z, codebook, index.cpu(), dist.cpu())


@pytest.mark.parametrize("device", DEVICES)
def test_vq_nearest_triton_ties(device):
    z, codebook = make_vq(20, 150, 16, torch.float32)
    codebook[70] = codebook[3]
    codebook[130] = codebook[3]
    z[::2] = codebook[3] + 0.01
    index, _ = vq_nearest(z.to(device), codebook.to(device), backend="triton")
    assert bool((index[::2].cpu() == 3).all())
