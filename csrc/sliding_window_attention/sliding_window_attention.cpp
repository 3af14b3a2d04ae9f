// Causal sliding-window attention on the CPU: forward, backward and the decode step (docs/ops.md §1.2).
//
// Query i attends keys j with max(i - window + 1, seg_start[i]) <= j <= i. Work per query block is
// O(BQ · (BQ + window)) and memory O(L) besides the inputs: nothing of size L x window is stored;
// the backward recomputes the probabilities from the saved log-sum-exp.
//
// Task = (b, h, block of BQ = 64 queries). Its keys [lo, hi] (at most BQ + window - 1) are taken in
// chunks of KC = 256 rows, each copied into a zero-padded local buffer. Scores are kept transposed,
// St[key][query], so every product is a row-major GEMM whose inner dimension is contiguous: the
// softmax reduces over rows (vectorized across the 64 queries), and only Q and dO blocks need a
// transpose. GEMM tiles are register tiles sized for the ISA (common/cpu_simd.h); each tile
// walks only the key (or query) range that the window lets it see, so masked work is confined to
// the tiles on a window edge. Online softmax across chunks keeps buffers bounded for huge windows.
//
// Backward: a query block adds into the dk/dv rows of its key span, which overlaps the spans of the
// next ceil((BQ + window - 1) / BQ) - 1 blocks. Tasks are (b, h, chunk of consecutive blocks) whose
// key rows are disjoint for chunks of one parity: even chunks run in parallel, then odd ones.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "checks.h"
#include "cpu_simd.h"

