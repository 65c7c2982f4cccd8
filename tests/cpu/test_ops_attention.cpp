// Tests of the CPU reference attention (kvc/ops/attention.hpp): decode and causal prefill with GQA,
// against a naive double-precision formula and hand-computed cases.
#include <algorithm>
#include <catch2/catch.hpp>
#include <cmath>
#include <cstdint>
#include <vector>

#include "kvc/ops/attention.hpp"
#include "support/reference.hpp"

namespace {

using kvc::make_view;
using kvc::ops::AttentionOptions;
using kvc::test::compare;
using kvc::test::naive_attention;

constexpr double kU = 0x1p-24;  // fp32 unit roundoff
double gamma(double k) { return k * kU / (1 - k * kU); }

// Tolerances of the fp32 reference against the exact result, per output element, derived from
// first-order rounding-error analysis (u = 2^-24, gamma_k = k u / (1 - k u)). For one query row
// with m visible keys, a_j = sum_c |q_c k_jc| and A = max_j a_j:
//   score  s_j = scale * dot:  |ds_j| <= scale (gamma_D + u) a_j            <= (D + 2) u scale A =
//   ds z_j = s_j - max_s:          |dz_j| <= 2 ds + u |z_j| <= 2 ds + 2 u scale A          =: dz
//   e_j = exp(z_j):             relative error <= dz + 2u   (glibc expf: < 1 ulp)
//   sum e_j:                    relative error <= dz + 2u + gamma_m
//   p_j = e_j / sum:            relative error <= 2 (dz + 2u) + gamma_m + u          =: rp
//   out_c = sum_j p_j v_jc:     |d out_c| <= rp sum_j p_j |v_jc| + gamma_m sum_j p_j |v_jc|
//                                        <= (rp + gamma_m) max_j |v_jc|
// (the naive double result is exact to ~1e-16 relative, negligible here). Probabilities get
// rp * p_j. Second-order terms are covered by the gamma_k forms and the slack in the 2u exp term.
struct RowTolerance {
  double probability_relative;  // rp
  double output_factor;         // rp + gamma_m, times max_j |v_jc|
};

RowTolerance row_tolerance(const float* q, const float* k, std::int64_t m, std::int64_t d,
                           double scale) {
  double a_max = 0;
  for (std::int64_t j = 0; j < m; ++j) {
    double a = 0;
    for (std::int64_t c = 0; c < d; ++c) a += std::fabs(double{q[c]} * k[j * d + c]);
    a_max = std::max(a_max, a);
  }
  const double ds = (static_cast<double>(d) + 2) * kU * scale * a_max;
  const double dz = 2 * ds + 2 * kU * scale * a_max;
  const double rp = 2 * (dz + 2 * kU) + gamma(static_cast<double>(m)) + kU;
  return {rp, rp + gamma(static_cast<double>(m))};
}

// Per-element tolerances for out [Hq, Tq, D] and probabilities [Hq, Tq, Tk] of causal attention.
struct Tolerances {
  std::vector<double> out, probabilities;
};
Tolerances attention_tolerances(const std::vector<float>& q, const std::vector<float>& k,
                                const std::vector<float>& v, const kvc::test::NaiveAttention& exact,
                                std::int64_t hq, std::int64_t hkv, std::int64_t tq, std::int64_t tk,
                                std::int64_t d) {
  const double scale = 1.0 / std::sqrt(static_cast<double>(d));
  Tolerances t;
  t.out.resize(exact.out.size());
  t.probabilities.resize(exact.probabilities.size());
  for (std::int64_t h = 0; h < hq; ++h) {
    const std::int64_t g = h / (hq / hkv);
    for (std::int64_t i = 0; i < tq; ++i) {
      const std::int64_t m = tk - tq + i + 1;
      const RowTolerance r = row_tolerance(&q[(h * tq + i) * d], &k[g * tk * d], m, d, scale);
      for (std::int64_t c = 0; c < d; ++c) {
        double v_max = 0;
        for (std::int64_t j = 0; j < m; ++j)
          v_max = std::max(v_max, std::fabs(double{v[(g * tk + j) * d + c]}));
        t.out[(h * tq + i) * d + c] = r.output_factor * v_max;
      }
      for (std::int64_t j = 0; j < tk; ++j) {
        const auto idx = (h * tq + i) * tk + j;
        t.probabilities[idx] = r.probability_relative * exact.probabilities[idx];
      }
    }
  }
  return t;
}

}  // namespace

