// Causal linear attention (docs/ops.md §1.1): schema and CPU kernels (forward, backward, decode step).
//
// One work item is one (sequence or cu_seqlens segment, head), walked chunk by chunk (C = 64 tokens),
// items spread over threads with at::parallel_for. The chunk's q̂, k̂, v (feature map and scale applied
// on load), its C×C scores and the running D×Dv state S and normalizer z live in thread-local buffers
// (~100 KiB at D = 64: L2-resident); the products are register-tiled small GEMMs that skip the masked
// half of every causal C×C block; only the output and the per-token denominators (B·H·L values, kept
// for the backward) are written back.
// The backward never stores states: pass 1 walks forward rebuilding S, z for dq; pass 2 walks
// backward accumulating dS = Σ q̂ dnumᵀ, dz = Σ q̂ dden for dk, dv.
// Accumulation and state are fp32 (fp64 for double inputs) whatever the input dtype.

// Rows are short (D values): a libc memmove call per row copy would cost more than the copy.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-tree-loop-distribute-patterns")
#endif

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#include "checks.h"
#include "cpu_simd.h"

namespace agf_linear_attention {

using agf_simd::round_up;
using agf_simd::vec_t;
using agf_simd::Vec;
using agf_simd::vload;
using agf_simd::vstore;

constexpr int64_t kChunk = 64;

// ---- Small GEMMs on thread-local blocks -------------------------------------------------------
// C[m×n] (+)= A[m×k]·B[k×n] with B and C row-major and A addressed as A[i·sa_i + p·sa_p], so a
// transposed A costs nothing. n is padded to whole vectors (the buffers' pad columns are zero).
// Register tiles of agf_simd::kTileRows rows (cpu_simd.h, sized per ISA).

// Which part of a product a causal chunk needs, per block of rows [i0, i0 + MR):
enum class Part {
  Full,       // everything
  CausalOut,  // output columns j <= i only (then masked by the caller): columns < i0 + MR
  LowerK,     // A is lower triangular in (i, p): p < i0 + MR
  UpperK,     // A is upper triangular in (i, p): p >= i0
};

// C[m×n] (+)= A·B over the part of the product that `part` says is needed; n a multiple of Vec<T>::W.
template <typename T>
void gemm(Part part, int64_t m, int64_t n, int64_t k, const T* A, int64_t sa_i, int64_t sa_p, const T* B,
          int64_t ldb, T* C, int64_t ldc, bool accumulate) {
  constexpr int64_t MR = agf_simd::kTileRows, W = Vec<T>::W;
  for (int64_t i0 = 0; i0 < m; i0 += MR) {
    const int64_t rows = std::min<int64_t>(MR, m - i0);
    int64_t p0 = 0, p1 = k, ncols = n;
    if (part == Part::CausalOut) ncols = std::min(n, round_up(i0 + rows, W));
    if (part == Part::LowerK) p1 = std::min(k, i0 + rows);
    if (part == Part::UpperK) p0 = i0;
    agf_simd::gemm_rows<T>(rows, A + i0 * sa_i, sa_i, sa_p, B, ldb, C + i0 * ldc, ldc, p0, p1, 0, ncols / W,
                           accumulate);
  }
}

// ---- Lane-wise helpers on padded rows (lengths a multiple of Vec<T>::W) ----------------------
// row[0 .. n) = mul·φ(row) (elu+1: x + 1 + feature_eps for x > 0, exp(x) + feature_eps else), then
// the pad row[valid .. n) back to zero. With `deriv`, also deriv[0 .. n) = mul·φ'(row) (elu+1: 1 for
// x > 0, exp(x) else), for the backward, from the same exp.
template <typename T>
inline void apply_feature(T* row, int64_t n, int64_t valid, bool elu, T feps, T mul, T* deriv = nullptr) {
  constexpr int W = Vec<T>::W;
  const vec_t<T> zero = {};
  for (int64_t d = 0; d < n; d += W) {
    vec_t<T> x = vload(row + d);
    vec_t<T> f = zero + mul;
    if (elu) {
      const vec_t<T> e = agf_simd::vexp(x > zero ? zero : x);  // exp(min(x, 0))
      const auto positive = x > zero;
      f = positive ? f : mul * e;
      x = positive ? x + (T(1) + feps) : e + feps;
    }
    vstore(row + d, mul * x);
    if (deriv) vstore(deriv + d, f);
  }
  std::fill(row + valid, row + n, T(0));
}

template <typename T>
inline void vmul(const T* a, T* y, int64_t n) {
  for (int64_t d = 0; d < n; d += Vec<T>::W) vstore(y + d, vload(y + d) * vload(a + d));
}

template <typename T>
inline T vdot(const T* a, const T* b, int64_t n) {
  vec_t<T> acc = {};
  for (int64_t d = 0; d < n; d += Vec<T>::W) acc += vload(a + d) * vload(b + d);
  return agf_simd::hsum<T>(acc);
}

template <typename T>
inline void vaxpy(T alpha, const T* x, T* y, int64_t n) {
  for (int64_t d = 0; d < n; d += Vec<T>::W) vstore(y + d, vload(y + d) + alpha * vload(x + d));
}

template <typename T>
inline void vscale(T alpha, T* y, int64_t n) {
  for (int64_t d = 0; d < n; d += Vec<T>::W) vstore(y + d, alpha * vload(y + d));
}

// Row conversions between the input dtype and the accumulation type.
template <typename scalar_t, typename T>
inline void to_acc(const scalar_t* __restrict__ x, T* __restrict__ out, int64_t n) {
  int64_t i = 0;
  if constexpr (std::is_same_v<scalar_t, T>)
    for (; i + Vec<T>::W <= n; i += Vec<T>::W) vstore(out + i, vload(x + i));
  for (; i < n; ++i) out[i] = static_cast<T>(x[i]);
}

template <typename T, typename scalar_t>
inline void from_acc(const T* __restrict__ x, scalar_t* __restrict__ out, int64_t n) {
  int64_t i = 0;
  if constexpr (std::is_same_v<scalar_t, T>)
    for (; i + Vec<T>::W <= n; i += Vec<T>::W) vstore(out + i, vload(x + i));
  for (; i < n; ++i) out[i] = static_cast<scalar_t>(x[i]);
}

struct Params {
  bool elu;  // feature map elu+1 (else identity)
  double feature_eps, scale, eps;
  bool normalize;
};

// Where one work item's tokens live, and its rows of the saved chunk states.
struct Item {
  int64_t b;      // batch row of q/k/v (0 with cu_seqlens)
  int64_t h;      // head
  int64_t seq;    // index into the states' leading dim
  int64_t start;  // first token
  int64_t len;    // tokens
  int64_t base;   // row of its first chunk in the chunk-state tensors
};

// Rows of the chunk-state tensors: B·⌈L/C⌉, or with cu_seqlens ⌊T/C⌋ + n (segment i starts at row
// ⌊start_i/C⌋ + i, which never overlaps segment i-1 and needs no data-dependent size).
inline int64_t chunk_rows(int64_t B, int64_t L, int64_t n_seq, bool packed) {
  return packed ? L / kChunk + n_seq : B * ((L + kChunk - 1) / kChunk);
}

inline Item item_of(int64_t i, int64_t H, int64_t L, const int32_t* cu) {
  const int64_t seq = i / H, h = i % H;
  if (cu == nullptr) return {seq, h, seq, 0, L, seq * ((L + kChunk - 1) / kChunk)};
  return {0, h, seq, cu[seq], cu[seq + 1] - cu[seq], cu[seq] / kChunk + seq};
}

// Strided [B, L, H, D] rows (last dim contiguous).
template <typename scalar_t>
struct Rows {
  scalar_t* ptr;
  int64_t sb, sl, sh;
  Rows(const at::Tensor& t)
      : ptr(t.data_ptr<scalar_t>()), sb(t.stride(0)), sl(t.stride(1)), sh(t.stride(2)) {}
  scalar_t* row(const Item& it, int64_t t) const { return ptr + it.b * sb + (it.start + t) * sl + it.h * sh; }
  // Rows [t0, t1) of the item towards the cache (`write`: outputs) while the current chunk computes.
  void prefetch(const Item& it, int64_t t0, int64_t t1, int64_t n, bool write = false) const {
    for (int64_t t = std::max<int64_t>(t0, 0); t < std::min(t1, it.len); ++t)
      agf_simd::prefetch(row(it, t), n * static_cast<int64_t>(sizeof(scalar_t)), write);
  }
};

// dst[j·ldd + i] = src[i·lds + j] for i < rows, j < cols. Walks dst in order: src is always a small
// thread-local block, dst may be the saved chunk states in memory, where scattered stores are slow.
template <typename T>
inline void transpose(const T* __restrict__ src, int64_t lds, T* __restrict__ dst, int64_t ldd, int64_t rows,
                      int64_t cols) {
  for (int64_t j = 0; j < cols; ++j)
    for (int64_t i = 0; i < rows; ++i) dst[j * ldd + i] = src[i * lds + j];
}

// One chunk's q̂, k̂ [C × Dp] and v [C × Dvp] (row-major), k̂ᵀ [Dp × C] and, for the backward, vᵀ
// [Dvp × C] and the feature map's derivatives dq̂/dq, dk̂/dk [C × Dp]. Column pads stay zero; rows past
// a short last chunk are never read (k = n).
template <typename scalar_t, typename T>
struct Chunk {
  int64_t D, Dv, Dp, Dvp;
  bool backward;
  std::vector<T> q, k, kt, v, vt, dq, dk;
  Chunk(int64_t D_, int64_t Dv_, bool backward_)
      : D(D_), Dv(Dv_), Dp(round_up(D_, Vec<T>::W)), Dvp(round_up(Dv_, Vec<T>::W)), backward(backward_),
        q(kChunk * Dp), k(kChunk * Dp), kt(Dp * kChunk), v(kChunk * Dvp), vt(backward ? Dvp * kChunk : 0),
        dq(backward ? kChunk * Dp : 0), dk(backward ? kChunk * Dp : 0) {}

