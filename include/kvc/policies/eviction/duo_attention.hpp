// kvc/policies/eviction/duo_attention.hpp: DuoAttention (ALGORITHMS.md section 8): retrieval heads
// keep the whole cache, streaming heads keep attention sinks + a recent window.
//
//   kvc::DuoAttention duo{.sink = 64, .recent = 256, .sparsity = 0.5};
//   duo.set_gates(/*layers=*/32, /*kv_heads=*/8, gates);  // gates [L, Hkv] from a .tsv
//   struct Config : kvc::DefaultConfig { using Eviction = kvc::DuoAttention; };
//
// Parameters and defaults (duo-attention's README deploy example): sink = 64, recent = 256,
// sparsity = 0.5 (fraction of streaming heads, deploy's --sparsity; the retrieval-head ratio is
// 1 - sparsity); sparsity < 0 selects the fixed threshold instead (threshold = 0.5: retrieval iff
// gate >= threshold). Gates alpha[l][h] per (layer, KV head), clipped to [0, 1] as
// load_attn_pattern does; a query head uses its KV head's gate. Without a gate table every gate is
// 1.0 (the training initialisation), so only the tie-breaking rule below decides: the first heads
// in (layer, head) order are retrieval heads, a position-blind baseline, not the trained pattern.
//
// Head choice (sparsity s in (0, 1), N = L * Hkv gates): the reference thresholds at
// np.quantile(alpha + U(0, 1e-6) noise, s) (linear interpolation), which with distinct values
// makes N - ceil(s * (N - 1)) retrieval heads. kvc makes the same count deterministic: heads
// ranked by gate descending, ties to the lower (layer, head) index (layer-major), instead of
// random noise. s >= 1: no retrieval head; s == 0: all. Threshold mode compares the gates without
// noise (the noise could only flip a head whose gate lies within 1e-6 below the threshold).
//
// When it acts: after every forward, the prefill forward included: a streaming head holding
// n > sink + recent tokens keeps in-cache indices [0, sink) and [n - recent, n); retrieval heads
// never evict. Storage is ragged per KV head.
// State: the retrieval mask, computed once per cache from the gates and the model shape (rows must
// equal the layers, columns the KV heads; a wrong table is an error naming both shapes).
// Deterministic. Positions: absolute (the reference keeps post-RoPE keys). The gates live in a
// fixed-capacity array (policies are trivially copyable): at most kMaxGates = 4096 gates.
#pragma once

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <span>
#include <string_view>
#include <vector>

#include "kvc/policies/concepts.hpp"

namespace kvc {

struct DuoAttention {
  static constexpr std::string_view kName = "duoattention";
  static constexpr PolicyKind kKind = PolicyKind::eviction;
  static constexpr int kMaxGates = 4096;

  int sink = 64;
  int recent = 256;
  double sparsity = 0.5;   // fraction of streaming heads; < 0 selects the threshold
  double threshold = 0.5;  // used when sparsity < 0
  // Gate table [gate_rows = layers, gate_cols = KV heads], row-major; gate_rows == 0: no table.
  int gate_rows = 0;
  int gate_cols = 0;
  std::array<float, kMaxGates> gates{};

  struct State {
    std::vector<char> retrieval;  // [L * Hkv], layer-major; empty until the first call
  };

  // Stores a gate table (values clipped to [0, 1]); rows = layers, columns = KV heads.
  void set_gates(int rows, int cols, std::span<const float> values) {
    KVC_CHECK(rows >= 1 && cols >= 1,
              "duoattention: gate table must have >= 1 row and column, got ", rows, " x ", cols);
    KVC_CHECK(static_cast<std::int64_t>(rows) * cols <= kMaxGates, "duoattention: gate table of ",
              rows, " x ", cols, " exceeds the capacity of ", kMaxGates, " (layer, KV head) gates");
    KVC_CHECK(values.size() == static_cast<std::size_t>(rows) * cols,
              "duoattention: ", values.size(), " gate values for a ", rows, " x ", cols, " table");
    gate_rows = rows;
    gate_cols = cols;
    for (std::size_t i = 0; i < values.size(); ++i) {
      KVC_CHECK(std::isfinite(values[i]), "duoattention: gate ", i, " is not finite");
      gates[i] = std::clamp(values[i], 0.0f, 1.0f);
    }
  }

