"""The CUDA kernels of sliding_window_attention (csrc/.../sliding_window_attention.cu), run on the CPU.

Without a GPU, nvcc only proves the kernels compile. Here the same source is compiled by g++ against
a small emulation of the CUDA runtime: every CUDA thread of a block is a std::thread, __syncthreads
is a std::barrier, dynamic shared memory is a NaN-filled buffer per block, `<<<...>>>` launches run
the blocks one after another. That checks the kernels' indexing, tiling, masking, online softmax and
synchronization points against the float64 oracle; it says nothing about speed, warp-level timing or
the real exp2f/log2f. The real thing runs in the gpu-marked tests of the other files.
"""

from __future__ import annotations

import ctypes
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from agiformer_kernels.ops.sliding_window_attention.reference import (
    naive_sliding_window_attention_step,
    segment_bounds,
)
from tests.ops.test_sliding_window_attention import assert_grad_close, make_qkv, oracle, shape_id
from tests.utils import assert_close, assert_low_precision_close

CSRC = Path(__file__).resolve().parents[2] / "csrc"
SOURCE = CSRC / "sliding_window_attention" / "sliding_window_attention.cu"

CUDA_RUNTIME = r"""
#pragma once
#include <barrier>
#include <cmath>
#include <cstdint>
#include <thread>
#include <vector>
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(x)
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1 };
typedef void* cudaStream_t;
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize };
template <class K> cudaError_t cudaFuncSetAttribute(K, cudaFuncAttribute, int) { return cudaSuccess; }
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
struct dim3 { unsigned x, y, z; dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {} };
struct emu_index { unsigned x = 0, y = 0, z = 0; };
inline thread_local emu_index threadIdx, blockIdx;
inline thread_local dim3 blockDim;
inline thread_local std::barrier<>* emu_barrier = nullptr;
inline thread_local float* emu_smem = nullptr;
inline void __syncthreads() { emu_barrier->arrive_and_wait(); }
template <class A, class B> inline auto min(A a, B b) { return a < b ? a : b; }
template <class A, class B> inline auto max(A a, B b) { return a > b ? a : b; }
using std::exp2f; using std::log2f; using std::fmaf; using std::fmaxf;
template <class K, class P>
cudaError_t emu_launch(K kernel, dim3 grid, dim3 block, size_t smem, cudaStream_t, P params) {
  for (unsigned by = 0; by < grid.y; ++by)
    for (unsigned bx = 0; bx < grid.x; ++bx) {
      std::vector<float> shared(smem / sizeof(float) + 1, std::nanf(""));
      std::barrier<> bar(block.x);
      std::vector<std::thread> threads;
      for (unsigned t = 0; t < block.x; ++t)
        threads.emplace_back([&, t] {
          threadIdx.x = t; blockIdx.x = bx; blockIdx.y = by; blockDim = block;
          emu_barrier = &bar; emu_smem = shared.data();
          kernel(params);
        });
      for (auto& th : threads) th.join();
    }
  return cudaSuccess;
}
"""

CUDA_FP16 = r"""
#pragma once
struct __half { _Float16 x; };
inline float __half2float(__half h) { return (float)h.x; }
inline __half __float2half_rn(float f) { return __half{(_Float16)f}; }
"""

CUDA_BF16 = r"""
#pragma once
#include <cstdint>
#include <cstring>
struct __nv_bfloat16 { uint16_t bits; };
inline float __bfloat162float(__nv_bfloat16 b) {
  uint32_t u = uint32_t(b.bits) << 16; float f; std::memcpy(&f, &u, 4); return f;
}
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  uint32_t u; std::memcpy(&u, &f, 4); u += 0x7fff + ((u >> 16) & 1); return {uint16_t(u >> 16)};
}
"""

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


def _for_gcc(source: str) -> str:
    """The .cu source with launches and dynamic shared memory spelled for the emulation."""
    source = re.sub(r"(\w+<[\w, ]+>)<<<(.*?)>>>\(p\)", r"emu_launch(\1, \2, p)", source)
    source = source.replace("extern __shared__ float smem[];", "float* smem = emu_smem;")
    assert "<<<" not in source and "__shared__" not in source, "a launch or shared array the emulation misses"
    return source


@pytest.fixture(scope="module")
def kernels(tmp_path_factory):
    cxx = shutil.which("g++")
    if cxx is None:
        pytest.skip("g++ not installed")
    folder = tmp_path_factory.mktemp("cuda_emulation")
    (folder / "include").mkdir()
    (folder / "include" / "cuda_runtime.h").write_text(CUDA_RUNTIME)
    (folder / "include" / "cuda_fp16.h").write_text(CUDA_FP16)
    (folder / "include" / "cuda_bf16.h").write_text(CUDA_BF16)
    (folder / "kernels.cu").write_text(_for_gcc(SOURCE.read_text()))
    (folder / "entry.cpp").write_text(ENTRY_POINTS)
    cmd = [cxx, "-std=c++20", "-O1", "-fPIC", "-shared", "-pthread", "-I", str(folder / "include"),
           "-I", str(CSRC / "common"), "-I", str(SOURCE.parent), str(folder / "entry.cpp"), "-o", str(folder / "k.so")]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0 and ("barrier" in done.stderr or "_Float16" in done.stderr):
        pytest.skip(f"this g++ lacks C++20 <barrier> or _Float16: {done.stderr[-300:]}")
    assert done.returncode == 0, f"g++ failed on the emulated CUDA source:\n{done.stderr[-4000:]}"
    return ctypes.CDLL(str(folder / "k.so"))


def _ptr(t: torch.Tensor):
    return ctypes.c_void_p(t.data_ptr())


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
    assert kernels.emu_fwd(code, _ptr(q), _ptr(k), _ptr(v), _ptr(o), _ptr(lse), _ptr(seg_start), B, L, H, D, D, W,
                           ctypes.c_float(scale * LOG2E)) == 0
    grad_o = grad.to(dtype)
    delta = (grad_o.float() * o.float()).sum(-1).transpose(1, 2).contiguous()
    dq, dk, dv = (_nan((B, L, H, D), dtype) for _ in range(3))
    assert kernels.emu_bwd(code, _ptr(grad_o), _ptr(q), _ptr(k), _ptr(v), _ptr(lse), _ptr(delta), _ptr(seg_start),
                           _ptr(seg_end), _ptr(dq), _ptr(dk), _ptr(dv), B, L, H, D, D, W, ctypes.c_float(scale),
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
        assert kernels.emu_step(DTYPE_CODE[dtype], _ptr(qt), _ptr(kt), _ptr(vt), _ptr(k_cache), _ptr(v_cache),
                                _ptr(pos), _ptr(o), B, H, D, D, W, ctypes.c_float(D**-0.5 * LOG2E)) == 0
        want = naive_sliding_window_attention_step(qt.double(), kt.double(), vt.double(), k_twin, v_twin, pos)
        assert_close(f"step {t}", o, want, tol=1e-6 if dtype == torch.float32 else 1e-2)
        assert torch.equal(k_cache.double(), k_twin)