  void load(const Rows<scalar_t>& Q, const Rows<scalar_t>& K, const Rows<scalar_t>& V, const Item& it, int64_t t0,
            int64_t n, const Params& p) {
    const T feps = static_cast<T>(p.feature_eps), scale = static_cast<T>(p.scale);
    for (int64_t t = 0; t < n; ++t) {
      to_acc(Q.row(it, t0 + t), &q[t * Dp], D);
      apply_feature(&q[t * Dp], Dp, D, p.elu, feps, scale, backward ? &dq[t * Dp] : nullptr);
      to_acc(K.row(it, t0 + t), &k[t * Dp], D);
      apply_feature(&k[t * Dp], Dp, D, p.elu, feps, T(1), backward ? &dk[t * Dp] : nullptr);
      to_acc(V.row(it, t0 + t), &v[t * Dvp], Dv);
    }
    transpose(k.data(), Dp, kt.data(), kChunk, n, D);
    if (backward) transpose(v.data(), Dvp, vt.data(), kChunk, n, Dv);
  }
};

// Zero the strictly upper triangle (s > t) of a chunk's C×C block (row stride C).
template <typename T>
inline void mask_upper(T* A, int64_t n) {
  for (int64_t t = 0; t < n; ++t) std::fill(A + t * kChunk + t + 1, A + (t + 1) * kChunk, T(0));
}

// Σ_{s<=t} A[t, s] over a masked row (zeros past t).
template <typename T>
inline T masked_row_sum(const T* row, int64_t t) {
  vec_t<T> acc = {};
  for (int64_t s = 0; s <= t; s += Vec<T>::W) acc += vload(row + s);
  return agf_simd::hsum<T>(acc);
}

template <typename scalar_t>
void forward_kernel(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor* S0,
                    const at::Tensor* z0, const int32_t* cu, int64_t n_seq, const Params& p, at::Tensor& o,
                    at::Tensor& den, at::Tensor& S_out, at::Tensor& z_out, at::Tensor& chunk_S,
                    at::Tensor& chunk_z) {
  using T = at::opmath_type<scalar_t>;
  constexpr int64_t C = kChunk, W = Vec<T>::W;
  const int64_t H = q.size(2), L = q.size(1), D = q.size(3), Dv = v.size(3);
  const Rows<scalar_t> Q(q), K(k), V(v), O(o);
  T* den_ptr = p.normalize ? den.data_ptr<T>() : nullptr;
  T* S_ptr = S_out.data_ptr<T>();
  T* z_ptr = z_out.data_ptr<T>();
  T* cS_ptr = chunk_S.data_ptr<T>();
  T* cz_ptr = chunk_z.data_ptr<T>();
  const T* S0_ptr = S0 ? S0->data_ptr<T>() : nullptr;
  const T* z0_ptr = z0 ? z0->data_ptr<T>() : nullptr;
  const T eps = static_cast<T>(p.eps);

  // Items are handed out one at a time, not in static halves: a thread the OS preempts (the cores are
  // shared) then holds up the call by at most one item while the others take over the rest.
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min<int64_t>(n_seq * H, at::get_num_threads()), 1, [&](int64_t, int64_t) {
    Chunk<scalar_t, T> ch(D, Dv, false);
    const int64_t Dp = ch.Dp, Dvp = ch.Dvp;
    std::vector<T> A(C * C), num(C * Dvp), S(Dp * Dvp), z(Dp);
    for (int64_t i = next++; i < n_seq * H; i = next++) {
      const Item it = item_of(i, H, L, cu);
      std::fill(S.begin(), S.end(), T(0));
      std::fill(z.begin(), z.end(), T(0));
      if (S0_ptr) {
        for (int64_t d = 0; d < D; ++d) to_acc(S0_ptr + (i * D + d) * Dv, &S[d * Dvp], Dv);
        to_acc(z0_ptr + i * D, z.data(), D);
      }
      for (int64_t c = 0, t0 = 0; t0 < it.len; ++c, t0 += C) {
        const int64_t n = std::min(C, it.len - t0);
        // The state before this chunk, transposed, is what the backward's dq needs.
        const int64_t row = (it.base + c) * H + it.h;
        transpose(S.data(), Dvp, cS_ptr + row * Dv * D, D, D, Dv);
        to_acc(z.data(), cz_ptr + row * D, D);

        ch.load(Q, K, V, it, t0, n, p);
        Q.prefetch(it, t0 + C, t0 + 2 * C, D);
        K.prefetch(it, t0 + C, t0 + 2 * C, D);
        V.prefetch(it, t0 + C, t0 + 2 * C, Dv);
        O.prefetch(it, t0 + C, t0 + 2 * C, Dv, true);
        gemm(Part::CausalOut, n, round_up(n, W), D, ch.q.data(), Dp, 1, ch.kt.data(), C, A.data(), C, false);
        mask_upper(A.data(), n);
        gemm(Part::Full, n, Dvp, D, ch.q.data(), Dp, 1, S.data(), Dvp, num.data(), Dvp, false);  // earlier chunks
        if (agf_simd::all_finite(ch.v.data(), n * Dvp)) {
          gemm(Part::LowerK, n, Dvp, n, A.data(), C, 1, ch.v.data(), Dvp, num.data(), Dvp, true);  // this chunk
        } else {
          // A tile's rows also multiply the masked zeros above their diagonal by v, and 0·inf is NaN: an inf or
          // NaN in v_s would reach the outputs t < s of its tile. Row by row, output t reads only s <= t.
          for (int64_t t = 0; t < n; ++t)
            agf_simd::gemm_rows<T>(1, &A[t * C], C, 1, ch.v.data(), Dvp, &num[t * Dvp], Dvp, 0, t + 1, 0, Dvp / W,
                                   true);
        }
        for (int64_t t = 0; t < n; ++t) {
          T* nr = &num[t * Dvp];
          if (p.normalize) {
            // q̂_t·z_t = Σ_{s<=t} q̂_t·k̂_s (this chunk) + q̂_t·z (earlier chunks) + eps
            const T d = masked_row_sum(&A[t * C], t) + vdot(&ch.q[t * Dp], z.data(), Dp) + eps;
            den_ptr[(it.b * H + it.h) * L + it.start + t0 + t] = d;
            vscale(T(1) / d, nr, Dvp);
          }
          from_acc(nr, O.row(it, t0 + t), Dv);
        }
        gemm(Part::Full, D, Dvp, n, ch.kt.data(), C, 1, ch.v.data(), Dvp, S.data(), Dvp, true);  // S += k̂ᵀv
        for (int64_t t = 0; t < n; ++t) vaxpy(T(1), &ch.k[t * Dp], z.data(), Dp);
      }
      for (int64_t d = 0; d < D; ++d) to_acc(&S[d * Dvp], S_ptr + (i * D + d) * Dv, Dv);
      to_acc(z.data(), z_ptr + i * D, D);
    }
  });
}

