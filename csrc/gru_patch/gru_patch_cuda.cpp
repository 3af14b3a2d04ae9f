// CUDA implementations of the gru_patch ops declared in gru_patch.cpp: the products that need no
// recurrence (byte table, context part, weight gradients) as cuBLAS GEMMs through ATen, the recurrences
// and the head in the kernels of gru_patch.cu. Compiled only in CUDA builds.
#ifdef WITH_CUDA

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <tuple>
#include <vector>

#include "checks.h"
#include "cuda_dtype.h"
#include "gru_patch_cuda.h"

namespace {

using at::Tensor;
constexpr int64_t kVocab = 256;

agf_gru::DType dtype_of(at::ScalarType t) { return agf::dtype_of<agf_gru::DType>(t, "GRU"); }

cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

void check_inputs(const Tensor& context, const Tensor& byte_emb, const Tensor& w_ih, const Tensor& w_hh) {
  for (const Tensor* t : {&context, &byte_emb, &w_ih, &w_hh}) AGF_CHECK_DEVICE(*t, at::kCUDA);
  AGF_CHECK_DIM(context, 2);
  const int64_t h = context.size(1);
  const int64_t max_h = context.scalar_type() == at::kDouble ? agf_gru::kMaxHiddenDouble : agf_gru::kMaxHidden;
  TORCH_CHECK(h <= max_h, "the CUDA GRU kernels take h <= ", max_h, " for ", context.scalar_type(), ", got ", h);
  TORCH_CHECK(byte_emb.sizes() == at::IntArrayRef({kVocab, h}), "byte_emb must be [256, h]");
  TORCH_CHECK(w_ih.sizes() == at::IntArrayRef({3 * h, 2 * h}), "weight_ih must be [3h, 2h]");
  TORCH_CHECK(w_hh.sizes() == at::IntArrayRef({3 * h, h}), "weight_hh must be [3h, h]");
  TORCH_CHECK(context.size(0) < (int64_t(1) << 31) * 16, "too many patches");
}

// byte table E·W_ih[:, :h]ᵀ [256, 3h] (undefined unless with_table) and gc = c·W_ih[:, h:]ᵀ + b_ih [M, 3h],
// in the acc dtype. 16-bit operands go to cuBLAS as they are, with an fp32 output: the products are exact in fp32
// and summed there, on tensor cores (an fp32 GEMM of the upcast operands gives the same sums without them).
std::pair<Tensor, Tensor> input_parts(const Tensor& context, const Tensor& byte_emb, const Tensor& weight_ih,
                                      const Tensor& bias_ih, bool with_table = true) {
  const int64_t h = context.size(1);
  const Tensor w_e = weight_ih.narrow(1, 0, h).t(), w_c = weight_ih.narrow(1, h, h).t();
  if (context.scalar_type() == at::kHalf || context.scalar_type() == at::kBFloat16) {
    Tensor table = with_table ? at::mm(byte_emb, w_e, at::kFloat).contiguous() : Tensor();
    return {table, at::mm(context, w_c, at::kFloat).add_(bias_ih)};
  }
  Tensor table = with_table ? at::mm(byte_emb, w_e).contiguous() : Tensor();
  return {table, at::addmm(bias_ih, context, w_c).contiguous()};
}

// The recurrence forward: hid [M, P, h] acc; out (input dtype, when it differs) and gates when asked.
void recurrence_fwd(const Tensor& context, const Tensor& bytes, const Tensor& byte_emb, const Tensor& weight_ih,
                    const Tensor& weight_hh, const Tensor& bias_ih, const Tensor& bias_hh, const Tensor& hid,
                    const Tensor& out, const Tensor& gates) {
  const auto [table, gc] = input_parts(context, byte_emb, weight_ih, bias_ih);
  const Tensor w_hh_t = weight_hh.t().contiguous();
  const Tensor b_hh = bias_hh.contiguous();
  agf_gru::FwdParams p{gc.data_ptr(),
                       table.data_ptr(),
                       bytes.data_ptr<int64_t>(),
                       w_hh_t.data_ptr(),
                       b_hh.data_ptr(),
                       hid.data_ptr(),
                       out.defined() ? out.data_ptr() : nullptr,
                       gates.numel() > 0 ? gates.data_ptr() : nullptr,
                       context.size(0),
                       static_cast<int>(bytes.size(1)),
                       static_cast<int>(context.size(1))};
  agf::check_launch(agf_gru::gru_fwd(p, dtype_of(context.scalar_type()), stream()), "gru_fwd_kernel");
}

// (dcontext, dbyte_emb, dweight_ih, dweight_hh, dbias_ih, dbias_hh) in the input dtype, from dL/dhidden.
std::vector<Tensor> recurrence_bwd(const Tensor& grad_hidden, const Tensor& context, const Tensor& bytes,
                                   const Tensor& byte_emb, const Tensor& weight_ih, const Tensor& weight_hh,
                                   const Tensor& hidden, const Tensor& gates) {
  const auto dtype = context.scalar_type();
  const auto a = agf::acc_dtype(dtype);
  const int64_t M = context.size(0), P = bytes.size(1), h = context.size(1);
  const Tensor dH = grad_hidden.to(a).contiguous(), hid = hidden.to(a).contiguous(), g = gates.contiguous();
  TORCH_CHECK(hid.sizes() == at::IntArrayRef({M, P, h}) && g.sizes() == at::IntArrayRef({M, P, 4 * h}),
              "gru_patch backward: hidden/gates must be the forward's saved tensors");
  const Tensor w_hh = weight_hh.contiguous();
  Tensor dgi = at::empty({M, P, 3 * h}, hid.options()), dgh = at::empty({M, P, 3 * h}, hid.options());
  agf_gru::BwdParams p{dH.data_ptr(), hid.data_ptr(), g.data_ptr(), w_hh.data_ptr(), dgi.data_ptr(),
                       dgh.data_ptr(), M, static_cast<int>(P), static_cast<int>(h)};
  agf::check_launch(agf_gru::gru_bwd(p, dtype_of(dtype), stream()), "gru_bwd_kernel");
  // weight gradients: GEMMs over the stored gate gradients, one index_add for the byte table
  const Tensor w = weight_ih.to(a), ctx = context.to(a);
  const Tensor dgc = dgi.sum(1);
  const Tensor dctx = dgc.mm(w.narrow(1, h, h));
  const Tensor dw_c = dgc.t().mm(ctx);
  Tensor dw_hh = at::zeros({3 * h, h}, hid.options());
  for (int64_t t = 1; t < P; ++t) dw_hh.addmm_(dgh.select(1, t).t(), hid.select(1, t - 1));
  Tensor dtable = at::zeros({kVocab, 3 * h}, hid.options());
  dtable.index_add_(0, bytes.reshape({-1}), dgi.reshape({-1, 3 * h}));
  const Tensor dw_e = dtable.t().mm(byte_emb.to(a));
  const Tensor demb = dtable.mm(w.narrow(1, 0, h));
  return {dctx.to(dtype),       demb.to(dtype),         at::cat({dw_e, dw_c}, 1).to(dtype),
          dw_hh.to(dtype),      dgc.sum(0).to(dtype),   dgh.sum(at::IntArrayRef({0, 1})).to(dtype)};
}

Tensor teacher_bytes(const Tensor& targets, int64_t sos) {
  const Tensor t = targets.to(at::kLong);
  return at::cat({at::full({t.size(0), 1}, sos, t.options()), t.narrow(1, 0, t.size(1) - 1)}, 1).contiguous();
}

std::tuple<Tensor, Tensor, Tensor> decode_fwd_cuda(const Tensor& context, const Tensor& prev_bytes,
                                                   const Tensor& byte_emb, const Tensor& weight_ih,
                                                   const Tensor& weight_hh, const Tensor& bias_ih,
                                                   const Tensor& bias_hh, bool save) {
  check_inputs(context, byte_emb, weight_ih, weight_hh);
  const c10::cuda::CUDAGuard guard(context.device());
  const auto dtype = context.scalar_type();
  const auto a = agf::acc_dtype(dtype);
  const int64_t M = context.size(0), P = prev_bytes.size(1), h = context.size(1);
  const auto opt = context.options().dtype(a);
  Tensor hid = at::empty({M, P, h}, opt);
  Tensor out = dtype == a ? Tensor() : at::empty({M, P, h}, context.options());
  Tensor gates = at::empty({save ? M : 0, P, 4 * h}, opt);
  recurrence_fwd(context, prev_bytes.to(at::kLong).contiguous(), byte_emb, weight_ih, weight_hh, bias_ih, bias_hh,
                 hid, out, gates);
  if (dtype == a) return {hid, gates, at::empty({0}, opt)};
  return {out, gates, save ? hid : at::empty({0}, opt)};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> decode_bwd_cuda(
    const Tensor& grad_hidden, const Tensor& context, const Tensor& prev_bytes, const Tensor& byte_emb,
    const Tensor& weight_ih, const Tensor& weight_hh, const Tensor& hidden, const Tensor& gates) {
  check_inputs(context, byte_emb, weight_ih, weight_hh);
  const c10::cuda::CUDAGuard guard(context.device());
  const auto g = recurrence_bwd(grad_hidden, context, prev_bytes.to(at::kLong).contiguous(), byte_emb, weight_ih,
                                weight_hh, hidden, gates);
  return {g[0], g[1], g[2], g[3], g[4], g[5]};
}

agf_gru::CeParams ce_params(const Tensor& hid, const Tensor& head_w, const Tensor& head_t, const Tensor& head_b,
                            const Tensor& y, const Tensor& lse) {
  agf_gru::CeParams p{};
  p.h = hid.data_ptr();
  p.head_w = head_w.data_ptr();
  p.head_t = head_t.data_ptr();
  p.head_b = head_b.data_ptr();
  p.y = y.data_ptr<int64_t>();
  p.lse = lse.data_ptr();
  p.R = y.numel();
  p.H = static_cast<int>(hid.size(-1));
  return p;
}

// head_grad (the CPU kernel's head backward taken in the forward) is not implemented here: the caller
// passes false on CUDA, and the backward recomputes the logits tile by tile.
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> loss_fwd_cuda(
    const Tensor& context, const Tensor& targets, const Tensor& byte_emb, const Tensor& weight_ih,
    const Tensor& weight_hh, const Tensor& bias_ih, const Tensor& bias_hh, const Tensor& head_weight,
    const Tensor& head_bias, int64_t sos, bool save, bool head_grad) {
  check_inputs(context, byte_emb, weight_ih, weight_hh);
  TORCH_CHECK(!head_grad, "gru_patch_loss_fwd: head_grad is a CPU-only option");
  const c10::cuda::CUDAGuard guard(context.device());
  const auto a = agf::acc_dtype(context.scalar_type());
  const int64_t M = context.size(0), P = targets.size(1), h = context.size(1);
  const auto opt = context.options().dtype(a);
  const Tensor y = targets.to(at::kLong).contiguous();
  Tensor hid = at::empty({M, P, h}, opt);
  Tensor gates = at::empty({save ? M : 0, P, 4 * h}, opt);
  recurrence_fwd(context, teacher_bytes(y, sos), byte_emb, weight_ih, weight_hh, bias_ih, bias_hh, hid, Tensor(),
                 gates);
  Tensor loss = at::empty({M, P}, opt), lse = at::empty({M, P}, opt);
  const Tensor hw = head_weight.contiguous(), ht = head_weight.t().contiguous(), hb = head_bias.contiguous();
  agf_gru::CeParams p = ce_params(hid, hw, ht, hb, y, lse);
  p.loss = loss.data_ptr();
  agf::check_launch(agf_gru::ce_fwd(p, dtype_of(context.scalar_type()), stream()), "ce_fwd_kernel");
  return {loss, lse, save ? hid : at::empty({0, P, h}, opt), gates, at::empty({0, P, h}, opt), at::empty({0}, opt),
          at::empty({0}, opt)};
}

std::vector<Tensor> loss_bwd_cuda(const Tensor& grad_loss, const Tensor& context, const Tensor& targets,
                                  const Tensor& byte_emb, const Tensor& weight_ih, const Tensor& weight_hh,
                                  const Tensor& head_weight, const Tensor& head_bias, const Tensor& hidden,
                                  const Tensor& gates, const Tensor& lse, int64_t sos) {
  check_inputs(context, byte_emb, weight_ih, weight_hh);
  const c10::cuda::CUDAGuard guard(context.device());
  const auto dtype = context.scalar_type();
  const auto a = agf::acc_dtype(dtype);
  const int64_t M = context.size(0), P = targets.size(1), h = context.size(1), R = M * P;
  const auto opt = context.options().dtype(a);
  const Tensor y = targets.to(at::kLong).contiguous();
  const Tensor hid = hidden.to(a).contiguous(), g = grad_loss.to(a).contiguous(), s = lse.to(a).contiguous();
  const Tensor hw = head_weight.contiguous(), ht = head_weight.t().contiguous(), hb = head_bias.contiguous();
  const int64_t blocks = (R + 15) / 16;
  const int64_t splits = std::max<int64_t>(1, std::min<int64_t>(blocks, 128));
  Tensor dH = at::empty({M, P, h}, opt);
  Tensor dw = at::zeros({splits, kVocab, h}, opt), db = at::zeros({splits, kVocab}, opt);
  agf_gru::CeParams p = ce_params(hid, hw, ht, hb, y, s);
  p.g = g.data_ptr();
  p.dh = dH.data_ptr();
  p.dw = dw.data_ptr();
  p.db = db.data_ptr();
  p.splits = static_cast<int>(splits);
  p.rows_per_split = (blocks + splits - 1) / splits * 16;
  agf::check_launch(agf_gru::ce_bwd(p, dtype_of(dtype), stream()), "ce_bwd kernels");
  auto grads = recurrence_bwd(dH, context, teacher_bytes(y, sos), byte_emb, weight_ih, weight_hh, hid, gates);
  grads.push_back(dw.sum(0).to(dtype));
  grads.push_back(db.sum(0).to(dtype));
  return grads;
}

Tensor sample_cuda(const Tensor& context, const Tensor& byte_emb, const Tensor& weight_ih, const Tensor& weight_hh,
                   const Tensor& bias_ih, const Tensor& bias_hh, const Tensor& head_weight, const Tensor& head_bias,
                   int64_t patch_size, double temperature, int64_t top_k, const std::optional<Tensor>& prefix,
                   int64_t sos, const std::optional<Tensor>& seed, const std::optional<Tensor>& byte_table) {
  check_inputs(context, byte_emb, weight_ih, weight_hh);
  TORCH_CHECK(patch_size >= 1, "patch_size must be >= 1");
  const c10::cuda::CUDAGuard guard(context.device());
  const int64_t M = context.size(0);
  Tensor out = at::empty({M, patch_size}, context.options().dtype(at::kLong));
  if (M == 0) return out;
  auto [table, gc] = input_parts(context, byte_emb, weight_ih, bias_ih, !byte_table.has_value());
  if (byte_table.has_value()) {
    TORCH_CHECK_VALUE(byte_table->device() == context.device(), "byte_table must be on ", context.device(), ", got ",
                      byte_table->device());
    TORCH_CHECK_VALUE(byte_table->sizes() == at::IntArrayRef({kVocab, 3 * context.size(1)}),
                      "byte_table must be [256, 3h]");
    table = byte_table->to(agf::acc_dtype(context.scalar_type())).contiguous();
  }
  const Tensor w_hh_t = weight_hh.t().contiguous(), b_hh = bias_hh.contiguous();
  const Tensor ht = head_weight.t().contiguous(), hb = head_bias.contiguous();
  Tensor pre, s;
  int64_t forced = 0;
  if (prefix.has_value() && prefix->numel() > 0) {
    pre = prefix->to(context.device(), at::kLong).contiguous();
    forced = pre.size(1);
    TORCH_CHECK(pre.size(0) == M && forced < patch_size, "prefix must be [M, r] with r < patch_size");
  }
  if (temperature > 0) {
    TORCH_CHECK(seed.has_value() && seed->numel() == 2, "gru_patch_sample: temperature > 0 needs a seed [2]");
    s = seed->to(context.device(), at::kLong).contiguous();
  }
  agf_gru::SampleParams p{};
  p.gc = gc.data_ptr();
  p.table = table.data_ptr();
  p.w_hh_t = w_hh_t.data_ptr();
  p.b_hh = b_hh.data_ptr();
  p.head_t = ht.data_ptr();
  p.head_b = hb.data_ptr();
  p.prefix = forced ? pre.data_ptr<int64_t>() : nullptr;
  p.seed = temperature > 0 ? s.data_ptr<int64_t>() : nullptr;
  p.out = out.data_ptr<int64_t>();
  p.M = M;
  p.P = static_cast<int>(patch_size);
  p.H = static_cast<int>(context.size(1));
  p.forced = static_cast<int>(forced);
  p.sos = static_cast<int>(sos);
  p.top_k = static_cast<int>(top_k);
  p.greedy = temperature == 0;
  p.inv_temperature = temperature > 0 ? 1.0 / temperature : 0.0;
  agf::check_launch(agf_gru::gru_sample(p, dtype_of(context.scalar_type()), stream()), "gru_sample_kernel");
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(agiformer_kernels, CUDA, m) {
  m.impl("gru_patch_decode_fwd", &decode_fwd_cuda);
  m.impl("gru_patch_decode_bwd", &decode_bwd_cuda);
  m.impl("gru_patch_loss_fwd", &loss_fwd_cuda);
  m.impl("gru_patch_loss_bwd", &loss_bwd_cuda);
  m.impl("gru_patch_sample", &sample_cuda);
}

#endif  // WITH_CUDA
