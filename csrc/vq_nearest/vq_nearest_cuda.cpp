// CUDA implementations of the vq_nearest ops declared in vq_nearest.cpp; the kernels are in vq_nearest.cu.
// Compiled only in CUDA builds. index's values were checked by the public function (docs/ops.md §1.6).
#ifdef WITH_CUDA

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "checks.h"
#include "cuda_dtype.h"
#include "vq_nearest_cuda.h"

namespace {

std::tuple<at::Tensor, at::Tensor> vq_nearest_fwd_cuda(const at::Tensor& z_, const at::Tensor& codebook_) {
  AGF_CHECK_DIM(z_, 2);
  AGF_CHECK_DIM(codebook_, 2);
  AGF_CHECK_DEVICE(z_, at::kCUDA);
  TORCH_CHECK(codebook_.device() == z_.device(), "z and codebook must be on one device");
  TORCH_CHECK(z_.scalar_type() == codebook_.scalar_type(), "z and codebook must share a dtype");
  TORCH_CHECK(z_.size(1) == codebook_.size(1), "codebook must be [K, D] of z");
  TORCH_CHECK(codebook_.size(0) >= 1 && codebook_.size(0) < (int64_t(1) << 31), "codebook must have 1 <= K < 2**31");
  TORCH_CHECK(z_.size(0) < (int64_t(1) << 31) && z_.size(1) < (int64_t(1) << 31), "z too large");
  const agf_vq::DType dtype = agf::dtype_of<agf_vq::DType>(z_.scalar_type(), "nearest-code");
  const c10::cuda::CUDAGuard guard(z_.device());
  const at::Tensor z = z_.contiguous(), codebook = codebook_.contiguous();
  const int64_t N = z.size(0), D = z.size(1), K = codebook.size(0);
  at::Tensor index = at::empty({N}, z.options().dtype(at::kLong));
  at::Tensor dist = at::empty({N}, z.options().dtype(at::kFloat));
  if (N == 0) return {index, dist};
  if (D == 0) return {index.zero_(), dist.zero_()};
  at::Tensor code_norm = at::empty({K}, z.options().dtype(at::kFloat));
  agf_vq::NearestParams p{z.data_ptr(), codebook.data_ptr(), code_norm.data_ptr<float>(), index.data_ptr<int64_t>(),
                          dist.data_ptr<float>(), static_cast<int>(N), static_cast<int>(K), static_cast<int>(D)};
  agf::check_launch(agf_vq::nearest(p, dtype, c10::cuda::getCurrentCUDAStream()), "vq_nearest_fwd");
  return {index, dist};
}

at::Tensor vq_ema_update_cuda(const at::Tensor& z_, const at::Tensor& index_, at::Tensor& counts, at::Tensor& sums,
                              double decay, double eps) {
  AGF_CHECK_DIM(z_, 2);
  AGF_CHECK_DIM(counts, 1);
  AGF_CHECK_DIM(sums, 2);
  AGF_CHECK_DEVICE(z_, at::kCUDA);
  AGF_CHECK_CONTIGUOUS(counts);
  AGF_CHECK_CONTIGUOUS(sums);
  AGF_CHECK_DTYPE(index_, at::kLong);
  TORCH_CHECK(index_.device() == z_.device() && counts.device() == z_.device() && sums.device() == z_.device(),
              "z, index, counts, sums must be on one device");
  TORCH_CHECK(z_.scalar_type() == sums.scalar_type() && counts.scalar_type() == sums.scalar_type(),
              "z, counts and sums must share a dtype");
  TORCH_CHECK(sums.scalar_type() == at::kFloat || sums.scalar_type() == at::kDouble,
              "the CUDA EMA update takes float32 or float64, got ", sums.scalar_type());
  const int64_t N = z_.size(0), D = z_.size(1), K = counts.size(0);
  TORCH_CHECK(sums.size(0) == K && sums.size(1) == D, "sums must be [K, D]");
  TORCH_CHECK(index_.numel() == N, "index must have N entries");
  TORCH_CHECK(K >= 1 && K < (int64_t(1) << 31) && D < (int64_t(1) << 23), "counts, sums too large");
  const c10::cuda::CUDAGuard guard(z_.device());
  const at::Tensor z = z_.contiguous(), index = index_.contiguous();
  at::Tensor codebook = at::empty({K, D}, sums.options());
  // rows grouped by code, in their order within a code: each code's sum runs in a fixed order, without atomics
  const at::Tensor order = std::get<1>(index.sort(/*stable=*/true, 0, /*descending=*/false)).contiguous();
  const at::Tensor per_code = at::bincount(index, {}, K).narrow(0, 0, K);
  const at::Tensor code_start = at::cat({at::zeros({1}, per_code.options()), per_code.cumsum(0)}).contiguous();
  at::Tensor total = at::empty({1}, sums.options());
  if (D == 0) {  // counts still move
    counts.mul_(decay).add_(per_code.to(counts.scalar_type()), 1.0 - decay);
    return codebook;
  }
  agf_vq::EmaParams p{z.data_ptr(), order.data_ptr<int64_t>(), code_start.data_ptr<int64_t>(), counts.data_ptr(),
                      sums.data_ptr(), total.data_ptr(), codebook.data_ptr(), static_cast<int>(K),
                      static_cast<int>(D), decay, eps};
  const agf_vq::EmaDType dtype =
      sums.scalar_type() == at::kFloat ? agf_vq::EmaDType::Float32 : agf_vq::EmaDType::Float64;
  agf::check_launch(agf_vq::ema_update(p, dtype, c10::cuda::getCurrentCUDAStream()), "vq_ema_update");
  return codebook;
}

}  // namespace

TORCH_LIBRARY_IMPL(agiformer_kernels, CUDA, m) {
  m.impl("vq_nearest_fwd", &vq_nearest_fwd_cuda);
  m.impl("vq_ema_update", &vq_ema_update_cuda);
}

#endif  // WITH_CUDA
