// Fused GRU patch decoder (docs/ops.md §1.3): CUDA kernels. The binding (gru_patch_cuda.cpp) computes the two
// products that need no recurrence with cuBLAS (byte table 256×3h, context part M×3h) and the weight
// gradients from the gate gradients stored here; these kernels run the recurrences and the head.
//
// Every recurrence kernel: grid cdiv(M, kRows) blocks of kThreads; a block owns kRows = 16 patches for
// all P steps. h_{t-1} of the 16 patches sits in shared memory ([16, h]); thread j computes hidden unit j
// (j += 256 when h > 256) of all 16 patches: the three W_hh products as 48 register accumulators fed by
// one coalesced row of W_hhᵀ per k and 16 broadcast shared-memory reads, then the gates. The new h goes
// to global (output) and back into shared memory after a barrier.
// The head kernels (cross-entropy, sampling) put the 256 vocabulary entries on the 256 threads: logits
// [16, 256] in shared memory, then one warp per row reduces them (log-sum-exp; or argmax, top-k by
// bisection over order keys, and an inverse-CDF draw from a warp prefix sum).

#include <cstdint>

#include "cuda_common.cuh"
#include "gru_patch_cuda.h"

namespace agf_gru {
namespace {

using agf::from_acc;
using agf::to_acc;

constexpr int kThreads = 256;  // = the vocabulary: the head kernels give one entry to each thread
constexpr int kRows = 16;      // patches (or head rows) per block
constexpr int kVocab = 256;
constexpr int kVBlock = 16;    // vocabulary entries per block of the head-weight gradient kernel
constexpr int kWarps = kThreads / 32;
constexpr int kMaxUnitsPerThread = kMaxHidden / kThreads;

__device__ __forceinline__ float ex(float x) { return __expf(x); }
__device__ __forceinline__ double ex(double x) { return exp(x); }
__device__ __forceinline__ float lg(float x) { return __logf(x); }
__device__ __forceinline__ double lg(double x) { return log(x); }

template <typename A> __device__ __forceinline__ A sigmoid_(A x) { return A(1) / (A(1) + ex(-x)); }
// 1 - 2 / (1 + e^{2x}) saturates to ±1 without inf/inf
template <typename A> __device__ __forceinline__ A tanh_(A x) { return A(1) - A(2) / (A(1) + ex(A(2) * x)); }

template <typename A> __device__ __forceinline__ A warp_max(A v) {
  for (int o = 16; o > 0; o >>= 1) v = max(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
template <typename A> __device__ __forceinline__ A warp_sum(A v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ int warp_sum_int(int v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  return x ^ (x >> 16);
}

// Integers ordered as the floats (magnitude bits flipped below zero), for the top-k bisection.
__device__ __forceinline__ int64_t order_key(float x) {
  const int32_t b = __float_as_int(x);
  return b < 0 ? int64_t(b ^ 0x7FFFFFFF) : int64_t(b);
}
__device__ __forceinline__ int64_t order_key(double x) {
  const long long b = __double_as_longlong(x);
  return b < 0 ? (b ^ 0x7FFFFFFFFFFFFFFFLL) : b;
}

// Loads rows [row0, row0 + rows) of a [·, H] acc matrix into a [kRows, H] tile, zero past `rows`.
template <typename A>
__device__ void load_tile(A* tile, const A* src, int64_t row0, int rows, int64_t row_stride, int H) {
  for (int i = threadIdx.x; i < kRows * H; i += kThreads) {
    const int r = i / H, k = i - r * H;
    tile[i] = r < rows ? src[(row0 + r) * row_stride + k] : A(0);
  }
}

// One GRU step for unit j of the block's rows: W_hh·h_{t-1} from the [kRows, H] tile hs (skipped at t = 0,
// where h = 0), gates fused. Calls emit(r, rr, zz, nn, hn, hnew) for each valid row r.
template <typename T, typename A, typename Bytes, typename Emit>
__device__ __forceinline__ void gru_unit(int j, int t, int rows, int64_t row0, int H, const A* gc, const A* table,
                                         const T* w_hh_t, const T* b_hh, const A* hs, const Bytes& byte_of,
                                         const Emit& emit) {
  const int G = 3 * H;
  A ar[kRows], az[kRows], an[kRows];
#pragma unroll
  for (int r = 0; r < kRows; ++r) ar[r] = az[r] = an[r] = A(0);
  if (t > 0) {
    for (int k = 0; k < H; ++k) {
      const T* w = w_hh_t + int64_t(k) * G + j;
      const A wr = to_acc(w[0]), wz = to_acc(w[H]), wn = to_acc(w[2 * H]);
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        const A hk = hs[r * H + k];
        ar[r] += hk * wr;
        az[r] += hk * wz;
        an[r] += hk * wn;
      }
    }
  }
  const A br = to_acc(b_hh[j]), bz = to_acc(b_hh[H + j]), bn = to_acc(b_hh[2 * H + j]);
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    if (r < rows) {
      const int64_t m = row0 + r;
      const A* g = gc + m * G;
      const A* e = table + byte_of(r) * G;
      const A rr = sigmoid_(g[j] + e[j] + ar[r] + br);
      const A zz = sigmoid_(g[H + j] + e[H + j] + az[r] + bz);
      const A hn = an[r] + bn;
      const A nn = tanh_(g[2 * H + j] + e[2 * H + j] + rr * hn);
      const A hp = t > 0 ? hs[r * H + j] : A(0);
      emit(r, rr, zz, nn, hn, nn + zz * (hp - nn));
    }
  }
}

template <typename T, typename A>
__global__ void __launch_bounds__(kThreads) gru_fwd_kernel(FwdParams p) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  A* hs = reinterpret_cast<A*>(smem_raw);  // [kRows, H]: h_{t-1}
  const int H = p.H, P = p.P;
  const int64_t row0 = int64_t(blockIdx.x) * kRows;
  const int rows = int(min(int64_t(kRows), p.M - row0));
  const A* gc = static_cast<const A*>(p.gc);
  const A* table = static_cast<const A*>(p.table);
  const T* w_hh_t = static_cast<const T*>(p.w_hh_t);
  const T* b_hh = static_cast<const T*>(p.b_hh);
  A* hid = static_cast<A*>(p.hid);
  T* out = static_cast<T*>(p.out);
  A* gates = static_cast<A*>(p.gates);
  for (int t = 0; t < P; ++t) {
    auto byte_of = [&](int r) { return p.bytes[(row0 + r) * P + t]; };
    for (int j = threadIdx.x; j < H; j += kThreads) {
      gru_unit<T, A>(j, t, rows, row0, H, gc, table, w_hh_t, b_hh, hs, byte_of,
                     [&](int r, A rr, A zz, A nn, A hn, A hnew) {
                       const int64_t at = (row0 + r) * P + t;
                       hid[at * H + j] = hnew;
                       if (out) out[at * H + j] = from_acc<T>(hnew);
                       if (gates) {
                         A* s = gates + at * 4 * H;
                         s[j] = rr;
                         s[H + j] = zz;
                         s[2 * H + j] = nn;
                         s[3 * H + j] = hn;
                       }
                     });
    }
    __syncthreads();  // all reads of h_{t-1} done; h_t written (global writes are visible block-wide)
    load_tile(hs, hid + int64_t(t) * H, row0, rows, int64_t(P) * H, H);
    __syncthreads();
  }
}

template <typename T, typename A>
__global__ void __launch_bounds__(kThreads) gru_bwd_kernel(BwdParams p) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int H = p.H, G = 3 * H, P = p.P;
  A* dhs = reinterpret_cast<A*>(smem_raw);  // [kRows, H]: dL/dh_t
  A* dgs = dhs + kRows * H;                 // [kRows, 3H]: dL/d(W_hh·h_{t-1}) of the step
  const int64_t row0 = int64_t(blockIdx.x) * kRows;
  const int rows = int(min(int64_t(kRows), p.M - row0));
  const A* dH = static_cast<const A*>(p.dH);
  const A* hid = static_cast<const A*>(p.hid);
  const A* gates = static_cast<const A*>(p.gates);
  const T* w_hh = static_cast<const T*>(p.w_hh);
  A* dgi = static_cast<A*>(p.dgi);
  A* dgh = static_cast<A*>(p.dgh);
  load_tile(dhs, dH + int64_t(P - 1) * H, row0, rows, int64_t(P) * H, H);
  for (int i = threadIdx.x; i < kRows * G; i += kThreads) dgs[i] = A(0);  // padding rows stay 0
  __syncthreads();
  for (int t = P - 1; t >= 0; --t) {
    for (int j = threadIdx.x; j < H; j += kThreads) {
      for (int r = 0; r < rows; ++r) {
        const int64_t at = (row0 + r) * P + t;
        const A* s = gates + at * 4 * H;
        const A rr = s[j], zz = s[H + j], nn = s[2 * H + j], hn = s[3 * H + j];
        const A hp = t > 0 ? hid[(at - 1) * H + j] : A(0);
        const A dh = dhs[r * H + j];
        const A dan = dh * (A(1) - zz) * (A(1) - nn * nn);
        const A daz = dh * (hp - nn) * zz * (A(1) - zz);
        const A dar = dan * hn * rr * (A(1) - rr);
        A* gi = dgi + at * G;
        A* gh = dgh + at * G;
        gi[j] = dar;
        gi[H + j] = daz;
        gi[2 * H + j] = dan;
        gh[j] = dar;
        gh[H + j] = daz;
        gh[2 * H + j] = dan * rr;
        dgs[r * G + j] = dar;
        dgs[r * G + H + j] = daz;
        dgs[r * G + 2 * H + j] = dan * rr;
        dhs[r * H + j] = dh * zz;  // the direct part; thread j alone touches column j
      }
    }
    __syncthreads();
    if (t == 0) break;
    // dL/dh_{t-1} = dh·z + dgh·W_hh + upstream at t-1
    for (int j = threadIdx.x; j < H; j += kThreads) {
      A acc[kRows];
#pragma unroll
      for (int r = 0; r < kRows; ++r)
        acc[r] = r < rows ? dhs[r * H + j] + dH[((row0 + r) * P + t - 1) * H + j] : A(0);
      for (int k = 0; k < G; ++k) {
        const A w = to_acc(w_hh[int64_t(k) * H + j]);
#pragma unroll
        for (int r = 0; r < kRows; ++r) acc[r] += dgs[r * G + k] * w;
      }
#pragma unroll
      for (int r = 0; r < kRows; ++r)
        if (r < rows) dhs[r * H + j] = acc[r];
    }
    __syncthreads();
  }
}

// logits [kRows, 256] = hs·head_tᵀ + b into shared memory `lgs`; thread v computes column v.
template <typename T, typename A>
__device__ __forceinline__ void head_logits(const A* hs, const T* head_t, const T* head_b, int H, A* lgs) {
  const int v = threadIdx.x;
  A acc[kRows];
  const A b = to_acc(head_b[v]);
#pragma unroll
  for (int r = 0; r < kRows; ++r) acc[r] = b;
  for (int k = 0; k < H; ++k) {
    const A w = to_acc(head_t[int64_t(k) * kVocab + v]);
#pragma unroll
    for (int r = 0; r < kRows; ++r) acc[r] += hs[r * H + k] * w;
  }
#pragma unroll
  for (int r = 0; r < kRows; ++r) lgs[r * kVocab + v] = acc[r];
}

// Whether logit (v, i) goes before (bv, bi) as torch.argmax's pick: larger, or equal at a lower index; a NaN
// is the maximum (the first NaN wins).
template <typename A>
__device__ bool argmax_before(A v, int i, A bv, int bi) {
  if (isnan(v)) return !isnan(bv) || i < bi;
  return !isnan(bv) && (v > bv || (v == bv && i < bi));
}

// The byte of one row of logits (reference.choose_bytes), computed by one warp: lane l holds entries
// [8l, 8l + 8), so a lane-local scan plus a warp scan of lane totals is the running sum in vocabulary order.
template <typename A>
__device__ int64_t choose_byte(const A* l, const SampleParams& p, int64_t row, int t) {
  const int lane = threadIdx.x & 31;
  A v[8];
#pragma unroll
  for (int i = 0; i < 8; ++i) v[i] = l[lane * 8 + i];
  int best = lane * 8;
  A bv = v[0];
#pragma unroll
  for (int i = 1; i < 8; ++i)
    if (argmax_before(v[i], lane * 8 + i, bv, best)) bv = v[i], best = lane * 8 + i;
  for (int o = 16; o > 0; o >>= 1) {  // max value, lowest index on ties
    const A ov = __shfl_xor_sync(0xffffffffu, bv, o);
    const int oi = __shfl_xor_sync(0xffffffffu, best, o);
    if (argmax_before(ov, oi, bv, best)) bv = ov, best = oi;
  }
  if (p.greedy) return best;
  bool keep[8];
#pragma unroll
  for (int i = 0; i < 8; ++i) keep[i] = true;
  if (p.top_k > 0 && p.top_k < kVocab) {
    int64_t key[8];
    int64_t lo = INT64_MAX, hi = INT64_MIN;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      key[i] = order_key(v[i]);
      lo = min(lo, key[i]);
      hi = max(hi, key[i]);
    }
    for (int o = 16; o > 0; o >>= 1) {
      lo = min(lo, (int64_t)__shfl_xor_sync(0xffffffffu, (long long)lo, o));
      hi = max(hi, (int64_t)__shfl_xor_sync(0xffffffffu, (long long)hi, o));
    }
    // the largest key v with #{key >= v} >= top_k: the k-th largest logit (ties kept)
    while (lo < hi) {
      const int64_t mid = lo + int64_t((uint64_t(hi) - uint64_t(lo) + 1) >> 1);
      int n = 0;
#pragma unroll
      for (int i = 0; i < 8; ++i) n += key[i] >= mid;
      if (warp_sum_int(n) >= p.top_k) lo = mid;
      else hi = mid - 1;
    }
#pragma unroll
    for (int i = 0; i < 8; ++i) keep[i] = key[i] >= lo;
  }
  const A inv_t = A(p.inv_temperature);
  A c[8];
  A run = A(0);
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    run += keep[i] ? ex((v[i] - bv) * inv_t) : A(0);
    c[i] = run;
  }
  A offset = run;  // inclusive warp scan of the lane totals
  for (int o = 1; o < 32; o <<= 1) {
    const A up = __shfl_up_sync(0xffffffffu, offset, o);
    if (lane >= o) offset += up;
  }
  const A total = __shfl_sync(0xffffffffu, offset, 31);
  offset -= run;
  const uint32_t x = mix32(mix32(mix32(uint32_t(p.seed[0]) ^ uint32_t(row)) ^ uint32_t(p.seed[1])) ^ uint32_t(t));
  const A target = A(x >> 8) * A(1.0 / 16777216.0) * total;
  // the first byte whose running sum passes the target; none (rounding, or NaN sums from a NaN or infinite
  // logit): the argmax
  int n = kVocab;
