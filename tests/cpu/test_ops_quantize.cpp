// Tests of the asymmetric min-max quantizer (ALGORITHMS.md P5), bit packing (P6) and the KIVI
// key/value layouts: section 25 vectors 1 and 2, hand-placed fields, and a derived error bound.
#include <algorithm>
#include <catch2/catch.hpp>
#include <cmath>
#include <cstdint>
#include <vector>

#include "kvc/ops/quantize.hpp"
#include "support/reference.hpp"

namespace {

using kvc::make_view;
using kvc::ops::GroupParams;
using Codes = std::vector<std::uint8_t>;
using Words = std::vector<std::uint32_t>;

struct Quantized {
  GroupParams params;
  Codes codes;
};
Quantized quantize(const std::vector<float>& x, int bits) {
  Quantized q;
  q.codes.resize(x.size());
  q.params = kvc::ops::quantize_group(kvc::Cpu{}, x, bits, q.codes);
  return q;
}

Words pack(const Codes& codes, int bits) {
  Words w(
      static_cast<std::size_t>(kvc::ops::words_for(static_cast<std::int64_t>(codes.size()), bits)));
  kvc::ops::pack_codes(codes, bits, w);
  return w;
}
Codes unpack(const Words& words, int bits, std::size_t count) {
  Codes c(count);
  kvc::ops::unpack_codes(words, bits, c);
  return c;
}

// Error bound of one dequantized element, derived for a group with exact min mn and max mx at
// b bits, L = 2^b - 1, exact scale s = (mx - mn) / L, stored mn_h = f16(mn), s_h = f16(fp32(s)):
//   interior, 0 <= t = (x - mn_h) / s_h <= L:  |x - x_hat| = s_h |t - round(t)| <= s_h / 2
//   clamped low, x < mn_h:                     |x - x_hat| = mn_h - x <= |mn - mn_h|
//   clamped high, t > L:                       x - x_hat <= mx - mn_h - L s_h
//                                                        <= |mn - mn_h| + L |s - s_h|
//   (s_h == 0 with s > 0 is the clamped case with q = 0: the same bound.)
// f16 rounding: |mn - mn_h| <= max(2^-11 |mn|, 2^-25) (relative half-ulp for normals, half the
// subnormal step 2^-24 below 2^-14); |s - s_h| <= (2^-11 + 2^-23) s + 2^-25 (the fp32 division
// first, then f16). fp32 arithmetic (subtract, divide, rounding near a half, multiply-add of the
// dequantization) adds at most 4 u (|x| + |mn_h| + L s_h), u = 2^-24. So
//   |x - x_hat| <= max(s_h / 2, dmin + L ds) + 4 u (|x| + |mn| + dmin + L (s + ds))
// with s_h <= s + ds. For ordinary data this is s/2 (the textbook bound); near large offsets
// (|mn| >> s) the f16 rounding of the minimum dominates.
double error_bound(double mn, double mx, int bits, double x) {
  const double levels = (1 << bits) - 1;
  const double s = (mx - mn) / levels;
  const double dmin = std::max(0x1p-11 * std::fabs(mn), 0x1p-25);
  const double ds = (0x1p-11 + 0x1p-23) * s + 0x1p-25;
  return std::max((s + ds) / 2, dmin + levels * ds) +
         4 * 0x1p-24 * (std::fabs(x) + std::fabs(mn) + dmin + levels * (s + ds));
}

}  // namespace

TEST_CASE("quantize_group: section 25 vector 1", "[ops][quantize]") {
  // [0, 1, 2, 3] at 2 bits: min 0, scale 3 / 3 = 1, codes = x, exact reconstruction.
  const auto a = quantize({0, 1, 2, 3}, 2);
  CHECK(static_cast<float>(a.params.minimum) == 0.0f);
  CHECK(static_cast<float>(a.params.scale) == 1.0f);
  CHECK(a.codes == Codes{0, 1, 2, 3});
  for (int i = 0; i < 4; ++i) CHECK(kvc::ops::dequantize_code(a.codes[i], a.params) == i);
  // [0, 0.5, 1.5, 3]: t = 0, 0.5, 1.5, 3 -> half to even -> 0, 0, 2, 3.
  const auto b = quantize({0, 0.5f, 1.5f, 3}, 2);
  CHECK(static_cast<float>(b.params.scale) == 1.0f);
  CHECK(b.codes == Codes{0, 0, 2, 3});
  // [5, 5, 5, 5]: zero range -> scale 0, codes 0, x_hat = 5 exactly.
  const auto c = quantize({5, 5, 5, 5}, 2);
  CHECK(c.params.scale.bits == 0);
  CHECK(static_cast<float>(c.params.minimum) == 5.0f);
  CHECK(c.codes == Codes{0, 0, 0, 0});
  CHECK(kvc::ops::dequantize_code(0, c.params) == 5.0f);
}

