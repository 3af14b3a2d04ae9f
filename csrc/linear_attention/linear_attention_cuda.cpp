// CUDA implementations of the linear_attention ops declared in linear_attention.cpp; the kernels are in
// linear_attention.cu. Compiled only in CUDA builds.
#ifdef WITH_CUDA

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <tuple>

#include "checks.h"
#include "cuda_dtype.h"
#include "linear_attention_cuda.h"

namespace {

agf_la::DType dtype_of(const at::Tensor& t) {
  return agf::dtype_of<agf_la::DType>(t.scalar_type(), "linear attention");
}

at::Tensor last_contiguous(const at::Tensor& t) { return t.size(-1) <= 1 || t.stride(-1) == 1 ? t : t.contiguous(); }

agf_la::Rows rows(const at::Tensor& t) { return {t.data_ptr(), t.stride(0), t.stride(1), t.stride(2)}; }

void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  AGF_CHECK_DIM(q, 4);
  AGF_CHECK_DIM(k, 4);
  AGF_CHECK_DIM(v, 4);
  for (const at::Tensor* t : {&q, &k, &v}) {
    AGF_CHECK_DEVICE(*t, at::kCUDA);
    AGF_CHECK_DTYPE(*t, q.scalar_type());
  }
  TORCH_CHECK(k.sizes() == q.sizes(), "k must have q's shape");
  TORCH_CHECK(v.size(0) == q.size(0) && v.size(1) == q.size(1) && v.size(2) == q.size(2), "v must have q's B, L, H");
  TORCH_CHECK(q.size(3) <= agf_la::kMaxHeadDim && v.size(3) <= agf_la::kMaxHeadDim,
              "the CUDA kernels take head dims up to ", agf_la::kMaxHeadDim);
}

int64_t chunk_rows(int64_t B, int64_t L, int64_t n_seq, bool packed) {
  return packed ? L / agf_la::kChunk + n_seq : B * ((L + agf_la::kChunk - 1) / agf_la::kChunk);
}

// The sequences, and for a packed batch the (segment, chunk) table of the per-chunk kernels, kept alive
// in `table` until the launches are queued.
agf_la::Sequences sequences(const at::Tensor& q, const std::optional<at::Tensor>& cu_seqlens, at::Tensor& table) {
  const int64_t B = q.size(0), L = q.size(1), H = q.size(2), NC = (L + agf_la::kChunk - 1) / agf_la::kChunk;
  if (!cu_seqlens) {
    return {nullptr, nullptr, nullptr, static_cast<int>(B), static_cast<int>(B * NC), static_cast<int>(B),
            static_cast<int>(L), static_cast<int>(H), static_cast<int>(NC)};
  }
  AGF_CHECK_DTYPE(*cu_seqlens, at::kInt);
  AGF_CHECK_DIM(*cu_seqlens, 1);
  AGF_CHECK_INPUT(*cu_seqlens, at::kCUDA);
  TORCH_CHECK(B == 1, "cu_seqlens needs B = 1");
  const int64_t n = cu_seqlens->size(0) - 1;
  const at::Tensor lengths = cu_seqlens->slice(0, 1).sub(cu_seqlens->slice(0, 0, n));
  const at::Tensor counts = lengths.add(agf_la::kChunk - 1).floor_divide(agf_la::kChunk).to(at::kLong);
  const int64_t n_chunks = counts.sum().item<int64_t>();
  const at::Tensor seg = at::repeat_interleave(at::arange(n, counts.options()), counts, 0, n_chunks);
  const at::Tensor first = counts.cumsum(0).sub(counts);
  const at::Tensor idx = at::arange(n_chunks, counts.options()).sub(first.index_select(0, seg));
  table = at::stack({seg, idx}).to(at::kInt).contiguous();
  const int32_t* t = table.data_ptr<int32_t>();
  return {cu_seqlens->data_ptr<int32_t>(), t, t + n_chunks, static_cast<int>(n), static_cast<int>(n_chunks),
          static_cast<int>(B), static_cast<int>(L), static_cast<int>(H), static_cast<int>(NC)};
}

agf_la::Options options(const at::Tensor& q, const at::Tensor& v, c10::string_view feature_map, double feature_eps,
                        double scale, double eps, bool normalize) {
  TORCH_CHECK(feature_map == "elu+1" || feature_map == "identity", "feature_map must be 'elu+1' or 'identity'");
  return {static_cast<int>(q.size(-1)), static_cast<int>(v.size(-1)), feature_map == "elu+1", normalize,
          static_cast<float>(feature_eps), static_cast<float>(scale), static_cast<float>(eps)};
}

