// Fused GRU patch decoder (docs/ops.md §1.3): the CPU ops and their schema.
//
// This file holds what each op does with its arguments (checks, the accumulation dtype, which kernel runs)
// and the registration; the kernels are in headers of this one translation unit:
//   gru_patch_math.h    vector math: the gates, exp and log-sum-exp, the dot tiles of the few-patch products;
//   gru_patch_train.h   the teacher-forced forward and backward of a tile of patches (decode, fused loss);
//   gru_patch_sample.h  the counter-based RNG, the byte choice and the three samplers.
// Headers rather than .cpp files: the kernels are templates instantiated and inlined by the ops here, and
// the build compiles one .cpp per op and instruction set.
//
// Patches are independent P-step recurrences (h_0 = 0), so the work splits into row tiles of up to
// kTile patches, one at::parallel_for item each, and a tile runs all P steps with its hidden state,
// gate pre-activations and logits in thread-local buffers (L2-sized: kTile·3h floats for the gates).
// The input projection W_ih·[e_b | c] is split as the structure allows:
//   - the byte part is a row of the 256×3h table byte_emb·W_ih[:, :h]ᵀ, built once per call when the
//     call has enough steps to amortise it (M·P ≥ 2·256), else one small GEMM on the gathered rows;
//   - the context part is one GEMM per tile, shared by the P steps;
// and each step adds one GEMM with W_hh (skipped at t = 0, where h = 0; run_checked restores the NaNs
// PyTorch's product has there for non-finite weights). Gates, the head's
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
#include "gru_patch_math.h"
#include "gru_patch_train.h"
#include "gru_patch_sample.h"

namespace agf_gru_patch {

constexpr int64_t kSmallM = 32;    // sampling at M <= kSmallM splits units across threads instead, except
constexpr int64_t kLanesMin = 11;  // in fp32 from kLanesMin to kLanesMax patches, where the lanes kernel is
constexpr int64_t kLanesMax = 128; // fastest (the tiles' GEMMs take over from ~200 patches on)

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
    const scalar_t* c = ctx.data_ptr<scalar_t>();
    const int64_t* b = bytes.data_ptr<int64_t>();
    scalar_t* hp = hid.data_ptr<scalar_t>();
    scalar_t* gp = save ? gates.data_ptr<scalar_t>() : nullptr;
    run_checked(weights<scalar_t>(emb, w_ih, w_hh, b_ih, b_hh, table), b_hh, P, [&](const Weights<scalar_t>& W) {
      return all_tiles(M, [&](int64_t r0, int64_t rows) {
        return forward_tile(W, c, b, P, r0, rows, hp + r0 * P * h, gp ? gp + r0 * P * 4 * h : nullptr);
      });
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
    const T *c = ctx.data_ptr<T>(), *hwp = hw.data_ptr<T>(), *hbp = hb.data_ptr<T>();
    const int64_t *b = bytes.data_ptr<int64_t>(), *yp = y.data_ptr<int64_t>();
    T *lp = loss.data_ptr<T>(), *sp = lse.data_ptr<T>();
    run_checked(weights<T>(emb, w_ih, w_hh, b_ih, b_hh, table), b_hh, P, [&](const Weights<T>& W) {
      if (W.hh0_added) {  // a second run: the first one's partial sums are void
        dw_part.zero_();
        db_part.zero_();
      }
      return all_tiles(M, [&](int64_t r0, int64_t rows) {
        const int64_t n = rows * P;
        Scratch<T> local(save ? 0 : n * h), logits(n * kVocab), e(kVocab);
        T* hp = save ? hid.data_ptr<T>() + r0 * P * h : local.data();
        T* gp = save ? gates.data_ptr<T>() + r0 * P * 4 * h : nullptr;
        if (!forward_tile(W, c, b, P, r0, rows, hp, gp)) return false;
        const Tensor l_v = view(logits.data(), n, kVocab, kVocab), h_v = view(hp, n, h, h);
        gemm(l_v, h_v, view(hwp, kVocab, h, h).t(), false);
        for (int64_t q = 0; q < n; ++q) {
          T* l = logits.data() + q * kVocab;
          const T s = add_bias_lse(l, hbp, e.data());
          sp[r0 * P + q] = s;
          lp[r0 * P + q] = s - l[yp[r0 * P + q]];
          if (head_grad) softmax_grad_row(l, s, yp[r0 * P + q], T(1));
        }
        if (!head_grad) return true;
        const int64_t tid = at::get_thread_num();
        gemm(view(dh_head.data_ptr<T>() + r0 * P * h, n, h, h), l_v, view(hwp, kVocab, h, h), false);
        gemm(dw_part[tid], l_v.t(), h_v, true);
        T* dbp = db_part[tid].data_ptr<T>();
        for (int64_t q = 0; q < n; ++q)
          for (int64_t k = 0; k < kVocab; ++k) dbp[k] += logits[q * kVocab + k];
        return true;
      });
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

// The public gru_patch_sample calls this op without its Python tensor checks (at M = 1 they would be a
// sizeable share of the call), so it checks every tensor argument itself, naming it, with the same exception
// types: TypeError for a dtype that is not a float (an index for prefix), ValueError for shapes, dtype and
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
    // read in place: two item() calls would be two dispatcher round trips, a sizeable share of a call at M = 1
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
    run_checked(weights<float>(emb, w_ih, w_hh, b_ih, b_hh, table), b_hh, P, [&](const Weights<float>& W) {
      return sample_lanes(W, ctx.data_ptr<float>(), hw.data_ptr<float>(), hb.data_ptr<float>(), M, P, pp, forced, sos,
                          sp, out.data_ptr<int64_t>(), threads);
    });
    return out;
  }
#endif
  AT_DISPATCH_FLOATING_TYPES(a, "gru_patch_sample", [&] {
    using T = scalar_t;
    run_checked(weights<T>(emb, w_ih, w_hh, b_ih, b_hh, table), b_hh, P, [&](const Weights<T>& W) {
      if (split)
        return sample_split(W, ctx.data_ptr<T>(), hw.data_ptr<T>(), hb.data_ptr<T>(), M, P, pp, forced, sos, sp,
                            out.data_ptr<int64_t>(), threads);
      return sample_tiled(W, ctx.data_ptr<T>(), hw.data_ptr<T>(), hb.data_ptr<T>(), M, P, pp, forced, sos, sp,
                          out.data_ptr<int64_t>());
    });
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
