// Tests of observation-window scores (ALGORITHMS.md P1) and pooling (P2): hand-computed cases,
// the section 25 pooling vector, and a cross-check against decode attention.
#include <catch2/catch.hpp>
#include <cmath>
#include <cstdint>
#include <vector>

#include "kvc/ops/attention.hpp"
#include "kvc/ops/scores.hpp"
#include "support/reference.hpp"

namespace {

using kvc::make_view;
using kvc::ops::Pool;
using kvc::ops::ProbabilityRounding;
using kvc::ops::ScoreReduction;
using kvc::ops::WindowScoreOptions;
using kvc::test::compare;

// T = 4, W = 2, one head, D = 1 (scale 1/sqrt(1) = 1). Keys k = [0, ln 3, 0, 0]; window queries
// q = [1, 2] for tokens 2 and 3.
//   row 0 (token 2) sees j <= 2: scores [0, ln 3, 0] (token 3 masked)
//          -> exp: [1, 3, 1] / 5 = [0.2, 0.6, 0.2]
//   row 1 (token 3) sees all:    scores [0, 2 ln 3, 0, 0] -> [1, 9, 1, 1] / 12
//          -> [1/12, 3/4, 1/12, 1/12]
// f16 rounding (10 mantissa bits): 0.2 = 1.6 * 2^-3, 0.6 * 1024 = 614.4 -> 614:
//   f16(0.2) = 1638 / 8192 = 0.199951171875;  f16(0.6) = 1.2 * 2^-1 -> 0.2 * 1024 = 204.8 -> 205:
//   1229 / 2048 = 0.60009765625;  f16(1/12) = 1.333 * 2^-4 -> 341.33 -> 341: 1365 / 16384
//   = 0.08331298828125;  f16(3/4) = 0.75.
// bf16 rounding (7 mantissa bits): 0.6 * 128 = 76.8 -> 77: bf16(0.2) = 205 / 1024 = 0.2001953125;
//   0.2 * 128 = 25.6 -> 26: bf16(0.6) = 154 / 256 = 0.6015625; 0.333 * 128 = 42.67 -> 43:
//   bf16(1/12) = 171 / 2048 = 0.08349609375.
// Only the T - W = 2 prefix columns are output: column 0 = A[0,0] + A[1,0], column 1 = A[0,1] +
// A[1,1]. The sums of these short values are exact in fp32.
struct HandCase {
  std::vector<float> q{1.0f, 2.0f};
  std::vector<float> k{0.0f, std::log(3.0f), 0.0f, 0.0f};
  std::vector<float> run(const WindowScoreOptions& options) const {
    std::vector<float> scores(2);
    kvc::ops::window_scores(kvc::Cpu{}, make_view(q.data(), {1, 2, 1}),
                            make_view(k.data(), {1, 4, 1}), make_view(scores.data(), {1, 2}),
                            options);
    return scores;
  }
};

}  // namespace

TEST_CASE("window scores: hand case with the causal window mask and f16 rounding",
          "[ops][scores]") {
  const HandCase hand;
  const auto f16_sum = hand.run({});  // defaults: sum, f16
  const std::vector<double> expected_f16 = {0.199951171875 + 0.08331298828125,
                                            0.60009765625 + 0.75};
  const auto c = compare(f16_sum, expected_f16, 0.0, {1, 2}, 0);
  INFO("f16, sum: " << c.report);
  CHECK(c.ok);

  const auto f16_mean = hand.run({.reduction = ScoreReduction::mean});
  const std::vector<double> expected_mean = {expected_f16[0] / 2, expected_f16[1] / 2};
  const auto cm = compare(f16_mean, expected_mean, 0.0, {1, 2}, 0);
  INFO("f16, mean: " << cm.report);
  CHECK(cm.ok);

  const auto bf16_sum = hand.run({.rounding = ProbabilityRounding::bf16});
  const std::vector<double> expected_bf16 = {0.2001953125 + 0.08349609375, 0.6015625 + 0.75};
  const auto cb = compare(bf16_sum, expected_bf16, 0.0, {1, 2}, 0);
  INFO("bf16, sum: " << cb.report);
  CHECK(cb.ok);

  // No rounding: 0.2 + 1/12 and 0.6 + 0.75, to fp32 accuracy (ln 3 itself is rounded to fp32).
  const auto plain = hand.run({.rounding = ProbabilityRounding::none});
  const std::vector<double> expected_plain = {0.2 + 1.0 / 12, 0.6 + 0.75};
  const auto cp = compare(plain, expected_plain, 1e-6, {1, 2}, 0);
  INFO("no rounding: " << cp.report);
  CHECK(cp.ok);
}

