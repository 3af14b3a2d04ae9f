// Causal sliding-window attention on CUDA (sm_80 / sm_90): forward, backward and decode step.
//
// Query i sees keys j with max(i - window + 1, seg_start[i]) <= j <= i. Every block walks only the
// tiles its window reaches, so work per block is O(window + tile); element masks are evaluated only
// on tiles that cross a window edge, a sequence start or the end of the data.
//
// SIMT kernels (fp32 FMA on CUDA cores, fp32 accumulation for every input dtype): tiles are staged
// in shared memory as fp32, each thread owns a small register micro-tile of every product, and the
// only synchronization is __syncthreads (no warp shuffles). Scores are kept in log2 units (the
// scale folded with log2 e) so the softmax uses exp2f; the forward saves lse2 = m + log2(l).
//
//   forward  grid (cdiv(L, 64), B*H), 256 threads: Q tile [64][D] stays in shared memory, K/V
//            tiles [64][D] stream through; S/P tile [64][64] in shared; O accumulator in registers
//            (rows r0 + 16i, columns c0 + 16c of the [64][D] tile per thread).
//   dq       grid (cdiv(L, 64), B*H): Q, dO tiles [64][D] stay; K/V tiles [32][D] stream; P, dS
//            [64][32] in shared; dQ in registers.
//   dk/dv    grid (cdiv(L, 64), B*H): K, V tiles [64][D] stay; Q/dO tiles [32][D] stream over the
//            queries that see the block; dK, dV in registers.
//   step     grid (B*H), 128 threads: scores of the W ring slots in shared memory.

#include <algorithm>
#include <cstdint>

#include "cuda_common.cuh"
#include "sliding_window_attention_cuda.h"

