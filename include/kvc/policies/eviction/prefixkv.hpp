// kvc/policies/eviction/prefixkv.hpp: PrefixKV (ALGORITHMS.md section 6): per-layer forget ratios
// found offline, importance-based prefill eviction shared by all heads of a layer, then one
// deletion per decode step at a fixed in-cache index ("fixed-point elimination").
//
//   kvc::PrefixKv prefix{.ratio = 0.5};                     // uniform forget ratio
//   prefix.set_layer_ratios(ratios);                        // or per layer, from calibration
//   kvc::PrefixKvProfile p = kvc::prefixkv_profile(importance, /*ratio=*/0.5, /*protect=*/5);
//
// Parameters and defaults: ratio = 0.5 (fraction of the prompt FORGOTTEN, used by every layer when
// no per-layer ratios are set; the paper sweeps 0.1-0.9), start_size = 4 (sinks always kept; the
// last prompt token is always kept too), distance = -25. Per-layer ratios (`kvc calibrate
// prefixkv` writes them, the shipped confs/*.json are the same list) live in a fixed-capacity
// array of kMaxLayers entries (policies are trivially copyable); their count must equal the
// model's layers.
// When it acts:
//   prefill: imp[j] = sum over the given prompt queries i of the mean over query heads of the
//     causal softmax probability A[h, i, j] (fp32 softmax rounded to f16, as the released model's
//     attentions are); forget_l = round_half_even(ratio_l * T); candidates [start_size, T - 1)
//     lose their forget_l lowest-importance tokens (kept: top by importance, ties to the lower
//     position); kept = [0, start_size) ++ survivors ++ [T - 1], the same indices for every head.
//     evict_pos_l = T - forget_l + distance (distance > 0: evict_pos_l = distance); below 1 the
//     reference's fallback kept_len / 2 is used.
//   decode (after each forward): num_tok = tokens the layer has seen; forget = trunc(n - num_tok *
//     (1 - ratio_l)); if forget > 0 the single entry at in-cache index evict_pos_l is deleted from
//     every head (an index past the cache, possible only with distance > 0, deletes the entry
//     before the newest).
// With all T prompt queries (kvc eval passes them) imp is the reference's full column sum; with
// fewer, the sum runs over the last Tq rows. State per layer: evict_pos_l and tokens seen.
// Deterministic. Positions: absolute (ALGORITHMS.md section 27 item 8 leaves the reference's
// choice open; PositionMode::reindexed is available).
#pragma once

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <limits>
#include <span>
#include <string_view>
#include <vector>

#include "kvc/core/dtype.hpp"
#include "kvc/ops/select.hpp"
#include "kvc/policies/concepts.hpp"

namespace kvc {

// Head-mean column sums of the causal prefill attention of the given queries: [T]. Query row i of
// in.queries [Hq, Tq, D] has absolute index T - Tq + i and sees keys j <= T - Tq + i.
inline std::vector<float> prefixkv_importance(HostView<const float, 3> queries,  // [Hq, Tq, D]
                                              HostView<const float, 3> keys) {   // [Hkv, T, D]
  const std::int64_t q_heads = queries.size(0), rows = queries.size(1), d = queries.size(2);
  const std::int64_t kv_heads = keys.size(0), tokens = keys.size(1);
  KVC_CHECK(
      rows >= 1 && rows <= tokens && keys.size(2) == d && kv_heads >= 1 && q_heads % kv_heads == 0,
      "prefixkv: needs prompt queries [Hq, Tq, D] with 1 <= Tq <= T = ", tokens,
      " and Hq a multiple of Hkv; got queries [", q_heads, ", ", rows, ", ", d, "], keys [",
      kv_heads, ", ", tokens, ", ", keys.size(2), "]");
  const std::int64_t group = q_heads / kv_heads;
  const double scale = 1.0 / std::sqrt(static_cast<double>(d));
  std::vector<double> importance(tokens, 0.0);
  std::vector<double> logits(tokens);
  std::vector<double> mean(tokens);
  for (std::int64_t i = 0; i < rows; ++i) {
    const std::int64_t last = tokens - rows + i;  // keys [0, last] visible
    std::fill(mean.begin(), mean.begin() + last + 1, 0.0);
    for (std::int64_t h = 0; h < q_heads; ++h) {
      const std::int64_t kvh = h / group;
      double m = -std::numeric_limits<double>::infinity();
      for (std::int64_t j = 0; j <= last; ++j) {
        float dot = 0;
        for (std::int64_t c = 0; c < d; ++c) dot += queries(h, i, c) * keys(kvh, j, c);
        logits[j] = dot * scale;
        m = std::max(m, logits[j]);
      }
      double z = 0;
      for (std::int64_t j = 0; j <= last; ++j) z += (logits[j] = std::exp(logits[j] - m));
      for (std::int64_t j = 0; j <= last; ++j)
        mean[j] += static_cast<float>(f16(static_cast<float>(logits[j] / z)));
    }
    for (std::int64_t j = 0; j <= last; ++j) importance[j] += mean[j] / q_heads;
  }
  return {importance.begin(), importance.end()};
}

// Fixed-point elimination, shared by PrefixKV and Elastic Cache (kvc/policies/merge/
// elastic_cache.hpp): after the prefill each layer deletes one entry per decode step at a fixed
// in-cache index. Per-layer state and the two steps of the rule live here so both methods run the
// same code.
struct FixedPointState {
  std::vector<std::int32_t> evict_pos;  // [L] fixed in-cache deletion index
  std::vector<std::int64_t> seen;       // [L] tokens the layer has seen

