// CUDA implementations of the sliding_window_attention ops declared in sliding_window_attention.cpp;
// the kernels are in sliding_window_attention.cu. Compiled only in CUDA builds.
#ifdef WITH_CUDA

#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>

#include "checks.h"
#include "cuda_dtype.h"
#include "sliding_window_attention_cuda.h"

namespace {

agf_swa::DType dtype_of(const at::Tensor& t) {
  return agf::dtype_of<agf_swa::DType>(t.scalar_type(), "sliding-window attention");
}

// A view the kernels can index by (b, l, h) strides: the last dimension must be contiguous.
at::Tensor rows_view(const at::Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

agf_swa::Rows rows(const at::Tensor& t) { return {t.data_ptr(), t.stride(0), t.stride(1), t.stride(2)}; }

void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& seg_start,
                  const at::Tensor& seg_end, int64_t window) {
  AGF_CHECK_DIM(q, 4);
  AGF_CHECK_DIM(k, 4);
  AGF_CHECK_DIM(v, 4);
  AGF_CHECK_DEVICE(q, at::kCUDA);
  TORCH_CHECK(k.device() == q.device() && v.device() == q.device(), "q, k, v must be on one device");
  TORCH_CHECK(q.sizes() == k.sizes(), "k must have the shape of q");
  TORCH_CHECK(v.size(0) == q.size(0) && v.size(1) == q.size(1) && v.size(2) == q.size(2),
              "v must match q in [B, L, H]");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(), "q, k, v must share a dtype");
  TORCH_CHECK(std::max(q.size(3), v.size(3)) <= agf_swa::kMaxHeadDim, "head dims up to ", agf_swa::kMaxHeadDim);
  AGF_CHECK_DTYPE(seg_start, at::kInt);
  AGF_CHECK_DTYPE(seg_end, at::kInt);
  TORCH_CHECK(seg_start.device() == q.device() && seg_end.device() == q.device(), "seg_start/seg_end must be on q's device");
  TORCH_CHECK(seg_start.numel() == q.size(1) && seg_end.numel() == q.size(1), "seg_start/seg_end must have L entries");
  TORCH_CHECK(window >= 1, "window must be >= 1");
  TORCH_CHECK(q.size(1) < (int64_t(1) << 31) && q.size(0) * q.size(2) < 65536 * 65536LL, "input too large");
}

