// Vector math of the GRU patch decoder's CPU kernels: the gates, exp and log-sum-exp over 256 logits,
// and the register-tiled products of the few-patch regime (dot tiles, patches in lanes). Part of
// gru_patch.cpp's translation unit (included by it, once), as are gru_patch_train.h and gru_patch_sample.h.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <type_traits>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "cpu_simd.h"

namespace agf_gru_patch {

using at::Tensor;
constexpr int64_t kVocab = 256;

// ------------------------------------------------------------------------------------------------
// Small dense helpers

// Uninitialised scratch: std::vector would zero whole tiles first, only to overwrite them.
template <typename T>
struct Scratch {
  std::unique_ptr<T[]> p;
  explicit Scratch(int64_t n) : p(n > 0 ? new T[n] : nullptr) {}
  T* data() const { return p.get(); }
  T& operator[](int64_t i) const { return p[i]; }
};

template <typename T>
Tensor view(const T* p, int64_t rows, int64_t cols, int64_t ld) {
  return at::from_blob(const_cast<T*>(p), {rows, cols}, {ld, 1},
                       at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value));
}

// C = A·B, or C += A·B: one BLAS call on views (A, B may be transposed views).
inline void gemm(Tensor C, const Tensor& A, const Tensor& B, bool accumulate) {
  if (C.numel() == 0) return;
  if (accumulate) {
    C.addmm_(A, B);
  } else if (A.size(1) == 0) {
    C.zero_();
  } else {
    at::mm_out(C, A, B);
  }
}

#if defined(__AVX512F__)
// exp in fp32: 2^n·p(r), r = x - n·ln2, degree-7 Taylor on |r| <= ln2/2 (< 1 ulp), scalef for 2^n.
// Clamping with the constant first keeps NaN (min/max return their second operand when unordered).
inline __m512 exp16(__m512 x) {
  x = _mm512_max_ps(_mm512_set1_ps(-150.f), _mm512_min_ps(_mm512_set1_ps(150.f), x));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.f / 5040);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 720));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}
inline __mmask16 tail16(int64_t n) { return n >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1); }

// The GRU cell on 16 values (units, or patches in lanes): r = σ(ar), z = σ(az), n = tanh(xn + r·hn),
// h = (1 - z)·n + z·hp, from the full pre-activations ar, az, n's input part xn and its hidden part hn.
struct Gates16 {
  __m512 r, z, n, h;
  Gates16(__m512 ar, __m512 az, __m512 xn, __m512 hn, __m512 hp) {
    const __m512 one = _mm512_set1_ps(1.f), two = _mm512_set1_ps(2.f);
    r = _mm512_div_ps(one, _mm512_add_ps(one, exp16(_mm512_sub_ps(_mm512_setzero_ps(), ar))));
    z = _mm512_div_ps(one, _mm512_add_ps(one, exp16(_mm512_sub_ps(_mm512_setzero_ps(), az))));
    // tanh(a) = 1 - 2 / (1 + e^{2a}): saturates to ±1 without overflow trouble
    const __m512 an = _mm512_fmadd_ps(r, hn, xn);
    n = _mm512_sub_ps(one, _mm512_div_ps(two, _mm512_add_ps(one, exp16(_mm512_mul_ps(two, an)))));
    h = _mm512_fmadd_ps(z, _mm512_sub_ps(hp, n), n);
  }
};
#else
// Every other ISA: the fp32 loops run on agf_simd vectors of the target's width (8 floats on AVX2, 4 on
// NEON and SSE), their tails on the scalar loops.
using VF = agf_simd::vec_t<float>;
constexpr int64_t kW = agf_simd::Vec<float>::W;
using agf_simd::vload;
using agf_simd::vstore;

// The GRU cell on one vector of units, as Gates16.
struct GatesV {
  VF r, z, n, h;
  GatesV(VF ar, VF az, VF xn, VF hn, VF hp) {
    r = 1.f / (1.f + agf_simd::vexp(-ar));
    z = 1.f / (1.f + agf_simd::vexp(-az));
    n = 1.f - 2.f / (1.f + agf_simd::vexp(2.f * (xn + r * hn)));  // tanh, saturating without overflow
    h = n + z * (hp - n);
  }
};
#endif

