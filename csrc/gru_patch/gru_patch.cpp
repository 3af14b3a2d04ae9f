// Fused GRU patch decoder (SPEC §1.3): schema and CPU kernels.
//
// Patches are independent P-step recurrences (h_0 = 0), so the work splits into row tiles of up to
// kTile patches, one at::parallel_for item each, and a tile runs all P steps with its hidden state,
// gate pre-activations and logits in thread-local buffers (L2-sized: kTile·3h floats for the gates).
// The input projection W_ih·[e_b | c] is split as the structure allows:
//   - the byte part is a row of the 256×3h table byte_emb·W_ih[:, :h]ᵀ, built once per call when the
//     call has enough steps to amortise it (M·P ≥ 2·256), else one small GEMM on the gathered rows;
//   - the context part is one GEMM per tile, shared by the P steps;
// and each step adds one GEMM with W_hh (skipped at t = 0, where h = 0). Gates, the head's
// log-softmax and the sampler are fused into the loops that read the GEMM outputs.
// GEMMs are at::mm on views of those buffers (single-threaded BLAS inside at::parallel_for).
// Backward mirrors it per tile, keeping per-thread partial weight gradients that are summed at the end;
// the table's gradient (256×3h) is scattered per thread and turned into byte_emb and W_ih[:, :h]
// gradients with two GEMMs. Nothing of size M·P·256 is ever materialised: the loss recomputes
// each tile's logits in its backward from the saved log-sum-exp.
// Sampling at small M (the generation regime) splits the hidden units and the vocabulary across
// threads instead (one parallel region for the whole patch, two barriers per step), so each core
// streams only its share of the weights from its own L2.
// Accumulation is fp32 (fp64 for double inputs); fp16/bf16 inputs run the fp32 kernels.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <initializer_list>
#include <limits>
#include <memory>
#include <string>
#include <type_traits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "checks.h"
#include "cpu_simd.h"