TEST_CASE("decode attention matches a naive double formula", "[ops][attention]") {
  const std::int64_t hq = 8, hkv = 2, d = 16;
  for (std::uint64_t seed : {1u, 2u, 3u}) {
    for (std::int64_t n : {1, 5, 37}) {
      const auto q = kvc::test::random_floats(hq * d, seed, -2, 2);
      const auto k = kvc::test::random_floats(hkv * n * d, seed + 100, -2, 2);
      const auto v = kvc::test::random_floats(hkv * n * d, seed + 200, -3, 3);
      std::vector<float> out(hq * d), probs(hq * n);
      kvc::ops::decode_attention(kvc::Cpu{}, make_view(q.data(), {hq, d}),
                                 make_view(k.data(), {hkv, n, d}), make_view(v.data(), {hkv, n, d}),
                                 make_view(out.data(), {hq, d}), make_view(probs.data(), {hq, n}));
      const auto exact = naive_attention(q, k, v, hq, hkv, 1, n, d);
      const auto tol = attention_tolerances(q, k, v, exact, hq, hkv, 1, n, d);
      const auto c_out = compare(out, exact.out, tol.out, {hq, d}, seed);
      INFO("n = " << n << ", out: " << c_out.report);
      CHECK(c_out.ok);
      const auto c_p = compare(probs, exact.probabilities, tol.probabilities, {hq, n}, seed);
      INFO("probabilities: " << c_p.report);
      CHECK(c_p.ok);
    }
  }
}

TEST_CASE("decode attention: hand-computed 1 head, 2 tokens", "[ops][attention]") {
  // D = 4 -> scale 1/2. q . k0 = 0, q . k1 = 2 ln 3, so the scores are 0 and ln 3 and the
  // probabilities exp(0) : exp(ln 3) = 1 : 3 -> [1/4, 3/4].
  // out = v0 / 4 + 3 v1 / 4 = [4 + 24, 0 + 12, 1 + 3, -2 + 6] / 4 = [7, 3, 1, 1].
  const float two_ln3 = static_cast<float>(2 * std::log(3.0));
  const std::vector<float> q = {two_ln3, 0, 0, 0};
  const std::vector<float> k = {0, 0, 0, 0, 1, 0, 0, 0};
  const std::vector<float> v = {4, 0, 1, -2, 8, 4, 1, 2};
  std::vector<float> out(4), probs(2);
  kvc::ops::decode_attention(kvc::Cpu{}, make_view(q.data(), {1, 4}),
                             make_view(k.data(), {1, 2, 4}), make_view(v.data(), {1, 2, 4}),
                             make_view(out.data(), {1, 4}), make_view(probs.data(), {1, 2}));
  const auto c_p = compare(probs, std::vector<double>{0.25, 0.75}, 1e-6, {1, 2}, 0);
  INFO(c_p.report);
  CHECK(c_p.ok);
  const auto c_out = compare(out, std::vector<double>{7, 3, 1, 1}, 1e-5, {1, 4}, 0);
  INFO(c_out.report);
  CHECK(c_out.ok);
  // An explicit scale replaces 1/sqrt(D): with scale 1 the scores are 0 and 2 ln 3 -> 1 : 9.
  kvc::ops::decode_attention(kvc::Cpu{}, make_view(q.data(), {1, 4}),
                             make_view(k.data(), {1, 2, 4}), make_view(v.data(), {1, 2, 4}),
                             make_view(out.data(), {1, 4}), make_view(probs.data(), {1, 2}),
                             AttentionOptions{.scale = 1.0f});
  const auto c_s = compare(probs, std::vector<double>{0.1, 0.9}, 1e-6, {1, 2}, 0);
  INFO(c_s.report);
  CHECK(c_s.ok);
}

