// kvc/policies/eviction/snapkv.hpp: SnapKV (ALGORITHMS.md section 4): at the end of prefill keep
// the budget - window prefix tokens with the highest pooled observation-window attention, plus the
// window itself.
//
//   struct Config : kvc::DefaultConfig { using Eviction = kvc::SnapKv; };
//   kvc::SnapKv snap{.budget = 1024, .window = 32, .kernel = 7, .pool = kvc::ops::Pool::max};
//
// Parameters and defaults (init_snapkv): budget C = 2048 tokens per head including the window,
// window W = 32, kernel = 5, pool = avg, gqa = mean. The KVCache-Factory LongBench scripts use
// W = 8, kernel = 7, max pooling.
// When it acts: once, at prefill compression; decode appends without eviction. State: none.
//   T < C: keep everything (T == C compresses to itself).
//   scores (P1, sum over the W window rows, probabilities rounded to f16 before the sum)
//   gqa = mean: the g query heads' scores of a KV head are averaged, then pooled (reduce before
//               pool), one selection per KV head; storage stays one head per KV head.
//   gqa = repeat: the released code's behaviour: each query head selects its own tokens and the
//               cache stores one head per query head (g times the memory, counted in bytes()).
//   pooled scores -> top C - W (ties: lower position) -> survivors in ascending position + window.
//   reference_compat = true: the released code's storage order: survivors in top-k order (score
//               descending, ties: lower position first), then the window (section 26). Attention
//               is the same; the stored order (kvc eval --dump) and any per-token-group quantizer
//               stacked on top see the difference.
#pragma once

#include <algorithm>
#include <cstdint>
#include <string_view>
#include <vector>

#include "kvc/ops/scores.hpp"
#include "kvc/ops/select.hpp"
#include "kvc/policies/concepts.hpp"