template <typename T>
inline T sigmoid(T x) {
  return T(1) / (T(1) + std::exp(-x));
}

// y[j] = exp((x[j] + shift) * scale) for j < n.
template <typename T>
inline void exp_affine(const T* x, T shift, T scale, T* y, int64_t n) {
  int64_t j = 0;
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<T, float>) {
    const __m512 s = _mm512_set1_ps(shift), c = _mm512_set1_ps(scale);
    for (; j < n; j += 16) {
      const __mmask16 m = tail16(n - j);
      const __m512 v = _mm512_mul_ps(_mm512_add_ps(_mm512_maskz_loadu_ps(m, x + j), s), c);
      _mm512_mask_storeu_ps(y + j, m, exp16(v));
    }
  }
#else
  if constexpr (std::is_same_v<T, float>)
    for (; j + kW <= n; j += kW) vstore(y + j, agf_simd::vexp((vload(x + j) + shift) * scale));
#endif
  for (; j < n; ++j) y[j] = std::exp((x[j] + shift) * scale);
}

// One GRU step for one patch, PyTorch gate order (r, z, n):
//   a = ge + gc + b_ih (+ gh) + b_hh, r = σ(a_r), z = σ(a_z), hn = gh_n + b_hn,
//   n = tanh(ge_n + gc_n + b_in + r·hn), h' = (1 - z)·n + z·h.
// gh = nullptr and hprev = nullptr stand for h = 0 (the first step). save: [r | z | n | hn] or nullptr.
template <typename T>
inline void gate_row(int64_t h, const T* ge, const T* gc, const T* gh, const T* bih, const T* bhh, const T* hprev,
                     T* hnew, T* save) {
  int64_t j = 0;
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<T, float>) {
    for (; j < h; j += 16) {
      const __mmask16 m = tail16(h - j);
      auto ld = [m](const float* p) { return _mm512_maskz_loadu_ps(m, p); };
      __m512 hr = ld(bhh + j), hz = ld(bhh + h + j), hn = ld(bhh + 2 * h + j);
      if (gh) {
        hr = _mm512_add_ps(hr, ld(gh + j));
        hz = _mm512_add_ps(hz, ld(gh + h + j));
        hn = _mm512_add_ps(hn, ld(gh + 2 * h + j));
      }
      const __m512 ar = _mm512_add_ps(_mm512_add_ps(ld(ge + j), ld(gc + j)), _mm512_add_ps(ld(bih + j), hr));
      const __m512 az =
          _mm512_add_ps(_mm512_add_ps(ld(ge + h + j), ld(gc + h + j)), _mm512_add_ps(ld(bih + h + j), hz));
      const __m512 xn = _mm512_add_ps(_mm512_add_ps(ld(ge + 2 * h + j), ld(gc + 2 * h + j)), ld(bih + 2 * h + j));
      const Gates16 g(ar, az, xn, hn, hprev ? ld(hprev + j) : _mm512_setzero_ps());
      _mm512_mask_storeu_ps(hnew + j, m, g.h);
      if (save) {
        _mm512_mask_storeu_ps(save + j, m, g.r);
        _mm512_mask_storeu_ps(save + h + j, m, g.z);
        _mm512_mask_storeu_ps(save + 2 * h + j, m, g.n);
        _mm512_mask_storeu_ps(save + 3 * h + j, m, hn);
      }
    }
  }
#else
  if constexpr (std::is_same_v<T, float>) {
    for (; j + kW <= h; j += kW) {
      VF hr = vload(bhh + j), hz = vload(bhh + h + j), hn = vload(bhh + 2 * h + j);
      if (gh) {
        hr += vload(gh + j);
        hz += vload(gh + h + j);
        hn += vload(gh + 2 * h + j);
      }
      const VF ar = (vload(ge + j) + vload(gc + j)) + (vload(bih + j) + hr);
      const VF az = (vload(ge + h + j) + vload(gc + h + j)) + (vload(bih + h + j) + hz);
      const VF xn = (vload(ge + 2 * h + j) + vload(gc + 2 * h + j)) + vload(bih + 2 * h + j);
      const GatesV g(ar, az, xn, hn, hprev ? vload(hprev + j) : VF{});
      vstore(hnew + j, g.h);
      if (save) {
        vstore(save + j, g.r);
        vstore(save + h + j, g.z);
        vstore(save + 2 * h + j, g.n);
        vstore(save + 3 * h + j, hn);
      }
    }
  }
