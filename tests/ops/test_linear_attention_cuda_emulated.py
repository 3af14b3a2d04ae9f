"""The CUDA kernels of linear_attention (csrc/linear_attention/linear_attention.cu), run on the CPU.

The source runs under the emulated CUDA runtime of tests/cuda_emulation.py (what that checks and what it
cannot is said there): here the kernels' indexing, tiling, masking, chunk-state bookkeeping and
synchronization points meet the float64 oracle. The real thing runs in the gpu-marked tests of
test_linear_attention_triton.py.
"""

from __future__ import annotations

import ctypes
import math

import pytest
import torch

from agiformer_kernels.ops.linear_attention._common import chunk_rows
from agiformer_kernels.ops.linear_attention.reference import linear_attention_step_reference
from tests.cuda_emulation import CSRC, for_gcc, load, ptr
from tests.ops.test_linear_attention import (
    CASE_IDS,
    CASES,
    _case,
    fp32_grad_tol,
    offsets_for,
    rel_rms,
    run,
)
from tests.utils import assert_close, assert_low_precision_close

SOURCE = CSRC / "linear_attention" / "linear_attention.cu"

ENTRY_POINTS = r"""
#include "kernels.cu"
using namespace agf_la;
static Rows rows(void* p, int L, int H, int E) { return {p, (int64_t)L * H * E, (int64_t)H * E, E}; }
static Sequences seqs(const int32_t* cu, const int32_t* table, int n_seq, int n_chunks, int B, int L, int H) {
  return {cu, table, table ? table + n_chunks : nullptr, n_seq, n_chunks, B, L, H, (L + kChunk - 1) / kChunk};
}
extern "C" {
int emu_fwd(int dt, void* q, void* k, void* v, void* o, const float* S0, const float* z0, float* den, float* S,
            float* z, float* cS, float* cz, const int32_t* cu, const int32_t* table, int n_seq, int n_chunks, int B,
            int L, int H, int D, int Dv, int elu, int normalize, float feps, float scale, float eps) {
  FwdParams p{rows(q, L, H, D), rows(k, L, H, D), rows(v, L, H, Dv), rows(o, L, H, Dv), S0, z0, den, S, z, cS, cz,
              seqs(cu, table, n_seq, n_chunks, B, L, H), {D, Dv, elu != 0, normalize != 0, feps, scale, eps}};
  return fwd(p, DType(dt), nullptr);
}
int emu_bwd(int dt, void* q, void* k, void* v, void* o, void* go, void* dq, void* dk, void* dv, const float* den,
            const float* cS, const float* cz, float* cdS, float* cdz, const float* dS, const float* dz, float* dS0,
            float* dz0, const int32_t* cu, const int32_t* table, int n_seq, int n_chunks, int B, int L, int H, int D,
            int Dv, int elu, int normalize, float feps, float scale) {
  BwdParams p{rows(q, L, H, D), rows(k, L, H, D), rows(v, L, H, Dv), rows(o, L, H, Dv), rows(go, L, H, Dv),
              rows(dq, L, H, D), rows(dk, L, H, D), rows(dv, L, H, Dv), den, cS, cz, cdS, cdz, dS, dz, dS0, dz0,
              seqs(cu, table, n_seq, n_chunks, B, L, H), {D, Dv, elu != 0, normalize != 0, feps, scale, 0.f}};
  return bwd(p, DType(dt), nullptr);
}
int emu_step(int dt, void* q, void* k, void* v, float* S, float* z, void* o, int B, int H, int D, int Dv, int elu,
             int normalize, float feps, float scale, float eps) {
  StepParams p{q, k, v, (int64_t)H * D, D, (int64_t)H * D, D, (int64_t)H * Dv, Dv, S, z, o, B, H,
               {D, Dv, elu != 0, normalize != 0, feps, scale, eps}};
  return step(p, DType(dt), nullptr);
}
}
"""

DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


@pytest.fixture(scope="module")
def kernels(tmp_path_factory):
    return load(tmp_path_factory, SOURCE, ENTRY_POINTS)


def _nan(*shape, dtype=torch.float32):
    return torch.full(shape, float("nan"), dtype=dtype)