TEST_CASE("decode attention: query head h reads KV head h / (Hq / Hkv)", "[ops][attention]") {
  // Hq = 8, Hkv = 2: heads 0..3 read KV head 0, heads 4..7 read KV head 1. KV head 0 has zero keys
  // (uniform weights 1/3) and values all -1; KV head 1 has a key aligned with the query at token 2
  // only (weight ~1) and values [1, 2, 3, 4] at every token, so the output is exactly those
  // values whatever the weights.
  const std::int64_t hq = 8, hkv = 2, n = 3, d = 4;
  std::vector<float> q(hq * d, 0.0f), k(hkv * n * d, 0.0f), v(hkv * n * d);
  for (std::int64_t h = 0; h < hq; ++h) q[h * d + 0] = 10.0f;
  k[(1 * n + 2) * d + 0] = 10.0f;  // KV head 1, token 2: score 10 * 10 / 2 = 50
  for (std::int64_t j = 0; j < n; ++j)
    for (std::int64_t c = 0; c < d; ++c) {
      v[(0 * n + j) * d + c] = -1.0f;
      v[(1 * n + j) * d + c] = static_cast<float>(c + 1);
    }
  std::vector<float> out(hq * d), probs(hq * n);
  kvc::ops::decode_attention(kvc::Cpu{}, make_view(q.data(), {hq, d}),
                             make_view(k.data(), {hkv, n, d}), make_view(v.data(), {hkv, n, d}),
                             make_view(out.data(), {hq, d}), make_view(probs.data(), {hq, n}));
  std::vector<double> expected_out, expected_p;
  for (std::int64_t h = 0; h < hq; ++h) {
    for (std::int64_t c = 0; c < d; ++c) expected_out.push_back(h < 4 ? -1.0 : c + 1.0);
    for (std::int64_t j = 0; j < n; ++j)
      expected_p.push_back(h < 4 ? 1.0 / 3 : (j == 2 ? 1.0 : 0.0));  // exp(-50) ~ 2e-22
  }
  const auto c_out = compare(out, expected_out, 4e-6, {hq, d}, 0);
  INFO(c_out.report);
  CHECK(c_out.ok);
  const auto c_p = compare(probs, expected_p, 1e-6, {hq, n}, 0);
  INFO(c_p.report);
  CHECK(c_p.ok);
}

TEST_CASE("decode attention: probabilities sum to 1", "[ops][attention]") {
  const std::int64_t hq = 4, hkv = 4, n = 100, d = 8;
  const std::uint64_t seed = 11;
  const auto q = kvc::test::random_floats(hq * d, seed, -3, 3);
  const auto k = kvc::test::random_floats(hkv * n * d, seed + 1, -3, 3);
  const auto v = kvc::test::random_floats(hkv * n * d, seed + 2);
  std::vector<float> out(hq * d), probs(hq * n);
  kvc::ops::decode_attention(kvc::Cpu{}, make_view(q.data(), {hq, d}),
                             make_view(k.data(), {hkv, n, d}), make_view(v.data(), {hkv, n, d}),
                             make_view(out.data(), {hq, d}), make_view(probs.data(), {hq, n}));
  std::vector<float> sums(hq);
  for (std::int64_t h = 0; h < hq; ++h)
    for (std::int64_t j = 0; j < n; ++j) sums[h] += probs[h * n + j];
  // Each p_j carries <= 2u (rounded exp / sum) relative error plus the sum's own rounding:
  // |sum - 1| <= (2 + 2 n) u for n = 100.
  const auto c = compare(sums, std::vector<double>(hq, 1.0), (2.0 + 2.0 * n) * kU, {hq}, seed);
  INFO(c.report);
  CHECK(c.ok);
  for (float p : probs) CHECK(p >= 0.0f);
}

