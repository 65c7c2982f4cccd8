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
#pragma once

#include <cstdint>
#include <string_view>
#include <vector>

#include "kvc/ops/scores.hpp"
#include "kvc/ops/select.hpp"
#include "kvc/policies/concepts.hpp"

namespace kvc {

enum class GqaMode { mean, repeat };

struct SnapKv {
  static constexpr std::string_view kName = "snapkv";
  static constexpr PolicyKind kKind = PolicyKind::eviction;

  int budget = 2048;
  int window = 32;
  int kernel = 5;
  ops::Pool pool = ops::Pool::avg;
  GqaMode gqa = GqaMode::mean;

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
    const int kv_heads = static_cast<int>(in.keys.size(0));
    const int q_heads = static_cast<int>(in.queries.size(0));
    const std::int64_t tokens = in.keys.size(1);
    const int storage_heads = gqa == GqaMode::repeat ? q_heads : kv_heads;
    const int group = q_heads / kv_heads;
    if (tokens < budget) {
      Selection all = keep_all(storage_heads, tokens);
      for (int s = 0; s < storage_heads; ++s) all.source_head[s] = s * kv_heads / storage_heads;
      return all;
    }
    KVC_CHECK(in.queries.size(1) >= window, "snapkv: needs the last window = ", window,
              " prompt queries, the prefill gave ", in.queries.size(1));
    const std::int64_t prefix = tokens - window;
    std::vector<float> scores(static_cast<std::size_t>(q_heads) * prefix);  // [Hq, T - W]
    ops::window_scores(Cpu{}, in.queries.slice(1, in.queries.size(1) - window, in.queries.size(1)),
                       in.keys, make_view(scores.data(), {q_heads, prefix}));

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
    ops::pool1d(Cpu{},
                make_view(static_cast<const float*>(reduced.data()), {storage_heads, prefix}),
                make_view(pooled.data(), {storage_heads, prefix}), kernel, pool);
    std::vector<std::int32_t> top(static_cast<std::size_t>(storage_heads) * (budget - window));
    ops::top_k(Cpu{}, make_view(static_cast<const float*>(pooled.data()), {storage_heads, prefix}),
               budget - window, make_view(top.data(), {storage_heads, budget - window}));

    Selection s;
    for (int h = 0; h < storage_heads; ++h) {
      s.source_head.push_back(h * kv_heads / storage_heads);
      std::vector<std::int32_t> kept(
          top.begin() + static_cast<std::ptrdiff_t>(h) * (budget - window),
          top.begin() + static_cast<std::ptrdiff_t>(h + 1) * (budget - window));
      for (std::int64_t j = prefix; j < tokens; ++j) kept.push_back(static_cast<std::int32_t>(j));
      s.keep.push_back(std::move(kept));
    }
    return s;
  }

  DecodeKeep decode(State&, const DecodeInput&) const { return std::nullopt; }
};
static_assert(EvictionPolicy<SnapKv>);

}  // namespace kvc
