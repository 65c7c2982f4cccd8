// kvc/policies/merge/kvmerger.hpp: KVMerger ("Model Tells You Where to Merge", ALGORITHMS.md
// section 14; no reference code): runs of consecutive prompt keys whose cosine similarity stays
// above a threshold form merging sets; each set becomes one Gaussian-kernel weighted state stored
// at its pivot.
//
//   struct Config : kvc::DefaultConfig { using Merge = kvc::KvMerger; };
//   kvc::KVCache<Config, kvc::Cpu> cache{shape, kvc::KvMerger{.budget = 0.35}};   // alone
//   // or after an eviction policy: Config { using Eviction = kvc::SnapKv; using Merge = ... }
//
// When it acts: once, at prefill compression, per storage head; decode appends. State: none.
// Merging sets (both modes): the last `window` prompt tokens are never merged. Over the others,
//   tokens i and i+1 are linked when cos(k_i, k_{i+1}) >= eps; a set is a maximal run of linked
//   tokens (adjacency-only agglomerative clustering, section 14 step 1). eps: `threshold` when it
//   is > 0; otherwise (default) chosen per layer and head from the budget: the J = M - R most
//   similar adjacent pairs are linked (ties: lower index), M = T - window tokens, R =
//   max(1, round(budget * T) - window) sets, so alone the head keeps round(budget * T) rows when
//   that exceeds the window (window + 1 otherwise; all T when M <= R).
// Weights of a set S with pivot p (section 14 step 3): d_i = ||k_p - k_i||^2, sigma^2 = `sigma`^2
//   when sigma > 0, else the mean of d_i over the other members (the data-dependent bandwidth; all
//   weights 1 when that mean is 0); w_i = exp(-d_i / (2 sigma^2)), w_p = 1; k_p <- sum w_i k_i /
//   sum w_i; v_p <- the same weights (values = kernel, default) or the plain mean (values = mean).
// Alone (eviction `full`): each set of size >= 2 collapses onto its pivot: pivot = attention
//   (default) the member with the largest accumulated prompt attention (column sums of the causal
//   prompt attention, f16-rounded, summed over the storage head's query heads; ties: lower
//   position), or pivot = center the middle member (lower middle for even sizes). Kept: pivots,
//   singletons, window — ascending. The budgets of the paper are 50% and 35% (budget = 0.5, 0.35).
// After an eviction policy (snapkv(...)+kvmerger(...)): the eviction's kept tokens are the
//   pivots and the row count is the eviction's. Sets are identified exactly as above; each evicted
//   token of a set that holds at least one kept token is folded into the kept member of its set
//   nearest by position (ties: lower), with the kernel weights around that kept token. Evicted
//   tokens of sets without a kept token, and evicted tokens of the window, stay dropped (the
//   eviction's decision; the MergeRows ledger shows them).
// Open points of section 27 item 6 are parameters: pivot, sigma, threshold/budget, values.
// Deterministic (no randomness; ties broken by position).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <string_view>
#include <vector>

#include "kvc/policies/concepts.hpp"
#include "kvc/policies/merge/merge_common.hpp"

namespace kvc {

enum class KvMergerPivot { attention, center };
enum class KvMergerValues { kernel, mean };

// Merging sets over tokens [0, mergeable) of keys [T, D]: link[i] says whether i and i+1 share a
// set. threshold > 0: link when cos >= threshold; otherwise link the `joins` most similar pairs.
inline std::vector<std::vector<std::int32_t>> kvmerger_sets(HostView<const float, 2> keys,
                                                            std::int64_t mergeable,
                                                            double threshold, std::int64_t joins) {
  std::vector<std::vector<std::int32_t>> sets;
  if (mergeable <= 0) return sets;
  const std::int64_t pairs = mergeable - 1;
  std::vector<double> sim(static_cast<std::size_t>(std::max<std::int64_t>(pairs, 0)));
  for (std::int64_t i = 0; i < pairs; ++i) sim[i] = row_cosine(keys, i, i + 1);
  std::vector<char> link(sim.size(), 0);
  if (threshold > 0) {
    for (std::size_t i = 0; i < sim.size(); ++i) link[i] = sim[i] >= threshold;
  } else {
    std::vector<std::int32_t> order(sim.size());
    std::iota(order.begin(), order.end(), 0);
    joins = std::clamp<std::int64_t>(joins, 0, pairs);
    std::partial_sort(order.begin(), order.begin() + joins, order.end(),
                      [&](std::int32_t a, std::int32_t b) {
                        return sim[a] > sim[b] || (sim[a] == sim[b] && a < b);
                      });
    for (std::int64_t j = 0; j < joins; ++j) link[order[j]] = 1;
  }
  sets.push_back({0});
  for (std::int64_t i = 1; i < mergeable; ++i) {
    if (!link[i - 1]) sets.emplace_back();
    sets.back().push_back(static_cast<std::int32_t>(i));
  }
  return sets;
}

struct KvMerger {
  static constexpr std::string_view kName = "kvmerger";
  static constexpr PolicyKind kKind = PolicyKind::merge;

  double budget = 0.5;   // fraction of the prompt kept as rows (alone), window included
  double threshold = 0;  // eps in (0, 1]; 0: eps from the budget
  int window = 32;       // last prompt tokens never merged
  KvMergerPivot pivot = KvMergerPivot::attention;
  double sigma = 0;  // > 0: fixed kernel bandwidth; 0: from the set's distances
  KvMergerValues values = KvMergerValues::kernel;

