// Tests of the host storage types in kvc/core/dtype.hpp: f16, bf16, FP8 E4M3 / E5M2 conversions.
// Expected bit patterns are worked out by hand from the formats (comments show the arithmetic).
#include <catch2/catch.hpp>
#include <cmath>
#include <cstdint>
#include <limits>

#include "kvc/core/dtype.hpp"

namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();
const float kNan = std::numeric_limits<float>::quiet_NaN();

std::uint16_t half_bits(float x) { return kvc::f16(x).bits; }
std::uint16_t bfloat_bits(float x) { return kvc::bf16(x).bits; }
std::uint8_t e4m3_bits(float x) { return kvc::fp8_e4m3(x).bits; }
std::uint8_t e5m2_bits(float x) { return kvc::fp8_e5m2(x).bits; }

}  // namespace

TEST_CASE("f16 rounds to nearest, ties to even", "[dtype]") {
  // Between 1 and 2 the f16 step is 2^-10; 1 + 2^-11 is halfway between 1 (mantissa 0, even) and
  // 1 + 2^-10 (mantissa 1, odd).
  CHECK(half_bits(1.0f + 0x1p-11f) == 0x3c00);
  // 1 + 3*2^-11 is halfway between 1 + 2^-10 (odd) and 1 + 2^-9 (mantissa 2, even).
  CHECK(half_bits(1.0f + 3 * 0x1p-11f) == 0x3c02);
  // Just above the halfway point rounds up; just below rounds down.
  CHECK(half_bits(1.0f + 0x1p-11f + 0x1p-20f) == 0x3c01);
  CHECK(half_bits(1.0f + 3 * 0x1p-11f - 0x1p-20f) == 0x3c01);
  // Negative numbers mirror.
  CHECK(half_bits(-(1.0f + 0x1p-11f)) == 0xbc00);
  CHECK(half_bits(-(1.0f + 3 * 0x1p-11f)) == 0xbc02);
  // A mantissa carry into the exponent: 2 - 2^-11 is halfway between 2 - 2^-10 (0x3bff, odd) and
  // 2 (0x4000, even).
  CHECK(half_bits(2.0f - 0x1p-11f) == 0x4000);
  CHECK(static_cast<float>(kvc::f16(0.1f)) == 0.0999755859375f);  // 0x2e66 = 1638/16384
}

TEST_CASE("f16 subnormals", "[dtype]") {
  // Subnormal step 2^-24; smallest normal 2^-14 = 0x0400.
  CHECK(half_bits(0x1p-24f) == 0x0001);
  CHECK(half_bits(-0x1p-24f) == 0x8001);
  CHECK(half_bits(0x1p-25f) == 0x0000);                      // halfway 0 / 2^-24 -> 0 (even)
  CHECK(half_bits(0x1p-25f * (1.0f + 0x1p-20f)) == 0x0001);  // just above halfway
  CHECK(half_bits(3 * 0x1p-25f) == 0x0002);                  // halfway 1 / 2 steps -> 2 (even)
  CHECK(half_bits(1023 * 0x1p-24f) == 0x03ff);               // largest subnormal
  CHECK(half_bits(1023.5f * 0x1p-24f) == 0x0400);            // halfway -> smallest normal (even)
  CHECK(half_bits(0x1p-14f) == 0x0400);
  CHECK(static_cast<float>(kvc::f16::from_bits(0x0001)) == 0x1p-24f);
  CHECK(static_cast<float>(kvc::f16::from_bits(0x03ff)) == 1023 * 0x1p-24f);
  CHECK(static_cast<float>(kvc::f16::from_bits(0x8200)) == -512 * 0x1p-24f);
  CHECK(half_bits(-0.0f) == 0x8000);
}

TEST_CASE("f16 overflow goes to infinity, NaN stays NaN", "[dtype]") {
  CHECK(half_bits(65504.0f) == 0x7bff);   // largest finite
  CHECK(half_bits(65519.99f) == 0x7bff);  // below the halfway point 65520
  CHECK(half_bits(65520.0f) == 0x7c00);   // halfway to 65536 (even) -> overflow -> inf
  CHECK(half_bits(-65520.0f) == 0xfc00);
  CHECK(half_bits(1e6f) == 0x7c00);
  CHECK(half_bits(kInf) == 0x7c00);
  CHECK(half_bits(-kInf) == 0xfc00);
  CHECK(std::isnan(static_cast<float>(kvc::f16(kNan))));
  CHECK(std::isnan(static_cast<float>(kvc::f16(-kNan))));
  CHECK(std::isinf(static_cast<float>(kvc::f16::from_bits(0x7c00))));
  CHECK(std::isnan(static_cast<float>(kvc::f16::from_bits(0x7c01))));
}

