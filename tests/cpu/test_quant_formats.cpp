// Tests of the engine quantization formats (per-token INT8/INT4, FP8) and KIVI's axis and scale
// dtype options: exact codes on representable inputs, bit layouts with the top field in use, zero
// groups, saturation, NaN/Inf reporting, round trips within derived bounds, byte counts equal to
// docs/formats.md for odd lengths, and every format through `kvc eval` on the bundled data.
#include <algorithm>
#include <catch2/catch.hpp>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "kvc/cache/kv_cache.hpp"
#include "kvc/eval/evaluate.hpp"
#include "kvc/eval/registry.hpp"
#include "kvc/policies/eviction/snapkv.hpp"
#include "kvc/policies/quant/fp8.hpp"
#include "kvc/policies/quant/int_per_token.hpp"
#include "kvc/policies/quant/kivi.hpp"
#include "support/reference.hpp"

namespace {

using kvc::make_view;
using kvc::ops::ParamDType;
constexpr double kU = 0x1p-24;  // fp32 unit roundoff

std::vector<std::int32_t> iota_positions(int n) {
  std::vector<std::int32_t> p(n);
  for (int i = 0; i < n; ++i) p[i] = i;
  return p;
}

template <class Policy>
typename Policy::HeadStore load_store(const Policy& q, const std::vector<float>& k,
                                      const std::vector<float>& v, int n, int d) {
  typename Policy::HeadStore store;
  const auto positions = iota_positions(n);
  store.load(q, make_view(k.data(), {n, d}), make_view(v.data(), {n, d}), positions);
  return store;
}

template <class Store>
std::vector<float> dequantized_keys(const Store& s, int d) {
  std::vector<float> out(static_cast<std::size_t>(s.size()) * d);
  s.keys(make_view(out.data(), {static_cast<std::int64_t>(s.size()), d}));
  return out;
}
template <class Store>
std::vector<float> dequantized_values(const Store& s, int d) {
  std::vector<float> out(static_cast<std::size_t>(s.size()) * d);
  s.values(make_view(out.data(), {static_cast<std::int64_t>(s.size()), d}));
  return out;
}

// Parameter rounding of a stored value v: f16 rounds to a half-ulp (2^-11 relative, 2^-25 absolute
// in the subnormal range), f32 to u = 2^-24 relative (the value was computed by one subtraction and
// one division in fp32: 2u).
double param_error(double v, ParamDType dtype) {
  return dtype == ParamDType::f16 ? (0x1p-11 + 0x1p-23) * std::fabs(v) + 0x1p-25
                                  : 2 * kU * std::fabs(v);
}

// Symmetric group with exact s = amax / qmax and stored s_h (|s - s_h| <= ds):
//   interior, |x / s_h| <= qmax:  |x - q s_h| <= s_h / 2 <= (s + ds) / 2
//   clamped, |x| > qmax s_h:       |x| - qmax s_h <= amax - qmax s_h = qmax |s - s_h| <= qmax ds
// plus fp32 rounding of x / s_h (shifts t by u |t|, i.e. u |x| in x) and of q * s_h (u |x|).
double symmetric_bound(double amax, int bits, ParamDType dtype, double x) {
  const double qmax = (1 << (bits - 1)) - 1;
  const double s = amax / qmax, ds = param_error(s, dtype);
  return std::max((s + ds) / 2, qmax * ds) + 3 * kU * (std::fabs(x) + s);
}
// Asymmetric (P5) group, the derivation of tests/cpu/test_ops_quantize.cpp with the parameter
// rounding of the chosen dtype: max(s_h / 2, dmin + L ds) + 4u (|x| + |mn| + dmin + L (s + ds)).
double asymmetric_bound(double mn, double mx, int bits, ParamDType dtype, double x) {
  const double levels = (1 << bits) - 1;
  const double s = (mx - mn) / levels;
  const double dmin = dtype == ParamDType::f16 ? std::max(0x1p-11 * std::fabs(mn), 0x1p-25) : 0.0;
  const double ds = param_error(s, dtype) + (dtype == ParamDType::f32 ? 0x1p-126 : 0.0);
  return std::max((s + ds) / 2, dmin + levels * ds) +
         4 * kU * (std::fabs(x) + std::fabs(mn) + dmin + levels * (s + ds));
}

// Bound for a whole [n, D] matrix quantized per token in groups of `group` channels.
std::vector<double> per_token_bounds(const std::vector<float>& x, int n, int d, int group, int bits,
                                     bool symmetric, ParamDType dtype) {
  std::vector<double> tol(x.size());
  for (int t = 0; t < n; ++t)
    for (int g = 0; g < d / group; ++g) {
      const float* row = &x[static_cast<std::size_t>(t) * d + g * group];
      double amax = 0, mn = row[0], mx = row[0];
      for (int i = 0; i < group; ++i) {
        amax = std::max(amax, std::fabs(double(row[i])));
        mn = std::min(mn, double(row[i]));
        mx = std::max(mx, double(row[i]));
      }
      for (int i = 0; i < group; ++i)
        tol[static_cast<std::size_t>(t) * d + g * group + i] =
            symmetric ? symmetric_bound(amax, bits, dtype, row[i])
                      : asymmetric_bound(mn, mx, bits, dtype, row[i]);
    }
  return tol;
}

}  // namespace

// ---- ops -------------------------------------------------------------------------------------