#endif
  for (; j < h; ++j) {
    const T hr = bhh[j] + (gh ? gh[j] : T(0));
    const T hz = bhh[h + j] + (gh ? gh[h + j] : T(0));
    const T hn = bhh[2 * h + j] + (gh ? gh[2 * h + j] : T(0));
    const T r = sigmoid(ge[j] + gc[j] + bih[j] + hr);
    const T z = sigmoid(ge[h + j] + gc[h + j] + bih[h + j] + hz);
    const T n = std::tanh(ge[2 * h + j] + gc[2 * h + j] + bih[2 * h + j] + r * hn);
    const T hp = hprev ? hprev[j] : T(0);
    hnew[j] = n + z * (hp - n);
    if (save) {
      save[j] = r;
      save[h + j] = z;
      save[2 * h + j] = n;
      save[3 * h + j] = hn;
    }
  }
}

// Backward of gate_row. In: dh = dL/dh'. Out: dgi = dL/d(W_ih x + b_ih), dgh = dL/d(W_hh h + b_hh), and
// dh ← dh·z, the direct part of dL/dh (the caller adds dgh·W_hh).
template <typename T>
inline void gate_row_bwd(int64_t h, T* dh, const T* g, const T* hprev, T* dgi, T* dgh) {
  const T* r = g;
  const T* z = g + h;
  const T* n = g + 2 * h;
  const T* hn = g + 3 * h;
  int64_t j = 0;
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<T, float>) {
    const __m512 one = _mm512_set1_ps(1.f);
    for (; j < h; j += 16) {
      const __mmask16 m = tail16(h - j);
      auto ld = [m](const float* p) { return _mm512_maskz_loadu_ps(m, p); };
      const __m512 d = ld(dh + j), rv = ld(r + j), zv = ld(z + j), nv = ld(n + j), hnv = ld(hn + j);
      const __m512 hp = hprev ? ld(hprev + j) : _mm512_setzero_ps();
      const __m512 dan = _mm512_mul_ps(_mm512_mul_ps(d, _mm512_sub_ps(one, zv)), _mm512_fnmadd_ps(nv, nv, one));
      const __m512 daz = _mm512_mul_ps(_mm512_mul_ps(d, _mm512_sub_ps(hp, nv)), _mm512_mul_ps(zv, _mm512_sub_ps(one, zv)));
      const __m512 dar = _mm512_mul_ps(_mm512_mul_ps(dan, hnv), _mm512_mul_ps(rv, _mm512_sub_ps(one, rv)));
      _mm512_mask_storeu_ps(dgi + j, m, dar);
      _mm512_mask_storeu_ps(dgi + h + j, m, daz);
      _mm512_mask_storeu_ps(dgi + 2 * h + j, m, dan);
      _mm512_mask_storeu_ps(dgh + j, m, dar);
      _mm512_mask_storeu_ps(dgh + h + j, m, daz);
      _mm512_mask_storeu_ps(dgh + 2 * h + j, m, _mm512_mul_ps(dan, rv));
      _mm512_mask_storeu_ps(dh + j, m, _mm512_mul_ps(d, zv));
    }
  }
#else
  if constexpr (std::is_same_v<T, float>) {
    for (; j + kW <= h; j += kW) {
      const VF d = vload(dh + j), rv = vload(r + j), zv = vload(z + j), nv = vload(n + j), hnv = vload(hn + j);
      const VF hp = hprev ? vload(hprev + j) : VF{};
      const VF dan = d * (1.f - zv) * (1.f - nv * nv);
      const VF daz = d * (hp - nv) * (zv * (1.f - zv));
      const VF dar = dan * hnv * (rv * (1.f - rv));
      vstore(dgi + j, dar);
      vstore(dgi + h + j, daz);
      vstore(dgi + 2 * h + j, dan);
      vstore(dgh + j, dar);
      vstore(dgh + h + j, daz);
      vstore(dgh + 2 * h + j, dan * rv);
      vstore(dh + j, d * zv);
    }
  }
