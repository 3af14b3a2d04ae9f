// Helpers for the .cu kernels: CUDA headers only (the CPU build of torch lacks its CUDA headers).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "cuda_dtype.h"

namespace agf {

// Loads widen to the accumulation type (Acc, cuda_dtype.h) and stores narrow from it.
__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }
__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_acc(float x);
template <> __device__ __forceinline__ float from_acc<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_acc<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <typename T> __device__ __forceinline__ T from_acc(double x) { return static_cast<T>(x); }

inline int ceil_div(int a, int b) { return (a + b - 1) / b; }

}  // namespace agf

// Launch-error check for host code in .cu files; the binding turns a nonzero return into an error.
#define AGF_CUDA_RETURN_IF_ERROR(expr)        \
  do {                                        \
    cudaError_t err__ = (expr);               \
    if (err__ != cudaSuccess) return err__;   \
  } while (0)