  void validate() const {
    KVC_CHECK(sink >= 0, "duoattention: sink must be >= 0, got ", sink);
    KVC_CHECK(recent >= 1, "duoattention: recent must be >= 1, got ", recent);
    KVC_CHECK(sparsity <= 1.0, "duoattention: sparsity must be in [0, 1] (or < 0 to use the ",
              "threshold), got ", sparsity);
    KVC_CHECK(sparsity >= 0.0 || (threshold >= 0.0 && threshold <= 1.0),
              "duoattention: threshold must be in [0, 1], got ", threshold);
    KVC_CHECK(gate_rows >= 0 && gate_cols >= 0 &&
                  static_cast<std::int64_t>(gate_rows) * gate_cols <= kMaxGates,
              "duoattention: gate table ", gate_rows, " x ", gate_cols, " exceeds ", kMaxGates);
  }
  bool evicts_on_decode() const { return true; }
  bool observes_attention() const { return false; }

  // Retrieval mask [layers * kv_heads], layer-major, following the rules in the header comment.
  std::vector<char> retrieval_heads(int layers, int kv_heads) const {
    if (gate_rows > 0)
      KVC_CHECK(gate_rows == layers && gate_cols == kv_heads, "duoattention: the gate table has ",
                gate_rows, " rows x ", gate_cols, " columns but the model has ", layers,
                " layers x ", kv_heads, " KV heads (rows = layers, columns = KV heads)");
    const int n = layers * kv_heads;
    KVC_CHECK(n <= kMaxGates, "duoattention: ", layers, " x ", kv_heads, " heads exceed ",
              kMaxGates);
    auto gate = [&](int i) { return gate_rows > 0 ? gates[i] : 1.0f; };
    std::vector<char> retrieval(n, 0);
    if (sparsity < 0) {
      for (int i = 0; i < n; ++i) retrieval[i] = gate(i) >= threshold;
      return retrieval;
    }
    int count = 0;
    if (sparsity <= 0.0)
      count = n;
    else if (sparsity < 1.0)
      count = n - static_cast<int>(std::ceil(sparsity * (n - 1)));
    std::vector<int> order(n);
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return gate(a) > gate(b); });
    for (int i = 0; i < count; ++i) retrieval[order[i]] = 1;
    return retrieval;
  }

  // In-cache indices a streaming head keeps from n tokens.
  std::vector<std::int32_t> streaming_keep(int n) const {
    std::vector<std::int32_t> kept;
    if (n <= sink + recent) {
      for (int i = 0; i < n; ++i) kept.push_back(i);
      return kept;
    }
    for (int i = 0; i < sink; ++i) kept.push_back(i);
    for (int i = n - recent; i < n; ++i) kept.push_back(i);
    return kept;
  }

  Selection prefill(State& state, const PrefillInput& in) const {
    const int heads = static_cast<int>(in.keys.size(0));
    ensure_mask(state, in.num_layers, heads);
    const int tokens = static_cast<int>(in.keys.size(1));
    Selection s = keep_all(heads, tokens);
    for (int h = 0; h < heads; ++h)
      if (!state.retrieval[in.layer * heads + h]) s.keep[h] = streaming_keep(tokens);
    return s;
  }

  DecodeKeep decode(State& state, const DecodeInput& in) const {
    const int heads = static_cast<int>(in.head_sizes.size());
    ensure_mask(state, in.num_layers, heads);
    bool any = false;
    std::vector<std::vector<std::int32_t>> kept(heads);
    for (int h = 0; h < heads; ++h) {
      const int n = in.head_sizes[h];
      if (state.retrieval[in.layer * heads + h]) {
        kept[h].resize(n);
        std::iota(kept[h].begin(), kept[h].end(), 0);
      } else {
        kept[h] = streaming_keep(n);
        any = any || static_cast<int>(kept[h].size()) < n;
      }
    }
    if (!any) return std::nullopt;
    return kept;
  }

 private:
  void ensure_mask(State& state, int layers, int kv_heads) const {
    if (state.retrieval.empty()) state.retrieval = retrieval_heads(layers, kv_heads);
  }
};
static_assert(EvictionPolicy<DuoAttention>);

}  // namespace kvc