#endif
  for (; j < h; ++j) {
    const T d = dh[j];
    const T hp = hprev ? hprev[j] : T(0);
    const T dan = d * (T(1) - z[j]) * (T(1) - n[j] * n[j]);
    const T daz = d * (hp - n[j]) * z[j] * (T(1) - z[j]);
    const T dar = dan * hn[j] * r[j] * (T(1) - r[j]);
    dgi[j] = dar;
    dgi[h + j] = daz;
    dgi[2 * h + j] = dan;
    dgh[j] = dar;
    dgh[h + j] = daz;
    dgh[2 * h + j] = dan * r[j];
    dh[j] = d * z[j];
  }
}

// logits row l (bias not yet added) → l + b; returns log Σ exp.
template <typename T>
inline T add_bias_lse(T* l, const T* b, T* scratch) {
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<T, float>) {
    static_assert(kVocab % 16 == 0);
    __m512 mv = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
    for (int64_t k = 0; k < kVocab; k += 16) {
      const __m512 v = _mm512_add_ps(_mm512_loadu_ps(l + k), _mm512_loadu_ps(b + k));
      _mm512_storeu_ps(l + k, v);
      mv = _mm512_max_ps(mv, v);
    }
    const float mx = _mm512_reduce_max_ps(mv);
    exp_affine(l, -mx, 1.f, scratch, kVocab);
    __m512 sv = _mm512_setzero_ps();
    for (int64_t k = 0; k < kVocab; k += 16) sv = _mm512_add_ps(sv, _mm512_loadu_ps(scratch + k));
    return mx + std::log(_mm512_reduce_add_ps(sv));
  }
#else
  if constexpr (std::is_same_v<T, float>) {
    static_assert(kVocab % kW == 0);
    VF mv = VF{} - std::numeric_limits<float>::infinity();
    for (int64_t k = 0; k < kVocab; k += kW) {
      const VF v = vload(l + k) + vload(b + k);
      vstore(l + k, v);
      mv = v > mv ? v : mv;  // a NaN logit is skipped here and makes the sum below NaN
    }
    float mx = mv[0];
    for (int i = 1; i < kW; ++i) mx = std::max(mx, mv[i]);
    exp_affine(l, -mx, 1.f, scratch, kVocab);
    VF sv = {};
    for (int64_t k = 0; k < kVocab; k += kW) sv += vload(scratch + k);
    return mx + std::log(agf_simd::hsum<float>(sv));
  }
#endif
  T mx = -std::numeric_limits<T>::infinity();
  for (int64_t k = 0; k < kVocab; ++k) {
    l[k] += b[k];
    mx = std::max(mx, l[k]);
  }
  exp_affine(l, -mx, T(1), scratch, kVocab);
  T s = 0;
  for (int64_t k = 0; k < kVocab; ++k) s += scratch[k];
  return mx + std::log(s);
}

// ------------------------------------------------------------------------------------------------
// y[i·ldy + j] = Σ_k x_i[k]·W[j·ldw + k] for i < m, j < n: the few-rows product of the generation
// regime, where BLAS call overhead would dominate. Register tile: kDotRows weight rows × kDotInputs input
// rows, one accumulator vector each, summed across lanes at the end.
#if defined(__AVX512F__)
constexpr int kDotRows = 4, kDotInputs = 4;  // 16 accumulators + 4 weight vectors + 1 input = 21 of 32 zmm
#else
// the GEMM tile's budget (cpu_simd.h): 12 accumulators + 3 weight vectors + 1 input = 16 of 16 ymm on AVX2
constexpr int kDotInputs = 4, kDotRows = agf_simd::tile_vecs(kDotInputs);
#endif

