// Vectors and register tiles of the C++ CPU kernels, sized for the ISA the library is compiled for.
//
// The width and the number of vector registers come from the compiler's predefined macros, so one
// source compiles to 64-byte vectors on AVX-512, 32-byte on AVX/AVX2 and 16-byte on NEON and SSE.
// A tile sized for one ISA does not carry over: 4 rows × 4 vectors of 64 bytes on AVX2 become 32 ymm
// accumulators in 16 registers, and GCC keeps vectors wider than the machine's in memory.
// The arithmetic is written with GCC/Clang vector extensions, so only the sizes here are per ISA.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

// The tiles are written as a·b + c: contract them into FMAs even in ISO C++ mode (-std=c++17 turns
// GCC's default contraction off). Applies to the rest of the including file.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("fp-contract=fast")
#elif defined(__clang__)
#pragma clang fp contract(fast)
#endif

namespace agf_simd {

// kVecBytes: one vector register; kVecRegs: how many the ISA has; kTileRows: the rows of a GEMM register
// tile (rows × tile_vecs(rows) accumulator vectors, below), chosen per ISA.
#if defined(__AVX512F__)
constexpr int kVecBytes = 64, kVecRegs = 32, kTileRows = 4;  // 4 × 4 tiles
#elif defined(__AVX__)
// 6 × 2 tiles: 15 of 16 ymm, and the 64-float rows of linear attention's chunks split into whole tiles;
// 4 × 3 would take all 16 registers and split those rows 3 + 3 + 2
constexpr int kVecBytes = 32, kVecRegs = 16, kTileRows = 6;
#elif defined(__aarch64__) || defined(__ARM_NEON)
constexpr int kVecBytes = 16, kVecRegs = 32, kTileRows = 4;  // 4 × 4 tiles: 21 of 32 q registers
#elif defined(__SSE2__)
constexpr int kVecBytes = 16, kVecRegs = 16, kTileRows = 6;  // 6 × 2 tiles, as AVX2
#else
// No vector unit the compiler knows of: 16-byte vectors lower to scalar code (2 × 2 tiles: 16 floats).
constexpr int kVecBytes = 16, kVecRegs = 8, kTileRows = 2;
#endif

// The accumulator vectors per row of a tile with `rows` rows: per k-step a tile loads that many vectors of
// B and broadcasts one value of A, so rows·v + v + 1 registers must fit. At most 4: the AVX-512 tile the
// kernels were tuned with (one 64-float row).
constexpr int tile_vecs(int rows) { return std::min(4, (kVecRegs - 1) / (rows + 1)); }
static_assert(tile_vecs(kTileRows) >= 1, "a register tile must fit the register file");

template <typename T>
struct Vec;
template <>
struct Vec<float> {
  typedef float type __attribute__((vector_size(kVecBytes)));
  typedef int32_t mask __attribute__((vector_size(kVecBytes)));  // what comparing two `type`s yields
  static constexpr int W = kVecBytes / 4;
};
template <>
struct Vec<double> {
  typedef double type __attribute__((vector_size(kVecBytes)));
  typedef int64_t mask __attribute__((vector_size(kVecBytes)));
  static constexpr int W = kVecBytes / 8;
};
template <typename T>
using vec_t = typename Vec<T>::type;

template <typename T>
inline vec_t<T> vload(const T* p) {
  vec_t<T> v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
template <typename T>
inline void vstore(T* p, const vec_t<T>& v) {
  std::memcpy(p, &v, sizeof(v));
}

template <typename T>
inline T hsum(const vec_t<T>& v) {
  T s = 0;
  for (int i = 0; i < Vec<T>::W; ++i) s += v[i];
  return s;
}

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// Ask for bytes at p in the cache ahead of use (`write`: to be written, so the line arrives owned).
// The kernels read and write one row per token of [B, L, H, D] tensors, H·D elements apart: strides
// too long for the hardware prefetchers, which leave every row a cache miss the loads (or, once the
// store buffer is full, the stores) wait on.
inline void prefetch(const void* p, int64_t bytes, bool write = false) {
  const char* c = static_cast<const char*>(p);
  for (int64_t off = 0; off < bytes; off += 64) {
    if (write)
      __builtin_prefetch(c + off, 1);
    else
      __builtin_prefetch(c + off, 0);
  }
}

// exp in fp32: Cephes expf (~1 ulp) on x clamped to [-87.3, 89], the 2^n scaling done on the exponent
// bits. NaN stays NaN. Below -87.3 it gives exp(-87.3), a normal float (so exp(-inf) is 1.2e-38, not 0).
// Above 88.38, n = 128 makes the scale +inf: exp(+inf) is +inf, and 0·exp(+inf) NaN as in PyTorch (the
// clamp at 89 keeps n <= 128; 129 would carry into the sign bit). Double precision goes lane by lane.
inline vec_t<float> vexp(vec_t<float> x) {
  using V = vec_t<float>;
  using I = Vec<float>::mask;
  x = x < V{} - 87.3f ? V{} - 87.3f : x;
  x = x > V{} + 89.0f ? V{} + 89.0f : x;
  const V round = V{} + 12582912.0f;  // 1.5 · 2^23: adding and subtracting rounds to nearest
  const V n = (x * 1.44269504088896341f + round) - round;
  const V r = x - n * 0.693359375f + n * 2.12194440e-4f;
  V p = V{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const V y = p * r * r + r + 1.0f;
  const I bits = (__builtin_convertvector(n, I) + 127) << 23;
  V scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return y * scale;
}
inline vec_t<double> vexp(vec_t<double> x) {
  for (int i = 0; i < Vec<double>::W; ++i) x[i] = std::exp(x[i]);
  return x;
}

// Whether x[0 .. n) holds no inf and no NaN: x - x is 0 for a finite x, NaN otherwise. Four accumulators,
// so the adds do not wait on each other.
template <typename T>
inline bool all_finite(const T* x, int64_t n) {
  constexpr int W = Vec<T>::W;
  vec_t<T> acc[4] = {};
  int64_t i = 0;
  for (; i + 4 * W <= n; i += 4 * W)
    for (int u = 0; u < 4; ++u) {
      const vec_t<T> v = vload(x + i + u * W);
      acc[u] += v - v;
    }
  for (; i + W <= n; i += W) {
    const vec_t<T> v = vload(x + i);
    acc[0] += v - v;
  }
  T s = hsum<T>((acc[0] + acc[1]) + (acc[2] + acc[3]));
  for (; i < n; ++i) s += x[i] - x[i];
  return s == 0;
}

// ---- Register-tiled small GEMMs on thread-local blocks -------------------------------------------
// C[MR × NV·W] (+)= Σ_{p0 <= p < p1} A(i, p)·B[p, :], with B and C row-major (leading dims ldb, ldc)
// and A(i, p) = A[i·sa_i + p·sa_p], so a transposed A is read in place. Per p: NV vector loads of B,
// MR broadcasts of A, MR·NV FMAs into accumulators that stay in registers.
template <typename T, int MR, int NV>
inline void gemm_tile(int64_t p0, int64_t p1, const T* __restrict__ A, int64_t sa_i, int64_t sa_p,
                      const T* __restrict__ B, int64_t ldb, T* __restrict__ C, int64_t ldc, bool accumulate) {
  using V = vec_t<T>;
  constexpr int W = Vec<T>::W;
  V c[MR][NV];
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < NV; ++v) c[i][v] = accumulate ? vload(C + i * ldc + v * W) : V{};
  for (int64_t p = p0; p < p1; ++p) {
    V b[NV];
    for (int v = 0; v < NV; ++v) b[v] = vload(B + p * ldb + v * W);
    for (int i = 0; i < MR; ++i) {
      const T a = A[i * sa_i + p * sa_p];
      for (int v = 0; v < NV; ++v) c[i][v] += a * b[v];
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < NV; ++v) vstore(C + i * ldc + v * W, c[i][v]);
}

// MR rows of C over its vectors [v0, v1): whole tiles of NV vectors, then one narrower tile.
template <typename T, int MR, int NV = tile_vecs(MR)>
inline void gemm_strip(const T* A, int64_t sa_i, int64_t sa_p, const T* B, int64_t ldb, T* C, int64_t ldc,
                       int64_t p0, int64_t p1, int64_t v0, int64_t v1, bool accumulate) {
  constexpr int W = Vec<T>::W;
  if (p1 <= p0 && accumulate) return;
  int64_t v = v0;
  for (; v + NV <= v1; v += NV)
    gemm_tile<T, MR, NV>(p0, p1, A, sa_i, sa_p, B + v * W, ldb, C + v * W, ldc, accumulate);
  if constexpr (NV > 1)
    if (v < v1) gemm_strip<T, MR, NV - 1>(A, sa_i, sa_p, B, ldb, C, ldc, p0, p1, v, v1, accumulate);
}

// The same for rows < MR (the last rows of a block): the tile with exactly that many rows.
template <typename T, int MR = kTileRows>
inline void gemm_rows(int64_t rows, const T* A, int64_t sa_i, int64_t sa_p, const T* B, int64_t ldb, T* C,
                      int64_t ldc, int64_t p0, int64_t p1, int64_t v0, int64_t v1, bool accumulate) {
  if constexpr (MR > 1)
    if (rows < MR) return gemm_rows<T, MR - 1>(rows, A, sa_i, sa_p, B, ldb, C, ldc, p0, p1, v0, v1, accumulate);
  gemm_strip<T, MR>(A, sa_i, sa_p, B, ldb, C, ldc, p0, p1, v0, v1, accumulate);
}

}  // namespace agf_simd