def chunk_table(offsets):
    """(segment, chunk within it) of every chunk, as the CUDA binding builds it: [2, n_chunks] int32."""
    seq, idx = [], []
    for i in range(len(offsets) - 1):
        n = -(-(offsets[i + 1] - offsets[i]) // 64)
        seq += [i] * n
        idx += list(range(n))
    return torch.tensor([seq, idx], dtype=torch.int32).contiguous(), len(seq)


def emulate(kernels, q, k, v, init, offsets, opts, grads_out):
    """Forward and backward through the emulated kernels: (o, S, z), (dq, dk, dv, dS0, dz0)."""
    B, L, H, D = q.shape
    Dv = v.shape[-1]
    o_ = dict(feature_map="elu+1", feature_eps=1e-4, scale=1 / math.sqrt(D), eps=1e-4, normalize=True)
    o_.update(dict(opts))
    elu, norm = int(o_["feature_map"] == "elu+1"), int(o_["normalize"])
    feps, scale, eps = (ctypes.c_float(o_[n]) for n in ("feature_eps", "scale", "eps"))
    packed = offsets is not None
    n = len(offsets) - 1 if packed else B
    NC = -(-L // 64)
    cu = torch.tensor(offsets, dtype=torch.int32) if packed else None
    table, n_chunks = chunk_table(offsets) if packed else (None, B * NC)
    rows = chunk_rows(B, L, n, packed)
    dt = DTYPE_CODE[q.dtype]
    S0, z0 = (None, None) if init is None else (init[0].float().contiguous(), init[1].float().contiguous())
    o = _nan(B, L, H, Dv, dtype=q.dtype)
    den, S, z = _nan(B, H, L), _nan(n, H, D, Dv), _nan(n, H, D)
    cS, cz = torch.zeros(rows, H, Dv, D), torch.zeros(rows, H, D)  # a packed batch leaves rows unused
    assert kernels.emu_fwd(dt, ptr(q), ptr(k), ptr(v), ptr(o), ptr(S0), ptr(z0), ptr(den), ptr(S), ptr(z), ptr(cS),
                           ptr(cz), ptr(cu), ptr(table), n, n_chunks, B, L, H, D, Dv, elu, norm, feps, scale, eps) == 0
    go = grads_out[0].to(q.dtype).contiguous()
    dS, dz = grads_out[1].float().contiguous(), grads_out[2].float().contiguous()
    dq, dk = _nan(B, L, H, D, dtype=q.dtype), _nan(B, L, H, D, dtype=q.dtype)
    dv = _nan(B, L, H, Dv, dtype=q.dtype)
    cdS, cdz = torch.zeros_like(cS), torch.zeros_like(cz)
    dS0, dz0 = _nan(n, H, D, Dv), _nan(n, H, D)
    assert kernels.emu_bwd(dt, ptr(q), ptr(k), ptr(v), ptr(o), ptr(go), ptr(dq), ptr(dk), ptr(dv), ptr(den), ptr(cS),
                           ptr(cz), ptr(cdS), ptr(cdz), ptr(dS), ptr(dz), ptr(dS0), ptr(dz0), ptr(cu), ptr(table), n,
                           n_chunks, B, L, H, D, Dv, elu, norm, feps, scale) == 0
    return (o, S, z), (dq, dk, dv, dS0, dz0)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_cuda_kernels_emulated_match_oracle_fp32(kernels, case):
    q, k, v, init, opts, (o_ref, (S_ref, z_ref), grads_out, grads_ref) = _case(*case, torch.float32)
    offsets = offsets_for(case[1]) if case[6] else None
    (o, S, z), grads = emulate(kernels, q, k, v, init, offsets, opts, grads_out)
    assert_close("o", o, o_ref)
    assert_close("S", S, S_ref)
    assert_close("z", z, z_ref)
    r_o, (r_S, r_z), r_leaves = run("reference", q, k, v, init, case[6], opts, requires_grad=True)
    r_grads = torch.autograd.grad([r_o, r_S, r_z], r_leaves, [g.float() for g in grads_out])
    names = ["dq", "dk", "dv", "dS0", "dz0"][: len(r_grads)]
    for name, g, r, g_ref in zip(names, grads, r_grads, grads_ref):
        assert_close(name, g, g_ref, tol=fp32_grad_tol(rel_rms(r, g_ref)))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", [CASES[1], CASES[3]], ids=[CASE_IDS[1], CASE_IDS[3]])
def test_cuda_kernels_emulated_low_precision(kernels, case, dtype):
    q, k, v, init, opts, (o_ref, _, grads_out, grads_ref) = _case(*case, dtype)
    offsets = offsets_for(case[1]) if case[6] else None
    (o, S, z), grads = emulate(kernels, q, k, v, init, offsets, opts, grads_out)
    r_o, (r_S, r_z), r_leaves = run("reference", q, k, v, init, case[6], opts, requires_grad=True)
    upstream = [grads_out[0].to(dtype), grads_out[1].float(), grads_out[2].float()]
    r_grads = torch.autograd.grad([r_o, r_S, r_z], r_leaves[:3], upstream)
    assert_low_precision_close("o", o, o_ref, r_o)
    for name, g, r, g_ref in zip(["dq", "dk", "dv"], grads, r_grads, grads_ref):
        assert_low_precision_close(name, g, g_ref, r)


@pytest.mark.parametrize("normalize", [True, False], ids=["normalized", "unnormalized"])
def test_cuda_step_emulated(kernels, normalize):
    B, H, D, Dv = 2, 3, 64, 48
    g = torch.Generator().manual_seed(11)
    q, k = (torch.randn(B, H, D, generator=g) for _ in range(2))
    v = torch.randn(B, H, Dv, generator=g)
    S, z = torch.randn(B, H, D, Dv, generator=g), torch.rand(B, H, D, generator=g) * 50
    S_ref, z_ref = S.clone(), z.clone()
    o = _nan(B, H, Dv)
    assert kernels.emu_step(0, ptr(q), ptr(k), ptr(v), ptr(S), ptr(z), ptr(o), B, H, D, Dv, 1, int(normalize),
                            ctypes.c_float(1e-4), ctypes.c_float(D**-0.5), ctypes.c_float(1e-4)) == 0
    r = linear_attention_step_reference(q, k, v, (S_ref, z_ref), feature_map="elu+1", feature_eps=1e-4,
                                        scale=D**-0.5, eps=1e-4, normalize=normalize)
    assert_close("o", o, r)
    assert_close("S", S, S_ref)
    assert_close("z", z, z_ref)


def test_emulation_sees_every_launch():
    text = for_gcc(SOURCE.read_text())
    assert text.count("emu_launch(") == 5  # 2 forward, 2 backward, 1 step
