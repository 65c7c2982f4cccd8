// Tests of rotary position embedding (kvc/ops/rope.hpp, ALGORITHMS.md P7): hand cases in both
// conventions, the group property, norm preservation, and undoing the real model's RoPE.
#include <algorithm>
#include <catch2/catch.hpp>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <vector>

#include "kvc/eval/npy.hpp"
#include "kvc/ops/rope.hpp"
#include "support/reference.hpp"

namespace {

using kvc::make_view;
using kvc::ops::Rope;
using kvc::ops::RopeConvention;
using kvc::test::compare;

constexpr double kU = 0x1p-24;

std::vector<float> rotated(std::vector<float> x, std::int64_t d, const Rope& rope,
                           const std::vector<std::int32_t>& amounts) {
  const auto n = static_cast<std::int64_t>(x.size()) / d;
  kvc::ops::rope_rotate(kvc::Cpu{}, rope, make_view(x.data(), {n, d}), amounts);
  return x;
}

// The pair partner of channel c.
std::int64_t partner(std::int64_t c, std::int64_t d, RopeConvention convention) {
  if (convention == RopeConvention::interleaved) return c ^ 1;
  return c < d / 2 ? c + d / 2 : c - d / 2;
}

}  // namespace

TEST_CASE("rope: hand case D = 4, position 1, theta 10000", "[ops][rope]") {
  // Frequencies theta^(-2i/D): i = 0 -> 1, i = 1 -> 10000^(-1/2) = 0.01. Position 1: angles 1 and
  // 0.01. cos 1 = 0.5403023058681398, sin 1 = 0.8414709848078965, cos 0.01 = 0.9999500004166653,
  // sin 0.01 = 0.009999833334166664. x = [1, 2, 3, 4].
  const std::vector<float> x = {1, 2, 3, 4};
  // rotate_half pairs (0, 2) at angle 1 and (1, 3) at angle 0.01:
  //   x0' = 1 cos1 - 3 sin1 = -1.98411064855555   x2' = 3 cos1 + 1 sin1 = 2.46237790241232
  //   x1' = 2 cos.01 - 4 sin.01 = 1.95990066749666  x3' = 4 cos.01 + 2 sin.01 = 4.01979966833499
  const auto half = rotated(x, 4, Rope{.theta = 10000.0}, {1});
  const std::vector<double> expected_half = {-1.98411064855555, 1.95990066749666, 2.46237790241232,
                                             4.01979966833499};
  const auto ch = compare(half, expected_half, 1e-6, {1, 4}, 0);
  INFO("rotate_half: " << ch.report);
  CHECK(ch.ok);
  // interleaved pairs (0, 1) at angle 1 and (2, 3) at angle 0.01:
  //   x0' = 1 cos1 - 2 sin1 = -1.14263966374765   x1' = 2 cos1 + 1 sin1 = 1.92207559654418
  //   x2' = 3 cos.01 - 4 sin.01 = 2.95985066791333  x3' = 4 cos.01 + 3 sin.01 = 4.02979950166916
  const auto inter =
      rotated(x, 4, Rope{.theta = 10000.0, .convention = RopeConvention::interleaved}, {1});
  const std::vector<double> expected_inter = {-1.14263966374765, 1.92207559654418, 2.95985066791333,
                                              4.02979950166916};
  const auto ci = compare(inter, expected_inter, 1e-6, {1, 4}, 0);
  INFO("interleaved: " << ci.report);
  CHECK(ci.ok);
}

