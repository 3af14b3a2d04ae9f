// Next-byte entropy and entropy segmentation on CUDA (sm_80 / sm_90), docs/ops.md §1.4.
//
//   entropy  grid (cdiv(B·L, 8)), 256 threads: one warp per row of V logits. Each lane walks the columns
//            lane, lane + 32, ... with an online log-sum-exp in fp32: the running max m, Z = sum e^(x - m) and
//            A = sum e^(x - m)(x - m); the 32 lane states merge by shuffles and H = log Z - A / Z. Only the
//            row's logits are read, once; nothing of size [B, L, V] is written. A logit that is not > -inf
//            (-inf, as the CPU kernel also NaN) adds nothing.
//   starts   grid (B), 256 threads: the rule's starts position by position in parallel (each reads H_t and
//            H_{t-1} only); with max_len, thread 0 then walks the row once to add the forced cuts, the one
//            sequential dependence (the distance to the last start).

#include <cstdint>

#include "cuda_common.cuh"
#include "entropy_segments_cuda.h"

namespace agf_entropy {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr unsigned kFull = 0xffffffffu;

// (m, z, a) of a set of logits: max, sum e^(x - m), sum e^(x - m)(x - m); z = a = 0 and m = -inf when empty.
struct Lse {
  float m, z, a;
};

// The state moved from its own max to the larger max m (a rescale: x - m = (x - s.m) + (s.m - m)).
__device__ __forceinline__ Lse rebase(Lse s, float m) {
  if (s.m == -INFINITY) return {m, 0.f, 0.f};
  const float shift = s.m - m, alpha = expf(shift);
  return {m, alpha * s.z, alpha * (s.a + s.z * shift)};
}

__device__ __forceinline__ Lse merge(Lse x, Lse y) {
  const float m = fmaxf(x.m, y.m);
  if (m == -INFINITY) return x;
  x = rebase(x, m);
  y = rebase(y, m);
  return {m, x.z + y.z, x.a + y.a};
}

template <typename T>
__global__ void __launch_bounds__(kThreads) entropy_kernel(Params p) {
  const int lane = threadIdx.x % 32;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (row >= static_cast<int64_t>(p.B) * p.L) return;  // a whole warp leaves
  const T* x = static_cast<const T*>(p.logits) + row * p.row_stride;
  Lse s{-INFINITY, 0.f, 0.f};
  for (int v = lane; v < p.V; v += 32) {
    const float xv = agf::to_acc(x[v]);
    if (!(xv > -INFINITY)) continue;  // p = 0 (and NaN, as the CPU kernel): adds nothing
    if (xv > s.m) s = rebase(s, xv);
    const float d = xv - s.m, e = expf(d);
    s.z += e;
    s.a = fmaf(e, d, s.a);
  }
  for (int o = 16; o > 0; o >>= 1) {
    const Lse other{__shfl_xor_sync(kFull, s.m, o), __shfl_xor_sync(kFull, s.z, o), __shfl_xor_sync(kFull, s.a, o)};
    s = merge(s, other);
  }
  if (lane == 0) p.entropy[row] = logf(s.z) - s.a / s.z;
}

__global__ void __launch_bounds__(kThreads) starts_kernel(Params p) {
  const int b = blockIdx.x;
  const float* h = p.entropy + static_cast<int64_t>(b) * p.L;
  bool* starts = p.starts + static_cast<int64_t>(b) * p.L;
  for (int t = threadIdx.x; t < p.L; t += blockDim.x) {
    const int i = t - p.seq_start[t];  // position within its sequence
    bool cut;
    if (p.rule == kRuleDelta)
      cut = i == 0 || h[t] > h[t - 1] + p.delta || h[t] > p.threshold;
    else
      cut = i <= 1 || h[t - 1] > p.threshold;
    starts[t] = cut;
  }
  if (p.max_len <= 0) return;
  __syncthreads();  // the rule's starts of the row are written (global memory, visible within the block)
  if (threadIdx.x != 0) return;
  int64_t run = 0;  // positions since the last start
  for (int t = 0; t < p.L; ++t) {
    bool cut = starts[t];
    if (!cut && run == p.max_len) starts[t] = cut = true;
    run = cut ? 1 : run + 1;
  }
}

template <typename T> cudaError_t launch(const Params& p, cudaStream_t stream) {
  if (p.B < 1 || p.L < 1 || p.V < 1 || (p.rule != kRuleDelta && p.rule != kRuleGlobal)) return cudaErrorInvalidValue;
  const int64_t rows = static_cast<int64_t>(p.B) * p.L;
  entropy_kernel<T><<<static_cast<unsigned>((rows + kWarps - 1) / kWarps), kThreads, 0, stream>>>(p);
  AGF_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  starts_kernel<<<p.B, kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace

cudaError_t entropy_segments(const Params& p, DType dtype, cudaStream_t stream) {
  return agf::by_dtype(dtype, [&](auto t) { return launch<decltype(t)>(p, stream); });
}

}  // namespace agf_entropy