// One reverse sweep per item: dq from the saved chunk states, dk and dv from dS = Σ_{later} q̂ dnumᵀ
// and dz = Σ_{later} q̂ dden carried backwards.
template <typename scalar_t>
void backward_kernel(const at::Tensor& dout, const at::Tensor* dS_in, const at::Tensor* dz_in, const at::Tensor& q,
                     const at::Tensor& k, const at::Tensor& v, const at::Tensor& o, const at::Tensor& den,
                     const at::Tensor& chunk_S, const at::Tensor& chunk_z, const int32_t* cu, int64_t n_seq,
                     const Params& p, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv, at::Tensor& dS0,
                     at::Tensor& dz0) {
  using T = at::opmath_type<scalar_t>;
  constexpr int64_t C = kChunk, W = Vec<T>::W;
  const int64_t H = q.size(2), L = q.size(1), D = q.size(3), Dv = v.size(3);
  const Rows<scalar_t> Q(q), K(k), V(v), O(o), dO(dout), dQ(dq), dK(dk), dV(dv);
  const T* den_ptr = p.normalize ? den.data_ptr<T>() : nullptr;
  const T* cS_ptr = chunk_S.data_ptr<T>();
  const T* cz_ptr = chunk_z.data_ptr<T>();
  const T* dS_in_ptr = dS_in ? dS_in->data_ptr<T>() : nullptr;
  const T* dz_in_ptr = dz_in ? dz_in->data_ptr<T>() : nullptr;
  T* dS_ptr = dS0.data_ptr<T>();
  T* dz_ptr = dz0.data_ptr<T>();

  std::atomic<int64_t> next{0};  // one item at a time, as in the forward
  at::parallel_for(0, std::min<int64_t>(n_seq * H, at::get_num_threads()), 1, [&](int64_t, int64_t) {
    Chunk<scalar_t, T> ch(D, Dv, true);
    const int64_t Dp = ch.Dp, Dvp = ch.Dvp;
    // G = dnum = do/den [C × Dvp], g = dden = -(do·o)/den; A the scores, Bm their gradient [C × C];
    // St, z the state before the chunk; dS [Dp × Dvp] and dSt = dSᵀ; raw one row of o.
    std::vector<T> G(C * Dvp), g(C), A(C * C), Bm(C * C), gq(C * Dp), gk(C * Dp), gv(C * Dvp);
    std::vector<T> St(Dvp * Dp), z(Dp), dS(Dp * Dvp), dSt(Dvp * Dp), dz(Dp), raw(Dvp);

    for (int64_t i = next++; i < n_seq * H; i = next++) {
      const Item it = item_of(i, H, L, cu);
      std::fill(dS.begin(), dS.end(), T(0));
      std::fill(dz.begin(), dz.end(), T(0));
      if (dS_in_ptr)
        for (int64_t d = 0; d < D; ++d) to_acc(dS_in_ptr + (i * D + d) * Dv, &dS[d * Dvp], Dv);
      if (dz_in_ptr) to_acc(dz_in_ptr + i * D, dz.data(), D);
      transpose(dS.data(), Dvp, dSt.data(), Dp, Dp, Dvp);
      const int64_t n_chunks = (it.len + C - 1) / C;
      for (int64_t c = n_chunks - 1; c >= 0; --c) {
        const int64_t t0 = c * C, n = std::min(C, it.len - t0);
        const int64_t row = (it.base + c) * H + it.h;
        for (int64_t j = 0; j < Dv; ++j) to_acc(cS_ptr + (row * Dv + j) * D, &St[j * Dp], D);
        to_acc(cz_ptr + row * D, z.data(), D);
        ch.load(Q, K, V, it, t0, n, p);
        for (const Rows<scalar_t>* r : {&Q, &K}) r->prefetch(it, t0 - C, t0, D);
        for (const Rows<scalar_t>* r : {&V, &O, &dO}) r->prefetch(it, t0 - C, t0, Dv);
        for (const Rows<scalar_t>* r : {&dQ, &dK}) r->prefetch(it, t0 - C, t0, D, true);
        dV.prefetch(it, t0 - C, t0, Dv, true);
        for (int64_t t = 0; t < n; ++t) {
          T* Gr = &G[t * Dvp];
          to_acc(dO.row(it, t0 + t), Gr, Dv);
          if (p.normalize) {
            to_acc(O.row(it, t0 + t), raw.data(), Dv);
            std::fill(raw.begin() + Dv, raw.begin() + Dvp, T(0));
            const T inv = T(1) / den_ptr[(it.b * H + it.h) * L + it.start + t0 + t];
            g[t] = -vdot(Gr, raw.data(), Dvp) * inv;
            vscale(inv, Gr, Dvp);
          }
        }
        // Bm[t, s] = dnum_t·v_s + dden_t for s <= t, else 0: the gradient of the masked scores.
        gemm(Part::CausalOut, n, round_up(n, W), Dv, G.data(), Dvp, 1, ch.vt.data(), C, Bm.data(), C, false);
        if (p.normalize)
          for (int64_t t = 0; t < n; ++t) {
            T* r = &Bm[t * C];
            for (int64_t s = 0; s <= t; s += W) vstore(r + s, vload(r + s) + g[t]);
          }
        mask_upper(Bm.data(), n);
        gemm(Part::CausalOut, n, round_up(n, W), D, ch.q.data(), Dp, 1, ch.kt.data(), C, A.data(), C, false);
        mask_upper(A.data(), n);

        gemm(Part::LowerK, n, Dp, n, Bm.data(), C, 1, ch.k.data(), Dp, gq.data(), Dp, false);   // Bm k̂
        gemm(Part::Full, n, Dp, Dv, G.data(), Dvp, 1, St.data(), Dp, gq.data(), Dp, true);      // dnum Sᵀ
        gemm(Part::UpperK, n, Dp, n, Bm.data(), 1, C, ch.q.data(), Dp, gk.data(), Dp, false);   // Bmᵀ q̂
        gemm(Part::Full, n, Dp, Dv, ch.v.data(), Dvp, 1, dSt.data(), Dp, gk.data(), Dp, true);  // v dSᵀ
        gemm(Part::UpperK, n, Dvp, n, A.data(), 1, C, G.data(), Dvp, gv.data(), Dvp, false);    // Aᵀ dnum
        gemm(Part::Full, n, Dvp, D, ch.k.data(), Dp, 1, dS.data(), Dvp, gv.data(), Dvp, true);  // k̂ dS
        for (int64_t t = 0; t < n; ++t) {
          if (p.normalize) vaxpy(g[t], z.data(), &gq[t * Dp], Dp);
          vmul(&ch.dq[t * Dp], &gq[t * Dp], Dp);  // through q̂ = scale·φ(q)
          from_acc(&gq[t * Dp], dQ.row(it, t0 + t), D);
          vaxpy(T(1), dz.data(), &gk[t * Dp], Dp);
          vmul(&ch.dk[t * Dp], &gk[t * Dp], Dp);
          from_acc(&gk[t * Dp], dK.row(it, t0 + t), D);
          from_acc(&gv[t * Dvp], dV.row(it, t0 + t), Dv);
        }
        gemm(Part::Full, D, Dvp, n, ch.q.data(), 1, Dp, G.data(), Dvp, dS.data(), Dvp, true);  // dS += q̂ᵀ dnum
        transpose(dS.data(), Dvp, dSt.data(), Dp, D, Dv);
        if (p.normalize)
          for (int64_t t = 0; t < n; ++t) vaxpy(g[t], &ch.q[t * Dp], dz.data(), Dp);
      }
      for (int64_t d = 0; d < D; ++d) to_acc(&dS[d * Dvp], dS_ptr + (i * D + d) * Dv, Dv);
      to_acc(dz.data(), dz_ptr + i * D, D);
    }
  });
}