TEST_CASE("rope: rotation by 0 is the identity, p then d equals p + d, norms kept", "[ops][rope]") {
  const std::int64_t n = 6, d = 16;
  const std::uint64_t seed = 3;
  const auto x = kvc::test::random_floats(n * d, seed, -4, 4);
  const std::vector<std::int32_t> p = {0, 1, 7, 100, 2047, 30000};
  const std::vector<std::int32_t> delta = {5, -1, -7, 923, -2047, -12345};
  std::vector<std::int32_t> sum(n);
  for (std::int64_t r = 0; r < n; ++r) sum[r] = p[r] + delta[r];
  for (auto convention : {RopeConvention::rotate_half, RopeConvention::interleaved}) {
    const Rope rope{.theta = 10000.0, .convention = convention};
    INFO("convention " << (convention == RopeConvention::rotate_half ? "rotate_half"
                                                                     : "interleaved"));
    CHECK(rotated(x, d, rope, std::vector<std::int32_t>(n, 0)) == x);  // cos 0 = 1, sin 0 = 0

    // Each rotation is computed in double and rounded once to fp32 (<= u per element relative to
    // the pair norm); the second rotation is an isometry, so two roundings are <= 2 u |pair|.
    // 4 u |pair| leaves room for the double-precision cos/sin error of angles up to ~3e4.
    const auto twice = rotated(rotated(x, d, rope, p), d, rope, delta);
    const auto once = rotated(x, d, rope, sum);
    std::vector<double> expected(once.begin(), once.end()), tol(n * d);
    for (std::int64_t r = 0; r < n; ++r)
      for (std::int64_t c = 0; c < d; ++c) {
        const double a = x[r * d + c], b = x[r * d + partner(c, d, convention)];
        tol[r * d + c] = 4 * kU * std::sqrt(a * a + b * b);
      }
    const auto cc = compare(twice, expected, tol, {n, d}, seed);
    INFO("rotate by p then delta vs by p + delta: " << cc.report);
    CHECK(cc.ok);

    const auto moved = rotated(x, d, rope, p);
    std::vector<float> norms(n * d);
    std::vector<double> original(n * d), norm_tol(n * d);
    for (std::int64_t r = 0; r < n; ++r)
      for (std::int64_t c = 0; c < d; ++c) {
        const auto i = r * d + c, j = r * d + partner(c, d, convention);
        norms[i] = static_cast<float>(std::hypot(double{moved[i]}, double{moved[j]}));
        original[i] = std::hypot(double{x[i]}, double{x[j]});
        norm_tol[i] = 3 * kU * original[i];
      }
    const auto cn = compare(norms, original, norm_tol, {n, d}, seed);
    INFO("pair norms: " << cn.report);
    CHECK(cn.ok);
  }
}

TEST_CASE("rope: conventions differ and theta matters", "[ops][rope]") {
  const std::int64_t d = 8;
  const auto x = kvc::test::random_floats(d, 9);
  const auto a = rotated(x, d, Rope{.theta = 10000.0}, {3});
  const auto b =
      rotated(x, d, Rope{.theta = 10000.0, .convention = RopeConvention::interleaved}, {3});
  const auto c = rotated(x, d, Rope{.theta = 500000.0}, {3});
  CHECK(a != b);
  CHECK(a != c);
  // Channel pair (0, D/2) has frequency 1 whatever theta is: angle 3.
  CHECK(a[0] == c[0]);
  CHECK(a[0] == Approx(x[0] * std::cos(3.0) - x[4] * std::sin(3.0)).epsilon(1e-6));
}

TEST_CASE("rope: parse_rope_convention and bad arguments", "[ops][rope]") {
  using Catch::Contains;
  CHECK(kvc::ops::parse_rope_convention("rotate_half") == RopeConvention::rotate_half);
  CHECK(kvc::ops::parse_rope_convention("interleaved") == RopeConvention::interleaved);
  REQUIRE_THROWS_WITH(kvc::ops::parse_rope_convention("neox"),
                      Contains("\"neox\"") && Contains("rotate_half") && Contains("interleaved"));
  std::vector<float> x(6, 1.0f);
  REQUIRE_THROWS_WITH(kvc::ops::rope_rotate(kvc::Cpu{}, Rope{}, make_view(x.data(), {2, 3}),
                                            std::vector<std::int32_t>{0, 1}),
                      Contains("D = 3") && Contains("even"));
  REQUIRE_THROWS_WITH(kvc::ops::rope_rotate(kvc::Cpu{}, Rope{}, make_view(x.data(), {3, 2}),
                                            std::vector<std::int32_t>{0, 1}),
                      Contains("2 amounts") && Contains("n = 3"));
  REQUIRE_THROWS_WITH(
      kvc::ops::rope_rotate(kvc::Cpu{}, Rope{.theta = 0.0}, make_view(x.data(), {3, 2}),
                            std::vector<std::int32_t>{0, 1, 2}),
      Contains("theta = 0"));
}

