// Launch interface between the CUDA kernels (gru_patch.cu: CUDA headers only) and their torch binding
// (gru_patch_cuda.cpp). Plain structs, no torch types. "acc" is the accumulation dtype: fp64 for fp64
// inputs, else fp32; "input" is the dtype of the weights.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace agf_gru {

enum class DType { Float32, Float64, Float16, BFloat16 };

constexpr int kMaxHidden = 512;        // fp32/fp16/bf16 (shared memory holds a few [16, h] tiles)
constexpr int kMaxHiddenDouble = 256;  // fp64

struct FwdParams {
  const void* gc;        // [M, 3H] acc: c·W_ih[:, H:]ᵀ + b_ih
  const void* table;     // [256, 3H] acc: byte_emb·W_ih[:, :H]ᵀ
  const int64_t* bytes;  // [M, P] input bytes
  const void* w_hh_t;    // [H, 3H] input: W_hhᵀ, contiguous
  const void* b_hh;      // [3H] input
  void* hid;             // [M, P, H] acc
  void* out;             // [M, P, H] input dtype, or nullptr when it is the acc dtype
  void* gates;           // [M, P, 4H] acc: r, z, n, W_hn·h + b_hn; or nullptr
  int64_t M;
  int P, H;
};

struct BwdParams {
  const void* dH;     // [M, P, H] acc: dL/dhidden
  const void* hid;    // [M, P, H] acc
  const void* gates;  // [M, P, 4H] acc
  const void* w_hh;   // [3H, H] input
  void* dgi;          // [M, P, 3H] acc: dL/d(W_ih·x + b_ih)
  void* dgh;          // [M, P, 3H] acc: dL/d(W_hh·h + b_hh)
  int64_t M;
  int P, H;
};

struct SampleParams {
  const void* gc;         // as FwdParams
  const void* table;
  const void* w_hh_t;
  const void* b_hh;
  const void* head_t;     // [H, 256] input: head_weightᵀ, contiguous
  const void* head_b;     // [256] input
  const int64_t* prefix;  // [M, forced] or nullptr
  const int64_t* seed;    // [2] seed words, or nullptr when greedy
  int64_t* out;           // [M, P]
  int64_t M;
  int P, H, forced, sos, top_k;  // top_k 0: all 256
  bool greedy;
  double inv_temperature;
};

struct CeParams {
  const void* h;       // [R, H] acc hidden rows
  const void* head_w;  // [256, H] input
  const void* head_t;  // [H, 256] input: head_weightᵀ
  const void* head_b;  // [256] input
  const int64_t* y;    // [R] targets
  void* lse;           // [R] acc (written by the forward, read by the backward)
  void* loss;          // [R] acc (forward)
  const void* g;       // [R] acc: dL/dloss (backward)
  void* dh;            // [R, H] acc (backward)
  void* dw;            // [splits, 256, H] acc partial head-weight gradients (backward)
  void* db;            // [splits, 256] acc partial head-bias gradients (backward)
  int64_t R, rows_per_split;
  int H, splits;
};

cudaError_t gru_fwd(const FwdParams& p, DType dtype, cudaStream_t stream);
cudaError_t gru_bwd(const BwdParams& p, DType dtype, cudaStream_t stream);
cudaError_t gru_sample(const SampleParams& p, DType dtype, cudaStream_t stream);
cudaError_t ce_fwd(const CeParams& p, DType dtype, cudaStream_t stream);
cudaError_t ce_bwd(const CeParams& p, DType dtype, cudaStream_t stream);

}  // namespace agf_gru
