// kvc/policies/merge/elastic_cache.hpp: Elastic Cache (ALGORITHMS.md section 15): importance
// anchors at prefill, every thrown prompt token averaged into its nearest anchor by position, then
// one deletion per decode step at a fixed in-cache index ("fixed-point elimination").
//
//   struct Config : kvc::DefaultConfig { using Merge = kvc::ElasticCache; };
//   kvc::KVCache<Config, kvc::Cpu> cache{shape, kvc::ElasticCache{.ratio = 0.5}};
//   kvc::ElasticPlan plan = kvc::elastic_plan(importance, /*ratio=*/0.5, /*start=*/4, false);
//
// A complete method on its own: it selects its anchors itself, so it is used with eviction `full`
// (combining it with an eviction policy is rejected, naming both stages).
// Parameters and defaults: ratio = 0.5 (fraction of the prompt FORGOTTEN; the reference sweeps
// 0.1-0.9), start_size = 4 (sinks; the last prompt token is protected too), distance = -25,
// reference_compat = false.
// When it acts (per layer; the same decision for every head):
//   prefill: imp[j] = sum over the given prompt queries i >= j of the head-mean causal attention
//     A[h, i, j] (fp32 softmax rounded to f16; kvc::prefixkv_importance). forget = round(ratio*T)
//     (half to even). forget >= 1: candidates [start_size, T - 1); the `forget` lowest-importance
//     candidates are thrown (kept: the top by importance, ties to the lower position), the others
//     are anchors. Each thrown token t goes to the anchor a minimising |a - t| (ties: the lower a);
//     with no anchor left, to the nearest protected token (sinks, last). Each receiving row
//     becomes the unweighted mean of itself and its thrown tokens, K and V separately, per head
//     (section 25 item 16). Kept: sinks ++ anchors ++ [T - 1].
//     evict_pos = T - forget + distance (distance > 0: distance itself); below 1: kept / 2.
//   decode (after each step): seen = tokens the layer has seen; forget = trunc(n - seen * (1 -
//     ratio)); forget >= 1 deletes the entry at in-cache index evict_pos from every head (index
//     past the cache: the one before the newest). The deleted token is dropped, not merged: that
//     is the method's fixed-point elimination (the paper's and the reference's).
// reference_compat = true reproduces the released kv_cache.py::ElasticCache: forget =
//   trunc(T - T*(1 - ratio)); the prefill acts only when forget > 1; the selection is
//   torch.where(argsort(imp[cand]) > forget): candidate offsets r whose ascending-sort entry
//   exceeds forget are anchors, the others (forget + 1 of them) are thrown; and a thrown offset r
//   is matched to anchors as coordinate r (no start_size offset) while anchors sit at start + r
//   (the thrown data is token start + r).
// State per layer: evict_pos and tokens seen. Deterministic. Positions: absolute.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <span>
#include <string_view>
#include <vector>

#include "kvc/ops/select.hpp"
#include "kvc/policies/concepts.hpp"
#include "kvc/policies/eviction/prefixkv.hpp"
#include "kvc/policies/merge/merge_common.hpp"

