// Launch interface between the CUDA kernels (linear_attention.cu: CUDA headers only) and their torch
// binding (linear_attention_cuda.cpp). Plain structs, no torch types.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace agf_la {

enum class DType { Float32, Float16, BFloat16 };

constexpr int kChunk = 64;       // tokens per chunk (as the CPU kernels: the chunk-state layout is shared)
constexpr int kMaxHeadDim = 128;  // D and Dv

// A [B, L, H, E] tensor with a contiguous last dimension: base pointer and element strides.
struct Rows {
  void* data;
  int64_t sb, sl, sh;
};

// Where the sequences are. Unpacked: n = B sequences of L tokens, chunk programs c = b·NC + i.
// Packed (cu_seqlens): n segments of one row; chunk program c is chunk chunk_idx[c] of segment
// chunk_seq[c]. Segment i's chunk states start at row ⌊cu_seqlens[i] / C⌋ + i (rows never overlap).
struct Sequences {
  const int32_t* cu_seqlens;  // [n + 1] or null
  const int32_t* chunk_seq;   // [n_chunks] (packed only)
  const int32_t* chunk_idx;   // [n_chunks] (packed only)
  int n_seq, n_chunks, B, L, H, NC;
};

struct Options {
  int D, Dv;
  bool elu, normalize;
  float feature_eps, scale, eps;
};

struct FwdParams {
  Rows q, k, v, o;
  const float *S0, *z0;      // [n, H, D, Dv], [n, H, D] or null
  float* den;                // [B, H, L] (normalize only)
  float *S, *z;              // final state [n, H, D, Dv], [n, H, D]
  float *chunk_S, *chunk_z;  // state before each chunk: [rows, H, Dv, D] (Sᵀ), [rows, H, D]
  Sequences seq;
  Options opt;
};

struct BwdParams {
  Rows q, k, v, o, grad_o, dq, dk, dv;
  const float* den;
  const float *chunk_S, *chunk_z;
  float *chunk_dS, *chunk_dz;  // workspace, same layout: gradient of the state after each chunk
  const float *dS, *dz;        // gradient of the final state, or null
  float *dS0, *dz0;            // [n, H, D, Dv], [n, H, D]
  Sequences seq;
  Options opt;
};

struct StepParams {
  const void *q, *k, *v;  // [B, H, D], [B, H, D], [B, H, Dv], contiguous last dimension
  int64_t q_sb, q_sh, k_sb, k_sh, v_sb, v_sh;
  float *S, *z;  // [B, H, D, Dv], [B, H, D] contiguous, updated in place
  void* o;       // [B, H, Dv] contiguous
  int B, H;
  Options opt;
};

cudaError_t fwd(const FwdParams& p, DType dtype, cudaStream_t stream);
cudaError_t bwd(const BwdParams& p, DType dtype, cudaStream_t stream);
cudaError_t step(const StepParams& p, DType dtype, cudaStream_t stream);

}  // namespace agf_la