TEST_CASE("prefill attention: row i equals decode over the first i + 1 tokens",
          "[ops][attention]") {
  const std::int64_t hq = 6, hkv = 3, t = 9, d = 8;
  const std::uint64_t seed = 21;
  const auto q = kvc::test::random_floats(hq * t * d, seed, -2, 2);
  const auto k = kvc::test::random_floats(hkv * t * d, seed + 1, -2, 2);
  const auto v = kvc::test::random_floats(hkv * t * d, seed + 2, -2, 2);
  std::vector<float> out(hq * t * d);
  kvc::ops::prefill_attention(kvc::Cpu{}, make_view(q.data(), {hq, t, d}),
                              make_view(k.data(), {hkv, t, d}), make_view(v.data(), {hkv, t, d}),
                              make_view(out.data(), {hq, t, d}));
  const auto kv = make_view(k.data(), {hkv, t, d});
  const auto vv = make_view(v.data(), {hkv, t, d});
  for (std::int64_t i = 0; i < t; ++i) {
    // The query row i of every head, [Hq, D] with stride T * D between heads.
    auto qi = make_view(q.data(), {hq, t, d}).slice(1, i, i + 1);
    kvc::HostView<const float, 2> q_row{qi.data, {hq, d}, {qi.strides[0], qi.strides[2]}};
    std::vector<float> decoded(hq * d), prefilled(hq * d);
    kvc::ops::decode_attention(kvc::Cpu{}, q_row, kv.slice(1, 0, i + 1), vv.slice(1, 0, i + 1),
                               make_view(decoded.data(), {hq, d}));
    for (std::int64_t h = 0; h < hq; ++h)
      for (std::int64_t c = 0; c < d; ++c) prefilled[h * d + c] = out[(h * t + i) * d + c];
    // Same loop, same operation order: the two must agree exactly.
    const auto c = compare(prefilled, decoded, 0.0, {hq, d}, seed);
    INFO("row " << i << ": " << c.report);
    CHECK(c.ok);
  }
  const auto exact = naive_attention(q, k, v, hq, hkv, t, t, d);
  const auto tol = attention_tolerances(q, k, v, exact, hq, hkv, t, t, d);
  const auto c = compare(out, exact.out, tol.out, {hq, t, d}, seed);
  INFO(c.report);
  CHECK(c.ok);
}

TEST_CASE("prefill attention: Tq < Tk offsets the causal mask", "[ops][attention]") {
  // Query i has absolute index Tk - Tq + i = 4 + i and sees keys 0 .. 4 + i.
  const std::int64_t hq = 4, hkv = 2, tq = 3, tk = 7, d = 4;
  const std::uint64_t seed = 31;
  const auto q = kvc::test::random_floats(hq * tq * d, seed, -2, 2);
  const auto k = kvc::test::random_floats(hkv * tk * d, seed + 1, -2, 2);
  const auto v = kvc::test::random_floats(hkv * tk * d, seed + 2, -2, 2);
  std::vector<float> out(hq * tq * d);
  kvc::ops::prefill_attention(kvc::Cpu{}, make_view(q.data(), {hq, tq, d}),
                              make_view(k.data(), {hkv, tk, d}), make_view(v.data(), {hkv, tk, d}),
                              make_view(out.data(), {hq, tq, d}));
  const auto exact = naive_attention(q, k, v, hq, hkv, tq, tk, d);
  const auto tol = attention_tolerances(q, k, v, exact, hq, hkv, tq, tk, d);
  const auto c = compare(out, exact.out, tol.out, {hq, tq, d}, seed);
  INFO(c.report);
  CHECK(c.ok);
  // Changing key/value 6 must leave rows 0 and 1 (which see keys <= 4 and <= 5) bit-identical
  // and change row 2 (which sees all 7).
  auto k2 = k;
  auto v2 = v;
  for (std::int64_t g = 0; g < hkv; ++g)
    for (std::int64_t c2 = 0; c2 < d; ++c2) {
      k2[(g * tk + 6) * d + c2] += 1.0f;
      v2[(g * tk + 6) * d + c2] += 5.0f;
    }
  std::vector<float> out2(hq * tq * d);
  kvc::ops::prefill_attention(
      kvc::Cpu{}, make_view(q.data(), {hq, tq, d}), make_view(k2.data(), {hkv, tk, d}),
      make_view(v2.data(), {hkv, tk, d}), make_view(out2.data(), {hq, tq, d}));
  for (std::int64_t h = 0; h < hq; ++h)
    for (std::int64_t i = 0; i < tq; ++i) {
      bool same = true;
      for (std::int64_t c2 = 0; c2 < d; ++c2)
        same = same && out[(h * tq + i) * d + c2] == out2[(h * tq + i) * d + c2];
      INFO("head " << h << ", row " << i);
      CHECK(same == (i < 2));
    }
}