#pragma unroll
  for (int i = 7; i >= 0; --i)
    if (offset + c[i] > target) n = lane * 8 + i;
  for (int o = 16; o > 0; o >>= 1) n = min(n, __shfl_xor_sync(0xffffffffu, n, o));
  return n < kVocab ? n : best;
}

template <typename T, typename A>
__global__ void __launch_bounds__(kThreads) gru_sample_kernel(SampleParams p) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int H = p.H, P = p.P;
  A* hs = reinterpret_cast<A*>(smem_raw);  // [kRows, H]: h_{t-1}
  A* hn_s = hs + kRows * H;                // [kRows, H]: h_t
  A* lgs = hn_s + kRows * H;               // [kRows, 256]
  __shared__ int64_t cur[kRows];           // the byte each row feeds at the step
  const int64_t row0 = int64_t(blockIdx.x) * kRows;
  const int rows = int(min(int64_t(kRows), p.M - row0));
  const A* gc = static_cast<const A*>(p.gc);
  const A* table = static_cast<const A*>(p.table);
  const T* w_hh_t = static_cast<const T*>(p.w_hh_t);
  const T* b_hh = static_cast<const T*>(p.b_hh);
  if (threadIdx.x < kRows) cur[threadIdx.x] = p.sos;
  for (int i = threadIdx.x; i < kRows * H; i += kThreads) hn_s[i] = A(0);  // padding rows stay 0
  __syncthreads();
  for (int t = 0; t < P; ++t) {
    for (int j = threadIdx.x; j < H; j += kThreads)
      gru_unit<T, A>(j, t, rows, row0, H, gc, table, w_hh_t, b_hh, hs, [&](int r) { return cur[r]; },
                     [&](int r, A, A, A, A, A hnew) { hn_s[r * H + j] = hnew; });
    __syncthreads();
    if (t < p.forced) {
      if (threadIdx.x < rows) {
        const int64_t m = row0 + threadIdx.x;
        cur[threadIdx.x] = p.prefix[m * p.forced + t];
        p.out[m * P + t] = cur[threadIdx.x];
      }
    } else {
      head_logits<T, A>(hn_s, static_cast<const T*>(p.head_t), static_cast<const T*>(p.head_b), H, lgs);
      __syncthreads();
      for (int r = threadIdx.x / 32; r < rows; r += kWarps) {
        const int64_t b = choose_byte(lgs + r * kVocab, p, row0 + r, t);
        if ((threadIdx.x & 31) == 0) {
          cur[r] = b;
          p.out[(row0 + r) * P + t] = b;
        }
      }
    }
    for (int i = threadIdx.x; i < kRows * H; i += kThreads) hs[i] = hn_s[i];
    __syncthreads();
  }
}