TEST_CASE("quantize_symmetric: exact codes, half to even, zero group, two's complement fields",
          "[quantfmt]") {
  std::vector<std::int8_t> codes(4);
  // 8 bits: amax 127 -> scale 1; 0.5 rounds to 0 (half to even), -2.5 to -2.
  const std::vector<float> x8{1.0f, -2.5f, 0.5f, 127.0f};
  REQUIRE(kvc::ops::quantize_symmetric(kvc::Cpu{}, x8, 8, ParamDType::f16, codes) == 1.0f);
  REQUIRE(codes == std::vector<std::int8_t>{1, -2, 0, 127});
  // 4 bits: amax 7 -> scale 1; -3.5 -> -4, 2.5 -> 2.
  const std::vector<float> x4{7.0f, -3.5f, 2.5f, -7.0f};
  REQUIRE(kvc::ops::quantize_symmetric(kvc::Cpu{}, x4, 4, ParamDType::f32, codes) == 1.0f);
  REQUIRE(codes == std::vector<std::int8_t>{7, -4, 2, -7});
  // Zero group: scale 0, every code 0.
  const std::vector<float> zeros(4, 0.0f);
  REQUIRE(kvc::ops::quantize_symmetric(kvc::Cpu{}, zeros, 8, ParamDType::f16, codes) == 0.0f);
  REQUIRE(codes == std::vector<std::int8_t>{0, 0, 0, 0});
  // f16 vs f32 scale: amax 1 at 8 bits -> 1/127, which f16 rounds.
  const std::vector<float> one{1.0f, 0.0f, 0.0f, 0.0f};
  const float s32 = kvc::ops::quantize_symmetric(kvc::Cpu{}, one, 8, ParamDType::f32, codes);
  const float s16 = kvc::ops::quantize_symmetric(kvc::Cpu{}, one, 8, ParamDType::f16, codes);
  REQUIRE(s32 == 1.0f / 127.0f);
  REQUIRE(s16 == kvc::round_through<kvc::f16>(1.0f / 127.0f));
  REQUIRE(s16 != s32);
  // Fields: two's complement in b bits.
  REQUIRE(kvc::ops::signed_field(-7, 4) == 0x9u);
  REQUIRE(kvc::ops::signed_field(-1, 8) == 0xFFu);
  REQUIRE(kvc::ops::field_signed(0x9u, 4) == -7);
  REQUIRE(kvc::ops::field_signed(0x7u, 4) == 7);
  REQUIRE(kvc::ops::field_signed(0x81u, 8) == -127);
  for (int bits : {2, 4, 8})
    for (int c = -(1 << (bits - 1)); c < (1 << (bits - 1)); ++c)
      REQUIRE(kvc::ops::field_signed(kvc::ops::signed_field(c, bits), bits) == c);
  // NaN/Inf rejected, naming the element.
  const std::vector<float> bad{1.0f, NAN, 0.0f, 0.0f};
  REQUIRE_THROWS_WITH(kvc::ops::quantize_symmetric(kvc::Cpu{}, bad, 8, ParamDType::f16, codes),
                      Catch::Contains("x[1] = nan") && Catch::Contains("not finite"));
  REQUIRE_THROWS_WITH(kvc::ops::quantize_symmetric(kvc::Cpu{}, x8, 3, ParamDType::f16, codes),
                      Catch::Contains("allowed: {2, 4, 8}"));
}

TEST_CASE("quantize_minmax: f16 equals quantize_group, f32 keeps the exact parameters",
          "[quantfmt]") {
  const auto x = kvc::test::random_floats(64, 11, -3.0f, 5.0f);
  std::vector<std::uint8_t> a(64), b(64);
  for (int bits : {2, 4, 8}) {
    const auto p16 = kvc::ops::quantize_minmax(kvc::Cpu{}, x, bits, ParamDType::f16, a);
    const auto g = kvc::ops::quantize_group(kvc::Cpu{}, x, bits, b);
    REQUIRE(a == b);
    REQUIRE(p16.scale == static_cast<float>(g.scale));
    REQUIRE(p16.minimum == static_cast<float>(g.minimum));
  }
  // [0, 0.1, 0.2, 0.3] at 2 bits: f32 scale is fp32(0.3) / 3, minimum 0; codes 0..3.
  const std::vector<float> y{0.0f, 0.1f, 0.2f, 0.3f};
  std::vector<std::uint8_t> codes(4);
  const auto p = kvc::ops::quantize_minmax(kvc::Cpu{}, y, 2, ParamDType::f32, codes);
  REQUIRE(p.scale == 0.3f / 3.0f);
  REQUIRE(p.minimum == 0.0f);
  REQUIRE(codes == std::vector<std::uint8_t>{0, 1, 2, 3});
  // Constant group in f32: scale 0, codes 0, dequantizes to the minimum.
  const std::vector<float> c(4, -2.25f);
  const auto pc = kvc::ops::quantize_minmax(kvc::Cpu{}, c, 4, ParamDType::f32, codes);
  REQUIRE(pc.scale == 0.0f);
  REQUIRE(codes == std::vector<std::uint8_t>{0, 0, 0, 0});
  REQUIRE(kvc::ops::dequantize_affine(0, pc) == -2.25f);
}

TEST_CASE("quantize_fp8: exact codes, saturation, scale and NaN checks", "[quantfmt]") {
  using kvc::ops::Fp8Kind;
  std::vector<std::uint8_t> codes(5);
  // E4M3 (bias 7): 0.5 = 2^-1 -> 0x30; -448 -> 0xFE (max); 2^-9 -> 0x01 (smallest subnormal);
  // 3.25 = 1.625 * 2 -> 0x45; 1000 saturates to 448 -> 0x7E.
  const std::vector<float> x{0.5f, -448.0f, 0x1p-9f, 3.25f, 1000.0f};
  kvc::ops::quantize_fp8(kvc::Cpu{}, x, 1.0f, Fp8Kind::e4m3, codes);
  REQUIRE(codes == std::vector<std::uint8_t>{0x30, 0xFE, 0x01, 0x45, 0x7E});
  // E5M2 (bias 15): 0.5 -> 0x38; -57344 -> 0xFB; 2^-16 -> 0x01; 3 = 1.5 * 2 -> 0x42; 1e6 -> max.
  const std::vector<float> y{0.5f, -57344.0f, 0x1p-16f, 3.0f, 1e6f};
  kvc::ops::quantize_fp8(kvc::Cpu{}, y, 1.0f, Fp8Kind::e5m2, codes);
  REQUIRE(codes == std::vector<std::uint8_t>{0x38, 0xFB, 0x01, 0x42, 0x7B});
  // The scale divides first: 896 / 2 = 448.
  std::vector<std::uint8_t> one(1);
  kvc::ops::quantize_fp8(kvc::Cpu{}, std::vector<float>{896.0f}, 2.0f, Fp8Kind::e4m3, one);
  REQUIRE(one[0] == 0x7E);
  REQUIRE(kvc::ops::fp8_decode(Fp8Kind::e4m3, 0x7E) * 2.0f == 896.0f);
  REQUIRE_THROWS_WITH(kvc::ops::quantize_fp8(kvc::Cpu{}, std::vector<float>{1.0f, INFINITY}, 1.0f,
                                             Fp8Kind::e4m3, std::span(codes.data(), 2)),
                      Catch::Contains("x[1] = inf"));
  REQUIRE_THROWS_WITH(kvc::ops::quantize_fp8(kvc::Cpu{}, x, 0.0f, Fp8Kind::e4m3, codes),
                      Catch::Contains("scale = 0") && Catch::Contains("need a finite scale > 0"));
}