TEST_CASE("rope: rotating the real model's keys back by -p gives the pre-RoPE keys",
          "[ops][rope][data]") {
  // tests/data/seq0: k and k_prerope, f16 [L, Hkv, T, D] from the bundled byte-level Llama
  // (rotate_half, theta 10000, positions 0..T-1). Both files are f16 roundings of the model's
  // values, and the model rotated with fp32 angles (position * fp32 inv_freq) and fp16 cos/sin.
  // Error of R(-p) k - k_prerope per pair (a, b), with |pair| the pre-RoPE pair norm:
  //   f16 storage of k and of k_prerope: 2^-11 |pair| each (R(-p) is an isometry);
  //   the model's fp16 cos/sin and fp16 products and sums: ~3 * 2^-11 |pair|;
  //   the model's fp32 angle: |position * inv_freq| < 512, error <= 2 * 512 * 2^-24 < 1e-4 rad.
  // Total: (5 * 2^-11 + 1e-4) |pair|, plus 2^-24 absolute for pairs near zero.
  const std::filesystem::path dir = std::filesystem::path(KVC_TEST_DATA_DIR) / "seq0";
  if (!std::filesystem::exists(dir / "k.npy") || !std::filesystem::exists(dir / "k_prerope.npy")) {
    WARN("skipped: " << (dir / "k.npy") << " or k_prerope.npy is missing");
    return;
  }
  const kvc::Array k_file = kvc::read_npy(dir / "k.npy");
  const kvc::Array pre_file = kvc::read_npy(dir / "k_prerope.npy");
  kvc::check_shape(k_file, "k", {-1, -1, -1, -1});
  kvc::check_shape(pre_file, "k_prerope", k_file.shape);
  const std::int64_t layers = k_file.shape[0], heads = k_file.shape[1], t = k_file.shape[2],
                     d = k_file.shape[3];
  const std::vector<float> k = k_file.to_float(), pre = pre_file.to_float();

  std::vector<std::int32_t> minus_p(t);
  for (std::int64_t p = 0; p < t; ++p) minus_p[p] = static_cast<std::int32_t>(-p);
  std::vector<float> back(k);
  std::vector<double> expected(pre.begin(), pre.end()), tol(pre.size());
  for (std::int64_t lh = 0; lh < layers * heads; ++lh) {
    kvc::ops::rope_rotate(kvc::Cpu{}, Rope{.theta = 10000.0},
                          make_view(back.data() + lh * t * d, {t, d}), minus_p);
    for (std::int64_t r = 0; r < t; ++r)
      for (std::int64_t c = 0; c < d; ++c) {
        const auto base = (lh * t + r) * d;
        const double a = pre[base + c], b = pre[base + partner(c, d, RopeConvention::rotate_half)];
        tol[base + c] = (5 * 0x1p-11 + 1e-4) * std::sqrt(a * a + b * b) + kU;
      }
  }
  const auto c = compare(back, expected, tol, {layers, heads, t, d}, 0);
  INFO(c.report);
  CHECK(c.ok);
  // The check is not vacuous: without the re-rotation, or re-rotating with the other convention,
  // the keys differ far beyond the tolerance (except at position 0).
  const auto unrotated = compare(k, expected, tol, {layers, heads, t, d}, 0);
  CHECK_FALSE(unrotated.ok);
  std::vector<float> wrong(k);
  for (std::int64_t lh = 0; lh < layers * heads; ++lh)
    kvc::ops::rope_rotate(kvc::Cpu{},
                          Rope{.theta = 10000.0, .convention = RopeConvention::interleaved},
                          make_view(wrong.data() + lh * t * d, {t, d}), minus_p);
  CHECK_FALSE(compare(wrong, expected, tol, {layers, heads, t, d}, 0).ok);
}