  void grow(int layers) {
    if (static_cast<int>(seen.size()) < layers) {
      seen.resize(layers, 0);
      evict_pos.resize(layers, 1);
    }
  }
};

// The deletion index after a prefill of T tokens that forgot `forget` and kept `kept` of them:
// T - forget + distance (distance > 0: distance itself); below 1 the reference's kept / 2.
inline std::int32_t fixed_point_evict_pos(std::int64_t tokens, std::int64_t forget, int distance,
                                          std::size_t kept) {
  auto pos = distance > 0 ? distance : static_cast<std::int32_t>(tokens - forget + distance);
  if (pos < 1) pos = static_cast<std::int32_t>(kept) / 2;
  return pos;
}

// One decode step of layer `layer`: seen += 1; forget = trunc(n - seen * (1 - ratio)); forget >= 1
// (and n >= 2) deletes in-cache index evict_pos from every head (an index past the cache: the one
// before the newest). `who` names the method in the error for heads of unequal length.
inline DecodeKeep fixed_point_decode(FixedPointState& state, int layer, int layers,
                                     std::span<const int> head_sizes,  // [S]
                                     double ratio, std::string_view who) {
  state.grow(layers);
  const std::int64_t seen = ++state.seen[layer];
  if (head_sizes.empty()) return std::nullopt;
  const int n = head_sizes[0];
  const auto forget =
      static_cast<std::int64_t>(static_cast<double>(n) - static_cast<double>(seen) * (1.0 - ratio));
  if (forget <= 0 || n < 2) return std::nullopt;
  std::int32_t pos = state.evict_pos[layer];
  if (pos >= n) pos = n - 2;
  std::vector<std::vector<std::int32_t>> kept(head_sizes.size());
  for (std::size_t h = 0; h < kept.size(); ++h) {
    KVC_CHECK(head_sizes[h] == n, who, ": heads of layer ", layer, " hold different token counts (",
              n, " and ", head_sizes[h], ")");
    for (int i = 0; i < n; ++i)
      if (i != pos) kept[h].push_back(i);
  }
  return kept;
}

// Result of the offline search (ALGORITHMS.md section 6, OFFLINE).
struct PrefixKvProfile {
  std::vector<std::int64_t> forget;  // [L] tokens forgotten per layer, sum == round(target)
  std::vector<double> ratios;        // [L] forget / T: what the policy's per-layer ratios take
  double target = 0;                 // ratio * L * T
  double p = 0;                      // the cumulative-mass level the search stopped at
  int iterations = 0;
  bool converged = false;  // |sum - target| < tolerance reached before max_iterations
};

// Per layer: sort imp descending, normalise to sum 1, cumulative sum; binary search p in (0, 1)
// for counts_l = max(0, T - (first index with cdf >= p) - 1 - protect) summing to the target
// within `tolerance` tokens, at most max_iterations halvings; then rescale the counts
// proportionally to the target. The reference truncates each rescaled count (its sum may fall
// short by up to L - 1); by default kvc hands the remainder to the largest fractional parts (ties:
// lower layer) so that the sum equals round(target); reference_compat = true truncates. A count
// never exceeds T - protect.
inline PrefixKvProfile prefixkv_profile(const std::vector<std::vector<float>>& importance,
                                        double ratio, int protect, double tolerance = 5.0,
                                        int max_iterations = 100, bool reference_compat = false) {
  KVC_CHECK(!importance.empty(), "prefixkv calibration: needs at least one layer");
  KVC_CHECK(ratio >= 0 && ratio <= 1, "prefixkv calibration: ratio must be in [0, 1], got ", ratio);
  KVC_CHECK(protect >= 0, "prefixkv calibration: protect must be >= 0, got ", protect);
  KVC_CHECK(tolerance > 0, "prefixkv calibration: tolerance must be > 0, got ", tolerance);
  KVC_CHECK(max_iterations >= 1, "prefixkv calibration: max_iterations must be >= 1, got ",
            max_iterations);
  const auto layers = static_cast<int>(importance.size());
  const auto tokens = static_cast<std::int64_t>(importance[0].size());
  std::vector<std::vector<double>> cdf(layers);
  for (int l = 0; l < layers; ++l) {
    KVC_CHECK(static_cast<std::int64_t>(importance[l].size()) == tokens,
              "prefixkv calibration: every layer must have the same T; layer 0 has ", tokens,
              ", layer ", l, " has ", importance[l].size());
    std::vector<double> sorted(importance[l].begin(), importance[l].end());
    std::sort(sorted.begin(), sorted.end(), std::greater<>());
    double sum = 0;
    for (double x : sorted) {
      KVC_CHECK(std::isfinite(x) && x >= 0, "prefixkv calibration: layer ", l,
                " has a negative or non-finite importance ", x);
      sum += x;
    }
    KVC_CHECK(sum > 0, "prefixkv calibration: layer ", l, " has zero total importance");
    double running = 0;
    for (double& x : sorted) x = (running += x / sum);
    cdf[l] = std::move(sorted);
  }
  auto counts_at = [&](double p) {
    std::vector<std::int64_t> counts(layers);
    for (int l = 0; l < layers; ++l) {
      const auto idx = std::lower_bound(cdf[l].begin(), cdf[l].end(), p) - cdf[l].begin();
      counts[l] = std::max<std::int64_t>(0, tokens - (idx + 1) - protect);
    }
    return counts;
  };
  auto total = [](const std::vector<std::int64_t>& c) {
    std::int64_t s = 0;
    for (auto x : c) s += x;
    return s;
  };
  PrefixKvProfile out;
  out.target = ratio * static_cast<double>(tokens) * layers;
  double left = 0, right = 1, mid = 0;
  while (left < right && out.iterations < max_iterations) {
    ++out.iterations;
    mid = (left + right) / 2.0;
    const auto sum = static_cast<double>(total(counts_at(mid)));
    if (std::abs(sum - out.target) < tolerance) {
      out.converged = true;
      break;
    }
    if (sum < out.target)
      right = mid;
    else
      left = mid;
  }
  out.p = mid;
  const std::vector<std::int64_t> counts = counts_at(mid);
  const std::int64_t sum = total(counts);
  const std::int64_t cap = std::max<std::int64_t>(0, tokens - protect);
  out.forget.assign(layers, 0);
  if (sum > 0) {
    std::vector<double> exact(layers);
    for (int l = 0; l < layers; ++l) {
      exact[l] = static_cast<double>(counts[l]) * out.target / static_cast<double>(sum);
      out.forget[l] = std::min<std::int64_t>(cap, static_cast<std::int64_t>(exact[l]));
    }
    if (!reference_compat) {
      auto goal = static_cast<std::int64_t>(std::nearbyint(out.target));
      std::vector<int> order(layers);
      for (int l = 0; l < layers; ++l) order[l] = l;
      std::stable_sort(order.begin(), order.end(), [&](int a, int b) {
        return exact[a] - std::floor(exact[a]) > exact[b] - std::floor(exact[b]);
      });
      for (int round = 0; round < 2 && total(out.forget) < goal; ++round)
        for (int l : order)
          if (total(out.forget) < goal && out.forget[l] < cap) ++out.forget[l];
    }
  }
  for (int l = 0; l < layers; ++l)
    out.ratios.push_back(static_cast<double>(out.forget[l]) / static_cast<double>(tokens));
  return out;
}

struct PrefixKv {
  static constexpr std::string_view kName = "prefixkv";
  static constexpr PolicyKind kKind = PolicyKind::eviction;
  static constexpr int kMaxLayers = 1024;

