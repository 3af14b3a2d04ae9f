"""The CUDA kernels of sliding_window_attention (csrc/.../sliding_window_attention.cu), run on the CPU.

The source runs under the emulated CUDA runtime of tests/cuda_emulation.py (what that checks and what it
cannot, the real exp2f/log2f among them, is said there): here the kernels' indexing, tiling, masking,
online softmax and synchronization points meet the float64 oracle. The real thing runs in the
gpu-marked tests of the other files.
"""

from __future__ import annotations

import ctypes

import pytest
import torch

from agiformer_kernels.ops.sliding_window_attention.reference import (
    naive_sliding_window_attention_step,
    segment_bounds,
)
from tests.cuda_emulation import CSRC, for_gcc, load, ptr
from tests.ops.test_sliding_window_attention import assert_grad_close, make_qkv, oracle, shape_id
from tests.utils import assert_close, assert_low_precision_close

SOURCE = CSRC / "sliding_window_attention" / "sliding_window_attention.cu"

ENTRY_POINTS = r"""
#include "kernels.cu"
using namespace agf_swa;
static Rows rows(void* p, int L, int H, int E) { return {p, (int64_t)L * H * E, (int64_t)H * E, E}; }
extern "C" {
int emu_fwd(int dt, void* q, void* k, void* v, void* o, float* lse, const int32_t* seg, int B, int L, int H, int D,
            int Dv, int window, float scale_log2) {
  FwdParams p{rows(q, L, H, D), rows(k, L, H, D), rows(v, L, H, Dv), rows(o, L, H, Dv), lse, seg,
              B, L, H, D, Dv, window, scale_log2};
  return fwd(p, DType(dt), nullptr);
}
int emu_bwd(int dt, void* go, void* q, void* k, void* v, const float* lse, const float* delta, const int32_t* ss,
            const int32_t* se, void* dq, void* dk, void* dv, int B, int L, int H, int D, int Dv, int window,
            float scale, float scale_log2) {
  BwdParams p{rows(q, L, H, D), rows(k, L, H, D), rows(v, L, H, Dv), rows(go, L, H, Dv), rows(dq, L, H, D),
              rows(dk, L, H, D), rows(dv, L, H, Dv), lse, delta, ss, se, B, L, H, D, Dv, window, scale, scale_log2};
  return bwd(p, DType(dt), nullptr);
}
int emu_step(int dt, void* q, void* k, void* v, void* kc, void* vc, const int64_t* pos, void* o, int B, int H, int D,
             int Dv, int W, float scale_log2) {
  StepParams p{q, k, v, kc, vc, pos, o, B, H, D, Dv, W, scale_log2};
  return step(p, DType(dt), nullptr);
}
}
"""

LOG2E = 1.4426950408889634
DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


@pytest.fixture(scope="module")
def kernels(tmp_path_factory):
    return load(tmp_path_factory, SOURCE, ENTRY_POINTS)


def _nan(shape, dtype):
    return torch.full(shape, float("nan"), dtype=dtype)


CASES = [  # (dtype, B, L, H, D, window, cu_seqlens)
    (torch.float32, 2, 1, 2, 16, 1, None),
    (torch.float32, 1, 63, 2, 16, 7, None),
    (torch.float32, 1, 65, 2, 32, 64, None),
    (torch.float32, 1, 200, 1, 64, 128, None),
    (torch.float32, 1, 130, 1, 128, 200, None),  # window >= L, widest head
    (torch.float32, 1, 200, 1, 64, 1, None),
    (torch.float32, 1, 100, 3, 16, 9, (0, 1, 40, 41, 100)),
    (torch.float32, 1, 100, 3, 16, 64, (0, 30, 30, 100)),
    (torch.bfloat16, 1, 200, 1, 64, 128, None),
    (torch.float16, 1, 65, 2, 32, 64, None),
]


@pytest.mark.parametrize(
    "dtype,B,L,H,D,window,offsets", CASES, ids=[shape_id(*c[1:6], c[0], c[6] is not None) for c in CASES]
)
def test_cuda_kernels_emulated_match_oracle(kernels, dtype, B, L, H, D, window, offsets):
    q, k, v = make_qkv(B, L, H, D, dtype)
    cu = None if offsets is None else torch.tensor(offsets, dtype=torch.int32)
    ref, grad, ref_grads = oracle(q, k, v, window, cu)
    seg_start, seg_end = segment_bounds(cu, L, torch.device("cpu"))
    scale = D**-0.5
    W = min(window, L)
    o, lse = _nan((B, L, H, D), dtype), _nan((B, H, L), torch.float32)
    code = DTYPE_CODE[dtype]
    assert kernels.emu_fwd(code, ptr(q), ptr(k), ptr(v), ptr(o), ptr(lse), ptr(seg_start), B, L, H, D, D, W,
                           ctypes.c_float(scale * LOG2E)) == 0
    grad_o = grad.to(dtype)
    delta = (grad_o.float() * o.float()).sum(-1).transpose(1, 2).contiguous()
    dq, dk, dv = (_nan((B, L, H, D), dtype) for _ in range(3))
    assert kernels.emu_bwd(code, ptr(grad_o), ptr(q), ptr(k), ptr(v), ptr(lse), ptr(delta), ptr(seg_start),
                           ptr(seg_end), ptr(dq), ptr(dk), ptr(dv), B, L, H, D, D, W, ctypes.c_float(scale),
                           ctypes.c_float(scale * LOG2E)) == 0
    if dtype == torch.float32:
        assert_close("o", o, ref)
        for name, got, want in zip("qkv", (dq, dk, dv), ref_grads):
            assert_grad_close(f"d{name}", got, want)
        return
    # the kernels keep everything but their inputs and outputs in fp32: the reference's own error bound
    from agiformer_kernels import sliding_window_attention

    qs, ks, vs = (t.clone().requires_grad_() for t in (q, k, v))
    same = sliding_window_attention(qs, ks, vs, window, cu_seqlens=cu, backend="reference")
    same.backward(grad_o)
    assert_low_precision_close("o", o, ref, same)
    for name, got, want, s in zip("qkv", (dq, dk, dv), ref_grads, (qs, ks, vs)):
        assert_low_precision_close(f"d{name}", got, want, s.grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("W,D", [(5, 16), (67, 128)])
def test_cuda_step_emulated_matches_naive_step(kernels, dtype, W, D):
    B, H, steps = 2, 2, W + 4
    q, k, v = make_qkv(B, steps, H, D, dtype)
    k_cache, v_cache = torch.zeros(B, W, H, D, dtype=dtype), torch.zeros(B, W, H, D, dtype=dtype)
    k_twin, v_twin = k_cache.double(), v_cache.double()
    starts = torch.tensor([0, 3])
    for t in range(steps):
        pos = starts + t
        qt, kt, vt = (x[:, t].contiguous() for x in (q, k, v))
        o = _nan((B, H, D), dtype)
        assert kernels.emu_step(DTYPE_CODE[dtype], ptr(qt), ptr(kt), ptr(vt), ptr(k_cache), ptr(v_cache),
                                ptr(pos), ptr(o), B, H, D, D, W, ctypes.c_float(D**-0.5 * LOG2E)) == 0
        want = naive_sliding_window_attention_step(qt.double(), kt.double(), vt.double(), k_twin, v_twin, pos)
        assert_close(f"step {t}", o, want, tol=1e-6 if dtype == torch.float32 else 1e-2)
        assert torch.equal(k_cache.double(), k_twin)


def test_emulation_sees_every_launch():
    text = for_gcc(SOURCE.read_text())
    assert text.count("emu_launch(") == 4  # forward, dq, dk/dv, step