// ---- per-token INT8 / INT4 --------------------------------------------------------------------

TEST_CASE("int_per_token: bit layout with the top field, both widths and schemes", "[quantfmt]") {
  // INT4 symmetric, D = 8 (one word): codes [7, 0, ..., 0, -7] -> 0x7 | 0x9 << 28.
  {
    const kvc::IntPerToken q{.bits = 4};
    std::vector<float> k{7, 0, 0, 0, 0, 0, 0, -7}, v(8, 0.0f);
    const auto s = load_store(q, k, v, 1, 8);
    REQUIRE(s.quantized_keys().codes().size() == 1);
    REQUIRE(s.quantized_keys().codes()[0] == 0x90000007u);
    REQUIRE(s.quantized_keys().scales()[0] == 1.0f);
    REQUIRE(s.quantized_keys().minimums().empty());
    REQUIRE(dequantized_keys(s, 8) == k);            // exactly representable
    REQUIRE(s.quantized_values().codes()[0] == 0u);  // zero group
    REQUIRE(s.quantized_values().scales()[0] == 0.0f);
    REQUIRE(dequantized_values(s, 8) == v);
  }
  // INT8 symmetric, D = 4: [127, 0, 0, -127] -> 0x7F | 0x81 << 24 (the int8 bytes 7F 00 00 81).
  {
    const kvc::IntPerToken q{.bits = 8};
    std::vector<float> k{127, 0, 0, -127}, v{1, 2, 3, 4};
    const auto s = load_store(q, k, v, 1, 4);
    REQUIRE(s.quantized_keys().codes()[0] == 0x8100007Fu);
    REQUIRE(dequantized_keys(s, 4) == k);
  }
  // INT4 asymmetric: [0, 1, ..., 15] -> codes 0..15 over two words; the top field holds 15.
  {
    const kvc::IntPerToken q{.bits = 4, .symmetric = false};
    std::vector<float> k(16), v(16, 3.0f);
    for (int i = 0; i < 16; ++i) k[i] = static_cast<float>(i);
    const auto s = load_store(q, k, v, 1, 16);
    REQUIRE(s.quantized_keys().codes()[0] == 0x76543210u);
    REQUIRE(s.quantized_keys().codes()[1] == 0xFEDCBA98u);
    REQUIRE(s.quantized_keys().scales()[0] == 1.0f);
    REQUIRE(s.quantized_keys().minimums()[0] == 0.0f);
    REQUIRE(dequantized_keys(s, 16) == k);
    REQUIRE(dequantized_values(s, 16) == v);  // zero range: code 0 + minimum 3
  }
  // INT4 with D = 6: one partial word, unused top fields zero. Symmetric [-7..] -> check fields.
  {
    const kvc::IntPerToken q{.bits = 4};
    std::vector<float> k{1, -1, 2, -2, 7, -7}, v(6, 0.0f);
    const auto s = load_store(q, k, v, 1, 6);
    // fields 1, -1 -> F, 2, -2 -> E, 7, -7 -> 9; fields 6 and 7 unused (zero)
    REQUIRE(s.quantized_keys().codes()[0] == 0x0097E2F1u);
    REQUIRE(dequantized_keys(s, 6) == k);
  }
}

TEST_CASE("int_per_token: round trip within half a step (derived), every option", "[quantfmt]") {
  const int n = 37, d = 64;
  const auto k = kvc::test::random_floats(n * d, 3, -4.0f, 6.0f);
  const auto v = kvc::test::random_floats(n * d, 4, -0.5f, 0.25f);
  for (int bits : {4, 8})
    for (bool sym : {true, false})
      for (int group : {0, 16, 32})
        for (ParamDType dtype : {ParamDType::f16, ParamDType::f32}) {
          const kvc::IntPerToken q{.bits = bits, .symmetric = sym, .group = group, .scales = dtype};
          q.validate();
          const auto s = load_store(q, k, v, n, d);
          const int g = group == 0 ? d : group;
          const auto kt = per_token_bounds(k, n, d, g, bits, sym, dtype);
          const auto vt = per_token_bounds(v, n, d, g, bits, sym, dtype);
          const std::vector<double> kw(k.begin(), k.end()), vw(v.begin(), v.end());
          const auto ck = kvc::test::compare(dequantized_keys(s, d), kw, kt, {n, d}, 3);
          const auto cv = kvc::test::compare(dequantized_values(s, d), vw, vt, {n, d}, 4);
          INFO("bits " << bits << " sym " << sym << " group " << group << " f32 "
                       << (dtype == ParamDType::f32));
          INFO(ck.report);
          INFO(cv.report);
          REQUIRE(ck.ok);
          REQUIRE(cv.ok);
        }
}