  double ratio = 0.5;  // forget ratio of every layer when layer_count == 0
  int start_size = 4;
  int distance = -25;
  int layer_count = 0;  // per-layer ratios set (0: the uniform ratio)
  std::array<float, kMaxLayers> layer_ratios{};

  using State = FixedPointState;

  void set_layer_ratios(std::span<const double> ratios) {
    KVC_CHECK(!ratios.empty() && ratios.size() <= static_cast<std::size_t>(kMaxLayers),
              "prefixkv: ", ratios.size(), " per-layer ratios; allowed 1 to ", kMaxLayers);
    for (std::size_t l = 0; l < ratios.size(); ++l) {
      KVC_CHECK(std::isfinite(ratios[l]) && ratios[l] >= 0 && ratios[l] <= 1, "prefixkv: ratio of ",
                "layer ", l, " = ", ratios[l], " must be in [0, 1]");
      layer_ratios[l] = static_cast<float>(ratios[l]);
    }
    layer_count = static_cast<int>(ratios.size());
  }

  void validate() const {
    KVC_CHECK(ratio >= 0 && ratio <= 1, "prefixkv: ratio must be in [0, 1], got ", ratio);
    KVC_CHECK(start_size >= 0, "prefixkv: start_size must be >= 0, got ", start_size);
    KVC_CHECK(layer_count >= 0 && layer_count <= kMaxLayers, "prefixkv: ", layer_count,
              " per-layer ratios; allowed 0 to ", kMaxLayers);
  }
  bool evicts_on_decode() const { return true; }
  bool observes_attention() const { return false; }

