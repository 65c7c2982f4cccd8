// kvc/policies/merge/cam.hpp: CaM, Cache Merging (ALGORITHMS.md section 16): the value of every
// token an eviction policy drops is spread over the next m kept values with a probability drawn
// from the accumulated attention; keys are never modified.
//
//   struct Config : kvc::DefaultConfig { using Eviction = kvc::H2o; using Merge = kvc::Cam; };
//   kvc::KVCache<Config, kvc::Cpu> cache{shape, kvc::H2o{.heavy = 96, .recent = 96},
//                                        kvc::Cam{.merge = 16, .seed = 7}};
//   // decode: append, attend, observe(layer, q), step(layer): H2O evicts, CaM merges
//
// CaM needs an eviction policy that drops tokens (alone it is rejected, naming both stages).
// State, per layer and storage head: the accumulated attention acc of every stored token, in the
//   cache's order: the prompt's causal attention column sums (all given prompt queries, fp32
//   softmax rounded to f16, summed over the head's query heads), then every decode step's
//   observed probabilities; gathered with the eviction's keep sets, so it stays aligned with the
//   cache (and with H2O's own scores, which sum the same probabilities).
// When it acts: at prefill compression on what the eviction dropped, and after every decode step
//   in which the eviction drops tokens (H2O, StreamingLLM, TOVA: one per step once full). For each
//   dropped token e (ascending in-cache order), per storage head:
//     W = the next `merge` kept tokens after e (cache order; fewer at the end, none: no merge)
//     p = acc[e] / mean(acc[W])   (denominator = mean, the real-drop streaming code and kvpress)
//       or acc[e] / max(acc[W])   (denominator = max, the released lm-eval loop's "mean_attn")
//     NaN or inf -> 0, clipped to [0, 1]; mask ~ Bernoulli(p)
//     V[w] += mask * V[e] / |W| for w in W
//   reference_compat = true divides by `merge` even when |W| < merge (the released slicing: the
//   missing share of V[e] is lost); the default divides by |W| so that a merge conserves the sum
//   of the values: sum_kept V after = sum_kept V before + mask * V[e].
// Determinism: the Bernoulli draw is u < p with u = kvc::merge_uniform(seed, layer, storage head,
//   absolute position of e): reproducible for a seed whatever order layers run in, different for
//   another seed. The CUDA backend (not written yet) must use the same counter-based draw.
// Parameters and defaults: merge m = 16 (real-drop merge_num; kvpress uses 32), denominator = mean,
//   seed = 0, reference_compat = false. The paper's budgets (10% sinks + 10% recent) belong to the
//   eviction policy (e.g. h2o(heavy, recent) or streamingllm(sink, recent)).
// A decode-time merge rewrites the values of a head: the cache re-loads that head's store from
//   its dequantized rows (exact for f16 storage).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string_view>
#include <vector>

#include "kvc/core/dtype.hpp"
#include "kvc/policies/concepts.hpp"
#include "kvc/policies/merge/merge_common.hpp"

namespace kvc {

enum class CamDenominator { mean, max };

struct Cam {
  static constexpr std::string_view kName = "cam";
  static constexpr PolicyKind kKind = PolicyKind::merge;

  int merge = 16;
  CamDenominator denominator = CamDenominator::mean;
  int seed = 0;
  bool reference_compat = false;

  struct State {
    std::vector<std::vector<std::vector<double>>> layers;  // [L][S][n_s] accumulated attention
  };

  void validate() const {
    KVC_CHECK(merge >= 1, "cam: merge must be >= 1, got ", merge);
    KVC_CHECK(seed >= 0, "cam: seed must be >= 0, got ", seed);
  }
  bool active() const { return true; }
  bool needs_eviction() const { return true; }
  bool allows_eviction() const { return true; }
  bool acts_on_decode() const { return true; }
  bool observes_attention() const { return true; }

  // Merge probability of a dropped token with accumulated attention `evicted` into a window.
  double probability(double evicted, std::span<const double> window) const {
    if (window.empty()) return 0.0;
    double denom = 0;
    if (denominator == CamDenominator::mean) {
      for (double a : window) denom += a;
      denom /= static_cast<double>(window.size());
    } else {
      denom = *std::max_element(window.begin(), window.end());
    }
    const double p = evicted / denom;
    if (!std::isfinite(p)) return 0.0;
    return std::clamp(p, 0.0, 1.0);
  }

