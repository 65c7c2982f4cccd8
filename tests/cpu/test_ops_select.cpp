// Tests of top-k selection (ALGORITHMS.md P3) and compact_rows.
#include <catch2/catch.hpp>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "kvc/ops/select.hpp"

namespace {

using kvc::make_view;
using Indices = std::vector<std::int32_t>;

Indices top(const std::vector<float>& scores, int k) {
  return kvc::ops::top_k(kvc::Cpu{}, scores, k);
}

}  // namespace

TEST_CASE("top_k: the k largest, returned in ascending position order", "[ops][select]") {
  // By score: 3 (0.9), 1 (0.8), 2 (0.5), 0 (0.1). Returned ascending, not in score order.
  const std::vector<float> s = {0.1f, 0.8f, 0.5f, 0.9f};
  CHECK(top(s, 1) == Indices{3});
  CHECK(top(s, 2) == Indices{1, 3});
  CHECK(top(s, 3) == Indices{1, 2, 3});
  CHECK(top(s, 0).empty());
  CHECK(top(s, 4) == Indices{0, 1, 2, 3});  // k == n returns all
  // Negative scores and infinities are ordinary values.
  const float inf = std::numeric_limits<float>::infinity();
  CHECK(top({-5.0f, -inf, -1.0f, inf}, 2) == Indices{2, 3});
  CHECK(top({-inf, -inf, -inf}, 1) == Indices{0});
}

TEST_CASE("top_k: ties go to the lower position", "[ops][select]") {
  const std::vector<float> s = {1, 3, 3, 2, 3};
  CHECK(top(s, 1) == Indices{1});
  CHECK(top(s, 2) == Indices{1, 2});
  CHECK(top(s, 3) == Indices{1, 2, 4});
  CHECK(top(s, 4) == Indices{1, 2, 3, 4});
  // All equal: the first k positions.
  CHECK(top(std::vector<float>(10, 0.5f), 3) == Indices{0, 1, 2});
  // -0 and +0 compare equal: a tie, the lower position wins.
  CHECK(top({0.0f, -0.0f, 0.0f}, 1) == Indices{0});
  CHECK(top({-0.0f, 0.0f}, 1) == Indices{0});
}

TEST_CASE("top_k over rows of a view", "[ops][select]") {
  const std::vector<float> s = {5, 1, 4, 2, 3,   // row 0: best 0, 2 (5, 4)
                                1, 2, 3, 4, 5,   // row 1: best 3, 4
                                7, 7, 7, 7, 7};  // row 2: ties -> 0, 1
  std::vector<std::int32_t> idx(6, -1);
  kvc::ops::top_k(kvc::Cpu{}, make_view(s.data(), {3, 5}), 2, make_view(idx.data(), {3, 2}));
  CHECK(idx == Indices{0, 2, 3, 4, 0, 1});
  // A strided view: every other column of row 0 -> scores [5, 4, 3] at view positions 0, 1, 2.
  kvc::HostView<const float, 2> strided{s.data(), {1, 3}, {5, 2}};
  std::vector<std::int32_t> one(2);
  kvc::ops::top_k(kvc::Cpu{}, strided, 2, make_view(one.data(), {1, 2}));
  CHECK(one == Indices{0, 1});
}

TEST_CASE("top_k rejects NaN and out-of-range k", "[ops][select]") {
  using Catch::Contains;
  std::vector<float> s = {1, 2, 3, 4, 5, 6};
  s[4] = std::numeric_limits<float>::quiet_NaN();  // row 1, position 1 of a [2, 3] view
  std::vector<std::int32_t> idx(2);
  REQUIRE_THROWS_WITH(
      kvc::ops::top_k(kvc::Cpu{}, make_view(s.data(), {2, 3}), 1, make_view(idx.data(), {2, 1})),
      Contains("score[1, 1]") && Contains("NaN"));
  REQUIRE_THROWS_WITH(top({1, NAN}, 1), Contains("score[0, 1]"));
  REQUIRE_THROWS_WITH(top({1, 2}, 3), Contains("k = 3") && Contains("0 <= k <= n = 2"));
  REQUIRE_THROWS_WITH(top({1, 2}, -1), Contains("k = -1"));
  std::vector<float> ok = {1, 2, 3, 4};
  REQUIRE_THROWS_WITH(
      kvc::ops::top_k(kvc::Cpu{}, make_view(ok.data(), {2, 2}), 1, make_view(idx.data(), {1, 2})),
      Contains("indices has shape [1, 2]") && Contains("[2, 1]"));
}

TEST_CASE("compact_rows keeps the listed rows in order and rejects a bad keep list",
          "[ops][select]") {
  // 4 tokens, width 2: token t holds [10 t, 10 t + 1].
  const std::vector<float> rows = {0, 1, 10, 11, 20, 21, 30, 31};
  auto kept = rows;
  const std::vector<std::int32_t> keep = {1, 3};
  kvc::ops::compact_rows(kvc::Cpu{}, keep, kept, 2);
  CHECK(kept == std::vector<float>{10, 11, 30, 31});

  std::vector<std::int32_t> positions = {100, 101, 102, 103, 104};
  kvc::ops::compact_rows(kvc::Cpu{}, std::vector<std::int32_t>{0, 2, 4}, positions, 1);
  CHECK(positions == std::vector<std::int32_t>{100, 102, 104});

  auto all = rows;
  kvc::ops::compact_rows(kvc::Cpu{}, std::vector<std::int32_t>{0, 1, 2, 3}, all, 2);
  CHECK(all == rows);
  auto none = rows;
  kvc::ops::compact_rows(kvc::Cpu{}, std::vector<std::int32_t>{}, none, 2);
  CHECK(none.empty());

  using Catch::Contains;
  for (const auto& bad : {std::vector<std::int32_t>{2, 1}, std::vector<std::int32_t>{1, 1},
                          std::vector<std::int32_t>{0, 4}, std::vector<std::int32_t>{-1}}) {
    auto copy = rows;
    REQUIRE_THROWS_WITH(kvc::ops::compact_rows(kvc::Cpu{}, bad, copy, 2),
                        Contains("ascending") && Contains("[0, 4)"));
  }
  auto copy = rows;
  REQUIRE_THROWS_WITH(kvc::ops::compact_rows(kvc::Cpu{}, keep, copy, 0), Contains("width"));
  std::vector<float> ragged = {1, 2, 3, 4, 5};  // 5 elements are not rows of width 2
  REQUIRE_THROWS_WITH(kvc::ops::compact_rows(kvc::Cpu{}, keep, ragged, 2),
                      Contains("5 elements") && Contains("width 2"));
}