TEST_CASE("quantize_group: other widths, negative ranges, f16 rounding of min and scale",
          "[ops][quantize]") {
  // 1 bit, [0, 1, 2]: scale 2, t = 0, 0.5, 1 -> 0, 0 (half to even), 1.
  CHECK(quantize({0, 1, 2}, 1).codes == Codes{0, 0, 1});
  // 4 bits, [-3, 0, 12]: scale 15 / 15 = 1, codes x + 3.
  const auto a = quantize({-3, 0, 12}, 4);
  CHECK(static_cast<float>(a.params.minimum) == -3.0f);
  CHECK(a.codes == Codes{0, 3, 15});
  // 8 bits, [0, 2.5, 255]: scale 1; 2.5 -> 2 (even).
  CHECK(quantize({0, 2.5f, 255}, 8).codes == Codes{0, 2, 255});
  // min 0.1 is stored as f16(0.1) = 0.0999755859375; scale (0.4 - 0.1) / 3 = 0.1 likewise.
  // x = 0.1 gives t = (0.1 - 0.0999756) / 0.0999756 = 0.000244 -> code 0; x = 0.4 gives
  // t = 3.0007 -> clamped to 3.
  const auto r = quantize({0.1f, 0.4f}, 2);
  CHECK(r.params.minimum.bits == kvc::f16(0.1f).bits);
  CHECK(r.params.minimum.bits == 0x2e66);
  CHECK(r.params.scale.bits == kvc::f16((0.4f - 0.1f) / 3.0f).bits);
  CHECK(r.codes == Codes{0, 3});
}

TEST_CASE("quantize_group: error bound on random data", "[ops][quantize]") {
  for (int bits : {1, 2, 4, 8}) {
    for (std::uint64_t seed : {1u, 2u}) {
      for (float offset : {0.0f, 100.0f, -3000.0f}) {
        const auto x = kvc::test::random_floats(32, seed * 17 + bits, offset - 3, offset + 3);
        const auto q = quantize(x, bits);
        const double mn = *std::min_element(x.begin(), x.end());
        const double mx = *std::max_element(x.begin(), x.end());
        std::vector<float> xhat(x.size());
        std::vector<double> expected(x.begin(), x.end()), tol(x.size());
        for (std::size_t i = 0; i < x.size(); ++i) {
          CHECK(q.codes[i] < (1u << bits));
          xhat[i] = kvc::ops::dequantize_code(q.codes[i], q.params);
          tol[i] = error_bound(mn, mx, bits, x[i]);
        }
        const auto c = kvc::test::compare(xhat, expected, tol, {32}, seed);
        INFO("bits " << bits << ", offset " << offset << ": " << c.report);
        CHECK(c.ok);
      }
    }
  }
}

TEST_CASE("quantize_group rejects bad arguments", "[ops][quantize]") {
  using Catch::Contains;
  Codes codes(4);
  const std::vector<float> x = {0, 1, 2, 3};
  REQUIRE_THROWS_WITH(kvc::ops::quantize_group(kvc::Cpu{}, x, 3, codes),
                      Contains("bits = 3") && Contains("{1, 2, 4, 8}"));
  Codes short_codes(3);
  REQUIRE_THROWS_WITH(kvc::ops::quantize_group(kvc::Cpu{}, x, 2, short_codes),
                      Contains("codes has 3"));
  const std::vector<float> bad = {0, 1, NAN, 3};
  REQUIRE_THROWS_WITH(kvc::ops::quantize_group(kvc::Cpu{}, bad, 2, codes), Contains("x[2]"));
  const std::vector<float> huge = {-1e6f, 0, 0, 0};
  REQUIRE_THROWS_WITH(kvc::ops::quantize_group(kvc::Cpu{}, huge, 8, codes), Contains("65504"));
}