template <typename T, typename A>
__global__ void __launch_bounds__(kThreads) ce_fwd_kernel(CeParams p) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int H = p.H;
  A* hs = reinterpret_cast<A*>(smem_raw);  // [kRows, H]
  A* lgs = hs + kRows * H;                 // [kRows, 256]
  const int64_t row0 = int64_t(blockIdx.x) * kRows;
  const int rows = int(min(int64_t(kRows), p.R - row0));
  load_tile(hs, static_cast<const A*>(p.h), row0, rows, H, H);
  __syncthreads();
  head_logits<T, A>(hs, static_cast<const T*>(p.head_t), static_cast<const T*>(p.head_b), H, lgs);
  __syncthreads();
  const int lane = threadIdx.x & 31;
  for (int r = threadIdx.x / 32; r < rows; r += kWarps) {
    const A* l = lgs + r * kVocab;
    A mx = l[lane];
    for (int i = lane + 32; i < kVocab; i += 32) mx = max(mx, l[i]);
    mx = warp_max(mx);
    A s = A(0);
    for (int i = lane; i < kVocab; i += 32) s += ex(l[i] - mx);
    s = warp_sum(s);
    if (lane == 0) {
      const int64_t m = row0 + r;
      const A lse = mx + lg(s);
      static_cast<A*>(p.lse)[m] = lse;
      static_cast<A*>(p.loss)[m] = lse - l[p.y[m]];
    }
  }
}

