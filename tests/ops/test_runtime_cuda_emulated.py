"""The emulated CUDA runtime of tests/cuda_emulation.py itself: conversions, shuffles, shared memory and
the launch checks the op tests rely on (a check that never fires would make them pass for nothing)."""

from __future__ import annotations


import pytest
import torch

from tests.cuda_emulation import load, ptr

SOURCE = r"""
#include <cstdint>
#include "cuda_common.cuh"

// out[4t..4t+3]: inclusive scan (shfl_up) and sum (shfl_down tree, lane 0 of each segment) of `width`-lane
// segments, butterfly max (shfl_xor), lane `src` of the segment (shfl_sync).
__global__ void warp_kernel(const int* in, int* out, int width, int src) {
  const int t = threadIdx.x, lane = t % 32;
  const int v = in[t];
  int scan = v;
  for (int o = 1; o < width; o <<= 1) {
    const int up = __shfl_up_sync(0xffffffffu, scan, o, width);
    if (lane % width >= o) scan += up;
  }
  int sum = v;
  for (int o = width / 2; o > 0; o >>= 1) sum += __shfl_down_sync(0xffffffffu, sum, o, width);
  int mx = v;
  for (int o = width / 2; o > 0; o >>= 1) mx = max(mx, __shfl_xor_sync(0xffffffffu, mx, o, width));
  out[4 * t] = scan;
  out[4 * t + 1] = sum;
  out[4 * t + 2] = mx;
  out[4 * t + 3] = __shfl_sync(0xffffffffu, v, src, width);
}

// A static array declared in a loop is one array per block; shared memory starts unwritten (NaN) in every
// block; threads that return early leave the barrier.
__global__ void shared_kernel(float* out, int* blocks_seen) {
  const int t = threadIdx.x;
  for (int i = 0; i < 3; ++i) {
    __shared__ float acc[4];
    if (t == 0) acc[i] = float(i + 10 * blockIdx.x);
    __syncthreads();
    if (i == 2 && t < 4) out[blockIdx.x * 4 + t] = acc[t];
  }
  if (t >= 2) return;
  __syncthreads();
  if (t == 0) blocks_seen[blockIdx.x] = 1;
}

template <int N> __global__ void static_kernel(int write_at) {
  __shared__ float s[N];
  if (threadIdx.x == 0) s[write_at] = 1.f;
}

__global__ void dynamic_kernel(int write_at) {
  extern __shared__ __align__(16) unsigned char raw[];
  if (threadIdx.x == 0 && write_at >= 0) raw[write_at] = 1;
}

__global__ void uneven_shuffle_kernel(int* out) {
  int v = threadIdx.x;
  if (threadIdx.x % 32 < 16) v = __shfl_xor_sync(0xffffffffu, v, 1);
  out[threadIdx.x] = v;
}

extern "C" {
int emu_warp(const int* in, int* out, int threads, int width, int src) {
  warp_kernel<<<1, threads>>>(in, out, width, src);
  return cudaGetLastError();
}
int emu_shared(float* out, int* blocks_seen, int blocks) {
  shared_kernel<<<blocks, 64>>>(out, blocks_seen);
  return cudaGetLastError();
}
int emu_static(int big, int write_at, int dynamic) {
  if (big) {
    static_kernel<12800><<<1, 32>>>(write_at);  // 50 KiB
  } else {
    if (cudaFuncSetAttribute(static_kernel<100>, cudaFuncAttributeMaxDynamicSharedMemorySize, dynamic) != cudaSuccess)
      return -1;
    static_kernel<100><<<1, 32, dynamic>>>(write_at);
  }
  return cudaGetLastError();
}
int emu_dynamic(int bytes, int opt_in, int write_at) {
  const auto max_dynamic = cudaFuncAttributeMaxDynamicSharedMemorySize;
  if (opt_in && cudaFuncSetAttribute(dynamic_kernel, max_dynamic, opt_in) != cudaSuccess) return -1;
  dynamic_kernel<<<2, 32, bytes>>>(write_at);
  return cudaGetLastError();
}
int emu_uneven(int* out) {
  uneven_shuffle_kernel<<<1, 64>>>(out);
  return cudaGetLastError();
}
int emu_try_config(int threads, int grid_y) {
  dynamic_kernel<<<dim3(1, grid_y), threads>>>(-1);
  return cudaGetLastError();
}
void emu_to_half(const float* x, uint16_t* y, int n) {
  for (int i = 0; i < n; ++i) y[i] = __float2half_rn(x[i]).bits;
}
void emu_from_half(const uint16_t* x, float* y, int n) {
  for (int i = 0; i < n; ++i) y[i] = __half2float(__half{x[i]});
}
void emu_to_bf16(const float* x, uint16_t* y, int n) {
  for (int i = 0; i < n; ++i) y[i] = __float2bfloat16_rn(x[i]).bits;
}
void emu_from_bf16(const uint16_t* x, float* y, int n) {
  for (int i = 0; i < n; ++i) y[i] = __bfloat162float(__nv_bfloat16{x[i]});
}
}
"""

ENTRY_POINTS = '#include "kernels.cu"\n'
INVALID_VALUE, INVALID_CONFIGURATION = 1, 9


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    return load(tmp_path_factory, SOURCE, ENTRY_POINTS)


