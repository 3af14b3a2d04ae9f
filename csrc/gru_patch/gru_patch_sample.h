// Samplers of the GRU patch decoder (gru_patch_sample): the counter-based RNG and byte choice, and the
// three ways to run a patch: tiles of many patches (sample_tiled), few patches split across threads by
// hidden unit and vocabulary (sample_split), and, on AVX-512, patches in vector lanes (sample_lanes).
// Part of gru_patch.cpp's translation unit (see gru_patch_math.h).
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "gru_patch_math.h"
#include "gru_patch_train.h"

namespace agf_gru_patch {

// ------------------------------------------------------------------------------------------------
// Counter-based RNG (same hash as reference.counter_uniform) and the byte choice.

inline uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  x ^= x >> 16;
  return x;
}

inline uint32_t counter_bits(uint32_t s0, uint32_t s1, int64_t row, int64_t step) {
  uint32_t x = mix32(s0 ^ static_cast<uint32_t>(row));
  x = mix32(x ^ s1);
  return mix32(x ^ static_cast<uint32_t>(step));
}

struct SampleParams {
  double temperature;
  int64_t top_k;  // 0: all
  uint32_t s0, s1;
};

// reference.choose_bytes for one row of logits (bias included); e is kVocab scratch.
// Index of the maximum by torch.argmax's rules: the first on ties, and a NaN is the maximum (the first NaN).
template <typename T>
inline int64_t argmax_row(const T* l) {
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<T, float>) {
    __m512 mv = _mm512_loadu_ps(l);
    __mmask16 nan = _mm512_cmp_ps_mask(mv, mv, _CMP_UNORD_Q);
    for (int64_t k = 16; k < kVocab; k += 16) {
      const __m512 x = _mm512_loadu_ps(l + k);
      nan |= _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
      mv = _mm512_max_ps(mv, x);
    }
    if (!nan) {
      const __m512 mx = _mm512_set1_ps(_mm512_reduce_max_ps(mv));
      for (int64_t k = 0; k < kVocab; k += 16) {
        const __mmask16 hit = _mm512_cmp_ps_mask(_mm512_loadu_ps(l + k), mx, _CMP_EQ_OQ);
        if (hit) return k + __builtin_ctz(hit);
      }
    }
  }  // with a NaN, the scan below finds the first
#else
  if constexpr (std::is_same_v<T, float>) {
    VF mv = vload(l);
    auto nan = mv != mv;
    for (int64_t k = kW; k < kVocab; k += kW) {
      const VF x = vload(l + k);
      nan |= x != x;
      mv = x > mv ? x : mv;
    }
    bool any_nan = false;
    float mx = mv[0];
    for (int i = 0; i < kW; ++i) any_nan |= nan[i] != 0, mx = std::max(mx, mv[i]);
    if (!any_nan)
      for (int64_t k = 0; k < kVocab; ++k)
        if (l[k] == mx) return k;
  }  // with a NaN, the scan below finds the first
#endif
  int64_t best = 0;
  for (int64_t k = 1; k < kVocab && !std::isnan(l[best]); ++k)
    if (std::isnan(l[k]) || l[k] > l[best]) best = k;
  return best;
}

template <typename T>
inline int64_t choose_byte(const T* l, const SampleParams& sp, int64_t row, int64_t step, T* e) {
  const int64_t best = argmax_row(l);
  if (sp.temperature == 0 || std::isnan(l[best])) return best;  // a NaN's running sums pass no target
  T thr = -std::numeric_limits<T>::infinity();
  if (sp.top_k > 0 && sp.top_k < kVocab) {
    std::copy(l, l + kVocab, e);
    std::nth_element(e, e + sp.top_k - 1, e + kVocab, std::greater<T>());
    thr = e[sp.top_k - 1];
  }
  exp_affine(l, -l[best], T(1) / static_cast<T>(sp.temperature), e, kVocab);
  // running sums in double and rounded per element, as torch.cumsum on CPU does
  double s = 0;
  for (int64_t k = 0; k < kVocab; ++k) {
    s += l[k] >= thr ? static_cast<double>(e[k]) : 0.0;
    e[k] = static_cast<T>(s);
  }
  const T u = static_cast<T>(counter_bits(sp.s0, sp.s1, row, step) >> 8) * static_cast<T>(1.0 / (1 << 24));
  const T target = u * e[kVocab - 1];
  for (int64_t k = 0; k < kVocab; ++k)
    if (e[k] > target) return k;
  return best;
}

// ------------------------------------------------------------------------------------------------
// The samplers

// Each sampler returns false where it stopped at step 1 (see run_checked).