std::tuple<at::Tensor, at::Tensor> swa_fwd_cuda(const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_,
                                                const at::Tensor& seg_start_, const at::Tensor& seg_end_,
                                                int64_t window, double scale) {
  check_inputs(q_, k_, v_, seg_start_, seg_end_, window);
  const c10::cuda::CUDAGuard guard(q_.device());
  const at::Tensor q = rows_view(q_), k = rows_view(k_), v = rows_view(v_);
  const at::Tensor seg_start = seg_start_.contiguous();
  const int64_t B = q.size(0), L = q.size(1), H = q.size(2);
  at::Tensor o = at::empty({B, L, H, v.size(3)}, q.options());
  at::Tensor lse = at::empty({B, H, L}, q.options().dtype(at::kFloat));
  if (o.numel() == 0) return {o, lse};
  agf_swa::FwdParams p{rows(q), rows(k), rows(v), rows(o), lse.data_ptr<float>(), seg_start.data_ptr<int32_t>(),
                       static_cast<int>(B), static_cast<int>(L), static_cast<int>(H), static_cast<int>(q.size(3)),
                       static_cast<int>(v.size(3)), static_cast<int>(std::min<int64_t>(window, L)),
                       static_cast<float>(scale * 1.4426950408889634)};
  agf::check_launch(agf_swa::fwd(p, dtype_of(q), c10::cuda::getCurrentCUDAStream()), "sliding_window_attention_fwd");
  return {o, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> swa_bwd_cuda(const at::Tensor& grad_o_, const at::Tensor& q_,
                                                            const at::Tensor& k_, const at::Tensor& v_,
                                                            const at::Tensor& o, const at::Tensor& lse_,
                                                            const at::Tensor& seg_start_, const at::Tensor& seg_end_,
                                                            int64_t window, double scale) {
  check_inputs(q_, k_, v_, seg_start_, seg_end_, window);
  TORCH_CHECK(grad_o_.sizes() == v_.sizes() && o.sizes() == v_.sizes(), "grad_o and o must have the shape of v");
  const c10::cuda::CUDAGuard guard(q_.device());
  const at::Tensor q = rows_view(q_), k = rows_view(k_), v = rows_view(v_);
  const at::Tensor grad_o = rows_view(grad_o_.to(q.scalar_type()));
  const at::Tensor lse = lse_.to(at::kFloat).contiguous();
  const at::Tensor seg_start = seg_start_.contiguous(), seg_end = seg_end_.contiguous();
  // delta_i = rowsum(dO_i * O_i) = sum_j P_ij dP_ij, [B, H, L] fp32
  const at::Tensor delta = (grad_o.to(at::kFloat) * o.to(at::kFloat)).sum(-1).transpose(1, 2).contiguous();
  at::Tensor dq = at::empty(q.sizes(), q.options());
  at::Tensor dk = at::empty(k.sizes(), k.options());
  at::Tensor dv = at::empty(v.sizes(), v.options());
  if (q.numel() == 0) return {dq, dk, dv};
  const int64_t B = q.size(0), L = q.size(1), H = q.size(2);
  agf_swa::BwdParams p{rows(q), rows(k), rows(v), rows(grad_o), rows(dq), rows(dk), rows(dv),
                       lse.data_ptr<float>(), delta.data_ptr<float>(), seg_start.data_ptr<int32_t>(),
                       seg_end.data_ptr<int32_t>(), static_cast<int>(B), static_cast<int>(L), static_cast<int>(H),
                       static_cast<int>(q.size(3)), static_cast<int>(v.size(3)),
                       static_cast<int>(std::min<int64_t>(window, L)), static_cast<float>(scale),
                       static_cast<float>(scale * 1.4426950408889634)};
  agf::check_launch(agf_swa::bwd(p, dtype_of(q), c10::cuda::getCurrentCUDAStream()), "sliding_window_attention_bwd");
  return {dq, dk, dv};
}

at::Tensor swa_step_cuda(const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_, at::Tensor& k_cache,
                         at::Tensor& v_cache, const at::Tensor& pos_, double scale) {
  AGF_CHECK_DIM(q_, 3);
  AGF_CHECK_DIM(k_cache, 4);
  AGF_CHECK_DEVICE(q_, at::kCUDA);
  AGF_CHECK_CONTIGUOUS(k_cache);
  AGF_CHECK_CONTIGUOUS(v_cache);
  AGF_CHECK_DTYPE(pos_, at::kLong);
  const int64_t B = q_.size(0), H = q_.size(1), D = q_.size(2), Dv = v_.size(2), W = k_cache.size(1);
  TORCH_CHECK(k_.sizes() == q_.sizes() && v_.size(0) == B && v_.size(1) == H, "k, v must match q in [B, H]");
  TORCH_CHECK(k_cache.size(0) == B && k_cache.size(2) == H && k_cache.size(3) == D, "k_cache must be [B, W, H, D]");
  TORCH_CHECK(v_cache.size(0) == B && v_cache.size(1) == W && v_cache.size(2) == H && v_cache.size(3) == Dv,
              "v_cache must be [B, W, H, Dv]");
  TORCH_CHECK(k_cache.scalar_type() == q_.scalar_type() && v_cache.scalar_type() == q_.scalar_type() &&
                  k_.scalar_type() == q_.scalar_type() && v_.scalar_type() == q_.scalar_type(),
              "q, k, v, k_cache, v_cache must share a dtype");
  TORCH_CHECK(std::max(D, Dv) <= agf_swa::kMaxHeadDim, "head dims up to ", agf_swa::kMaxHeadDim);
  TORCH_CHECK(pos_.numel() == B, "pos must have B entries");
  const c10::cuda::CUDAGuard guard(q_.device());
  const at::Tensor q = q_.contiguous(), k = k_.contiguous(), v = v_.contiguous(), pos = pos_.contiguous();
  at::Tensor o = at::empty({B, H, Dv}, q.options());
  if (o.numel() == 0) return o;
  agf_swa::StepParams p{q.data_ptr(), k.data_ptr(), v.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(),
                        pos.data_ptr<int64_t>(), o.data_ptr(), static_cast<int>(B), static_cast<int>(H),
                        static_cast<int>(D), static_cast<int>(Dv), static_cast<int>(W),
                        static_cast<float>(scale * 1.4426950408889634)};
  agf::check_launch(agf_swa::step(p, dtype_of(q), c10::cuda::getCurrentCUDAStream()), "sliding_window_attention_step");
  return o;
}

}  // namespace

TORCH_LIBRARY_IMPL(agiformer_kernels, CUDA, m) {
  m.impl("sliding_window_attention_fwd", &swa_fwd_cuda);
  m.impl("sliding_window_attention_bwd", &swa_bwd_cuda);
  m.impl("sliding_window_attention_step", &swa_step_cuda);
}

#endif  // WITH_CUDA