TEST_CASE("pack_codes: section 25 vector 2 and the top field of every width", "[ops][quantize]") {
  // 2 bits, codes (1, 2, 3, 0, 0 x 12): 1 + 2 * 4 + 3 * 16 = 57.
  Codes c2(16, 0);
  c2[0] = 1, c2[1] = 2, c2[2] = 3;
  CHECK(pack(c2, 2) == Words{57});
  // A word whose 16th 2-bit field is 3 (bits 30, 31: the int32 sign bit) unpacks to 3.
  const Codes top2 = unpack(Words{0xc0000000u}, 2, 16);
  CHECK(top2[15] == 3);
  CHECK(std::count(top2.begin(), top2.end(), 0) == 15);
  CHECK(kvc::ops::unpack_field(0xc0000000u, 15, 2) == 3u);
  // 4 bits, 8 fields: codes 1..8 -> nibbles 0x87654321.
  CHECK(pack({1, 2, 3, 4, 5, 6, 7, 8}, 4) == Words{0x87654321u});
  CHECK(unpack(Words{0x87654321u}, 4, 8) == Codes{1, 2, 3, 4, 5, 6, 7, 8});
  // 8 bits, 4 fields.
  CHECK(pack({1, 2, 3, 4}, 8) == Words{0x04030201u});
  CHECK(unpack(Words{0xff030201u}, 8, 4) == Codes{1, 2, 3, 255});
  // The maximum code in the top field, every width: 1 -> bit 31, 2 -> bits 30..31, ...
  for (int bits : {1, 2, 4, 8}) {
    const int per_word = 32 / bits;
    Codes codes(per_word, 0);
    codes.back() = static_cast<std::uint8_t>((1 << bits) - 1);
    const std::uint32_t top = static_cast<std::uint32_t>((1u << bits) - 1) << (32 - bits);
    INFO("bits " << bits);
    CHECK(pack(codes, bits) == Words{top});
    CHECK(unpack(Words{top}, bits, per_word) == codes);
  }
  // 1 bit: fields 0 and 31.
  Codes c1(32, 0);
  c1[0] = 1, c1[31] = 1;
  CHECK(pack(c1, 1) == Words{0x80000001u});
}

TEST_CASE("pack_codes: a partial last word is zero-padded; random round trips", "[ops][quantize]") {
  // 17 two-bit codes of 3: one full word, then one field in the second.
  CHECK(pack(Codes(17, 3), 2) == Words{0xffffffffu, 0x3u});
  // 9 four-bit codes 1..9.
  CHECK(pack({1, 2, 3, 4, 5, 6, 7, 8, 9}, 4) == Words{0x87654321u, 0x9u});
  CHECK(pack({}, 2).empty());
  for (int bits : {1, 2, 4, 8}) {
    for (std::size_t count : {1u, 5u, 16u, 33u, 70u}) {
      const auto r = kvc::test::random_floats(count, count * 10 + bits, 0, 1);
      Codes codes(count);
      for (std::size_t i = 0; i < count; ++i)
        codes[i] = static_cast<std::uint8_t>(r[i] * static_cast<float>(1 << bits));
      const auto words = pack(codes, bits);
      CHECK(static_cast<std::int64_t>(words.size()) ==
            (static_cast<std::int64_t>(count) * bits + 31) / 32);
      const auto back = unpack(words, bits, count);
      const auto c = kvc::test::compare_exact<std::uint8_t>(
          back, codes, {static_cast<std::int64_t>(count)}, bits);
      INFO("bits " << bits << ": " << c.report);
      CHECK(c.ok);
      // Fields past `count` in the last word are zero.
      const std::size_t used = count % (32 / bits);
      if (used != 0) CHECK((words.back() >> (used * bits)) == 0u);
    }
  }
}

TEST_CASE("pack_codes rejects codes that do not fit and wrong word counts", "[ops][quantize]") {
  using Catch::Contains;
  Words one(1), two(2);
  REQUIRE_THROWS_WITH(kvc::ops::pack_codes(Codes{1, 4}, 2, one),
                      Contains("codes[1] = 4") && Contains("[0, 3]"));
  REQUIRE_THROWS_WITH(kvc::ops::pack_codes(Codes{1, 2}, 2, two), Contains("need exactly 1"));
  Codes out(17);
  REQUIRE_THROWS_WITH(kvc::ops::unpack_codes(one, 2, out), Contains("need exactly 2"));
  REQUIRE_THROWS_WITH(kvc::ops::pack_codes(Codes{1}, 5, one), Contains("bits = 5"));
}

