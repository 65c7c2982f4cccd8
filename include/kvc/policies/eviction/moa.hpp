// kvc/policies/eviction/moa.hpp: MoA-style per-head attention spans: each (layer, KV head) keeps
// its own sinks and a recent window whose length may grow with the sequence (the elastic rule
// window = a + b * N of Mixture of Sparse Attention).
//
//   kvc::Moa moa;                                  // uniform: sink 4, window 64 + 0 * N
//   const std::vector<kvc::MoaSpan> spans{{4, 64, 0.25f}, {4, 32, 0}};  // [L = 1][Hkv = 2]
//   moa.set_spans(/*layers=*/1, /*kv_heads=*/2, spans);
//   struct Config : kvc::DefaultConfig { using Eviction = kvc::Moa; };
//
// Parameters and defaults: with no span table every head uses sink = 4, a = 64, b = 0 (a
// StreamingLLM with 4 sinks and 64 recent tokens); a span table (`kvc eval`: config=PATH, the JSON
// schema of docs/formats.md, {"layers": [[{"sink": 4, "a": 64, "b": 0.25}, ... per KV head], ...
// per layer]}) gives each (layer, KV head) its own sink, a and b. Rows must equal the model's
// layers and each row's entries its KV heads (an error names both shapes otherwise).
// When it acts: after every forward, the prefill forward included, per head: with N the number of
// tokens the layer has seen (prompt + decoded, evicted ones included) and the window
// w = max(1, floor(a + b * N)), a head holding n > sink + w tokens keeps in-cache indices
// [0, sink) and [n - w, n). Storage is ragged per KV head.
// State: tokens seen per layer. Deterministic. Positions: absolute by default; the cache's
// PositionMode::reindexed re-indexes like StreamingLLM's pos-shift. The spans live in a
// fixed-capacity array (policies are trivially copyable): at most kMaxSpans (layer, KV head)
// entries.
#pragma once

#include <array>
#include <cmath>
#include <cstdint>
#include <span>
#include <string_view>
#include <vector>

#include "kvc/policies/concepts.hpp"

namespace kvc {

struct MoaSpan {
  int sink = 4;
  float a = 64;  // window at N = 0
  float b = 0;   // window growth per token seen
};

struct Moa {
  static constexpr std::string_view kName = "moa";
  static constexpr PolicyKind kKind = PolicyKind::eviction;
  static constexpr int kMaxSpans = 2048;

  MoaSpan uniform{};  // used by every head when span_rows == 0
  // Span table [span_rows = layers, span_cols = KV heads], row-major; span_rows == 0: no table.
  int span_rows = 0;
  int span_cols = 0;
  std::array<MoaSpan, kMaxSpans> spans{};

  struct State {
    std::vector<std::int64_t> seen;  // [L] tokens each layer has seen
  };

  static void check_span(const MoaSpan& s, const char* where, int layer, int head) {
    KVC_CHECK(s.sink >= 0, "moa: ", where, " (layer ", layer, ", head ", head,
              "): sink must be >= 0, got ", s.sink);
    KVC_CHECK(std::isfinite(s.a) && std::isfinite(s.b) && s.a >= 0 && s.b >= 0 && s.a + s.b > 0,
              "moa: ", where, " (layer ", layer, ", head ", head, "): a = ", s.a, " and b = ", s.b,
              " must be finite, >= 0 and not both 0");
  }

  void set_spans(int rows, int cols, std::span<const MoaSpan> values) {
    KVC_CHECK(rows >= 1 && cols >= 1, "moa: span table must have >= 1 layer and head, got ", rows,
              " x ", cols);
    KVC_CHECK(static_cast<std::int64_t>(rows) * cols <= kMaxSpans, "moa: span table of ", rows,
              " x ", cols, " exceeds the capacity of ", kMaxSpans, " (layer, KV head) entries");
    KVC_CHECK(values.size() == static_cast<std::size_t>(rows) * cols, "moa: ", values.size(),
              " spans for a ", rows, " x ", cols, " table");
    for (std::size_t i = 0; i < values.size(); ++i)
      check_span(values[i], "span table", static_cast<int>(i) / cols, static_cast<int>(i) % cols);
    span_rows = rows;
    span_cols = cols;
    for (std::size_t i = 0; i < values.size(); ++i) spans[i] = values[i];
  }

  void validate() const {
    check_span(uniform, "uniform span", -1, -1);
    KVC_CHECK(span_rows >= 0 && span_cols >= 0 &&
                  static_cast<std::int64_t>(span_rows) * span_cols <= kMaxSpans,
              "moa: span table ", span_rows, " x ", span_cols, " exceeds ", kMaxSpans);
  }
  bool evicts_on_decode() const { return true; }
  bool observes_attention() const { return false; }

  const MoaSpan& span(int layers, int kv_heads, int layer, int head) const {
    if (span_rows == 0) return uniform;
    KVC_CHECK(span_rows == layers && span_cols == kv_heads, "moa: the span table has ", span_rows,
              " layers x ", span_cols, " KV heads but the model has ", layers, " layers x ",
              kv_heads, " KV heads");
    return spans[layer * span_cols + head];
  }

  static int window(const MoaSpan& s, std::int64_t seen) {
    const double w = std::floor(static_cast<double>(s.a) + static_cast<double>(s.b) * seen);
    return w < 1 ? 1 : (w > 2e9 ? 2000000000 : static_cast<int>(w));
  }

  // In-cache indices a head with span s keeps from n stored tokens after `seen` tokens.
  static std::vector<std::int32_t> keep(const MoaSpan& s, int n, std::int64_t seen) {
    const int w = window(s, seen);
    std::vector<std::int32_t> kept;
    if (static_cast<std::int64_t>(n) <= static_cast<std::int64_t>(s.sink) + w) {
      for (int i = 0; i < n; ++i) kept.push_back(i);
      return kept;
    }
    for (int i = 0; i < s.sink; ++i) kept.push_back(i);
    for (int i = n - w; i < n; ++i) kept.push_back(i);
    return kept;
  }

  Selection prefill(State& state, const PrefillInput& in) const {
    const int heads = static_cast<int>(in.keys.size(0));
    const auto tokens = static_cast<int>(in.keys.size(1));
    seen(state, in.num_layers, in.layer) = tokens;
    Selection s;
    for (int h = 0; h < heads; ++h) {
      s.source_head.push_back(h);
      s.keep.push_back(keep(span(in.num_layers, heads, in.layer, h), tokens, tokens));
    }
    return s;
  }

  DecodeKeep decode(State& state, const DecodeInput& in) const {
    const int heads = static_cast<int>(in.head_sizes.size());
    const std::int64_t n_seen = ++seen(state, in.num_layers, in.layer);
    bool any = false;
    std::vector<std::vector<std::int32_t>> kept(heads);
    for (int h = 0; h < heads; ++h) {
      kept[h] = keep(span(in.num_layers, heads, in.layer, h), in.head_sizes[h], n_seen);
      any = any || static_cast<int>(kept[h].size()) < in.head_sizes[h];
    }
    if (!any) return std::nullopt;
    return kept;
  }

 private:
  static std::int64_t& seen(State& state, int layers, int layer) {
    if (static_cast<int>(state.seen.size()) < layers) state.seen.resize(layers, 0);
    return state.seen[layer];
  }
};
static_assert(EvictionPolicy<Moa>);

}  // namespace kvc