TEST_CASE("int_per_token: bytes follow the documented layout for odd lengths", "[quantfmt]") {
  const int n = 37;
  for (int d : {64, 6}) {
    const auto k = kvc::test::random_floats(n * d, 5), v = kvc::test::random_floats(n * d, 6);
    for (int bits : {4, 8})
      for (bool sym : {true, false})
        for (ParamDType dtype : {ParamDType::f16, ParamDType::f32})
          for (int residual : {0, 5}) {
            const int group = d == 64 ? 32 : 0, g = group == 0 ? d : group;
            const kvc::IntPerToken q{.bits = bits,
                                     .symmetric = sym,
                                     .group = group,
                                     .scales = dtype,
                                     .residual = residual};
            const auto s = load_store(q, k, v, n, d);
            const std::int64_t quantized = n - residual;
            const std::int64_t words = (d * bits + 31) / 32;  // ceil(D / (32 / bits))
            const std::int64_t per_group = sym ? 1 : 2;       // scale (+ minimum)
            const int pbytes = dtype == ParamDType::f16 ? 2 : 4;
            INFO("d " << d << " bits " << bits << " sym " << sym << " residual " << residual);
            REQUIRE(s.quantized() == quantized);
            REQUIRE(s.window() == residual);
            REQUIRE(s.bytes().payload == 2 * (quantized * words * 4 + residual * d * 2));
            REQUIRE(s.bytes().params == 2 * quantized * (d / g) * per_group * pbytes);
            REQUIRE(s.bytes().index == n * 4);
          }
  }
}

TEST_CASE("int_per_token: residual window, decode appends, eviction and NaN reporting",
          "[quantfmt]") {
  const int d = 8;
  const kvc::IntPerToken q{.bits = 8, .residual = 2};
  auto k = kvc::test::random_floats(5 * d, 8), v = kvc::test::random_floats(5 * d, 9);
  auto s = load_store(q, k, v, 5, d);
  REQUIRE(s.quantized() == 3);
  REQUIRE(s.window() == 2);
  const auto keys = dequantized_keys(s, d);
  for (int c = 0; c < d; ++c)  // the window is f16, exactly
    REQUIRE(keys[4 * d + c] == kvc::round_through<kvc::f16>(k[4 * d + c]));
  // An append keeps the window at 2: the oldest window token is quantized at once.
  const std::vector<float> row(d, 0.25f);
  s.append(q, row.data(), row.data(), 5);
  REQUIRE(s.quantized() == 4);
  REQUIRE(s.window() == 2);
  REQUIRE(s.size() == 6);
  // residual 0: the appended token is quantized before it is attended.
  const kvc::IntPerToken q0{.bits = 8};
  auto s0 = load_store(q0, k, v, 5, d);
  s0.append(q0, row.data(), row.data(), 5);
  REQUIRE(s0.quantized() == 6);
  REQUIRE(s0.window() == 0);
  // Eviction keeps rows from both parts, positions follow.
  s.gather(std::vector<std::int32_t>{0, 2, 5});
  REQUIRE(s.size() == 3);
  REQUIRE(s.quantized() == 2);
  REQUIRE(s.window() == 1);
  REQUIRE(std::vector<std::int32_t>(s.positions().begin(), s.positions().end()) ==
          std::vector<std::int32_t>{0, 2, 5});
  const auto kept = dequantized_values(s, d);
  for (int c = 0; c < d; ++c) REQUIRE(kept[2 * d + c] == 0.25f);
  // NaN / Inf: reported with position and channel, never stored.
  k[3 * d + 5] = NAN;
  kvc::IntPerToken::HeadStore bad;
  const auto positions = iota_positions(5);
  REQUIRE_THROWS_WITH(
      bad.load(q, make_view(k.data(), {5, d}), make_view(v.data(), {5, d}), positions),
      Catch::Contains("key of the token at position 3, channel 5 is nan"));
  std::vector<float> inf_row(d, 0.0f);
  inf_row[7] = -INFINITY;
  REQUIRE_THROWS_WITH(s.append(q, row.data(), inf_row.data(), 9),
                      Catch::Contains("value of the token at position 9, channel 7 is -inf"));
  REQUIRE(s.size() == 3);
  REQUIRE_THROWS_WITH((kvc::IntPerToken{.bits = 2}.validate()), Catch::Contains("{4, 8}"));
  kvc::IntPerToken::HeadStore grouped;
  REQUIRE_THROWS_WITH(grouped.load(kvc::IntPerToken{.group = 3}, make_view(v.data(), {5, d}),
                                   make_view(v.data(), {5, d}), iota_positions(5)),
                      Catch::Contains("head_dim D = 8 must be a multiple of group = 3"));
}

// ---- FP8 --------------------------------------------------------------------------------------

TEST_CASE("fp8: static and computed scales, saturation, bytes, NaN reporting", "[quantfmt]") {
  using kvc::ops::Fp8Kind;
  const int d = 4;
  // Static scale 0.5: 224 -> 448 (code 0x7E); 300 saturates to 448 * 0.5 = 224.
  {
    const kvc::Fp8 q{.kind = Fp8Kind::e4m3, .key_scale = 0.5, .value_scale = 0.5};
    const std::vector<float> k{224, -0.25f, 0, 300}, v{1, 2, 3, 4};
    const auto s = load_store(q, k, v, 1, d);
    REQUIRE(s.key_codes()[0] == 0x7E);
    REQUIRE(s.key_codes()[1] == 0xB0);  // -0.5 = -2^-1: sign | 6 << 3
    REQUIRE(dequantized_keys(s, d) == std::vector<float>{224, -0.25f, 0, 224});
    REQUIRE(dequantized_values(s, d) == v);
    REQUIRE(s.bytes().payload == 2 * d);
    REQUIRE(s.bytes().params == 0);  // static scales are model constants
  }
  // Computed: amax / fp8_max over the prefill, per tensor. amax(k) = 896 -> 2; amax(v) = 0 -> 1.
  {
    const kvc::Fp8 q{};
    const std::vector<float> k{896, -1, 0.5f, 3, 0, 0, 0, -896}, v(8, 0.0f);
    auto s = load_store(q, k, v, 2, d);
    REQUIRE(s.key_scale() == 2.0f);
    REQUIRE(s.value_scale() == 1.0f);
    REQUIRE(dequantized_keys(s, d) == k);
    REQUIRE(s.bytes().params == 8);
    // A later token beyond the prefill maximum saturates at 448 * scale.
    const std::vector<float> big{5000, -5000, 0, 0};
    s.append(q, big.data(), big.data(), 2);
    const auto keys = dequantized_keys(s, d);
    REQUIRE(keys[8] == 896.0f);
    REQUIRE(keys[9] == -896.0f);
    const auto values = dequantized_values(s, d);
    REQUIRE(values[8] == 448.0f);  // value scale 1
    // One static scale, one computed: 4 bytes.
    const kvc::Fp8 half{.key_scale = 1.0};
    REQUIRE(load_store(half, k, v, 2, d).bytes().params == 4);
  }
  // E5M2 computed scale: amax 57344 * 2 -> 2.
  {
    const kvc::Fp8 q{.kind = Fp8Kind::e5m2};
    const std::vector<float> k{114688, 1, 2, 3}, v{1, 1, 1, 1};
    const auto s = load_store(q, k, v, 1, d);
    REQUIRE(s.key_scale() == 2.0f);
    REQUIRE(s.key_codes()[0] == 0x7B);
    REQUIRE(dequantized_keys(s, d) == k);
  }
  // NaN/Inf in prefill or decode tokens: an error naming position and channel.
  {
    std::vector<float> k(8, 1.0f), v(8, 1.0f);
    v[6] = INFINITY;
    kvc::Fp8::HeadStore s;
    REQUIRE_THROWS_WITH(s.load(kvc::Fp8{}, make_view(k.data(), {2, d}), make_view(v.data(), {2, d}),
                               iota_positions(2)),
                        Catch::Contains("value of the token at position 1, channel 2 is inf"));
    v[6] = 1.0f;
    s.load(kvc::Fp8{}, make_view(k.data(), {2, d}), make_view(v.data(), {2, d}), iota_positions(2));
    const std::vector<float> nan_row{0, NAN, 0, 0};
    REQUIRE_THROWS_WITH(s.append(kvc::Fp8{}, nan_row.data(), k.data(), 7),
                        Catch::Contains("key of the token at position 7, channel 1 is nan"));
    REQUIRE(s.size() == 2);
  }
  REQUIRE_THROWS_WITH((kvc::Fp8{.key_scale = -1}.validate()), Catch::Contains("scale = -1"));
}

