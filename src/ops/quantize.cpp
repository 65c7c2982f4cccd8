// src/ops/quantize.cpp: CPU reference of the asymmetric min-max quantizer (ALGORITHMS.md P5), bit
// packing (P6) and the KIVI key/value layouts.
//
// One group x[0..G) at b bits, L = 2^b - 1, all arithmetic in fp32:
//   min_h   = f16(min x)
//   scale_h = f16((max x - min x) / L)           (the difference and division in fp32)
//   q       = scale_h == 0 ? 0 : nearbyint(clamp((x - min_h) / scale_h, 0, L))
//   x_hat   = q * scale_h + min_h
// nearbyint under the default rounding mode is round half to even, like torch.round.
#include "kvc/ops/quantize.hpp"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "kvc/core/dispatch.hpp"
#include "kvc/core/error.hpp"

namespace kvc::ops {
namespace {

using PackBits = ValueList<1, 2, 4, 8>;

void check_bits(const char* op, int bits) {
  KVC_CHECK(PackBits::contains(bits), op, ": bits = ", bits,
            " is not supported; allowed: ", PackBits::describe());
}

std::uint8_t code_for(float x, GroupParams p, int bits) {
  const float scale = static_cast<float>(p.scale);
  if (scale == 0.0f) return 0;
  const float top = static_cast<float>((1 << bits) - 1);
  const float t = std::clamp((x - static_cast<float>(p.minimum)) / scale, 0.0f, top);
  return static_cast<std::uint8_t>(std::nearbyint(t));
}

GroupParams quantize_checked(const char* op, std::span<const float> x, int bits,
                             std::span<std::uint8_t> codes) {
  float lo = x[0], hi = x[0];
  for (std::size_t i = 0; i < x.size(); ++i) {
    KVC_CHECK(std::isfinite(x[i]), op, ": x[", i, "] = ", x[i],
              " is not finite; inputs must be finite numbers");
    lo = std::min(lo, x[i]);
    hi = std::max(hi, x[i]);
  }
  const GroupParams p{f16((hi - lo) / static_cast<float>((1 << bits) - 1)), f16(lo)};
  KVC_CHECK(
      std::isfinite(static_cast<float>(p.minimum)) && std::isfinite(static_cast<float>(p.scale)),
      op, ": group min = ", lo, ", max = ", hi, " at ", bits,
      " bits gives min/scale outside the f16 range; need |min| <= 65504 and "
      "(max - min) / (2^bits - 1) <= 65504");
  for (std::size_t i = 0; i < x.size(); ++i) codes[i] = code_for(x[i], p, bits);
  return p;
}

void check_shape(const char* op, const char* name, std::int64_t rows, std::int64_t cols,
                 std::int64_t want_rows, std::int64_t want_cols) {
  KVC_CHECK(rows == want_rows && cols == want_cols, op, ": ", name, " has shape [", rows, ", ",
            cols, "]; expected [", want_rows, ", ", want_cols, "]");
}

// Rejects NaN/Inf before the per-group loop, naming the token and channel.
void check_finite(const char* op, const char* name, HostView<const float, 2> x) {
  for (std::int64_t t = 0; t < x.size(0); ++t)
    for (std::int64_t c = 0; c < x.size(1); ++c)
      KVC_CHECK(std::isfinite(x(t, c)), op, ": ", name, "[", t, ", ", c, "] = ", x(t, c),
                " is not finite; inputs must be finite numbers");
}

// The KIVI layouts: `count` elements along the grouped axis (tokens for keys, channels for
// values). Validates bits, the head dim, group and the divisibility rules.
void check_layout(const char* op, int bits, int group, std::int64_t head_dim, std::int64_t count,
                  const char* count_name) {
  check_bits(op, bits);
  KVC_CHECK(head_dim >= 1, op, ": head dim D = ", head_dim, "; need D >= 1");
  KVC_CHECK(group >= 1 && group % codes_per_word(bits) == 0, op, ": group = ", group,
            " is not allowed at ", bits, " bits; group must be a positive multiple of ",
            codes_per_word(bits), " (codes per 32-bit word)");
  KVC_CHECK(count % group == 0, op, ": ", count_name, " = ", count,
            " is not a multiple of group = ", group);
}

}  // namespace

GroupParams quantize_group(Cpu, std::span<const float> x, int bits, std::span<std::uint8_t> codes) {
  check_bits("quantize_group", bits);
  KVC_CHECK(!x.empty(), "quantize_group: the group is empty; need at least one element");
  KVC_CHECK(codes.size() == x.size(), "quantize_group: codes has ", codes.size(),
            " elements for a group of ", x.size(), "; need one code per element");
  return quantize_checked("quantize_group", x, bits, codes);
}

void pack_codes(std::span<const std::uint8_t> codes, int bits, std::span<std::uint32_t> words) {
  check_bits("pack_codes", bits);
  const auto count = static_cast<std::int64_t>(codes.size());
  KVC_CHECK(static_cast<std::int64_t>(words.size()) == words_for(count, bits),
            "pack_codes: ", words.size(), " words for ", count, " codes at ", bits,
            " bits; need exactly ", words_for(count, bits));
  const int per_word = codes_per_word(bits);
  for (std::int64_t i = 0; i < count; ++i)
    KVC_CHECK(codes[i] < (1u << bits), "pack_codes: codes[", i, "] = ", int{codes[i]},
              " does not fit ", bits, " bits; allowed: [0, ", (1 << bits) - 1, "]");
  for (auto& w : words) w = 0;
  for (std::int64_t i = 0; i < count; ++i)
    words[i / per_word] =
        pack_field(words[i / per_word], static_cast<int>(i % per_word), bits, codes[i]);
}

void unpack_codes(std::span<const std::uint32_t> words, int bits, std::span<std::uint8_t> codes) {
  check_bits("unpack_codes", bits);
  const auto count = static_cast<std::int64_t>(codes.size());
  KVC_CHECK(static_cast<std::int64_t>(words.size()) == words_for(count, bits),
            "unpack_codes: ", words.size(), " words for ", count, " codes at ", bits,
            " bits; need exactly ", words_for(count, bits));
  const int per_word = codes_per_word(bits);
  for (std::int64_t i = 0; i < count; ++i)
    codes[i] = static_cast<std::uint8_t>(
        unpack_field(words[i / per_word], static_cast<int>(i % per_word), bits));
}

namespace {

// x [R, C] with rows and columns swapped: [C, R], no copy.
template <class T>
HostView<T, 2> transposed(HostView<T, 2> x) {
  return {x.data, {x.shape[1], x.shape[0]}, {x.strides[1], x.strides[0]}};
}

// Checks packed [rows, cols / per_word], scale and minimum [rows, cols / group]: the grouped
// layout below, cols being the grouped axis.
template <class Packed, class Params>
void check_grouped_shapes(const char* op, int bits, int group, std::int64_t rows, std::int64_t cols,
                          const Packed& packed, const Params& scale, const Params& minimum) {
  const int per_word = codes_per_word(bits);
  check_shape(op, "packed", packed.size(0), packed.size(1), rows, cols / per_word);
  check_shape(op, "scale", scale.size(0), scale.size(1), rows, cols / group);
  check_shape(op, "minimum", minimum.size(0), minimum.size(1), rows, cols / group);
}

// The grouped layout both KIVI directions share, on rows x [R, C] quantized in groups of `group`
// consecutive columns: packed [R, C / per_word], scale and minimum [R, C / group]. Per-channel
// keys are the rows of the transposed keys, per-token values the rows of the values. The callers
// check shapes first (their messages name keys or values).
void quantize_grouped_rows(const char* op, HostView<const float, 2> x, int bits, int group,
                           HostView<std::uint32_t, 2> packed, HostView<f16, 2> scale,
                           HostView<f16, 2> minimum) {
  const int per_word = codes_per_word(bits);
  std::vector<float> row(static_cast<std::size_t>(group));
  std::vector<std::uint8_t> codes(static_cast<std::size_t>(group));
  std::vector<std::uint32_t> words(static_cast<std::size_t>(group / per_word));
  for (std::int64_t r = 0; r < x.size(0); ++r) {
    for (std::int64_t g = 0; g < x.size(1) / group; ++g) {
      for (int i = 0; i < group; ++i) row[i] = x(r, g * group + i);
      const GroupParams p = quantize_checked(op, row, bits, codes);
      scale(r, g) = p.scale;
      minimum(r, g) = p.minimum;
      pack_codes(codes, bits, words);
      for (std::size_t w = 0; w < words.size(); ++w)
        packed(r, g * (group / per_word) + w) = words[w];
    }
  }
}

void dequantize_grouped_rows(HostView<const std::uint32_t, 2> packed, HostView<const f16, 2> scale,
                             HostView<const f16, 2> minimum, int bits, int group,
                             HostView<float, 2> x) {
  const int per_word = codes_per_word(bits);
  for (std::int64_t r = 0; r < x.size(0); ++r)
    for (std::int64_t c = 0; c < x.size(1); ++c) {
      const std::uint32_t code =
          unpack_field(packed(r, c / per_word), static_cast<int>(c % per_word), bits);
      x(r, c) = dequantize_code(code, GroupParams{scale(r, c / group), minimum(r, c / group)});
    }
}

}  // namespace

// Keys [n, D] -> packed [D, n / per_word]: packed(c, w) holds tokens w * per_word .. of channel c;
// group g of channel c (tokens g * group ..) has scale(c, g), minimum(c, g).
void quantize_keys_per_channel(Cpu, HostView<const float, 2> keys, int bits, int group,
                               HostView<std::uint32_t, 2> packed, HostView<f16, 2> scale,
                               HostView<f16, 2> minimum) {
  constexpr const char* kOp = "quantize_keys_per_channel";
  const std::int64_t n = keys.size(0), d = keys.size(1);
  check_layout(kOp, bits, group, d, n, "token count n");
  check_grouped_shapes(kOp, bits, group, d, n, packed, scale, minimum);
  check_finite(kOp, "keys", keys);
  quantize_grouped_rows(kOp, transposed(keys), bits, group, packed, scale, minimum);
}

void dequantize_keys_per_channel(Cpu, HostView<const std::uint32_t, 2> packed,
                                 HostView<const f16, 2> scale, HostView<const f16, 2> minimum,
                                 int bits, int group, HostView<float, 2> keys) {
  constexpr const char* kOp = "dequantize_keys_per_channel";
  const std::int64_t n = keys.size(0), d = keys.size(1);
  check_layout(kOp, bits, group, d, n, "token count n");
  check_grouped_shapes(kOp, bits, group, d, n, packed, scale, minimum);
  dequantize_grouped_rows(packed, scale, minimum, bits, group, transposed(keys));
}

// Values [n, D] -> packed [n, D / per_word]: packed(t, w) holds channels w * per_word .. of token
// t; group g of token t (channels g * group ..) has scale(t, g), minimum(t, g).
void quantize_values_per_token(Cpu, HostView<const float, 2> values, int bits, int group,
                               HostView<std::uint32_t, 2> packed, HostView<f16, 2> scale,
                               HostView<f16, 2> minimum) {
  constexpr const char* kOp = "quantize_values_per_token";
  const std::int64_t n = values.size(0), d = values.size(1);
  check_layout(kOp, bits, group, d, d, "head dim D");
  check_grouped_shapes(kOp, bits, group, n, d, packed, scale, minimum);
  check_finite(kOp, "values", values);
  quantize_grouped_rows(kOp, values, bits, group, packed, scale, minimum);
}

void dequantize_values_per_token(Cpu, HostView<const std::uint32_t, 2> packed,
                                 HostView<const f16, 2> scale, HostView<const f16, 2> minimum,
                                 int bits, int group, HostView<float, 2> values) {
  constexpr const char* kOp = "dequantize_values_per_token";
  const std::int64_t n = values.size(0), d = values.size(1);
  check_layout(kOp, bits, group, d, d, "head dim D");
  check_grouped_shapes(kOp, bits, group, n, d, packed, scale, minimum);
  dequantize_grouped_rows(packed, scale, minimum, bits, group, values);
}

// ---- Per-token formats: parameter dtypes, symmetric quantizer, FP8 (quant-formats) --------------

AffineParams quantize_minmax(Cpu, std::span<const float> x, int bits, ParamDType dtype,
                             std::span<std::uint8_t> codes) {
  constexpr const char* kOp = "quantize_minmax";
  check_bits(kOp, bits);
  KVC_CHECK(!x.empty(), kOp, ": the group is empty; need at least one element");
  KVC_CHECK(codes.size() == x.size(), kOp, ": codes has ", codes.size(),
            " elements for a group of ", x.size(), "; need one code per element");
  if (dtype == ParamDType::f16) {
    const GroupParams p = quantize_checked(kOp, x, bits, codes);
    return {static_cast<float>(p.scale), static_cast<float>(p.minimum)};
  }
  float lo = x[0], hi = x[0];
  for (std::size_t i = 0; i < x.size(); ++i) {
    KVC_CHECK(std::isfinite(x[i]), kOp, ": x[", i, "] = ", x[i],
              " is not finite; inputs must be finite numbers");
    lo = std::min(lo, x[i]);
    hi = std::max(hi, x[i]);
  }
  const float top = static_cast<float>((1 << bits) - 1);
  const AffineParams p{(hi - lo) / top, lo};
  KVC_CHECK(std::isfinite(p.scale), kOp, ": group min = ", lo, ", max = ", hi,
            " gives a range outside fp32");
  for (std::size_t i = 0; i < x.size(); ++i)
    codes[i] = p.scale == 0.0f ? 0
                               : static_cast<std::uint8_t>(std::nearbyint(
                                     std::clamp((x[i] - p.minimum) / p.scale, 0.0f, top)));
  return p;
}

float quantize_symmetric(Cpu, std::span<const float> x, int bits, ParamDType dtype,
                         std::span<std::int8_t> codes) {
  constexpr const char* kOp = "quantize_symmetric";
  KVC_CHECK(bits == 2 || bits == 4 || bits == 8, kOp, ": bits = ", bits,
            " is not supported; allowed: {2, 4, 8}");
  KVC_CHECK(!x.empty(), kOp, ": the group is empty; need at least one element");
  KVC_CHECK(codes.size() == x.size(), kOp, ": codes has ", codes.size(),
            " elements for a group of ", x.size(), "; need one code per element");
  float amax = 0.0f;
  for (std::size_t i = 0; i < x.size(); ++i) {
    KVC_CHECK(std::isfinite(x[i]), kOp, ": x[", i, "] = ", x[i],
              " is not finite; inputs must be finite numbers");
    amax = std::max(amax, std::fabs(x[i]));
  }
  const float qmax = static_cast<float>((1 << (bits - 1)) - 1);
  const float scale = round_param(amax / qmax, dtype);
  KVC_CHECK(std::isfinite(scale), kOp, ": max|x| = ", amax, " at ", bits,
            " bits gives a scale outside the parameter dtype's range (f16: max|x| / qmax <= "
            "65504)");
  for (std::size_t i = 0; i < x.size(); ++i)
    codes[i] =
        scale == 0.0f
            ? 0
            : static_cast<std::int8_t>(std::nearbyint(std::clamp(x[i] / scale, -qmax, qmax)));
  return scale;
}

void quantize_fp8(Cpu, std::span<const float> x, float scale, Fp8Kind kind,
                  std::span<std::uint8_t> codes) {
  constexpr const char* kOp = "quantize_fp8";
  KVC_CHECK(std::isfinite(scale) && scale > 0.0f, kOp, ": scale = ", scale,
            " is not allowed; need a finite scale > 0");
  KVC_CHECK(codes.size() == x.size(), kOp, ": codes has ", codes.size(), " elements for ", x.size(),
            " inputs; need one code per element");
  for (std::size_t i = 0; i < x.size(); ++i) {
    KVC_CHECK(std::isfinite(x[i]), kOp, ": x[", i, "] = ", x[i],
              " is not finite; inputs must be finite numbers");
    codes[i] = fp8_encode(kind, x[i] / scale);
  }
}
// ---- end of per-token formats -------------------------------------------------------------------

}  // namespace kvc::ops