Params make_params(c10::string_view feature_map, double feature_eps, double scale, double eps, bool normalize) {
  TORCH_CHECK(feature_map == "elu+1" || feature_map == "identity",
              "feature_map must be 'elu+1' or 'identity', got ", feature_map);
  return {feature_map == "elu+1", feature_eps, scale, eps, normalize};
}

at::ScalarType state_dtype(const at::Tensor& q) {
  return q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  AGF_CHECK_DIM(q, 4);
  AGF_CHECK_DIM(k, 4);
  AGF_CHECK_DIM(v, 4);
  TORCH_CHECK(k.sizes() == q.sizes(), "k must have q's shape");
  TORCH_CHECK(v.size(0) == q.size(0) && v.size(1) == q.size(1) && v.size(2) == q.size(2),
              "v must have q's B, L, H");
  for (const at::Tensor* t : {&q, &k, &v}) {
    AGF_CHECK_DEVICE(*t, at::kCPU);
    AGF_CHECK_DTYPE(*t, q.scalar_type());
    TORCH_CHECK(t->numel() == 0 || t->size(3) <= 1 || t->stride(3) == 1,
                "q, k, v must have a contiguous last dimension");
  }
}

// The number of independent sequences (B, or segments), after checking cu_seqlens.
int64_t sequences(const at::Tensor& q, const std::optional<at::Tensor>& cu_seqlens) {
  if (!cu_seqlens) return q.size(0);
  AGF_CHECK_DTYPE(*cu_seqlens, at::kInt);
  AGF_CHECK_DIM(*cu_seqlens, 1);
  AGF_CHECK_CONTIGUOUS(*cu_seqlens);
  TORCH_CHECK(q.size(0) == 1, "cu_seqlens needs B = 1");
  return cu_seqlens->size(0) - 1;
}

