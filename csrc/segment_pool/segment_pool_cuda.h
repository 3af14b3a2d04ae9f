// Launch interface between the CUDA kernels (segment_pool.cu: CUDA headers only) and their torch binding
// (segment_pool_cuda.cpp). Plain structs, no torch types.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace agf_segpool {

enum class DType { Float32, Float16, BFloat16 };

// A [T, H, E] tensor with a contiguous last dimension: base pointer and element strides.
struct Rows {
  const void* data;
  int64_t st, sh;
};

struct FwdParams {
  const void* queries;     // [Q, H, D] contiguous
  Rows k, v;               // [T, H, D], [T, H, Dv]
  const int32_t* offsets;  // [S + 1], rising strictly from 0 to T
  void* out;               // [S, Q, H, Dv] contiguous
  float* lse;              // [S, Q, H]: natural log-sum-exp of the scaled scores
  int S, Q, H, D, Dv;
  float scale;
};

struct BwdParams {
  const void* grad_out;    // [S, Q, H, Dv] contiguous
  const void* out;         // [S, Q, H, Dv] contiguous, from the forward
  const float* lse;        // [S, Q, H] from the forward
  const void* queries;     // [Q, H, D] contiguous
  Rows k, v;
  const int32_t* offsets;
  void* dq;                // [Q, H, D] contiguous
  void* dk;                // [T, H, D] contiguous
  void* dv;                // [T, H, Dv] contiguous
  float* dq_partial;       // [partials, Q, H, D] fp32 scratch: one share of dq per block row
  int partials;            // blocks along the segments (each walks segments s = x, x + partials, ...)
  int S, Q, H, D, Dv;
  float scale;
};

constexpr int kMaxHeadDim = 128;
constexpr int kMaxQueries = 16;
constexpr int kMaxPartials = 512;

cudaError_t fwd(const FwdParams& p, DType dtype, cudaStream_t stream);
cudaError_t bwd(const BwdParams& p, DType dtype, cudaStream_t stream);

}  // namespace agf_segpool
