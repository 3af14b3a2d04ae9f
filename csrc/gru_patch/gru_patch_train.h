// Teacher-forced training kernels of the GRU patch decoder (gru_patch_decode, gru_patch_loss): the
// forward and backward of one tile of patches over all P steps, and the per-thread partial weight
// gradients. Part of gru_patch.cpp's translation unit (see gru_patch_math.h).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <limits>
#include <vector>

#include "gru_patch_math.h"

namespace agf_gru_patch {

constexpr int64_t kTile = 128;      // patches per work item of the tiled kernels
constexpr int64_t kTableMin = 512; // build the byte table when M·P >= this (it costs 256 rows)

// ------------------------------------------------------------------------------------------------
// The weights of one call, as raw pointers into contiguous acc-dtype tensors.

template <typename T>
struct Weights {
  int64_t h;
  const T* emb;    // [256, h]
  const T* w_ih;   // [3h, 2h]: columns [0, h) multiply the byte embedding, [h, 2h) the context
  const T* w_hh;   // [3h, h]
  const T* b_ih;   // [3h]
  const T* b_hh;   // [3h], or b_hh + W_hh·0 when hh0_added (see run_checked)
  const T* table;  // [256, 3h] = emb·W_ih[:, :h]ᵀ, or nullptr
  bool hh0_added = false;
  Tensor w_e() const { return view(w_ih, 3 * h, h, 2 * h); }
  Tensor w_c() const { return view(w_ih + h, 3 * h, h, 2 * h); }
  Tensor hh() const { return view(w_hh, 3 * h, h, h); }
};

template <typename T>
Weights<T> weights(const Tensor& emb, const Tensor& w_ih, const Tensor& w_hh, const Tensor& b_ih, const Tensor& b_hh,
                   const Tensor& table) {
  return {emb.size(1),        emb.data_ptr<T>(),  w_ih.data_ptr<T>(), w_hh.data_ptr<T>(),
          b_ih.data_ptr<T>(), b_hh.data_ptr<T>(), table.defined() ? table.data_ptr<T>() : nullptr};
}

// The 256×3h byte table, when `steps` (= M·P) is enough to amortise its 256 rows.
inline Tensor byte_table(const Tensor& emb, const Tensor& w_ih, int64_t steps) {
  if (steps < kTableMin) return Tensor();
  return at::mm(emb, w_ih.narrow(1, 0, emb.size(1)).t());
}

// PyTorch's GRU computes W_hh·h at every step, the first too, where h = 0: there the product is 0 in a row
// of finite weights but NaN (inf·0, NaN·0) in a row holding an inf or NaN. The kernels skip that product.
// Such a row makes its entry of every later W_hh·h non-finite as well, so they look at one patch's product
// at step 1 instead (step1_product_ok): run(W) returns false when it stopped there on a non-finite one,
// and the call runs again with b_hh + W_hh·0 in place of b_hh, as PyTorch's step 0 has it (at later steps
// a NaN row adds nothing: its NaN in h_1 already makes all of W_hh·h NaN). A call of one step has no
// step 1 to look at and adds W_hh·0 from the start. b_hh: the tensor W.b_hh points into.
template <typename T, typename F>
void run_checked(Weights<T> W, const Tensor& b_hh, int64_t P, const F& run) {
  if (P > 1 && run(W)) return;
  const Tensor b = b_hh.clone();  // + W_hh·0: NaN where a row of W_hh holds an inf or NaN, else + 0
  T* bp = b.data_ptr<T>();
  for (int64_t j = 0; j < 3 * W.h; ++j)
    if (!agf_simd::all_finite(W.w_hh + j * W.h, W.h)) bp[j] = std::numeric_limits<T>::quiet_NaN();
  W.b_hh = bp;
  W.hh0_added = true;
  run(W);
}

// Whether a kernel may go on after computing step t's W_hh·h: false at step 1 when gh, one patch's product
// [3h] (or a thread's rows of it, n values), is not finite and W_hh·0 is not yet in b_hh (see run_checked).
template <typename T>
inline bool step1_product_ok(const Weights<T>& W, int64_t t, const T* gh, int64_t n) {
  return t != 1 || W.hh0_added || agf_simd::all_finite(gh, n);
}

// Patches per tile: enough tiles to feed every thread, at most kTile rows each.
inline int64_t tile_rows(int64_t M) {
  const int64_t per_thread = (M + at::get_num_threads() - 1) / std::max(1, at::get_num_threads());
  return std::max<int64_t>(1, std::min(kTile, per_thread));
}

template <typename F>
void for_each_tile(int64_t M, const F& f) {
  const int64_t ts = tile_rows(M);
  at::parallel_for(0, (M + ts - 1) / ts, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) f(b * ts, std::min(ts, M - b * ts));
  });
}