const float* optional_state(const std::optional<at::Tensor>& t, at::IntArrayRef shape, const char* name) {
  if (!t) return nullptr;
  AGF_CHECK_INPUT(*t, at::kCUDA);
  AGF_CHECK_DTYPE(*t, at::kFloat);
  TORCH_CHECK(t->sizes() == shape, name, " has the wrong shape");
  return t->data_ptr<float>();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_attention_fwd_cuda(
    const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_, const std::optional<at::Tensor>& S0,
    const std::optional<at::Tensor>& z0, const std::optional<at::Tensor>& cu_seqlens, c10::string_view feature_map,
    double feature_eps, double scale, double eps, bool normalize) {
  check_inputs(q_, k_, v_);
  const c10::cuda::CUDAGuard guard(q_.device());
  const at::Tensor q = last_contiguous(q_), k = last_contiguous(k_), v = last_contiguous(v_);
  at::Tensor table;
  const agf_la::Sequences seq = sequences(q, cu_seqlens, table);
  const int64_t B = q.size(0), L = q.size(1), H = q.size(2), D = q.size(3), Dv = v.size(3), n = seq.n_seq;
  const auto f32 = q.options().dtype(at::kFloat);
  const int64_t rows_ = chunk_rows(B, L, n, cu_seqlens.has_value());
  at::Tensor o = at::empty({B, L, H, Dv}, q.options());
  at::Tensor den = normalize ? at::empty({B, H, L}, f32) : at::empty({0}, f32);
  at::Tensor S = at::empty({n, H, D, Dv}, f32);
  at::Tensor z = at::empty({n, H, D}, f32);
  at::Tensor chunk_S = cu_seqlens ? at::zeros({rows_, H, Dv, D}, f32) : at::empty({rows_, H, Dv, D}, f32);
  at::Tensor chunk_z = cu_seqlens ? at::zeros({rows_, H, D}, f32) : at::empty({rows_, H, D}, f32);
  agf_la::FwdParams p{rows(q), rows(k), rows(v), rows(o),
                      optional_state(S0, {n, H, D, Dv}, "S0"), optional_state(z0, {n, H, D}, "z0"),
                      normalize ? den.data_ptr<float>() : nullptr, S.data_ptr<float>(), z.data_ptr<float>(),
                      chunk_S.data_ptr<float>(), chunk_z.data_ptr<float>(), seq,
                      options(q, v, feature_map, feature_eps, scale, eps, normalize)};
  agf::check_launch(agf_la::fwd(p, dtype_of(q), c10::cuda::getCurrentCUDAStream()), "linear_attention_fwd (CUDA)");
  return {o, den, S, z, chunk_S, chunk_z};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_attention_bwd_cuda(
    const at::Tensor& grad_o_, const std::optional<at::Tensor>& dS, const std::optional<at::Tensor>& dz,
    const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_, const at::Tensor& o_, const at::Tensor& den,
    const at::Tensor& chunk_S, const at::Tensor& chunk_z, const std::optional<at::Tensor>& cu_seqlens,
    c10::string_view feature_map, double feature_eps, double scale, double eps, bool normalize) {
  check_inputs(q_, k_, v_);
  const c10::cuda::CUDAGuard guard(q_.device());
  const at::Tensor q = last_contiguous(q_), k = last_contiguous(k_), v = last_contiguous(v_);
  const at::Tensor o = last_contiguous(o_), grad_o = last_contiguous(grad_o_);
  TORCH_CHECK(o.sizes() == v.sizes() && grad_o.sizes() == v.sizes(), "do and o must have v's shape");
  at::Tensor table;
  const agf_la::Sequences seq = sequences(q, cu_seqlens, table);
  const int64_t B = q.size(0), L = q.size(1), H = q.size(2), D = q.size(3), Dv = v.size(3), n = seq.n_seq;
  const int64_t rows_ = chunk_rows(B, L, n, cu_seqlens.has_value());
  TORCH_CHECK(chunk_S.sizes() == at::IntArrayRef({rows_, H, Dv, D}) && chunk_S.is_contiguous(), "bad chunk_S");
  TORCH_CHECK(chunk_z.sizes() == at::IntArrayRef({rows_, H, D}) && chunk_z.is_contiguous(), "bad chunk_z");
  if (normalize) TORCH_CHECK(den.sizes() == at::IntArrayRef({B, H, L}) && den.is_contiguous(), "bad den");
  const auto f32 = q.options().dtype(at::kFloat);
  at::Tensor chunk_dS = at::empty_like(chunk_S);
  at::Tensor chunk_dz = at::empty_like(chunk_z);
  at::Tensor dq = at::empty({B, L, H, D}, q.options());
  at::Tensor dk = at::empty({B, L, H, D}, q.options());
  at::Tensor dv = at::empty({B, L, H, Dv}, q.options());
  at::Tensor dS0 = at::empty({n, H, D, Dv}, f32);
  at::Tensor dz0 = at::empty({n, H, D}, f32);
  const std::optional<at::Tensor> dS_c = dS ? std::optional<at::Tensor>(dS->contiguous()) : std::nullopt;
  const std::optional<at::Tensor> dz_c = dz ? std::optional<at::Tensor>(dz->contiguous()) : std::nullopt;
  agf_la::BwdParams p{rows(q), rows(k), rows(v), rows(o), rows(grad_o), rows(dq), rows(dk), rows(dv),
                      normalize ? den.data_ptr<float>() : nullptr, chunk_S.data_ptr<float>(),
                      chunk_z.data_ptr<float>(), chunk_dS.data_ptr<float>(), chunk_dz.data_ptr<float>(),
                      optional_state(dS_c, {n, H, D, Dv}, "dS"), optional_state(dz_c, {n, H, D}, "dz"),
                      dS0.data_ptr<float>(), dz0.data_ptr<float>(), seq,
                      options(q, v, feature_map, feature_eps, scale, eps, normalize)};
  agf::check_launch(agf_la::bwd(p, dtype_of(q), c10::cuda::getCurrentCUDAStream()), "linear_attention_bwd (CUDA)");
  return {dq, dk, dv, dS0, dz0};
}

at::Tensor linear_attention_step_cuda(const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_, at::Tensor& S,
                                      at::Tensor& z, c10::string_view feature_map, double feature_eps, double scale,
                                      double eps, bool normalize) {
  AGF_CHECK_DIM(q_, 3);
  AGF_CHECK_DIM(k_, 3);
  AGF_CHECK_DIM(v_, 3);
  const c10::cuda::CUDAGuard guard(q_.device());
  const at::Tensor q = last_contiguous(q_), k = last_contiguous(k_), v = last_contiguous(v_);
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2), Dv = v.size(2);
  TORCH_CHECK(k.sizes() == q.sizes() && v.size(0) == B && v.size(1) == H, "q, k, v shapes disagree");
  TORCH_CHECK(D <= agf_la::kMaxHeadDim && Dv <= agf_la::kMaxHeadDim, "the CUDA kernels take head dims up to 128");
  AGF_CHECK_INPUT(S, at::kCUDA);
  AGF_CHECK_INPUT(z, at::kCUDA);
  AGF_CHECK_DTYPE(S, at::kFloat);
  AGF_CHECK_DTYPE(z, at::kFloat);
  TORCH_CHECK(S.sizes() == at::IntArrayRef({B, H, D, Dv}) && z.sizes() == at::IntArrayRef({B, H, D}),
              "S must be (B, H, D, Dv) and z (B, H, D)");
  at::Tensor o = at::empty({B, H, Dv}, q.options());
  agf_la::StepParams p{q.data_ptr(), k.data_ptr(), v.data_ptr(), q.stride(0), q.stride(1), k.stride(0), k.stride(1),
                       v.stride(0), v.stride(1), S.data_ptr<float>(), z.data_ptr<float>(), o.data_ptr(),
                       static_cast<int>(B), static_cast<int>(H),
                       options(q, v, feature_map, feature_eps, scale, eps, normalize)};
  agf::check_launch(agf_la::step(p, dtype_of(q), c10::cuda::getCurrentCUDAStream()), "linear_attention_step (CUDA)");
  return o;
}

}  // namespace

TORCH_LIBRARY_IMPL(agiformer_kernels, CUDA, m) {
  m.impl("linear_attention_fwd", &linear_attention_fwd_cuda);
  m.impl("linear_attention_bwd", &linear_attention_bwd_cuda);
  m.impl("linear_attention_step", &linear_attention_step_cuda);
}

#endif  // WITH_CUDA
