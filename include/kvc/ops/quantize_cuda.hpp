// kvc/ops/quantize_cuda.hpp: quantize + pack kernels on the GPU, writing exactly the byte layouts
// of docs/formats.md (KIVI on either axis with its decode-time flushes, per-token INT8/INT4, FP8),
// so that a cache filled on the device holds the same bytes as the CPU stores.
//
//   kvc::ops::QuantSpec kivi2{.bits = 2, .group = 32};
//   kvc::ops::quantize_channel_blocks(kvc::Cuda{s}, keys, kivi2, key_blocks);  // per channel
//   kvc::ops::quantize_token_rows(kvc::Cuda{s}, values, kivi2, value_rows);    // per token
//   kvc::ops::flush_channel_residual(kvc::Cuda{s}, residual, kivi2, key_blocks, rows, quantized);
//
// Inputs are bf16 or f16 [B, H, n, D] device views with any strides (channels contiguous): a
// batch of sequences, or one sequence's KV heads (B = 1), or a slice of a larger buffer. Outputs
// are strided views too, so the packed parts of a preallocated cache (rows or blocks [0, capacity))
// are written in place, per (sequence, head) exactly as docs/formats.md lays out one storage head.
// The math is the CPU reference's (kvc/ops/quantize.hpp), in fp32 with IEEE division and round
// half to even from the stored (f16- or f32-rounded) parameters, so codes and parameters are
// bit-identical to the CPU stores' on the same input values (tests/cuda/test_quantize.cpp).
// Every op is asynchronous on the stream and allocates nothing. NaN/Inf inputs, and ranges whose
// f16 parameters overflow, are not detected on the device (the CPU stores reject them): they give
// NaN/Inf parameters and undefined codes.
#pragma once

#include <array>
#include <cstdint>

#include "kvc/core/backend.hpp"
#include "kvc/core/dtype.hpp"
#include "kvc/core/view.hpp"
#include "kvc/ops/quantize.hpp"

