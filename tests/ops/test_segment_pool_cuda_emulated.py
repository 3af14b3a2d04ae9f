"""The CUDA kernels of segment_pool (csrc/segment_pool/segment_pool.cu), run on the CPU.

The source runs under the emulated CUDA runtime of tests/cuda_emulation.py (what that checks and what it
cannot is said there): here the kernels' tiling of a segment's positions, the online softmax, the
backward's per-block dq shares and their sum meet the float64 oracle. The gpu-marked tests at the end run
the real backend.
"""

from __future__ import annotations

import ctypes

import pytest
import torch

from agiformer_kernels import segment_pool
from tests.cuda_emulation import CSRC, for_gcc, load, ptr
from tests.ops.test_segment_pool import lengths_of, make_inputs, offsets_of, oracle
from tests.utils import assert_close, assert_low_precision_close

SOURCE = CSRC / "segment_pool" / "segment_pool.cu"

ENTRY_POINTS = r"""
#include "kernels.cu"
using namespace agf_segpool;
static Rows rows(const void* p, int H, int E) { return {p, (int64_t)H * E, E}; }
extern "C" {
int emu_fwd(int dt, const void* q, const void* k, const void* v, const int32_t* off, void* out, float* lse, int S,
            int Q, int H, int D, int Dv, float scale) {
  FwdParams p{q, rows(k, H, D), rows(v, H, Dv), off, out, lse, S, Q, H, D, Dv, scale};
  return fwd(p, DType(dt), nullptr);
}
int emu_bwd(int dt, const void* go, const void* out, const float* lse, const void* q, const void* k, const void* v,
            const int32_t* off, void* dq, void* dk, void* dv, float* partial, int partials, int S, int Q, int H, int D,
            int Dv, float scale) {
  BwdParams p{go, out, lse, q, rows(k, H, D), rows(v, H, Dv), off, dq, dk, dv, partial, partials, S, Q, H, D, Dv,
              scale};
  return bwd(p, DType(dt), nullptr);
}
}
"""

DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


@pytest.fixture(scope="module")
def kernels(tmp_path_factory):
    return load(tmp_path_factory, SOURCE, ENTRY_POINTS)


def _nan(shape, dtype):
    return torch.full(shape, float("nan"), dtype=dtype)


def run_kernels(kernels, q, k, v, offsets, grad, partials=None):
    """out, lse, (dq, dk, dv) from the emulated forward and backward kernels."""
    dtype, code = q.dtype, DTYPE_CODE[q.dtype]
    (Q, H, D), (T, _, Dv), S = q.shape, v.shape, offsets.numel() - 1
    scale = D**-0.5
    out, lse = _nan((S, Q, H, Dv), dtype), _nan((S, Q, H), torch.float32)
    assert kernels.emu_fwd(code, ptr(q), ptr(k), ptr(v), ptr(offsets), ptr(out), ptr(lse), S, Q, H, D, Dv,
                           ctypes.c_float(scale)) == 0
    partials = min(S, 512) if partials is None else partials
    grad_out = grad.to(dtype).contiguous()
    dq, dk, dv = _nan((Q, H, D), dtype), _nan((T, H, D), dtype), _nan((T, H, Dv), dtype)
    partial = _nan((partials, Q, H, D), torch.float32)
    assert kernels.emu_bwd(code, ptr(grad_out), ptr(out), ptr(lse), ptr(q), ptr(k), ptr(v), ptr(offsets), ptr(dq),
                           ptr(dk), ptr(dv), ptr(partial), partials, S, Q, H, D, Dv, ctypes.c_float(scale)) == 0
    return out, lse, (dq, dk, dv)


CASES = [  # (dtype, Q, H, D, Dv, kind, B, L)
    (torch.float32, 1, 2, 16, 16, "ones", 1, 33),
    (torch.float32, 4, 2, 16, 16, "rows", 2, 65),  # segments of 65: three position tiles
    (torch.float32, 3, 3, 32, 24, "mixed", 1, 65),
    (torch.float32, 16, 1, 128, 128, "mixed", 1, 40),  # largest Q and head dims: > 48 KiB of shared memory
    (torch.bfloat16, 2, 2, 64, 64, "mixed", 1, 65),
    (torch.float16, 4, 2, 32, 32, "rows", 2, 65),
]


def _id(c):
    dtype, Q, H, D, Dv, kind, B, L = c
    return f"Q{Q}-H{H}-D{D}-Dv{Dv}-{kind}-B{B}-L{L}-{str(dtype)[6:]}"


