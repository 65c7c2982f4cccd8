// kvc/policies/eviction/h2o.hpp: H2O, the Heavy-Hitter Oracle (ALGORITHMS.md section 3): keep the
// tokens with the largest accumulated attention ("heavy hitters") plus the most recent tokens.
//
//   struct Config : kvc::DefaultConfig { using Eviction = kvc::H2o; };
//   kvc::H2o h2o{.heavy = 64, .recent = 64};                        // real-drop, 128-token cache
//   kvc::H2o once{.variant = kvc::H2oVariant::prefill, .budget = 256, .window = 8};
//   // decode: cache.append(...); cache.attend(...); cache.observe(layer, q); cache.step(layer);
//
// variant = decode (default; the real-drop H2OKVCache_LayerWise): every forward adds its attention
//   probabilities to per-token scores; a head holding n > heavy + recent tokens keeps the `heavy`
//   best-scored tokens of in-cache indices [0, n - recent) and the last `recent` ones. After the
//   cache is full each decode step evicts exactly one token per head; an evicted token's score is
//   discarded with it. The prefill forward counts too: the prompt's score is the column sum of the
//   full causal attention of the prefill queries (all of them in `kvc eval`; if the caller gives
//   only the last Tq, those), and the prompt is evicted to heavy + recent right after it.
//   Decode needs this step's attention: call cache.observe(layer, q) before cache.step(layer).
// variant = prefill (KVCache-Factory H2OKVCluster): once, at prefill compression: T < budget keeps
//   everything, otherwise keep the budget - window prefix tokens with the largest column sums of
//   the prefill attention (no pooling) plus the last `window` prompt tokens; no decode eviction.
// GQA: the reference is MHA (one score row per query head). Here scores live per storage (KV)
//   head: the attention of the group's g query heads on a token is summed (one decision per KV
//   head; the sum ranks like the mean).
// normalize = none (default, H2O) sums the probabilities; normalize = observed divides each token's
//   sum by the number of queries that saw it (kvpress ObservedAttentionPress: T - j for prompt
//   column j, plus one per decode step), which removes the bias towards early tokens.
// Probabilities are fp32 softmax rounded to f16 before they are summed (the released code's fp16
// cast); sums are kept in double.
// Parameters and defaults: heavy = 4 and recent = 512 (the real-drop class defaults; callers always
// set them; the paper's simulated version uses 10% + 10% of the prompt); budget C = 2048 and
// window W = 8 (KVCache-Factory LongBench) for variant = prefill.
// State (decode variant): per layer, per storage head, one (sum, seen) pair per stored token, in
// the cache's order, gathered with the same indices as the cache. Deterministic: ties go to the
// lower position (in-cache index).
#pragma once

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <span>
#include <string_view>
#include <vector>

#include "kvc/core/dtype.hpp"
#include "kvc/policies/concepts.hpp"
#include "kvc/policies/eviction/prompt_attention.hpp"

namespace kvc {

enum class H2oVariant { decode, prefill };
enum class ScoreNormalize { none, observed };

// H2O's keep rule on n = scores.size() tokens: n <= heavy + recent keeps all; otherwise the
// `heavy` best of [0, n - recent) and all of [n - recent, n). Ascending in-cache indices.
inline std::vector<std::int32_t> h2o_keep(std::span<const double> scores, int heavy, int recent) {
  const auto n = static_cast<std::int32_t>(scores.size());
  if (n <= heavy + recent) {
    std::vector<std::int32_t> all(n);
    std::iota(all.begin(), all.end(), 0);
    return all;
  }
  std::vector<std::int32_t> kept = top_scores_ascending(scores.first(n - recent), heavy);
  for (std::int32_t i = n - recent; i < n; ++i) kept.push_back(i);
  return kept;
}

struct H2o {
  static constexpr std::string_view kName = "h2o";
  static constexpr PolicyKind kKind = PolicyKind::eviction;

  H2oVariant variant = H2oVariant::decode;
  int heavy = 4;
  int recent = 512;
  int budget = 2048;  // variant = prefill
  int window = 8;     // variant = prefill
  ScoreNormalize normalize = ScoreNormalize::none;

  struct TokenScore {
    double sum = 0;  // accumulated attention (summed over the group's query heads)
    int seen = 0;    // query rows (prompt queries + decode steps) that saw this token
  };
  struct State {
    std::vector<std::vector<std::vector<TokenScore>>> layers;  // [L][S][n_s]
  };

  void validate() const {
    if (variant == H2oVariant::decode) {
      KVC_CHECK(heavy >= 0, "h2o: heavy must be >= 0, got ", heavy);
      KVC_CHECK(recent >= 0, "h2o: recent must be >= 0, got ", recent);
      KVC_CHECK(heavy + recent >= 1, "h2o: heavy + recent must be >= 1, got heavy = ", heavy,
                ", recent = ", recent);
    } else {
      KVC_CHECK(budget > 0, "h2o: budget must be > 0, got ", budget);
      KVC_CHECK(window >= 0 && window < budget, "h2o: window = ", window,
                " must be in [0, budget = ", budget, ")");
    }
  }
  bool evicts_on_decode() const { return variant == H2oVariant::decode; }
  bool observes_attention() const { return variant == H2oVariant::decode; }

