// The dtypes of the CUDA kernels, for both sides of each op's launch interface (<op>_cuda.h). An op names
// the dtypes its kernels take in its own enum class DType (Float32, Float16, BFloat16, and Float64 where its
// kernels take fp64; the values are that interface's ABI, which the emulated-kernel tests call with ints):
//   - the kernels (<op>.cu, CUDA headers only) instantiate a launcher per element type with by_dtype;
//   - the torch binding (<op>_cuda.cpp) maps a tensor's dtype to the enum with dtype_of and raises a launcher's
//     error with check_launch. That half needs ATen, so it is compiled only where the bindings are: by the host
//     compiler, with WITH_CUDA.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <type_traits>

namespace agf {

// Loads widen to fp32 and stores narrow from it: every kernel accumulates in fp32 (fp64 for double).
template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };
template <typename T> using acc_t = typename Acc<T>::type;

// Whether an op's DType has Float64, i.e. its kernels take fp64 inputs.
template <typename DType, typename = void> struct HasFloat64 : std::false_type {};
template <typename DType> struct HasFloat64<DType, std::void_t<decltype(DType::Float64)>> : std::true_type {};

// f(T()) for the element type T that dtype names: float, __half, __nv_bfloat16 or double.
template <typename DType, typename F> cudaError_t by_dtype(DType dtype, const F& f) {
  if (dtype == DType::Float32) return f(float());
  if (dtype == DType::Float16) return f(__half());
  if (dtype == DType::BFloat16) return f(__nv_bfloat16());
  if constexpr (HasFloat64<DType>::value)
    if (dtype == DType::Float64) return f(double());
  return cudaErrorInvalidValue;
}

}  // namespace agf

#if defined(WITH_CUDA) && !defined(__CUDACC__)
#include <ATen/ATen.h>

namespace agf {

// The DType of inputs of dtype t; an error naming the kernels ("GRU", ...) for a dtype they do not take.
template <typename DType> DType dtype_of(at::ScalarType t, const char* kernels) {
  switch (t) {
    case at::kFloat: return DType::Float32;
    case at::kHalf: return DType::Float16;
    case at::kBFloat16: return DType::BFloat16;
    case at::kDouble:
      if constexpr (HasFloat64<DType>::value) return DType::Float64;
      [[fallthrough]];
    default:
      TORCH_CHECK(false, "the CUDA ", kernels, " kernels take float16, bfloat16, float32",
                  HasFloat64<DType>::value ? " or float64" : "", ", got ", t);
  }
}

// The accumulation dtype (Acc) of inputs of dtype t.
inline at::ScalarType acc_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// A launcher's error as an exception; what: the launch.
inline void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, what, " failed: ", cudaGetErrorString(err));
}

}  // namespace agf
#endif