// Many patches: independent tiles, each running its P steps with one BLAS call per product.
template <typename T>
bool sample_tiled(const Weights<T>& W, const T* ctx, const T* hw, const T* hb, int64_t M, int64_t P,
                  const int64_t* prefix, int64_t forced, int64_t sos, const SampleParams& sp, int64_t* out) {
  const int64_t h = W.h, G = 3 * h;
  return all_tiles(M, [&](int64_t r0, int64_t rows) {
    Scratch<T> gc(rows * G), gh(rows * G), hs(rows * h), logits(rows * kVocab), e(kVocab);
    Scratch<T> gbuf(W.table ? 0 : rows * G), ebuf(W.table ? 0 : rows * h);
    std::vector<const T*> ge(rows);
    std::vector<int64_t> cur(rows, sos);
    const Tensor h_v = view(hs.data(), rows, h, h);
    gemm(view(gc.data(), rows, G, G), view(ctx + r0 * h, rows, h, h), W.w_c().t(), false);
    for (int64_t t = 0; t < P; ++t) {
      byte_projection(W, rows, cur.data(), 1, ge.data(), gbuf.data(), ebuf.data());
      if (t > 0) gemm(view(gh.data(), rows, G, G), h_v, W.hh().t(), false);
      if (!step1_product_ok(W, t, gh.data(), G)) return false;
      for (int64_t i = 0; i < rows; ++i)
        gate_row(h, ge[i], gc.data() + i * G, t > 0 ? gh.data() + i * G : nullptr, W.b_ih, W.b_hh,
                 t > 0 ? hs.data() + i * h : nullptr, hs.data() + i * h, static_cast<T*>(nullptr));
      if (t < forced) {
        for (int64_t i = 0; i < rows; ++i) cur[i] = prefix[(r0 + i) * forced + t];
      } else {
        gemm(view(logits.data(), rows, kVocab, kVocab), h_v, view(hw, kVocab, h, h).t(), false);
        for (int64_t i = 0; i < rows; ++i) {
          T* l = logits.data() + i * kVocab;
          for (int64_t k = 0; k < kVocab; ++k) l[k] += hb[k];
          cur[i] = choose_byte(l, sp, r0 + i, t, e.data());
        }
      }
      for (int64_t i = 0; i < rows; ++i) out[(r0 + i) * P + t] = cur[i];
    }
    return true;
  });
}

// A barrier of the enclosing parallel region (an orphaned directive binds to it), or nothing without OpenMP.
inline void omp_barrier() {
#ifdef _OPENMP
#pragma omp barrier
#endif
}

// The share of thread tid of nt in the few-patch samplers: hidden units [u0, u1), in multiples of 16 (one
// vector), and vocabulary rows [v0, v1).
struct Slice {
  int tid, nt;
  int64_t u0, u1, v0, v1;
  explicit Slice(int64_t h) {
#ifdef _OPENMP
    tid = omp_get_thread_num(), nt = omp_get_num_threads();
#else
    tid = 0, nt = 1;
#endif
    const int64_t chunks = (h + 15) / 16;
    u0 = std::min(h, chunks * tid / nt * 16), u1 = std::min(h, chunks * (tid + 1) / nt * 16);
    v0 = kVocab * tid / nt, v1 = kVocab * (tid + 1) / nt;
  }
};

