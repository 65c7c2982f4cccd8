// kvc/policies/eviction/adakv.hpp: AdaKV-style head-adaptive budgets (Feng et al. 2024, "Ada-KV"):
// one layer budget shared by the KV heads of a layer, split by the best window scores of all heads
// pooled together, so a head that concentrates its attention keeps fewer tokens than a head that
// spreads it.
//
//   struct Config : kvc::DefaultConfig { using Eviction = kvc::AdaKv; };
//   kvc::AdaKv ada{.budget = 256, .window = 32};   // the layer keeps 256 * Hkv tokens in all
//   cache.bytes(layer);                            // counts what each head really keeps
//
// Parameters and defaults: budget B = 2048 tokens per KV head on average, window included (layer
// budget B * Hkv); window W = 32; kernel = 5; pool = avg (as SnapKV).
// When it acts: once, at prefill compression; decode appends without eviction. T < B keeps
// everything. Otherwise:
//   scores (P1 with the MEAN over the W window rows, so that heads compare on one scale; f16
//     rounding of probabilities as SnapKV), the group's query heads averaged, then pooled (P2):
//     s[k, j] for KV head k and prefix token j < T - W
//   the Hkv * (B - W) highest s[k, j] over all (k, j) together are kept (ties: lower head, then
//     lower position); every head also keeps its W window tokens.
// Storage stays ragged: head k stores its own count (between W and T tokens) and bytes() counts
// exactly that. Not reproduced: AdaKV's optional per-head floor (a guaranteed minimum share per
// head); gqa = repeat. State: none. Deterministic.
#pragma once

#include <cstdint>
#include <string_view>
#include <vector>

#include "kvc/ops/select.hpp"
#include "kvc/policies/concepts.hpp"
#include "kvc/policies/eviction/snapkv.hpp"

namespace kvc {

struct AdaKv {
  static constexpr std::string_view kName = "adakv";
  static constexpr PolicyKind kKind = PolicyKind::eviction;

  int budget = 2048;
  int window = 32;
  int kernel = 5;
  ops::Pool pool = ops::Pool::avg;

  struct State {};

  void validate() const {
    KVC_CHECK(budget > 0, "adakv: budget must be > 0, got ", budget);
    KVC_CHECK(window >= 1 && window < budget, "adakv: window = ", window,
              " must be in [1, budget = ", budget, ")");
    KVC_CHECK(kernel >= 1 && kernel % 2 == 1, "adakv: kernel must be odd and >= 1, got ", kernel);
  }
  bool evicts_on_decode() const { return false; }
  bool observes_attention() const { return false; }

  Selection prefill(State&, const PrefillInput& in) const {
    const int kv_heads = static_cast<int>(in.keys.size(0));
    const std::int64_t tokens = in.keys.size(1);
    if (tokens < budget) return keep_all(kv_heads, tokens);
    const std::int64_t prefix = tokens - window;
    const std::vector<float> pooled = snapkv_pooled_scores(
        in, window, kernel, pool, GqaMode::mean, "adakv", ops::ScoreReduction::mean);  // [Hkv, T-W]
    // Pool all heads' prefix scores into one row; flattened index k * (T - W) + j.
    const std::vector<std::int32_t> chosen = ops::top_k(
        Cpu{}, std::span<const float>(pooled), static_cast<int>(kv_heads * (budget - window)));
    Selection s;
    s.source_head.resize(kv_heads);
    s.keep.resize(kv_heads);
    for (int k = 0; k < kv_heads; ++k) s.source_head[k] = k;
    for (const std::int32_t flat : chosen)  // ascending, so per head ascending too
      s.keep[flat / prefix].push_back(static_cast<std::int32_t>(flat % prefix));
    for (int k = 0; k < kv_heads; ++k)
      for (std::int64_t j = prefix; j < tokens; ++j)
        s.keep[k].push_back(static_cast<std::int32_t>(j));
    return s;
  }

  DecodeKeep decode(State&, const DecodeInput&) const { return std::nullopt; }
};
static_assert(EvictionPolicy<AdaKv>);

}  // namespace kvc
