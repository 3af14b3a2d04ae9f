// Launch interface between the CUDA kernels (entropy_segments.cu: CUDA headers only) and their torch binding
// (entropy_segments_cuda.cpp). Plain structs, no torch types.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace agf_entropy {

enum class DType { Float32, Float16, BFloat16 };

constexpr int kRuleDelta = 0;  // _common.RULES
constexpr int kRuleGlobal = 1;

struct Params {
  const void* logits;         // [B·L, V], rows at stride row_stride, last dimension contiguous
  int64_t row_stride;
  const int32_t* seq_start;   // [L]: first position of each position's sequence
  float* entropy;             // [B, L]
  bool* starts;               // [B, L]
  int B, L, V;
  int rule;
  float threshold, delta;     // threshold +inf where the delta rule has none
  int64_t max_len;            // 0: none
};

cudaError_t entropy_segments(const Params& p, DType dtype, cudaStream_t stream);

}  // namespace agf_entropy
