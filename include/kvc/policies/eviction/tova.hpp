// kvc/policies/eviction/tova.hpp: TOVA, Token Omission Via Attention (Oren et al. 2024,
// "Transformers are Multi-State RNNs"): a fixed-size cache that, once over budget, drops the token
// the *current* query attends to least. No accumulated history, no protected window.
//
//   struct Config : kvc::DefaultConfig { using Eviction = kvc::Tova; };
//   kvc::Tova tova{.budget = 256};
//   // decode: cache.append(...); cache.attend(...); cache.observe(layer, q); cache.step(layer);
//
// Parameters and defaults: budget = 512 tokens per storage head (the paper evaluates caches of
// 64-4096 tokens).
// When it acts: at prefill compression, a prompt of T > budget tokens keeps the budget tokens with
// the highest attention from the last prompt query (the prefill must give at least that query);
// after every decode step (the step's query has attended over the cache, new token included) a
// head holding n > budget tokens keeps the budget tokens with the highest attention from that query
// (one eviction per step once full; the newest token may itself be dropped, as in the paper).
// GQA: one decision per storage (KV) head, on the mean of its g query heads' probabilities (fp32).
// State: none (the decision uses only the current query). Deterministic: ties go to the lower
// position (in-cache index). Decode needs observe() before step().
#pragma once

#include <cstdint>
#include <string_view>
#include <vector>

#include "kvc/policies/concepts.hpp"
#include "kvc/policies/eviction/prompt_attention.hpp"

namespace kvc {

struct Tova {
  static constexpr std::string_view kName = "tova";
  static constexpr PolicyKind kKind = PolicyKind::eviction;

  int budget = 512;

  struct State {};

  void validate() const { KVC_CHECK(budget >= 1, "tova: budget must be >= 1, got ", budget); }
  bool evicts_on_decode() const { return true; }
  bool observes_attention() const { return true; }

  Selection prefill(State&, const PrefillInput& in) const {
    const int kv_heads = static_cast<int>(in.keys.size(0));
    const std::int64_t tokens = in.keys.size(1);
    Selection s = keep_all(kv_heads, tokens);
    if (tokens <= budget) return s;
    KVC_CHECK(in.queries.size(1) >= 1, "tova: a prompt longer than budget = ", budget,
              " needs its last query, the prefill gave none");
    const PromptColumns last =
        prompt_attention_columns(in, in.queries.size(1) - 1, /*round_f16=*/false);
    const int group = static_cast<int>(in.queries.size(0)) / kv_heads;
    std::vector<double> mean(tokens);
    for (int k = 0; k < kv_heads; ++k) {
      for (std::int64_t j = 0; j < tokens; ++j) {
        double sum = 0;
        for (int h = k * group; h < (k + 1) * group; ++h) sum += last.sums[h * tokens + j];
        mean[j] = sum / group;
      }
      s.keep[k] = top_scores_ascending(mean, budget);
    }
    return s;
  }

  DecodeKeep decode(State&, const DecodeInput& in) const {
    bool over = false;
    for (int n : in.head_sizes) over = over || n > budget;
    if (!over) return std::nullopt;
    KVC_CHECK(in.probabilities != nullptr && in.probabilities->size() == in.head_sizes.size(),
              "tova (layer ", in.layer,
              "): needs this step's attention; call cache.observe(layer, q) before step()");
    std::vector<std::vector<std::int32_t>> keep(in.head_sizes.size());
    std::vector<double> mean;
    for (std::size_t s = 0; s < in.head_sizes.size(); ++s) {
      const int n = in.head_sizes[s];
      const auto& p = (*in.probabilities)[s];  // [g, n]
      KVC_CHECK(n > 0 && p.size() % n == 0, "tova: attention of storage head ", s, " has ",
                p.size(), " values for ", n, " tokens");
      const auto rows = p.size() / n;
      mean.assign(n, 0.0);
      for (std::size_t r = 0; r < rows; ++r)
        for (int j = 0; j < n; ++j) mean[j] += p[r * n + j];
      for (auto& m : mean) m /= static_cast<double>(rows);
      keep[s] = top_scores_ascending(mean, budget);
    }
    return keep;
  }
};
static_assert(EvictionPolicy<Tova>);

}  // namespace kvc