void check_state(const std::optional<at::Tensor>& S, const std::optional<at::Tensor>& z, int64_t n, const at::Tensor& q,
                 int64_t Dv) {
  TORCH_CHECK(S.has_value() == z.has_value(), "S and z come together");
  if (!S) return;
  const auto dt = state_dtype(q);
  AGF_CHECK_DTYPE(*S, dt);
  AGF_CHECK_DTYPE(*z, dt);
  AGF_CHECK_CONTIGUOUS(*S);
  AGF_CHECK_CONTIGUOUS(*z);
  TORCH_CHECK(S->sizes() == at::IntArrayRef({n, q.size(2), q.size(3), Dv}), "S must be (N, H, D, Dv)");
  TORCH_CHECK(z->sizes() == at::IntArrayRef({n, q.size(2), q.size(3)}), "z must be (N, H, D)");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_attention_fwd_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& S0,
    const std::optional<at::Tensor>& z0, const std::optional<at::Tensor>& cu_seqlens, c10::string_view feature_map,
    double feature_eps, double scale, double eps, bool normalize) {
  check_inputs(q, k, v);
  const int64_t n_seq = sequences(q, cu_seqlens);
  const int64_t B = q.size(0), L = q.size(1), H = q.size(2), D = q.size(3), Dv = v.size(3);
  check_state(S0, z0, n_seq, q, Dv);
  const Params p = make_params(feature_map, feature_eps, scale, eps, normalize);
  const auto sdt = q.options().dtype(state_dtype(q));
  const int64_t rows = chunk_rows(B, L, n_seq, cu_seqlens.has_value());
  at::Tensor o = at::empty({B, L, H, Dv}, q.options());
  at::Tensor den = normalize ? at::empty({B, H, L}, sdt) : at::empty({0}, sdt);
  at::Tensor S = at::empty({n_seq, H, D, Dv}, sdt);
  at::Tensor z = at::empty({n_seq, H, D}, sdt);
  // Rows a short segment leaves unused are never read; zeroing them keeps the tensor deterministic.
  at::Tensor chunk_S = cu_seqlens ? at::zeros({rows, H, Dv, D}, sdt) : at::empty({rows, H, Dv, D}, sdt);
  at::Tensor chunk_z = cu_seqlens ? at::zeros({rows, H, D}, sdt) : at::empty({rows, H, D}, sdt);
  const int32_t* cu = cu_seqlens ? cu_seqlens->data_ptr<int32_t>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "linear_attention_fwd_cpu", [&] {
    forward_kernel<scalar_t>(q, k, v, S0 ? &*S0 : nullptr, z0 ? &*z0 : nullptr, cu, n_seq, p, o, den, S, z, chunk_S,
                             chunk_z);
  });
  return {o, den, S, z, chunk_S, chunk_z};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_attention_bwd_cpu(
    const at::Tensor& dout, const std::optional<at::Tensor>& dS, const std::optional<at::Tensor>& dz,
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& o, const at::Tensor& den,
    const at::Tensor& chunk_S, const at::Tensor& chunk_z, const std::optional<at::Tensor>& cu_seqlens,
    c10::string_view feature_map, double feature_eps, double scale, double eps, bool normalize) {
  check_inputs(q, k, v);
  const int64_t n_seq = sequences(q, cu_seqlens);
  const int64_t B = q.size(0), L = q.size(1), H = q.size(2), D = q.size(3), Dv = v.size(3);
  const auto sdt = state_dtype(q);
  for (const at::Tensor* t : {&dout, &o}) {
    TORCH_CHECK(t->sizes() == v.sizes(), "do and o must have v's shape");
    AGF_CHECK_DTYPE(*t, q.scalar_type());
    TORCH_CHECK(t->numel() == 0 || t->size(3) <= 1 || t->stride(3) == 1,
                "do and o must have a contiguous last dimension");
  }
  if (normalize) {
    AGF_CHECK_DTYPE(den, sdt);
    AGF_CHECK_CONTIGUOUS(den);
    TORCH_CHECK(den.sizes() == at::IntArrayRef({B, H, L}), "den must be (B, H, L)");
  }
  const int64_t rows = chunk_rows(B, L, n_seq, cu_seqlens.has_value());
  AGF_CHECK_DTYPE(chunk_S, sdt);
  AGF_CHECK_DTYPE(chunk_z, sdt);
  AGF_CHECK_CONTIGUOUS(chunk_S);
  AGF_CHECK_CONTIGUOUS(chunk_z);
  TORCH_CHECK(chunk_S.sizes() == at::IntArrayRef({rows, H, Dv, D}), "chunk_S must be (rows, H, Dv, D)");
  TORCH_CHECK(chunk_z.sizes() == at::IntArrayRef({rows, H, D}), "chunk_z must be (rows, H, D)");
  if (dS) {
    AGF_CHECK_DTYPE(*dS, sdt);
    AGF_CHECK_CONTIGUOUS(*dS);
    TORCH_CHECK(dS->sizes() == at::IntArrayRef({n_seq, H, D, Dv}), "dS must be (N, H, D, Dv)");
  }
  if (dz) {
    AGF_CHECK_DTYPE(*dz, sdt);
    AGF_CHECK_CONTIGUOUS(*dz);
    TORCH_CHECK(dz->sizes() == at::IntArrayRef({n_seq, H, D}), "dz must be (N, H, D)");
  }
  const Params p = make_params(feature_map, feature_eps, scale, eps, normalize);
  at::Tensor dq = at::empty(q.sizes(), q.options());
  at::Tensor dk = at::empty(k.sizes(), k.options());
  at::Tensor dv = at::empty(v.sizes(), v.options());
  at::Tensor dS0 = at::empty({n_seq, H, D, Dv}, q.options().dtype(sdt));
  at::Tensor dz0 = at::empty({n_seq, H, D}, q.options().dtype(sdt));
  const int32_t* cu = cu_seqlens ? cu_seqlens->data_ptr<int32_t>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "linear_attention_bwd_cpu", [&] {
    backward_kernel<scalar_t>(dout, dS ? &*dS : nullptr, dz ? &*dz : nullptr, q, k, v, o, den, chunk_S, chunk_z, cu,
                              n_seq, p, dq, dk, dv, dS0, dz0);
  });
  return {dq, dk, dv, dS0, dz0};
}

