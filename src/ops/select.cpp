// src/ops/select.cpp: CPU reference of top-k selection (ALGORITHMS.md P3).
//
// Per row, positions are ordered by (score descending, position ascending); the first k are kept
// and returned in ascending position order. The order is total, so the result does not depend on
// the sort algorithm: ties go to the lower position on every backend.
#include "kvc/ops/select.hpp"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <vector>

#include "kvc/core/error.hpp"

namespace kvc::ops {
namespace {

// The k best positions of one row, ascending. `at(j)` reads score j.
template <class Score>
void select_row(std::int64_t row, std::int64_t n, int k, Score at, std::int32_t* best) {
  for (std::int64_t j = 0; j < n; ++j)
    KVC_CHECK(!std::isnan(at(j)), "top_k: score[", row, ", ", j,
              "] is NaN; scores must be numbers (finite or +-inf)");
  std::vector<std::int32_t> order(static_cast<std::size_t>(n));
  std::iota(order.begin(), order.end(), 0);
  std::sort(order.begin(), order.end(), [&](std::int32_t a, std::int32_t b) {
    const float sa = at(a), sb = at(b);
    return sa > sb || (sa == sb && a < b);
  });
  std::sort(order.begin(), order.begin() + k);
  std::copy(order.begin(), order.begin() + k, best);
}

void check_k(std::int64_t n, int k) {
  KVC_CHECK(n <= std::numeric_limits<std::int32_t>::max(), "top_k: row length n = ", n,
            " does not fit int32 positions; need n <= ", std::numeric_limits<std::int32_t>::max());
  KVC_CHECK(k >= 0 && k <= n, "top_k: k = ", k, " is out of range; need 0 <= k <= n = ", n);
}

}  // namespace

void top_k(Cpu, HostView<const float, 2> scores, int k, HostView<std::int32_t, 2> indices) {
  const std::int64_t rows = scores.size(0), n = scores.size(1);
  check_k(n, k);
  KVC_CHECK(indices.size(0) == rows && indices.size(1) == k, "top_k: indices has shape [",
            indices.size(0), ", ", indices.size(1), "]; expected [rows, k] = [", rows, ", ", k,
            "]");
  std::vector<std::int32_t> best(static_cast<std::size_t>(k));
  for (std::int64_t r = 0; r < rows; ++r) {
    select_row(
        r, n, k, [&](std::int64_t j) { return scores(r, j); }, best.data());
    for (int i = 0; i < k; ++i) indices(r, i) = best[i];
  }
}

std::vector<std::int32_t> top_k(Cpu, std::span<const float> scores, int k) {
  const auto n = static_cast<std::int64_t>(scores.size());
  check_k(n, k);
  std::vector<std::int32_t> best(static_cast<std::size_t>(k));
  select_row(
      0, n, k, [&](std::int64_t j) { return scores[j]; }, best.data());
  return best;
}

}  // namespace kvc::ops
