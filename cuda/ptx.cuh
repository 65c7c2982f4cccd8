// cuda/ptx.cuh (private): the sm_80+ data-movement instructions the tensor-core kernels share
// (cuda/quantized_decode_attention.cu, cuda/selection.cu), as inline PTX.
//
//   cp_async16(shared_dst, global_src);   // 16 bytes, bypassing L1
//   cp_async_commit();
//   cp_async_wait<1>();                   // all but the newest group have landed
//   ldmatrix_x4(fragments, shared_row);   // four 8x8 b16 matrices
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace kvc::ops::ptx {

__device__ inline unsigned shared_address(const void* shared_ptr) {
  return static_cast<unsigned>(__cvta_generic_to_shared(shared_ptr));
}

// Global -> shared copies without staging in registers: 16 bytes through L2 only (.cg), 8 and 4
// bytes through L1 (.ca: the only form those sizes have).
__device__ inline void cp_async16(void* smem, const void* gmem) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(shared_address(smem)),
               "l"(gmem));
}
__device__ inline void cp_async8(void* smem, const void* gmem) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 8;\n" ::"r"(shared_address(smem)), "l"(gmem));
}
__device__ inline void cp_async4(void* smem, const void* gmem) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(shared_address(smem)), "l"(gmem));
}
// 16 bytes, or 16 zero bytes when `valid` is false (the source is then not read).
__device__ inline void cp_async16_or_zero(void* smem, const void* gmem, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(shared_address(smem)),
               "l"(gmem), "r"(valid ? 16 : 0));
}
__device__ inline void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
// Waits until at most kPending of this thread's committed groups are still in flight.
template <int kPending>
__device__ inline void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending));
}

// Four 8x8 b16 matrices from shared memory, lanes 8i .. 8i + 7 giving the row addresses of matrix
// i: thread (g, t) receives word t of row g of each (trans: rows 2t, 2t + 1 of b16 column g).
__device__ inline void ldmatrix_x4(std::uint32_t (&r)[4], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(shared_address(row)));
}
__device__ inline void ldmatrix_x4_trans(std::uint32_t (&r)[4], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(shared_address(row)));
}

}  // namespace kvc::ops::ptx
