// cuda/native_types.cuh (private): the CUDA type behind each of kvc's 16-bit storage types, for
// kernels that load kvc::bf16 / kvc::f16 buffers as __nv_bfloat16 / __half.
//
//   using N = typename kvc::ops::NativeOf<kvc::bf16>::type;  // __nv_bfloat16
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "kvc/core/dtype.hpp"

namespace kvc::ops {

template <class T>
struct NativeOf;
template <>
struct NativeOf<bf16> {
  using type = __nv_bfloat16;
};
template <>
struct NativeOf<f16> {
  using type = __half;
};

}  // namespace kvc::ops