namespace kvc::ops {

// One quantized format: b-bit codes in groups of `group` elements sharing their parameters.
// Asymmetric: the P5 min-max quantizer (codes 0..2^b-1, scale and minimum). Symmetric: absmax
// (codes -qmax..qmax as two's complement in their field, scale only; token axis only).
struct QuantSpec {
  int bits = 2;    // 2, 4 or 8
  int group = 32;  // elements per (scale, minimum)
  bool symmetric = false;
  ParamDType params = ParamDType::f16;  // dtype of scales and minimums
};

// Scales or minimums on the device, stored as f16 or f32: element (b, h, r, c) at
// data + b * strides[0] + h * strides[1] + r * strides[2] + c * strides[3] (elements of dtype).
struct DeviceParams {
  ParamDType dtype = ParamDType::f16;
  void* data = nullptr;  // nullptr: absent (the minimum of a symmetric format)
  std::array<std::int64_t, 4> shape{};
  std::array<std::int64_t, 4> strides{};
};
inline DeviceParams device_params(DeviceView<f16, 4> v) {
  return {ParamDType::f16, v.data, v.shape, v.strides};
}
inline DeviceParams device_params(DeviceView<float, 4> v) {
  return {ParamDType::f32, v.data, v.shape, v.strides};
}

// Channel axis (KIVI's keys): block k of a head holds G consecutive tokens; channel c's G codes
// packed along tokens into G / (32/bits) words, one (scale, minimum) per (block, channel).
struct ChannelBlocks {
  DeviceView<std::uint32_t, 5> codes;  // [B, H, capacity_blocks, D, G / (32/bits)]
  DeviceParams scale;                  // [B, H, capacity_blocks, D]
  DeviceParams minimum;                // [B, H, capacity_blocks, D]
};

// Token axis (KIVI's values, per-token INT8/INT4): token t's D codes packed along channels into
// ceil(D / (32/bits)) words (a partial last word has zero unused fields), one parameter set per
// group of G channels.
struct TokenRows {
  DeviceView<std::uint32_t, 4> codes;  // [B, H, capacity_rows, ceil(D / (32/bits))]
  DeviceParams scale;                  // [B, H, capacity_rows, D / G]
  DeviceParams minimum;                // [B, H, capacity_rows, D / G]; data nullptr if symmetric
};

// ---- bulk quantization (prefill) ---------------------------------------------------------------
// Channel axis, asymmetric: x's n tokens (n % G == 0) become blocks [0, n / G) of `out` (slice the
// block axis to start elsewhere). bits in {2, 4, 8}, G a positive multiple of 32/bits, G <= 256.
void quantize_channel_blocks(Cuda, DeviceView<const bf16, 4> x,  // [B, H, n, D]
                             const QuantSpec& spec, const ChannelBlocks& out);
void quantize_channel_blocks(Cuda, DeviceView<const f16, 4> x, const QuantSpec& spec,
                             const ChannelBlocks& out);

// Token axis: token t of (b, h) becomes row first_row(b, h) + t of `out` (first_row empty: row t),
// rows at or past the capacity are skipped. Asymmetric bits {2, 4, 8}; symmetric {4, 8} (and 2);
// G divides D. Decode-time appends into ragged stores pass the stores' row counts as first_row
// (the caller advances its counts by n).
void quantize_token_rows(Cuda, DeviceView<const bf16, 4> x,  // [B, H, n, D]
                         const QuantSpec& spec, const TokenRows& out,
                         DeviceView<const std::int32_t, 2> first_row = {});  // [B, H] or empty
void quantize_token_rows(Cuda, DeviceView<const f16, 4> x, const QuantSpec& spec,
                         const TokenRows& out, DeviceView<const std::int32_t, 2> first_row = {});

// ---- f16 residuals and the decode-time flushes -------------------------------------------------
// Appends x's n rows (rounded to f16, as the CPU residuals store them) at rows count(b, h) ..
// of `rows` and advances count by n; rows past the capacity are dropped (count stops there).
void append_rows(Cuda, DeviceView<const bf16, 4> x,   // [B, H, n, D]
                 DeviceView<f16, 4> rows,             // [B, H, capacity, D]
                 DeviceView<std::int32_t, 2> count);  // [B, H]
void append_rows(Cuda, DeviceView<const f16, 4> x, DeviceView<f16, 4> rows,
                 DeviceView<std::int32_t, 2> count);

// Channel-axis flush (KIVI keys after a decode step): where residual_rows(b, h) == R =
// residual.size(2), the R residual rows become blocks quantized_rows(b, h) / G .. + R / G of
// `out`, quantized_rows grows by R and residual_rows becomes 0. Other heads, and heads whose
// blocks would pass the capacity, are left as they are. R % G == 0.
void flush_channel_residual(Cuda, DeviceView<const f16, 4> residual,  // [B, H, R, D]
                            const QuantSpec& spec, const ChannelBlocks& out,
                            DeviceView<std::int32_t, 2> residual_rows,    // [B, H]
                            DeviceView<std::int32_t, 2> quantized_rows);  // [B, H]

// Token-axis flush (KIVI values; per-token INT with residual > 0): where window_rows(b, h) >
// keep, the window's oldest row (row 0) becomes row quantized_rows(b, h) of `out`, the window
// moves up by one row, window_rows shrinks by 1 and quantized_rows grows by 1. Heads whose row
// would pass the capacity are left as they are.
void flush_token_window(Cuda, DeviceView<f16, 4> window,  // [B, H, capacity, D]
                        int keep, const QuantSpec& spec, const TokenRows& out,
                        DeviceView<std::int32_t, 2> window_rows,      // [B, H]
                        DeviceView<std::int32_t, 2> quantized_rows);  // [B, H]

// ---- FP8 ---------------------------------------------------------------------------------------
// Computed scales (vLLM's calculate_kv_scales rule): scale = max|x| / fp8_max in fp32, 1 when the
// maximum is 0 or n == 0, over each (b, h) (`head`) or over all heads of sequence b (`sequence`,
// the CPU's scope=tensor for one sequence; every h of b gets the same value).
enum class Fp8ScaleScope { head, sequence };
void fp8_scales(Cuda, DeviceView<const bf16, 4> x,                               // [B, H, n, D]
                Fp8Kind kind, Fp8ScaleScope scope, DeviceView<float, 2> scale);  // [B, H]
void fp8_scales(Cuda, DeviceView<const f16, 4> x, Fp8Kind kind, Fp8ScaleScope scope,
                DeviceView<float, 2> scale);

// codes(b, h, first_row(b, h) + t, c) = fp8(x(b, h, t, c) / scale(b, h)): fp32 division, round
// to nearest even, saturating at +-fp8_max. A static per-tensor scale is a [B, H] view with
// strides 0. Rows past the capacity are skipped.
void quantize_fp8(Cuda, DeviceView<const bf16, 4> x,                  // [B, H, n, D]
                  DeviceView<const float, 2> scale,                   // [B, H], finite and > 0
                  Fp8Kind kind, DeviceView<std::uint8_t, 4> codes,    // [B, H, capacity, D]
                  DeviceView<const std::int32_t, 2> first_row = {});  // [B, H] or empty
void quantize_fp8(Cuda, DeviceView<const f16, 4> x, DeviceView<const float, 2> scale, Fp8Kind kind,
                  DeviceView<std::uint8_t, 4> codes,
                  DeviceView<const std::int32_t, 2> first_row = {});

}  // namespace kvc::ops
