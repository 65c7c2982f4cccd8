// kvc/policies/eviction/streaming_llm.hpp: StreamingLLM (ALGORITHMS.md section 2): attention sinks
// plus a window of recent tokens.
//
//   struct Config : kvc::DefaultConfig { using Eviction = kvc::StreamingLlm; };
//   kvc::StreamingLlm policy{.sink = 4, .recent = 508};   // 512-token cache
//
// Parameters and defaults: sink S = 4 (start_size), recent R = 512 (the class default; the paper
// evaluates caches of 256-4096 with 4 sinks). When it acts: after every forward, the prefill
// forward included: a head holding n > S + R tokens keeps in-cache indices [0, S) and [n - R, n).
// The same decision for every layer and head. State: none. Deterministic. Positions: the paper's
// pos-shift re-indexes positions (cache option PositionMode::reindexed); the default absolute mode
// keeps each key's original rotation.
#pragma once

#include <cstdint>
#include <string_view>
#include <vector>

#include "kvc/policies/concepts.hpp"

namespace kvc {

struct StreamingLlm {
  static constexpr std::string_view kName = "streamingllm";
  static constexpr PolicyKind kKind = PolicyKind::eviction;

  int sink = 4;
  int recent = 512;

  struct State {};

  void validate() const {
    KVC_CHECK(sink >= 0, "streamingllm: sink must be >= 0, got ", sink);
    KVC_CHECK(recent >= 1, "streamingllm: recent must be >= 1, got ", recent);
  }
  bool evicts_on_decode() const { return true; }
  bool observes_attention() const { return false; }

  // In-cache indices kept from n tokens: [0, S) and [n - R, n) once n > S + R.
  std::vector<std::int32_t> keep(int n) const {
    std::vector<std::int32_t> kept;
    if (n <= sink + recent) {
      for (int i = 0; i < n; ++i) kept.push_back(i);
      return kept;
    }
    for (int i = 0; i < sink; ++i) kept.push_back(i);
    for (int i = n - recent; i < n; ++i) kept.push_back(i);
    return kept;
  }

  // The reference's evict_for_space: before m new tokens arrive, keep [0, S) and [n - R + m, n)
  // so that the cache holds S + R tokens once they are in. Requires m <= R.
  std::vector<std::int32_t> keep_for_space(int n, int incoming) const {
    KVC_CHECK(incoming >= 0 && incoming <= recent, "streamingllm: incoming tokens m = ", incoming,
              " must be in [0, recent = ", recent, "]");
    std::vector<std::int32_t> kept;
    if (n + incoming <= sink + recent) {
      for (int i = 0; i < n; ++i) kept.push_back(i);
      return kept;
    }
    for (int i = 0; i < sink; ++i) kept.push_back(i);
    for (int i = n - recent + incoming; i < n; ++i) kept.push_back(i);
    return kept;
  }

  Selection prefill(State&, const PrefillInput& in) const {
    const int heads = static_cast<int>(in.keys.size(0));
    Selection s;
    for (int h = 0; h < heads; ++h) {
      s.source_head.push_back(h);
      s.keep.push_back(keep(static_cast<int>(in.keys.size(1))));
    }
    return s;
  }

  DecodeKeep decode(State&, const DecodeInput& in) const {
    bool any = false;
    std::vector<std::vector<std::int32_t>> kept;
    for (int n : in.head_sizes) {
      kept.push_back(keep(n));
      any = any || static_cast<int>(kept.back().size()) < n;
    }
    if (!any) return std::nullopt;
    return kept;
  }
};
static_assert(EvictionPolicy<StreamingLlm>);

}  // namespace kvc
