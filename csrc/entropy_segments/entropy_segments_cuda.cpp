// CUDA implementation of the entropy_segments op declared in entropy_segments.cpp; the kernels are in
// entropy_segments.cu. Compiled only in CUDA builds. seq_start's values were checked by the public function
// (docs/ops.md §1.4).
#ifdef WITH_CUDA

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "checks.h"
#include "cuda_dtype.h"
#include "entropy_segments_cuda.h"

namespace {

std::tuple<at::Tensor, at::Tensor> entropy_segments_fwd_cuda(const at::Tensor& logits_, const at::Tensor& seq_start_,
                                                             int64_t rule, double threshold, double delta,
                                                             int64_t max_len) {
  AGF_CHECK_DIM(logits_, 3);
  AGF_CHECK_DEVICE(logits_, at::kCUDA);
  AGF_CHECK_DTYPE(seq_start_, at::kInt);
  TORCH_CHECK(seq_start_.device() == logits_.device(), "seq_start must be on the device of logits");
  TORCH_CHECK(rule == agf_entropy::kRuleDelta || rule == agf_entropy::kRuleGlobal,
              "rule must be 0 (delta) or 1 (global)");
  const int64_t B = logits_.size(0), L = logits_.size(1), V = logits_.size(2);
  TORCH_CHECK(seq_start_.numel() == L, "seq_start must have L entries");
  TORCH_CHECK(V >= 1, "logits must have V >= 1");
  TORCH_CHECK(B * L / 8 < (int64_t(1) << 31) - 1 && V < (int64_t(1) << 31), "logits too large");
  const agf_entropy::DType dtype = agf::dtype_of<agf_entropy::DType>(logits_.scalar_type(), "entropy");
  const c10::cuda::CUDAGuard guard(logits_.device());
  // rows (b, t) at one stride: a contiguous last dimension and a [B, L] part that flattens
  at::Tensor logits = logits_.stride(2) == 1 && logits_.stride(0) == L * logits_.stride(1) ? logits_
                                                                                           : logits_.contiguous();
  const at::Tensor seq_start = seq_start_.contiguous();
  at::Tensor entropy = at::empty({B, L}, logits.options().dtype(at::kFloat));
  at::Tensor starts = at::empty({B, L}, logits.options().dtype(at::kBool));
  if (B * L == 0) return {entropy, starts};
  agf_entropy::Params p{logits.data_ptr(), logits.stride(1), seq_start.data_ptr<int32_t>(), entropy.data_ptr<float>(),
                        starts.data_ptr<bool>(), static_cast<int>(B), static_cast<int>(L), static_cast<int>(V),
                        static_cast<int>(rule), static_cast<float>(threshold), static_cast<float>(delta), max_len};
  agf::check_launch(agf_entropy::entropy_segments(p, dtype, c10::cuda::getCurrentCUDAStream()),
                    "entropy_segments_fwd");
  return {entropy, starts};
}

}  // namespace

TORCH_LIBRARY_IMPL(agiformer_kernels, CUDA, m) { m.impl("entropy_segments_fwd", &entropy_segments_fwd_cuda); }

#endif  // WITH_CUDA
