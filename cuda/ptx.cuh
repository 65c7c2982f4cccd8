// cuda/ptx.cuh (private): the sm_80+ data-movement instructions the tensor-core kernels share
// (cuda/decode_attention.cu, cuda/quantized_decode_attention.cu, cuda/selection.cu), as inline PTX,
// and the full-warp shuffle reductions (also the split merge's, cuda/split_merge.cuh, and the FP8
// max|x| of cuda/quantize.cu).
//
//   cp_async16(shared_dst, global_src);   // 16 bytes, bypassing L1
//   cp_async_commit();
//   cp_async_wait<1>();                   // all but the newest group have landed
//   ldmatrix_x4(fragments, shared_row);   // four 8x8 b16 matrices
//   mma16816<__half>(acc, a0, a1, a2, a3, b0, b1);  // acc (16x8 fp32) += A (16x16) B (16x8)
//   m = warp_max(m); l = warp_sum(l);             // every lane gets the warp's max / sum
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

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
// Brings the 128-byte line holding `gmem` into L2 (no register, nothing to wait for).
__device__ inline void prefetch_l2(const void* gmem) {
  asm volatile("prefetch.global.L2 [%0];\n" ::"l"(gmem));
}
__device__ inline void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
// Waits until at most kPending of this thread's committed groups are still in flight.
template <int kPending>
__device__ inline void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending));
}

// Four 8x8 b16 matrices from shared memory, lanes 8i .. 8i + 7 giving the row addresses of matrix
// i: thread (g, t) receives word t of row g of each (trans: rows 2t, 2t + 1 of b16 column g). The
// row is a pointer, or a shared-window address (for swizzled layouts computed as integers).
__device__ inline void ldmatrix_x4(std::uint32_t (&r)[4], unsigned row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(row));
}
__device__ inline void ldmatrix_x4_trans(std::uint32_t (&r)[4], unsigned row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(row));
}
__device__ inline void ldmatrix_x4(std::uint32_t (&r)[4], const void* row) {
  ldmatrix_x4(r, shared_address(row));
}
__device__ inline void ldmatrix_x4_trans(std::uint32_t (&r)[4], const void* row) {
  ldmatrix_x4_trans(r, shared_address(row));
}

// acc (16x8, fp32) += A (16x16, row-major fragments a0 .. a3) B (16x8, column-major b0, b1), one
// mma.sync.m16n8k16 with T = __half or __nv_bfloat16 operands.
template <class T>
__device__ inline void mma16816(float (&c)[4], std::uint32_t a0, std::uint32_t a1, std::uint32_t a2,
                                std::uint32_t a3, std::uint32_t b0, std::uint32_t b1) {
  static_assert(std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>);
  if constexpr (std::is_same_v<T, __nv_bfloat16>)
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  else
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// Full-warp reductions (butterfly: every lane gets the result).
__device__ inline float warp_max(float x) {
#pragma unroll
  for (int o = 16; o > 0; o /= 2) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}
__device__ inline float warp_sum(float x) {
#pragma unroll
  for (int o = 16; o > 0; o /= 2) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

}  // namespace kvc::ops::ptx