TEST_CASE("f16: every bit pattern survives float and back", "[dtype]") {
  int mismatches = 0;
  std::uint32_t first_bad = 0;
  for (std::uint32_t b = 0; b < 65536; ++b) {
    const auto h = kvc::f16::from_bits(static_cast<std::uint16_t>(b));
    const float f = static_cast<float>(h);
    const bool is_nan = ((b >> 10) & 0x1f) == 0x1f && (b & 0x3ff) != 0;
    // NaN payloads may be canonicalised; only NaN-ness is required.
    const bool ok = is_nan ? std::isnan(f) && std::isnan(static_cast<float>(kvc::f16(f)))
                           : kvc::f16(f).bits == b;
    if (!ok && mismatches++ == 0) first_bad = b;
  }
  INFO("mismatches " << mismatches << ", first bad pattern 0x" << std::hex << first_bad);
  CHECK(mismatches == 0);
}

TEST_CASE("bf16 rounds to nearest, ties to even; overflow and NaN", "[dtype]") {
  // bf16 keeps 7 mantissa bits: between 1 and 2 the step is 2^-7.
  CHECK(bfloat_bits(1.0f) == 0x3f80);
  CHECK(bfloat_bits(1.0f + 0x1p-8f) == 0x3f80);      // halfway 1 (even) / 1 + 2^-7 (odd)
  CHECK(bfloat_bits(1.0f + 3 * 0x1p-8f) == 0x3f82);  // halfway 1 + 2^-7 (odd) / 1 + 2^-6 (even)
  CHECK(bfloat_bits(1.0f + 0x1p-8f + 0x1p-20f) == 0x3f81);
  CHECK(bfloat_bits(-(1.0f + 3 * 0x1p-8f)) == 0xbf82);
  // The largest float is above the halfway point past the largest bf16 (0x7f7f): -> inf.
  CHECK(bfloat_bits(std::numeric_limits<float>::max()) == 0x7f80);
  CHECK(bfloat_bits(kInf) == 0x7f80);
  CHECK(std::isnan(static_cast<float>(kvc::bf16(kNan))));
  // A NaN whose payload lives only in the low 16 bits must stay NaN (not become inf).
  CHECK(std::isnan(static_cast<float>(kvc::bf16(kvc::detail::bits_float(0x7f800001u)))));
  CHECK(static_cast<float>(kvc::bf16::from_bits(0x0001)) == 0x1p-133f);  // subnormal
  int mismatches = 0;
  for (std::uint32_t b = 0; b < 65536; ++b) {
    const float f = static_cast<float>(kvc::bf16::from_bits(static_cast<std::uint16_t>(b)));
    const bool ok =
        std::isnan(f) ? std::isnan(static_cast<float>(kvc::bf16(f))) : kvc::bf16(f).bits == b;
    mismatches += ok ? 0 : 1;
  }
  CHECK(mismatches == 0);
}

