// Launch interface between the CUDA kernels (sliding_window_attention.cu: CUDA headers only) and
// their torch binding (sliding_window_attention_cuda.cpp). Plain structs, no torch types.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace agf_swa {

enum class DType { Float32, Float16, BFloat16 };

// A [B, L, H, E] tensor with a contiguous last dimension: base pointer and element strides.
struct Rows {
  void* data;
  int64_t sb, sl, sh;
};

struct FwdParams {
  Rows q, k, v, o;
  float* lse;                // [B, H, L] fp32, log2 units: m + log2(l) of the scaled scores
  const int32_t* seg_start;  // [L]: first position of each position's sequence
  int B, L, H, D, Dv, window;
  float scale_log2;          // scale * log2(e)
};

struct BwdParams {
  Rows q, k, v, grad_o, dq, dk, dv;
  const float* lse;    // [B, H, L] from the forward
  const float* delta;  // [B, H, L]: rowsum(grad_o * o)
  const int32_t* seg_start;
  const int32_t* seg_end;  // [L]: one past the last position of each position's sequence
  int B, L, H, D, Dv, window;
  float scale, scale_log2;
};

struct StepParams {
  const void *q, *k, *v;  // [B, H, D], [B, H, D], [B, H, Dv] contiguous
  void *k_cache, *v_cache;  // [B, W, H, D], [B, W, H, Dv] contiguous, updated in place
  const int64_t* pos;       // [B]
  void* o;                  // [B, H, Dv]
  int B, H, D, Dv, W;
  float scale_log2;
};

constexpr int kMaxHeadDim = 128;

cudaError_t fwd(const FwdParams& p, DType dtype, cudaStream_t stream);
cudaError_t bwd(const BwdParams& p, DType dtype, cudaStream_t stream);
cudaError_t step(const StepParams& p, DType dtype, cudaStream_t stream);

}  // namespace agf_swa
