// cuda/check.cuh (private): checked CUDA runtime calls and launches, and the argument checks the
// ops share.
//
//   KVC_CUDA_CHECK(cudaMemsetAsync(dst, 0, bytes, stream));
//   my_kernel<<<grid, block, 0, stream>>>(...);
//   KVC_CUDA_CHECK_LAUNCH(stream);
//
// A failing call throws kvc::Error naming the call, the error's name and cudaGetErrorString. With
// the compile definition KVC_SYNC_CHECKS, every launch is followed by a stream synchronize so that
// an asynchronous fault is reported at the launch that caused it.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <initializer_list>

#include "kvc/core/error.hpp"

namespace kvc::cuda_detail {

inline void check(cudaError_t status, const char* call, const char* file, int line) {
  if (status != cudaSuccess) {
    // The runtime also keeps this error as its "last error"; clear it (when not sticky) so that the
    // next launch check does not report it a second time, against the wrong call.
    (void)cudaGetLastError();
    throw CudaError(detail::concat(call, " failed: ", cudaGetErrorName(status), ": ",
                                   cudaGetErrorString(status)),
                    file, line);
  }
}

// Rows of 16-bit elements that start on 16-byte boundaries, as the kernels' 16-byte loads need: the
// pointer 16-byte aligned and every given stride (in elements) a multiple of 8.
inline bool rows_aligned16(const void* ptr, std::initializer_list<std::int64_t> strides) {
  bool ok = reinterpret_cast<std::uintptr_t>(ptr) % 16 == 0;
  for (auto s : strides) ok = ok && s % 8 == 0;
  return ok;
}

}  // namespace kvc::cuda_detail

#define KVC_CUDA_CHECK(call) ::kvc::cuda_detail::check((call), #call, __FILE__, __LINE__)

#if defined(KVC_SYNC_CHECKS)
#define KVC_CUDA_SYNC_AFTER_LAUNCH(stream) KVC_CUDA_CHECK(cudaStreamSynchronize(stream))
#else
#define KVC_CUDA_SYNC_AFTER_LAUNCH(stream) \
  do {                                     \
  } while (false)
#endif

#define KVC_CUDA_CHECK_LAUNCH(stream)   \
  do {                                  \
    KVC_CUDA_CHECK(cudaGetLastError()); \
    KVC_CUDA_SYNC_AFTER_LAUNCH(stream); \
  } while (false)