TEST_CASE("window scores with no rounding equal summed decode probabilities (GQA)",
          "[ops][scores]") {
  // Window row i is a decode of query T - W + i over the first T - W + i + 1 keys; the scores are
  // the prefix columns of those probabilities summed over the rows.
  const std::int64_t hq = 4, hkv = 2, t = 11, w = 3, d = 8;
  const std::uint64_t seed = 5;
  const auto q = kvc::test::random_floats(hq * w * d, seed, -2, 2);
  const auto k = kvc::test::random_floats(hkv * t * d, seed + 1, -2, 2);
  std::vector<float> scores(hq * (t - w));
  kvc::ops::window_scores(kvc::Cpu{}, make_view(q.data(), {hq, w, d}),
                          make_view(k.data(), {hkv, t, d}), make_view(scores.data(), {hq, t - w}),
                          {.rounding = ProbabilityRounding::none});
  std::vector<double> expected(hq * (t - w), 0.0);
  const auto kv = make_view(k.data(), {hkv, t, d});
  for (std::int64_t i = 0; i < w; ++i) {
    const std::int64_t n = t - w + i + 1;
    const auto qi = make_view(q.data(), {hq, w, d}).slice(1, i, i + 1);
    kvc::HostView<const float, 2> q_row{qi.data, {hq, d}, {qi.strides[0], qi.strides[2]}};
    std::vector<float> out(hq * d), probs(hq * n);
    kvc::ops::decode_attention(kvc::Cpu{}, q_row, kv.slice(1, 0, n), kv.slice(1, 0, n),
                               make_view(out.data(), {hq, d}), make_view(probs.data(), {hq, n}));
    for (std::int64_t h = 0; h < hq; ++h)
      for (std::int64_t j = 0; j < t - w; ++j) expected[h * (t - w) + j] += probs[h * n + j];
  }
  // Same fp32 formula; only the order of the W-term sum may differ: W u per term is ample.
  const auto c = compare(scores, expected, 4 * w * 0x1p-24, {hq, t - w}, seed);
  INFO(c.report);
  CHECK(c.ok);
}

TEST_CASE("window scores: W == T gives no prefix columns; bad arguments", "[ops][scores]") {
  std::vector<float> q(8, 0.5f), k(16, 0.25f), none;
  using Catch::Contains;
  kvc::ops::window_scores(kvc::Cpu{}, make_view(q.data(), {2, 2, 2}),
                          make_view(k.data(), {1, 2, 2}), make_view(none.data(), {2, 0}));
  REQUIRE_THROWS_WITH(
      kvc::ops::window_scores(kvc::Cpu{}, make_view(q.data(), {1, 4, 2}),
                              make_view(k.data(), {1, 3, 2}), make_view(none.data(), {1, 0})),
      Contains("W = 4") && Contains("T = 3"));
  std::vector<float> s(8);
  REQUIRE_THROWS_WITH(
      kvc::ops::window_scores(kvc::Cpu{}, make_view(q.data(), {2, 2, 2}),
                              make_view(k.data(), {1, 5, 2}), make_view(s.data(), {2, 2})),
      Contains("scores has shape [2, 2]") && Contains("[2, 3]"));
  REQUIRE_THROWS_WITH(
      kvc::ops::window_scores(kvc::Cpu{}, make_view(q.data(), {3, 1, 2}),
                              make_view(k.data(), {2, 4, 2}), make_view(s.data(), {3, 3})),
      Contains("Hq = 3") && Contains("Hkv = 2"));
  REQUIRE_THROWS_WITH(
      kvc::ops::window_scores(kvc::Cpu{}, make_view(q.data(), {1, 2, 2}),
                              make_view(k.data(), {1, 4, 4}), make_view(s.data(), {1, 2})),
      Contains("D = 4") && Contains("D = 2"));
}