TEST_CASE("fp8: round trip within half an FP8 step (derived)", "[quantfmt]") {
  // With y = x / scale, |y| <= fp8_max: nearest-even rounding errs by at most half an ulp,
  // 2^-(M+1) |y| for normals and half the subnormal step 2^(1 - bias - M) / 2 below; in x that is
  // scale times it, plus fp32 rounding of the division and of the product (u |x| each). The
  // computed scale makes |y| <= fp8_max up to the division's rounding (saturation then costs
  // at most u |x|).
  using kvc::ops::Fp8Kind;
  const int n = 33, d = 64;
  const auto k = kvc::test::random_floats(n * d, 21, -7.0f, 3.0f);
  const auto v = kvc::test::random_floats(n * d, 22, -0.01f, 0.02f);
  for (Fp8Kind kind : {Fp8Kind::e4m3, Fp8Kind::e5m2}) {
    const int mantissa = kind == Fp8Kind::e4m3 ? 3 : 2, bias = kind == Fp8Kind::e4m3 ? 7 : 15;
    const auto s = load_store(kvc::Fp8{.kind = kind}, k, v, n, d);
    for (int which = 0; which < 2; ++which) {
      const auto& x = which == 0 ? k : v;
      const double scale = which == 0 ? s.key_scale() : s.value_scale();
      std::vector<double> tol(x.size()), wide(x.begin(), x.end());
      for (std::size_t i = 0; i < x.size(); ++i)
        tol[i] = scale * std::max(std::ldexp(std::fabs(x[i]) / scale, -(mantissa + 1)),
                                  std::ldexp(1.0, -bias - mantissa)) +
                 3 * kU * std::fabs(x[i]);
      const auto out = which == 0 ? dequantized_keys(s, d) : dequantized_values(s, d);
      const auto c = kvc::test::compare(out, wide, tol, {n, d}, 21 + which);
      INFO((kind == Fp8Kind::e4m3 ? "e4m3 " : "e5m2 ")
           << (which == 0 ? "keys " : "values ") << c.report);
      REQUIRE(c.ok);
    }
  }
}

// ---- KIVI axes and scale dtypes -----------------------------------------------------------------

TEST_CASE("kivi axes: flush schedule of each axis for keys and values", "[quantfmt]") {
  // T = 100, R = G = 32. Token axis: first T - R quantized, sliding window of R, one token per
  // step. Channel axis: first T - T % R quantized, flushed R at a time.
  const int n = 100, d = 32;
  const kvc::Kivi q{.key_bits = 2,
                    .value_bits = 4,
                    .group = 32,
                    .residual = 32,
                    .key_axis = kvc::QuantAxis::token,
                    .value_axis = kvc::QuantAxis::channel};
  q.validate();
  const auto k = kvc::test::random_floats(n * d, 31), v = kvc::test::random_floats(n * d, 32);
  auto s = load_store(q, k, v, n, d);
  REQUIRE(s.quantized_keys() == 68);
  REQUIRE(s.residual_keys() == 32);
  REQUIRE(s.quantized_values() == 96);
  REQUIRE(s.residual_values() == 4);
  const std::vector<float> row(d, 0.5f);
  for (int step = 1; step <= 28; ++step) {
    s.append(q, row.data(), row.data(), n - 1 + step);
    s.after_step(q);
    REQUIRE(s.quantized_keys() == 68 + step);
    REQUIRE(s.residual_keys() == 32);
    REQUIRE(s.quantized_values() == (step < 28 ? 96 : 128));
    REQUIRE(s.residual_values() == (step < 28 ? 4 + step : 0));
  }
  // The HF QuantizedCache choice (both per token) and VidKV's (values per channel) validate.
  kvc::Kivi{.key_axis = kvc::QuantAxis::token}.validate();
  // Per-channel for both tensors does not need D % G == 0.
  const kvc::Kivi both_channel{.group = 32,
                               .residual = 32,
                               .key_axis = kvc::QuantAxis::channel,
                               .value_axis = kvc::QuantAxis::channel};
  const auto k48 = kvc::test::random_floats(64 * 48, 33);
  REQUIRE(load_store(both_channel, k48, k48, 64, 48).quantized_values() == 64);
  kvc::Kivi::HeadStore token_store;
  REQUIRE_THROWS_WITH(
      token_store.load(kvc::Kivi{.group = 32, .residual = 32}, make_view(k48.data(), {64, 48}),
                       make_view(k48.data(), {64, 48}), iota_positions(64)),
      Catch::Contains("head_dim D = 48 must be a multiple of group = 32"));
}