#if defined(__AVX512F__)
// The 16 horizontal sums of a[0..15] in one vector (lane q = Σ a[q]): pairwise unpacks within 128-bit lanes,
// then across them; a quarter of the shuffles of 16 separate reductions, which would cost as much as the
// 16 FMAs per k-step they finish.
inline __m512 hsum16(const __m512* a) {
  __m512 t[8], u[4];
  for (int p = 0; p < 8; ++p)
    t[p] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * p], a[2 * p + 1]), _mm512_unpackhi_ps(a[2 * p], a[2 * p + 1]));
  for (int p = 0; p < 4; ++p) {
    const __m512d x = _mm512_castps_pd(t[2 * p]), y = _mm512_castps_pd(t[2 * p + 1]);
    u[p] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
  }
  const __m512 v0 = _mm512_add_ps(_mm512_shuffle_f32x4(u[0], u[1], 0x88), _mm512_shuffle_f32x4(u[0], u[1], 0xDD));
  const __m512 v1 = _mm512_add_ps(_mm512_shuffle_f32x4(u[2], u[3], 0x88), _mm512_shuffle_f32x4(u[2], u[3], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(v0, v1, 0x88), _mm512_shuffle_f32x4(v0, v1, 0xDD));
}
#endif

#if defined(__AVX512F__)
// The full 4×4 register tile, its 16 accumulators named: as an array (1 KiB) GCC keeps them on the stack
// and stores all 16 every k-step.
inline void dot_block_4x4(const float* const* x, const float* W, int64_t ldw, int64_t k, float* y, int64_t ldy) {
  __m512 a00 = _mm512_setzero_ps(), a01 = a00, a02 = a00, a03 = a00, a10 = a00, a11 = a00, a12 = a00, a13 = a00,
         a20 = a00, a21 = a00, a22 = a00, a23 = a00, a30 = a00, a31 = a00, a32 = a00, a33 = a00;
  const float *x0 = x[0], *x1 = x[1], *x2 = x[2], *x3 = x[3];
  const float *w0 = W, *w1 = W + ldw, *w2 = W + 2 * ldw, *w3 = W + 3 * ldw;
  for (int64_t kk = 0; kk < k; kk += 16) {
    const __mmask16 m = tail16(k - kk);
    const __m512 v0 = _mm512_maskz_loadu_ps(m, w0 + kk), v1 = _mm512_maskz_loadu_ps(m, w1 + kk),
                 v2 = _mm512_maskz_loadu_ps(m, w2 + kk), v3 = _mm512_maskz_loadu_ps(m, w3 + kk);
    __m512 xv = _mm512_maskz_loadu_ps(m, x0 + kk);
    a00 = _mm512_fmadd_ps(v0, xv, a00), a01 = _mm512_fmadd_ps(v1, xv, a01);
    a02 = _mm512_fmadd_ps(v2, xv, a02), a03 = _mm512_fmadd_ps(v3, xv, a03);
    xv = _mm512_maskz_loadu_ps(m, x1 + kk);
    a10 = _mm512_fmadd_ps(v0, xv, a10), a11 = _mm512_fmadd_ps(v1, xv, a11);
    a12 = _mm512_fmadd_ps(v2, xv, a12), a13 = _mm512_fmadd_ps(v3, xv, a13);
    xv = _mm512_maskz_loadu_ps(m, x2 + kk);
    a20 = _mm512_fmadd_ps(v0, xv, a20), a21 = _mm512_fmadd_ps(v1, xv, a21);
    a22 = _mm512_fmadd_ps(v2, xv, a22), a23 = _mm512_fmadd_ps(v3, xv, a23);
    xv = _mm512_maskz_loadu_ps(m, x3 + kk);
    a30 = _mm512_fmadd_ps(v0, xv, a30), a31 = _mm512_fmadd_ps(v1, xv, a31);
    a32 = _mm512_fmadd_ps(v2, xv, a32), a33 = _mm512_fmadd_ps(v3, xv, a33);
  }
  const __m512 acc[16] = {a00, a01, a02, a03, a10, a11, a12, a13, a20, a21, a22, a23, a30, a31, a32, a33};
  const __m512 sums = hsum16(acc);  // lane i·4 + j = Σ a_ij
  // the lane index of an extract is an immediate: written out, not a loop the compiler may not unroll
  _mm_storeu_ps(y, _mm512_extractf32x4_ps(sums, 0));
  _mm_storeu_ps(y + ldy, _mm512_extractf32x4_ps(sums, 1));
  _mm_storeu_ps(y + 2 * ldy, _mm512_extractf32x4_ps(sums, 2));
  _mm_storeu_ps(y + 3 * ldy, _mm512_extractf32x4_ps(sums, 3));
}
#endif