  double score(const TokenScore& t) const {
    if (normalize == ScoreNormalize::none) return t.sum;
    return t.seen > 0 ? t.sum / t.seen : 0.0;
  }

  Selection prefill(State& state, const PrefillInput& in) const {
    const int kv_heads = static_cast<int>(in.keys.size(0));
    const std::int64_t tokens = in.keys.size(1);
    const bool decode_variant = variant == H2oVariant::decode;
    const std::int64_t capacity = decode_variant ? heavy + recent : budget;
    const bool compress = decode_variant ? tokens > capacity : tokens >= capacity;
    auto* heads = decode_variant ? &layer_state(state, in.layer) : nullptr;
    if (heads) heads->assign(kv_heads, std::vector<TokenScore>(tokens));
    if (!compress && !decode_variant) return keep_all(kv_heads, tokens);
    KVC_CHECK(!compress || in.queries.size(1) >= 1,
              "h2o: scoring the prompt needs the prefill queries, the prefill gave none");
    Selection s = keep_all(kv_heads, tokens);
    if (in.queries.size(1) == 0) return s;  // nothing to score, nothing to evict
    const PromptColumns columns = prompt_attention_columns(in, 0, /*round_f16=*/true);
    const int group = static_cast<int>(in.queries.size(0)) / kv_heads;
    std::vector<TokenScore> head_scores(tokens);
    std::vector<double> ranked(tokens);
    for (int k = 0; k < kv_heads; ++k) {
      for (std::int64_t j = 0; j < tokens; ++j) {
        double sum = 0;
        for (int h = k * group; h < (k + 1) * group; ++h) sum += columns.sums[h * tokens + j];
        head_scores[j] = {sum, columns.seen[j]};
        ranked[j] = score(head_scores[j]);
      }
      if (decode_variant) {
        s.keep[k] = h2o_keep(ranked, heavy, recent);
        auto& stored = (*heads)[k];
        stored.clear();
        for (auto i : s.keep[k]) stored.push_back(head_scores[i]);
      } else if (compress) {
        const std::int64_t prefix = tokens - window;
        s.keep[k] =
            top_scores_ascending(std::span<const double>(ranked).first(prefix), budget - window);
        for (std::int64_t j = prefix; j < tokens; ++j)
          s.keep[k].push_back(static_cast<std::int32_t>(j));
      }
    }
    return s;
  }

  DecodeKeep decode(State& state, const DecodeInput& in) const {
    if (variant != H2oVariant::decode) return std::nullopt;
    const bool reduced = in.probabilities == nullptr && in.group_scores != nullptr;
    const auto* attention = reduced ? in.group_scores : in.probabilities;
    KVC_CHECK(attention != nullptr, "h2o (layer ", in.layer,
              "): needs this step's attention; call cache.observe(layer, q) before step()");
    auto& heads = layer_state(state, in.layer);
    const auto storage_heads = in.head_sizes.size();
    KVC_CHECK(attention->size() == storage_heads, "h2o: attention given for ", attention->size(),
              " storage heads, the cache has ", storage_heads);
    heads.resize(storage_heads);
    bool evicted = false;
    std::vector<std::vector<std::int32_t>> keep(storage_heads);
    std::vector<double> ranked;
    for (std::size_t s = 0; s < storage_heads; ++s) {
      const int n = in.head_sizes[s];
      const auto& p = (*attention)[s];  // [g, n], or [n] already reduced
      KVC_CHECK(n > 0 && p.size() % n == 0 && (!reduced || p.size() == static_cast<std::size_t>(n)),
                "h2o: attention of storage head ", s, " has ", p.size(), " values for ", n,
                " tokens");
      const auto rows = p.size() / n;
      auto& scores = heads[s];
      scores.resize(n);  // the tokens appended since the last step start at (0, 0)
      ranked.resize(n);
      for (int j = 0; j < n; ++j) {
        double sum = 0;
        if (reduced)
          sum = p[j];  // rounded and group-summed on the device
        else
          for (std::size_t r = 0; r < rows; ++r) sum += static_cast<float>(f16(p[r * n + j]));
        scores[j].sum += sum;
        scores[j].seen += 1;
        ranked[j] = score(scores[j]);
      }
      keep[s] = h2o_keep(ranked, heavy, recent);
      if (static_cast<int>(keep[s].size()) < n) {
        evicted = true;
        std::vector<TokenScore> kept;
        for (auto i : keep[s]) kept.push_back(scores[i]);
        scores.swap(kept);
      }
    }
    if (!evicted) return std::nullopt;
    return keep;
  }

 private:
  static std::vector<std::vector<TokenScore>>& layer_state(State& state, int layer) {
    if (static_cast<int>(state.layers.size()) <= layer) state.layers.resize(layer + 1);
    return state.layers[layer];
  }
};
static_assert(EvictionPolicy<H2o>);

}  // namespace kvc
