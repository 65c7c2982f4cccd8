// kvc/policies/merge/merge_common.hpp: helpers shared by the merge policies (KVMerger, CaM,
// Elastic Cache): the prompt's accumulated attention per storage head, a counter-based uniform
// draw, and small row arithmetic over MergeRows.
//
//   std::vector<double> acc = kvc::merge_prompt_scores(in, sel.source_head.size());  // [S * T]
//   double u = kvc::merge_uniform(seed, layer, head, position);    // in [0, 1), order-independent
//   kvc::fold_rows(rows.values_of(s), /*into=*/p, members, weights);
#pragma once

#include <cmath>
#include <cstdint>
#include <span>
#include <vector>

#include "kvc/policies/concepts.hpp"
#include "kvc/policies/eviction/prompt_attention.hpp"

namespace kvc {

// Accumulated attention of the prompt per storage head: the column sums of the causal attention
// of every given prompt query (fp32 softmax rounded to f16, as H2O accumulates it), summed over
// the query heads that read the storage head (storage head s serves query heads
// [s*g', (s+1)*g'), g' = Hq / S). [S * T], row-major. Zeros when the prefill gave no queries.
inline std::vector<double> merge_prompt_scores(const PrefillInput& in, std::size_t storage_heads) {
  const std::int64_t tokens = in.keys.size(1);
  std::vector<double> acc(storage_heads * static_cast<std::size_t>(tokens), 0.0);
  if (in.queries.size(1) == 0 || storage_heads == 0) return acc;
  const PromptColumns columns = prompt_attention_columns(in, 0, /*round_f16=*/true);
  const auto q_heads = static_cast<std::size_t>(in.queries.size(0));
  const std::size_t per_store = q_heads / storage_heads;
  for (std::size_t s = 0; s < storage_heads; ++s)
    for (std::size_t h = s * per_store; h < (s + 1) * per_store; ++h)
      for (std::int64_t j = 0; j < tokens; ++j) acc[s * tokens + j] += columns.sums[h * tokens + j];
  return acc;
}

// A uniform number in [0, 1) that depends only on (seed, layer, head, position): splitmix64 of
// the packed key. Each token is evicted at most once per (layer, head), so a Bernoulli draw keyed
// by its position is reproducible whatever order layers and steps are processed in.
inline double merge_uniform(std::uint64_t seed, int layer, int head, std::int32_t position) {
  std::uint64_t z = seed * 0x9E3779B97F4A7C15ull;
  for (std::uint64_t part : {static_cast<std::uint64_t>(layer), static_cast<std::uint64_t>(head),
                             static_cast<std::uint64_t>(static_cast<std::uint32_t>(position))}) {
    z += 0x9E3779B97F4A7C15ull + part;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
  }
  return static_cast<double>(z >> 11) * 0x1.0p-53;
}

// Cosine similarity of rows a and b of x [n, D]; 0 when either row is zero.
inline double row_cosine(HostView<const float, 2> x, std::int64_t a, std::int64_t b) {
  double dot = 0, na = 0, nb = 0;
  for (std::int64_t c = 0; c < x.size(1); ++c) {
    dot += static_cast<double>(x(a, c)) * x(b, c);
    na += static_cast<double>(x(a, c)) * x(a, c);
    nb += static_cast<double>(x(b, c)) * x(b, c);
  }
  return na > 0 && nb > 0 ? dot / std::sqrt(na * nb) : 0.0;
}

inline double row_distance2(HostView<const float, 2> x, std::int64_t a, std::int64_t b) {
  double d2 = 0;
  for (std::int64_t c = 0; c < x.size(1); ++c) {
    const double diff = static_cast<double>(x(a, c)) - x(b, c);
    d2 += diff * diff;
  }
  return d2;
}

// x[into] <- sum_i weights[i] * x[members[i]] / sum_i weights[i] (members include `into`).
inline void fold_rows(HostView<float, 2> x, std::int64_t into,
                      std::span<const std::int32_t> members, std::span<const double> weights) {
  double total = 0;
  for (double w : weights) total += w;
  for (std::int64_t c = 0; c < x.size(1); ++c) {
    double sum = 0;
    for (std::size_t i = 0; i < members.size(); ++i) sum += weights[i] * x(members[i], c);
    x(into, c) = static_cast<float>(sum / total);
  }
}

}  // namespace kvc