// Few patches: one parallel region for the whole patch; thread k owns a slice of the hidden units (its
// rows of W_ih, W_hh) and of the vocabulary (its rows of the head), so each core streams only its
// share of the weights. Two barriers per step: after the hidden state, after the logits; every thread
// then picks the same bytes itself (the choice is deterministic), so no third one.
template <typename T>
bool sample_split(const Weights<T>& W, const T* ctx, const T* hw, const T* hb, int64_t M, int64_t P,
                  const int64_t* prefix, int64_t forced, int64_t sos, const SampleParams& sp, int64_t* out,
                  int threads) {
  const int64_t h = W.h;
  Scratch<T> hbuf(2 * M * h), logits(2 * M * kVocab);
  std::atomic<bool> stopped{false};  // set before the first barrier of step 1, read after it by every thread
#ifdef _OPENMP
#pragma omp parallel num_threads(threads)
#endif
  {
    const Slice sl(h);
    const int64_t u0 = sl.u0, v0 = sl.v0, v1 = sl.v1;
    const int64_t nu = sl.u1 - u0, L = 3 * nu;  // local gate rows [r | z | n] of the own units
    Scratch<T> gc(M * L), ge(M * L), gh(M * L), bih(L), bhh(L), e(kVocab);
    std::vector<const T*> x(M);
    std::vector<int64_t> cur(M, sos);
    for (int64_t q = 0; q < 3; ++q)
      for (int64_t j = 0; j < nu; ++j) {
        bih[q * nu + j] = W.b_ih[q * h + u0 + j];
        bhh[q * nu + j] = W.b_hh[q * h + u0 + j];
      }
    // own rows of a [3h, ·] weight times the rows x: y[i][q·nu + j] = W[q·h + u0 + j] · x_i
    auto project = [&](const T* w, int64_t ldw, T* y) {
      for (int64_t q = 0; q < 3 && nu > 0; ++q) dot_rows(M, x.data(), w + (q * h + u0) * ldw, ldw, nu, h, y + q * nu, L);
    };
    for (int64_t i = 0; i < M; ++i) x[i] = ctx + i * h;
    project(W.w_ih + h, 2 * h, gc.data());
    for (int64_t t = 0; t < P; ++t) {
      const T* hcur = hbuf.data() + (t & 1) * M * h;
      T* hnext = hbuf.data() + ((t + 1) & 1) * M * h;
      if (W.table) {  // own slices of the table rows
        for (int64_t i = 0; i < M; ++i)
          for (int64_t q = 0; q < 3; ++q)
            std::memcpy(ge.data() + i * L + q * nu, W.table + cur[i] * 3 * h + q * h + u0, nu * sizeof(T));
      } else {
        for (int64_t i = 0; i < M; ++i) x[i] = W.emb + cur[i] * h;
        project(W.w_ih, 2 * h, ge.data());
      }
      if (t > 0) {
        for (int64_t i = 0; i < M; ++i) x[i] = hcur + i * h;
        project(W.w_hh, h, gh.data());
        if (M > 0 && !step1_product_ok(W, t, gh.data(), L)) stopped = true;  // patch 0's rows
      }
      for (int64_t i = 0; i < M && nu > 0; ++i)
        gate_row(nu, ge.data() + i * L, gc.data() + i * L, t > 0 ? gh.data() + i * L : nullptr, bih.data(),
                 bhh.data(), t > 0 ? hcur + i * h + u0 : nullptr, hnext + i * h + u0, static_cast<T*>(nullptr));
      omp_barrier();
      if (t == 1 && stopped) break;
      if (t < forced) {
        for (int64_t i = 0; i < M; ++i) cur[i] = prefix[i * forced + t];
      } else {
        T* lg = logits.data() + (t & 1) * M * kVocab;
        for (int64_t i = 0; i < M; ++i) x[i] = hnext + i * h;
        dot_rows(M, x.data(), hw + v0 * h, h, v1 - v0, h, lg + v0, kVocab);
        for (int64_t i = 0; i < M; ++i)
          for (int64_t k = v0; k < v1; ++k) lg[i * kVocab + k] += hb[k];
        omp_barrier();
        for (int64_t i = 0; i < M; ++i) cur[i] = choose_byte(lg + i * kVocab, sp, i, t, e.data());
      }
      if (sl.tid == 0)
        for (int64_t i = 0; i < M; ++i) out[i * P + t] = cur[i];
    }
  }
  return !stopped;
}