namespace {

using agf_simd::round_up;
using agf_simd::vexp;
using agf_simd::Vec;
using agf_simd::vload;
using agf_simd::vstore;

constexpr int BQ = 64;                   // queries per block: a multiple of every vector length
constexpr int KC = 256;                  // keys per chunk
// Rows per GEMM tile (× agf_simd::tile_vecs(MR) vectors), a divisor of BQ and KC: 4 × 4 on 32 vector
// registers (AVX-512, NEON); 8 × 1 on 16 (AVX2, SSE), where 4 × 3 would take all 16 registers.
constexpr int MR = agf_simd::kVecRegs >= 32 ? 4 : 8;
static_assert(BQ % MR == 0 && KC % MR == 0, "query blocks and key chunks hold whole tiles");

// C[MR rows] (+)= sum_{k0 <= k < k1} A(m, k) B[k][:] over the vectors [v0, v1) of C's rows.
// A(m, k) = A[m * lda + k], or A[k * lda + m] when TA (a transposed operand read in place).
template <typename T, bool TA>
void gemm_strip(const T* A, int lda, const T* B, int ldb, T* C, int ldc, int k0, int k1, int v0, int v1,
                bool accumulate) {
  agf_simd::gemm_strip<T, MR>(A, TA ? 1 : lda, TA ? lda : 1, B, ldb, C, ldc, k0, k1, v0, v1, accumulate);
}

template <typename T> constexpr T neg_inf() { return -std::numeric_limits<T>::infinity(); }

// A [*, L, H, E] tensor with a contiguous last dimension, addressed by (b, position, h).
template <typename T> struct Rows {
  T* data;
  int64_t sb, sl, sh;
  Rows(const at::Tensor& t) : data(t.data_ptr<T>()), sb(t.stride(0)), sl(t.stride(1)), sh(t.stride(2)) {}
  T* row(int64_t b, int64_t l, int64_t h) const { return data + b * sb + l * sl + h * sh; }
};

struct Shape {
  int64_t B, L, H;
  int D, Dv, window;
};

// The visible part of one query block: queries q0..q0+nq-1 and their keys lo..hi.
struct Block {
  int q0, nq, lo, hi;
  const int32_t* seg_start;
  const int32_t* seg_end;
  int window;
  // Keys of query i (absolute): [key_lo(i), i].
  int key_lo(int i) const { return std::max(i - window + 1, static_cast<int>(seg_start[i])); }
  // Block-relative queries that see key j (absolute), [first, last]; empty when first > last.
  int query_first(int j) const { return std::max(j, q0) - q0; }
  int query_last(int j) const {
    return std::min({j + window - 1, static_cast<int>(seg_end[j]) - 1, q0 + nq - 1}) - q0;
  }
};

Block make_block(int qb, int L, int window, const int32_t* seg_start, const int32_t* seg_end) {
  Block blk;
  blk.q0 = qb * BQ;
  blk.nq = std::min(BQ, L - blk.q0);
  blk.seg_start = seg_start;
  blk.seg_end = seg_end;
  blk.window = window;
  blk.lo = blk.key_lo(blk.q0);  // key_lo rises with i, so the first query reaches furthest back
  blk.hi = blk.q0 + blk.nq - 1;
  return blk;
}

// Rows [l0, l1) of (b, h) towards the cache while the current block computes.
template <typename T> void prefetch_rows(const Rows<T>& t, int64_t b, int64_t h, int64_t l0, int64_t l1, int E) {
  for (int64_t l = l0; l < l1; ++l) agf_simd::prefetch(t.row(b, l, h), sizeof(T) * E);
}

// Per-thread work space of one query block and one key chunk (all zero-padded).
template <typename T> struct Workspace {
  int Dp, Dvp;
  std::vector<T> qt, qs, kc, vc, st, out, m, l, dout, doutt, dp, dq, dkc, dvc, delta, lse;
  Workspace(int D, int Dv, bool backward) : Dp(round_up(D, Vec<T>::W)), Dvp(round_up(Dv, Vec<T>::W)) {
    qt.assign(static_cast<size_t>(D) * BQ, T(0));
    kc.assign(static_cast<size_t>(KC) * Dp, T(0));
    vc.assign(static_cast<size_t>(KC) * Dvp, T(0));
    st.assign(static_cast<size_t>(KC) * BQ, T(0));
    if (!backward) {
      out.assign(static_cast<size_t>(BQ) * Dvp, T(0));
      m.assign(BQ, T(0));
      l.assign(BQ, T(0));
      return;
    }
    qs.assign(static_cast<size_t>(BQ) * Dp, T(0));
    dout.assign(static_cast<size_t>(BQ) * Dvp, T(0));
    doutt.assign(static_cast<size_t>(Dv) * BQ, T(0));
    dp.assign(static_cast<size_t>(KC) * BQ, T(0));
    dq.assign(static_cast<size_t>(BQ) * Dp, T(0));
    dkc.assign(static_cast<size_t>(KC) * Dp, T(0));
    dvc.assign(static_cast<size_t>(KC) * Dvp, T(0));
    delta.assign(BQ, T(0));
    lse.assign(BQ, T(0));
  }
};

// Queries of the block, scaled: transposed into ws.qt [D][BQ] (the B operand of St = K Qt) and,
// in the backward, row-major into ws.qs [BQ][Dp] (the B operand of dK = dS Qs). Padding rows stay 0.
template <typename T>
void load_queries(const Rows<T>& q, int64_t b, int64_t h, const Block& blk, int D, T scale, Workspace<T>& ws,
                  bool backward) {
  std::fill(ws.qt.begin(), ws.qt.end(), T(0));
  if (backward) std::fill(ws.qs.begin(), ws.qs.end(), T(0));
  for (int i = 0; i < blk.nq; ++i) {
    const T* src = q.row(b, blk.q0 + i, h);
    for (int d = 0; d < D; ++d) ws.qt[d * BQ + i] = src[d] * scale;
    if (backward)
      for (int d = 0; d < D; ++d) ws.qs[i * ws.Dp + d] = src[d] * scale;
  }
}

// Keys and values c0..c0+nk-1 into ws.kc, ws.vc, padded to a multiple of MR rows with zeros.
template <typename T>
void load_chunk(const Rows<T>& k, const Rows<T>& v, int64_t b, int64_t h, int c0, int nk, int D, int Dv,
                Workspace<T>& ws) {
  const int nkp = round_up(nk, MR);
  for (int r = 0; r < nkp; ++r) {
    T* kd = ws.kc.data() + r * ws.Dp;
    T* vd = ws.vc.data() + r * ws.Dvp;
    if (r < nk) {
      std::memcpy(kd, k.row(b, c0 + r, h), sizeof(T) * D);
      std::memcpy(vd, v.row(b, c0 + r, h), sizeof(T) * Dv);
    } else {
      std::fill(kd, kd + D, T(0));
      std::fill(vd, vd + Dv, T(0));
    }
  }
}

// Rows [r, r + MR) of a chunk starting at key c0: the block-relative queries any of them is seen by.
inline void strip_queries(const Block& blk, int c0, int nk, int r, int& first, int& last) {
  const int r_last = std::min(r + MR, nk) - 1;
  first = blk.query_first(c0 + r);
  last = blk.query_last(c0 + r_last);
}

// Rows [i, i + MR) of the block: the chunk-relative keys [k0, k1) any of them sees.
inline void strip_keys(const Block& blk, int c0, int nk, int i, int& k0, int& k1) {
  const int i_last = std::min(i + MR, blk.nq) - 1;
  k0 = std::max(blk.key_lo(blk.q0 + i) - c0, 0);
  k1 = std::min(blk.q0 + i_last - c0 + 1, nk);
}

// St[r][i] = K_r · Qt[:, i] on the query vectors each strip can see (the rest stays unwritten and
// is never read unmasked).
template <typename T>
void chunk_scores(const Block& blk, int c0, int nk, int D, const T* kc, int ldk, const T* qt, T* st) {
  constexpr int VL = Vec<T>::W;
  for (int r = 0; r < nk; r += MR) {
    int first, last;
    strip_queries(blk, c0, nk, r, first, last);
    if (first > last) continue;
    gemm_strip<T, false>(kc + r * ldk, ldk, qt, BQ, st + r * BQ, BQ, 0, D, first / VL, last / VL + 1, false);
  }
}

// The softmax passes over one row of St (one key, the BQ queries of the block): lanes outside the
// key's visible queries [first, last] are masked. Each works a vector of queries at a time.
template <typename T> inline typename Vec<T>::mask lane_mask(int i, int first, int last) {
  using I = typename Vec<T>::mask;
  I idx;
  for (int t = 0; t < Vec<T>::W; ++t) idx[t] = i + t;
  return (idx >= first) & (idx <= last);
}

// row = visible ? row : -inf; m = max(m, row).
template <typename T> void mask_and_max(T* row, int first, int last, T* m) {
  using V = typename Vec<T>::type;
  constexpr int VL = Vec<T>::W;
  const V ninf = V{} + neg_inf<T>();
  for (int i = 0; i < BQ; i += VL) {
    const V x = lane_mask<T>(i, first, last) ? vload(row + i) : ninf;
    const V mi = vload(m + i);
    vstore(row + i, x);
    vstore(m + i, x > mi ? x : mi);
  }
}

// row = visible ? exp(row - base) : 0 (base: the running max, or the saved log-sum-exp); sum += row.
template <typename T> void masked_exp(T* row, int first, int last, const T* base, T* sum) {
  using V = typename Vec<T>::type;
  constexpr int VL = Vec<T>::W;
  for (int i = 0; i < BQ; i += VL) {
    const auto in = lane_mask<T>(i, first, last);
    V p = V{};
    if (first < i + VL && last >= i) p = in ? vexp(vload(row + i) - vload(base + i)) : V{};
    vstore(row + i, p);
    if (sum) vstore(sum + i, vload(sum + i) + p);
  }
}

// drow = visible ? prow * (drow - delta) : 0.
template <typename T> void softmax_grad(T* drow, const T* prow, int first, int last, const T* delta) {
  using V = typename Vec<T>::type;
  constexpr int VL = Vec<T>::W;
  for (int i = 0; i < BQ; i += VL) {
    const V g = vload(prow + i) * (vload(drow + i) - vload(delta + i));
    vstore(drow + i, lane_mask<T>(i, first, last) ? g : V{});
  }
}

// Output row i (absolute) by the definition: softmax over i's visible keys only, then those keys' values.
// The strips of fwd_block also multiply the masked probabilities (0) of keys a query does not see by those keys'
// values, and 0·inf is NaN: an inf or NaN in v would reach queries of its strip that never see it. fwd_block
// redoes the rows that came out non-finite here.
template <typename T>
void exact_row(const Rows<T>& q, const Rows<T>& k, const Rows<T>& v, int64_t b, int64_t h, const Block& blk, int i,
               const Shape& s, T scale, T* dst) {
  const int lo = blk.key_lo(i);
  const T* qi = q.row(b, i, h);
  std::vector<T> p(i - lo + 1);
  T mx = neg_inf<T>();
  for (int j = lo; j <= i; ++j) {
    const T* kj = k.row(b, j, h);
    T dot = 0;
    for (int d = 0; d < s.D; ++d) dot += qi[d] * scale * kj[d];
    p[j - lo] = dot;
    mx = std::max(mx, dot);  // skips a NaN score, which then makes the sum NaN
  }
  T sum = 0;
  for (T& x : p) {
    x = std::exp(x - mx);
    sum += x;
  }
  for (int e = 0; e < s.Dv; ++e) {
    T acc = 0;
    for (int j = lo; j <= i; ++j) acc += p[j - lo] * v.row(b, j, h)[e];
    dst[e] = acc / sum;
  }
}

template <typename T>
void fwd_block(const Rows<T>& q, const Rows<T>& k, const Rows<T>& v, const Rows<T>& o, T* lse_bh, int64_t b,
               int64_t h, const Block& blk, const Shape& s, T scale, Workspace<T>& ws) {
  load_queries(q, b, h, blk, s.D, scale, ws, false);
  std::fill(ws.out.begin(), ws.out.end(), T(0));
  std::fill(ws.m.begin(), ws.m.end(), neg_inf<T>());
  std::fill(ws.l.begin(), ws.l.end(), T(0));
  T* st = ws.st.data();
  T* m = ws.m.data();
  T* l = ws.l.data();
  for (int c0 = blk.lo; c0 <= blk.hi; c0 += KC) {
    const int nk = std::min(KC, blk.hi - c0 + 1);
    load_chunk(k, v, b, h, c0, nk, s.D, s.Dv, ws);
    chunk_scores(blk, c0, nk, s.D, ws.kc.data(), ws.Dp, ws.qt.data(), st);
    // Masked scores become -inf; the running maximum over keys is a reduction down the rows.
    alignas(64) T m_new[BQ];
    std::copy(m, m + BQ, m_new);
    for (int r = 0; r < nk; ++r)
      mask_and_max(st + r * BQ, blk.query_first(c0 + r), blk.query_last(c0 + r), m_new);
    alignas(64) T alpha[BQ];
    for (int i = 0; i < BQ; ++i) {
      // A query with no key yet keeps max -inf: nothing to rescale.
      alpha[i] = (m_new[i] == neg_inf<T>()) ? T(1) : std::exp(m[i] - m_new[i]);
      l[i] *= alpha[i];
      m[i] = m_new[i];
    }
    for (int r = 0; r < nk; ++r) masked_exp(st + r * BQ, blk.query_first(c0 + r), blk.query_last(c0 + r), m, l);
    // Rows nk..nkp-1 of st pair with zero value rows; make them finite so 0 * row stays 0.
    for (int r = nk; r < round_up(nk, MR); ++r) std::fill(st + r * BQ, st + (r + 1) * BQ, T(0));
    const int nv = ws.Dvp / Vec<T>::W;
    for (int i = 0; i < blk.nq; i += MR) {
      if (c0 != blk.lo)
        for (int ii = i; ii < i + MR; ++ii)
          for (int e = 0; e < ws.Dvp; ++e) ws.out[ii * ws.Dvp + e] *= alpha[ii];
      int k0, k1;
      strip_keys(blk, c0, nk, i, k0, k1);
      gemm_strip<T, true>(st + i, BQ, ws.vc.data(), ws.Dvp, ws.out.data() + i * ws.Dvp, ws.Dvp, k0, k1, 0, nv,
                          true);
    }
  }
  const bool finite = agf_simd::all_finite(ws.out.data(), blk.nq * ws.Dvp);  // one look for the common case
  for (int i = 0; i < blk.nq; ++i) {
    T* dst = o.row(b, blk.q0 + i, h);
    const T inv = T(1) / l[i];
    if (finite || agf_simd::all_finite(&ws.out[i * ws.Dvp], s.Dv)) {
      for (int e = 0; e < s.Dv; ++e) dst[e] = ws.out[i * ws.Dvp + e] * inv;
    } else {
      exact_row(q, k, v, b, h, blk, blk.q0 + i, s, scale, dst);
    }
    lse_bh[blk.q0 + i] = m[i] + std::log(l[i]);
  }
}

template <typename T>
void bwd_block(const Rows<T>& q, const Rows<T>& k, const Rows<T>& v, const Rows<T>& o, const Rows<T>& dout,
               const T* lse_bh, const Rows<T>& dq, const Rows<T>& dk, const Rows<T>& dv, int64_t b, int64_t h,
               const Block& blk, const Shape& s, T scale, Workspace<T>& ws) {
  constexpr int VL = Vec<T>::W;
  const int D = s.D, Dv = s.Dv, Dp = ws.Dp, Dvp = ws.Dvp;
  load_queries(q, b, h, blk, D, scale, ws, true);
  std::fill(ws.dout.begin(), ws.dout.end(), T(0));
  std::fill(ws.doutt.begin(), ws.doutt.end(), T(0));
  std::fill(ws.dq.begin(), ws.dq.end(), T(0));
  std::fill(ws.delta.begin(), ws.delta.end(), T(0));
  for (int i = 0; i < blk.nq; ++i) {
    const T* g = dout.row(b, blk.q0 + i, h);
    const T* y = o.row(b, blk.q0 + i, h);
    T acc = 0;
#pragma omp simd reduction(+ : acc)
    for (int e = 0; e < Dv; ++e) acc += g[e] * y[e];
    ws.delta[i] = acc;  // rowsum(dO ∘ O) = sum_j P_ij dP_ij
    std::memcpy(ws.dout.data() + i * Dvp, g, sizeof(T) * Dv);
    for (int e = 0; e < Dv; ++e) ws.doutt[e * BQ + i] = g[e];
    ws.lse[i] = lse_bh[blk.q0 + i];
  }
  T* st = ws.st.data();
  T* dp = ws.dp.data();
  const T* lse = ws.lse.data();
  const T* delta = ws.delta.data();
  for (int c0 = blk.lo; c0 <= blk.hi; c0 += KC) {
    const int nk = std::min(KC, blk.hi - c0 + 1);
    const int nkp = round_up(nk, MR);
    load_chunk(k, v, b, h, c0, nk, D, Dv, ws);
    chunk_scores(blk, c0, nk, D, ws.kc.data(), Dp, ws.qt.data(), st);
    for (int r = 0; r < nk; ++r)
      masked_exp<T>(st + r * BQ, blk.query_first(c0 + r), blk.query_last(c0 + r), lse, nullptr);
    std::fill(st + nk * BQ, st + nkp * BQ, T(0));
    // dPt[r][i] = V_r · dO_i on the strips' visible query vectors, then dS = P ∘ (dP - delta).
    for (int r = 0; r < nk; r += MR) {
      int first, last;
      strip_queries(blk, c0, nk, r, first, last);
      if (first > last) continue;
      gemm_strip<T, false>(ws.vc.data() + r * Dvp, Dvp, ws.doutt.data(), BQ, dp + r * BQ, BQ, 0, Dv, first / VL,
                           last / VL + 1, false);
    }
    for (int r = 0; r < nk; ++r)
      softmax_grad(dp + r * BQ, st + r * BQ, blk.query_first(c0 + r), blk.query_last(c0 + r), delta);
    std::fill(dp + nk * BQ, dp + nkp * BQ, T(0));
    // dV_chunk = P dO and dK_chunk = dS (scale Q): rows are keys, the inner loop runs over queries.
    for (int r = 0; r < nk; r += MR) {
      int first, last;
      strip_queries(blk, c0, nk, r, first, last);
      const int i0 = std::max(first, 0), i1 = std::max(last + 1, i0);
      gemm_strip<T, false>(st + r * BQ, BQ, ws.dout.data(), Dvp, ws.dvc.data() + r * Dvp, Dvp, i0, i1, 0,
                           Dvp / VL, false);
      gemm_strip<T, false>(dp + r * BQ, BQ, ws.qs.data(), Dp, ws.dkc.data() + r * Dp, Dp, i0, i1, 0, Dp / VL,
                           false);
    }
    // dQ += dS^T K (the scale is applied once at the end).
    for (int i = 0; i < blk.nq; i += MR) {
      int k0, k1;
      strip_keys(blk, c0, nk, i, k0, k1);
      gemm_strip<T, true>(dp + i, BQ, ws.kc.data(), Dp, ws.dq.data() + i * Dp, Dp, k0, k1, 0, Dp / VL, true);
    }
    // This task owns these dk/dv rows for now (chunks of one parity share none).
    for (int r = 0; r < nk; ++r) {
      T* gk = dk.row(b, c0 + r, h);
      T* gv = dv.row(b, c0 + r, h);
      const T* lk = ws.dkc.data() + r * Dp;
      const T* lv = ws.dvc.data() + r * Dvp;
      for (int d = 0; d < D; ++d) gk[d] += lk[d];
      for (int e = 0; e < Dv; ++e) gv[e] += lv[e];
    }
  }
  for (int i = 0; i < blk.nq; ++i) {
    T* g = dq.row(b, blk.q0 + i, h);
    for (int d = 0; d < D; ++d) g[d] = ws.dq[i * Dp + d] * scale;
  }
}

void check_common(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& seg_start,
                  const at::Tensor& seg_end, int64_t window) {
  AGF_CHECK_DIM(q, 4);
  AGF_CHECK_DIM(k, 4);
  AGF_CHECK_DIM(v, 4);
  TORCH_CHECK(q.sizes() == k.sizes(), "k must have the shape of q");
  TORCH_CHECK(v.size(0) == q.size(0) && v.size(1) == q.size(1) && v.size(2) == q.size(2),
              "v must match q in [B, L, H]");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(),
              "q, k, v must share a dtype");
  AGF_CHECK_DEVICE(q, at::kCPU);
  AGF_CHECK_DTYPE(seg_start, at::kInt);
  AGF_CHECK_DTYPE(seg_end, at::kInt);
  AGF_CHECK_INPUT(seg_start, at::kCPU);
  AGF_CHECK_INPUT(seg_end, at::kCPU);
  TORCH_CHECK(seg_start.numel() == q.size(1) && seg_end.numel() == q.size(1), "seg_start/seg_end must have L entries");
  TORCH_CHECK(window >= 1, "window must be >= 1");
  TORCH_CHECK(q.size(1) < (int64_t(1) << 31) - KC, "L too large");
}

