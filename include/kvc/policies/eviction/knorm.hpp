// kvc/policies/eviction/knorm.hpp: Knorm / L2Norm (ALGORITHMS.md section 23; Devoto et al. 2024,
// "A Simple and Effective L2 Norm-Based Strategy for KV Cache Compression"): keep the tokens whose
// keys have the smallest L2 norm. Needs no queries and no attention.
//
//   struct Config : kvc::DefaultConfig { using Eviction = kvc::Knorm; };
//   kvc::Knorm knorm{.budget = 256};                 // the reference behaviour
//   kvc::Knorm guarded{.budget = 256, .window = 8};  // the last 8 prompt tokens always kept
//
// Parameters and defaults: budget C = 2048 tokens per KV head; window = 0 (KVCache-Factory and
// kvpress protect no recent window); skip_layers = 0 (layers l < skip_layers keep everything;
// KVCache-Factory's L2NormCluster skips layers 0 and 1, i.e. skip_layers = 2 reproduces it).
// When it acts: once, at prefill compression, per KV head: T <= C keeps everything; otherwise keep
// the last `window` prompt tokens and the C - window tokens of [0, T - window) with the smallest
// ||k|| (post-RoPE keys as cached; norms in double). Decode appends without eviction.
// State: none. Deterministic: ties go to the lower position.
#pragma once

#include <cmath>
#include <cstdint>
#include <string_view>
#include <vector>

#include "kvc/policies/concepts.hpp"
#include "kvc/policies/eviction/prompt_attention.hpp"

namespace kvc {

struct Knorm {
  static constexpr std::string_view kName = "knorm";
  static constexpr PolicyKind kKind = PolicyKind::eviction;

  int budget = 2048;
  int window = 0;
  int skip_layers = 0;

  struct State {};

  void validate() const {
    KVC_CHECK(budget >= 1, "knorm: budget must be >= 1, got ", budget);
    KVC_CHECK(window >= 0 && window < budget, "knorm: window = ", window,
              " must be in [0, budget = ", budget, ")");
    KVC_CHECK(skip_layers >= 0, "knorm: skip_layers must be >= 0, got ", skip_layers);
  }
  bool evicts_on_decode() const { return false; }
  bool observes_attention() const { return false; }

  Selection prefill(State&, const PrefillInput& in) const {
    const int kv_heads = static_cast<int>(in.keys.size(0));
    const std::int64_t tokens = in.keys.size(1), d = in.keys.size(2);
    Selection s = keep_all(kv_heads, tokens);
    if (tokens <= budget || in.layer < skip_layers) return s;
    const std::int64_t prefix = tokens - window;
    std::vector<double> negative_norm(prefix);
    for (int k = 0; k < kv_heads; ++k) {
      for (std::int64_t j = 0; j < prefix; ++j) {
        double sq = 0;
        for (std::int64_t c = 0; c < d; ++c) sq += double(in.keys(k, j, c)) * in.keys(k, j, c);
        negative_norm[j] = -std::sqrt(sq);
      }
      s.keep[k] = top_scores_ascending(negative_norm, budget - window);
      for (std::int64_t j = prefix; j < tokens; ++j)
        s.keep[k].push_back(static_cast<std::int32_t>(j));
    }
    return s;
  }

  DecodeKeep decode(State&, const DecodeInput&) const { return std::nullopt; }
};
static_assert(EvictionPolicy<Knorm>);

}  // namespace kvc
