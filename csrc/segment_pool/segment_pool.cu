// Learned-query pooling of variable-length segments on CUDA (sm_80 / sm_90): forward and backward
// (docs/ops.md §1.5).
//
// SIMT kernels, fp32 accumulation for every input dtype; only __syncthreads, no atomics. A segment's keys
// and values stream through shared memory in tiles of 32 positions, so work is O(T·Q·H·(D + Dv)) and
// nothing of size [S·Q, T] exists.
//
//   forward  grid (S, H), 128 threads: scale·queries [Q][D] stay in shared memory; K/V tiles [32][D]
//            stream through; scores [Q][32] in shared; online softmax per query (thread q < Q keeps
//            m, l); the accumulator [Q][Dv] in shared memory. Saves lse = m + log l.
//   backward grid (min(S, 512), H), 128 threads: each block walks segments s = x, x + gridDim.x, ...;
//            per segment dO [Q][Dv] and per tile P, dS [Q][32] in shared; a position belongs to one
//            segment, so the block writes its rows of dk, dv alone; dq accumulates in shared [Q][D] and
//            goes to one fp32 share per block, summed in a fixed order by a second kernel.

#include <cstdint>

#include "cuda_common.cuh"
#include "segment_pool_cuda.h"

namespace agf_segpool {
namespace {

constexpr int kThreads = 128;
constexpr int kTile = 32;  // positions per K/V tile

// Rows [row0, row0 + rows) of a [T, H, E] tensor at head h into shared fp32 [rows][pitch].
template <typename T>
__device__ void load_rows(float* dst, int pitch, const Rows& src, int h, int row0, int rows, int E) {
  const T* base = static_cast<const T*>(src.data) + h * src.sh;
  for (int idx = threadIdx.x; idx < rows * E; idx += blockDim.x) {
    const int r = idx / E, e = idx % E;
    dst[r * pitch + e] = agf::to_acc(base[static_cast<int64_t>(row0 + r) * src.st + e]);
  }
}

__device__ __forceinline__ float dot(const float* a, const float* b, int n) {
  float s = 0.f;
  for (int i = 0; i < n; ++i) s = fmaf(a[i], b[i], s);
  return s;
}

// ------------------------------------------------------------------------------------------------
// Forward
// ------------------------------------------------------------------------------------------------

size_t fwd_smem(int Q, int D, int Dv) {
  return sizeof(float) * (static_cast<size_t>(Q) * (D + 1) + kTile * (D + 1) + kTile * Dv + Q * kTile + Q * Dv +
                          3 * Q);
}

template <typename T>
__global__ void __launch_bounds__(kThreads) pool_fwd_kernel(FwdParams p) {
  const int Q = p.Q, D = p.D, Dv = p.Dv, PD = D + 1;
  extern __shared__ float smem[];
  float* qs = smem;                // [Q][PD]: scale·queries
  float* ks = qs + Q * PD;         // [kTile][PD]
  float* vs = ks + kTile * PD;     // [kTile][Dv]
  float* ps = vs + kTile * Dv;     // [Q][kTile]: scores, then probabilities
  float* acc = ps + Q * kTile;     // [Q][Dv]
  float* alpha_s = acc + Q * Dv;   // [Q]
  float* m_s = alpha_s + Q;        // [Q]
  float* l_s = m_s + Q;            // [Q]

  const int s = blockIdx.x, h = blockIdx.y;
  const int t0 = p.offsets[s], t1 = p.offsets[s + 1];
  const T* queries = static_cast<const T*>(p.queries);
  for (int idx = threadIdx.x; idx < Q * D; idx += blockDim.x) {
    const int q = idx / D, d = idx % D;
    qs[q * PD + d] = agf::to_acc(queries[(static_cast<int64_t>(q) * p.H + h) * D + d]) * p.scale;
  }
  for (int idx = threadIdx.x; idx < Q * Dv; idx += blockDim.x) acc[idx] = 0.f;
  float m_i = -INFINITY, l_i = 0.f;  // thread q < Q: query q's running max and sum

  for (int n0 = t0; n0 < t1; n0 += kTile) {
    const int rows = min(kTile, t1 - n0);
    __syncthreads();  // the previous tile's K/V/P are consumed
    load_rows<T>(ks, PD, p.k, h, n0, rows, D);
    load_rows<T>(vs, Dv, p.v, h, n0, rows, Dv);
    __syncthreads();
    for (int idx = threadIdx.x; idx < Q * rows; idx += blockDim.x) {
      const int q = idx / rows, r = idx % rows;
      ps[q * kTile + r] = dot(qs + q * PD, ks + r * PD, D);
    }
    __syncthreads();
    if (threadIdx.x < Q) {
      float* row = ps + threadIdx.x * kTile;
      float m_new = m_i;
      for (int r = 0; r < rows; ++r) m_new = fmaxf(m_new, row[r]);
      const float m_safe = m_new == -INFINITY ? 0.f : m_new;  // all scores -inf so far: exp gives 0, not NaN
      float sum = 0.f;
      for (int r = 0; r < rows; ++r) {
        const float e = expf(row[r] - m_safe);
        row[r] = e;
        sum += e;
      }
      const float alpha = expf(m_i - m_safe);
      l_i = l_i * alpha + sum;
      m_i = m_new;
      alpha_s[threadIdx.x] = alpha;
    }
    __syncthreads();
    for (int idx = threadIdx.x; idx < Q * Dv; idx += blockDim.x) {
      const int q = idx / Dv, e = idx % Dv;
      float a = acc[idx] * alpha_s[q];
      for (int r = 0; r < rows; ++r) a = fmaf(ps[q * kTile + r], vs[r * Dv + e], a);
      acc[idx] = a;
    }
  }

  if (threadIdx.x < Q) {
    m_s[threadIdx.x] = m_i;
    l_s[threadIdx.x] = l_i;
    p.lse[(static_cast<int64_t>(s) * Q + threadIdx.x) * p.H + h] = m_i + logf(l_i);
  }
  __syncthreads();
  T* out = static_cast<T*>(p.out);
  for (int idx = threadIdx.x; idx < Q * Dv; idx += blockDim.x) {
    const int q = idx / Dv, e = idx % Dv;
    out[((static_cast<int64_t>(s) * Q + q) * p.H + h) * Dv + e] = agf::from_acc<T>(acc[idx] / l_s[q]);
  }
}

// ------------------------------------------------------------------------------------------------
// Backward
// ------------------------------------------------------------------------------------------------

size_t bwd_smem(int Q, int D, int Dv) {
  return sizeof(float) * (static_cast<size_t>(Q) * (D + 1) + Q * Dv + kTile * (D + 1) + kTile * Dv +
                          2 * Q * kTile + Q * D + 2 * Q);
}

template <typename T>
__global__ void __launch_bounds__(kThreads) pool_bwd_kernel(BwdParams p) {
  const int Q = p.Q, D = p.D, Dv = p.Dv, H = p.H, PD = D + 1;
  extern __shared__ float smem[];
  float* qs = smem;                // [Q][PD]: scale·queries
  float* dos = qs + Q * PD;        // [Q][Dv]: the segment's upstream gradient
  float* ks = dos + Q * Dv;        // [kTile][PD]
  float* vs = ks + kTile * PD;     // [kTile][Dv]
  float* ps = vs + kTile * Dv;     // [Q][kTile]: probabilities
  float* ds = ps + Q * kTile;      // [Q][kTile]: dS = P (dP - delta)
  float* dqa = ds + Q * kTile;     // [Q][D]: sum over this block's segments of dS·k
  float* lse_s = dqa + Q * D;      // [Q]
  float* delta_s = lse_s + Q;      // [Q]: sum_e dO·O = sum_t P dP

  const int h = blockIdx.y;
  const T* queries = static_cast<const T*>(p.queries);
  const T* grad_out = static_cast<const T*>(p.grad_out);
  const T* out = static_cast<const T*>(p.out);
  T* dk = static_cast<T*>(p.dk);
  T* dv = static_cast<T*>(p.dv);
  for (int idx = threadIdx.x; idx < Q * D; idx += blockDim.x) {
    const int q = idx / D, d = idx % D;
    qs[q * PD + d] = agf::to_acc(queries[(static_cast<int64_t>(q) * H + h) * D + d]) * p.scale;
    dqa[idx] = 0.f;
  }

  for (int s = blockIdx.x; s < p.S; s += gridDim.x) {
    const int t0 = p.offsets[s], t1 = p.offsets[s + 1];
    __syncthreads();  // the previous segment's dO, lse, delta are consumed
    for (int idx = threadIdx.x; idx < Q * Dv; idx += blockDim.x) {
      const int q = idx / Dv, e = idx % Dv;
      dos[idx] = agf::to_acc(grad_out[((static_cast<int64_t>(s) * Q + q) * H + h) * Dv + e]);
    }
    for (int q = threadIdx.x; q < Q; q += blockDim.x) lse_s[q] = p.lse[(static_cast<int64_t>(s) * Q + q) * H + h];
    __syncthreads();
    if (threadIdx.x < Q) {
      const int q = threadIdx.x;
      const T* o = out + ((static_cast<int64_t>(s) * Q + q) * H + h) * Dv;
      float d = 0.f;
      for (int e = 0; e < Dv; ++e) d = fmaf(dos[q * Dv + e], agf::to_acc(o[e]), d);
      delta_s[q] = d;
    }
    for (int n0 = t0; n0 < t1; n0 += kTile) {
      const int rows = min(kTile, t1 - n0);
      __syncthreads();  // delta is written; the previous tile is consumed
      load_rows<T>(ks, PD, p.k, h, n0, rows, D);
      load_rows<T>(vs, Dv, p.v, h, n0, rows, Dv);
      __syncthreads();
      for (int idx = threadIdx.x; idx < Q * rows; idx += blockDim.x) {
        const int q = idx / rows, r = idx % rows;
        const float pr = expf(dot(qs + q * PD, ks + r * PD, D) - lse_s[q]);
        const float dp = dot(dos + q * Dv, vs + r * Dv, Dv);
        ps[q * kTile + r] = pr;
        ds[q * kTile + r] = pr * (dp - delta_s[q]);
      }
      __syncthreads();
      for (int idx = threadIdx.x; idx < rows * Dv; idx += blockDim.x) {
        const int r = idx / Dv, e = idx % Dv;
        float a = 0.f;
        for (int q = 0; q < Q; ++q) a = fmaf(ps[q * kTile + r], dos[q * Dv + e], a);
        dv[(static_cast<int64_t>(n0 + r) * H + h) * Dv + e] = agf::from_acc<T>(a);
      }
      for (int idx = threadIdx.x; idx < rows * D; idx += blockDim.x) {
        const int r = idx / D, d = idx % D;
        float a = 0.f;  // qs holds scale·queries: d score / dk = scale·q
        for (int q = 0; q < Q; ++q) a = fmaf(ds[q * kTile + r], qs[q * PD + d], a);
        dk[(static_cast<int64_t>(n0 + r) * H + h) * D + d] = agf::from_acc<T>(a);
      }
      for (int idx = threadIdx.x; idx < Q * D; idx += blockDim.x) {
        const int q = idx / D, d = idx % D;
        float a = dqa[idx];
        for (int r = 0; r < rows; ++r) a = fmaf(ds[q * kTile + r], ks[r * PD + d], a);
        dqa[idx] = a;
      }
    }
  }

  __syncthreads();
  for (int idx = threadIdx.x; idx < Q * D; idx += blockDim.x) {
    const int q = idx / D, d = idx % D;
    p.dq_partial[((static_cast<int64_t>(blockIdx.x) * Q + q) * H + h) * D + d] = dqa[idx];
  }
}

// dq[i] = scale · sum_b dq_partial[b][i], i over [Q, H, D]: one thread per element, shares in order.
template <typename T>
__global__ void __launch_bounds__(256) pool_bwd_dq_sum_kernel(BwdParams p) {
  const int64_t n = static_cast<int64_t>(p.Q) * p.H * p.D;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  float a = 0.f;
  for (int b = 0; b < p.partials; ++b) a += p.dq_partial[b * n + i];
  static_cast<T*>(p.dq)[i] = agf::from_acc<T>(a * p.scale);
}

// ------------------------------------------------------------------------------------------------
// Launchers
// ------------------------------------------------------------------------------------------------

template <typename Kernel> cudaError_t allow_smem(Kernel kernel, size_t bytes) {
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
}

bool fits(int Q, int D, int Dv) {
  return Q >= 1 && Q <= kMaxQueries && D >= 1 && D <= kMaxHeadDim && Dv >= 1 && Dv <= kMaxHeadDim;
}

template <typename T> cudaError_t fwd_typed(const FwdParams& p, cudaStream_t stream) {
  if (!fits(p.Q, p.D, p.Dv) || p.S < 1 || p.H > 65535) return cudaErrorInvalidValue;
  const size_t smem = fwd_smem(p.Q, p.D, p.Dv);
  AGF_CUDA_RETURN_IF_ERROR(allow_smem(pool_fwd_kernel<T>, smem));
  pool_fwd_kernel<T><<<dim3(p.S, p.H), kThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

template <typename T> cudaError_t bwd_typed(const BwdParams& p, cudaStream_t stream) {
  if (!fits(p.Q, p.D, p.Dv) || p.S < 1 || p.H > 65535 || p.partials < 1 || p.partials > p.S)
    return cudaErrorInvalidValue;
  const size_t smem = bwd_smem(p.Q, p.D, p.Dv);
  AGF_CUDA_RETURN_IF_ERROR(allow_smem(pool_bwd_kernel<T>, smem));
  pool_bwd_kernel<T><<<dim3(p.partials, p.H), kThreads, smem, stream>>>(p);
  AGF_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  const int n = p.Q * p.H * p.D;
  pool_bwd_dq_sum_kernel<T><<<agf::ceil_div(n, 256), 256, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace

cudaError_t fwd(const FwdParams& p, DType dtype, cudaStream_t stream) {
  return agf::by_dtype(dtype, [&](auto t) { return fwd_typed<decltype(t)>(p, stream); });
}

cudaError_t bwd(const BwdParams& p, DType dtype, cudaStream_t stream) {
  return agf::by_dtype(dtype, [&](auto t) { return bwd_typed<decltype(t)>(p, stream); });
}

}  // namespace agf_segpool
