// Next-byte entropy and entropy segmentation on the CPU (docs/ops.md §1.4).
//
// Entropy: one task per row of logits (b, t). A row of V logits stays in L1 across its two passes: the
// maximum, then Z = sum e^(x - m) and A = sum e^(x - m) (x - m) in vectors (common/cpu_simd.h); H = log Z - A / Z.
// Nothing of size [B, L, V] besides the input is touched. Boundaries: one scan per batch row, O(L), after
// all entropies of the row are known (the delta rule reads H_{t-1}, the global rule H_{t-1}; max_len a run).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <limits>

#include "checks.h"
#include "cpu_simd.h"

namespace {

using agf_simd::Vec;
using agf_simd::vec_t;
using agf_simd::vexp;
using agf_simd::vload;

constexpr int kRuleDelta = 0;  // _common.RULES
constexpr int kRuleGlobal = 1;

// -sum p log p of softmax(x[0 .. V)). A logit of -inf has p = 0 and adds nothing (p log p -> 0).
template <typename T> T row_entropy(const T* x, int64_t V) {
  using Vt = vec_t<T>;
  constexpr int W = Vec<T>::W;
  const T ninf = -std::numeric_limits<T>::infinity();
  Vt vm = Vt{} + ninf;
  int64_t i = 0;
  for (; i + W <= V; i += W) {
    const Vt v = vload(x + i);
    vm = v > vm ? v : vm;
  }
  T m = ninf;
  for (int j = 0; j < W; ++j) m = std::max(m, vm[j]);
  for (; i < V; ++i) m = std::max(m, x[i]);
  Vt z = Vt{}, a = Vt{};
  i = 0;
  for (; i + W <= V; i += W) {
    const Vt d = vload(x + i) - m;
    const Vt e = vexp(d);
    const auto finite = d > (Vt{} + ninf);
    z += finite ? e : Vt{};
    a += finite ? e * d : Vt{};
  }
  T zs = agf_simd::hsum<T>(z), as = agf_simd::hsum<T>(a);
  for (; i < V; ++i) {
    const T d = x[i] - m;
    if (d > ninf) {
      const T e = std::exp(d);
      zs += e;
      as += e * d;
    }
  }
  return std::log(zs) - as / zs;
}

// Starts of one batch row from its entropies h[0 .. L) (see _common.boundaries for the rules).
template <typename T>
void row_starts(const T* h, const int32_t* seq_start, int64_t L, int64_t rule, T threshold, T delta, int64_t max_len,
                bool* starts) {
  int64_t run = 0;  // positions since the last start
  for (int64_t t = 0; t < L; ++t) {
    const int64_t i = t - seq_start[t];  // position within its sequence
    bool cut;
    if (rule == kRuleDelta)
      cut = i == 0 || h[t] > h[t - 1] + delta || h[t] > threshold;
    else
      cut = i <= 1 || h[t - 1] > threshold;
    if (!cut && max_len > 0 && run == max_len) cut = true;
    starts[t] = cut;
    run = cut ? 1 : run + 1;
  }
}

std::tuple<at::Tensor, at::Tensor> entropy_segments_fwd_cpu(const at::Tensor& logits_, const at::Tensor& seq_start_,
                                                            int64_t rule, double threshold, double delta,
                                                            int64_t max_len) {
  AGF_CHECK_DIM(logits_, 3);
  AGF_CHECK_DEVICE(logits_, at::kCPU);
  AGF_CHECK_DTYPE(seq_start_, at::kInt);
  TORCH_CHECK(rule == kRuleDelta || rule == kRuleGlobal, "rule must be 0 (delta) or 1 (global)");
  const at::Tensor logits = logits_.contiguous(), seq_start = seq_start_.contiguous();
  const int64_t B = logits.size(0), L = logits.size(1), V = logits.size(2);
  TORCH_CHECK(seq_start.numel() == L, "seq_start must have L entries");
  const int32_t* ss = seq_start.data_ptr<int32_t>();
  for (int64_t t = 0; t < L; ++t) TORCH_CHECK(ss[t] >= 0 && ss[t] <= t, "seq_start[t] must lie in [0, t]");
  TORCH_CHECK(V >= 1, "logits must have V >= 1");
  at::Tensor entropy = at::empty({B, L}, logits.options());
  at::Tensor starts = at::empty({B, L}, logits.options().dtype(at::kBool));
  AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "entropy_segments_fwd", [&] {
    const scalar_t* x = logits.data_ptr<scalar_t>();
    scalar_t* h = entropy.data_ptr<scalar_t>();
    at::parallel_for(0, B * L, std::max<int64_t>(1, 16384 / V), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) h[r] = row_entropy<scalar_t>(x + r * V, V);
    });
    bool* s = starts.data_ptr<bool>();
    at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b)
        row_starts<scalar_t>(h + b * L, ss, L, rule, static_cast<scalar_t>(threshold), static_cast<scalar_t>(delta),
                             max_len, s + b * L);
    });
  });
  return {entropy, starts};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(agiformer_kernels, m) {
  m.def(
      "entropy_segments_fwd(Tensor logits, Tensor seq_start, int rule, float threshold, float delta, int max_len) "
      "-> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(agiformer_kernels, CPU, m) { m.impl("entropy_segments_fwd", &entropy_segments_fwd_cpu); }