TEST_CASE("kivi axes and f32 scales: codes, layout, bytes and round trip", "[quantfmt]") {
  const int n = 100, d = 64;
  const auto k = kvc::test::random_floats(n * d, 41, -2.0f, 3.0f);
  const auto v = kvc::test::random_floats(n * d, 42, -1.0f, 1.0f);
  for (int group : {32, 64})
    for (ParamDType dtype : {ParamDType::f16, ParamDType::f32})
      for (auto kaxis : {kvc::QuantAxis::channel, kvc::QuantAxis::token})
        for (auto vaxis : {kvc::QuantAxis::channel, kvc::QuantAxis::token}) {
          const int kbits = 2, vbits = 8, residual = 64;
          const kvc::Kivi q{.key_bits = kbits,
                            .value_bits = vbits,
                            .group = group,
                            .residual = residual,
                            .key_axis = kaxis,
                            .value_axis = vaxis,
                            .scales = dtype};
          q.validate();
          const auto s = load_store(q, k, v, n, d);
          INFO("group " << group << " f32 " << (dtype == ParamDType::f32) << " kaxis "
                        << (kaxis == kvc::QuantAxis::token) << " vaxis "
                        << (vaxis == kvc::QuantAxis::token));
          // Split: channel axis 100 - 100 % 64 = 64 quantized; token axis 100 - 64 = 36.
          const auto quantized = [&](kvc::QuantAxis a) {
            return a == kvc::QuantAxis::channel ? 64 : 36;
          };
          REQUIRE(s.quantized_keys() == quantized(kaxis));
          REQUIRE(s.quantized_values() == quantized(vaxis));
          // Bytes (docs/formats.md): channel axis: blocks * D * G / (32/b) words + 2 params per
          // (block, channel); token axis: tokens * D / (32/b) words + 2 params per (token, group).
          const int pbytes = dtype == ParamDType::f16 ? 2 : 4;
          const auto part = [&](kvc::QuantAxis a, int bits, std::int64_t& payload,
                                std::int64_t& params) {
            const std::int64_t m = quantized(a);
            payload += 4 * m * d * bits / 32 + 2 * (n - m) * d;
            params += a == kvc::QuantAxis::channel ? 2 * (m / group) * d * pbytes
                                                   : 2 * m * (d / group) * pbytes;
          };
          std::int64_t payload = 0, params = 0;
          part(kaxis, kbits, payload, params);
          part(vaxis, vbits, payload, params);
          REQUIRE(s.bytes().payload == payload);
          REQUIRE(s.bytes().params == params);
          // Codes and parameters equal quantize_minmax on the groups the axis defines; the
          // dequantized values equal code * scale + minimum exactly.
          const auto keys = dequantized_keys(s, d);
          std::vector<float> grp(group);
          std::vector<std::uint8_t> codes(group);
          if (kaxis == kvc::QuantAxis::channel) {
            for (int c : {0, 17, 63}) {  // block 1 (tokens 32..63 at G = 32; 0..63 at G = 64)
              const int first = group == 32 ? 32 : 0;
              for (int i = 0; i < group; ++i) grp[i] = k[(first + i) * d + c];
              const auto p = kvc::ops::quantize_minmax(kvc::Cpu{}, grp, kbits, dtype, codes);
              for (int i = 0; i < group; ++i)
                REQUIRE(keys[(first + i) * d + c] == kvc::ops::dequantize_affine(codes[i], p));
            }
          } else {
            for (int t : {0, 35}) {
              for (int i = 0; i < group; ++i) grp[i] = k[t * d + i];
              const auto p = kvc::ops::quantize_minmax(kvc::Cpu{}, grp, kbits, dtype, codes);
              for (int i = 0; i < group; ++i)
                REQUIRE(keys[t * d + i] == kvc::ops::dequantize_affine(codes[i], p));
            }
          }
          // Round trip of the values within the derived bound (per-token groups or per-channel
          // blocks), residual exact in f16.
          const auto values = dequantized_values(s, d);
          const int m = quantized(vaxis);
          for (int t = 0; t < n; ++t)
            for (int c = 0; c < d; ++c) {
              const double x = v[t * d + c];
              double tol = 0x1p-11 * std::fabs(x);  // residual: f16 rounding
              if (t < m) {
                double mn = 1e30, mx = -1e30;
                if (vaxis == kvc::QuantAxis::token) {
                  for (int i = c / group * group; i < (c / group + 1) * group; ++i)
                    mn = std::min(mn, double(v[t * d + i])),
                    mx = std::max(mx, double(v[t * d + i]));
                } else {
                  for (int i = t / group * group; i < (t / group + 1) * group; ++i)
                    mn = std::min(mn, double(v[i * d + c])),
                    mx = std::max(mx, double(v[i * d + c]));
                }
                tol = asymmetric_bound(mn, mx, vbits, dtype, x);
              }
              if (!(std::fabs(values[t * d + c] - x) <= tol)) {
                INFO("value token " << t << " channel " << c << ": " << values[t * d + c] << " vs "
                                    << x << ", bound " << tol);
                REQUIRE(false);
              }
            }
        }
}

TEST_CASE("kivi token axis: the top field of every width", "[quantfmt]") {
  // One token quantized (n = R + 1 on the token axis), D = G = 32, codes 0..2^b-1 ramp so the
  // last field of each word holds the top code where the ramp reaches it.
  for (int bits : {2, 4, 8}) {
    const int d = 32, levels = (1 << bits) - 1;
    std::vector<float> row(d);
    for (int c = 0; c < d; ++c) row[c] = static_cast<float>(std::min(c, levels));
    row[d - 1] = static_cast<float>(levels);  // the top field of the last word
    std::vector<float> k(33 * d, 0.0f);
    std::copy(row.begin(), row.end(), k.begin());
    const kvc::Kivi q{.key_bits = bits,
                      .value_bits = bits,
                      .group = 32,
                      .residual = 32,
                      .key_axis = kvc::QuantAxis::token};
    const auto s = load_store(q, k, k, 33, d);
    REQUIRE(s.quantized_keys() == 1);
    const auto words = s.key_tensor().token_rows().codes();
    REQUIRE(words.size() == static_cast<std::size_t>(d * bits / 32));
    INFO("bits " << bits);
    REQUIRE(kvc::ops::unpack_field(words.back(), 32 / bits - 1, bits) ==
            static_cast<std::uint32_t>(levels));
    const auto keys = dequantized_keys(s, d);
    REQUIRE(std::vector<float>(keys.begin(), keys.begin() + d) == row);
  }
}