TEST_CASE("attention: the fp64 option agrees with the double formula", "[ops][attention]") {
  const std::int64_t hq = 4, hkv = 1, t = 12, d = 32;
  const std::uint64_t seed = 41;
  const auto q = kvc::test::random_floats(hq * t * d, seed, -2, 2);
  const auto k = kvc::test::random_floats(hkv * t * d, seed + 1, -2, 2);
  const auto v = kvc::test::random_floats(hkv * t * d, seed + 2, -2, 2);
  std::vector<float> out64(hq * t * d), out32(hq * t * d);
  kvc::ops::prefill_attention(kvc::Cpu{}, make_view(q.data(), {hq, t, d}),
                              make_view(k.data(), {hkv, t, d}), make_view(v.data(), {hkv, t, d}),
                              make_view(out64.data(), {hq, t, d}),
                              AttentionOptions{.accumulate_fp64 = true});
  kvc::ops::prefill_attention(kvc::Cpu{}, make_view(q.data(), {hq, t, d}),
                              make_view(k.data(), {hkv, t, d}), make_view(v.data(), {hkv, t, d}),
                              make_view(out32.data(), {hq, t, d}));
  const auto exact = naive_attention(q, k, v, hq, hkv, t, t, d);
  // In double the only visible error is the final rounding to fp32 (u |out|); 1e-12 covers the
  // double-precision accumulation (~(D + n) 2^-53 relative to max |v| = 2).
  std::vector<double> tol64(exact.out.size());
  for (std::size_t i = 0; i < tol64.size(); ++i) tol64[i] = kU * std::fabs(exact.out[i]) + 1e-12;
  const auto c64 = compare(out64, exact.out, tol64, {hq, t, d}, seed);
  INFO("fp64: " << c64.report);
  CHECK(c64.ok);
  const auto tol = attention_tolerances(q, k, v, exact, hq, hkv, t, t, d);
  const auto c32 = compare(out32, exact.out, tol.out, {hq, t, d}, seed);
  INFO("fp32: " << c32.report);
  CHECK(c32.ok);
}

TEST_CASE("attention rejects bad arguments with a message naming the value", "[ops][attention]") {
  std::vector<float> buf(256, 0.5f), out(256);
  auto q = make_view(static_cast<const float*>(buf.data()), {6, 4});
  auto k = make_view(static_cast<const float*>(buf.data()), {4, 3, 4});
  auto o = make_view(out.data(), {6, 4});
  using Catch::Contains;
  // Hq = 6 is not a multiple of Hkv = 4.
  REQUIRE_THROWS_WITH(kvc::ops::decode_attention(kvc::Cpu{}, q, k, k, o),
                      Contains("Hq = 6") && Contains("Hkv = 4"));
  auto k2 = make_view(static_cast<const float*>(buf.data()), {2, 3, 5});
  REQUIRE_THROWS_WITH(kvc::ops::decode_attention(kvc::Cpu{}, q, k2, k2, o),
                      Contains("D = 5") && Contains("D = 4"));
  auto empty = make_view(static_cast<const float*>(buf.data()), {2, 0, 4});
  REQUIRE_THROWS_WITH(kvc::ops::decode_attention(kvc::Cpu{}, q, empty, empty, o),
                      Contains("n = 0") && Contains("n >= 1"));
  auto k3 = make_view(static_cast<const float*>(buf.data()), {2, 3, 4});
  auto v_short = make_view(static_cast<const float*>(buf.data()), {2, 2, 4});
  REQUIRE_THROWS_WITH(kvc::ops::decode_attention(kvc::Cpu{}, q, k3, v_short, o),
                      Contains("v has shape [2, 2, 4]"));
  auto probs = make_view(out.data() + 64, {6, 2});
  REQUIRE_THROWS_WITH(kvc::ops::decode_attention(kvc::Cpu{}, q, k3, k3, o, probs),
                      Contains("probabilities has shape [6, 2]"));
  REQUIRE_THROWS_WITH(
      kvc::ops::decode_attention(kvc::Cpu{}, q, k3, k3, o, AttentionOptions{.scale = -1.0f}),
      Contains("scale = -1"));
  auto q3 = make_view(static_cast<const float*>(buf.data()), {6, 4, 4});
  auto o3 = make_view(out.data(), {6, 4, 4});
  REQUIRE_THROWS_WITH(kvc::ops::prefill_attention(kvc::Cpu{}, q3, k3, k3, o3),
                      Contains("Tq = 4") && Contains("Tk = 3"));
  buf[5] = NAN;  // q[1, 1]
  REQUIRE_THROWS_WITH(kvc::ops::decode_attention(kvc::Cpu{}, q, k3, k3, o), Contains("q[1, 1]"));
}