// dL/dh = g·(softmax - onehot)·W_head for kRows rows, the logits recomputed from the saved lse.
template <typename T, typename A>
__global__ void __launch_bounds__(kThreads) ce_bwd_dh_kernel(CeParams p) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int H = p.H;
  A* hs = reinterpret_cast<A*>(smem_raw);
  A* lgs = hs + kRows * H;
  const int64_t row0 = int64_t(blockIdx.x) * kRows;
  const int rows = int(min(int64_t(kRows), p.R - row0));
  load_tile(hs, static_cast<const A*>(p.h), row0, rows, H, H);
  __syncthreads();
  head_logits<T, A>(hs, static_cast<const T*>(p.head_t), static_cast<const T*>(p.head_b), H, lgs);
  const int v = threadIdx.x;
  const A* lse = static_cast<const A*>(p.lse);
  const A* g = static_cast<const A*>(p.g);
  for (int r = 0; r < kRows; ++r) {
    A d = A(0);
    if (r < rows) {
      const int64_t m = row0 + r;
      d = g[m] * (ex(lgs[r * kVocab + v] - lse[m]) - A(p.y[m] == v ? 1 : 0));
    }
    lgs[r * kVocab + v] = d;  // each thread rewrites only its own column
  }
  __syncthreads();
  const T* head_w = static_cast<const T*>(p.head_w);
  A* dh = static_cast<A*>(p.dh);
  for (int j = threadIdx.x; j < H; j += kThreads) {
    A acc[kRows];
#pragma unroll
    for (int r = 0; r < kRows; ++r) acc[r] = A(0);
    for (int u = 0; u < kVocab; ++u) {
      const A w = to_acc(head_w[int64_t(u) * H + j]);
#pragma unroll
      for (int r = 0; r < kRows; ++r) acc[r] += lgs[r * kVocab + u] * w;
    }
    for (int r = 0; r < rows; ++r) dh[(row0 + r) * H + j] = acc[r];
  }
}