  double layer_ratio(int layer, int layers) const {
    if (layer_count == 0) return ratio;
    KVC_CHECK(layer_count == layers, "prefixkv: ", layer_count,
              " per-layer ratios but the model has ", layers, " layers");
    return layer_ratios[layer];
  }

  // Prefill keep set from the importance of T tokens (the same for every head) and the deletion
  // index evict_pos for decode.
  std::vector<std::int32_t> keep(std::span<const float> importance, double layer_ratio,
                                 std::int32_t* evict_pos = nullptr) const {
    const auto tokens = static_cast<int>(importance.size());
    std::vector<std::int32_t> kept;
    const int start = std::min(start_size, tokens);
    for (int i = 0; i < start; ++i) kept.push_back(i);
    const auto forget = static_cast<int>(std::nearbyint(layer_ratio * tokens));
    const int candidates = std::max(0, tokens - 1 - start);
    const int survivors = std::max(0, candidates - forget);
    if (candidates > 0) {
      const auto top = ops::top_k(Cpu{}, importance.subspan(start, candidates), survivors);
      for (auto i : top) kept.push_back(start + i);
    }
    if (tokens > start) kept.push_back(tokens - 1);
    if (evict_pos) *evict_pos = fixed_point_evict_pos(tokens, forget, distance, kept.size());
    return kept;
  }

  Selection prefill(State& state, const PrefillInput& in) const {
    const int heads = static_cast<int>(in.keys.size(0));
    const auto tokens = static_cast<int>(in.keys.size(1));
    state.grow(in.num_layers);
    state.seen[in.layer] = tokens;
    std::vector<std::int32_t> kept;
    if (tokens == 0) {
      state.evict_pos[in.layer] = 1;
    } else {
      KVC_CHECK(in.queries.size(1) >= 1,
                "prefixkv: needs the prompt queries to score the prompt (the prefill gave none)");
      const std::vector<float> importance = prefixkv_importance(in.queries, in.keys);
      kept = keep(importance, layer_ratio(in.layer, in.num_layers), &state.evict_pos[in.layer]);
    }
    Selection s;
    for (int h = 0; h < heads; ++h) {
      s.source_head.push_back(h);
      s.keep.push_back(kept);
    }
    return s;
  }

  DecodeKeep decode(State& state, const DecodeInput& in) const {
    const double r = layer_ratio(in.layer, in.num_layers);  // checks the layer count first
    return fixed_point_decode(state, in.layer, in.num_layers, in.head_sizes, r, kName);
  }
};
static_assert(EvictionPolicy<PrefixKv>);

}  // namespace kvc