  struct State {};

  void validate() const {
    KVC_CHECK(budget > 0 && budget <= 1, "kvmerger: budget must be in (0, 1], got ", budget);
    KVC_CHECK(threshold >= 0 && threshold <= 1, "kvmerger: threshold must be in (0, 1] (0: from ",
              "the budget), got ", threshold);
    KVC_CHECK(window >= 0, "kvmerger: window must be >= 0, got ", window);
    KVC_CHECK(sigma >= 0, "kvmerger: sigma must be >= 0 (0: from the set), got ", sigma);
  }
  bool active() const { return true; }
  bool needs_eviction() const { return false; }
  bool allows_eviction() const { return true; }
  bool acts_on_decode() const { return false; }
  bool observes_attention() const { return false; }

  // Folds `members` (which include p) into row p of keys and values; moves their mass onto p.
  void fold(HostView<float, 2> keys, HostView<float, 2> vals, std::vector<double>& mass,
            std::int32_t p, const std::vector<std::int32_t>& members) const {
    if (members.size() < 2) return;
    std::vector<double> d2(members.size());
    double mean = 0;
    for (std::size_t i = 0; i < members.size(); ++i) {
      d2[i] = row_distance2(keys, p, members[i]);
      mean += d2[i];
    }
    mean /= static_cast<double>(members.size() - 1);  // d2 of p itself is 0
    const double s2 = sigma > 0 ? sigma * sigma : mean;
    std::vector<double> w(members.size(), 1.0);
    if (s2 > 0)
      for (std::size_t i = 0; i < members.size(); ++i) w[i] = std::exp(-d2[i] / (2 * s2));
    fold_rows(vals, p, members,
              values == KvMergerValues::kernel ? w : std::vector<double>(members.size(), 1.0));
    fold_rows(keys, p, members, w);
    for (auto m : members) {
      if (m == p) continue;
      mass[p] += mass[m];
      mass[m] = 0;
    }
  }

  void prefill(State&, const PrefillInput& in, Selection& selection, MergeRows& rows) const {
    const std::int64_t tokens = rows.tokens;
    const std::int64_t protect = std::min<std::int64_t>(window, tokens);
    const std::int64_t mergeable = tokens - protect;
    const std::int64_t rows_kept =
        std::max<std::int64_t>(1, std::llround(budget * static_cast<double>(tokens))) - protect;
    const std::int64_t joins = mergeable - std::max<std::int64_t>(rows_kept, 1);
    const bool alone = !rows.after_eviction;
    std::vector<double> scores;
    if (alone && pivot == KvMergerPivot::attention) {
      KVC_CHECK(in.queries.size(1) >= 1 || tokens == 0,
                "kvmerger: pivot=attention needs the prompt queries (the prefill gave none); ",
                "use pivot=center");
      scores = merge_prompt_scores(in, selection.keep.size());
    }
    for (std::size_t s = 0; s < selection.keep.size(); ++s) {
      auto keys = rows.keys_of(static_cast<int>(s));
      auto vals = rows.values_of(static_cast<int>(s));
      const auto sets = kvmerger_sets(keys, mergeable, threshold,
                                      threshold > 0 ? 0 : std::max<std::int64_t>(joins, 0));
      if (alone) {
        std::vector<std::int32_t> kept;
        for (const auto& set : sets) {
          std::int32_t p = set[(set.size() - 1) / 2];
          if (pivot == KvMergerPivot::attention)
            for (auto i : set)
              if (scores[s * tokens + i] > scores[s * tokens + p]) p = i;
          fold(keys, vals, rows.mass[s], p, set);
          kept.push_back(p);
        }
        for (std::int64_t j = mergeable; j < tokens; ++j)
          kept.push_back(static_cast<std::int32_t>(j));
        selection.keep[s] = std::move(kept);
        continue;
      }
      std::vector<char> is_kept(static_cast<std::size_t>(tokens), 0);
      for (auto i : selection.keep[s]) is_kept[i] = 1;
      for (const auto& set : sets) {
        std::vector<std::int32_t> survivors;
        for (auto i : set)
          if (is_kept[i]) survivors.push_back(i);
        if (survivors.empty() || survivors.size() == set.size()) continue;
        std::vector<std::vector<std::int32_t>> members(survivors.size());
        for (std::size_t k = 0; k < survivors.size(); ++k) members[k].push_back(survivors[k]);
        std::size_t next = 0;  // survivors[next] is the first survivor at or after i
        for (auto i : set) {
          while (next < survivors.size() && survivors[next] < i) ++next;
          if (is_kept[i]) continue;
          std::size_t k = next;
          if (next == survivors.size() ||
              (next > 0 && i - survivors[next - 1] <= survivors[next] - i))
            k = next - 1;
          members[k].push_back(i);
        }
        for (std::size_t k = 0; k < survivors.size(); ++k) {
          std::sort(members[k].begin(), members[k].end());
          fold(keys, vals, rows.mass[s], survivors[k], members[k]);
        }
      }
    }
  }

  DecodeKeep decode(State&, const MergeDecodeInput&, MergeDecodeRows*) const {
    return std::nullopt;
  }
};
static_assert(MergePolicy<KvMerger>);

}  // namespace kvc