// grid (256 / kVBlock, splits): the head's weight and bias gradient over one split of the rows for one
// block of vocabulary entries, its logits recomputed from the saved lse; partials summed by the binding.
template <typename T, typename A>
__global__ void __launch_bounds__(kThreads) ce_bwd_dw_kernel(CeParams p) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int H = p.H;
  A* hs = reinterpret_cast<A*>(smem_raw);  // [kRows, H]
  __shared__ A dls[kRows * kVBlock];       // dL/dlogits of the tile's rows × the block's entries
  const int v0 = blockIdx.x * kVBlock;
  const int64_t lo = int64_t(blockIdx.y) * p.rows_per_split;
  const int64_t hi = min(p.R, lo + p.rows_per_split);
  const T* head_w = static_cast<const T*>(p.head_w);
  const A* lse = static_cast<const A*>(p.lse);
  const A* g = static_cast<const A*>(p.g);
  A acc[kMaxUnitsPerThread][kVBlock];
#pragma unroll
  for (int s = 0; s < kMaxUnitsPerThread; ++s)
#pragma unroll
    for (int v = 0; v < kVBlock; ++v) acc[s][v] = A(0);
  A db = A(0);
  const int my_r = threadIdx.x / kVBlock, my_v = threadIdx.x % kVBlock;  // kThreads = kRows · kVBlock
  for (int64_t row0 = lo; row0 < hi; row0 += kRows) {
    const int rows = int(min(int64_t(kRows), hi - row0));
    load_tile(hs, static_cast<const A*>(p.h), row0, rows, H, H);
    __syncthreads();
    A d = A(0);
    if (my_r < rows) {
      const int64_t m = row0 + my_r;
      const int u = v0 + my_v;
      A l = to_acc(static_cast<const T*>(p.head_b)[u]);
      for (int k = 0; k < H; ++k) l += hs[my_r * H + k] * to_acc(head_w[int64_t(u) * H + k]);
      d = g[m] * (ex(l - lse[m]) - A(p.y[m] == u ? 1 : 0));
    }
    dls[my_r * kVBlock + my_v] = d;
    __syncthreads();
#pragma unroll
    for (int s = 0; s < kMaxUnitsPerThread; ++s) {
      const int j = threadIdx.x + s * kThreads;
      if (j < H)
        for (int r = 0; r < rows; ++r) {
          const A hj = hs[r * H + j];
#pragma unroll
          for (int v = 0; v < kVBlock; ++v) acc[s][v] += dls[r * kVBlock + v] * hj;
        }
    }
    if (threadIdx.x < kVBlock)
      for (int r = 0; r < rows; ++r) db += dls[r * kVBlock + threadIdx.x];
    __syncthreads();
  }
  A* dw = static_cast<A*>(p.dw) + int64_t(blockIdx.y) * kVocab * H;