namespace kvc {

enum class GqaMode { mean, repeat };

// Observation-window scores of the T - W prefix tokens, reduced to one row per storage head and
// pooled (P1, P2, P4): [S, T - W] with S = Hkv (gqa = mean: the group's query heads averaged,
// reduce before pool) or S = Hq (gqa = repeat). Shared by SnapKV, PyramidKV and AdaKV.
inline std::vector<float> snapkv_pooled_scores(
    const PrefillInput& in, int window, int kernel, ops::Pool pool, GqaMode gqa, const char* who,
    ops::ScoreReduction reduction = ops::ScoreReduction::sum) {
  const int kv_heads = static_cast<int>(in.keys.size(0));
  const int q_heads = static_cast<int>(in.queries.size(0));
  const std::int64_t tokens = in.keys.size(1);
  const int storage_heads = gqa == GqaMode::repeat ? q_heads : kv_heads;
  KVC_CHECK(in.queries.size(1) >= window, who, ": needs the last window = ", window,
            " prompt queries, the prefill gave ", in.queries.size(1));
  KVC_CHECK(tokens > window, who, ": needs more than window = ", window, " prompt tokens, got ",
            tokens);
  const int group = q_heads / kv_heads;
  const std::int64_t prefix = tokens - window;
  std::vector<float> scores(static_cast<std::size_t>(q_heads) * prefix);  // [Hq, T - W]
  ops::WindowScoreOptions options;
  options.reduction = reduction;
  ops::window_scores(Cpu{}, in.queries.slice(1, in.queries.size(1) - window, in.queries.size(1)),
                     in.keys, make_view(scores.data(), {q_heads, prefix}), options);

  // Per storage head scores: the query head's own (repeat) or the group mean (mean).
  std::vector<float> reduced(static_cast<std::size_t>(storage_heads) * prefix);  // [S, T - W]
  for (int s = 0; s < storage_heads; ++s) {
    for (std::int64_t j = 0; j < prefix; ++j) {
      if (gqa == GqaMode::repeat) {
        reduced[s * prefix + j] = scores[s * prefix + j];
      } else {
        double sum = 0;
        for (int h = s * group; h < (s + 1) * group; ++h) sum += scores[h * prefix + j];
        reduced[s * prefix + j] = static_cast<float>(sum / group);
      }
    }
  }
  std::vector<float> pooled(reduced.size());  // [S, T - W]
  ops::pool1d(Cpu{}, make_view(static_cast<const float*>(reduced.data()), {storage_heads, prefix}),
              make_view(pooled.data(), {storage_heads, prefix}), kernel, pool);
  return pooled;
}

// SnapKV's selection with a given capacity: per storage head the `selected` prefix tokens with the
// highest pooled window scores (ties: lower position), in ascending position (or in score order,
// highest first, when `score_order`), then the W window tokens. Requires selected <= T - W.
// Shared by SnapKV (selected = C - W) and PyramidKV (cap_l).
inline Selection snapkv_select(const PrefillInput& in, int selected, int window, int kernel,
                               ops::Pool pool, GqaMode gqa, const char* who,
                               bool score_order = false) {
  const int kv_heads = static_cast<int>(in.keys.size(0));
  const std::int64_t tokens = in.keys.size(1);
  const std::int64_t prefix = tokens - window;
  KVC_CHECK(selected >= 0 && selected <= prefix, who, ": selects ", selected,
            " prefix tokens, allowed range [0, T - W = ", prefix, "]");
  const std::vector<float> pooled =
      snapkv_pooled_scores(in, window, kernel, pool, gqa, who);  // [S, T - W]
  const int storage_heads = static_cast<int>(pooled.size() / prefix);
  std::vector<std::int32_t> top(static_cast<std::size_t>(storage_heads) * selected);
  ops::top_k(Cpu{}, make_view(pooled.data(), {storage_heads, prefix}), selected,
             make_view(top.data(), {storage_heads, static_cast<std::int64_t>(selected)}));
  Selection s;
  for (int h = 0; h < storage_heads; ++h) {
    s.source_head.push_back(h * kv_heads / storage_heads);
    std::vector<std::int32_t> kept(top.begin() + static_cast<std::ptrdiff_t>(h) * selected,
                                   top.begin() + static_cast<std::ptrdiff_t>(h + 1) * selected);
    if (score_order) {
      const float* row = pooled.data() + static_cast<std::ptrdiff_t>(h) * prefix;
      std::stable_sort(kept.begin(), kept.end(),
                       [row](std::int32_t a, std::int32_t b) { return row[a] > row[b]; });
    }
    for (std::int64_t j = prefix; j < tokens; ++j) kept.push_back(static_cast<std::int32_t>(j));
    s.keep.push_back(std::move(kept));
  }
  s.keep_order_given = score_order;
  return s;
}

struct SnapKv {
  static constexpr std::string_view kName = "snapkv";
  static constexpr PolicyKind kKind = PolicyKind::eviction;

  int budget = 2048;
  int window = 32;
  int kernel = 5;
  ops::Pool pool = ops::Pool::avg;
  GqaMode gqa = GqaMode::mean;
  bool reference_compat = false;  // store survivors in score order, as released

  struct State {};

  void validate() const {
    KVC_CHECK(budget > 0, "snapkv: budget must be > 0, got ", budget);
    KVC_CHECK(window >= 1, "snapkv: window must be >= 1, got ", window);
    KVC_CHECK(window < budget, "snapkv: window = ", window, " must be < budget = ", budget);
    KVC_CHECK(kernel >= 1 && kernel % 2 == 1, "snapkv: kernel must be odd and >= 1, got ", kernel);
  }
  bool evicts_on_decode() const { return false; }
  bool observes_attention() const { return false; }

  Selection prefill(State&, const PrefillInput& in) const {
    const std::int64_t tokens = in.keys.size(1);
    if (tokens < budget) {
      const int kv_heads = static_cast<int>(in.keys.size(0));
      const int storage_heads =
          gqa == GqaMode::repeat ? static_cast<int>(in.queries.size(0)) : kv_heads;
      Selection all = keep_all(storage_heads, tokens);
      for (int s = 0; s < storage_heads; ++s) all.source_head[s] = s * kv_heads / storage_heads;
      return all;
    }
    return snapkv_select(in, budget - window, window, kernel, pool, gqa, "snapkv",
                         reference_compat);
  }

  DecodeKeep decode(State&, const DecodeInput&) const { return std::nullopt; }
};
static_assert(EvictionPolicy<SnapKv>);

}  // namespace kvc
