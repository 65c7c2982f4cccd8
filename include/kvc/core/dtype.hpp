// kvc/core/dtype.hpp: host storage types for half precision and FP8, and the runtime dtype tag.
//
//   kvc::f16 h{0.1f};            // round to nearest, ties to even
//   float back = static_cast<float>(h);
//   kvc::fp8_e4m3 e{500.0f};     // saturates to 448 (OCP FP8, no infinities in E4M3)
//
// Conversions from float round to nearest even. f16 and bf16 overflow to infinity like IEEE; the
// FP8 types saturate (finite overflow and +-Inf become +-max finite), and NaN stays NaN (OCP FP8
// spec, the same rule as CUDA's __NV_SATFINITE conversions).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <string_view>

#include "kvc/core/error.hpp"

namespace kvc {

namespace detail {
inline std::uint32_t float_bits(float f) {
  std::uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}
inline float bits_float(std::uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline std::uint16_t float_to_half_bits(float value) {
  const std::uint32_t x = float_bits(value);
  const std::uint32_t sign = (x >> 16) & 0x8000u;
  std::uint32_t magnitude = x & 0x7fffffffu;
  if (magnitude >= 0x7f800000u) {  // Inf stays Inf; NaN stays a quiet NaN keeping its top payload
    return static_cast<std::uint16_t>(
        sign | 0x7c00u | (magnitude > 0x7f800000u ? 0x200u | ((magnitude >> 13) & 0x3ffu) : 0u));
  }
  if (magnitude >= 0x477ff000u) return static_cast<std::uint16_t>(sign | 0x7c00u);  // >= 65520
  if (magnitude < 0x38800000u) {
    // Subnormal result: adding 0.5f puts the f16 subnormal step (2^-24) at the fp32 ulp, so the
    // FPU's own round-to-nearest-even does the rounding.
    const float shifted = bits_float(magnitude) + 0.5f;
    return static_cast<std::uint16_t>(sign | (float_bits(shifted) - 0x3f000000u));
  }
  const std::uint32_t mantissa_odd = (magnitude >> 13) & 1u;
  magnitude += 0xc8000fffu + mantissa_odd;  // re-bias exponent (-112 << 23) and round to even
  return static_cast<std::uint16_t>(sign | (magnitude >> 13));
}

inline float half_bits_to_float(std::uint16_t h) {
  const std::uint32_t sign = static_cast<std::uint32_t>(h & 0x8000u) << 16;
  const std::uint32_t exponent = (h >> 10) & 0x1fu;
  const std::uint32_t mantissa = h & 0x3ffu;
  if (exponent == 0) {
    const float magnitude = std::ldexp(static_cast<float>(mantissa), -24);
    return sign ? -magnitude : magnitude;
  }
  if (exponent == 31) return bits_float(sign | 0x7f800000u | (mantissa << 13));
  return bits_float(sign | ((exponent + 112u) << 23) | (mantissa << 13));
}

inline std::uint16_t float_to_bfloat_bits(float value) {
  std::uint32_t x = float_bits(value);
  if ((x & 0x7fffffffu) > 0x7f800000u) return static_cast<std::uint16_t>((x >> 16) | 0x40u);
  x += 0x7fffu + ((x >> 16) & 1u);
  return static_cast<std::uint16_t>(x >> 16);
}

// OCP FP8 with `ExponentBits` exponent bits and `MantissaBits` mantissa bits. `kMaxCode` is the
// largest finite magnitude code; `kHasInf` says whether exponent-all-ones/mantissa-0 is Inf (E5M2).
template <int ExponentBits, int MantissaBits, std::uint8_t kMaxCode, bool kHasInf>
struct Fp8Format {
  static constexpr int kBias = (1 << (ExponentBits - 1)) - 1;
  static constexpr std::uint8_t kNanCode = 0x7f;

  static float decode(std::uint8_t code) {
    const bool negative = code & 0x80u;
    const int exponent = (code >> MantissaBits) & ((1 << ExponentBits) - 1);
    const int mantissa = code & ((1 << MantissaBits) - 1);
    const int exponent_all_ones = (1 << ExponentBits) - 1;
    float magnitude;
    if (kHasInf && exponent == exponent_all_ones) {
      magnitude = mantissa == 0 ? INFINITY : NAN;
    } else if (!kHasInf && exponent == exponent_all_ones && mantissa == (1 << MantissaBits) - 1) {
      magnitude = NAN;
    } else if (exponent == 0) {
      magnitude = std::ldexp(static_cast<float>(mantissa), 1 - kBias - MantissaBits);
    } else {
      magnitude = std::ldexp(static_cast<float>((1 << MantissaBits) + mantissa),
                             exponent - kBias - MantissaBits);
    }
    return negative ? -magnitude : magnitude;
  }

  static std::uint8_t encode(float value) {
    const std::uint8_t sign = std::signbit(value) ? 0x80u : 0u;
    if (std::isnan(value)) return static_cast<std::uint8_t>(sign | kNanCode);
    const float magnitude = std::fabs(value);
    const float max_finite = decode(kMaxCode);
    if (magnitude >= max_finite) return static_cast<std::uint8_t>(sign | kMaxCode);  // saturate
    int exponent;
    std::frexp(magnitude, &exponent);  // magnitude = m * 2^exponent, m in [0.5, 1)
    int unbiased = exponent - 1;       // magnitude = (1.f) * 2^unbiased
    if (magnitude == 0.0f || unbiased < 1 - kBias) unbiased = 1 - kBias;  // subnormal range
    // Scale so one mantissa step is 1, then round to nearest even (exact in float: power of two).
    const float steps = std::nearbyint(std::ldexp(magnitude, MantissaBits - unbiased));
    int code_magnitude;
    if (unbiased == 1 - kBias && steps < static_cast<float>(1 << MantissaBits)) {
      code_magnitude = static_cast<int>(steps);  // subnormal (or zero)
    } else {
      // steps in [2^M, 2^(M+1)]; reaching 2^(M+1) carries into the exponent, which the plain
      // addition below does by itself.
      code_magnitude =
          ((unbiased + kBias) << MantissaBits) + static_cast<int>(steps) - (1 << MantissaBits);
    }
    if (code_magnitude > kMaxCode) code_magnitude = kMaxCode;
    return static_cast<std::uint8_t>(sign | code_magnitude);
  }
};
using E4m3Format = Fp8Format<4, 3, 0x7e, false>;  // max 448
using E5m2Format = Fp8Format<5, 2, 0x7b, true>;   // max 57344
}  // namespace detail

// IEEE binary16 storage.
struct f16 {
  std::uint16_t bits = 0;
  f16() = default;
  explicit f16(float value) : bits(detail::float_to_half_bits(value)) {}
  static f16 from_bits(std::uint16_t b) {
    f16 h;
    h.bits = b;
    return h;
  }
  explicit operator float() const { return detail::half_bits_to_float(bits); }
};

// bfloat16 storage (the upper half of a float).
struct bf16 {
  std::uint16_t bits = 0;
  bf16() = default;
  explicit bf16(float value) : bits(detail::float_to_bfloat_bits(value)) {}
  static bf16 from_bits(std::uint16_t b) {
    bf16 h;
    h.bits = b;
    return h;
  }
  explicit operator float() const {
    return detail::bits_float(static_cast<std::uint32_t>(bits) << 16);
  }
};

// OCP FP8 E4M3 (bias 7, max 448, NaN = S.1111.111, no Inf).
struct fp8_e4m3 {
  std::uint8_t bits = 0;
  fp8_e4m3() = default;
  explicit fp8_e4m3(float value) : bits(detail::E4m3Format::encode(value)) {}
  static fp8_e4m3 from_bits(std::uint8_t b) {
    fp8_e4m3 v;
    v.bits = b;
    return v;
  }
  explicit operator float() const { return detail::E4m3Format::decode(bits); }
};

// OCP FP8 E5M2 (bias 15, max 57344, Inf = S.11111.00, NaN = S.11111.{01,10,11}).
struct fp8_e5m2 {
  std::uint8_t bits = 0;
  fp8_e5m2() = default;
  explicit fp8_e5m2(float value) : bits(detail::E5m2Format::encode(value)) {}
  static fp8_e5m2 from_bits(std::uint8_t b) {
    fp8_e5m2 v;
    v.bits = b;
    return v;
  }
  explicit operator float() const { return detail::E5m2Format::decode(bits); }
};

// Rounds a float through a storage type and back: what storing it in that type keeps.
template <class Storage>
float round_through(float value) {
  return static_cast<float>(Storage(value));
}

// Runtime dtype tag (file formats, runtime dispatch).
enum class DType { f16, bf16, f32, f64, i32, u8, fp8_e4m3, fp8_e5m2 };

inline int dtype_size(DType t) {
  switch (t) {
    case DType::f16:
    case DType::bf16:
      return 2;
    case DType::f32:
    case DType::i32:
      return 4;
    case DType::f64:
      return 8;
    case DType::u8:
    case DType::fp8_e4m3:
    case DType::fp8_e5m2:
      return 1;
  }
  KVC_FAIL("unknown dtype");
}

inline std::string_view dtype_name(DType t) {
  switch (t) {
    case DType::f16:
      return "f16";
    case DType::bf16:
      return "bf16";
    case DType::f32:
      return "f32";
    case DType::f64:
      return "f64";
    case DType::i32:
      return "i32";
    case DType::u8:
      return "u8";
    case DType::fp8_e4m3:
      return "fp8_e4m3";
    case DType::fp8_e5m2:
      return "fp8_e5m2";
  }
  return "?";
}

}  // namespace kvc