#pragma unroll
  for (int s = 0; s < kMaxUnitsPerThread; ++s) {
    const int j = threadIdx.x + s * kThreads;
    if (j < H)
#pragma unroll
      for (int v = 0; v < kVBlock; ++v) dw[int64_t(v0 + v) * H + j] = acc[s][v];
  }
  if (threadIdx.x < kVBlock) static_cast<A*>(p.db)[int64_t(blockIdx.y) * kVocab + v0 + threadIdx.x] = db;
}

// ------------------------------------------------------------------------------------------------
// Launchers

template <typename Kernel> cudaError_t allow_smem(Kernel kernel, size_t bytes) {
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes));
}

unsigned blocks_for(int64_t rows) { return unsigned((rows + kRows - 1) / kRows); }

template <typename T, typename A> cudaError_t fwd_typed(const FwdParams& p, cudaStream_t s) {
  const size_t smem = size_t(kRows) * p.H * sizeof(A);
  AGF_CUDA_RETURN_IF_ERROR(allow_smem(gru_fwd_kernel<T, A>, smem));
  gru_fwd_kernel<T, A><<<blocks_for(p.M), kThreads, smem, s>>>(p);
  return cudaGetLastError();
}

template <typename T, typename A> cudaError_t bwd_typed(const BwdParams& p, cudaStream_t s) {
  const size_t smem = size_t(kRows) * 4 * p.H * sizeof(A);
  AGF_CUDA_RETURN_IF_ERROR(allow_smem(gru_bwd_kernel<T, A>, smem));
  gru_bwd_kernel<T, A><<<blocks_for(p.M), kThreads, smem, s>>>(p);
  return cudaGetLastError();
}