namespace agf_swa {
namespace {

constexpr int kThreads = 256;
constexpr float kLog2e = 1.4426950408889634f;

template <int DMAX> struct Tile {
  static constexpr int pitch = DMAX + 1;  // odd pitch: rows read down a column hit distinct banks
};

// Rows [row0, row0 + rows) of a [B, L, H, E] tensor at (b, h) into shared fp32 [rows][pitch],
// times `mul`; zeros past L and past E.
template <typename T>
__device__ void load_rows(float* dst, int pitch, const Rows& src, int b, int h, int row0, int rows, int L, int E,
                          int emax, float mul) {
  const T* base = static_cast<const T*>(src.data) + b * src.sb + h * src.sh;
  for (int idx = threadIdx.x; idx < rows * emax; idx += blockDim.x) {
    const int r = idx / emax, e = idx % emax, l = row0 + r;
    float x = 0.f;
    if (l < L && e < E) x = agf::to_acc(base[static_cast<int64_t>(l) * src.sl + e]) * mul;
    dst[r * pitch + e] = x;
  }
}

// C[r][c] = sum_{k < K} A[r][k] * B[c][k] for a ROWS x COLS tile; thread t owns rows
// t / GC + i * (ROWS / TM) and columns t % GC + j * GC (GC = COLS / TN column groups).
template <int ROWS, int COLS, int TM, int TN>
__device__ void tile_dot(const float* A, int lda, const float* B, int ldb, int K, float* C, int ldc) {
  constexpr int GC = COLS / TN, RS = ROWS / TM;
  static_assert(RS * GC == kThreads, "one micro-tile per thread");
  const int r0 = threadIdx.x / GC, c0 = threadIdx.x % GC;
  float acc[TM][TN];
#pragma unroll
  for (int i = 0; i < TM; ++i)
#pragma unroll
    for (int j = 0; j < TN; ++j) acc[i][j] = 0.f;
  for (int k = 0; k < K; ++k) {
    float a[TM], bv[TN];
#pragma unroll
    for (int i = 0; i < TM; ++i) a[i] = A[(r0 + i * RS) * lda + k];
#pragma unroll
    for (int j = 0; j < TN; ++j) bv[j] = B[(c0 + j * GC) * ldb + k];
#pragma unroll
    for (int i = 0; i < TM; ++i)
#pragma unroll
      for (int j = 0; j < TN; ++j) acc[i][j] = fmaf(a[i], bv[j], acc[i][j]);
  }
#pragma unroll
  for (int i = 0; i < TM; ++i)
#pragma unroll
    for (int j = 0; j < TN; ++j) C[(r0 + i * RS) * ldc + c0 + j * GC] = acc[i][j];
}

// acc[i][c] (row r0 + 16 i, column c0 + 16 c) += sum_{k < K} P[row][k] * X[k][column]: the
// register-resident output tile [ROWS][DMAX] of a P.X product (16 row groups x 16 column threads).
template <int ROWS, int DMAX>
__device__ void tile_acc(float (&acc)[ROWS / 16][DMAX / 16], const float* P, int ldp, const float* X, int ldx, int K) {
  const int r0 = threadIdx.x / 16, c0 = threadIdx.x % 16;
  for (int k = 0; k < K; ++k) {
    float x[DMAX / 16];
#pragma unroll
    for (int c = 0; c < DMAX / 16; ++c) x[c] = X[k * ldx + c0 + 16 * c];
#pragma unroll
    for (int i = 0; i < ROWS / 16; ++i) {
      const float p = P[(r0 + 16 * i) * ldp + k];
#pragma unroll
      for (int c = 0; c < DMAX / 16; ++c) acc[i][c] = fmaf(p, x[c], acc[i][c]);
    }
  }
}

// Query i sees key j (both absolute; seg: i's sequence start).
__device__ __forceinline__ bool visible(int i, int j, int seg, int window, int L) {
  return i < L && j <= i && j > i - window && j >= seg;
}

// ------------------------------------------------------------------------------------------------
// Forward
// ------------------------------------------------------------------------------------------------

constexpr int kFwdM = 64, kFwdN = 64;

template <typename T, int DMAX>
__global__ void __launch_bounds__(kThreads) window_fwd_kernel(FwdParams p) {
  constexpr int PD = Tile<DMAX>::pitch, PS = kFwdN + 1;
  extern __shared__ float smem[];
  float* qs = smem;                // [64][PD], scaled by scale * log2 e
  float* ks = qs + kFwdM * PD;     // [64][PD]
  float* vs = ks + kFwdN * PD;     // [64][DMAX]
  float* ss = vs + kFwdN * DMAX;   // [64][65]: scores, then probabilities
  float* alpha_s = ss + kFwdM * PS;  // [64]
  float* l_s = alpha_s + kFwdM;      // [64]

  const int m0 = blockIdx.x * kFwdM, bh = blockIdx.y, b = bh / p.H, h = bh % p.H;
  const int m_last = min(m0 + kFwdM, p.L) - 1;
  const int lo = max(m0 - p.window + 1, p.seg_start[m0]);
  const int full_lo = max(m_last - p.window + 1, p.seg_start[m_last]);  // keys >= full_lo, <= m0: seen by all
  load_rows<T>(qs, PD, p.q, b, h, m0, kFwdM, p.L, p.D, DMAX, p.scale_log2);

  // Row statistics live in thread t < 64 (row m0 + t).
  const int my_row = m0 + threadIdx.x;
  const int my_seg = (threadIdx.x < kFwdM && my_row < p.L) ? p.seg_start[my_row] : 0;
  float m_i = -INFINITY, l_i = 0.f;
  float acc[kFwdM / 16][DMAX / 16];
#pragma unroll
  for (int i = 0; i < kFwdM / 16; ++i)
#pragma unroll
    for (int c = 0; c < DMAX / 16; ++c) acc[i][c] = 0.f;

  for (int n0 = lo / kFwdN * kFwdN; n0 <= m_last; n0 += kFwdN) {
    __syncthreads();  // the previous tile's K/V/P are consumed
    load_rows<T>(ks, PD, p.k, b, h, n0, kFwdN, p.L, p.D, DMAX, 1.f);
    load_rows<T>(vs, DMAX, p.v, b, h, n0, kFwdN, p.L, p.Dv, DMAX, 1.f);
    __syncthreads();
    tile_dot<kFwdM, kFwdN, 4, 4>(qs, PD, ks, PD, p.D, ss, PS);
    __syncthreads();
    if (threadIdx.x < kFwdM) {
      float* row = ss + threadIdx.x * PS;
      const bool interior = n0 >= full_lo && n0 + kFwdN - 1 <= m0;
      float m_new = m_i;
      for (int j = 0; j < kFwdN; ++j) {
        if (!interior && !visible(my_row, n0 + j, my_seg, p.window, p.L)) row[j] = -INFINITY;
        m_new = fmaxf(m_new, row[j]);
      }
      // a row with no visible key yet keeps max -inf: subtract 0 so exp2 gives 0, not NaN
      const float m_safe = m_new == -INFINITY ? 0.f : m_new;
      float sum = 0.f;
      for (int j = 0; j < kFwdN; ++j) {
        const float e = exp2f(row[j] - m_safe);
        row[j] = e;
        sum += e;
      }
      const float alpha = exp2f(m_i - m_safe);
      l_i = l_i * alpha + sum;
      m_i = m_new;
      alpha_s[threadIdx.x] = alpha;
    }
    __syncthreads();
    const int r0 = threadIdx.x / 16;
#pragma unroll
    for (int i = 0; i < kFwdM / 16; ++i) {
      const float a = alpha_s[r0 + 16 * i];
#pragma unroll
      for (int c = 0; c < DMAX / 16; ++c) acc[i][c] *= a;
    }
    tile_acc<kFwdM, DMAX>(acc, ss, PS, vs, DMAX, kFwdN);
  }

  if (threadIdx.x < kFwdM) {
    l_s[threadIdx.x] = l_i;
    if (my_row < p.L) p.lse[static_cast<int64_t>(bh) * p.L + my_row] = m_i + log2f(l_i);
  }
  __syncthreads();
  T* out = static_cast<T*>(p.o.data) + b * p.o.sb + h * p.o.sh;
  const int r0 = threadIdx.x / 16, c0 = threadIdx.x % 16;
#pragma unroll
  for (int i = 0; i < kFwdM / 16; ++i) {
    const int l = m0 + r0 + 16 * i;
    if (l >= p.L) continue;
    const float inv = 1.f / l_s[r0 + 16 * i];
#pragma unroll
    for (int c = 0; c < DMAX / 16; ++c) {
      const int e = c0 + 16 * c;
      if (e < p.Dv) out[static_cast<int64_t>(l) * p.o.sl + e] = agf::from_acc<T>(acc[i][c] * inv);
    }
  }
}

// ------------------------------------------------------------------------------------------------
// Backward: dq over key tiles, dk/dv over query tiles
// ------------------------------------------------------------------------------------------------

constexpr int kBwdBig = 64, kBwdSmall = 32;

template <typename T, int DMAX>
__global__ void __launch_bounds__(kThreads) window_bwd_dq_kernel(BwdParams p) {
  constexpr int PD = Tile<DMAX>::pitch, PS = kBwdSmall + 1, M = kBwdBig, N = kBwdSmall;
  extern __shared__ float smem[];
  float* qs = smem;              // [M][PD] scaled by scale * log2 e
  float* dos = qs + M * PD;      // [M][PD]
  float* ks = dos + M * PD;      // [N][PD]
  float* vs = ks + N * PD;       // [N][PD]
  float* ps = vs + N * PD;       // [M][PS]: scores, then probabilities
  float* ds = ps + M * PS;       // [M][PS]: dP, then dS
  float* lse_s = ds + M * PS;    // [M]
  float* delta_s = lse_s + M;    // [M]
  int* seg_s = reinterpret_cast<int*>(delta_s + M);  // [M]

  const int m0 = blockIdx.x * M, bh = blockIdx.y, b = bh / p.H, h = bh % p.H;
  const int m_last = min(m0 + M, p.L) - 1;
  const int lo = max(m0 - p.window + 1, p.seg_start[m0]);
  const int full_lo = max(m_last - p.window + 1, p.seg_start[m_last]);
  load_rows<T>(qs, PD, p.q, b, h, m0, M, p.L, p.D, DMAX, p.scale_log2);
  load_rows<T>(dos, PD, p.grad_o, b, h, m0, M, p.L, p.Dv, DMAX, 1.f);
  for (int r = threadIdx.x; r < M; r += blockDim.x) {
    const int l = m0 + r;
    const bool ok = l < p.L;
    lse_s[r] = ok ? p.lse[static_cast<int64_t>(bh) * p.L + l] : INFINITY;
    delta_s[r] = ok ? p.delta[static_cast<int64_t>(bh) * p.L + l] : 0.f;
    seg_s[r] = ok ? p.seg_start[l] : 0;
  }
  float acc[M / 16][DMAX / 16];
#pragma unroll
  for (int i = 0; i < M / 16; ++i)
#pragma unroll
    for (int c = 0; c < DMAX / 16; ++c) acc[i][c] = 0.f;

  for (int n0 = lo / N * N; n0 <= m_last; n0 += N) {
    __syncthreads();
    load_rows<T>(ks, PD, p.k, b, h, n0, N, p.L, p.D, DMAX, 1.f);
    load_rows<T>(vs, PD, p.v, b, h, n0, N, p.L, p.Dv, DMAX, 1.f);
    __syncthreads();
    tile_dot<M, N, 2, 4>(qs, PD, ks, PD, p.D, ps, PS);
    tile_dot<M, N, 2, 4>(dos, PD, vs, PD, p.Dv, ds, PS);
    __syncthreads();
    const bool interior = n0 >= full_lo && n0 + N - 1 <= m0;
    for (int idx = threadIdx.x; idx < M * N; idx += blockDim.x) {
      const int r = idx / N, j = idx % N;
      float pr = exp2f(ps[r * PS + j] - lse_s[r]);
      if (!interior && !visible(m0 + r, n0 + j, seg_s[r], p.window, p.L)) pr = 0.f;
      ds[r * PS + j] = pr * (ds[r * PS + j] - delta_s[r]);
    }
    __syncthreads();
    tile_acc<M, DMAX>(acc, ds, PS, ks, PD, N);
  }

  T* out = static_cast<T*>(p.dq.data) + b * p.dq.sb + h * p.dq.sh;
  const int r0 = threadIdx.x / 16, c0 = threadIdx.x % 16;
#pragma unroll
  for (int i = 0; i < M / 16; ++i) {
    const int l = m0 + r0 + 16 * i;
    if (l >= p.L) continue;
#pragma unroll
    for (int c = 0; c < DMAX / 16; ++c) {
      const int e = c0 + 16 * c;
      if (e < p.D) out[static_cast<int64_t>(l) * p.dq.sl + e] = agf::from_acc<T>(acc[i][c] * p.scale);
    }
  }
}

template <typename T, int DMAX>
__global__ void __launch_bounds__(kThreads) window_bwd_dkdv_kernel(BwdParams p) {
  constexpr int PD = Tile<DMAX>::pitch, PS = kBwdSmall + 1, N = kBwdBig, M = kBwdSmall;
  extern __shared__ float smem[];
  float* ks = smem;               // [N][PD]
  float* vs = ks + N * PD;        // [N][PD]
  float* qs = vs + N * PD;        // [M][PD] scaled by scale * log2 e
  float* dos = qs + M * PD;       // [M][PD]
  float* pt = dos + M * PD;       // [N][PS]: transposed scores, then probabilities
  float* dst = pt + N * PS;       // [N][PS]: transposed dP, then dS
  float* lse_s = dst + N * PS;    // [M]
  float* delta_s = lse_s + M;     // [M]
  int* seg_s = reinterpret_cast<int*>(delta_s + M);  // [M]

  const int n0 = blockIdx.x * N, bh = blockIdx.y, b = bh / p.H, h = bh % p.H;
  const int n_last = min(n0 + N, p.L) - 1;
  // queries that see some key of the block: [n0, hi); those in [n_last, full_hi) see all of them
  const int hi = min(min(n_last + p.window, p.seg_end[n_last]), p.L);
  const int full_hi = min(n0 + p.window, p.seg_end[n0]);
  load_rows<T>(ks, PD, p.k, b, h, n0, N, p.L, p.D, DMAX, 1.f);
  load_rows<T>(vs, PD, p.v, b, h, n0, N, p.L, p.Dv, DMAX, 1.f);
  float dk[N / 16][DMAX / 16], dv[N / 16][DMAX / 16];
#pragma unroll
  for (int i = 0; i < N / 16; ++i)
#pragma unroll
    for (int c = 0; c < DMAX / 16; ++c) dk[i][c] = dv[i][c] = 0.f;

  for (int q0 = n0 / M * M; q0 < hi; q0 += M) {
    __syncthreads();
    load_rows<T>(qs, PD, p.q, b, h, q0, M, p.L, p.D, DMAX, p.scale_log2);
    load_rows<T>(dos, PD, p.grad_o, b, h, q0, M, p.L, p.Dv, DMAX, 1.f);
    for (int r = threadIdx.x; r < M; r += blockDim.x) {
      const int l = q0 + r;
      const bool ok = l < p.L;
      lse_s[r] = ok ? p.lse[static_cast<int64_t>(bh) * p.L + l] : INFINITY;
      delta_s[r] = ok ? p.delta[static_cast<int64_t>(bh) * p.L + l] : 0.f;
      seg_s[r] = ok ? p.seg_start[l] : 0;
    }
    __syncthreads();
    tile_dot<N, M, 4, 2>(ks, PD, qs, PD, p.D, pt, PS);
    tile_dot<N, M, 4, 2>(vs, PD, dos, PD, p.Dv, dst, PS);
    __syncthreads();
    const bool interior = q0 >= n_last && q0 + M <= full_hi;
    for (int idx = threadIdx.x; idx < N * M; idx += blockDim.x) {
      const int j = idx / M, r = idx % M;
      float pr = exp2f(pt[j * PS + r] - lse_s[r]);
      if (!interior && !visible(q0 + r, n0 + j, seg_s[r], p.window, p.L)) pr = 0.f;
      pt[j * PS + r] = pr;
      dst[j * PS + r] = pr * (dst[j * PS + r] - delta_s[r]);
    }
    __syncthreads();
    tile_acc<N, DMAX>(dv, pt, PS, dos, PD, M);
    tile_acc<N, DMAX>(dk, dst, PS, qs, PD, M);
  }

  // dK = scale * sum dS q = (sum dS qs) / log2 e, since qs holds q * scale * log2 e
  T* dk_out = static_cast<T*>(p.dk.data) + b * p.dk.sb + h * p.dk.sh;
  T* dv_out = static_cast<T*>(p.dv.data) + b * p.dv.sb + h * p.dv.sh;
  const int r0 = threadIdx.x / 16, c0 = threadIdx.x % 16;
#pragma unroll
  for (int i = 0; i < N / 16; ++i) {
    const int l = n0 + r0 + 16 * i;
    if (l >= p.L) continue;
#pragma unroll
    for (int c = 0; c < DMAX / 16; ++c) {
      const int e = c0 + 16 * c;
      if (e < p.D) dk_out[static_cast<int64_t>(l) * p.dk.sl + e] = agf::from_acc<T>(dk[i][c] / kLog2e);
      if (e < p.Dv) dv_out[static_cast<int64_t>(l) * p.dv.sl + e] = agf::from_acc<T>(dv[i][c]);
    }
  }
}

// ------------------------------------------------------------------------------------------------
// Decode step
// ------------------------------------------------------------------------------------------------

constexpr int kStepThreads = 128;

// Block-wide reduction through shared memory (blockDim.x == kStepThreads).
template <bool MAX> __device__ float block_reduce(float x, float* scratch) {
  scratch[threadIdx.x] = x;
  __syncthreads();
  for (int s = kStepThreads / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) {
      const float y = scratch[threadIdx.x + s];
      scratch[threadIdx.x] = MAX ? fmaxf(scratch[threadIdx.x], y) : scratch[threadIdx.x] + y;
    }
    __syncthreads();
  }
  const float out = scratch[0];
  __syncthreads();
  return out;
}

template <typename T>
__global__ void __launch_bounds__(kStepThreads) window_step_kernel(StepParams p) {
  extern __shared__ float smem[];
  float* qv = smem;                      // [D] scaled by scale * log2 e
  float* scratch = qv + kMaxHeadDim;     // [kStepThreads]
  float* scores = scratch + kStepThreads;  // [W]
  const int bh = blockIdx.x, b = bh / p.H, h = bh % p.H;
  const int64_t pos = p.pos[b];
  const int slot = static_cast<int>(pos % p.W);
  const int n = pos + 1 < p.W ? static_cast<int>(pos + 1) : p.W;
  const T* q = static_cast<const T*>(p.q) + static_cast<int64_t>(bh) * p.D;
  T* kc = static_cast<T*>(p.k_cache);
  T* vc = static_cast<T*>(p.v_cache);
  for (int d = threadIdx.x; d < p.D; d += blockDim.x) {
    qv[d] = agf::to_acc(q[d]) * p.scale_log2;
    kc[((static_cast<int64_t>(b) * p.W + slot) * p.H + h) * p.D + d] = static_cast<const T*>(p.k)[bh * p.D + d];
  }
  for (int e = threadIdx.x; e < p.Dv; e += blockDim.x)
    vc[((static_cast<int64_t>(b) * p.W + slot) * p.H + h) * p.Dv + e] = static_cast<const T*>(p.v)[bh * p.Dv + e];
  __syncthreads();  // the new slot and q are visible to the whole block

  float mx = -INFINITY;
  for (int j = threadIdx.x; j < n; j += blockDim.x) {
    const T* kr = kc + ((static_cast<int64_t>(b) * p.W + j) * p.H + h) * p.D;
    float s = 0.f;
    for (int d = 0; d < p.D; ++d) s = fmaf(qv[d], agf::to_acc(kr[d]), s);
    scores[j] = s;
    mx = fmaxf(mx, s);
  }
  mx = block_reduce<true>(mx, scratch);
  float sum = 0.f;
  for (int j = threadIdx.x; j < n; j += blockDim.x) {
    const float e = exp2f(scores[j] - mx);
    scores[j] = e;
    sum += e;
  }
  sum = block_reduce<false>(sum, scratch);  // also orders the writes to scores before the reads below
  T* o = static_cast<T*>(p.o) + static_cast<int64_t>(bh) * p.Dv;
  for (int e = threadIdx.x; e < p.Dv; e += blockDim.x) {
    float acc = 0.f;
    for (int j = 0; j < n; ++j)
      acc = fmaf(scores[j], agf::to_acc(vc[((static_cast<int64_t>(b) * p.W + j) * p.H + h) * p.Dv + e]), acc);
    o[e] = agf::from_acc<T>(acc / sum);
  }
}

// ------------------------------------------------------------------------------------------------
// Launchers
// ------------------------------------------------------------------------------------------------

template <int DMAX> constexpr size_t fwd_smem() {
  return sizeof(float) * (2 * kFwdM * Tile<DMAX>::pitch + kFwdN * DMAX + kFwdM * (kFwdN + 1) + 2 * kFwdM);
}
template <int DMAX> constexpr size_t bwd_smem() {
  return sizeof(float) *
         (2 * kBwdBig * Tile<DMAX>::pitch + 2 * kBwdSmall * Tile<DMAX>::pitch + 2 * kBwdBig * (kBwdSmall + 1) +
          3 * kBwdBig);
}

template <typename Kernel> cudaError_t allow_smem(Kernel kernel, size_t bytes) {
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
}

template <typename T, int DMAX> cudaError_t launch_fwd(const FwdParams& p, cudaStream_t stream) {
  const size_t smem = fwd_smem<DMAX>();
  AGF_CUDA_RETURN_IF_ERROR(allow_smem(window_fwd_kernel<T, DMAX>, smem));
  const dim3 grid(agf::ceil_div(p.L, kFwdM), p.B * p.H);
  window_fwd_kernel<T, DMAX><<<grid, kThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

template <typename T, int DMAX> cudaError_t launch_bwd(const BwdParams& p, cudaStream_t stream) {
  const size_t smem = bwd_smem<DMAX>();
  AGF_CUDA_RETURN_IF_ERROR(allow_smem(window_bwd_dq_kernel<T, DMAX>, smem));
  AGF_CUDA_RETURN_IF_ERROR(allow_smem(window_bwd_dkdv_kernel<T, DMAX>, smem));
  window_bwd_dq_kernel<T, DMAX><<<dim3(agf::ceil_div(p.L, kBwdBig), p.B * p.H), kThreads, smem, stream>>>(p);
  AGF_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  window_bwd_dkdv_kernel<T, DMAX><<<dim3(agf::ceil_div(p.L, kBwdBig), p.B * p.H), kThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

// The smallest of 32/64/128 holding both head dims: the register tiles are sized by it.
template <typename F32, typename F64, typename F128>
cudaError_t by_head_dim(int dmax, F32 f32, F64 f64, F128 f128) {
  if (dmax <= 32) return f32();
  if (dmax <= 64) return f64();
  if (dmax <= kMaxHeadDim) return f128();
  return cudaErrorInvalidValue;
}

template <typename T> cudaError_t fwd_typed(const FwdParams& p, cudaStream_t s) {
  return by_head_dim(
      std::max(p.D, p.Dv), [&] { return launch_fwd<T, 32>(p, s); }, [&] { return launch_fwd<T, 64>(p, s); },
      [&] { return launch_fwd<T, 128>(p, s); });
}

template <typename T> cudaError_t bwd_typed(const BwdParams& p, cudaStream_t s) {
  return by_head_dim(
      std::max(p.D, p.Dv), [&] { return launch_bwd<T, 32>(p, s); }, [&] { return launch_bwd<T, 64>(p, s); },
      [&] { return launch_bwd<T, 128>(p, s); });
}

template <typename T> cudaError_t step_typed(const StepParams& p, cudaStream_t s) {
  if (p.D > kMaxHeadDim || p.Dv > kMaxHeadDim) return cudaErrorInvalidValue;
  const size_t smem = sizeof(float) * (kMaxHeadDim + kStepThreads + p.W);
  AGF_CUDA_RETURN_IF_ERROR(allow_smem(window_step_kernel<T>, smem));
  window_step_kernel<T><<<p.B * p.H, kStepThreads, smem, s>>>(p);
  return cudaGetLastError();
}

}  // namespace

cudaError_t fwd(const FwdParams& p, DType dtype, cudaStream_t stream) {
  return agf::by_dtype(dtype, [&](auto t) { return fwd_typed<decltype(t)>(p, stream); });
}

cudaError_t bwd(const BwdParams& p, DType dtype, cudaStream_t stream) {
  return agf::by_dtype(dtype, [&](auto t) { return bwd_typed<decltype(t)>(p, stream); });
}

cudaError_t step(const StepParams& p, DType dtype, cudaStream_t stream) {
  return agf::by_dtype(dtype, [&](auto t) { return step_typed<decltype(t)>(p, stream); });
}

}  // namespace agf_swa
