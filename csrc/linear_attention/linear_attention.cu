// CUDA kernels of causal linear attention (docs/ops.md §1.1), chunked in C = 64 tokens; fp32 accumulation
// and fp32 states for fp32/fp16/bf16 inputs; feature map and normalizer fused. sm_80 and sm_90.
//
// forward   chunk_states_fwd_kernel   grid (n·H, Dv/32), 256 threads: walks its sequence's chunks in
//                                     order; thread (lane, warp) keeps S[lane + 32a][warp + 8b] (4×4) in
//                                     registers; 32-token k̂, v tiles in shared memory; writes the state
//                                     before every chunk (chunk_S, Sᵀ layout) and the final one.
//           chunk_output_fwd_kernel   grid (chunks, H, Dv/64), 256 threads, each a 4×4 piece of the 64×64
//                                     scores and of the 64×64 output tile; q̂, k̂ and the state staged in
//                                     16-wide slices of D; scores then v whole in shared memory (46 KB).
// backward  chunk_dstates_bwd_kernel  the mirror of the states sweep, in reverse: dS = Σ q̂ᵀ dnum and
//                                     dz = Σ q̂ᵀ dden of later chunks, written per chunk.
//           chunk_grads_bwd_kernel    grid (chunks, H): scores A and their gradient Bm (64×64 each) stay in
//                                     shared memory; dq, dk by 64-wide column blocks of D, dv of Dv,
//                                     each a sum of two 64×64×(16-slice) products (43.5 KB shared).
// step      step_kernel               grid (B·H), 128 threads, thread j owns column j of S.
// dnum = do/den and dden = -(do·o)/den are the gradients of the numerator and of the denominator.
// The products use fp32 FMAs on CUDA cores (no tensor cores): exact fp32 state math first.

#include <cuda_runtime.h>

#include "cuda_common.cuh"
#include "linear_attention_cuda.h"