TEST_CASE("pool1d: section 25 vector 3", "[ops][scores]") {
  // s = [1, 0, 0, 0, 0, 0], k = 5, padding 2. avg divides by 5 everywhere: positions 0..2 have the
  // 1 inside their window -> 0.2; max with -inf padding -> 1 at 0..2, 0 elsewhere.
  const std::vector<float> s = {1, 0, 0, 0, 0, 0};
  std::vector<float> avg(6), max(6);
  kvc::ops::pool1d(kvc::Cpu{}, make_view(s.data(), {1, 6}), make_view(avg.data(), {1, 6}), 5,
                   Pool::avg);
  kvc::ops::pool1d(kvc::Cpu{}, make_view(s.data(), {1, 6}), make_view(max.data(), {1, 6}), 5,
                   Pool::max);
  const auto ca = compare(avg, std::vector<double>{0.2f, 0.2f, 0.2f, 0, 0, 0}, 0.0, {1, 6}, 0);
  INFO("avg: " << ca.report);
  CHECK(ca.ok);
  const auto cm = compare(max, std::vector<double>{1, 1, 1, 0, 0, 0}, 0.0, {1, 6}, 0);
  INFO("max: " << cm.report);
  CHECK(cm.ok);
}

TEST_CASE("pool1d: zero padding counts for avg, -inf padding for max; kernel 1 copies",
          "[ops][scores]") {
  // avg k = 3 of [1, 2, 3, 4, 5]: (0+1+2)/3, (1+2+3)/3, (2+3+4)/3, (3+4+5)/3, (4+5+0)/3.
  // max k = 3 of [-1, -2, -3, -4, -5] (a zero padding would wrongly give 0 at the ends).
  const std::vector<float> s = {1, 2, 3, 4, 5, -1, -2, -3, -4, -5};  // [2, 5]
  std::vector<float> out(10);
  kvc::ops::pool1d(kvc::Cpu{}, make_view(s.data(), {2, 5}), make_view(out.data(), {2, 5}), 3,
                   Pool::avg);
  const std::vector<double> avg = {1, 2, 3, 4, 3, -1, -2, -3, -4, -3};
  const auto ca = compare(out, avg, 1e-6, {2, 5}, 0);
  INFO("avg: " << ca.report);
  CHECK(ca.ok);
  kvc::ops::pool1d(kvc::Cpu{}, make_view(s.data(), {2, 5}), make_view(out.data(), {2, 5}), 3,
                   Pool::max);
  const std::vector<double> max = {2, 3, 4, 5, 5, -1, -1, -2, -3, -4};
  const auto cm = compare(out, max, 0.0, {2, 5}, 0);
  INFO("max: " << cm.report);
  CHECK(cm.ok);
  // A kernel wider than the row: every position sees the whole row.
  kvc::ops::pool1d(kvc::Cpu{}, make_view(s.data(), {2, 5}), make_view(out.data(), {2, 5}), 11,
                   Pool::max);
  const auto cw =
      compare(out, std::vector<double>{5, 5, 5, 5, 5, -1, -1, -1, -1, -1}, 0.0, {2, 5}, 0);
  INFO("max, kernel 11: " << cw.report);
  CHECK(cw.ok);
  for (Pool pool : {Pool::avg, Pool::max}) {
    kvc::ops::pool1d(kvc::Cpu{}, make_view(s.data(), {2, 5}), make_view(out.data(), {2, 5}), 1,
                     pool);
    CHECK(out == s);
  }
  // In place: out may alias in.
  auto inplace = s;
  kvc::ops::pool1d(kvc::Cpu{}, make_view(inplace.data(), {2, 5}), make_view(inplace.data(), {2, 5}),
                   3, Pool::max);
  const auto ci = compare(inplace, max, 0.0, {2, 5}, 0);
  INFO("in place: " << ci.report);
  CHECK(ci.ok);
}

TEST_CASE("pool1d rejects even or non-positive kernels and NaN", "[ops][scores]") {
  std::vector<float> s = {1, 2, 3, 4}, out(4);
  using Catch::Contains;
  for (int kernel : {4, 2, 0, -1})
    REQUIRE_THROWS_WITH(kvc::ops::pool1d(kvc::Cpu{}, make_view(s.data(), {1, 4}),
                                         make_view(out.data(), {1, 4}), kernel, Pool::avg),
                        Contains("kernel = " + std::to_string(kernel)) && Contains("odd"));
  REQUIRE_THROWS_WITH(kvc::ops::pool1d(kvc::Cpu{}, make_view(s.data(), {1, 4}),
                                       make_view(out.data(), {2, 2}), 3, Pool::avg),
                      Contains("out has shape [2, 2]"));
  s[2] = NAN;
  REQUIRE_THROWS_WITH(kvc::ops::pool1d(kvc::Cpu{}, make_view(s.data(), {1, 4}),
                                       make_view(out.data(), {1, 4}), 3, Pool::max),
                      Contains("in[0, 2]"));
}
