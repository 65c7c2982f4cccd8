// kvc/policies/eviction/prompt_attention.hpp: helpers of the score-driven eviction policies: the
// attention of prompt queries over the prompt keys summed per key column (what H2O accumulates at
// prefill and what TOVA reads from the last query), and a deterministic top-k over double scores.
//
//   kvc::PromptColumns c = kvc::prompt_attention_columns(in, /*first_row=*/0, /*round_f16=*/true);
//   double s = c.sums[h * c.tokens + j];   // query head h's attention on key j, summed over rows
//   int n = c.seen[j];                      // how many of those query rows could see key j
//   std::vector<std::int32_t> keep = kvc::top_scores_ascending(scores, 16);
//
// Query row i of PrefillInput.queries [Hq, Tq, D] is prompt token T - Tq + i and sees the keys
// j <= T - Tq + i (causal). Probabilities come from ops::decode_attention (fp32 softmax, query
// head h reads KV head h / (Hq / Hkv)); round_f16 rounds each probability to f16 before the sum,
// as the released code's fp16 models do.
#pragma once

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <span>
#include <vector>

#include "kvc/core/dtype.hpp"
#include "kvc/ops/attention.hpp"
#include "kvc/policies/concepts.hpp"

namespace kvc {

// Indices of the `keep` highest scores (ties: lower index), returned ascending.
inline std::vector<std::int32_t> top_scores_ascending(std::span<const double> scores, int keep) {
  std::vector<std::int32_t> order(scores.size());
  std::iota(order.begin(), order.end(), 0);
  keep = std::clamp(keep, 0, static_cast<int>(order.size()));
  std::partial_sort(order.begin(), order.begin() + keep, order.end(),
                    [&](std::int32_t a, std::int32_t b) {
                      return scores[a] > scores[b] || (scores[a] == scores[b] && a < b);
                    });
  order.resize(keep);
  std::sort(order.begin(), order.end());
  return order;
}

struct PromptColumns {
  std::int64_t tokens = 0;
  std::vector<double> sums;  // [Hq, T] attention summed over the used query rows
  std::vector<int> seen;     // [T] number of used query rows that see each key
};

inline PromptColumns prompt_attention_columns(const PrefillInput& in, std::int64_t first_row,
                                              bool round_f16) {
  const std::int64_t q_heads = in.queries.size(0), rows = in.queries.size(1);
  const std::int64_t tokens = in.keys.size(1), d = in.keys.size(2);
  KVC_CHECK(rows <= tokens, "prompt attention: ", rows, " queries for ", tokens, " keys");
  PromptColumns c;
  c.tokens = tokens;
  c.sums.assign(static_cast<std::size_t>(q_heads * tokens), 0.0);
  c.seen.assign(static_cast<std::size_t>(tokens), 0);
  std::vector<float> out(static_cast<std::size_t>(q_heads * d));
  std::vector<float> probabilities(static_cast<std::size_t>(q_heads * tokens));
  for (std::int64_t i = first_row; i < rows; ++i) {
    const std::int64_t visible = tokens - rows + i + 1;
    HostView<const float, 2> q_row;  // [Hq, D]
    q_row.data = in.queries.data + i * in.queries.strides[1];
    q_row.shape = {q_heads, d};
    q_row.strides = {in.queries.strides[0], in.queries.strides[2]};
    ops::decode_attention(Cpu{}, q_row, in.keys.slice(1, 0, visible),
                          in.values.slice(1, 0, visible), make_view(out.data(), {q_heads, d}),
                          make_view(probabilities.data(), {q_heads, visible}));
    for (std::int64_t h = 0; h < q_heads; ++h) {
      for (std::int64_t j = 0; j < visible; ++j) {
        const float p = probabilities[h * visible + j];
        c.sums[h * tokens + j] += round_f16 ? static_cast<float>(f16(p)) : p;
      }
    }
    for (std::int64_t j = 0; j < visible; ++j) ++c.seen[j];
  }
  return c;
}

}  // namespace kvc