def _floats_to_convert():
    """Every fp16/bf16 value, the midpoints between neighbours (ties) and their float neighbours, plus
    random floats over the whole range, zeros, infinities, NaN."""
    bits = torch.arange(1 << 16, dtype=torch.int32).to(torch.int16)
    points = [torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan"), 65504.0, 65519.99, 65520.0,
                            3.4e38, 1e-8, 2.0**-25, 2.0**-24, 1.5 * 2.0**-24, 2.0**-14 * (1 - 2.0**-11)])]
    for low in (torch.float16, torch.bfloat16):
        values = bits.view(low).float()
        values = values[values.isfinite()].sort().values
        mid = (values[:-1].double() + values[1:].double()) / 2
        points += [values, mid.float(), torch.nextafter(mid.float(), torch.tensor(float("inf"))),
                   torch.nextafter(mid.float(), torch.tensor(float("-inf")))]
    g = torch.Generator().manual_seed(0)
    points.append(torch.randint(-(1 << 31), 1 << 31, (200_000,), generator=g, dtype=torch.int64).to(torch.int32)
                  .view(torch.float32))
    return torch.cat(points).contiguous()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_conversions_round_to_nearest_even(lib, dtype):
    to, back = (lib.emu_to_half, lib.emu_from_half) if dtype == torch.float16 else (lib.emu_to_bf16, lib.emu_from_bf16)
    x = _floats_to_convert()
    got = torch.empty(x.numel(), dtype=torch.int16)
    to(ptr(x), ptr(got), x.numel())
    want = x.to(dtype).view(torch.int16)
    nan = x.isnan()
    assert got.view(dtype)[nan].isnan().all(), "NaN must stay NaN"
    bad = (got != want) & ~nan
    assert not bad.any(), f"{int(bad.sum())} conversions differ, e.g. {x[bad][:4].tolist()}"
    every = torch.arange(1 << 16, dtype=torch.int32).to(torch.int16).contiguous()
    wide = torch.empty(1 << 16)
    back(ptr(every), ptr(wide), 1 << 16)
    assert torch.equal(wide.nan_to_num(7.0), every.view(dtype).float().nan_to_num(7.0))


@pytest.mark.parametrize("threads,width,src", [(64, 32, 5), (96, 8, 3), (64, 4, 6)])
def test_warp_shuffles(lib, threads, width, src):
    x = torch.randint(-1000, 1000, (threads,), generator=torch.Generator().manual_seed(threads + width),
                      dtype=torch.int32)
    out = torch.empty(threads, 4, dtype=torch.int32)
    assert lib.emu_warp(ptr(x), ptr(out), threads, width, src) == 0
    seg = x.view(-1, width)
    assert torch.equal(out[:, 0], seg.cumsum(1).view(-1).int())
    assert torch.equal(out.view(-1, width, 4)[:, 0, 1], seg.sum(1).int())  # lane 0 of a segment holds the sum
    assert torch.equal(out[:, 2], seg.amax(1, keepdim=True).expand_as(seg).reshape(-1))
    assert torch.equal(out[:, 3], seg[:, src % width : src % width + 1].expand_as(seg).reshape(-1))


def test_uneven_shuffles_fail_the_launch(lib, capfd):
    out = torch.empty(64, dtype=torch.int32)
    assert lib.emu_uneven(ptr(out)) == INVALID_VALUE
    assert "shuffled unevenly" in capfd.readouterr().err


def test_shared_memory_per_block_and_early_return(lib):
    blocks = 3
    out, seen = torch.empty(blocks * 4), torch.zeros(blocks, dtype=torch.int32)
    assert lib.emu_shared(ptr(out), ptr(seen), blocks) == 0
    out = out.view(blocks, 4)
    for b in range(blocks):
        assert out[b, :3].tolist() == [10.0 * b, 1 + 10.0 * b, 2 + 10.0 * b]
        assert out[b, 3].isnan(), "an element no thread wrote reads NaN"
    assert seen.tolist() == [1] * blocks


def test_shared_memory_limits_and_bounds(lib, capfd):
    assert lib.emu_static(0, 99, 0) == 0
    assert lib.emu_static(0, 100, 0) == INVALID_VALUE  # one past the end
    assert "past the end of __shared__ s" in capfd.readouterr().err
    assert lib.emu_static(1, 0, 0) == INVALID_VALUE  # 50 KiB static
    assert lib.emu_dynamic(48 * 1024, 0, 48 * 1024 - 1) == 0
    assert lib.emu_dynamic(48 * 1024 + 16, 0, 0) == INVALID_VALUE  # above 48 KiB without opt-in
    assert lib.emu_dynamic(100 * 1024, 100 * 1024, 0) == 0
    assert lib.emu_dynamic(1000, 0, 1000) == INVALID_VALUE  # one past the end
    assert "past the end of dynamic" in capfd.readouterr().err
    assert lib.emu_dynamic(0, 164 * 1024, 0) == -1  # cudaFuncSetAttribute refuses more than sm_80 has
    assert lib.emu_dynamic(163 * 1024, 163 * 1024, 0) == 0
    assert lib.emu_static(0, 0, 163 * 1024) == INVALID_VALUE  # static + dynamic above 163 KiB


def test_launch_configuration_checks(lib):
    assert lib.emu_try_config(1024, 1) == 0
    assert lib.emu_try_config(1025, 1) == INVALID_CONFIGURATION
    assert lib.emu_try_config(32, 65536) == INVALID_CONFIGURATION
    assert lib.emu_try_config(32, 0) == INVALID_CONFIGURATION
