// kvc/policies/eviction/locret.hpp: Locret-style eviction by external per-token scores
// (ALGORITHMS.md section 9): chunked prefill with a budget, stabilizers and a local window.
//
//   kvc::Locret locret{.budget = 6000, .local_len = 100, .chunk_size = 3072, .stabilizers = 2500};
//   cache.prefill(layer, k, v, q, scores);   // scores [Hkv, T]: one score per token and KV head
//   cache.compress(layer);                   // the whole chunked prefill, simulated at once
//
// Scores come from the caller (Locret's trained retaining head; `kvc eval` reads the dump's
// scores.npy [L, Hkv, T]; `kvc calibrate locret-proxy` writes an attention-derived stand-in).
// A prefill without scores is an error.
// Parameters and defaults (infer.py): budget M = 6000 tokens per KV head, local_len Lc = 100,
// chunk_size S = 3072, stabilizers Z = 2500 (Z <= M).
// When it acts: once, at prefill compression, which replays the reference's chunked prefill:
//   for b in 0, S, 2S, ... < T - Lc: the chunk [b, min(b + S, T - Lc)) joins the cache; in every
//   chunk but the last, the newest Z cache entries get the largest float; each KV head keeps its
//   top min(M, n) entries (score descending, ties to the lower position), in ascending position,
//   with their scores; then the last T - e >= Lc tokens join without eviction.
// Decode never evicts. State: none (scores are fixed per token, so "gathering the scores with the
// tokens" is implicit). Deterministic. Each KV head keeps its own tokens (the same count).
// Positions: the reference keeps pre-RoPE keys and re-rotates the compacted cache with in-cache
// indices 0..n-1 at every forward: use the cache option PositionMode::reindexed (`kvc eval
// --positions reindexed`) to reproduce it; kvc eval's default, absolute, keeps each key's original
// rotation and the query's own position. The reference's hard-coded head repeat (40) is replaced
// by the intended per-KV-head gather.
#pragma once

#include <algorithm>
#include <cstdint>
#include <limits>
#include <span>
#include <string_view>
#include <vector>

#include "kvc/ops/select.hpp"
#include "kvc/policies/concepts.hpp"

namespace kvc {

// One Locret eviction step over the cache entries' scores (in cache order = ascending position):
// with `stabilize`, the newest `stabilizers` entries are forced; returns the kept entry indices
// (top min(budget, n), ascending). ALGORITHMS.md section 25 vector 14.
inline std::vector<std::int32_t> locret_keep(std::span<const float> scores, int budget,
                                             int stabilizers, bool stabilize) {
  const auto n = static_cast<int>(scores.size());
  std::vector<float> sc(scores.begin(), scores.end());
  if (stabilize)
    for (int i = std::max(0, n - stabilizers); i < n; ++i)
      sc[i] = std::numeric_limits<float>::max();
  return ops::top_k(Cpu{}, std::span<const float>(sc), std::min(budget, n));
}

struct Locret {
  static constexpr std::string_view kName = "locret";
  static constexpr PolicyKind kKind = PolicyKind::eviction;

  int budget = 6000;
  int local_len = 100;
  int chunk_size = 3072;
  int stabilizers = 2500;

  struct State {};

  void validate() const {
    KVC_CHECK(budget >= 1, "locret: budget must be >= 1, got ", budget);
    KVC_CHECK(local_len >= 0, "locret: local_len must be >= 0, got ", local_len);
    KVC_CHECK(chunk_size >= 1, "locret: chunk_size must be >= 1, got ", chunk_size);
    KVC_CHECK(stabilizers >= 0 && stabilizers <= budget, "locret: stabilizers = ", stabilizers,
              " must be in [0, budget = ", budget, "]");
  }
  bool evicts_on_decode() const { return false; }
  bool observes_attention() const { return false; }

  // Kept prompt indices of one KV head from its scores [T] (the chunked prefill replayed).
  std::vector<std::int32_t> keep(std::span<const float> scores) const {
    const auto tokens = static_cast<int>(scores.size());
    const int evict_end = tokens - local_len;
    std::vector<std::int32_t> kept;  // prompt indices, ascending
    std::vector<float> kept_scores;  // aligned with kept
    int end = 0;
    for (int b = 0; b < evict_end; b += chunk_size) {
      end = std::min(b + chunk_size, evict_end);
      for (int t = b; t < end; ++t) {
        kept.push_back(t);
        kept_scores.push_back(scores[t]);
      }
      const bool final_chunk = !(b + chunk_size < evict_end);
      const auto survivors = locret_keep(kept_scores, budget, stabilizers, !final_chunk);
      std::vector<std::int32_t> next;
      std::vector<float> next_scores;
      for (auto i : survivors) {
        next.push_back(kept[i]);
        next_scores.push_back(kept_scores[i]);
      }
      kept.swap(next);
      kept_scores.swap(next_scores);
    }
    for (int t = end; t < tokens; ++t) kept.push_back(t);
    return kept;
  }

  Selection prefill(State&, const PrefillInput& in) const {
    const int heads = static_cast<int>(in.keys.size(0));
    const std::int64_t tokens = in.keys.size(1);
    KVC_CHECK(in.token_scores.size(1) > 0,
              "locret: needs external per-token scores [Hkv, T] (kvc eval: scores.npy [L, Hkv, T] "
              "in the dump; `kvc calibrate locret-proxy` writes a stand-in), none were given");
    KVC_CHECK(in.token_scores.size(0) == heads && in.token_scores.size(1) == tokens,
              "locret: token scores must be [", heads, ", ", tokens, "], got [",
              in.token_scores.size(0), ", ", in.token_scores.size(1), "]");
    Selection s;
    std::vector<float> row(tokens);
    for (int h = 0; h < heads; ++h) {
      for (std::int64_t t = 0; t < tokens; ++t) row[t] = in.token_scores(h, t);
      s.source_head.push_back(h);
      s.keep.push_back(keep(row));
    }
    return s;
  }

  DecodeKeep decode(State&, const DecodeInput&) const { return std::nullopt; }
};
static_assert(EvictionPolicy<Locret>);

}  // namespace kvc