namespace agf_gru_patch {

using at::Tensor;
constexpr int64_t kVocab = 256;
constexpr int64_t kTile = 128;      // patches per work item of the tiled kernels
constexpr int64_t kSmallM = 32;    // sampling at M <= kSmallM splits units across threads instead, except
constexpr int64_t kLanesMin = 11;  // in fp32 from kLanesMin to kLanesMax patches, where the lanes kernel is
constexpr int64_t kLanesMax = 128; // fastest (measured; the tiles' GEMMs win from ~200 patches on)
constexpr int64_t kTableMin = 512; // build the byte table when M·P >= this (it costs 256 rows)

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
// reduced together by hsum16. Streams the weights from L2 at ~100 GB/s where the 4×1 tile reached ~77.
inline int64_t dot_row1(const float* x, const float* W, int64_t ldw, int64_t n, int64_t k, float* y) {
  const int64_t n16 = n - n % 16, k64 = k - k % 64;
  for (int64_t j = 0; j < n16; j += 16) {
    __m512 sums[16];
    for (int64_t r = 0; r < 16; r += 4) {
      const float* w = W + (j + r) * ldw;
      __m512 acc[16];
      for (int q = 0; q < 16; ++q) acc[q] = _mm512_setzero_ps();
      for (int64_t kk = 0; kk < k64; kk += 64)  // unmasked: masks in this loop cost a fifth of its speed
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
// live: 12 rows × 4 steps ran at ~160 GFLOP/s on one core where 16 × 1 ran at ~100. Not inlined: inside the
// sampler GCC runs out of registers for the row pointers and reloads them per FMA.
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

// ------------------------------------------------------------------------------------------------
// The weights of one call, as raw pointers into contiguous acc-dtype tensors.

template <typename T>
struct Weights {
  int64_t h;
  const T* emb;    // [256, h]
  const T* w_ih;   // [3h, 2h]: columns [0, h) multiply the byte embedding, [h, 2h) the context
  const T* w_hh;   // [3h, h]
  const T* b_ih;   // [3h]
  const T* b_hh;   // [3h]
  const T* table;  // [256, 3h] = emb·W_ih[:, :h]ᵀ, or nullptr
  Tensor w_e() const { return view(w_ih, 3 * h, h, 2 * h); }
  Tensor w_c() const { return view(w_ih + h, 3 * h, h, 2 * h); }
  Tensor hh() const { return view(w_hh, 3 * h, h, h); }
};

template <typename T>
Weights<T> weights(const Tensor& emb, const Tensor& w_ih, const Tensor& w_hh, const Tensor& b_ih, const Tensor& b_hh,
                   const Tensor& table) {
  return {emb.size(1),        emb.data_ptr<T>(),  w_ih.data_ptr<T>(), w_hh.data_ptr<T>(),
          b_ih.data_ptr<T>(), b_hh.data_ptr<T>(), table.defined() ? table.data_ptr<T>() : nullptr};
}

// The 256×3h byte table, when `steps` (= M·P) is enough to amortise its 256 rows.
inline Tensor byte_table(const Tensor& emb, const Tensor& w_ih, int64_t steps) {
  if (steps < kTableMin) return Tensor();
  return at::mm(emb, w_ih.narrow(1, 0, emb.size(1)).t());
}

// Patches per tile: enough tiles to feed every thread, at most kTile rows each.
inline int64_t tile_rows(int64_t M) {
  const int64_t per_thread = (M + at::get_num_threads() - 1) / std::max(1, at::get_num_threads());
  return std::max<int64_t>(1, std::min(kTile, per_thread));
}

template <typename F>
void for_each_tile(int64_t M, const F& f) {
  const int64_t ts = tile_rows(M);
  at::parallel_for(0, (M + ts - 1) / ts, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) f(b * ts, std::min(ts, M - b * ts));
  });
}

// The byte part of the input projection for `rows` patches at one step: table rows, or rows of `buf`
// [rows, 3h] projected from the gathered embeddings (`ebuf` [rows, h] scratch).
template <typename T>
void byte_projection(const Weights<T>& W, int64_t rows, const int64_t* bytes, int64_t stride, const T** ge, T* buf,
                     T* ebuf) {
  const int64_t h = W.h, G = 3 * h;
  if (W.table) {
    for (int64_t i = 0; i < rows; ++i) ge[i] = W.table + bytes[i * stride] * G;
    return;
  }
  for (int64_t i = 0; i < rows; ++i) std::memcpy(ebuf + i * h, W.emb + bytes[i * stride] * h, h * sizeof(T));
  gemm(view(buf, rows, G, G), view(ebuf, rows, h, h), W.w_e().t(), false);
  for (int64_t i = 0; i < rows; ++i) ge[i] = buf + i * G;
}

// ------------------------------------------------------------------------------------------------
// Teacher-forced forward of one tile: `rows` patches from row r0, all P steps.
// bytes: [M, P] input bytes; hid: the tile's [rows, P, h]; gates: the tile's [rows, P, 4h] or nullptr.

template <typename T>
void forward_tile(const Weights<T>& W, const T* ctx, const int64_t* bytes, int64_t P, int64_t r0, int64_t rows,
                  T* hid, T* gates) {
  const int64_t h = W.h, G = 3 * h;
  Scratch<T> gc(rows * G), gh(rows * G), gbuf(W.table ? 0 : rows * G), ebuf(W.table ? 0 : rows * h);
  std::vector<const T*> ge(rows);
  gemm(view(gc.data(), rows, G, G), view(ctx + r0 * h, rows, h, h), W.w_c().t(), false);
  for (int64_t t = 0; t < P; ++t) {
    byte_projection(W, rows, bytes + r0 * P + t, P, ge.data(), gbuf.data(), ebuf.data());
    if (t > 0) gemm(view(gh.data(), rows, G, G), view(hid + (t - 1) * h, rows, h, P * h), W.hh().t(), false);
    for (int64_t i = 0; i < rows; ++i) {
      T* out = hid + (i * P + t) * h;
      gate_row(h, ge[i], gc.data() + i * G, t > 0 ? gh.data() + i * G : nullptr, W.b_ih, W.b_hh,
               t > 0 ? out - h : nullptr, out, gates ? gates + (i * P + t) * 4 * h : nullptr);
    }
  }
}

// Per-thread partial gradients of the GRU weights (summed over threads at the end).
template <typename T>
struct Partial {
  T* dw_hh;   // [3h, h]
  T* dw_c;    // [3h, h]
  T* dtable;  // [256, 3h]: gradient of the byte table, turned into byte_emb and W_ih[:, :h] grads
  T* db_ih;   // [3h]
  T* db_hh;   // [3h]
};

// Backward of one tile. hid, gates: the tile's saved [rows, P, h], [rows, P, 4h]; dH: the tile's dL/dhidden
// [rows, P, h]; dctx: the tile's rows of dL/dcontext.
template <typename T>
void backward_tile(const Weights<T>& W, const T* ctx, const int64_t* bytes, int64_t P, int64_t r0, int64_t rows,
                   const T* hid, const T* gates, const T* dH, T* dctx, const Partial<T>& g) {
  const int64_t h = W.h, G = 3 * h;
  Scratch<T> dh(rows * h), dgi(rows * G), dgh(rows * G);
  std::vector<T> dgc(rows * G, T(0));
  for (int64_t i = 0; i < rows; ++i) std::memcpy(dh.data() + i * h, dH + (i * P + P - 1) * h, h * sizeof(T));
  for (int64_t t = P - 1; t >= 0; --t) {
    for (int64_t i = 0; i < rows; ++i) {
      const T* hprev = t > 0 ? hid + (i * P + t - 1) * h : nullptr;
      T* gi = dgi.data() + i * G;
      T* gh = dgh.data() + i * G;
      gate_row_bwd(h, dh.data() + i * h, gates + (i * P + t) * 4 * h, hprev, gi, gh);
      T* gci = dgc.data() + i * G;
      T* row = g.dtable + bytes[(r0 + i) * P + t] * G;
      for (int64_t j = 0; j < G; ++j) {
        gci[j] += gi[j];
        row[j] += gi[j];
        g.db_hh[j] += gh[j];
      }
    }
    if (t == 0) break;
    const Tensor dgh_v = view(dgh.data(), rows, G, G);
    gemm(view(dh.data(), rows, h, h), dgh_v, W.hh(), true);
    gemm(view(g.dw_hh, G, h, h), dgh_v.t(), view(hid + (t - 1) * h, rows, h, P * h), true);
    for (int64_t i = 0; i < rows; ++i) {
      const T* add = dH + (i * P + t - 1) * h;
      T* d = dh.data() + i * h;
      for (int64_t j = 0; j < h; ++j) d[j] += add[j];
    }
  }
  const Tensor dgc_v = view(dgc.data(), rows, G, G);
  gemm(view(dctx, rows, h, h), dgc_v, W.w_c(), false);
  gemm(view(g.dw_c, G, h, h), dgc_v.t(), view(ctx + r0 * h, rows, h, h), true);
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < G; ++j) g.db_ih[j] += dgc[i * G + j];
}

// ------------------------------------------------------------------------------------------------
// Host side: dtype handling and the per-call setup shared by the ops.

inline at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// Contiguous, in the accumulation dtype; the common case (already so) skips the dispatcher entirely,
// which matters at M = 1 where the whole call is tens of microseconds.
inline Tensor acc(const Tensor& t, at::ScalarType a) {
  return t.scalar_type() == a && t.is_contiguous() ? t : t.to(a).contiguous();
}

inline void check_common(const Tensor& context, const Tensor& byte_emb, const Tensor& w_ih, const Tensor& w_hh) {
  for (const Tensor* t : {&context, &byte_emb, &w_ih, &w_hh}) AGF_CHECK_DEVICE(*t, at::kCPU);
  AGF_CHECK_DIM(context, 2);
  const int64_t h = context.size(1);
  TORCH_CHECK(byte_emb.sizes() == at::IntArrayRef({kVocab, h}), "byte_emb must be [256, h]");
  TORCH_CHECK(w_ih.sizes() == at::IntArrayRef({3 * h, 2 * h}), "weight_ih must be [3h, 2h]");
  TORCH_CHECK(w_hh.sizes() == at::IntArrayRef({3 * h, h}), "weight_hh must be [3h, h]");
}

// Per-thread partial gradients, zeroed; summed by `finish`.
struct PartialBuffers {
  Tensor dw_hh, dw_c, dtable, db_ih, db_hh;
  PartialBuffers(int64_t threads, int64_t h, at::ScalarType a) {
    auto z = [&](std::initializer_list<int64_t> s) { return at::zeros(s, at::TensorOptions().dtype(a)); };
    dw_hh = z({threads, 3 * h, h});
    dw_c = z({threads, 3 * h, h});
    dtable = z({threads, kVocab, 3 * h});
    db_ih = z({threads, 3 * h});
    db_hh = z({threads, 3 * h});
  }
  template <typename T>
  Partial<T> of(int64_t thread) const {
    return {dw_hh[thread].data_ptr<T>(), dw_c[thread].data_ptr<T>(), dtable[thread].data_ptr<T>(),
            db_ih[thread].data_ptr<T>(), db_hh[thread].data_ptr<T>()};
  }
  // (dbyte_emb, dweight_ih, dweight_hh, dbias_ih, dbias_hh) in dtype `out`.
  std::vector<Tensor> finish(const Tensor& emb, const Tensor& w_ih, at::ScalarType out) const {
    const int64_t h = emb.size(1);
    const Tensor dtable_sum = dtable.sum(0);
    const Tensor dw_e = dtable_sum.t().mm(emb);
    const Tensor demb = dtable_sum.mm(w_ih.narrow(1, 0, h));
    return {demb.to(out), at::cat({dw_e, dw_c.sum(0)}, 1).to(out), dw_hh.sum(0).to(out), db_ih.sum(0).to(out),
            db_hh.sum(0).to(out)};
  }
};

// ------------------------------------------------------------------------------------------------
// gru_patch_decode

std::tuple<Tensor, Tensor, Tensor> decode_fwd_cpu(const Tensor& context, const Tensor& prev_bytes,
                                                  const Tensor& byte_emb, const Tensor& weight_ih,
                                                  const Tensor& weight_hh, const Tensor& bias_ih,
                                                  const Tensor& bias_hh, bool save) {
  check_common(context, byte_emb, weight_ih, weight_hh);
  AGF_CHECK_DIM(prev_bytes, 2);
  const auto dtype = context.scalar_type();
  const auto a = acc_type(dtype);
  const Tensor ctx = acc(context, a), emb = acc(byte_emb, a), w_ih = acc(weight_ih, a), w_hh = acc(weight_hh, a),
               b_ih = acc(bias_ih, a), b_hh = acc(bias_hh, a);
  const Tensor bytes = prev_bytes.to(at::kLong).contiguous();
  const int64_t M = ctx.size(0), P = bytes.size(1), h = ctx.size(1);
  const auto opt = ctx.options();
  Tensor hid = at::empty({M, P, h}, opt);
  Tensor gates = at::empty({save ? M : 0, P, 4 * h}, opt);
  const Tensor table = byte_table(emb, w_ih, M * P);
  AT_DISPATCH_FLOATING_TYPES(a, "gru_patch_decode_fwd", [&] {
    const auto W = weights<scalar_t>(emb, w_ih, w_hh, b_ih, b_hh, table);
    const scalar_t* c = ctx.data_ptr<scalar_t>();
    const int64_t* b = bytes.data_ptr<int64_t>();
    scalar_t* hp = hid.data_ptr<scalar_t>();
    scalar_t* gp = save ? gates.data_ptr<scalar_t>() : nullptr;
    for_each_tile(M, [&](int64_t r0, int64_t rows) {
      forward_tile(W, c, b, P, r0, rows, hp + r0 * P * h, gp ? gp + r0 * P * 4 * h : nullptr);
    });
  });
  if (dtype == a) return {hid, gates, at::empty({0}, opt)};
  return {hid.to(dtype), gates, save ? hid : at::empty({0}, opt)};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> decode_bwd_cpu(
    const Tensor& grad_hidden, const Tensor& context, const Tensor& prev_bytes, const Tensor& byte_emb,
    const Tensor& weight_ih, const Tensor& weight_hh, const Tensor& hidden, const Tensor& gates) {
  check_common(context, byte_emb, weight_ih, weight_hh);
  const auto dtype = context.scalar_type();
  const auto a = acc_type(dtype);
  const Tensor ctx = acc(context, a), emb = acc(byte_emb, a), w_ih = acc(weight_ih, a), w_hh = acc(weight_hh, a);
  const Tensor dH = acc(grad_hidden, a), hid = acc(hidden, a), g = acc(gates, a);
  const Tensor bytes = prev_bytes.to(at::kLong).contiguous();
  const int64_t M = ctx.size(0), P = bytes.size(1), h = ctx.size(1);
  TORCH_CHECK(hid.sizes() == at::IntArrayRef({M, P, h}) && g.sizes() == at::IntArrayRef({M, P, 4 * h}),
              "gru_patch_decode_bwd: hidden/gates must be the forward's saved tensors");
  Tensor dctx = at::empty({M, h}, ctx.options());
  const PartialBuffers part(at::get_num_threads(), h, a);
  AT_DISPATCH_FLOATING_TYPES(a, "gru_patch_decode_bwd", [&] {
    const auto W = weights<scalar_t>(emb, w_ih, w_hh, w_hh, w_hh, Tensor());
    const scalar_t *c = ctx.data_ptr<scalar_t>(), *hp = hid.data_ptr<scalar_t>(), *gp = g.data_ptr<scalar_t>(),
                   *dp = dH.data_ptr<scalar_t>();
    const int64_t* b = bytes.data_ptr<int64_t>();
    scalar_t* dc = dctx.data_ptr<scalar_t>();
    for_each_tile(M, [&](int64_t r0, int64_t rows) {
      backward_tile(W, c, b, P, r0, rows, hp + r0 * P * h, gp + r0 * P * 4 * h, dp + r0 * P * h, dc + r0 * h,
                    part.of<scalar_t>(at::get_thread_num()));
    });
  });
  const auto rest = part.finish(emb, w_ih, dtype);
  return {dctx.to(dtype), rest[0], rest[1], rest[2], rest[3], rest[4]};
}

// ------------------------------------------------------------------------------------------------
// gru_patch_loss: per tile, the forward above, then logits (rows·P × 256, the tile's only) → log-softmax.

inline Tensor teacher_bytes(const Tensor& targets, int64_t sos) {
  const Tensor t = targets.to(at::kLong);
  return at::cat({at::full({t.size(0), 1}, sos, t.options()), t.narrow(1, 0, t.size(1) - 1)}, 1).contiguous();
}

// l ← g·(softmax(l) - onehot(y)) for one row of logits (bias included) with log-sum-exp `lse`.
template <typename T>
inline void softmax_grad_row(T* l, T lse, int64_t y, T g) {
  exp_affine(l, -lse, T(1), l, kVocab);
  for (int64_t k = 0; k < kVocab; ++k) l[k] *= g;
  l[y] -= g;
}

// With head_grad (training under a mean or sum reduction, whose upstream gradient is one scalar s), the
// forward also takes the head's backward while its logits tile is on chip: dh_head = (softmax - onehot)·W_head
// [M, P, h], dw_head = Σ (softmax - onehot)ᵀ h [256, h] and db_head [256], each to be scaled by s. The
// backward then skips recomputing the logits (one M·P×256×h GEMM fewer).
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> loss_fwd_cpu(
    const Tensor& context, const Tensor& targets, const Tensor& byte_emb, const Tensor& weight_ih,
    const Tensor& weight_hh, const Tensor& bias_ih, const Tensor& bias_hh, const Tensor& head_weight,
    const Tensor& head_bias, int64_t sos, bool save, bool head_grad) {
  check_common(context, byte_emb, weight_ih, weight_hh);
  AGF_CHECK_DIM(targets, 2);
  TORCH_CHECK(save || !head_grad, "gru_patch_loss_fwd: head_grad needs save");
  const auto a = acc_type(context.scalar_type());
  const Tensor ctx = acc(context, a), emb = acc(byte_emb, a), w_ih = acc(weight_ih, a), w_hh = acc(weight_hh, a),
               b_ih = acc(bias_ih, a), b_hh = acc(bias_hh, a), hw = acc(head_weight, a), hb = acc(head_bias, a);
  const Tensor y = targets.to(at::kLong).contiguous();
  const Tensor bytes = teacher_bytes(y, sos);
  const int64_t M = ctx.size(0), P = y.size(1), h = ctx.size(1);
  const auto opt = ctx.options();
  Tensor loss = at::empty({M, P}, opt), lse = at::empty({M, P}, opt);
  Tensor hid = at::empty({save ? M : 0, P, h}, opt), gates = at::empty({save ? M : 0, P, 4 * h}, opt);
  Tensor dh_head = at::empty({head_grad ? M : 0, P, h}, opt);
  const int64_t threads = head_grad ? at::get_num_threads() : 0;
  Tensor dw_part = at::zeros({threads, kVocab, h}, opt), db_part = at::zeros({threads, kVocab}, opt);
  const Tensor table = byte_table(emb, w_ih, M * P);
  AT_DISPATCH_FLOATING_TYPES(a, "gru_patch_loss_fwd", [&] {
    using T = scalar_t;
    const auto W = weights<T>(emb, w_ih, w_hh, b_ih, b_hh, table);
    const T *c = ctx.data_ptr<T>(), *hwp = hw.data_ptr<T>(), *hbp = hb.data_ptr<T>();
    const int64_t *b = bytes.data_ptr<int64_t>(), *yp = y.data_ptr<int64_t>();
    T *lp = loss.data_ptr<T>(), *sp = lse.data_ptr<T>();
    for_each_tile(M, [&](int64_t r0, int64_t rows) {
      const int64_t n = rows * P;
      Scratch<T> local(save ? 0 : n * h), logits(n * kVocab), e(kVocab);
      T* hp = save ? hid.data_ptr<T>() + r0 * P * h : local.data();
      forward_tile(W, c, b, P, r0, rows, hp, save ? gates.data_ptr<T>() + r0 * P * 4 * h : nullptr);
      const Tensor l_v = view(logits.data(), n, kVocab, kVocab), h_v = view(hp, n, h, h);
      gemm(l_v, h_v, view(hwp, kVocab, h, h).t(), false);
      for (int64_t q = 0; q < n; ++q) {
        T* l = logits.data() + q * kVocab;
        const T s = add_bias_lse(l, hbp, e.data());
        sp[r0 * P + q] = s;
        lp[r0 * P + q] = s - l[yp[r0 * P + q]];
        if (head_grad) softmax_grad_row(l, s, yp[r0 * P + q], T(1));
      }
      if (!head_grad) return;
      const int64_t tid = at::get_thread_num();
      gemm(view(dh_head.data_ptr<T>() + r0 * P * h, n, h, h), l_v, view(hwp, kVocab, h, h), false);
      gemm(dw_part[tid], l_v.t(), h_v, true);
      T* dbp = db_part[tid].data_ptr<T>();
      for (int64_t q = 0; q < n; ++q)
        for (int64_t k = 0; k < kVocab; ++k) dbp[k] += logits[q * kVocab + k];
    });
  });
  if (!head_grad) return {loss, lse, hid, gates, dh_head, at::empty({0}, opt), at::empty({0}, opt)};
  return {loss, lse, hid, gates, dh_head, dw_part.sum(0), db_part.sum(0)};
}

std::vector<Tensor> loss_bwd_cpu(const Tensor& grad_loss, const Tensor& context, const Tensor& targets,
                                 const Tensor& byte_emb, const Tensor& weight_ih, const Tensor& weight_hh,
                                 const Tensor& head_weight, const Tensor& head_bias, const Tensor& hidden,
                                 const Tensor& gates, const Tensor& lse, int64_t sos) {
  check_common(context, byte_emb, weight_ih, weight_hh);
  const auto dtype = context.scalar_type();
  const auto a = acc_type(dtype);
  const Tensor ctx = acc(context, a), emb = acc(byte_emb, a), w_ih = acc(weight_ih, a), w_hh = acc(weight_hh, a),
               hw = acc(head_weight, a), hb = acc(head_bias, a);
  const Tensor gl = acc(grad_loss, a), hid = acc(hidden, a), g = acc(gates, a), s = acc(lse, a);
  const Tensor y = targets.to(at::kLong).contiguous();
  const Tensor bytes = teacher_bytes(y, sos);
  const int64_t M = ctx.size(0), P = y.size(1), h = ctx.size(1);
  TORCH_CHECK(hid.sizes() == at::IntArrayRef({M, P, h}) && g.sizes() == at::IntArrayRef({M, P, 4 * h}),
              "gru_patch_loss_bwd: hidden/gates must be the forward's saved tensors");
  Tensor dctx = at::empty({M, h}, ctx.options());
  const int64_t threads = at::get_num_threads();
  const PartialBuffers part(threads, h, a);
  Tensor dhw = at::zeros({threads, kVocab, h}, ctx.options()), dhb = at::zeros({threads, kVocab}, ctx.options());
  AT_DISPATCH_FLOATING_TYPES(a, "gru_patch_loss_bwd", [&] {
    using T = scalar_t;
    const auto W = weights<T>(emb, w_ih, w_hh, w_hh, w_hh, Tensor());
    const T *c = ctx.data_ptr<T>(), *hp = hid.data_ptr<T>(), *gp = g.data_ptr<T>(), *glp = gl.data_ptr<T>(),
            *sp = s.data_ptr<T>(), *hwp = hw.data_ptr<T>(), *hbp = hb.data_ptr<T>();
    const int64_t *b = bytes.data_ptr<int64_t>(), *yp = y.data_ptr<int64_t>();
    T* dc = dctx.data_ptr<T>();
    for_each_tile(M, [&](int64_t r0, int64_t rows) {
      const int64_t tid = at::get_thread_num();
      const int64_t n = rows * P;
      const T* ht = hp + r0 * P * h;
      Scratch<T> dl(n * kVocab), dH(n * h);
      const Tensor dl_v = view(dl.data(), n, kVocab, kVocab), h_v = view(ht, n, h, h);
      gemm(dl_v, h_v, view(hwp, kVocab, h, h).t(), false);
      T* dhbp = dhb[tid].data_ptr<T>();
      for (int64_t q = 0; q < n; ++q) {
        T* l = dl.data() + q * kVocab;
        for (int64_t k = 0; k < kVocab; ++k) l[k] += hbp[k];
        softmax_grad_row(l, sp[r0 * P + q], yp[r0 * P + q], glp[r0 * P + q]);
        for (int64_t k = 0; k < kVocab; ++k) dhbp[k] += l[k];
      }
      gemm(dhw[tid], dl_v.t(), h_v, true);
      gemm(view(dH.data(), n, h, h), dl_v, view(hwp, kVocab, h, h), false);
      backward_tile(W, c, b, P, r0, rows, ht, gp + r0 * P * 4 * h, dH.data(), dc + r0 * h, part.of<T>(tid));
    });
  });
  const auto rest = part.finish(emb, w_ih, dtype);
  return {dctx.to(dtype), rest[0], rest[1], rest[2], rest[3], rest[4], dhw.sum(0).to(dtype), dhb.sum(0).to(dtype)};
}

// ------------------------------------------------------------------------------------------------
// gru_patch_sample

// Many patches: independent tiles, each running its P steps with one BLAS call per product.
template <typename T>
void sample_tiled(const Weights<T>& W, const T* ctx, const T* hw, const T* hb, int64_t M, int64_t P,
                  const int64_t* prefix, int64_t forced, int64_t sos, const SampleParams& sp, int64_t* out) {
  const int64_t h = W.h, G = 3 * h;
  for_each_tile(M, [&](int64_t r0, int64_t rows) {
    Scratch<T> gc(rows * G), gh(rows * G), hs(rows * h), logits(rows * kVocab), e(kVocab);
    Scratch<T> gbuf(W.table ? 0 : rows * G), ebuf(W.table ? 0 : rows * h);
    std::vector<const T*> ge(rows);
    std::vector<int64_t> cur(rows, sos);
    const Tensor h_v = view(hs.data(), rows, h, h);
    gemm(view(gc.data(), rows, G, G), view(ctx + r0 * h, rows, h, h), W.w_c().t(), false);
    for (int64_t t = 0; t < P; ++t) {
      byte_projection(W, rows, cur.data(), 1, ge.data(), gbuf.data(), ebuf.data());
      if (t > 0) gemm(view(gh.data(), rows, G, G), h_v, W.hh().t(), false);
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
void sample_split(const Weights<T>& W, const T* ctx, const T* hw, const T* hb, int64_t M, int64_t P,
                  const int64_t* prefix, int64_t forced, int64_t sos, const SampleParams& sp, int64_t* out,
                  int threads) {
  const int64_t h = W.h;
  Scratch<T> hbuf(2 * M * h), logits(2 * M * kVocab);
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
      }
      for (int64_t i = 0; i < M && nu > 0; ++i)
        gate_row(nu, ge.data() + i * L, gc.data() + i * L, t > 0 ? gh.data() + i * L : nullptr, bih.data(),
                 bhh.data(), t > 0 ? hcur + i * h + u0 : nullptr, hnext + i * h + u0, static_cast<T*>(nullptr));
      omp_barrier();
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
}

#if defined(__AVX512F__)
// Some patches (fp32, kLanesMin <= M <= kLanesMax): the split of sample_split (units and vocabulary across
// threads), with the patches in vector lanes, groups of 16: the hidden state, gates and logits are kept
// transposed ([unit][patch]) and every product is lanes_product, which runs near the FMA peak where
// dot_rows' few-row tiles do not (nor, below ~200 patches, the tiles' GEMMs). The byte part is the table
// rows transposed into the lanes (or, without a table, a product with the gathered embeddings). Greedy
// picks the bytes of all lanes at once; sampling splits the rows across threads (one more barrier) and
// runs choose_byte on each row.
void sample_lanes(const Weights<float>& W, const float* ctx, const float* hw, const float* hb, int64_t M, int64_t P,
                  const int64_t* prefix, int64_t forced, int64_t sos, const SampleParams& sp, int64_t* out,
                  int threads) {
  const int64_t h = W.h, G = (M + 15) / 16;  // lane groups
  const bool greedy = sp.temperature == 0;
  Scratch<float> ctxT(G * h * 16), hT(2 * G * h * 16), logT(G * kVocab * 16);
  Scratch<int64_t> picked(M);  // sampling: the rows' bytes, each row picked by one thread
  std::fill(ctxT.data(), ctxT.data() + G * h * 16, 0.f);
  std::fill(hT.data(), hT.data() + 2 * G * h * 16, 0.f);
  // the contexts into the lanes: 16 × 16 blocks transposed in registers (0.4 µs at M16 h256, where the serial
  // scalar loop took 2.2), then the columns past the last full block
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
}
#endif

// The public gru_patch_sample calls this op without its Python tensor checks (at M = 1 they cost a quarter
// of the call), so it checks every tensor argument itself, naming it, with the same exception types:
// TypeError for a dtype that is not a float (an index for prefix), ValueError for shapes, dtype and
// device mismatches and byte values.
inline bool is_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

inline std::string dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "torch.float32";
    case at::kDouble: return "torch.float64";
    case at::kHalf: return "torch.float16";
    case at::kBFloat16: return "torch.bfloat16";
    case at::kLong: return "torch.int64";
    case at::kInt: return "torch.int32";
    case at::kShort: return "torch.int16";
    case at::kChar: return "torch.int8";
    case at::kByte: return "torch.uint8";
    case at::kBool: return "torch.bool";
    default: return c10::toString(t);
  }
}

void check_sample_inputs(const Tensor& context, std::initializer_list<std::pair<const char*, const Tensor*>> weights,
                         int64_t patch_size, double temperature, int64_t top_k, int64_t sos,
                         const std::optional<Tensor>& prefix, const std::optional<Tensor>& byte_table) {
  TORCH_CHECK_TYPE(is_float(context.scalar_type()), "context must be float16, bfloat16, float32 or float64, got ",
                   dtype_name(context.scalar_type()));
  TORCH_CHECK_VALUE(context.dim() == 2 && context.size(1) >= 1, "context must have shape [M, h] with h >= 1, got ",
                    context.sizes());
  const int64_t h = context.size(1);
  for (const auto& [name, t] : weights) {
    TORCH_CHECK_TYPE(is_float(t->scalar_type()), name, " must be float16, bfloat16, float32 or float64, got ",
                     dtype_name(t->scalar_type()));
    TORCH_CHECK_VALUE(t->scalar_type() == context.scalar_type(), name, " has dtype ", dtype_name(t->scalar_type()),
                      " but context has ", dtype_name(context.scalar_type()));
    TORCH_CHECK_VALUE(t->device() == context.device(), name, " has device ", t->device(), " but context has ",
                      context.device());
  }
  const int64_t G = 3 * h;
  const int64_t shapes[7][2] = {{kVocab, h}, {G, 2 * h}, {G, h}, {G, 0}, {G, 0}, {kVocab, h}, {kVocab, 0}};
  const size_t dims[7] = {2, 2, 2, 1, 1, 2, 1};
  const char* meanings[7] = {"[256, h]", "[3h, 2h]", "[3h, h]", "[3h]", "[3h]", "[256, h]", "[256]"};
  for (size_t i = 0; i < weights.size(); ++i) {
    const auto& [name, t] = weights.begin()[i];
    const at::IntArrayRef expected(shapes[i], dims[i]);
    TORCH_CHECK_VALUE(t->sizes() == expected, name, " must have shape ", meanings[i], " = ", expected, ", got ",
                      t->sizes());
  }
  TORCH_CHECK_VALUE(patch_size >= 1, "patch_size must be >= 1, got ", patch_size);
  TORCH_CHECK_VALUE(temperature >= 0 && std::isfinite(temperature), "temperature must be finite and >= 0, got ",
                    temperature);
  TORCH_CHECK_VALUE(top_k >= 0 && top_k <= kVocab, "top_k must be in 1..256 (0: all), got ", top_k);
  TORCH_CHECK_VALUE(sos >= 0 && sos < kVocab, "sos must be a byte value in 0..255, got ", sos);
  if (prefix.has_value()) {
    TORCH_CHECK_TYPE(at::isIntegralType(prefix->scalar_type(), /*includeBool=*/false),
                     "prefix must be an integer tensor, got ", dtype_name(prefix->scalar_type()));
    TORCH_CHECK_VALUE(prefix->dim() == 2 && prefix->size(0) == context.size(0) && prefix->size(1) < patch_size,
                      "prefix must have shape [M, r] with M = ", context.size(0), " and r < patch_size = ", patch_size,
                      ", got ", prefix->sizes());
    TORCH_CHECK_VALUE(prefix->device() == context.device(), "prefix is on ", prefix->device(), " but context is on ",
                      context.device());
    if (prefix->numel() > 0) {
      const auto [lo, hi] = at::aminmax(*prefix);
      TORCH_CHECK_VALUE(lo.item<int64_t>() >= 0 && hi.item<int64_t>() < kVocab,
                        "prefix must hold byte values in 0..255, got values in ", lo.item<int64_t>(), "..",
                        hi.item<int64_t>());
    }
  }
  if (byte_table.has_value()) {
    const auto a = context.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    TORCH_CHECK_TYPE(byte_table->scalar_type() == a, "byte_table must be ", dtype_name(a),
                     " (the accumulation dtype of ", dtype_name(context.scalar_type()), "), got ",
                     dtype_name(byte_table->scalar_type()));
    TORCH_CHECK_VALUE(byte_table->sizes() == at::IntArrayRef({kVocab, G}), "byte_table must have shape [256, 3h] = ",
                      at::IntArrayRef({kVocab, G}), ", got ", byte_table->sizes());
    TORCH_CHECK_VALUE(byte_table->device() == context.device(), "byte_table is on ", byte_table->device(),
                      " but context is on ", context.device());
  }
}

Tensor sample_cpu(const Tensor& context, const Tensor& byte_emb, const Tensor& weight_ih, const Tensor& weight_hh,
                  const Tensor& bias_ih, const Tensor& bias_hh, const Tensor& head_weight, const Tensor& head_bias,
                  int64_t patch_size, double temperature, int64_t top_k, const std::optional<Tensor>& prefix,
                  int64_t sos, const std::optional<Tensor>& seed, const std::optional<Tensor>& byte_table) {
  check_sample_inputs(context,
                      {{"byte_emb", &byte_emb}, {"weight_ih", &weight_ih}, {"weight_hh", &weight_hh},
                       {"bias_ih", &bias_ih}, {"bias_hh", &bias_hh}, {"head_weight", &head_weight},
                       {"head_bias", &head_bias}},
                      patch_size, temperature, top_k, sos, prefix, byte_table);
  AGF_CHECK_DEVICE(context, at::kCPU);
  const auto a = acc_type(context.scalar_type());
  const Tensor ctx = acc(context, a), emb = acc(byte_emb, a), w_ih = acc(weight_ih, a), w_hh = acc(weight_hh, a),
               b_ih = acc(bias_ih, a), b_hh = acc(bias_hh, a), hw = acc(head_weight, a), hb = acc(head_bias, a);
  const int64_t M = ctx.size(0), P = patch_size, h = ctx.size(1);
  SampleParams sp{temperature, top_k, 0, 0};
  if (temperature > 0) {
    TORCH_CHECK(seed.has_value() && seed->numel() == 2, "gru_patch_sample: temperature > 0 needs a seed [2]");
    // read in place: two item() calls cost ~1.5 µs more, measured at M = 1
    const Tensor s = seed->to(at::kLong).cpu().contiguous();
    sp.s0 = static_cast<uint32_t>(s.data_ptr<int64_t>()[0]);
    sp.s1 = static_cast<uint32_t>(s.data_ptr<int64_t>()[1]);
  }
  Tensor pre;
  int64_t forced = 0;
  if (prefix.has_value() && prefix->numel() > 0) {
    pre = prefix->to(at::kLong).contiguous();
    forced = pre.size(1);
  }
  Tensor out = at::empty({M, P}, ctx.options().dtype(at::kLong));
  const int threads = std::max(1, std::min<int>(at::get_num_threads(), static_cast<int>(h / 64)));
#if defined(__AVX512F__)
  const bool lanes = a == at::kFloat && M >= kLanesMin && M <= kLanesMax;
#else
  const bool lanes = false;
#endif
  const bool split = !lanes && M <= kSmallM;
  Tensor table;
  if (byte_table.has_value()) {
    table = acc(*byte_table, a);
  } else if (!split) {
    table = agf_gru_patch::byte_table(emb, w_ih, M * P);
  }
  const int64_t* pp = forced ? pre.data_ptr<int64_t>() : nullptr;
#if defined(__AVX512F__)
  if (lanes) {
    sample_lanes(weights<float>(emb, w_ih, w_hh, b_ih, b_hh, table), ctx.data_ptr<float>(), hw.data_ptr<float>(),
                 hb.data_ptr<float>(), M, P, pp, forced, sos, sp, out.data_ptr<int64_t>(), threads);
    return out;
  }
#endif
  AT_DISPATCH_FLOATING_TYPES(a, "gru_patch_sample", [&] {
    using T = scalar_t;
    const auto W = weights<T>(emb, w_ih, w_hh, b_ih, b_hh, table);
    if (split)
      sample_split(W, ctx.data_ptr<T>(), hw.data_ptr<T>(), hb.data_ptr<T>(), M, P, pp, forced, sos, sp,
                   out.data_ptr<int64_t>(), threads);
    else
      sample_tiled(W, ctx.data_ptr<T>(), hw.data_ptr<T>(), hb.data_ptr<T>(), M, P, pp, forced, sos, sp,
                   out.data_ptr<int64_t>());
  });
  return out;
}

}  // namespace agf_gru_patch

TORCH_LIBRARY_FRAGMENT(agiformer_kernels, m) {
  m.def(
      "gru_patch_decode_fwd(Tensor context, Tensor prev_bytes, Tensor byte_emb, Tensor weight_ih, "
      "Tensor weight_hh, Tensor bias_ih, Tensor bias_hh, bool save) -> (Tensor hidden, Tensor gates, "
      "Tensor hidden_acc)");
  m.def(
      "gru_patch_decode_bwd(Tensor grad_hidden, Tensor context, Tensor prev_bytes, Tensor byte_emb, "
      "Tensor weight_ih, Tensor weight_hh, Tensor hidden, Tensor gates) -> (Tensor, Tensor, Tensor, Tensor, "
      "Tensor, Tensor)");
  m.def(
      "gru_patch_loss_fwd(Tensor context, Tensor targets, Tensor byte_emb, Tensor weight_ih, Tensor weight_hh, "
      "Tensor bias_ih, Tensor bias_hh, Tensor head_weight, Tensor head_bias, int sos, bool save, bool head_grad) "
      "-> (Tensor loss, Tensor lse, Tensor hidden, Tensor gates, Tensor dh_head, Tensor dw_head, Tensor db_head)");
  m.def(
      "gru_patch_loss_bwd(Tensor grad_loss, Tensor context, Tensor targets, Tensor byte_emb, Tensor weight_ih, "
      "Tensor weight_hh, Tensor head_weight, Tensor head_bias, Tensor hidden, Tensor gates, Tensor lse, int sos) "
      "-> Tensor[]");
  m.def(
      "gru_patch_sample(Tensor context, Tensor byte_emb, Tensor weight_ih, Tensor weight_hh, Tensor bias_ih, "
      "Tensor bias_hh, Tensor head_weight, Tensor head_bias, int patch_size, float temperature, int top_k, "
      "Tensor? prefix, int sos, Tensor? seed, Tensor? byte_table) -> Tensor");
}

TORCH_LIBRARY_IMPL(agiformer_kernels, CPU, m) {
  m.impl("gru_patch_decode_fwd", &agf_gru_patch::decode_fwd_cpu);
  m.impl("gru_patch_decode_bwd", &agf_gru_patch::decode_bwd_cpu);
  m.impl("gru_patch_loss_fwd", &agf_gru_patch::loss_fwd_cpu);
  m.impl("gru_patch_loss_bwd", &agf_gru_patch::loss_bwd_cpu);
  m.impl("gru_patch_sample", &agf_gru_patch::sample_cpu);
}
