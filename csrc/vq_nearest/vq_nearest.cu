// Nearest-code search by L2 and the EMA codebook update on CUDA (sm_80 / sm_90), docs/ops.md §1.6.
//
// Search: SIMT, fp32 FMAs for every input dtype (no tensor cores, so no tf32), no [N, K] matrix.
//   norms    grid (cdiv(K, 8)), 256 threads: one warp per code, |c|^2 in fp32.
//   nearest  grid (cdiv(N, 64)), 256 threads: a block owns 64 rows of z and walks the codebook in tiles
//            of 64 codes; z and code tiles [64][32] stream through shared memory along D, each thread keeps a
//            4 x 4 register tile of z·c (rows r0 + 16i, codes c0 + 16j). Codes rank by |c|^2 - 2 z·c (|z|^2
//            is the same for all of a row's codes); the 16 threads of a row merge their candidates with
//            half-warp shuffles, lowest index among equal scores, and a running minimum per row keeps the
//            earlier tile on ties, so ties go to the lowest index as torch.argmin. A row with no finite
//            score (inf or NaN input) takes code 0, as the CPU kernel. The chosen code's distance is then
//            recomputed as sum (z - c)^2, free of the cancellation in |z|^2 - 2 z·c + |c|^2.
//
// EMA update (z, counts, sums in fp32 or fp64, one dtype; the binding sorts the rows by code first, so no
// atomics and a fixed summation order):
//   counts   grid (cdiv(K, 256)): counts = decay·counts + (1 - decay)·n_k.
//   total    one block of 256 threads: n = sum counts, a tree in shared memory.
//   sums     grid (K, cdiv(D, 128)), 128 threads: one feature per thread sums its code's rows of z, updates
//            sums in place and writes the smoothed codebook row.

#include <cstdint>

#include "cuda_common.cuh"
#include "vq_nearest_cuda.h"