// One token for B·H independent (S, z): S += k̂vᵀ, z += k̂, o = q̂ᵀS / (q̂ᵀz + eps), S read once.
template <typename scalar_t>
void step_kernel(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& S, at::Tensor& z,
                 const Params& p, at::Tensor& o) {
  using T = at::opmath_type<scalar_t>;
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2), Dv = v.size(2);
  const scalar_t *qp = q.data_ptr<scalar_t>(), *kp = k.data_ptr<scalar_t>(), *vp = v.data_ptr<scalar_t>();
  const int64_t qsb = q.stride(0), qsh = q.stride(1), ksb = k.stride(0), ksh = k.stride(1);
  const int64_t vsb = v.stride(0), vsh = v.stride(1);
  T* Sp = S.data_ptr<T>();
  T* zp = z.data_ptr<T>();
  scalar_t* op = o.data_ptr<scalar_t>();
  const T feps = static_cast<T>(p.feature_eps), scale = static_cast<T>(p.scale), eps = static_cast<T>(p.eps);
  // Threads pay off only once a call moves a few hundred KiB of state.
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(1, D * Dv));
  at::parallel_for(0, B * H, grain, [&](int64_t begin, int64_t end) {
    const int64_t Dp = round_up(D, Vec<T>::W);
    std::vector<T> qh(Dp), kh(Dp), vv(Dv), num(Dv);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / H, h = i % H;
      to_acc(qp + b * qsb + h * qsh, qh.data(), D);
      apply_feature(qh.data(), Dp, D, p.elu, feps, scale);
      to_acc(kp + b * ksb + h * ksh, kh.data(), D);
      apply_feature(kh.data(), Dp, D, p.elu, feps, T(1));
      const scalar_t* vr = vp + b * vsb + h * vsh;
      for (int64_t j = 0; j < Dv; ++j) vv[j] = static_cast<T>(vr[j]);
      T* Si = Sp + i * D * Dv;
      T* zi = zp + i * D;
      // S and z are the caller's (unpadded): whole vectors, then a scalar tail. For S, columns go in
      // blocks of 4 vectors whose num accumulators stay in registers over d; S is read and written once.
      constexpr int64_t W = Vec<T>::W;
      vec_t<T> zacc = {};
      int64_t d0 = 0;
      for (; d0 + W <= D; d0 += W) {
        const vec_t<T> zn = vload(zi + d0) + vload(&kh[d0]);
        vstore(zi + d0, zn);
        zacc += vload(&qh[d0]) * zn;
      }
      T den = eps + agf_simd::hsum<T>(zacc);
      for (; d0 < D; ++d0) {
        zi[d0] += kh[d0];
        den += qh[d0] * zi[d0];
      }
      int64_t j = 0;
      for (; j + 4 * W <= Dv; j += 4 * W) {
        vec_t<T> acc[4] = {}, vj[4];
        for (int u = 0; u < 4; ++u) vj[u] = vload(&vv[j + u * W]);
        for (int64_t d = 0; d < D; ++d) {
          T* row = Si + d * Dv + j;
          for (int u = 0; u < 4; ++u) {
            const vec_t<T> r = vload(row + u * W) + kh[d] * vj[u];
            vstore(row + u * W, r);
            acc[u] += qh[d] * r;
          }
        }
        for (int u = 0; u < 4; ++u) vstore(&num[j + u * W], acc[u]);
      }
      for (; j + W <= Dv; j += W) {
        vec_t<T> acc = {};
        const vec_t<T> vj = vload(&vv[j]);
        for (int64_t d = 0; d < D; ++d) {
          const vec_t<T> r = vload(Si + d * Dv + j) + kh[d] * vj;
          vstore(Si + d * Dv + j, r);
          acc += qh[d] * r;
        }
        vstore(&num[j], acc);
      }
      for (; j < Dv; ++j) {
        T acc = 0;
        for (int64_t d = 0; d < D; ++d) {
          T& r = Si[d * Dv + j];
          r += kh[d] * vv[j];
          acc += qh[d] * r;
        }
        num[j] = acc;
      }
      const T inv = p.normalize ? T(1) / den : T(1);
      scalar_t* out = op + i * Dv;
      for (int64_t j = 0; j < Dv; ++j) out[j] = static_cast<scalar_t>(num[j] * inv);
    }
  });
}

