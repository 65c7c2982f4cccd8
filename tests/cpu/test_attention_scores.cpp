// The CPU reference of decode attention with scores (kvc::ops::decode_attention_with_scores):
// the group sum of the reference probabilities (each f16-rounded for H2O, as kvc::H2o sums them
// per decode step), added or overwritten.
#include <catch2/catch.hpp>
#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include "kvc/core/dtype.hpp"
#include "kvc/ops/attention.hpp"

namespace {

namespace ops = kvc::ops;

struct Inputs {
  std::int64_t hq = 8, hkv = 2, n = 37, d = 16;
  std::vector<float> q, k, v;
  explicit Inputs(std::uint32_t seed) {
    std::mt19937 rng(seed);
    std::normal_distribution<float> g(0.0f, 2.0f);
    q.resize(hq * d), k.resize(hkv * n * d), v.resize(hkv * n * d);
    for (auto* x : {&q, &k, &v})
      for (auto& e : *x) e = g(rng);
  }
  kvc::HostView<const float, 2> qv() const { return kvc::make_view(q.data(), {hq, d}); }
  kvc::HostView<const float, 3> kv() const { return kvc::make_view(k.data(), {hkv, n, d}); }
  kvc::HostView<const float, 3> vv() const { return kvc::make_view(v.data(), {hkv, n, d}); }
};

}  // namespace

TEST_CASE("decode_attention_with_scores sums the group's probabilities", "[attention_scores]") {
  const Inputs in(5);
  std::vector<float> out(in.hq * in.d), p(in.hq * in.n), ref_out(out.size());
  ops::decode_attention(kvc::Cpu{}, in.qv(), in.kv(), in.vv(),
                        kvc::make_view(ref_out.data(), {in.hq, in.d}),
                        kvc::make_view(p.data(), {in.hq, in.n}));
  const std::int64_t g = in.hq / in.hkv;
  for (bool round : {true, false}) {
    std::vector<float> prior(in.hkv * in.n);
    for (std::size_t i = 0; i < prior.size(); ++i) prior[i] = 0.25f * static_cast<float>(i % 7);
    for (auto update : {ops::ScoreUpdate::accumulate, ops::ScoreUpdate::overwrite}) {
      std::vector<float> scores = prior;
      ops::decode_attention_with_scores(
          kvc::Cpu{}, in.qv(), in.kv(), in.vv(), kvc::make_view(out.data(), {in.hq, in.d}),
          kvc::make_view(scores.data(), {in.hkv, in.n}), {update, round});
      REQUIRE(out == ref_out);  // the same attention, bit for bit
      double total = 0;
      for (std::int64_t h = 0; h < in.hkv; ++h)
        for (std::int64_t j = 0; j < in.n; ++j) {
          double sum = update == ops::ScoreUpdate::accumulate ? prior[h * in.n + j] : 0.0;
          for (std::int64_t r = h * g; r < (h + 1) * g; ++r) {
            const float x = p[r * in.n + j];
            sum += round ? static_cast<float>(kvc::f16(x)) : x;
          }
          REQUIRE(scores[h * in.n + j] == static_cast<float>(sum));
          total += scores[h * in.n + j] -
                   (update == ops::ScoreUpdate::accumulate ? prior[h * in.n + j] : 0.0f);
        }
      // Each query head's probabilities sum to 1: the step adds Hq in total (f16 rounding moves
      // each of the Hq * n terms by at most 2^-11 relative).
      REQUIRE(std::fabs(total - in.hq) < 1e-3);
    }
  }
}

TEST_CASE("decode_attention_with_scores rejects a score buffer of the wrong shape",
          "[attention_scores]") {
  const Inputs in(6);
  std::vector<float> out(in.hq * in.d), scores(in.hq * in.n);
  REQUIRE_THROWS_WITH(
      ops::decode_attention_with_scores(kvc::Cpu{}, in.qv(), in.kv(), in.vv(),
                                        kvc::make_view(out.data(), {in.hq, in.d}),
                                        kvc::make_view(scores.data(), {in.hq, in.n})),
      Catch::Contains("scores has shape [8, 37]; expected [Hkv, n] = [2, 37]"));
}
