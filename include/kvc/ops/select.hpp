// kvc/ops/select.hpp: top-k selection (ALGORITHMS.md P3) and compaction of the survivors.
//
//   kvc::ops::top_k(kvc::Cpu{}, scores, k, indices);     // indices [rows, k], ascending per row
//   kvc::ops::compact_rows(kvc::Cpu{}, keep, keys, head_dim);  // in place; keys [n, D] -> [k, D]
//
// Determinism: higher score first, ties go to the lower position; survivors are returned in
// ascending position order. NaN scores are rejected.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "kvc/core/backend.hpp"
#include "kvc/core/error.hpp"
#include "kvc/core/view.hpp"

namespace kvc::ops {

void top_k(Cpu, HostView<const float, 2> scores,  // [rows, n]
           int k,                                 // 0 <= k <= n
           HostView<std::int32_t, 2> indices);    // [rows, k], ascending within a row

// Convenience for one row: the k best indices, ascending.
std::vector<std::int32_t> top_k(Cpu, std::span<const float> scores, int k);

// Gathers rows `keep` (ascending, unique, in range) of every array in place; each array holds
// `width` elements per token. Works for any element type (f16 keys, float scores, int32
// positions), so K, V, positions and per-token scores move together.
template <class T>
void compact_rows(Cpu, std::span<const std::int32_t> keep, std::vector<T>& rows, int width) {
  KVC_CHECK(width > 0, "compact: width must be > 0, got ", width);
  KVC_CHECK(rows.size() % static_cast<std::size_t>(width) == 0, "compact: ", rows.size(),
            " elements is not a whole number of rows of width ", width);
  const auto n = static_cast<std::int64_t>(rows.size()) / width;
  std::int64_t previous = -1;
  for (std::size_t i = 0; i < keep.size(); ++i) {
    const std::int64_t src = keep[i];
    KVC_CHECK(src > previous && src < n, "compact: keep[", i, "] = ", src,
              " must be ascending and in [0, ", n, ")");
    previous = src;
    for (int c = 0; c < width; ++c)
      rows[static_cast<std::size_t>(i) * width + c] =
          rows[static_cast<std::size_t>(src) * width + c];
  }
  rows.resize(keep.size() * static_cast<std::size_t>(width));
}

}  // namespace kvc::ops