// ---- every format through kvc eval on the bundled real data -------------------------------------

TEST_CASE("every format through kvc eval on the bundled data: bits/value and rel_error",
          "[quantfmt][eval]") {
  const kvc::KvDump dump = kvc::load_dump(std::string(KVC_TEST_DATA_DIR) + "/seq0");
  // 8 layers, 2 KV heads, D = 64, prefix 384 of 512.
  const std::vector<std::string> specs = {
      "int8",                                             // 0
      "int4",                                             // 1
      "int4(sym=false,group=32)",                         // 2
      "int8(sym=false,scales=f32,residual=32)",           // 3
      "fp8",                                              // 4
      "fp8(kind=e5m2)",                                   // 5
      "kivi(bits=2,group=32,residual=32)",                // 6
      "kivi(bits=4,group=32,residual=32)",                // 7
      "kivi(bits=8,group=32,residual=32)",                // 8
      "kivi(bits=4,group=64,residual=128,kaxis=token)",   // 9: HF QuantizedCache axes
      "kivi(bits=2,group=32,residual=32,vaxis=channel)",  // 10: VidKV-style values
      "kivi(bits=2,group=64,residual=128,scales=f32)",    // 11
      "fp8(kind=e5m2,scope=tensor)",                      // 12
  };
  const kvc::EvalResult r = kvc::evaluate(dump, specs, kvc::EvalOptions{});
  // Documented bits per value (docs/formats.md), per head of 384 tokens x 64 channels x 2 tensors
  // (49152 values):
  //  int8: 64 B + 2 B scale per token and tensor -> 8 * 66 / 64 = 8.25
  //  int4: 32 + 2 -> 4.25;  int4(sym=false,group=32): 32 + 2 groups x 4 B -> 5
  //  int8(sym=false,f32,R=32): 352 tokens x (64 + 8) + 32 x 128 per tensor ->
  //  8*(352*72+32*128)/(384*64) fp8: 8 + 2 x 32 bits per head -> 8 + 64/49152 kivi(b, G, R=G,
  //  channel/token): keys 384 quantized; values 384 - R quantized + R f16.
  const auto kivi_bits = [](double kb, double vb, int g, int r, int pbytes) {
    const double keys = 384 * 64 * kb / 8 + 2.0 * (384 / g) * 64 * pbytes;
    const double values = (384 - r) * (64 * vb / 8 + 2.0 * (64 / g) * pbytes) + r * 64 * 2;
    return 8 * (keys + values) / 49152;
  };
  const double expected_bits[] = {
      8.25,
      4.25,
      5.0,
      8.0 * (352 * 72 + 32 * 128) / (384 * 64),
      8 + 64.0 / 49152,
      8 + 64.0 / 49152,
      kivi_bits(2, 2, 32, 32, 2),
      kivi_bits(4, 4, 32, 32, 2),
      kivi_bits(8, 8, 32, 32, 2),
      // keys per token: 384 - 128 quantized + 128 f16; values likewise.
      2 * 8 * ((384 - 128) * (32 + 2.0 * 1 * 2) + 128 * 128) / 49152,
      // keys per channel as #6; values per channel: 384 quantized in 12 blocks.
      8 * (2 * (384 * 64 * 2 / 8 + 2.0 * 12 * 64 * 2)) / 49152,
      kivi_bits(2, 2, 64, 128, 4),
      // per-tensor scales: 2 x 4 bytes once per layer (8 layers), over 8 layers x 2 heads.
      8 + 8.0 * 8 * 8 / (8 * 2 * 49152.0),
  };
  for (std::size_t i = 0; i < specs.size(); ++i) {
    const auto& p = r.policies[i];
    INFO(specs[i] << ": bits/value " << p.bits_per_value << ", rel_error " << p.rel_error);
    REQUIRE(p.bits_per_value == Approx(expected_bits[i]).epsilon(1e-9));
    REQUIRE(p.attn_recall == Approx(1.0).epsilon(1e-6));
    REQUIRE(p.rel_error > 0.0);
  }
  // Recorded on this data (bits/value, rel_error), in the order of `specs`:
  //   int8 8.250 / 0.0167; int4 4.250 / 0.305; int4(sym=false,group=32) 5.000 / 0.150;
  //   int8(sym=false,scales=f32,residual=32) 9.583 / 0.0032; fp8 e4m3 8.001 / 0.075;
  //   fp8 e5m2 8.001 / 0.155; kivi-2 3.542 / 0.186; kivi-4 5.458 / 0.0326; kivi-8 9.292 / 0.0020;
  //   kivi-4 kaxis=token (G 64, R 128) 8.333 / 0.0347; kivi-2 vaxis=channel 3.000 / 0.225;
  //   kivi-2 G 64, R 128, f32 scales 5.167 / 0.181; fp8 e5m2 scope=tensor 8.0007 / 0.150.
  // INT8 with no residual stays above 0.01 here: this model attends mostly to recent tokens,
  // whose per-token error then dominates (int8(residual=32) gives 0.0035).
  // Per-token INT4 of the keys loses to KIVI-2's per-channel keys on this data (outlier
  // channels dominate a token's absmax), so INT4 is bounded by 0.5, not by KIVI-2.
  const auto err = [&](int i) { return r.policies[i].rel_error; };
  REQUIRE(err(0) < 0.03);    // int8
  REQUIRE(err(0) < err(7));  // int8 beats kivi-4
  REQUIRE(err(8) < err(0));  // kivi-8 (per-channel keys, groups of 32) beats int8
  REQUIRE(err(1) < 0.5);     // int4
  REQUIRE(err(2) < err(1));  // smaller groups + minimum help int4
  REQUIRE(err(3) < err(0));  // asymmetric int8 with f32 scales and a residual
  REQUIRE(err(4) < 0.15);    // fp8 e4m3
  REQUIRE(err(4) < err(5));  // e4m3 (3 mantissa bits) beats e5m2 (2)
  REQUIRE(err(7) < err(6));  // kivi-4 beats kivi-2
  REQUIRE(err(6) < 0.3);
  REQUIRE(err(9) < 0.1);
  REQUIRE(err(10) < 0.5);
  REQUIRE(err(11) < 0.5);
  REQUIRE(err(12) < 0.3);  // fp8 e5m2, per-tensor scales
}

