// Nearest-code search by L2 and the EMA codebook update on the CPU (docs/ops.md §1.6).
//
// Search: task = a block of RB = 96 vectors of z. The codebook is packed once per call as -2·Cᵀ [D][Kp]
// (Kp: K rounded up to KT, pad columns zero) with |c|² beside it (pad: +inf, never chosen). Per tile of KT = 128
// codes, register-tiled GEMMs (common/cpu_simd.h) give -2 z·c for the block's rows into a [RB][KT] buffer that
// stays in L1/L2; adding |c|² ranks the codes (|z|² is the same for all of a row's codes), and a running minimum
// per row and vector lane keeps the first of equal scores. Lanes are merged at the end, lowest index first among
// equal scores, so ties go to the lowest index as torch.argmin. Memory besides the inputs: O(K·D + RB·KT) per
// call, nothing of size [N, K]. The chosen code's distance is recomputed as sum (z - c)², free of the
// cancellation in |z|² - 2 z·c + |c|².
//
// EMA update: counts by one scan of index; sums by column blocks of 16 features, one task each, so no two tasks
// write one element.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "checks.h"
#include "cpu_simd.h"

namespace {

using agf_simd::round_up;
using agf_simd::Vec;
using agf_simd::vec_t;
using agf_simd::vload;
using agf_simd::vstore;

constexpr int RB = 96;   // vectors of z per task: a multiple of every ISA's tile rows (2, 4, 6)
constexpr int KT = 128;  // codes per tile: a multiple of every vector width
static_assert(RB % agf_simd::kTileRows == 0, "row blocks hold whole register tiles");

template <typename T>
void nearest_kernel(const T* z, const T* cbt, const T* cn, const T* codebook, int64_t N, int64_t K, int64_t Kp,
                    int64_t D, int64_t* index, T* dist) {
  using Vt = vec_t<T>;
  using It = typename Vec<T>::mask;
  using Ei = std::conditional_t<sizeof(T) == 4, int32_t, int64_t>;  // It's lanes
  constexpr int W = Vec<T>::W;
  constexpr int NV = KT / W;
  It lane;
  for (int j = 0; j < W; ++j) lane[j] = j;
  const int64_t blocks = (N + RB - 1) / RB;
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    std::vector<T> buf(static_cast<size_t>(RB) * KT), best(static_cast<size_t>(RB) * W);
    std::vector<It> best_i(RB);
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t r0 = blk * RB, nr = std::min<int64_t>(RB, N - r0);
      const T* zb = z + r0 * D;
      std::fill(best.begin(), best.end(), std::numeric_limits<T>::infinity());
      std::fill(best_i.begin(), best_i.end(), It{});
      for (int64_t c0 = 0; c0 < Kp; c0 += KT) {
        for (int64_t i = 0; i < nr; i += agf_simd::kTileRows)
          agf_simd::gemm_rows<T>(std::min<int64_t>(agf_simd::kTileRows, nr - i), zb + i * D, D, 1, cbt + c0, Kp,
                                 buf.data() + i * KT, KT, 0, D, 0, NV, false);
        for (int64_t r = 0; r < nr; ++r) {
          Vt b = vload(best.data() + r * W);
          It bi = best_i[r];
          for (int v = 0; v < NV; ++v) {
            const Vt d = vload(cn + c0 + v * W) + vload(buf.data() + r * KT + v * W);
            const auto better = d < b;  // strict: an equal score later keeps the earlier code
            b = better ? d : b;
            bi = better ? lane + static_cast<Ei>(c0 + v * W) : bi;
          }
          vstore(best.data() + r * W, b);
          best_i[r] = bi;
        }
      }
      for (int64_t r = 0; r < nr; ++r) {
        T bv = std::numeric_limits<T>::infinity();
        int64_t bk = 0;
        for (int j = 0; j < W; ++j) {
          const T x = best[r * W + j];
          const int64_t k = best_i[r][j];
          if (x < bv || (x == bv && k < bk)) {
            bv = x;
            bk = k;
          }
        }
        if (!(bv < std::numeric_limits<T>::infinity())) {  // no finite score (inf or NaN input): first code
          bk = 0;
        }
        index[r0 + r] = bk;
        const T* zr = zb + r * D;
        const T* c = codebook + bk * D;
        T s = 0;
        for (int64_t d = 0; d < D; ++d) s += (zr[d] - c[d]) * (zr[d] - c[d]);
        dist[r0 + r] = s;
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> vq_nearest_fwd_cpu(const at::Tensor& z_, const at::Tensor& codebook_) {
  AGF_CHECK_DIM(z_, 2);
  AGF_CHECK_DIM(codebook_, 2);
  AGF_CHECK_DEVICE(z_, at::kCPU);
  AGF_CHECK_DEVICE(codebook_, at::kCPU);
  TORCH_CHECK(z_.scalar_type() == codebook_.scalar_type(), "z and codebook must share a dtype");
  TORCH_CHECK(z_.size(1) == codebook_.size(1), "codebook must be [K, D] of z");
  TORCH_CHECK(codebook_.size(0) >= 1 && codebook_.size(0) < (int64_t(1) << 31), "codebook must have 1 <= K < 2**31");
  const at::Tensor z = z_.contiguous(), codebook = codebook_.contiguous();
  const int64_t N = z.size(0), D = z.size(1), K = codebook.size(0), Kp = round_up(K, KT);
  at::Tensor index = at::empty({N}, z.options().dtype(at::kLong));
  at::Tensor dist = at::empty({N}, z.options());
  if (N == 0) return {index, dist};
  at::Tensor cbt = at::zeros({D, Kp}, z.options());
  cbt.narrow(1, 0, K).copy_(codebook.t() * -2);
  at::Tensor cn = at::full({Kp}, std::numeric_limits<double>::infinity(), z.options());
  cn.narrow(0, 0, K).copy_(codebook.square().sum(1));
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "vq_nearest_fwd", [&] {
    nearest_kernel<scalar_t>(z.data_ptr<scalar_t>(), cbt.data_ptr<scalar_t>(), cn.data_ptr<scalar_t>(),
                             codebook.data_ptr<scalar_t>(), N, K, Kp, D, index.data_ptr<int64_t>(),
                             dist.data_ptr<scalar_t>());
  });
  return {index, dist};
}

template <typename T>
void ema_kernel(const T* z, const int64_t* index, T* counts, T* sums, T* codebook, int64_t N, int64_t K, int64_t D,
                T decay, T eps) {
  std::vector<T> batch(K, T(0));
  for (int64_t i = 0; i < N; ++i) batch[index[i]] += T(1);
  for (int64_t k = 0; k < K; ++k) counts[k] = counts[k] * decay + batch[k] * (T(1) - decay);
  constexpr int64_t CB = 16;  // features per task
  at::parallel_for(0, (D + CB - 1) / CB, 1, [&](int64_t j0, int64_t j1) {
    std::vector<T> acc(K * CB);
    for (int64_t j = j0; j < j1; ++j) {
      const int64_t d0 = j * CB, w = std::min(CB, D - d0);
      std::fill(acc.begin(), acc.end(), T(0));
      for (int64_t i = 0; i < N; ++i) {
        T* a = acc.data() + index[i] * CB;
        const T* zi = z + i * D + d0;
        for (int64_t e = 0; e < w; ++e) a[e] += zi[e];
      }
      for (int64_t k = 0; k < K; ++k)
        for (int64_t e = 0; e < w; ++e) {
          T& s = sums[k * D + d0 + e];
          s = s * decay + acc[k * CB + e] * (T(1) - decay);
        }
    }
  });
  T n = 0;
  for (int64_t k = 0; k < K; ++k) n += counts[k];
  at::parallel_for(0, K, 256, [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) {
      const T smoothed = (counts[k] + eps) / (n + static_cast<T>(K) * eps) * n;
      for (int64_t d = 0; d < D; ++d) codebook[k * D + d] = sums[k * D + d] / smoothed;
    }
  });
}

at::Tensor vq_ema_update_cpu(const at::Tensor& z_, const at::Tensor& index_, at::Tensor& counts, at::Tensor& sums,
                             double decay, double eps) {
  AGF_CHECK_DIM(z_, 2);
  AGF_CHECK_DIM(counts, 1);
  AGF_CHECK_DIM(sums, 2);
  AGF_CHECK_DEVICE(z_, at::kCPU);
  AGF_CHECK_INPUT(counts, at::kCPU);
  AGF_CHECK_INPUT(sums, at::kCPU);
  AGF_CHECK_DTYPE(index_, at::kLong);
  TORCH_CHECK(z_.scalar_type() == sums.scalar_type() && counts.scalar_type() == sums.scalar_type(),
              "z, counts and sums must share a dtype");
  const int64_t N = z_.size(0), D = z_.size(1), K = counts.size(0);
  TORCH_CHECK(sums.size(0) == K && sums.size(1) == D, "sums must be [K, D]");
  TORCH_CHECK(index_.numel() == N, "index must have N entries");
  const at::Tensor z = z_.contiguous(), index = index_.contiguous();
  const int64_t* idx = index.data_ptr<int64_t>();
  for (int64_t i = 0; i < N; ++i) TORCH_CHECK(idx[i] >= 0 && idx[i] < K, "index must lie in [0, K)");
  at::Tensor codebook = at::empty({K, D}, sums.options());
  AT_DISPATCH_FLOATING_TYPES(sums.scalar_type(), "vq_ema_update", [&] {
    ema_kernel<scalar_t>(z.data_ptr<scalar_t>(), idx, counts.data_ptr<scalar_t>(), sums.data_ptr<scalar_t>(),
                         codebook.data_ptr<scalar_t>(), N, K, D, static_cast<scalar_t>(decay),
                         static_cast<scalar_t>(eps));
  });
  return codebook;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(agiformer_kernels, m) {
  m.def("vq_nearest_fwd(Tensor z, Tensor codebook) -> (Tensor, Tensor)");
  m.def(
      "vq_ema_update(Tensor z, Tensor index, Tensor(a!) counts, Tensor(b!) sums, float decay, float eps) -> Tensor");
}

TORCH_LIBRARY_IMPL(agiformer_kernels, CPU, m) {
  m.impl("vq_nearest_fwd", &vq_nearest_fwd_cpu);
  m.impl("vq_ema_update", &vq_ema_update_cpu);
}