TEST_CASE("KIVI key layout: per channel, token groups, packed along tokens", "[ops][quantize]") {
  // n = 32 tokens, D = 3, 2 bits (16 codes per word), group 16 -> packed [3, 2], scale [3, 2].
  // All keys 0 except channel 2, tokens 17 (= 1) and 21 (= 3): group 1 of channel 2 (tokens
  // 16..31) has min 0, max 3 -> scale 1, codes 1 at token 17 and 3 at token 21. Token t lands in
  // word t / 16, field t % 16: word 1, fields 1 and 5 -> 1 << 2 | 3 << 10 = 4 + 3072 = 3076.
  // Every other group has zero range: scale 0, codes 0.
  const std::int64_t n = 32, d = 3;
  std::vector<float> keys(n * d, 0.0f);
  keys[17 * d + 2] = 1.0f;
  keys[21 * d + 2] = 3.0f;
  Words packed(d * 2, 0xdeadbeefu);
  std::vector<kvc::f16> scale(d * 2), minimum(d * 2);
  kvc::ops::quantize_keys_per_channel(
      kvc::Cpu{}, make_view(keys.data(), {n, d}), 2, 16, make_view(packed.data(), {d, 2}),
      make_view(scale.data(), {d, 2}), make_view(minimum.data(), {d, 2}));
  CHECK(packed == Words{0, 0, 0, 0, 0, 3076});
  for (std::int64_t i = 0; i < d * 2; ++i) {
    INFO("scale/min index " << i);
    CHECK(static_cast<float>(scale[i]) == (i == 5 ? 1.0f : 0.0f));
    CHECK(static_cast<float>(minimum[i]) == 0.0f);
  }
  std::vector<float> back(n * d, -1.0f);
  kvc::ops::dequantize_keys_per_channel(
      kvc::Cpu{}, make_view(static_cast<const std::uint32_t*>(packed.data()), {d, 2}),
      make_view(static_cast<const kvc::f16*>(scale.data()), {d, 2}),
      make_view(static_cast<const kvc::f16*>(minimum.data()), {d, 2}), 2, 16,
      make_view(back.data(), {n, d}));
  CHECK(back == keys);

  // A dense pattern: channel c, token t holds (t + c) % 4 (times 2 in the second group). Every
  // group spans 0..3 (or 0..6): scale 1 (or 2), codes (t + c) % 4. Word pattern of channel 1:
  // fields 1, 2, 3, 0, ... -> bytes 1 | 2 << 2 | 3 << 4 = 57 = 0x39.
  for (std::int64_t t = 0; t < n; ++t)
    for (std::int64_t c = 0; c < d; ++c)
      keys[t * d + c] = static_cast<float>(((t + c) % 4) * (t >= 16 ? 2 : 1));
  kvc::ops::quantize_keys_per_channel(
      kvc::Cpu{}, make_view(keys.data(), {n, d}), 2, 16, make_view(packed.data(), {d, 2}),
      make_view(scale.data(), {d, 2}), make_view(minimum.data(), {d, 2}));
  CHECK(packed ==
        Words{0xe4e4e4e4u, 0xe4e4e4e4u, 0x39393939u, 0x39393939u, 0x4e4e4e4eu, 0x4e4e4e4eu});
  CHECK(static_cast<float>(scale[1 * 2 + 1]) == 2.0f);
  CHECK(kvc::ops::unpack_field(packed[1 * 2 + 1], 17 % 16, 2) == (17u + 1u) % 4u);
}

TEST_CASE("KIVI value layout: per token, channel groups, packed along channels",
          "[ops][quantize]") {
  // n = 3 tokens, D = 32, 4 bits (8 codes per word), group 8 -> packed [3, 4], scale [3, 4].
  // All values 0 except token 2, channels 17 (= 5) and 19 (= 15): group 2 of token 2 (channels
  // 16..23) has min 0, max 15 -> scale 1. Channel c lands in word c / 8, field c % 8: word 2,
  // fields 1 and 3 -> 5 << 4 | 15 << 12 = 0xf050.
  const std::int64_t n = 3, d = 32;
  std::vector<float> values(n * d, 0.0f);
  values[2 * d + 17] = 5.0f;
  values[2 * d + 19] = 15.0f;
  Words packed(n * 4, 0xdeadbeefu);
  std::vector<kvc::f16> scale(n * 4), minimum(n * 4);
  kvc::ops::quantize_values_per_token(
      kvc::Cpu{}, make_view(values.data(), {n, d}), 4, 8, make_view(packed.data(), {n, 4}),
      make_view(scale.data(), {n, 4}), make_view(minimum.data(), {n, 4}));
  Words expected(n * 4, 0);
  expected[2 * 4 + 2] = 0xf050u;
  CHECK(packed == expected);
  for (std::int64_t i = 0; i < n * 4; ++i) {
    INFO("scale index " << i);
    CHECK(static_cast<float>(scale[i]) == (i == 2 * 4 + 2 ? 1.0f : 0.0f));
  }
  std::vector<float> back(n * d, -1.0f);
  kvc::ops::dequantize_values_per_token(
      kvc::Cpu{}, make_view(static_cast<const std::uint32_t*>(packed.data()), {n, 4}),
      make_view(static_cast<const kvc::f16*>(scale.data()), {n, 4}),
      make_view(static_cast<const kvc::f16*>(minimum.data()), {n, 4}), 4, 8,
      make_view(back.data(), {n, d}));
  CHECK(back == values);
}