template <typename T, int JB, int IB>
inline void dot_block(const T* const* x, const T* W, int64_t ldw, int64_t k, T* y, int64_t ldy) {
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<T, float>) {
    if constexpr (IB == 4 && JB == 4) {
      dot_block_4x4(x, W, ldw, k, y, ldy);
    } else {  // edge tiles: at most 9 accumulators
      __m512 acc[IB][JB];
      for (int i = 0; i < IB; ++i)
        for (int j = 0; j < JB; ++j) acc[i][j] = _mm512_setzero_ps();
      for (int64_t kk = 0; kk < k; kk += 16) {
        const __mmask16 m = tail16(k - kk);
        __m512 w[JB];
        for (int j = 0; j < JB; ++j) w[j] = _mm512_maskz_loadu_ps(m, W + j * ldw + kk);
        for (int i = 0; i < IB; ++i) {
          const __m512 xv = _mm512_maskz_loadu_ps(m, x[i] + kk);
          for (int j = 0; j < JB; ++j) acc[i][j] = _mm512_fmadd_ps(w[j], xv, acc[i][j]);
        }
      }
      for (int i = 0; i < IB; ++i)
        for (int j = 0; j < JB; ++j) y[i * ldy + j] = _mm512_reduce_add_ps(acc[i][j]);
    }
    return;
  }
#else
  if constexpr (std::is_same_v<T, float>) {
    const float* xp[IB];  // local copies: loads through x would have to be redone after every store
    for (int i = 0; i < IB; ++i) xp[i] = x[i];
    VF acc[IB][JB];
    for (int i = 0; i < IB; ++i)
      for (int j = 0; j < JB; ++j) acc[i][j] = VF{};
    int64_t kk = 0;
    for (; kk + kW <= k; kk += kW) {
      VF w[JB];
      for (int j = 0; j < JB; ++j) w[j] = vload(W + j * ldw + kk);
      for (int i = 0; i < IB; ++i) {
        const VF xv = vload(xp[i] + kk);
        for (int j = 0; j < JB; ++j) acc[i][j] += w[j] * xv;
      }
    }
    for (int i = 0; i < IB; ++i)
      for (int j = 0; j < JB; ++j) {
        float s = agf_simd::hsum<float>(acc[i][j]);
        for (int64_t t = kk; t < k; ++t) s += xp[i][t] * W[j * ldw + t];
        y[i * ldy + j] = s;
      }
    return;
  }
#endif
  for (int i = 0; i < IB; ++i)
    for (int j = 0; j < JB; ++j) {
      T s = 0;
      const T* w = W + j * ldw;
#pragma omp simd reduction(+ : s)
      for (int64_t kk = 0; kk < k; ++kk) s += x[i][kk] * w[kk];
      y[i * ldy + j] = s;
    }
}

// The tile with exactly ib input rows and JB weight rows (the edges of a product have fewer).
template <typename T, int JB, int IB = kDotInputs>
inline void dot_rows_jb(int64_t ib, const T* const* x, const T* W, int64_t ldw, int64_t k, T* y, int64_t ldy) {
  if constexpr (IB > 1)
    if (ib < IB) return dot_rows_jb<T, JB, IB - 1>(ib, x, W, ldw, k, y, ldy);
  dot_block<T, JB, IB>(x, W, ldw, k, y, ldy);
}

template <typename T, int JB = kDotRows>
inline void dot_tile(int64_t jb, int64_t ib, const T* const* x, const T* W, int64_t ldw, int64_t k, T* y,
                     int64_t ldy) {
  if constexpr (JB > 1)
    if (jb < JB) return dot_tile<T, JB - 1>(jb, ib, x, W, ldw, k, y, ldy);
  dot_rows_jb<T, JB>(ib, x, W, ldw, k, y, ldy);
}