namespace agf_la {

constexpr int kThreads = 256;
constexpr int C = kChunk;

template <typename T>
__device__ __forceinline__ const T* row_ptr(const Rows& r, int64_t b, int64_t t, int64_t h) {
  return static_cast<const T*>(r.data) + b * r.sb + t * r.sl + h * r.sh;
}
template <typename T>
__device__ __forceinline__ T* row_ptr_mut(const Rows& r, int64_t b, int64_t t, int64_t h) {
  return static_cast<T*>(r.data) + b * r.sb + t * r.sl + h * r.sh;
}

// φ(x) = elu(x) + 1 + eps = x + 1 + eps (x > 0), exp(x) + eps (x <= 0); identity otherwise.
__device__ __forceinline__ float feature(float x, const Options& o) {
  if (!o.elu) return x;
  return x > 0.f ? x + 1.f + o.feature_eps : __expf(fminf(x, 0.f)) + o.feature_eps;
}
__device__ __forceinline__ float feature_grad(float x, const Options& o) {
  if (!o.elu) return 1.f;
  return x > 0.f ? 1.f : __expf(fminf(x, 0.f));
}

struct Span {
  int b;          // batch row
  int start;      // first token of the sequence
  int len;        // its length
  int64_t base;   // chunk-state row of its first chunk
};

__device__ __forceinline__ Span sequence(const Sequences& s, int seq) {
  if (s.cu_seqlens == nullptr) return {seq, 0, s.L, static_cast<int64_t>(seq) * s.NC};
  const int start = s.cu_seqlens[seq], end = s.cu_seqlens[seq + 1];
  return {0, start, end - start, static_cast<int64_t>(start / C + seq)};
}

// The sequence of chunk program pid and the chunk's index in it.
__device__ __forceinline__ Span chunk_of(const Sequences& s, int pid, int& c) {
  if (s.cu_seqlens == nullptr) {
    c = pid % s.NC;
    return sequence(s, pid / s.NC);
  }
  c = s.chunk_idx[pid];
  return sequence(s, s.chunk_seq[pid]);
}

// acc[a][b] += Σ_p X[row_a, p]·Y[p, col_b] for rows ty + 16a, cols tx + 16b: each thread's 4×4 piece
// of a 64×64 product; X[r, p] = X[r·xr + p·xp], Y[p, c] = Y[p·yp + c·yc] in shared memory.
__device__ __forceinline__ void mma_4x4(float (&acc)[4][4], const float* X, int xr, int xp, const float* Y, int yp,
                                        int yc, int K, int ty, int tx) {
  for (int p = 0; p < K; ++p) {
    float x[4], y[4];
#pragma unroll
    for (int a = 0; a < 4; ++a) x[a] = X[(ty + 16 * a) * xr + p * xp];
#pragma unroll
    for (int b = 0; b < 4; ++b) y[b] = Y[p * yp + (tx + 16 * b) * yc];
#pragma unroll
    for (int a = 0; a < 4; ++a)
#pragma unroll
      for (int b = 0; b < 4; ++b) acc[a][b] = fmaf(x[a], y[b], acc[a][b]);
  }
}

__device__ __forceinline__ void zero_4x4(float (&acc)[4][4]) {
#pragma unroll
  for (int a = 0; a < 4; ++a)
#pragma unroll
    for (int b = 0; b < 4; ++b) acc[a][b] = 0.f;
}

// ---- forward -----------------------------------------------------------------------------------

constexpr int kSub = 32;  // tokens per shared-memory tile in the sequential sweeps
constexpr int kSweepBV = 32;

template <typename T>
__global__ void __launch_bounds__(kThreads) chunk_states_fwd_kernel(FwdParams p) {
  __shared__ float ks[kSub][kMaxHeadDim + 1];
  __shared__ float vs[kSub][kSweepBV + 1];
  const Options& o = p.opt;
  const int H = p.seq.H, D = o.D, Dv = o.Dv;
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int seq = blockIdx.x / H, h = blockIdx.x % H, j0 = blockIdx.y * kSweepBV;
  const Span s = sequence(p.seq, seq);
  const int64_t state = static_cast<int64_t>(seq) * H + h;

  float S[4][4];
#pragma unroll
  for (int a = 0; a < 4; ++a)
#pragma unroll
    for (int b = 0; b < 4; ++b) {
      const int d = lane + 32 * a, j = j0 + warp + 8 * b;
      S[a][b] = (p.S0 != nullptr && d < D && j < Dv) ? p.S0[(state * D + d) * Dv + j] : 0.f;
    }
  float z = (p.z0 != nullptr && tid < D) ? p.z0[state * D + tid] : 0.f;

  const int n_chunks = (s.len + C - 1) / C;
  for (int c = 0; c < n_chunks; ++c) {
    const int64_t row = (s.base + c) * H + h;
#pragma unroll
    for (int a = 0; a < 4; ++a)
#pragma unroll
      for (int b = 0; b < 4; ++b) {
        const int d = lane + 32 * a, j = j0 + warp + 8 * b;
        if (d < D && j < Dv) p.chunk_S[(row * Dv + j) * D + d] = S[a][b];
      }
    if (blockIdx.y == 0 && tid < D) p.chunk_z[row * D + tid] = z;
    for (int sub = 0; sub < C; sub += kSub) {
      const int t0 = c * C + sub, n = min(kSub, s.len - t0);
      if (n <= 0) break;
      __syncthreads();
      for (int i = tid; i < kSub * D; i += kThreads) {
        const int t = i / D, d = i % D;
        ks[t][d] = t < n ? feature(agf::to_acc(row_ptr<T>(p.k, s.b, s.start + t0 + t, h)[d]), o) : 0.f;
      }
      for (int i = tid; i < kSub * kSweepBV; i += kThreads) {
        const int t = i / kSweepBV, jj = i % kSweepBV;
        vs[t][jj] = (t < n && j0 + jj < Dv) ? agf::to_acc(row_ptr<T>(p.v, s.b, s.start + t0 + t, h)[j0 + jj]) : 0.f;
      }
      __syncthreads();
      for (int t = 0; t < n; ++t) {
#pragma unroll
        for (int a = 0; a < 4; ++a) {
          const float kd = lane + 32 * a < D ? ks[t][lane + 32 * a] : 0.f;
#pragma unroll
          for (int b = 0; b < 4; ++b) S[a][b] = fmaf(kd, vs[t][warp + 8 * b], S[a][b]);
        }
      }
      if (blockIdx.y == 0 && tid < D)
        for (int t = 0; t < n; ++t) z += ks[t][tid];
    }
  }
#pragma unroll
  for (int a = 0; a < 4; ++a)
#pragma unroll
    for (int b = 0; b < 4; ++b) {
      const int d = lane + 32 * a, j = j0 + warp + 8 * b;
      if (d < D && j < Dv) p.S[(state * D + d) * Dv + j] = S[a][b];
    }
  if (blockIdx.y == 0 && tid < D) p.z[state * D + tid] = z;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) chunk_output_fwd_kernel(FwdParams p) {
  __shared__ float qs[C * 17];
  __shared__ float ks[C * 17];
  __shared__ float ss[16 * 65];
  __shared__ float as[C * 65];
  __shared__ float vs[C * 65];
  __shared__ float den_s[C];
  const Options& o = p.opt;
  const int H = p.seq.H, D = o.D, Dv = o.Dv;
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  const int h = blockIdx.y, j0 = blockIdx.z * 64;
  int c;
  const Span s = chunk_of(p.seq, blockIdx.x, c);
  const int t0 = c * C, n = min(C, s.len - t0);
  const int64_t row = (s.base + c) * H + h;

  float accA[4][4], accN[4][4];
  zero_4x4(accA);
  zero_4x4(accN);
  float den_inter = 0.f;  // q̂_t·z for t = tid < 64
  for (int d0 = 0; d0 < D; d0 += 16) {
    __syncthreads();
    for (int i = tid; i < C * 16; i += kThreads) {
      const int t = i / 16, dd = i % 16, d = d0 + dd;
      const bool ok = t < n && d < D;
      const int64_t tok = s.start + t0 + t;
      qs[t * 17 + dd] = ok ? o.scale * feature(agf::to_acc(row_ptr<T>(p.q, s.b, tok, h)[d]), o) : 0.f;
      ks[t * 17 + dd] = ok ? feature(agf::to_acc(row_ptr<T>(p.k, s.b, tok, h)[d]), o) : 0.f;
    }
    for (int i = tid; i < 16 * 64; i += kThreads) {
      const int dd = i % 16, jj = i / 16, d = d0 + dd, j = j0 + jj;
      ss[dd * 65 + jj] = (d < D && j < Dv) ? p.chunk_S[(row * Dv + j) * D + d] : 0.f;
    }
    __syncthreads();
    mma_4x4(accA, qs, 17, 1, ks, 1, 17, 16, ty, tx);
    mma_4x4(accN, qs, 17, 1, ss, 65, 1, 16, ty, tx);
    if (o.normalize && tid < C)
      for (int dd = 0; dd < 16 && d0 + dd < D; ++dd) den_inter += qs[tid * 17 + dd] * p.chunk_z[row * D + d0 + dd];
  }
#pragma unroll
  for (int a = 0; a < 4; ++a)
#pragma unroll
    for (int b = 0; b < 4; ++b) {
      const int t = ty + 16 * a, u = tx + 16 * b;
      as[t * 65 + u] = t >= u ? accA[a][b] : 0.f;
    }
  for (int i = tid; i < C * 64; i += kThreads) {
    const int t = i / 64, jj = i % 64, j = j0 + jj;
    vs[t * 65 + jj] = (t < n && j < Dv) ? agf::to_acc(row_ptr<T>(p.v, s.b, s.start + t0 + t, h)[j]) : 0.f;
  }
  __syncthreads();
  if (o.normalize && tid < C) {
    float sum = den_inter + o.eps;
    for (int u = 0; u <= tid; ++u) sum += as[tid * 65 + u];
    den_s[tid] = sum;
    if (blockIdx.z == 0 && tid < n) p.den[(static_cast<int64_t>(s.b) * H + h) * p.seq.L + s.start + t0 + tid] = sum;
  }
  mma_4x4(accN, as, 65, 1, vs, 65, 1, C, ty, tx);
  __syncthreads();
#pragma unroll
  for (int a = 0; a < 4; ++a) {
    const int t = ty + 16 * a;
    if (t >= n) continue;
    T* out = row_ptr_mut<T>(p.o, s.b, s.start + t0 + t, h);
    const float inv = o.normalize ? 1.f / den_s[t] : 1.f;
#pragma unroll
    for (int b = 0; b < 4; ++b) {
      const int j = j0 + tx + 16 * b;
      if (j < Dv) out[j] = agf::from_acc<T>(accN[a][b] * inv);
    }
  }
}

// ---- backward ----------------------------------------------------------------------------------

template <typename T>
__global__ void __launch_bounds__(kThreads) chunk_dstates_bwd_kernel(BwdParams p) {
  __shared__ float qs[kSub][kMaxHeadDim + 1];
  __shared__ float gnum[kSub][kSweepBV + 1];
  __shared__ float dden[kSub];
  const Options& o = p.opt;
  const int H = p.seq.H, D = o.D, Dv = o.Dv;
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int seq = blockIdx.x / H, h = blockIdx.x % H, j0 = blockIdx.y * kSweepBV;
  const Span s = sequence(p.seq, seq);
  const int64_t state = static_cast<int64_t>(seq) * H + h;
  const float* den_row = o.normalize ? p.den + (static_cast<int64_t>(s.b) * H + h) * p.seq.L + s.start : nullptr;

  float dS[4][4];
#pragma unroll
  for (int a = 0; a < 4; ++a)
#pragma unroll
    for (int b = 0; b < 4; ++b) {
      const int d = lane + 32 * a, j = j0 + warp + 8 * b;
      dS[a][b] = (p.dS != nullptr && d < D && j < Dv) ? p.dS[(state * D + d) * Dv + j] : 0.f;
    }
  float dz = (p.dz != nullptr && tid < D) ? p.dz[state * D + tid] : 0.f;

  const int n_chunks = (s.len + C - 1) / C;
  for (int c = n_chunks - 1; c >= 0; --c) {
    const int64_t row = (s.base + c) * H + h;
#pragma unroll
    for (int a = 0; a < 4; ++a)
#pragma unroll
      for (int b = 0; b < 4; ++b) {
        const int d = lane + 32 * a, j = j0 + warp + 8 * b;
        if (d < D && j < Dv) p.chunk_dS[(row * Dv + j) * D + d] = dS[a][b];
      }
    if (blockIdx.y == 0 && tid < D) p.chunk_dz[row * D + tid] = dz;
    for (int sub = 0; sub < C; sub += kSub) {
      const int t0 = c * C + sub, n = min(kSub, s.len - t0);
      if (n <= 0) break;
      __syncthreads();
      for (int i = tid; i < kSub * D; i += kThreads) {
        const int t = i / D, d = i % D;
        qs[t][d] = t < n ? o.scale * feature(agf::to_acc(row_ptr<T>(p.q, s.b, s.start + t0 + t, h)[d]), o) : 0.f;
      }
      for (int i = tid; i < kSub * kSweepBV; i += kThreads) {
        const int t = i / kSweepBV, jj = i % kSweepBV;
        float g = 0.f;
        if (t < n && j0 + jj < Dv) {
          g = agf::to_acc(row_ptr<T>(p.grad_o, s.b, s.start + t0 + t, h)[j0 + jj]);
          if (o.normalize) g /= den_row[t0 + t];
        }
        gnum[t][jj] = g;
      }
      if (o.normalize && blockIdx.y == 0 && tid < n) {
        const T* gr = row_ptr<T>(p.grad_o, s.b, s.start + t0 + tid, h);
        const T* orow = row_ptr<T>(p.o, s.b, s.start + t0 + tid, h);
        float dot = 0.f;
        for (int j = 0; j < Dv; ++j) dot += agf::to_acc(gr[j]) * agf::to_acc(orow[j]);
        dden[tid] = -dot / den_row[t0 + tid];
      }
      __syncthreads();
      for (int t = 0; t < n; ++t) {
#pragma unroll
        for (int a = 0; a < 4; ++a) {
          const float qd = lane + 32 * a < D ? qs[t][lane + 32 * a] : 0.f;
#pragma unroll
          for (int b = 0; b < 4; ++b) dS[a][b] = fmaf(qd, gnum[t][warp + 8 * b], dS[a][b]);
        }
      }
      if (o.normalize && blockIdx.y == 0 && tid < D)
        for (int t = 0; t < n; ++t) dz += qs[t][tid] * dden[t];
    }
  }
#pragma unroll
  for (int a = 0; a < 4; ++a)
#pragma unroll
    for (int b = 0; b < 4; ++b) {
      const int d = lane + 32 * a, j = j0 + warp + 8 * b;
      if (d < D && j < Dv) p.dS0[(state * D + d) * Dv + j] = dS[a][b];
    }
  if (blockIdx.y == 0 && tid < D) p.dz0[state * D + tid] = dz;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) chunk_grads_bwd_kernel(BwdParams p) {
  __shared__ float as[C * 65];  // scores A and their gradient Bm, both masked to s <= t
  __shared__ float bs[C * 65];
  __shared__ float x1[C * 17];  // staging: [64][17] slices, or x2 as [16][65]
  __shared__ float x2[C * 17];
  __shared__ float dden[C];
  __shared__ float inv_den[C];
  __shared__ float zs[kMaxHeadDim];
  __shared__ float dzs[kMaxHeadDim];
  const Options& o = p.opt;
  const int H = p.seq.H, D = o.D, Dv = o.Dv;
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  const int h = blockIdx.y;
  int c;
  const Span s = chunk_of(p.seq, blockIdx.x, c);
  const int t0 = c * C, n = min(C, s.len - t0);
  const int64_t row = (s.base + c) * H + h, tok0 = s.start + t0;
  const float* Sc = p.chunk_S + row * Dv * D;    // element (d, j) at j·D + d
  const float* dSc = p.chunk_dS + row * Dv * D;

  if (tid < C) {
    float g = 0.f, inv = 0.f;
    if (tid < n) {
      inv = 1.f;
      if (o.normalize) {
        inv = 1.f / p.den[(static_cast<int64_t>(s.b) * H + h) * p.seq.L + tok0 + tid];
        const T* gr = row_ptr<T>(p.grad_o, s.b, tok0 + tid, h);
        const T* orow = row_ptr<T>(p.o, s.b, tok0 + tid, h);
        float dot = 0.f;
        for (int j = 0; j < Dv; ++j) dot += agf::to_acc(gr[j]) * agf::to_acc(orow[j]);
        g = -dot * inv;
      }
    }
    dden[tid] = g;
    inv_den[tid] = inv;
  }
  if (tid < D) {
    zs[tid] = p.chunk_z[row * D + tid];
    dzs[tid] = p.chunk_dz[row * D + tid];
  }
  // q̂ (mul = scale), k̂ or dnum = do/den, v (raw) of tokens [0, 64) and columns [c0, c0 + 16) -> [64][17].
  auto stage_feature = [&](float* dst, const Rows& src, int c0, int E, float mul) {
    for (int i = tid; i < C * 16; i += kThreads) {
      const int t = i / 16, cc = i % 16, col = c0 + cc;
      dst[t * 17 + cc] =
          (t < n && col < E) ? mul * feature(agf::to_acc(row_ptr<T>(src, s.b, tok0 + t, h)[col]), o) : 0.f;
    }
  };
  auto stage_raw = [&](float* dst, const Rows& src, int c0, int E, bool by_den) {
    for (int i = tid; i < C * 16; i += kThreads) {
      const int t = i / 16, cc = i % 16, col = c0 + cc;
      float x = 0.f;
      if (t < n && col < E) {
        x = agf::to_acc(row_ptr<T>(src, s.b, tok0 + t, h)[col]);
        if (by_den) x *= inv_den[t];
      }
      dst[t * 17 + cc] = x;
    }
  };
  // Tokens [p0, p0 + 16) and columns [c0, c0 + 64) -> [16][65], as for stage_*.
  auto stage_tokens = [&](float* dst, const Rows& src, int p0, int c0, int E, bool feat, float mul, bool by_den) {
    for (int i = tid; i < 16 * 64; i += kThreads) {
      const int pp = i / 64, cc = i % 64, t = p0 + pp, col = c0 + cc;
      float x = 0.f;
      if (t < n && col < E) {
        x = agf::to_acc(row_ptr<T>(src, s.b, tok0 + t, h)[col]);
        if (feat) x = mul * feature(x, o);
        if (by_den) x *= inv_den[t];
      }
      dst[pp * 65 + cc] = x;
    }
  };
  // A state block as [16][65]: rows r0 + [0, 16) and columns c0 + [0, 64) of M (d, j) = base[j·D + d],
  // either indexed (d, j) (by_d: rows are d) or (j, d).
  auto stage_state = [&](float* dst, const float* base, int r0, int c0, bool rows_are_d) {
    for (int i = tid; i < 16 * 64; i += kThreads) {
      int rr, cc;
      if (rows_are_d) {  // consecutive threads walk d, the contiguous index
        rr = i % 16;
        cc = i / 16;
      } else {
        cc = i % 64;
        rr = i / 64;
      }
      const int d = rows_are_d ? r0 + rr : c0 + cc, j = rows_are_d ? c0 + cc : r0 + rr;
      dst[rr * 65 + cc] = (d < D && j < Dv) ? base[static_cast<int64_t>(j) * D + d] : 0.f;
    }
  };

  // Scores A = q̂k̂ᵀ and their gradient Bm = dnum vᵀ + dden, masked to s <= t.
  float acc[4][4];
  zero_4x4(acc);
  for (int d0 = 0; d0 < D; d0 += 16) {
    __syncthreads();
    stage_feature(x1, p.q, d0, D, o.scale);
    stage_feature(x2, p.k, d0, D, 1.f);
    __syncthreads();
    mma_4x4(acc, x1, 17, 1, x2, 1, 17, 16, ty, tx);
  }
#pragma unroll
  for (int a = 0; a < 4; ++a)
#pragma unroll
    for (int b = 0; b < 4; ++b) {
      const int t = ty + 16 * a, u = tx + 16 * b;
      as[t * 65 + u] = t >= u ? acc[a][b] : 0.f;
    }
  zero_4x4(acc);
  for (int j0 = 0; j0 < Dv; j0 += 16) {
    __syncthreads();
    stage_raw(x1, p.grad_o, j0, Dv, true);
    stage_raw(x2, p.v, j0, Dv, false);
    __syncthreads();
    mma_4x4(acc, x1, 17, 1, x2, 1, 17, 16, ty, tx);
  }
#pragma unroll
  for (int a = 0; a < 4; ++a)
#pragma unroll
    for (int b = 0; b < 4; ++b) {
      const int t = ty + 16 * a, u = tx + 16 * b;
      bs[t * 65 + u] = t >= u ? acc[a][b] + dden[t] : 0.f;
    }

  // dq̂ = Bm k̂ + dnum Sᵀ + dden zᵀ, by 64-wide blocks of D.
  for (int c0 = 0; c0 < D; c0 += 64) {
    zero_4x4(acc);
    for (int p0 = 0; p0 < C; p0 += 16) {
      __syncthreads();
      stage_tokens(x2, p.k, p0, c0, D, true, 1.f, false);
      __syncthreads();
      mma_4x4(acc, bs + p0, 65, 1, x2, 65, 1, 16, ty, tx);
    }
    for (int j0 = 0; j0 < Dv; j0 += 16) {
      __syncthreads();
      stage_raw(x1, p.grad_o, j0, Dv, true);
      stage_state(x2, Sc, j0, c0, false);  // x2[jj][dd] = S[c0 + dd][j0 + jj]
      __syncthreads();
      mma_4x4(acc, x1, 17, 1, x2, 65, 1, 16, ty, tx);
    }
#pragma unroll
    for (int a = 0; a < 4; ++a) {
      const int t = ty + 16 * a;
      if (t >= n) continue;
      const T* x = row_ptr<T>(p.q, s.b, tok0 + t, h);
      T* out = row_ptr_mut<T>(p.dq, s.b, tok0 + t, h);
#pragma unroll
      for (int b = 0; b < 4; ++b) {
        const int d = c0 + tx + 16 * b;
        if (d >= D) continue;
        const float g = acc[a][b] + (o.normalize ? dden[t] * zs[d] : 0.f);
        out[d] = agf::from_acc<T>(g * o.scale * feature_grad(agf::to_acc(x[d]), o));
      }
    }
  }

  // dk̂ = Bmᵀ q̂ + v dSᵀ + dz, by 64-wide blocks of D.
  for (int c0 = 0; c0 < D; c0 += 64) {
    zero_4x4(acc);
    for (int p0 = 0; p0 < C; p0 += 16) {
      __syncthreads();
      stage_tokens(x2, p.q, p0, c0, D, true, o.scale, false);
      __syncthreads();
      mma_4x4(acc, bs + p0 * 65, 1, 65, x2, 65, 1, 16, ty, tx);  // X[s, p] = Bm[p0 + p, s]
    }
    for (int j0 = 0; j0 < Dv; j0 += 16) {
      __syncthreads();
      stage_raw(x1, p.v, j0, Dv, false);
      stage_state(x2, dSc, j0, c0, false);
      __syncthreads();
      mma_4x4(acc, x1, 17, 1, x2, 65, 1, 16, ty, tx);
    }
#pragma unroll
    for (int a = 0; a < 4; ++a) {
      const int t = ty + 16 * a;
      if (t >= n) continue;
      const T* x = row_ptr<T>(p.k, s.b, tok0 + t, h);
      T* out = row_ptr_mut<T>(p.dk, s.b, tok0 + t, h);
#pragma unroll
      for (int b = 0; b < 4; ++b) {
        const int d = c0 + tx + 16 * b;
        if (d >= D) continue;
        out[d] = agf::from_acc<T>((acc[a][b] + dzs[d]) * feature_grad(agf::to_acc(x[d]), o));
      }
    }
  }

  // dv = Aᵀ dnum + k̂ dS, by 64-wide blocks of Dv.
  for (int c0 = 0; c0 < Dv; c0 += 64) {
    zero_4x4(acc);
    for (int p0 = 0; p0 < C; p0 += 16) {
      __syncthreads();
      stage_tokens(x2, p.grad_o, p0, c0, Dv, false, 1.f, true);
      __syncthreads();
      mma_4x4(acc, as + p0 * 65, 1, 65, x2, 65, 1, 16, ty, tx);  // X[s, p] = A[p0 + p, s]
    }
    for (int d0 = 0; d0 < D; d0 += 16) {
      __syncthreads();
      stage_feature(x1, p.k, d0, D, 1.f);
      stage_state(x2, dSc, d0, c0, true);  // x2[dd][jj] = dS[d0 + dd][c0 + jj]
      __syncthreads();
      mma_4x4(acc, x1, 17, 1, x2, 65, 1, 16, ty, tx);
    }
#pragma unroll
    for (int a = 0; a < 4; ++a) {
      const int t = ty + 16 * a;
      if (t >= n) continue;
      T* out = row_ptr_mut<T>(p.dv, s.b, tok0 + t, h);
#pragma unroll
      for (int b = 0; b < 4; ++b) {
        const int j = c0 + tx + 16 * b;
        if (j < Dv) out[j] = agf::from_acc<T>(acc[a][b]);
      }
    }
  }
}

// ---- decode step -------------------------------------------------------------------------------

template <typename T>
__global__ void __launch_bounds__(kMaxHeadDim) step_kernel(StepParams p) {
  __shared__ float qh[kMaxHeadDim];
  __shared__ float kh[kMaxHeadDim];
  __shared__ float partial[kMaxHeadDim];
  const Options& o = p.opt;
  const int D = o.D, Dv = o.Dv, tid = threadIdx.x;
  const int64_t bh = blockIdx.x, b = bh / p.H, h = bh % p.H;
  const T* q = static_cast<const T*>(p.q) + b * p.q_sb + h * p.q_sh;
  const T* k = static_cast<const T*>(p.k) + b * p.k_sb + h * p.k_sh;
  const T* v = static_cast<const T*>(p.v) + b * p.v_sb + h * p.v_sh;
  float* S = p.S + bh * D * Dv;
  float* z = p.z + bh * D;
  if (tid < D) {
    qh[tid] = o.scale * feature(agf::to_acc(q[tid]), o);
    kh[tid] = feature(agf::to_acc(k[tid]), o);
    const float zn = z[tid] + kh[tid];
    z[tid] = zn;
    partial[tid] = qh[tid] * zn;
  }
  __syncthreads();
  if (tid < Dv) {
    const float vj = agf::to_acc(v[tid]);
    float num = 0.f;
    for (int d = 0; d < D; ++d) {
      const float sn = S[static_cast<int64_t>(d) * Dv + tid] + kh[d] * vj;
      S[static_cast<int64_t>(d) * Dv + tid] = sn;
      num += qh[d] * sn;
    }
    if (o.normalize) {
      float den = o.eps;
      for (int d = 0; d < D; ++d) den += partial[d];
      num /= den;
    }
    static_cast<T*>(p.o)[bh * Dv + tid] = agf::from_acc<T>(num);
  }
}

// ---- launchers ---------------------------------------------------------------------------------

template <typename T>
cudaError_t fwd_typed(const FwdParams& p, cudaStream_t stream) {
  const int sweeps = p.seq.n_seq * p.seq.H;
  if (sweeps > 0) {
    chunk_states_fwd_kernel<T><<<dim3(sweeps, agf::ceil_div(p.opt.Dv, kSweepBV)), kThreads, 0, stream>>>(p);
    AGF_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  }
  if (p.seq.n_chunks > 0) {
    chunk_output_fwd_kernel<T><<<dim3(p.seq.n_chunks, p.seq.H, agf::ceil_div(p.opt.Dv, 64)), kThreads, 0, stream>>>(p);
    AGF_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  }
  return cudaSuccess;
}

template <typename T>
cudaError_t bwd_typed(const BwdParams& p, cudaStream_t stream) {
  const int sweeps = p.seq.n_seq * p.seq.H;
  if (sweeps > 0) {
    chunk_dstates_bwd_kernel<T><<<dim3(sweeps, agf::ceil_div(p.opt.Dv, kSweepBV)), kThreads, 0, stream>>>(p);
    AGF_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  }
  if (p.seq.n_chunks > 0) {
    chunk_grads_bwd_kernel<T><<<dim3(p.seq.n_chunks, p.seq.H), kThreads, 0, stream>>>(p);
    AGF_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  }
  return cudaSuccess;
}

template <typename T>
cudaError_t step_typed(const StepParams& p, cudaStream_t stream) {
  if (p.B * p.H == 0) return cudaSuccess;
  step_kernel<T><<<p.B * p.H, kMaxHeadDim, 0, stream>>>(p);
  return cudaGetLastError();
}

cudaError_t fwd(const FwdParams& p, DType dtype, cudaStream_t stream) {
  return agf::by_dtype(dtype, [&](auto t) { return fwd_typed<decltype(t)>(p, stream); });
}

cudaError_t bwd(const BwdParams& p, DType dtype, cudaStream_t stream) {
  return agf::by_dtype(dtype, [&](auto t) { return bwd_typed<decltype(t)>(p, stream); });
}

cudaError_t step(const StepParams& p, DType dtype, cudaStream_t stream) {
  return agf::by_dtype(dtype, [&](auto t) { return step_typed<decltype(t)>(p, stream); });
}

}  // namespace agf_la
