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

}  // namespace kvc::ops