TEST_CASE("KIVI layouts: random round trip within the bound, consistent with quantize_group",
          "[ops][quantize]") {
  const std::int64_t n = 64, d = 16, group = 32;
  for (int bits : {2, 4, 8}) {
    const std::uint64_t seed = 100 + bits;
    auto x = kvc::test::random_floats(n * d, seed, -3, 3);
    for (std::int64_t t = 0; t < n; ++t)  // channel offsets: outlier channels, f16 min rounding
      for (std::int64_t c = 0; c < d; ++c) x[t * d + c] += static_cast<float>(25 * c);
    const int per_word = 32 / bits;
    const auto xv = make_view(static_cast<const float*>(x.data()), {n, d});

    // Keys: per channel c, token groups g.
    Words kp(d * (n / per_word));
    std::vector<kvc::f16> ks(d * (n / group)), km(d * (n / group));
    kvc::ops::quantize_keys_per_channel(
        kvc::Cpu{}, xv, bits, group, make_view(kp.data(), {d, n / per_word}),
        make_view(ks.data(), {d, n / group}), make_view(km.data(), {d, n / group}));
    std::vector<float> khat(n * d);
    kvc::ops::dequantize_keys_per_channel(
        kvc::Cpu{}, make_view(static_cast<const std::uint32_t*>(kp.data()), {d, n / per_word}),
        make_view(static_cast<const kvc::f16*>(ks.data()), {d, n / group}),
        make_view(static_cast<const kvc::f16*>(km.data()), {d, n / group}), bits, group,
        make_view(khat.data(), {n, d}));
    std::vector<double> expected(x.begin(), x.end()), tol(n * d);
    for (std::int64_t c = 0; c < d; ++c)
      for (std::int64_t g = 0; g < n / group; ++g) {
        std::vector<float> column(group);
        for (std::int64_t i = 0; i < group; ++i) column[i] = x[(g * group + i) * d + c];
        const double mn = *std::min_element(column.begin(), column.end());
        const double mx = *std::max_element(column.begin(), column.end());
        for (std::int64_t i = 0; i < group; ++i)
          tol[(g * group + i) * d + c] = error_bound(mn, mx, bits, column[i]);
        // The layout holds exactly what quantize_group gives for the same group.
        const auto q = quantize(column, bits);
        CHECK(ks[c * (n / group) + g].bits == q.params.scale.bits);
        CHECK(km[c * (n / group) + g].bits == q.params.minimum.bits);
        const Words words(kp.begin() + c * (n / per_word) + g * (group / per_word),
                          kp.begin() + c * (n / per_word) + (g + 1) * (group / per_word));
        CHECK(unpack(words, bits, group) == q.codes);
      }
    const auto ck = kvc::test::compare(khat, expected, tol, {n, d}, seed);
    INFO("keys, bits " << bits << ": " << ck.report);
    CHECK(ck.ok);

    // Values: per token t, channel groups of 8 (two per token), or 16 at 2 bits (16 codes a word).
    const int vgroup = std::max(8, per_word);
    Words vp(n * (d / per_word));
    std::vector<kvc::f16> vs(n * (d / vgroup)), vm(n * (d / vgroup));
    kvc::ops::quantize_values_per_token(
        kvc::Cpu{}, xv, bits, vgroup, make_view(vp.data(), {n, d / per_word}),
        make_view(vs.data(), {n, d / vgroup}), make_view(vm.data(), {n, d / vgroup}));
    std::vector<float> vhat(n * d);
    kvc::ops::dequantize_values_per_token(
        kvc::Cpu{}, make_view(static_cast<const std::uint32_t*>(vp.data()), {n, d / per_word}),
        make_view(static_cast<const kvc::f16*>(vs.data()), {n, d / vgroup}),
        make_view(static_cast<const kvc::f16*>(vm.data()), {n, d / vgroup}), bits, vgroup,
        make_view(vhat.data(), {n, d}));
    for (std::int64_t t = 0; t < n; ++t)
      for (std::int64_t g = 0; g < d / vgroup; ++g) {
        const std::vector<float> row(x.begin() + t * d + g * vgroup,
                                     x.begin() + t * d + (g + 1) * vgroup);
        const double mn = *std::min_element(row.begin(), row.end());
        const double mx = *std::max_element(row.begin(), row.end());
        for (std::int64_t i = 0; i < vgroup; ++i)
          tol[t * d + g * vgroup + i] = error_bound(mn, mx, bits, row[i]);
        const auto q = quantize(row, bits);
        CHECK(vs[t * (d / vgroup) + g].bits == q.params.scale.bits);
        const Words words(vp.begin() + t * (d / per_word) + g * (vgroup / per_word),
                          vp.begin() + t * (d / per_word) + (g + 1) * (vgroup / per_word));
        CHECK(unpack(words, bits, vgroup) == q.codes);
      }
    const auto cv = kvc::test::compare(vhat, expected, tol, {n, d}, seed);
    INFO("values, bits " << bits << ": " << cv.report);
    CHECK(cv.ok);
  }
}