#if defined(__AVX512F__)
// One input row (the matrix-vector product of sampling at M = 1): y[j] = Σ_k x[k]·W[j·ldw + k] for the first
// n - n mod 16 rows. Each 4-row block splits k into four interleaved 16-wide slices, so 16 independent FMA
// chains are in flight (a 4-row block with one slice keeps 4, latency-bound), and 16 rows' accumulators are
// reduced together by hsum16.
inline int64_t dot_row1(const float* x, const float* W, int64_t ldw, int64_t n, int64_t k, float* y) {
  const int64_t n16 = n - n % 16, k64 = k - k % 64;
  for (int64_t j = 0; j < n16; j += 16) {
    __m512 sums[16];
    for (int64_t r = 0; r < 16; r += 4) {
      const float* w = W + (j + r) * ldw;
      __m512 acc[16];
      for (int q = 0; q < 16; ++q) acc[q] = _mm512_setzero_ps();
      for (int64_t kk = 0; kk < k64; kk += 64)  // unmasked: the masked loads are left to the tail below
        for (int s = 0; s < 4; ++s) {
          const __m512 xv = _mm512_loadu_ps(x + kk + 16 * s);
          for (int q = 0; q < 4; ++q)
            acc[4 * q + s] = _mm512_fmadd_ps(_mm512_loadu_ps(w + q * ldw + kk + 16 * s), xv, acc[4 * q + s]);
        }
      for (int s = 0; s < 4 && k64 + 16 * s < k; ++s) {
        const __mmask16 m = tail16(k - k64 - 16 * s);
        const __m512 xv = _mm512_maskz_loadu_ps(m, x + k64 + 16 * s);
        for (int q = 0; q < 4; ++q)
          acc[4 * q + s] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, w + q * ldw + k64 + 16 * s), xv, acc[4 * q + s]);
      }
      for (int q = 0; q < 4; ++q)
        sums[r + q] =
            _mm512_add_ps(_mm512_add_ps(acc[4 * q], acc[4 * q + 1]), _mm512_add_ps(acc[4 * q + 2], acc[4 * q + 3]));
    }
    _mm512_storeu_ps(y + j, hsum16(sums));
  }
  return n16;
}
#else
// One input row (the matrix-vector product of sampling at M = 1) for the first n - n mod 4 rows: 4 weight
// rows × 2 interleaved k-slices, 8 independent FMA chains (two FMA units of 4-cycle latency need 8);
// 8 accumulators + 2 input vectors + 1 weight vector.
inline int64_t dot_row1(const float* x, const float* W, int64_t ldw, int64_t n, int64_t k, float* y) {
  const int64_t n4 = n - n % 4, k2 = k - k % (2 * kW);
  for (int64_t j = 0; j < n4; j += 4) {
    const float* w = W + j * ldw;
    VF a[4][2];
    for (int q = 0; q < 4; ++q) a[q][0] = a[q][1] = VF{};
    for (int64_t kk = 0; kk < k2; kk += 2 * kW) {
      const VF x0 = vload(x + kk), x1 = vload(x + kk + kW);
      for (int q = 0; q < 4; ++q) {
        a[q][0] += vload(w + q * ldw + kk) * x0;
        a[q][1] += vload(w + q * ldw + kk + kW) * x1;
      }
    }
    for (int q = 0; q < 4; ++q) {
      float s = agf_simd::hsum<float>(a[q][0] + a[q][1]);
      for (int64_t t = k2; t < k; ++t) s += x[t] * w[q * ldw + t];
      y[j + q] = s;
    }
  }
  return n4;
}
#endif

template <typename T>
void dot_rows(int64_t m, const T* const* x, const T* W, int64_t ldw, int64_t n, int64_t k, T* y, int64_t ldy) {
  int64_t j0 = 0;
  if constexpr (std::is_same_v<T, float>)
    if (m == 1) j0 = dot_row1(x[0], W, ldw, n, k, y);
  for (int64_t j = j0; j < n; j += kDotRows) {
    const int64_t jb = std::min<int64_t>(kDotRows, n - j);
    for (int64_t i = 0; i < m; i += kDotInputs)
      dot_tile<T>(jb, std::min<int64_t>(kDotInputs, m - i), x + i, W + j * ldw, ldw, k, y + i * ldy + j, ldy);
  }
}