TEST_CASE("NaN/Inf through the cache name layer, KV head, position and channel", "[quantfmt]") {
  const int layers = 2, hkv = 2, t = 6, d = 8;
  for (const char* spec : {"int8", "fp8", "kivi(bits=4,group=8,residual=8)"}) {
    INFO(spec);
    const auto policies = kvc::build_policies(spec);
    kvc::RuntimeCache cache{kvc::CacheShape{layers, 4, hkv, d}, policies.eviction, policies.quant,
                            kvc::CacheOptions{}};
    auto k = kvc::test::random_floats(hkv * t * d, 51),
         v = kvc::test::random_floats(hkv * t * d, 52);
    const std::vector<float> q;
    cache.prefill(0, make_view(static_cast<const float*>(k.data()), {hkv, t, d}),
                  make_view(static_cast<const float*>(v.data()), {hkv, t, d}),
                  make_view(q.data(), {4, 0, d}));
    cache.compress(0);
    // Layer 1, KV head 1, token 4, channel 3 of the values.
    v[(1 * t + 4) * d + 3] = NAN;
    cache.prefill(1, make_view(static_cast<const float*>(k.data()), {hkv, t, d}),
                  make_view(static_cast<const float*>(v.data()), {hkv, t, d}),
                  make_view(q.data(), {4, 0, d}));
    REQUIRE_THROWS_WITH(cache.compress(1),
                        Catch::Contains("layer 1, KV head 1") &&
                            Catch::Contains("value of the token at position 4") &&
                            Catch::Contains("channel 3 is nan"));
    // A decode token with an infinity in layer 0, KV head 0.
    std::vector<float> kt(hkv * d, 0.5f), vt(hkv * d, 0.5f);
    kt[2] = INFINITY;
    REQUIRE_THROWS_WITH(cache.append(0, make_view(static_cast<const float*>(kt.data()), {hkv, d}),
                                     make_view(static_cast<const float*>(vt.data()), {hkv, d})),
                        Catch::Contains("layer 0, KV head 0") &&
                            Catch::Contains("key of the token at position 6, channel 2 is inf"));
  }
}

TEST_CASE("fp8 scope=tensor: the layer's prompt maximum, before eviction, stored once",
          "[quantfmt]") {
  struct Config : kvc::DefaultConfig {
    using Eviction = kvc::SnapKv;
    using Quant = kvc::Fp8;
  };
  const int hkv = 2, hq = 4, t = 40, d = 8;
  auto k = kvc::test::random_floats(hkv * t * d, 61), v = kvc::test::random_floats(hkv * t * d, 62);
  auto q = kvc::test::random_floats(hq * 8 * d, 63);
  // The layer maximum sits in KV head 1 at token 2, which SnapKV (budget 16, window 8) may drop;
  // head 0's own maximum is below 1.
  k[(1 * t + 2) * d + 5] = 44.8f;
  v[(0 * t + 3) * d + 1] = -5.6f;
  const kvc::Fp8 fp8{.kind = kvc::ops::Fp8Kind::e4m3, .scope = kvc::Fp8Scope::tensor};
  kvc::KVCache<Config, kvc::Cpu> cache{kvc::CacheShape{1, hq, hkv, d},
                                       kvc::SnapKv{.budget = 16, .window = 8, .kernel = 3}, fp8};
  cache.prefill(0, make_view(static_cast<const float*>(k.data()), {hkv, t, d}),
                make_view(static_cast<const float*>(v.data()), {hkv, t, d}),
                make_view(static_cast<const float*>(q.data()), {hq, 8, d}));
  cache.compress(0);
  for (int s = 0; s < hkv; ++s) {
    INFO("storage head " << s);
    REQUIRE(cache.store(0, s).key_scale() == 44.8f / 448.0f);
    REQUIRE(cache.store(0, s).value_scale() == 5.6f / 448.0f);
    REQUIRE(cache.tokens(0, s) == 16);
  }
  // The two scales are stored once per layer, with KV head 0.
  REQUIRE(cache.store(0, 0).bytes().params == 8);
  REQUIRE(cache.store(0, 1).bytes().params == 0);
  REQUIRE(cache.store(0, 1).bytes().payload == 2 * 16 * d);
  // scope=head gives head 0 its own maximum.
  kvc::KVCache<Config, kvc::Cpu> per_head{kvc::CacheShape{1, hq, hkv, d},
                                          kvc::SnapKv{.budget = 16, .window = 8, .kernel = 3},
                                          kvc::Fp8{}};
  per_head.prefill(0, make_view(static_cast<const float*>(k.data()), {hkv, t, d}),
                   make_view(static_cast<const float*>(v.data()), {hkv, t, d}),
                   make_view(static_cast<const float*>(q.data()), {hq, 8, d}));
  per_head.compress(0);
  REQUIRE(per_head.store(0, 0).key_scale() < 1.0f / 448.0f);
  REQUIRE(per_head.store(0, 1).bytes().params == 8);
  // Without the cache (no see_layer), scope=tensor with computed scales is an error.
  kvc::Fp8::HeadStore alone;
  REQUIRE_THROWS_WITH(
      alone.load(fp8, make_view(static_cast<const float*>(k.data()), {t, d}),
                 make_view(static_cast<const float*>(v.data()), {t, d}), iota_positions(t)),
      Catch::Contains("scope=tensor") && Catch::Contains("scope=head"));
}
