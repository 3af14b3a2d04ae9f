// Learned-query pooling of variable-length segments on the CPU: forward and backward (docs/ops.md §1.5).
//
// Task = one segment (all heads): positions offsets[s] .. offsets[s+1] - 1 of k, v [T, H, *]. Per head, the Q·n
// scores go to a per-thread buffer (n: the segment's length), then a softmax per query and the weighted sum of
// the values; every row of k and v is read once per head, so work is O(T·Q·H·(D + Dv)) and nothing of size
// [S·Q, T] exists. Dot products and axpys run in vectors (common/cpu_simd.h).
//
// Backward: each position belongs to one segment, so the task that owns a segment writes its rows of dk and dv
// alone; d_queries sums over all segments, in one accumulator per thread, added up at the end.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "checks.h"
#include "cpu_simd.h"

namespace {

using agf_simd::Vec;
using agf_simd::vec_t;
using agf_simd::vload;
using agf_simd::vstore;

template <typename T> inline T dot(const T* a, const T* b, int64_t n) {
  constexpr int W = Vec<T>::W;
  vec_t<T> acc0 = {}, acc1 = {};
  int64_t i = 0;
  for (; i + 2 * W <= n; i += 2 * W) {
    acc0 += vload(a + i) * vload(b + i);
    acc1 += vload(a + i + W) * vload(b + i + W);
  }
  for (; i + W <= n; i += W) acc0 += vload(a + i) * vload(b + i);
  T s = agf_simd::hsum<T>(acc0 + acc1);
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

// y += a x
template <typename T> inline void axpy(T* y, T a, const T* x, int64_t n) {
  constexpr int W = Vec<T>::W;
  int64_t i = 0;
  for (; i + W <= n; i += W) vstore(y + i, vload(y + i) + a * vload(x + i));
  for (; i < n; ++i) y[i] += a * x[i];
}

// offsets must rise strictly from 0 to T: every row of k, v belongs to exactly one segment.
void check_offsets(const at::Tensor& offsets, int64_t T) {
  AGF_CHECK_DTYPE(offsets, at::kInt);
  AGF_CHECK_DIM(offsets, 1);
  AGF_CHECK_CONTIGUOUS(offsets);
  TORCH_CHECK(offsets.numel() >= 2, "offsets must hold S + 1 >= 2 entries");
  const int32_t* o = offsets.data_ptr<int32_t>();
  const int64_t S = offsets.numel() - 1;
  TORCH_CHECK(o[0] == 0 && o[S] == T, "offsets must run from 0 to T = ", T);
  for (int64_t s = 0; s < S; ++s) TORCH_CHECK(o[s + 1] > o[s], "offsets must rise strictly (no empty segment)");
}

void check_inputs(const at::Tensor& queries, const at::Tensor& k, const at::Tensor& v, const at::Tensor& offsets) {
  AGF_CHECK_DIM(queries, 3);
  AGF_CHECK_DIM(k, 3);
  AGF_CHECK_DIM(v, 3);
  AGF_CHECK_DEVICE(queries, at::kCPU);
  TORCH_CHECK(k.device() == queries.device() && v.device() == queries.device(), "queries, k, v must be on one device");
  TORCH_CHECK(k.scalar_type() == queries.scalar_type() && v.scalar_type() == queries.scalar_type(),
              "queries, k, v must share a dtype");
  TORCH_CHECK(k.size(1) == queries.size(1) && k.size(2) == queries.size(2), "k must be [T, H, D] of queries");
  TORCH_CHECK(v.size(0) == k.size(0) && v.size(1) == k.size(1), "v must be [T, H, Dv] of k");
  check_offsets(offsets, k.size(0));
}

template <typename T>
void fwd_kernel(const T* qs, const T* k, const T* v, const int32_t* off, T* out, T* lse, int64_t S, int64_t Q,
                int64_t H, int64_t D, int64_t Dv) {
  at::parallel_for(0, S, 16, [&](int64_t s0, int64_t s1) {
    std::vector<T> sc, acc(Q * Dv), m(Q), l(Q);
    for (int64_t s = s0; s < s1; ++s) {
      const int64_t t0 = off[s], n = off[s + 1] - t0;
      sc.resize(n * Q);
      for (int64_t h = 0; h < H; ++h) {
        std::fill(m.begin(), m.end(), -std::numeric_limits<T>::infinity());
        for (int64_t t = 0; t < n; ++t) {
          const T* kt = k + ((t0 + t) * H + h) * D;
          for (int64_t q = 0; q < Q; ++q) {
            const T x = dot(qs + (q * H + h) * D, kt, D);
            sc[t * Q + q] = x;
            m[q] = std::max(m[q], x);
          }
        }
        std::fill(l.begin(), l.end(), T(0));
        std::fill(acc.begin(), acc.end(), T(0));
        for (int64_t t = 0; t < n; ++t) {
          const T* vt = v + ((t0 + t) * H + h) * Dv;
          for (int64_t q = 0; q < Q; ++q) {
            const T p = std::exp(sc[t * Q + q] - m[q]);
            l[q] += p;
            axpy(acc.data() + q * Dv, p, vt, Dv);
          }
        }
        for (int64_t q = 0; q < Q; ++q) {
          T* o = out + ((s * Q + q) * H + h) * Dv;
          const T inv = T(1) / l[q];
          for (int64_t e = 0; e < Dv; ++e) o[e] = acc[q * Dv + e] * inv;
          lse[(s * Q + q) * H + h] = m[q] + std::log(l[q]);
        }
      }
    }
  });
}

template <typename T>
void bwd_kernel(const T* qs, const T* k, const T* v, const int32_t* off, const T* dout, const T* out, const T* lse,
                T* dq, T* dk, T* dv, int64_t S, int64_t Q, int64_t H, int64_t D, int64_t Dv, T scale) {
  const int nthreads = at::get_num_threads();
  std::vector<std::vector<T>> dq_acc(nthreads);  // per thread: sum over its segments of ds·k, [Q, H, D]
  at::parallel_for(0, S, 16, [&](int64_t s0, int64_t s1) {
    std::vector<T>& acc = dq_acc[at::get_thread_num()];
    if (acc.empty()) acc.assign(Q * H * D, T(0));
    std::vector<T> delta(Q);
    for (int64_t s = s0; s < s1; ++s) {
      const int64_t t0 = off[s], n = off[s + 1] - t0;
      for (int64_t h = 0; h < H; ++h) {
        for (int64_t q = 0; q < Q; ++q) {
          const int64_t r = ((s * Q + q) * H + h) * Dv;
          delta[q] = dot(dout + r, out + r, Dv);  // sum_t p_t dp_t
        }
        for (int64_t t = 0; t < n; ++t) {
          const int64_t row = (t0 + t) * H + h;
          const T* kt = k + row * D;
          const T* vt = v + row * Dv;
          T* dkt = dk + row * D;
          T* dvt = dv + row * Dv;
          std::fill(dkt, dkt + D, T(0));
          std::fill(dvt, dvt + Dv, T(0));
          for (int64_t q = 0; q < Q; ++q) {
            const T* qq = qs + (q * H + h) * D;
            const T* g = dout + ((s * Q + q) * H + h) * Dv;
            const T p = std::exp(dot(qq, kt, D) - lse[(s * Q + q) * H + h]);
            const T ds = p * (dot(g, vt, Dv) - delta[q]);
            axpy(dvt, p, g, Dv);
            axpy(dkt, ds, qq, D);  // qq holds scale·queries
            axpy(acc.data() + (q * H + h) * D, ds, kt, D);
          }
        }
      }
    }
  });
  std::fill(dq, dq + Q * H * D, T(0));
  for (const auto& acc : dq_acc)
    if (!acc.empty())
      for (int64_t i = 0; i < Q * H * D; ++i) dq[i] += acc[i] * scale;
}

std::tuple<at::Tensor, at::Tensor> segment_pool_fwd_cpu(const at::Tensor& queries_, const at::Tensor& k_,
                                                        const at::Tensor& v_, const at::Tensor& offsets_,
                                                        double scale) {
  check_inputs(queries_, k_, v_, offsets_);
  const at::Tensor k = k_.contiguous(), v = v_.contiguous(), offsets = offsets_.contiguous();
  const at::Tensor qs = (queries_ * scale).contiguous();
  const int64_t Q = qs.size(0), H = qs.size(1), D = qs.size(2), Dv = v.size(2), S = offsets.numel() - 1;
  at::Tensor out = at::empty({S, Q, H, Dv}, k.options());
  at::Tensor lse = at::empty({S, Q, H}, k.options());
  AT_DISPATCH_FLOATING_TYPES(k.scalar_type(), "segment_pool_fwd", [&] {
    fwd_kernel<scalar_t>(qs.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(),
                         offsets.data_ptr<int32_t>(), out.data_ptr<scalar_t>(), lse.data_ptr<scalar_t>(), S, Q, H, D,
                         Dv);
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> segment_pool_bwd_cpu(const at::Tensor& grad_out_,
                                                                    const at::Tensor& queries_, const at::Tensor& k_,
                                                                    const at::Tensor& v_, const at::Tensor& offsets_,
                                                                    const at::Tensor& out_, const at::Tensor& lse_,
                                                                    double scale) {
  check_inputs(queries_, k_, v_, offsets_);
  const int64_t Q = queries_.size(0), H = queries_.size(1), D = queries_.size(2), Dv = v_.size(2);
  const int64_t S = offsets_.numel() - 1;
  TORCH_CHECK(grad_out_.sizes() == at::IntArrayRef({S, Q, H, Dv}) && out_.sizes() == grad_out_.sizes(),
              "grad_out and out must be [S, Q, H, Dv]");
  TORCH_CHECK(lse_.sizes() == at::IntArrayRef({S, Q, H}), "lse must be [S, Q, H]");
  const at::ScalarType dt = k_.scalar_type();
  const at::Tensor k = k_.contiguous(), v = v_.contiguous(), offsets = offsets_.contiguous();
  const at::Tensor qs = (queries_ * scale).contiguous();
  const at::Tensor dout = grad_out_.to(dt).contiguous(), out = out_.to(dt).contiguous(), lse = lse_.to(dt).contiguous();
  at::Tensor dq = at::empty({Q, H, D}, k.options());
  at::Tensor dk = at::empty(k.sizes(), k.options());
  at::Tensor dv = at::empty(v.sizes(), v.options());
  AT_DISPATCH_FLOATING_TYPES(dt, "segment_pool_bwd", [&] {
    bwd_kernel<scalar_t>(qs.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(),
                         offsets.data_ptr<int32_t>(), dout.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
                         lse.data_ptr<scalar_t>(), dq.data_ptr<scalar_t>(), dk.data_ptr<scalar_t>(),
                         dv.data_ptr<scalar_t>(), S, Q, H, D, Dv, static_cast<scalar_t>(scale));
  });
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(agiformer_kernels, m) {
  m.def("segment_pool_fwd(Tensor queries, Tensor k, Tensor v, Tensor offsets, float scale) -> (Tensor, Tensor)");
  m.def(
      "segment_pool_bwd(Tensor grad_out, Tensor queries, Tensor k, Tensor v, Tensor offsets, Tensor out, Tensor lse, "
      "float scale) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(agiformer_kernels, CPU, m) {
  m.impl("segment_pool_fwd", &segment_pool_fwd_cpu);
  m.impl("segment_pool_bwd", &segment_pool_bwd_cpu);
}