// for_each_tile for an f that returns whether it ran to the end: whether every tile's did.
template <typename F>
bool all_tiles(int64_t M, const F& f) {
  std::atomic<bool> all{true};
  for_each_tile(M, [&](int64_t r0, int64_t rows) {
    if (!f(r0, rows)) all = false;
  });
  return all;
}

// The byte part of the input projection for `rows` patches at one step: table rows, or rows of `buf`
// [rows, 3h] projected from the gathered embeddings (`ebuf` [rows, h] scratch).
template <typename T>
void byte_projection(const Weights<T>& W, int64_t rows, const int64_t* bytes, int64_t stride, const T** ge, T* buf,
                     T* ebuf) {
  const int64_t h = W.h, G = 3 * h;
  if (W.table) {
    for (int64_t i = 0; i < rows; ++i) ge[i] = W.table + bytes[i * stride] * G;
    return;
  }
  for (int64_t i = 0; i < rows; ++i) std::memcpy(ebuf + i * h, W.emb + bytes[i * stride] * h, h * sizeof(T));
  gemm(view(buf, rows, G, G), view(ebuf, rows, h, h), W.w_e().t(), false);
  for (int64_t i = 0; i < rows; ++i) ge[i] = buf + i * G;
}

// ------------------------------------------------------------------------------------------------
// Teacher-forced forward of one tile: `rows` patches from row r0, all P steps; false where it stopped at
// step 1 (see run_checked).
// bytes: [M, P] input bytes; hid: the tile's [rows, P, h]; gates: the tile's [rows, P, 4h] or nullptr.

template <typename T>
bool forward_tile(const Weights<T>& W, const T* ctx, const int64_t* bytes, int64_t P, int64_t r0, int64_t rows,
                  T* hid, T* gates) {
  const int64_t h = W.h, G = 3 * h;
  Scratch<T> gc(rows * G), gh(rows * G), gbuf(W.table ? 0 : rows * G), ebuf(W.table ? 0 : rows * h);
  std::vector<const T*> ge(rows);
  gemm(view(gc.data(), rows, G, G), view(ctx + r0 * h, rows, h, h), W.w_c().t(), false);
  for (int64_t t = 0; t < P; ++t) {
    byte_projection(W, rows, bytes + r0 * P + t, P, ge.data(), gbuf.data(), ebuf.data());
    if (t > 0) gemm(view(gh.data(), rows, G, G), view(hid + (t - 1) * h, rows, h, P * h), W.hh().t(), false);
    if (!step1_product_ok(W, t, gh.data(), G)) return false;
    for (int64_t i = 0; i < rows; ++i) {
      T* out = hid + (i * P + t) * h;
      gate_row(h, ge[i], gc.data() + i * G, t > 0 ? gh.data() + i * G : nullptr, W.b_ih, W.b_hh,
               t > 0 ? out - h : nullptr, out, gates ? gates + (i * P + t) * 4 * h : nullptr);
    }
  }
  return true;
}

// Per-thread partial gradients of the GRU weights (summed over threads at the end).
template <typename T>
struct Partial {
  T* dw_hh;   // [3h, h]
  T* dw_c;    // [3h, h]
  T* dtable;  // [256, 3h]: gradient of the byte table, turned into byte_emb and W_ih[:, :h] grads
  T* db_ih;   // [3h]
  T* db_hh;   // [3h]
};