namespace kvc {

// The prefill decision of one layer from the importance of its T tokens.
struct ElasticPlan {
  std::vector<std::int32_t> kept;    // ascending: sinks, anchors, last
  std::vector<std::int32_t> thrown;  // ascending token indices
  std::vector<std::int32_t> target;  // [thrown] the kept token each thrown token is merged into
  std::int64_t forget = 0;
};

inline ElasticPlan elastic_plan(std::span<const float> importance, double ratio, int start_size,
                                bool reference_compat) {
  const auto tokens = static_cast<std::int64_t>(importance.size());
  ElasticPlan plan;
  plan.forget =
      reference_compat
          ? static_cast<std::int64_t>(static_cast<double>(tokens) -
                                      static_cast<double>(tokens) * (1.0 - ratio))
          : static_cast<std::int64_t>(std::nearbyint(ratio * static_cast<double>(tokens)));
  const std::int64_t start = std::min<std::int64_t>(start_size, tokens);
  const std::int64_t candidates = std::max<std::int64_t>(0, tokens - 1 - start);
  const bool acts = candidates > 0 && (reference_compat ? plan.forget > 1 : plan.forget >= 1);
  std::vector<std::int32_t> anchors;                          // absolute token index
  std::vector<std::pair<std::int32_t, std::int32_t>> thrown;  // (token, matching coordinate)
  if (!acts) {
    for (std::int64_t i = 0; i < tokens; ++i) plan.kept.push_back(static_cast<std::int32_t>(i));
    return plan;
  }
  const auto cand = importance.subspan(start, candidates);
  if (!reference_compat) {
    const std::int64_t survivors = std::max<std::int64_t>(0, candidates - plan.forget);
    std::vector<char> keep(candidates, 0);
    for (auto r : ops::top_k(Cpu{}, cand, static_cast<int>(survivors))) keep[r] = 1;
    for (std::int64_t r = 0; r < candidates; ++r) {
      const auto t = static_cast<std::int32_t>(start + r);
      if (keep[r])
        anchors.push_back(t);
      else
        thrown.emplace_back(t, t);
    }
  } else {
    std::vector<std::int32_t> order(candidates);  // argsort ascending (stable: ties by index)
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(),
                     [&](std::int32_t a, std::int32_t b) { return cand[a] < cand[b]; });
    for (std::int64_t r = 0; r < candidates; ++r) {
      const auto t = static_cast<std::int32_t>(start + r);
      if (order[r] > plan.forget)
        anchors.push_back(t);
      else
        thrown.emplace_back(t, static_cast<std::int32_t>(r));  // the missing start offset
    }
  }
  for (std::int64_t i = 0; i < start; ++i) plan.kept.push_back(static_cast<std::int32_t>(i));
  plan.kept.insert(plan.kept.end(), anchors.begin(), anchors.end());
  plan.kept.push_back(static_cast<std::int32_t>(tokens - 1));
  // Receivers: the anchors; with none left, the protected tokens.
  const std::vector<std::int32_t>& receivers = anchors.empty() ? plan.kept : anchors;
  for (const auto& [t, coordinate] : thrown) {
    // The first receiver at or after the coordinate and the one before it; ties to the lower.
    const auto it = std::lower_bound(receivers.begin(), receivers.end(), coordinate);
    std::int32_t best = it == receivers.end() ? receivers.back() : *it;
    if (it != receivers.begin() &&
        (it == receivers.end() || coordinate - *(it - 1) <= *it - coordinate))
      best = *(it - 1);
    plan.thrown.push_back(t);
    plan.target.push_back(best);
  }
  return plan;
}

struct ElasticCache {
  static constexpr std::string_view kName = "elastic";
  static constexpr PolicyKind kKind = PolicyKind::merge;

  double ratio = 0.5;  // fraction forgotten
  int start_size = 4;
  int distance = -25;
  bool reference_compat = false;

  using State = FixedPointState;  // shared with PrefixKV

  void validate() const {
    KVC_CHECK(ratio >= 0 && ratio <= 1, "elastic: ratio must be in [0, 1], got ", ratio);
    KVC_CHECK(start_size >= 0, "elastic: start_size must be >= 0, got ", start_size);
  }
  bool active() const { return true; }
  bool needs_eviction() const { return false; }
  bool allows_eviction() const { return false; }
  bool acts_on_decode() const { return true; }
  bool observes_attention() const { return false; }

  void prefill(State& state, const PrefillInput& in, Selection& selection, MergeRows& rows) const {
    state.grow(in.num_layers);
    const std::int64_t tokens = rows.tokens;
    state.seen[in.layer] = tokens;
    state.evict_pos[in.layer] = 1;
    if (tokens == 0) return;
    KVC_CHECK(in.queries.size(1) >= 1,
              "elastic: needs the prompt queries to score the prompt (the prefill gave none)");
    const std::vector<float> importance = prefixkv_importance(in.queries, in.keys);
    const ElasticPlan plan = elastic_plan(importance, ratio, start_size, reference_compat);
    for (std::size_t s = 0; s < selection.keep.size(); ++s) {
      auto keys = rows.keys_of(static_cast<int>(s));
      auto vals = rows.values_of(static_cast<int>(s));
      for (auto a : plan.kept) {
        std::vector<std::int32_t> members{a};
        for (std::size_t i = 0; i < plan.thrown.size(); ++i)
          if (plan.target[i] == a) members.push_back(plan.thrown[i]);
        if (members.size() < 2) continue;
        const std::vector<double> ones(members.size(), 1.0);
        fold_rows(keys, a, members, ones);
        fold_rows(vals, a, members, ones);
        for (std::size_t i = 1; i < members.size(); ++i) {
          rows.mass[s][a] += rows.mass[s][members[i]];
          rows.mass[s][members[i]] = 0;
        }
      }
      selection.keep[s] = plan.kept;
    }
    state.evict_pos[in.layer] =
        fixed_point_evict_pos(tokens, plan.forget, distance, plan.kept.size());
  }

  DecodeKeep decode(State& state, const MergeDecodeInput& in, MergeDecodeRows*) const {
    return fixed_point_decode(state, in.layer, in.num_layers, in.head_sizes, ratio, kName);
  }
};
static_assert(MergePolicy<ElasticCache>);

}  // namespace kvc