// Views with a contiguous last dimension (the kernels read rows by stride).
at::Tensor rows_view(const at::Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

std::tuple<at::Tensor, at::Tensor> swa_fwd_cpu(const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_,
                                               const at::Tensor& seg_start, const at::Tensor& seg_end,
                                               int64_t window, double scale) {
  check_common(q_, k_, v_, seg_start, seg_end, window);
  const at::Tensor q = rows_view(q_), k = rows_view(k_), v = rows_view(v_);
  const Shape s{q.size(0), q.size(1), q.size(2), static_cast<int>(q.size(3)), static_cast<int>(v.size(3)),
                static_cast<int>(std::min<int64_t>(window, q.size(1)))};
  at::Tensor o = at::empty({s.B, s.L, s.H, s.Dv}, q.options());
  at::Tensor lse = at::empty({s.B, s.H, s.L}, q.options());
  const int nb = static_cast<int>((s.L + BQ - 1) / BQ);
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "sliding_window_attention_fwd", [&] {
    const Rows<scalar_t> qr(q), kr(k), vr(v), orow(o);
    scalar_t* lse_p = lse.data_ptr<scalar_t>();
    const int32_t* ss = seg_start.data_ptr<int32_t>();
    const int32_t* se = seg_end.data_ptr<int32_t>();
    at::parallel_for(0, s.B * s.H * nb, 1, [&](int64_t begin, int64_t end) {
      Workspace<scalar_t> ws(s.D, s.Dv, false);
      for (int64_t t = begin; t < end; ++t) {
        const int64_t bh = t / nb, b = bh / s.H, h = bh % s.H;
        const Block blk = make_block(static_cast<int>(t % nb), static_cast<int>(s.L), s.window, ss, se);
        if (t + 1 < end) {  // the next block's queries and the keys it adds to the span
          const int64_t nbh = (t + 1) / nb, nb_ = nbh / s.H, nh = nbh % s.H, l0 = (t + 1) % nb * BQ;
          const int64_t l1 = std::min<int64_t>(l0 + BQ, s.L);
          prefetch_rows(qr, nb_, nh, l0, l1, s.D);
          prefetch_rows(kr, nb_, nh, l0, l1, s.D);
          prefetch_rows(vr, nb_, nh, l0, l1, s.Dv);
        }
        fwd_block(qr, kr, vr, orow, lse_p + bh * s.L, b, h, blk, s, static_cast<scalar_t>(scale), ws);
      }
    });
  });
  return {o, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> swa_bwd_cpu(const at::Tensor& grad_o_, const at::Tensor& q_,
                                                           const at::Tensor& k_, const at::Tensor& v_,
                                                           const at::Tensor& o_, const at::Tensor& lse_,
                                                           const at::Tensor& seg_start, const at::Tensor& seg_end,
                                                           int64_t window, double scale) {
  check_common(q_, k_, v_, seg_start, seg_end, window);
  TORCH_CHECK(grad_o_.sizes() == v_.sizes() && o_.sizes() == v_.sizes(), "grad_o and o must have the shape of v");
  TORCH_CHECK(lse_.size(0) == q_.size(0) && lse_.size(1) == q_.size(2) && lse_.size(2) == q_.size(1),
              "lse must be [B, H, L]");
  const at::Tensor q = rows_view(q_), k = rows_view(k_), v = rows_view(v_), o = rows_view(o_);
  const at::Tensor grad_o = rows_view(grad_o_.to(q.scalar_type()));
  const at::Tensor lse = lse_.to(q.scalar_type()).contiguous();
  const Shape s{q.size(0), q.size(1), q.size(2), static_cast<int>(q.size(3)), static_cast<int>(v.size(3)),
                static_cast<int>(std::min<int64_t>(window, q.size(1)))};
  at::Tensor dq = at::empty_like(q, q.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor dk = at::zeros_like(k, k.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor dv = at::zeros_like(v, v.options().memory_format(at::MemoryFormat::Contiguous));
  const int nb = static_cast<int>((s.L + BQ - 1) / BQ);
  // Chunks of G consecutive query blocks per task, so a task's blocks reuse each other's keys in
  // cache. Chunk c adds into key rows [c G BQ - window + 1, (c + 1) G BQ): with G BQ >= window - 1
  // chunks of one parity never share a row, so even chunks run in parallel, then odd ones.
  const int G = std::max({1, (s.window - 1 + BQ - 1) / BQ, 4});
  const int chunks = (nb + G - 1) / G;
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "sliding_window_attention_bwd", [&] {
    const Rows<scalar_t> qr(q), kr(k), vr(v), orow(o), gr(grad_o), dqr(dq), dkr(dk), dvr(dv);
    const scalar_t* lse_p = lse.data_ptr<scalar_t>();
    const int32_t* ss = seg_start.data_ptr<int32_t>();
    const int32_t* se = seg_end.data_ptr<int32_t>();
    for (int parity = 0; parity < 2; ++parity) {
      const int per_bh = (chunks - parity + 1) / 2;  // chunks parity, parity + 2, ...
      at::parallel_for(0, s.B * s.H * per_bh, 1, [&](int64_t begin, int64_t end) {
        Workspace<scalar_t> ws(s.D, s.Dv, true);
        for (int64_t t = begin; t < end; ++t) {
          const int64_t bh = t / per_bh, b = bh / s.H, h = bh % s.H;
          const int chunk = parity + 2 * static_cast<int>(t % per_bh);
          const int qb_end = std::min(nb, (chunk + 1) * G);
          for (int qb = chunk * G; qb < qb_end; ++qb) {
            const Block blk = make_block(qb, static_cast<int>(s.L), s.window, ss, se);
            if (qb + 1 < qb_end) {  // the next block's queries, outputs, output gradients and newest keys
              const int64_t l0 = static_cast<int64_t>(qb + 1) * BQ, l1 = std::min<int64_t>(l0 + BQ, s.L);
              prefetch_rows(qr, b, h, l0, l1, s.D);
              prefetch_rows(orow, b, h, l0, l1, s.Dv);
              prefetch_rows(gr, b, h, l0, l1, s.Dv);
              prefetch_rows(kr, b, h, l0, l1, s.D);
              prefetch_rows(vr, b, h, l0, l1, s.Dv);
            }
            bwd_block(qr, kr, vr, orow, gr, lse_p + bh * s.L, dqr, dkr, dvr, b, h, blk, s,
                      static_cast<scalar_t>(scale), ws);
          }
        }
      });
    }
  });
  return {dq, dk, dv};
}

// Decode step: per batch row b, write the new keys/values into ring slot pos % W, then every head attends the
// min(pos + 1, W) filled slots. Slots outer, heads inner: a slot's H rows are contiguous in [B, W, H, D], so the
// caches stream in order, where one head at a time would jump H·D elements per slot. One task per row b;
// each writes only its own cache rows.
template <typename T>
void step_kernel(const T* q, const T* k, const T* v, T* k_cache, T* v_cache, const int64_t* pos, T* o, int64_t B,
                 int64_t H, int64_t D, int64_t Dv, int64_t W, T scale) {
  // A decode step is microseconds of work: fork threads only for batches worth it (~256k MACs each).
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 18) / std::max<int64_t>(1, H * W * (D + Dv)));
  const int64_t Wp = round_up(W, Vec<T>::W);
  at::parallel_for(0, B, grain, [&](int64_t begin, int64_t end) {
    std::vector<T> p(H * Wp), acc(H * Dv), sum(H);
    for (int64_t b = begin; b < end; ++b) {
      const int64_t slot = pos[b] % W, n = std::min(pos[b] + 1, W);
      std::memcpy(k_cache + (b * W + slot) * H * D, k + b * H * D, sizeof(T) * H * D);
      std::memcpy(v_cache + (b * W + slot) * H * Dv, v + b * H * Dv, sizeof(T) * H * Dv);
      const T* qb = q + b * H * D;
      for (int64_t j = 0; j < n; ++j) {
        const T* kr = k_cache + (b * W + j) * H * D;
        for (int64_t h = 0; h < H; ++h) {
          const T* qv = qb + h * D;
          const T* kh = kr + h * D;
          T dot = 0;
#pragma omp simd reduction(+ : dot)
          for (int64_t d = 0; d < D; ++d) dot += qv[d] * kh[d];
          p[h * Wp + j] = dot * scale;
        }
      }
      for (int64_t h = 0; h < H; ++h) {
        T* ph = &p[h * Wp];
        const T mx = *std::max_element(ph, ph + n);
        // exp over whole vectors (the pad past n is never summed)
        typename Vec<T>::type vsum = {};
        int64_t j = 0;
        for (; j + Vec<T>::W <= n; j += Vec<T>::W) {
          const auto e = vexp(vload(ph + j) - mx);
          vstore(ph + j, e);
          vsum += e;
        }
        T s = agf_simd::hsum<T>(vsum);
        for (; j < n; ++j) {
          ph[j] = std::exp(ph[j] - mx);
          s += ph[j];
        }
        sum[h] = s;
      }
      std::fill(acc.begin(), acc.end(), T(0));
      for (int64_t j = 0; j < n; ++j) {
        const T* vr = v_cache + (b * W + j) * H * Dv;
        for (int64_t h = 0; h < H; ++h) {
          const T pj = p[h * Wp + j];
          const T* vh = vr + h * Dv;
          T* a = &acc[h * Dv];
#pragma omp simd
          for (int64_t e = 0; e < Dv; ++e) a[e] += pj * vh[e];
        }
      }
      for (int64_t h = 0; h < H; ++h)
        for (int64_t e = 0; e < Dv; ++e) o[(b * H + h) * Dv + e] = acc[h * Dv + e] / sum[h];
    }
  });
}

at::Tensor swa_step_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& k_cache,
                        at::Tensor& v_cache, const at::Tensor& pos, double scale) {
  AGF_CHECK_DIM(q, 3);
  AGF_CHECK_DIM(k_cache, 4);
  AGF_CHECK_DEVICE(q, at::kCPU);
  AGF_CHECK_CONTIGUOUS(k_cache);
  AGF_CHECK_CONTIGUOUS(v_cache);
  AGF_CHECK_DTYPE(pos, at::kLong);
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2), Dv = v.size(2), W = k_cache.size(1);
  TORCH_CHECK(k.sizes() == q.sizes() && v.size(0) == B && v.size(1) == H, "k, v must match q in [B, H]");
  TORCH_CHECK(k_cache.size(0) == B && k_cache.size(2) == H && k_cache.size(3) == D, "k_cache must be [B, W, H, D]");
  TORCH_CHECK(v_cache.size(0) == B && v_cache.size(1) == W && v_cache.size(2) == H && v_cache.size(3) == Dv,
              "v_cache must be [B, W, H, Dv]");
  TORCH_CHECK(k_cache.scalar_type() == q.scalar_type() && v_cache.scalar_type() == q.scalar_type(),
              "k_cache, v_cache must have q's dtype");
  TORCH_CHECK(pos.numel() == B, "pos must have B entries");
  const at::Tensor qc = q.contiguous(), kc = k.contiguous(), vc = v.contiguous(), pc = pos.contiguous();
  const int64_t* pp = pc.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) TORCH_CHECK(pp[b] >= 0, "pos must be >= 0, got ", pp[b]);
  at::Tensor o = at::empty({B, H, Dv}, q.options());
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "sliding_window_attention_step", [&] {
    step_kernel<scalar_t>(qc.data_ptr<scalar_t>(), kc.data_ptr<scalar_t>(), vc.data_ptr<scalar_t>(),
                          k_cache.data_ptr<scalar_t>(), v_cache.data_ptr<scalar_t>(), pc.data_ptr<int64_t>(),
                          o.data_ptr<scalar_t>(), B, H, D, Dv, W, static_cast<scalar_t>(scale));
  });
  return o;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(agiformer_kernels, m) {
  m.def(
      "sliding_window_attention_fwd(Tensor q, Tensor k, Tensor v, Tensor seg_start, Tensor seg_end, int window, "
      "float scale) -> (Tensor, Tensor)");
  m.def(
      "sliding_window_attention_bwd(Tensor grad_o, Tensor q, Tensor k, Tensor v, Tensor o, Tensor lse, "
      "Tensor seg_start, Tensor seg_end, int window, float scale) -> (Tensor, Tensor, Tensor)");
  m.def(
      "sliding_window_attention_step(Tensor q, Tensor k, Tensor v, Tensor(a!) k_cache, Tensor(b!) v_cache, "
      "Tensor pos, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(agiformer_kernels, CPU, m) {
  m.impl("sliding_window_attention_fwd", &swa_fwd_cpu);
  m.impl("sliding_window_attention_bwd", &swa_bwd_cpu);
  m.impl("sliding_window_attention_step", &swa_step_cpu);
}
