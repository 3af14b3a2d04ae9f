// CUDA implementations of the segment_pool ops declared in segment_pool.cpp; the kernels are in segment_pool.cu.
// Compiled only in CUDA builds. offsets' values were checked by the public function (docs/ops.md §1.5).
#ifdef WITH_CUDA

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

#include "checks.h"
#include "cuda_dtype.h"
#include "segment_pool_cuda.h"

namespace {

agf_segpool::DType dtype_of(const at::Tensor& t) {
  return agf::dtype_of<agf_segpool::DType>(t.scalar_type(), "segment pooling");
}

// A view the kernels can index by (t, h) strides: the last dimension must be contiguous.
at::Tensor rows_view(const at::Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

agf_segpool::Rows rows(const at::Tensor& t) { return {t.data_ptr(), t.stride(0), t.stride(1)}; }

void check_inputs(const at::Tensor& queries, const at::Tensor& k, const at::Tensor& v, const at::Tensor& offsets) {
  AGF_CHECK_DIM(queries, 3);
  AGF_CHECK_DIM(k, 3);
  AGF_CHECK_DIM(v, 3);
  AGF_CHECK_DEVICE(queries, at::kCUDA);
  TORCH_CHECK(k.device() == queries.device() && v.device() == queries.device() && offsets.device() == queries.device(),
              "queries, k, v, offsets must be on one device");
  TORCH_CHECK(k.scalar_type() == queries.scalar_type() && v.scalar_type() == queries.scalar_type(),
              "queries, k, v must share a dtype");
  TORCH_CHECK(k.size(1) == queries.size(1) && k.size(2) == queries.size(2), "k must be [T, H, D] of queries");
  TORCH_CHECK(v.size(0) == k.size(0) && v.size(1) == k.size(1), "v must be [T, H, Dv] of k");
  TORCH_CHECK(queries.size(0) >= 1 && queries.size(0) <= agf_segpool::kMaxQueries, "queries: Q in 1..",
              agf_segpool::kMaxQueries);
  TORCH_CHECK(queries.size(1) >= 1 && queries.size(1) <= 65535, "queries: H in 1..65535");
  TORCH_CHECK(std::max(k.size(2), v.size(2)) <= agf_segpool::kMaxHeadDim && k.size(2) >= 1 && v.size(2) >= 1,
              "head dims in 1..", agf_segpool::kMaxHeadDim);
  AGF_CHECK_DTYPE(offsets, at::kInt);
  AGF_CHECK_DIM(offsets, 1);
  TORCH_CHECK(offsets.numel() >= 2, "offsets must hold S + 1 >= 2 entries");
  TORCH_CHECK(k.size(0) < (int64_t(1) << 31) && offsets.numel() <= (int64_t(1) << 31), "input too large");
}

std::tuple<at::Tensor, at::Tensor> segment_pool_fwd_cuda(const at::Tensor& queries_, const at::Tensor& k_,
                                                         const at::Tensor& v_, const at::Tensor& offsets_,
                                                         double scale) {
  check_inputs(queries_, k_, v_, offsets_);
  const c10::cuda::CUDAGuard guard(queries_.device());
  const at::Tensor queries = queries_.contiguous(), k = rows_view(k_), v = rows_view(v_);
  const at::Tensor offsets = offsets_.contiguous();
  const int64_t Q = queries.size(0), H = queries.size(1), D = queries.size(2), Dv = v.size(2);
  const int64_t S = offsets.numel() - 1;
  at::Tensor out = at::empty({S, Q, H, Dv}, queries.options());
  at::Tensor lse = at::empty({S, Q, H}, queries.options().dtype(at::kFloat));
  agf_segpool::FwdParams p{queries.data_ptr(), rows(k), rows(v), offsets.data_ptr<int32_t>(), out.data_ptr(),
                           lse.data_ptr<float>(), static_cast<int>(S), static_cast<int>(Q), static_cast<int>(H),
                           static_cast<int>(D), static_cast<int>(Dv), static_cast<float>(scale)};
  agf::check_launch(agf_segpool::fwd(p, dtype_of(queries), c10::cuda::getCurrentCUDAStream()), "segment_pool_fwd");
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> segment_pool_bwd_cuda(const at::Tensor& grad_out_,
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
  TORCH_CHECK(grad_out_.device() == queries_.device() && out_.device() == queries_.device() &&
                  lse_.device() == queries_.device(),
              "grad_out, out, lse must be on the device of queries");
  const c10::cuda::CUDAGuard guard(queries_.device());
  const at::ScalarType dt = queries_.scalar_type();
  const at::Tensor queries = queries_.contiguous(), k = rows_view(k_), v = rows_view(v_);
  const at::Tensor offsets = offsets_.contiguous();
  const at::Tensor grad_out = grad_out_.to(dt).contiguous(), out = out_.to(dt).contiguous();
  const at::Tensor lse = lse_.to(at::kFloat).contiguous();
  const int64_t partials = std::min<int64_t>(S, agf_segpool::kMaxPartials);
  at::Tensor dq = at::empty({Q, H, D}, queries.options());
  at::Tensor dk = at::empty({k.size(0), H, D}, queries.options());
  at::Tensor dv = at::empty({v.size(0), H, Dv}, queries.options());
  at::Tensor dq_partial = at::empty({partials, Q, H, D}, queries.options().dtype(at::kFloat));
  agf_segpool::BwdParams p{grad_out.data_ptr(), out.data_ptr(), lse.data_ptr<float>(), queries.data_ptr(), rows(k),
                           rows(v), offsets.data_ptr<int32_t>(), dq.data_ptr(), dk.data_ptr(), dv.data_ptr(),
                           dq_partial.data_ptr<float>(), static_cast<int>(partials), static_cast<int>(S),
                           static_cast<int>(Q), static_cast<int>(H), static_cast<int>(D), static_cast<int>(Dv),
                           static_cast<float>(scale)};
  agf::check_launch(agf_segpool::bwd(p, dtype_of(queries), c10::cuda::getCurrentCUDAStream()), "segment_pool_bwd");
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY_IMPL(agiformer_kernels, CUDA, m) {
  m.impl("segment_pool_fwd", &segment_pool_fwd_cuda);
  m.impl("segment_pool_bwd", &segment_pool_bwd_cuda);
}

#endif  // WITH_CUDA