TEST_CASE("fp8 e4m3: codes round trip, saturation, ties, subnormals", "[dtype]") {
  // Every code decodes and re-encodes to itself; the two NaN codes (S.1111.111) decode to NaN and
  // encode back to a NaN code.
  for (int code = 0; code < 256; ++code) {
    const float f = static_cast<float>(kvc::fp8_e4m3::from_bits(static_cast<std::uint8_t>(code)));
    INFO("code 0x" << std::hex << code << " decodes to " << f);
    if ((code & 0x7f) == 0x7f) {
      CHECK(std::isnan(f));
      CHECK(std::isnan(static_cast<float>(kvc::fp8_e4m3(f))));
    } else {
      CHECK(e4m3_bits(f) == code);
    }
  }
  CHECK(static_cast<float>(kvc::fp8_e4m3::from_bits(0x7e)) == 448.0f);  // S.1111.110 = 1.75 * 2^8
  CHECK(static_cast<float>(kvc::fp8_e4m3::from_bits(0x38)) == 1.0f);    // exponent 7 = bias
  // Saturation: finite overflow and +-inf go to +-448.
  CHECK(e4m3_bits(1e9f) == 0x7e);
  CHECK(e4m3_bits(464.0f) == 0x7e);  // halfway to the (non-existent) 480
  CHECK(e4m3_bits(kInf) == 0x7e);
  CHECK(e4m3_bits(-kInf) == 0xfe);
  CHECK(e4m3_bits(-1e9f) == 0xfe);
  CHECK(std::isnan(static_cast<float>(kvc::fp8_e4m3(kNan))));
  // Ties to even, step 1/8 between 1 and 2: 1 + 1/16 -> 1 (0x38); 1 + 3/16 -> 1.25 (0x3a);
  // 1.9375 is halfway between 1.875 (0x3f, odd) and 2 (0x40, even).
  CHECK(e4m3_bits(1.0625f) == 0x38);
  CHECK(e4m3_bits(1.1875f) == 0x3a);
  CHECK(e4m3_bits(1.0625f + 0x1p-20f) == 0x39);
  CHECK(e4m3_bits(1.9375f) == 0x40);
  // Subnormals: step 2^-9, smallest normal 2^-6 = 0x08.
  CHECK(static_cast<float>(kvc::fp8_e4m3::from_bits(0x01)) == 0x1p-9f);
  CHECK(static_cast<float>(kvc::fp8_e4m3::from_bits(0x07)) == 7 * 0x1p-9f);
  CHECK(e4m3_bits(0x1p-10f) == 0x00);        // halfway 0 / 1 step -> 0
  CHECK(e4m3_bits(3 * 0x1p-10f) == 0x02);    // halfway 1 / 2 steps -> 2
  CHECK(e4m3_bits(7.5f * 0x1p-9f) == 0x08);  // halfway largest subnormal / smallest normal
  CHECK(e4m3_bits(-0x1p-9f) == 0x81);
  CHECK(e4m3_bits(0x1p-12f) == 0x00);  // underflow to zero
}

TEST_CASE("fp8 e5m2: codes round trip, saturation, ties, subnormals", "[dtype]") {
  // Finite codes round trip; NaN codes (S.11111.{01,10,11}) stay NaN; the infinity codes
  // (S.11111.00) decode to +-inf, which the saturating encoder maps to +-max (0x7b / 0xfb).
  for (int code = 0; code < 256; ++code) {
    const float f = static_cast<float>(kvc::fp8_e5m2::from_bits(static_cast<std::uint8_t>(code)));
    INFO("code 0x" << std::hex << code << " decodes to " << f);
    const bool all_ones_exponent = ((code >> 2) & 0x1f) == 0x1f;
    if (all_ones_exponent && (code & 3) != 0) {
      CHECK(std::isnan(f));
      CHECK(std::isnan(static_cast<float>(kvc::fp8_e5m2(f))));
    } else if (all_ones_exponent) {
      CHECK(std::isinf(f));
      CHECK(e5m2_bits(f) == ((code & 0x80) | 0x7b));
    } else {
      CHECK(e5m2_bits(f) == code);
    }
  }
  CHECK(static_cast<float>(kvc::fp8_e5m2::from_bits(0x7b)) == 57344.0f);  // 1.75 * 2^15
  CHECK(e5m2_bits(1e9f) == 0x7b);
  CHECK(e5m2_bits(kInf) == 0x7b);
  CHECK(e5m2_bits(-kInf) == 0xfb);
  CHECK(std::isnan(static_cast<float>(kvc::fp8_e5m2(kNan))));
  // Ties to even, step 1/4 between 1 and 2: 1.125 -> 1 (0x3c), 1.375 -> 1.5 (0x3e).
  CHECK(e5m2_bits(1.125f) == 0x3c);
  CHECK(e5m2_bits(1.375f) == 0x3e);
  CHECK(e5m2_bits(1.375f - 0x1p-20f) == 0x3d);
  // Subnormals: step 2^-16, smallest normal 2^-14 = 0x04.
  CHECK(static_cast<float>(kvc::fp8_e5m2::from_bits(0x01)) == 0x1p-16f);
  CHECK(e5m2_bits(0x1p-17f) == 0x00);
  CHECK(e5m2_bits(3 * 0x1p-17f) == 0x02);
  CHECK(e5m2_bits(0x1p-14f) == 0x04);
}