TEST_CASE("KIVI layouts reject bad shapes and group sizes", "[ops][quantize]") {
  using Catch::Contains;
  std::vector<float> x(48 * 8, 1.0f);
  Words packed(64);
  std::vector<kvc::f16> s(64), m(64);
  // n = 48 is not a multiple of group 32.
  REQUIRE_THROWS_WITH(kvc::ops::quantize_keys_per_channel(
                          kvc::Cpu{}, make_view(static_cast<const float*>(x.data()), {48, 8}), 2,
                          32, make_view(packed.data(), {8, 3}), make_view(s.data(), {8, 1}),
                          make_view(m.data(), {8, 1})),
                      Contains("n = 48") && Contains("group = 32"));
  // group 8 is not a multiple of 16 codes per word at 2 bits.
  REQUIRE_THROWS_WITH(kvc::ops::quantize_keys_per_channel(
                          kvc::Cpu{}, make_view(static_cast<const float*>(x.data()), {48, 8}), 2, 8,
                          make_view(packed.data(), {8, 3}), make_view(s.data(), {8, 6}),
                          make_view(m.data(), {8, 6})),
                      Contains("group = 8") && Contains("multiple of 16"));
  // packed of the wrong shape.
  REQUIRE_THROWS_WITH(kvc::ops::quantize_keys_per_channel(
                          kvc::Cpu{}, make_view(static_cast<const float*>(x.data()), {32, 8}), 2,
                          16, make_view(packed.data(), {2, 8}), make_view(s.data(), {8, 2}),
                          make_view(m.data(), {8, 2})),
                      Contains("packed has shape [2, 8]") && Contains("[8, 2]"));
  // Values: D = 8 is not a multiple of group 16.
  REQUIRE_THROWS_WITH(kvc::ops::quantize_values_per_token(
                          kvc::Cpu{}, make_view(static_cast<const float*>(x.data()), {48, 8}), 4,
                          16, make_view(packed.data(), {48, 1}), make_view(s.data(), {48, 1}),
                          make_view(m.data(), {48, 1})),
                      Contains("D = 8") && Contains("group = 16"));
  REQUIRE_THROWS_WITH(kvc::ops::quantize_values_per_token(
                          kvc::Cpu{}, make_view(static_cast<const float*>(x.data()), {4, 8}), 3, 8,
                          make_view(packed.data(), {4, 1}), make_view(s.data(), {4, 1}),
                          make_view(m.data(), {4, 1})),
                      Contains("bits = 3"));
  x[5 * 8 + 3] = NAN;  // token 5, channel 3
  REQUIRE_THROWS_WITH(kvc::ops::quantize_keys_per_channel(
                          kvc::Cpu{}, make_view(static_cast<const float*>(x.data()), {32, 8}), 2,
                          16, make_view(packed.data(), {8, 2}), make_view(s.data(), {8, 2}),
                          make_view(m.data(), {8, 2})),
                      Contains("keys[5, 3]"));
  REQUIRE_THROWS_WITH(kvc::ops::quantize_values_per_token(
                          kvc::Cpu{}, make_view(static_cast<const float*>(x.data()), {32, 8}), 4, 8,
                          make_view(packed.data(), {32, 1}), make_view(s.data(), {32, 1}),
                          make_view(m.data(), {32, 1})),
                      Contains("values[5, 3]"));
}