at::Tensor linear_attention_step_cpu(const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_, at::Tensor& S,
                                     at::Tensor& z, c10::string_view feature_map, double feature_eps, double scale,
                                     double eps, bool normalize) {
  AGF_CHECK_DIM(q_, 3);
  AGF_CHECK_DIM(k_, 3);
  AGF_CHECK_DIM(v_, 3);
  auto last_contiguous = [](const at::Tensor& t) { return t.size(2) <= 1 || t.stride(2) == 1 ? t : t.contiguous(); };
  const at::Tensor q = last_contiguous(q_), k = last_contiguous(k_), v = last_contiguous(v_);
  TORCH_CHECK(k.sizes() == q.sizes(), "k must have q's shape");
  TORCH_CHECK(v.size(0) == q.size(0) && v.size(1) == q.size(1), "v must have q's B, H");
  for (const at::Tensor* t : {&q, &k, &v}) {
    AGF_CHECK_DEVICE(*t, at::kCPU);
    AGF_CHECK_DTYPE(*t, q.scalar_type());
  }
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2), Dv = v.size(2);
  const auto sdt = state_dtype(q);
  AGF_CHECK_DTYPE(S, sdt);
  AGF_CHECK_DTYPE(z, sdt);
  AGF_CHECK_CONTIGUOUS(S);
  AGF_CHECK_CONTIGUOUS(z);
  TORCH_CHECK(S.sizes() == at::IntArrayRef({B, H, D, Dv}), "S must be (B, H, D, Dv)");
  TORCH_CHECK(z.sizes() == at::IntArrayRef({B, H, D}), "z must be (B, H, D)");
  const Params p = make_params(feature_map, feature_eps, scale, eps, normalize);
  at::Tensor o = at::empty({B, H, Dv}, q.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "linear_attention_step_cpu",
                                  [&] { step_kernel<scalar_t>(q, k, v, S, z, p, o); });
  return o;
}

}  // namespace agf_linear_attention