#if defined(__AVX512F__)
// Some patches (fp32, kLanesMin <= M <= kLanesMax): the split of sample_split (units and vocabulary across
// threads), with the patches in vector lanes, groups of 16: the hidden state, gates and logits are kept
// transposed ([unit][patch]) and every product is lanes_product, which runs near the FMA peak where
// dot_rows' few-row tiles do not (nor, below ~200 patches, the tiles' GEMMs). The byte part is the table
// rows transposed into the lanes (or, without a table, a product with the gathered embeddings). Greedy
// picks the bytes of all lanes at once; sampling splits the rows across threads (one more barrier) and
// runs choose_byte on each row.
bool sample_lanes(const Weights<float>& W, const float* ctx, const float* hw, const float* hb, int64_t M, int64_t P,
                  const int64_t* prefix, int64_t forced, int64_t sos, const SampleParams& sp, int64_t* out,
                  int threads) {
  const int64_t h = W.h, G = (M + 15) / 16;  // lane groups
  const bool greedy = sp.temperature == 0;
  std::atomic<bool> stopped{false};  // as in sample_split
  Scratch<float> ctxT(G * h * 16), hT(2 * G * h * 16), logT(G * kVocab * 16);
  Scratch<int64_t> picked(M);  // sampling: the rows' bytes, each row picked by one thread
  std::fill(ctxT.data(), ctxT.data() + G * h * 16, 0.f);
  std::fill(hT.data(), hT.data() + 2 * G * h * 16, 0.f);
  // the contexts into the lanes: 16 × 16 blocks transposed in registers (a scalar loop would store one float at
  // a time, 16 apart), then the columns past the last full block
  for (int64_t g = 0; g < G; ++g) {
    const int64_t lanes = std::min<int64_t>(16, M - g * 16), h16 = h - h % 16;
    for (int64_t k = 0; k < h16; k += 16) {
      const float* rows[16];
      for (int64_t i = 0; i < lanes; ++i) rows[i] = ctx + (g * 16 + i) * h + k;
      transpose16(rows, lanes, ctxT.data() + (g * h + k) * 16);
    }
    for (int64_t k = h16; k < h; ++k)
      for (int64_t i = 0; i < lanes; ++i) ctxT[(g * h + k) * 16 + i] = ctx[(g * 16 + i) * h + k];
  }
#ifdef _OPENMP
#pragma omp parallel num_threads(threads)
#endif
  {
    const Slice sl(h);
    const int64_t u0 = sl.u0, v0 = sl.v0, v1 = sl.v1;
    const int64_t nu = sl.u1 - u0, L = 3 * nu;
    Scratch<float> gc(G * L * 16), gh(L * 16), ge(L * 16), xT(W.table ? 0 : h * 16), e(kVocab), row(kVocab);
    std::vector<int64_t> cur(G * 16, sos);  // every thread's own copy of the bytes fed next
    // own rows of a [3h, ·] weight (w points at its first column used) times transposed inputs x [h][16]:
    // y[q·nu + j][lanes]
    auto project = [&](const float* w, int64_t ldw, const float* x, float* y) {
      for (int64_t q = 0; q < 3 && nu > 0; ++q) lanes_product(w + (q * h + u0) * ldw, ldw, nu, h, x, y + q * nu * 16);
    };
    for (int64_t g = 0; g < G; ++g) project(W.w_ih + h, 2 * h, ctxT.data() + g * h * 16, gc.data() + g * L * 16);
    for (int64_t t = 0; t < P; ++t) {
      float* hcur = hT.data() + (t & 1) * G * h * 16;
      float* hnext = hT.data() + ((t + 1) & 1) * G * h * 16;
      for (int64_t g = 0; g < G; ++g) {
        const int64_t lanes = std::min<int64_t>(16, M - g * 16);
        const __mmask16 live = tail16(lanes);
        const int64_t* cg = cur.data() + g * 16;
        if (W.table) {  // the lanes' table rows, transposed 16 units at a time (a gather per unit for the rest)
          alignas(64) int32_t base[16] = {};
          for (int64_t i = 0; i < lanes; ++i) base[i] = static_cast<int32_t>(cg[i] * 3 * h);
          const __m512i idx = _mm512_load_si512(base);
          for (int64_t q = 0; q < 3; ++q) {
            int64_t j = 0;
            for (; j + 16 <= nu; j += 16) {
              const float* rows[16];
              for (int64_t i = 0; i < lanes; ++i) rows[i] = W.table + base[i] + q * h + u0 + j;
              transpose16(rows, lanes, ge.data() + (q * nu + j) * 16);
            }
            for (; j < nu; ++j)
              _mm512_storeu_ps(ge.data() + (q * nu + j) * 16,
                               _mm512_mask_i32gather_ps(_mm512_setzero_ps(), live, idx, W.table + q * h + u0 + j, 4));
          }
        } else {
          std::fill(xT.data(), xT.data() + h * 16, 0.f);
          for (int64_t i = 0; i < lanes; ++i)
            for (int64_t k = 0; k < h; ++k) xT[k * 16 + i] = W.emb[cg[i] * h + k];
          project(W.w_ih, 2 * h, xT.data(), ge.data());
        }
        const float* hc = hcur + g * h * 16;
        if (t > 0) project(W.w_hh, h, hc, gh.data());
        if (g == 0 && !step1_product_ok(W, t, gh.data(), L * 16)) stopped = true;
        const float* gcg = gc.data() + g * L * 16;
        for (int64_t j = 0; j < nu; ++j) {  // gate_row, unit j of all lanes
          const int64_t u = u0 + j;
          auto at = [&](const float* b, int64_t q) { return _mm512_loadu_ps(b + (q * nu + j) * 16); };
          __m512 hr = _mm512_set1_ps(W.b_hh[u]), hz = _mm512_set1_ps(W.b_hh[h + u]),
                 hn = _mm512_set1_ps(W.b_hh[2 * h + u]);
          if (t > 0) {
            hr = _mm512_add_ps(hr, at(gh.data(), 0));
            hz = _mm512_add_ps(hz, at(gh.data(), 1));
            hn = _mm512_add_ps(hn, at(gh.data(), 2));
          }
          const __m512 ar = _mm512_add_ps(_mm512_add_ps(at(ge.data(), 0), at(gcg, 0)),
                                          _mm512_add_ps(_mm512_set1_ps(W.b_ih[u]), hr));
          const __m512 az = _mm512_add_ps(_mm512_add_ps(at(ge.data(), 1), at(gcg, 1)),
                                          _mm512_add_ps(_mm512_set1_ps(W.b_ih[h + u]), hz));
          const __m512 xn =
              _mm512_add_ps(_mm512_add_ps(at(ge.data(), 2), at(gcg, 2)), _mm512_set1_ps(W.b_ih[2 * h + u]));
          const Gates16 cell(ar, az, xn, hn, t > 0 ? _mm512_loadu_ps(hc + u * 16) : _mm512_setzero_ps());
          _mm512_storeu_ps(hnext + (g * h + u) * 16, cell.h);
        }
      }
      omp_barrier();
      if (t == 1 && stopped) break;
      if (t < forced) {
        for (int64_t i = 0; i < M; ++i) cur[i] = prefix[i * forced + t];
      } else {
        for (int64_t g = 0; g < G; ++g) {
          float* lg = logT.data() + g * kVocab * 16;
          lanes_product(hw + v0 * h, h, v1 - v0, h, hnext + g * h * 16, lg + v0 * 16);
          for (int64_t v = v0; v < v1; ++v)
            _mm512_storeu_ps(lg + v * 16, _mm512_add_ps(_mm512_loadu_ps(lg + v * 16), _mm512_set1_ps(hb[v])));
        }
        omp_barrier();
        if (greedy) {  // argmax_row of every lane: the first index of the maximum
          for (int64_t g = 0; g < G; ++g) {
            // four independent chains (v mod 4), each from logit 0 as argmax_row's scan (a NaN is the maximum:
            // the first one stays), merged with ties to the lower index
            const float* lg = logT.data() + g * kVocab * 16;
            auto nan = [](__m512 x) { return _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q); };
            __m512 best[4];
            __m512i arg[4];
            for (int c = 0; c < 4; ++c) best[c] = _mm512_loadu_ps(lg), arg[c] = _mm512_setzero_si512();
            for (int64_t v = 0; v < kVocab; v += 4)
              for (int c = 0; c < 4; ++c) {
                const __m512 x = _mm512_loadu_ps(lg + (v + c) * 16);
                const __mmask16 gt = _mm512_cmp_ps_mask(x, best[c], _CMP_GT_OQ) | (nan(x) & ~nan(best[c]));
                best[c] = _mm512_mask_blend_ps(gt, best[c], x);
                arg[c] = _mm512_mask_blend_epi32(gt, arg[c], _mm512_set1_epi32(static_cast<int>(v + c)));
              }
            for (int c = 1; c < 4; ++c) {
              const __mmask16 lower = _mm512_cmplt_epi32_mask(arg[c], arg[0]);
              const __mmask16 take =
                  _mm512_cmp_ps_mask(best[c], best[0], _CMP_GT_OQ) |
                  (_mm512_cmp_ps_mask(best[c], best[0], _CMP_EQ_OQ) & lower) | (nan(best[c]) & (~nan(best[0]) | lower));
              best[0] = _mm512_mask_blend_ps(take, best[0], best[c]);
              arg[0] = _mm512_mask_blend_epi32(take, arg[0], arg[c]);
            }
            alignas(64) int32_t a[16];
            _mm512_store_si512(a, arg[0]);
            for (int64_t i = 0; i < std::min<int64_t>(16, M - g * 16); ++i) cur[g * 16 + i] = a[i];
          }
        } else {
          for (int64_t i = sl.tid; i < M; i += sl.nt) {
            const float* lg = logT.data() + (i / 16) * kVocab * 16 + i % 16;
            for (int64_t v = 0; v < kVocab; ++v) row[v] = lg[v * 16];
            picked[i] = choose_byte(row.data(), sp, i, t, e.data());
          }
          omp_barrier();  // picked is next written after the next step's first barrier, once all have read it
          std::copy(picked.data(), picked.data() + M, cur.data());
        }
      }
      if (sl.tid == 0)
        for (int64_t i = 0; i < M; ++i) out[i * P + t] = cur[i];
    }
  }
  return !stopped;
}
#endif

}  // namespace agf_gru_patch
