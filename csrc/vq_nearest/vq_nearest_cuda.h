// Launch interface between the CUDA kernels (vq_nearest.cu: CUDA headers only) and their torch binding
// (vq_nearest_cuda.cpp). Plain structs, no torch types.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace agf_vq {

enum class DType { Float32, Float16, BFloat16 };  // the search
enum class EmaDType { Float32, Float64 };         // the EMA update: z, counts, sums share one

struct NearestParams {
  const void* z;          // [N, D] contiguous
  const void* codebook;   // [K, D] contiguous
  float* code_norm;       // [K] fp32 scratch: |c|^2, written by the first kernel
  int64_t* index;         // [N]
  float* dist;            // [N]: sum_d (z - c_index)^2
  int N, K, D;
};

struct EmaParams {
  const void* z;              // [N, D] contiguous
  const int64_t* order;       // [N]: row numbers of z sorted by their code (stable)
  const int64_t* code_start;  // [K + 1]: code k's rows are order[code_start[k] .. code_start[k+1])
  void* counts;               // [K], updated in place
  void* sums;                 // [K, D] contiguous, updated in place
  void* total;                // [1] scratch: sum of the updated counts
  void* codebook;             // [K, D] contiguous
  int K, D;
  double decay, eps;
};

cudaError_t nearest(const NearestParams& p, DType dtype, cudaStream_t stream);
cudaError_t ema_update(const EmaParams& p, EmaDType dtype, cudaStream_t stream);

}  // namespace agf_vq