// Backward of one tile. hid, gates: the tile's saved [rows, P, h], [rows, P, 4h]; dH: the tile's dL/dhidden
// [rows, P, h]; dctx: the tile's rows of dL/dcontext.
template <typename T>
void backward_tile(const Weights<T>& W, const T* ctx, const int64_t* bytes, int64_t P, int64_t r0, int64_t rows,
                   const T* hid, const T* gates, const T* dH, T* dctx, const Partial<T>& g) {
  const int64_t h = W.h, G = 3 * h;
  Scratch<T> dh(rows * h), dgi(rows * G), dgh(rows * G);
  std::vector<T> dgc(rows * G, T(0));
  for (int64_t i = 0; i < rows; ++i) std::memcpy(dh.data() + i * h, dH + (i * P + P - 1) * h, h * sizeof(T));
  for (int64_t t = P - 1; t >= 0; --t) {
    for (int64_t i = 0; i < rows; ++i) {
      const T* hprev = t > 0 ? hid + (i * P + t - 1) * h : nullptr;
      T* gi = dgi.data() + i * G;
      T* gh = dgh.data() + i * G;
      gate_row_bwd(h, dh.data() + i * h, gates + (i * P + t) * 4 * h, hprev, gi, gh);
      T* gci = dgc.data() + i * G;
      T* row = g.dtable + bytes[(r0 + i) * P + t] * G;
      for (int64_t j = 0; j < G; ++j) {
        gci[j] += gi[j];
        row[j] += gi[j];
        g.db_hh[j] += gh[j];
      }
    }
    if (t == 0) {
      // PyTorch also adds dgh_0ᵀ·h_0 to dW_hh, with h_0 = 0: NaN (inf·0, NaN·0) in each row j where a patch's
      // dgh_0[j] is inf or NaN, zero elsewhere (skipped).
      if (!agf_simd::all_finite(dgh.data(), rows * G))
        for (int64_t j = 0; j < G; ++j)
          for (int64_t i = 0; i < rows; ++i)
            if (!std::isfinite(dgh[i * G + j])) {
              std::fill(g.dw_hh + j * h, g.dw_hh + (j + 1) * h, std::numeric_limits<T>::quiet_NaN());
              break;
            }
      break;
    }
    const Tensor dgh_v = view(dgh.data(), rows, G, G);
    gemm(view(dh.data(), rows, h, h), dgh_v, W.hh(), true);
    gemm(view(g.dw_hh, G, h, h), dgh_v.t(), view(hid + (t - 1) * h, rows, h, P * h), true);
    for (int64_t i = 0; i < rows; ++i) {
      const T* add = dH + (i * P + t - 1) * h;
      T* d = dh.data() + i * h;
      for (int64_t j = 0; j < h; ++j) d[j] += add[j];
    }
  }
  const Tensor dgc_v = view(dgc.data(), rows, G, G);
  gemm(view(dctx, rows, h, h), dgc_v, W.w_c(), false);
  gemm(view(g.dw_c, G, h, h), dgc_v.t(), view(ctx + r0 * h, rows, h, h), true);
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < G; ++j) g.db_ih[j] += dgc[i * G + j];
}
// Per-thread partial gradients, zeroed; summed by `finish`.
struct PartialBuffers {
  Tensor dw_hh, dw_c, dtable, db_ih, db_hh;
  PartialBuffers(int64_t threads, int64_t h, at::ScalarType a) {
    auto z = [&](std::initializer_list<int64_t> s) { return at::zeros(s, at::TensorOptions().dtype(a)); };
    dw_hh = z({threads, 3 * h, h});
    dw_c = z({threads, 3 * h, h});
    dtable = z({threads, kVocab, 3 * h});
    db_ih = z({threads, 3 * h});
    db_hh = z({threads, 3 * h});
  }
  template <typename T>
  Partial<T> of(int64_t thread) const {
    return {dw_hh[thread].data_ptr<T>(), dw_c[thread].data_ptr<T>(), dtable[thread].data_ptr<T>(),
            db_ih[thread].data_ptr<T>(), db_hh[thread].data_ptr<T>()};
  }
  // (dbyte_emb, dweight_ih, dweight_hh, dbias_ih, dbias_hh) in dtype `out`.
  std::vector<Tensor> finish(const Tensor& emb, const Tensor& w_ih, at::ScalarType out) const {
    const int64_t h = emb.size(1);
    const Tensor dtable_sum = dtable.sum(0);
    const Tensor dw_e = dtable_sum.t().mm(emb);
    const Tensor demb = dtable_sum.mm(w_ih.narrow(1, 0, h));
    return {demb.to(out), at::cat({dw_e, dw_c.sum(0)}, 1).to(out), dw_hh.sum(0).to(out), db_ih.sum(0).to(out),
            db_hh.sum(0).to(out)};
  }
};

// ------------------------------------------------------------------------------------------------
// The fused loss: the bytes fed under teacher forcing, and the head's softmax gradient.

// prev_bytes = [sos, targets[:, :-1]].
inline Tensor teacher_bytes(const Tensor& targets, int64_t sos) {
  const Tensor t = targets.to(at::kLong);
  return at::cat({at::full({t.size(0), 1}, sos, t.options()), t.narrow(1, 0, t.size(1) - 1)}, 1).contiguous();
}

// l ← g·(softmax(l) - onehot(y)) for one row of logits (bias included) with log-sum-exp `lse`.
template <typename T>
inline void softmax_grad_row(T* l, T lse, int64_t y, T g) {
  exp_affine(l, -lse, T(1), l, kVocab);
  for (int64_t k = 0; k < kVocab; ++k) l[k] *= g;
  l[y] -= g;
}

}  // namespace agf_gru_patch