@pytest.mark.parametrize("dtype,Q,H,D,Dv,kind,B,L", CASES, ids=[_id(c) for c in CASES])
def test_cuda_kernels_emulated_match_oracle(kernels, dtype, Q, H, D, Dv, kind, B, L):
    lengths = lengths_of(kind, B, L)
    q, k, v = make_inputs(Q, H, D, B * L, dtype, Dv)
    offsets = offsets_of(lengths)
    ref, grad, ref_grads = oracle(q, k, v, lengths)
    out, lse, grads = run_kernels(kernels, q, k, v, offsets, grad)
    scores = torch.einsum("qhd,thd->tqh", q.double(), k.double()) * D**-0.5
    seg = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    ref_lse = torch.zeros(len(lengths), Q, H, dtype=torch.float64).index_add(0, seg, scores.exp()).log()
    assert_close("lse", lse, ref_lse, tol=1e-5 if dtype == torch.float32 else 1e-2)
    if dtype == torch.float32:
        assert_close("out", out, ref)
        for name, got, want in zip(("queries", "k", "v"), grads, ref_grads):
            assert_close(f"d{name}", got, want)
        return
    # the kernels keep everything but their inputs and outputs in fp32: the reference's own error bound
    qs, ks, vs = (t.clone().requires_grad_() for t in (q, k, v))
    same = segment_pool(qs, ks, vs, offsets, backend="reference")
    same.backward(grad.to(dtype))
    assert_low_precision_close("out", out, ref, same)
    for name, got, want, s in zip(("queries", "k", "v"), grads, ref_grads, (qs, ks, vs)):
        assert_low_precision_close(f"d{name}", got, want, s.grad)


def test_backward_blocks_walk_several_segments(kernels):
    """Fewer blocks than segments (as beyond 512 segments): each block sums the dq of several, in any split."""
    lengths = lengths_of("mixed", 1, 40)
    q, k, v = make_inputs(2, 1, 8, 40, torch.float32)
    offsets = offsets_of(lengths)
    _, grad, ref_grads = oracle(q, k, v, lengths)
    for partials in (1, 3, len(lengths)):
        _, _, grads = run_kernels(kernels, q, k, v, offsets, grad, partials=partials)
        for name, got, want in zip(("queries", "k", "v"), grads, ref_grads):
            assert_close(f"d{name} ({partials} blocks)", got, want)


def test_emulation_sees_every_launch():
    assert for_gcc(SOURCE.read_text()).count("emu_launch(") == 3  # forward, backward, dq sum


GPU_CASES = [(dt, Q, D, kind, L) for dt in (torch.float32, torch.float16, torch.bfloat16)
             for Q, D, kind, L in [(1, 16, "ones", 63), (4, 64, "mixed", 1000), (2, 128, "rows", 65)]]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,Q,D,kind,L", GPU_CASES, ids=[f"Q{c[1]}-D{c[2]}-{c[3]}-L{c[4]}-{str(c[0])[6:]}"
                                                              for c in GPU_CASES])
def test_cuda_backend_matches_oracle(dtype, Q, D, kind, L):
    H, B = 2, 2
    lengths = lengths_of(kind, B, L)
    q, k, v = make_inputs(Q, H, D, B * L, dtype)
    ref, grad, ref_grads = oracle(q, k, v, lengths)
    offsets = offsets_of(lengths).cuda()
    qc, kc, vc = (t.cuda().requires_grad_() for t in (q, k, v))
    out = segment_pool(qc, kc, vc, offsets, backend="cuda")
    out.backward(grad.to(device="cuda", dtype=dtype))
    if dtype == torch.float32:
        assert_close("out", out.cpu(), ref)
        for name, t, g in zip(("queries", "k", "v"), (qc, kc, vc), ref_grads):
            assert_close(f"d{name}", t.grad.cpu(), g)
        return
    qs, ks, vs = (t.clone().requires_grad_() for t in (q, k, v))
    same = segment_pool(qs, ks, vs, offsets.cpu(), backend="reference")
    same.backward(grad.to(dtype))
    assert_low_precision_close("out", out.cpu(), ref, same)
    for name, t, g, s in zip(("queries", "k", "v"), (qc, kc, vc), ref_grads, (qs, ks, vs)):
        assert_low_precision_close(f"d{name}", t.grad.cpu(), g, s.grad)


@pytest.mark.gpu
def test_cuda_ops_pass_opcheck():
    q, k, v = make_inputs(2, 2, 16, 16, torch.float32)
    q, k, v = q.cuda(), k.cuda(), v.cuda()
    offsets = offsets_of([1, 5, 2, 8]).cuda()
    segment_pool(q, k, v, offsets, backend="cuda")  # loads the library, its fakes and autograd
    ops = torch.ops.agiformer_kernels
    torch.library.opcheck(ops.segment_pool_fwd, (q, k, v, offsets, 0.25))
    out, lse = ops.segment_pool_fwd(q, k, v, offsets, 0.25)
    torch.library.opcheck(ops.segment_pool_bwd, (torch.randn_like(out), q, k, v, offsets, out, lse, 0.25))