  // Merges the dropped tokens of one head. values [n, D] in cache order, acc [n], kept: ascending
  // indices into the n rows; positions [n] absolute (for the draw). mass (optional, [n]) is the
  // ledger. Returns whether any value changed.
  bool merge_head(int layer, int head, HostView<float, 2> values, std::span<const double> acc,
                  std::span<const std::int32_t> kept, std::span<const std::int32_t> positions,
                  std::vector<double>* mass) const {
    const auto n = static_cast<std::int32_t>(acc.size());
    std::vector<char> is_kept(n, 0);
    for (auto i : kept) is_kept[i] = 1;
    bool changed = false;
    std::size_t next = 0;  // kept[next] is the first kept index after e
    std::vector<double> window_acc;
    for (std::int32_t e = 0; e < n; ++e) {
      while (next < kept.size() && kept[next] <= e) ++next;
      if (is_kept[e]) continue;
      const std::size_t end = std::min(kept.size(), next + static_cast<std::size_t>(merge));
      if (end == next) continue;
      window_acc.clear();
      for (std::size_t w = next; w < end; ++w) window_acc.push_back(acc[kept[w]]);
      const double p = probability(acc[e], window_acc);
      if (!(merge_uniform(static_cast<std::uint64_t>(seed), layer, head, positions[e]) < p))
        continue;
      const double share =
          1.0 / static_cast<double>(reference_compat ? merge : static_cast<int>(end - next));
      for (std::size_t w = next; w < end; ++w) {
        for (std::int64_t c = 0; c < values.size(1); ++c)
          values(kept[w], c) = static_cast<float>(values(kept[w], c) + values(e, c) * share);
        if (mass) (*mass)[kept[w]] += (*mass)[e] * share;
      }
      if (mass) (*mass)[e] = 0;
      changed = true;
    }
    return changed;
  }

  void prefill(State& state, const PrefillInput& in, Selection& selection, MergeRows& rows) const {
    const std::int64_t tokens = rows.tokens;
    const std::size_t heads = selection.keep.size();
    bool drops = false;
    for (const auto& keep : selection.keep) drops = drops || std::ssize(keep) < tokens;
    KVC_CHECK(!drops || in.queries.size(1) >= 1,
              "cam: needs the prompt queries to score the tokens the eviction dropped (the ",
              "prefill gave none)");
    const std::vector<double> acc = merge_prompt_scores(in, heads);
    auto& layer = layer_state(state, in.layer);
    layer.assign(heads, {});
    for (std::size_t s = 0; s < heads; ++s) {
      const std::span<const double> head_acc(acc.data() + s * tokens, tokens);
      std::vector<std::int32_t> kept = selection.keep[s];
      std::sort(kept.begin(), kept.end());  // merge windows follow position order
      merge_head(in.layer, static_cast<int>(s), rows.values_of(static_cast<int>(s)), head_acc, kept,
                 in.positions, &rows.mass[s]);
      for (auto i : selection.keep[s]) layer[s].push_back(head_acc[i]);  // the cache's order
    }
  }

  DecodeKeep decode(State& state, const MergeDecodeInput& in, MergeDecodeRows* rows) const {
    auto& layer = layer_state(state, in.layer);
    const std::size_t heads = in.head_sizes.size();
    layer.resize(heads);
    const bool drops = in.keep && in.keep->has_value();
    KVC_CHECK(!drops || in.probabilities != nullptr, "cam (layer ", in.layer,
              "): needs this step's attention; call cache.observe(layer, q) before step()");
    for (std::size_t s = 0; s < heads; ++s) {
      const int n = in.head_sizes[s];
      auto& acc = layer[s];
      acc.resize(n, 0.0);  // tokens appended since the last step start at 0
      if (in.probabilities) {
        const auto& p = (*in.probabilities)[s];  // [g, n]
        KVC_CHECK(n > 0 && p.size() % n == 0, "cam: attention of storage head ", s, " has ",
                  p.size(), " values for ", n, " tokens");
        for (std::size_t r = 0; r < p.size() / n; ++r)
          for (int j = 0; j < n; ++j) acc[j] += static_cast<float>(f16(p[r * n + j]));
      }
      if (!drops) continue;
      const auto& kept = (**in.keep)[s];
      if (static_cast<int>(kept.size()) < n && rows) {
        auto values =
            make_view(rows->values[s].data(), {static_cast<std::int64_t>(n), rows->head_dim});
        if (merge_head(in.layer, static_cast<int>(s), values, acc, kept, (*in.positions)[s],
                       nullptr))
          rows->changed[s] = 1;
      }
      std::vector<double> gathered;
      for (auto i : kept) gathered.push_back(acc[i]);
      acc.swap(gathered);
    }
    return std::nullopt;
  }

 private:
  static std::vector<std::vector<double>>& layer_state(State& state, int layer) {
    if (static_cast<int>(state.layers.size()) <= layer) state.layers.resize(layer + 1);
    return state.layers[layer];
  }
};
static_assert(MergePolicy<Cam>);

}  // namespace kvc