TORCH_LIBRARY_FRAGMENT(agiformer_kernels, m) {
  // chunk_S [rows, H, Dv, D], chunk_z [rows, H, D]: the state before each chunk (Sᵀ), kept for the backward.
  m.def(
      "linear_attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? S0, Tensor? z0, Tensor? cu_seqlens, "
      "str feature_map, float feature_eps, float scale, float eps, bool normalize) "
      "-> (Tensor o, Tensor den, Tensor S, Tensor z, Tensor chunk_S, Tensor chunk_z)");
  m.def(
      "linear_attention_bwd(Tensor do, Tensor? dS, Tensor? dz, Tensor q, Tensor k, Tensor v, Tensor o, Tensor den, "
      "Tensor chunk_S, Tensor chunk_z, Tensor? cu_seqlens, str feature_map, float feature_eps, float scale, "
      "float eps, bool normalize) -> (Tensor dq, Tensor dk, Tensor dv, Tensor dS0, Tensor dz0)");
  m.def(
      "linear_attention_step(Tensor q, Tensor k, Tensor v, Tensor(a!) S, Tensor(b!) z, str feature_map, "
      "float feature_eps, float scale, float eps, bool normalize) -> Tensor");
}

TORCH_LIBRARY_IMPL(agiformer_kernels, CPU, m) {
  m.impl("linear_attention_fwd", &agf_linear_attention::linear_attention_fwd_cpu);
  m.impl("linear_attention_bwd", &agf_linear_attention::linear_attention_bwd_cpu);
  m.impl("linear_attention_step", &agf_linear_attention::linear_attention_step_cpu);
}