template <typename T, typename A> cudaError_t sample_typed(const SampleParams& p, cudaStream_t s) {
  const size_t smem = size_t(kRows) * (2 * p.H + kVocab) * sizeof(A);
  AGF_CUDA_RETURN_IF_ERROR(allow_smem(gru_sample_kernel<T, A>, smem));
  gru_sample_kernel<T, A><<<blocks_for(p.M), kThreads, smem, s>>>(p);
  return cudaGetLastError();
}

template <typename T, typename A> cudaError_t ce_fwd_typed(const CeParams& p, cudaStream_t s) {
  const size_t smem = size_t(kRows) * (p.H + kVocab) * sizeof(A);
  AGF_CUDA_RETURN_IF_ERROR(allow_smem(ce_fwd_kernel<T, A>, smem));
  ce_fwd_kernel<T, A><<<blocks_for(p.R), kThreads, smem, s>>>(p);
  return cudaGetLastError();
}

template <typename T, typename A> cudaError_t ce_bwd_typed(const CeParams& p, cudaStream_t s) {
  const size_t smem_dh = size_t(kRows) * (p.H + kVocab) * sizeof(A);
  AGF_CUDA_RETURN_IF_ERROR(allow_smem(ce_bwd_dh_kernel<T, A>, smem_dh));
  ce_bwd_dh_kernel<T, A><<<blocks_for(p.R), kThreads, smem_dh, s>>>(p);
  AGF_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  const size_t smem_dw = size_t(kRows) * p.H * sizeof(A);
  AGF_CUDA_RETURN_IF_ERROR(allow_smem(ce_bwd_dw_kernel<T, A>, smem_dw));
  ce_bwd_dw_kernel<T, A><<<dim3(kVocab / kVBlock, unsigned(p.splits)), kThreads, smem_dw, s>>>(p);
  return cudaGetLastError();
}

}  // namespace

static_assert(kThreads == kVocab, "the head kernels give one vocabulary entry to each thread");
static_assert(kThreads == kRows * kVBlock, "ce_bwd_dw_kernel gives one (row, entry) pair to each thread");
static_assert(kMaxHidden % kThreads == 0, "units per thread");

cudaError_t gru_fwd(const FwdParams& p, DType dtype, cudaStream_t stream) {
  if (p.M == 0) return cudaSuccess;
  return agf::by_dtype(dtype, [&](auto t) { return fwd_typed<decltype(t), agf::acc_t<decltype(t)>>(p, stream); });
}

cudaError_t gru_bwd(const BwdParams& p, DType dtype, cudaStream_t stream) {
  if (p.M == 0) return cudaSuccess;
  return agf::by_dtype(dtype, [&](auto t) { return bwd_typed<decltype(t), agf::acc_t<decltype(t)>>(p, stream); });
}

cudaError_t gru_sample(const SampleParams& p, DType dtype, cudaStream_t stream) {
  if (p.M == 0) return cudaSuccess;
  return agf::by_dtype(dtype, [&](auto t) { return sample_typed<decltype(t), agf::acc_t<decltype(t)>>(p, stream); });
}

cudaError_t ce_fwd(const CeParams& p, DType dtype, cudaStream_t stream) {
  if (p.R == 0) return cudaSuccess;
  return agf::by_dtype(dtype, [&](auto t) { return ce_fwd_typed<decltype(t), agf::acc_t<decltype(t)>>(p, stream); });
}

cudaError_t ce_bwd(const CeParams& p, DType dtype, cudaStream_t stream) {
  if (p.R == 0) return cudaSuccess;
  return agf::by_dtype(dtype, [&](auto t) { return ce_bwd_typed<decltype(t), agf::acc_t<decltype(t)>>(p, stream); });
}

}  // namespace agf_gru