#if defined(__AVX512F__)
// Patches in vector lanes: yT[j][0..15] = Σ_k W[j·ldw + k]·xT[k][0..15] for j < n, where xT holds up to 16
// patches' inputs transposed (lane = patch). Each k-step is one vector load and JB broadcast FMAs, with no
// horizontal sums and the weights in their own row-major layout. Four k-steps per trip keep four x vectors
// live (12 accumulators + 4 inputs + the broadcast weight: 17 of 32 zmm), so the 12 FMA chains get four
// independent steps per trip. Not inlined: inside the sampler GCC runs out of registers for the row pointers
// and reloads them per FMA.
template <int JB>
__attribute__((noinline)) void lanes_block(const float* W, int64_t ldw, int64_t k, const float* xT, float* yT) {
  __m512 acc[JB];
  for (int j = 0; j < JB; ++j) acc[j] = _mm512_setzero_ps();
  int64_t kk = 0;
  for (; kk + 4 <= k; kk += 4) {
    __m512 xv[4];
    for (int u = 0; u < 4; ++u) xv[u] = _mm512_loadu_ps(xT + 16 * (kk + u));
    for (int u = 0; u < 4; ++u)
      for (int j = 0; j < JB; ++j) acc[j] = _mm512_fmadd_ps(_mm512_set1_ps(W[j * ldw + kk + u]), xv[u], acc[j]);
  }
  for (; kk < k; ++kk) {
    const __m512 xv = _mm512_loadu_ps(xT + 16 * kk);
    for (int j = 0; j < JB; ++j) acc[j] = _mm512_fmadd_ps(_mm512_set1_ps(W[j * ldw + kk]), xv, acc[j]);
  }
  for (int j = 0; j < JB; ++j) _mm512_storeu_ps(yT + 16 * j, acc[j]);
}

inline void lanes_product(const float* W, int64_t ldw, int64_t n, int64_t k, const float* xT, float* yT) {
  int64_t j = 0;
  for (; j + 12 <= n; j += 12) lanes_block<12>(W + j * ldw, ldw, k, xT, yT + 16 * j);
  if (j + 8 <= n) lanes_block<8>(W + j * ldw, ldw, k, xT, yT + 16 * j), j += 8;
  for (; j + 4 <= n; j += 4) lanes_block<4>(W + j * ldw, ldw, k, xT, yT + 16 * j);
  for (; j < n; ++j) lanes_block<1>(W + j * ldw, ldw, k, xT, yT + 16 * j);
}

// out[c·16 + i] = rows[i][c] for c < 16, i < 16 (rows i >= live read as zeros): a 16×16 transpose in registers,
// unpacks within 128-bit lanes, then across them.
inline void transpose16(const float* const* rows, int64_t live, float* out) {
  __m512 r[16], t[16];
  for (int64_t i = 0; i < 16; ++i) r[i] = i < live ? _mm512_loadu_ps(rows[i]) : _mm512_setzero_ps();
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_shuffle_ps(t[i], t[i + 2], 0x44);
    r[i + 1] = _mm512_shuffle_ps(t[i], t[i + 2], 0xEE);
    r[i + 2] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0x44);
    r[i + 3] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
  }
  for (int i = 0; i < 8; ++i) {
    const int a = (i / 4) * 8 + i % 4;
    t[a] = _mm512_shuffle_f32x4(r[a], r[a + 4], 0x88);
    t[a + 4] = _mm512_shuffle_f32x4(r[a], r[a + 4], 0xDD);
  }
  for (int i = 0; i < 8; ++i) {
    _mm512_storeu_ps(out + 16 * i, _mm512_shuffle_f32x4(t[i], t[i + 8], 0x88));
    _mm512_storeu_ps(out + 16 * (i + 8), _mm512_shuffle_f32x4(t[i], t[i + 8], 0xDD));
  }
}
#endif

}  // namespace agf_gru_patch