namespace agf_vq {
namespace {

constexpr int kThreads = 256;
constexpr int kRows = 64, kCodes = 64, kChunk = 32;  // rows of z, codes, features per tile
constexpr int kPitch = kChunk + 1;
constexpr unsigned kFull = 0xffffffffu;

template <typename T>
__global__ void __launch_bounds__(kThreads) code_norm_kernel(NearestParams p) {
  const int lane = threadIdx.x % 32, k = blockIdx.x * (kThreads / 32) + threadIdx.x / 32;
  if (k >= p.K) return;  // a whole warp leaves
  const T* c = static_cast<const T*>(p.codebook) + static_cast<int64_t>(k) * p.D;
  float s = 0.f;
  for (int d = lane; d < p.D; d += 32) {
    const float x = agf::to_acc(c[d]);
    s = fmaf(x, x, s);
  }
  for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(kFull, s, o);
  if (lane == 0) p.code_norm[k] = s;
}

// rows [row0, row0 + 64) x features [d0, d0 + 32) of a [rows, D] matrix into shared fp32 [64][kPitch]; zeros
// past its end.
template <typename T>
__device__ void load_tile(float* dst, const T* src, int row0, int rows, int d0, int D) {
  for (int idx = threadIdx.x; idx < kRows * kChunk; idx += blockDim.x) {
    const int r = idx / kChunk, d = idx % kChunk;
    float x = 0.f;
    if (row0 + r < rows && d0 + d < D) x = agf::to_acc(src[static_cast<int64_t>(row0 + r) * D + d0 + d]);
    dst[r * kPitch + d] = x;
  }
}

// (score, index) of the better of two candidates: the lower score, the lower index among equal ones.
__device__ __forceinline__ void take_better(float& score, int& index, float other_score, int other_index) {
  if (other_score < score || (other_score == score && other_index < index)) {
    score = other_score;
    index = other_index;
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) nearest_kernel(NearestParams p) {
  __shared__ float zs[kRows * kPitch];
  __shared__ float cs[kCodes * kPitch];
  __shared__ float cn[kCodes];  // |c|^2 of the tile's codes, +inf past K (never chosen)
  const T* z = static_cast<const T*>(p.z);
  const T* codebook = static_cast<const T*>(p.codebook);
  const int n0 = blockIdx.x * kRows, r0 = threadIdx.x / 16, c0 = threadIdx.x % 16;
  float best[4];
  int best_i[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    best[i] = INFINITY;
    best_i[i] = 0;
  }

  for (int k0 = 0; k0 < p.K; k0 += kCodes) {
    float acc[4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) acc[i][j] = 0.f;
    for (int d0 = 0; d0 < p.D; d0 += kChunk) {
      __syncthreads();  // the previous chunk (and the previous tile's norms) are consumed
      load_tile<T>(zs, z, n0, p.N, d0, p.D);
      load_tile<T>(cs, codebook, k0, p.K, d0, p.D);
      if (d0 == 0 && threadIdx.x < kCodes)
        cn[threadIdx.x] = k0 + threadIdx.x < p.K ? p.code_norm[k0 + threadIdx.x] : INFINITY;
      __syncthreads();
      for (int d = 0; d < kChunk; ++d) {
        float a[4], b[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) a[i] = zs[(r0 + 16 * i) * kPitch + d];
#pragma unroll
        for (int j = 0; j < 4; ++j) b[j] = cs[(c0 + 16 * j) * kPitch + d];
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
      }
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      float s = INFINITY;
      int si = 0x7fffffff;
#pragma unroll
      for (int j = 0; j < 4; ++j) {  // codes rise with j: strict < keeps the first of equal scores
        const float x = fmaf(-2.f, acc[i][j], cn[c0 + 16 * j]);
        if (x < s) {
          s = x;
          si = k0 + c0 + 16 * j;
        }
      }
      for (int o = 8; o > 0; o >>= 1) {  // the 16 threads of row r0 + 16 i: one half-warp
        const float os = __shfl_xor_sync(kFull, s, o, 16);
        const int oi = __shfl_xor_sync(kFull, si, o, 16);
        take_better(s, si, os, oi);
      }
      if (s < best[i]) {  // strict: an earlier tile keeps a tie
        best[i] = s;
        best_i[i] = si;
      }
    }
  }

#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int n = n0 + r0 + 16 * i;
    const int k = best[i] < INFINITY ? best_i[i] : 0;
    float part = 0.f;
    if (n < p.N) {
      const T* zr = z + static_cast<int64_t>(n) * p.D;
      const T* cr = codebook + static_cast<int64_t>(k) * p.D;
      for (int d = c0; d < p.D; d += 16) {
        const float diff = agf::to_acc(zr[d]) - agf::to_acc(cr[d]);
        part = fmaf(diff, diff, part);
      }
    }
    for (int o = 8; o > 0; o >>= 1) part += __shfl_xor_sync(kFull, part, o, 16);
    if (n < p.N && c0 == 0) {
      p.index[n] = k;
      p.dist[n] = part;
    }
  }
}

// ------------------------------------------------------------------------------------------------
// EMA update
// ------------------------------------------------------------------------------------------------

template <typename T>
__global__ void __launch_bounds__(256) ema_counts_kernel(EmaParams p) {
  const int k = blockIdx.x * blockDim.x + threadIdx.x;
  if (k >= p.K) return;
  T* counts = static_cast<T*>(p.counts);
  const T n_k = static_cast<T>(p.code_start[k + 1] - p.code_start[k]);
  counts[k] = counts[k] * static_cast<T>(p.decay) + n_k * (T(1) - static_cast<T>(p.decay));
}

template <typename T>
__global__ void __launch_bounds__(256) ema_total_kernel(EmaParams p) {
  __shared__ T part[256];
  const T* counts = static_cast<const T*>(p.counts);
  T s = 0;
  for (int k = threadIdx.x; k < p.K; k += blockDim.x) s += counts[k];
  part[threadIdx.x] = s;
  for (int half = 128; half > 0; half >>= 1) {
    __syncthreads();
    if (threadIdx.x < half) part[threadIdx.x] += part[threadIdx.x + half];
  }
  if (threadIdx.x == 0) *static_cast<T*>(p.total) = part[0];
}

template <typename T>
__global__ void __launch_bounds__(128) ema_sums_kernel(EmaParams p) {
  const int k = blockIdx.x, d = blockIdx.y * blockDim.x + threadIdx.x;
  if (d >= p.D) return;
  const T* z = static_cast<const T*>(p.z);
  T acc = 0;
  for (int64_t i = p.code_start[k]; i < p.code_start[k + 1]; ++i) acc += z[p.order[i] * p.D + d];
  const T decay = static_cast<T>(p.decay), eps = static_cast<T>(p.eps);
  const T n = *static_cast<const T*>(p.total);
  const T smoothed = (static_cast<const T*>(p.counts)[k] + eps) / (n + static_cast<T>(p.K) * eps) * n;
  T& s = static_cast<T*>(p.sums)[static_cast<int64_t>(k) * p.D + d];
  s = s * decay + acc * (T(1) - decay);
  static_cast<T*>(p.codebook)[static_cast<int64_t>(k) * p.D + d] = s / smoothed;
}

// ------------------------------------------------------------------------------------------------
// Launchers
// ------------------------------------------------------------------------------------------------

template <typename T> cudaError_t nearest_typed(const NearestParams& p, cudaStream_t stream) {
  if (p.N < 1 || p.K < 1 || p.D < 1) return cudaErrorInvalidValue;
  code_norm_kernel<T><<<agf::ceil_div(p.K, kThreads / 32), kThreads, 0, stream>>>(p);
  AGF_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  nearest_kernel<T><<<agf::ceil_div(p.N, kRows), kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

template <typename T> cudaError_t ema_typed(const EmaParams& p, cudaStream_t stream) {
  if (p.K < 1 || p.D < 1 || agf::ceil_div(p.D, 128) > 65535) return cudaErrorInvalidValue;
  ema_counts_kernel<T><<<agf::ceil_div(p.K, 256), 256, 0, stream>>>(p);
  AGF_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  ema_total_kernel<T><<<1, 256, 0, stream>>>(p);
  AGF_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  ema_sums_kernel<T><<<dim3(p.K, agf::ceil_div(p.D, 128)), 128, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace

cudaError_t nearest(const NearestParams& p, DType dtype, cudaStream_t stream) {
  return agf::by_dtype(dtype, [&](auto t) { return nearest_typed<decltype(t)>(p, stream); });
}

cudaError_t ema_update(const EmaParams& p, EmaDType dtype, cudaStream_t stream) {
  if (dtype == EmaDType::Float32) return ema_typed<float>(p, stream);
  if (dtype == EmaDType::Float64) return ema_typed<double>(p, stream);
  return cudaErrorInvalidValue;
}

}  // namespace agf_vq
