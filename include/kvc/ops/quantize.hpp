// kvc/ops/quantize.hpp: the asymmetric min-max quantizer (ALGORITHMS.md P5), bit packing (P6) and
// the two KIVI layouts built from them.
//
//   auto p = kvc::ops::quantize_group(kvc::Cpu{}, group, 2, codes);   // codes[i] in [0, 3]
//   kvc::ops::pack_codes(codes, 2, words);                            // 16 fields per 32-bit word
//   kvc::ops::quantize_keys_per_channel(kvc::Cpu{}, keys, 2, 32, packed, scale, minimum);
//
// Rounding: scale and min are rounded to f16 first (KIVI stores them in the activation dtype), then
// q = round_half_to_even(clamp((x - min) / scale, 0, 2^b - 1)) in fp32. A zero-range group
// (scale == 0 after rounding) gets code 0 and dequantizes exactly to min.
// Packing: element j of a word occupies bits [b*j, b*j + b), least-significant field first.
#pragma once

#include <cstdint>
#include <span>

#include "kvc/core/backend.hpp"
#include "kvc/core/config.hpp"
#include "kvc/core/dtype.hpp"
#include "kvc/core/view.hpp"

namespace kvc::ops {

// Fields per 32-bit word for b-bit codes (b in {1, 2, 4, 8}).
KVC_HOST_DEVICE constexpr int codes_per_word(int bits) { return 32 / bits; }
KVC_HOST_DEVICE constexpr std::int64_t words_for(std::int64_t count, int bits) {
  return (count + codes_per_word(bits) - 1) / codes_per_word(bits);
}
// Field j of a packed word; the mask matters because engines keep these words as int32.
KVC_HOST_DEVICE constexpr std::uint32_t unpack_field(std::uint32_t word, int field, int bits) {
  return (word >> (bits * field)) & ((1u << bits) - 1u);
}
KVC_HOST_DEVICE constexpr std::uint32_t pack_field(std::uint32_t word, int field, int bits,
                                                   std::uint32_t code) {
  return word | ((code & ((1u << bits) - 1u)) << (bits * field));
}

struct GroupParams {
  f16 scale;    // (max - min) / (2^b - 1), rounded to f16
  f16 minimum;  // min, rounded to f16
};

// Quantizes one group; codes.size() == x.size().
GroupParams quantize_group(Cpu, std::span<const float> x, int bits, std::span<std::uint8_t> codes);
inline float dequantize_code(std::uint32_t code, GroupParams p) {
  return static_cast<float>(code) * static_cast<float>(p.scale) + static_cast<float>(p.minimum);
}

// Packs `codes` (each < 2^bits) into words_for(codes.size(), bits) words; unused top fields are 0.
void pack_codes(std::span<const std::uint8_t> codes, int bits, std::span<std::uint32_t> words);
void unpack_codes(std::span<const std::uint32_t> words, int bits, std::span<std::uint8_t> codes);

// KIVI keys: per channel, groups of `group` consecutive tokens. n % group == 0, group % (32/bits)
// == 0. Codes are packed along tokens.
void quantize_keys_per_channel(Cpu, HostView<const float, 2> keys,  // [n, D]
                               int bits, int group,
                               HostView<std::uint32_t, 2> packed,  // [D, n / (32/bits)]
                               HostView<f16, 2> scale,             // [D, n / group]
                               HostView<f16, 2> minimum);          // [D, n / group]
void dequantize_keys_per_channel(Cpu, HostView<const std::uint32_t, 2> packed,
                                 HostView<const f16, 2> scale, HostView<const f16, 2> minimum,
                                 int bits, int group, HostView<float, 2> keys);  // [n, D]

// KIVI values: per token, groups of `group` consecutive channels. D % group == 0,
// group % (32/bits) == 0. Codes are packed along channels.
void quantize_values_per_token(Cpu, HostView<const float, 2> values,  // [n, D]
                               int bits, int group,
                               HostView<std::uint32_t, 2> packed,  // [n, D / (32/bits)]
                               HostView<f16, 2> scale,             // [n, D / group]
                               HostView<f16, 2> minimum);          // [n, D / group]
void dequantize_values_per_token(Cpu, HostView<const std::uint32_t, 2> packed,
                                 HostView<const f16, 2> scale, HostView<const f16, 2> minimum,
                                 int bits, int group, HostView<float, 2> values);  // [n, D]

// ---- Per-token formats: parameter dtypes, symmetric quantizer, FP8 (quant-formats) --------------
// Used by the per-token INT8/INT4 and FP8 policies and by KIVI's scale-dtype option.
//
//   float s = kvc::ops::quantize_symmetric(kvc::Cpu{}, row, 8, kvc::ops::ParamDType::f16, codes);
//   std::uint8_t e = kvc::ops::fp8_encode(kvc::ops::Fp8Kind::e4m3, x / scale);   // saturating

// The dtype quantization parameters (scales, minimums) are stored in.
enum class ParamDType { f16, f32 };
inline float round_param(float x, ParamDType dtype) {
  return dtype == ParamDType::f16 ? round_through<f16>(x) : x;
}
constexpr int param_bytes(ParamDType dtype) { return dtype == ParamDType::f16 ? 2 : 4; }

// Asymmetric min-max parameters as stored (already rounded to their dtype).
struct AffineParams {
  float scale;
  float minimum;
};
// The P5 quantizer with parameters stored as `dtype`: scale = dtype((max - min) / (2^b - 1)),
// minimum = dtype(min), code = round_half_to_even(clamp((x - minimum) / scale, 0, 2^b - 1)),
// code 0 when scale == 0. With f16 it returns exactly what quantize_group does.
AffineParams quantize_minmax(Cpu, std::span<const float> x, int bits, ParamDType dtype,
                             std::span<std::uint8_t> codes);
inline float dequantize_affine(std::uint32_t code, AffineParams p) {
  return static_cast<float>(code) * p.scale + p.minimum;
}

// Symmetric (absmax) quantizer, b in {2, 4, 8}, qmax = 2^(b-1) - 1 (127 at 8 bits, 7 at 4):
// scale = dtype(max|x| / qmax), code = round_half_to_even(clamp(x / scale, -qmax, qmax)), code 0
// when scale == 0. The code -2^(b-1) is never produced. Returns the stored scale.
float quantize_symmetric(Cpu, std::span<const float> x, int bits, ParamDType dtype,
                         std::span<std::int8_t> codes);
// Signed codes live in their b-bit field as two's complement.
KVC_HOST_DEVICE constexpr std::uint32_t signed_field(int code, int bits) {
  return static_cast<std::uint32_t>(code) & ((1u << bits) - 1u);
}
KVC_HOST_DEVICE constexpr int field_signed(std::uint32_t field, int bits) {
  return field >= (1u << (bits - 1)) ? static_cast<int>(field) - (1 << bits)
                                     : static_cast<int>(field);
}

// OCP FP8 kinds (kvc::fp8_e4m3 / kvc::fp8_e5m2): saturating encode, NaN kept (callers reject NaN
// and infinities before encoding).
enum class Fp8Kind { e4m3, e5m2 };
inline float fp8_max(Fp8Kind kind) { return kind == Fp8Kind::e4m3 ? 448.0f : 57344.0f; }
inline std::uint8_t fp8_encode(Fp8Kind kind, float x) {
  return kind == Fp8Kind::e4m3 ? fp8_e4m3(x).bits : fp8_e5m2(x).bits;
}
inline float fp8_decode(Fp8Kind kind, std::uint8_t code) {
  return kind == Fp8Kind::e4m3 ? static_cast<float>(fp8_e4m3::from_bits(code))
                               : static_cast<float>(fp8_e5m2::from_bits(code));
}
// codes[i] = fp8(x[i] / scale) (fp32 division, then round to nearest even, saturating at
// +-fp8_max). scale must be finite and > 0; every x[i] must be finite.
void quantize_fp8(Cpu, std::span<const float> x, float scale, Fp8Kind kind,
                  std::span<std::uint8_t> codes);
// ---- end of per-token formats -------------------------------------------------------------------

}  // namespace kvc::ops
