// kvc/policies/eviction/windowkv.hpp: WindowKV (ALGORITHMS.md section 7): at prefill, keep whole
// windows of w consecutive prompt tokens chosen by their observation-window attention, with
// per-group layer budgets and one selection shared by every head and every layer of a group.
//
//   struct Config : kvc::DefaultConfig { using Eviction = kvc::WindowKv; };
//   kvc::WindowKv wkv{.budget = 512, .task = kvc::WindowKvTask::qa};
//   std::vector<int> g = kvc::windowkv_group_budgets(2048, 32, 8, 14);  // {2926, 2341, 1756, 1170}
//
// Parameters and defaults (optim996/WindowKV): budget C = 2048 (average prefix tokens per layer;
// the suffix is kept on top), shared = 8 layers per group, beta = 14, review_window w = 8,
// suffix_max = 32, suffix_avg = 16, task = other, reference_compat = false.
// task (the label the released code takes from a BERT classifier, given here by the caller):
//   qa    -> window score 'max' (per head the mean of the top w/2 scores inside the window, then
//            the mean over all heads) with a suffix of W = suffix_max tokens;
//   other -> window score 'average' (mean of the scores over the window and all heads), W =
//            suffix_avg.
// Group budgets (integer, as released): G = L / shared, last = C * shared / beta, first = 2C -
// last,
//   step = (first - last) / (G - 1) floored; group k gets first - k * step, the last group `last`;
//   layer l gets the budget of group l / shared. G = 1 (the released code divides by zero): C.
//   L must be a multiple of shared (the released code indexes past its budget list otherwise).
// When it acts: once, at prefill compression, per layer, with len = T - W prefix tokens:
//   len <= budget_l: keep everything.
//   Otherwise the first layer of the group to be compressed scores: s = SnapKV window scores (P1,
//   sum over the W suffix rows, probabilities rounded to f16), the prefix is cut into windows of w
//   tokens (the last may be shorter and competes like a full one), each window gets one score
//   (pooled over all query heads), and windows are dropped lowest score first (ties: the later
//   window goes first):
//     reference_compat = false (default): drop windows until the kept windows hold <= budget_l
//       tokens, counting each window's real length (never keeps more than budget_l).
//     reference_compat = true (the released code): drop ceil((len - budget_l) / w) windows, as if
//       every window were full; if that many windows cover the whole prefix, keep only the suffix.
//   The kept windows (ascending position) + the W suffix tokens are kept by every head; the other
//   layers of the group reuse that selection (their budget is the same).
// State: per request (one per cache), the selection of each group, with the prompt length it was
// made for. The released code keeps it in a class-static variable and, when the group's first layer
// takes the keep-only-the-suffix branch, does not refresh it, so the other layers reuse a previous
// request's indices: that is a bug and is NOT reproduced (here such a group shares the suffix-only
// selection). Storage: ascending positions (the released code concatenates windows in score order;
// attention does not depend on the order). Deterministic.
#pragma once

#include <algorithm>
#include <cstdint>
#include <functional>
#include <span>
#include <string_view>
#include <vector>

#include "kvc/ops/scores.hpp"
#include "kvc/policies/concepts.hpp"

namespace kvc {

// The released code's integer group budgets: [L / shared] prefix tokens per layer of each group.
inline std::vector<int> windowkv_group_budgets(int budget, int layers, int shared, int beta) {
  KVC_CHECK(budget >= 1, "windowkv: budget must be >= 1, got ", budget);
  KVC_CHECK(shared >= 1, "windowkv: shared must be >= 1, got ", shared);
  KVC_CHECK(beta >= 1, "windowkv: beta must be >= 1, got ", beta);
  KVC_CHECK(layers >= shared && layers % shared == 0, "windowkv: num_layers = ", layers,
            " must be a positive multiple of shared = ", shared);
  const int groups = layers / shared;
  if (groups == 1) return {budget};
  const std::int64_t last = static_cast<std::int64_t>(budget) * shared / beta;
  const std::int64_t first = 2LL * budget - last;
  const std::int64_t step = (first - last) / (groups - 1);
  std::vector<int> b;
  for (int k = 0; k < groups - 1; ++k) b.push_back(static_cast<int>(first - k * step));
  b.push_back(static_cast<int>(last));
  return b;
}

// Which windows of w tokens (the last one len mod w tokens when w does not divide len) survive,
// given one score per window: windows are dropped lowest score first (ties: the later window goes
// first); reference_compat = false drops until the kept windows hold <= budget tokens (real
// lengths), true drops ceil((len - budget) / w) windows, or all of them when those cover len.
inline std::vector<bool> windowkv_kept_windows(std::span<const double> scores, std::int64_t len,
                                               int w, int budget, bool reference_compat) {
  const auto windows = static_cast<std::int64_t>(scores.size());
  KVC_CHECK(windows == (len + w - 1) / w, "windowkv: ", windows, " window scores for ", len,
            " tokens in windows of ", w);
  std::vector<std::int64_t> order(windows);  // descending score; ties: earlier window first
  for (std::int64_t i = 0; i < windows; ++i) order[i] = i;
  std::stable_sort(order.begin(), order.end(),
                   [&](std::int64_t a, std::int64_t b) { return scores[a] > scores[b]; });
  std::vector<bool> kept(windows, true);
  if (len <= budget) return kept;
  if (reference_compat) {
    const std::int64_t drop = (len - budget + w - 1) / w;
    if (drop * w >= len) {
      std::fill(kept.begin(), kept.end(), false);
    } else {
      for (std::int64_t k = windows - drop; k < windows; ++k) kept[order[k]] = false;
    }
  } else {
    std::int64_t tokens = len;
    for (std::int64_t k = windows - 1; k >= 0 && tokens > budget; --k) {
      const std::int64_t i = order[k];
      kept[i] = false;
      tokens -= std::min<std::int64_t>((i + 1) * w, len) - i * w;
    }
  }
  return kept;
}

enum class WindowKvTask { qa, other };

struct WindowKv {
  static constexpr std::string_view kName = "windowkv";
  static constexpr PolicyKind kKind = PolicyKind::eviction;

  int budget = 2048;
  int shared = 8;
  int beta = 14;
  int review_window = 8;
  int suffix_max = 32;
  int suffix_avg = 16;
  WindowKvTask task = WindowKvTask::other;
  bool reference_compat = false;

  struct GroupSelection {
    std::int64_t tokens = -1;        // prompt length the selection was made for (-1: none yet)
    std::vector<std::int32_t> keep;  // ascending prompt indices, suffix included
  };
  struct State {
    std::vector<GroupSelection> groups;  // [L / shared]
  };

  void validate() const {
    KVC_CHECK(budget >= 1, "windowkv: budget must be >= 1, got ", budget);
    KVC_CHECK(shared >= 1, "windowkv: shared must be >= 1, got ", shared);
    KVC_CHECK(beta >= 1, "windowkv: beta must be >= 1, got ", beta);
    KVC_CHECK(review_window >= 1, "windowkv: review_window must be >= 1, got ", review_window);
    KVC_CHECK(suffix_max >= 1, "windowkv: suffix_max must be >= 1, got ", suffix_max);
    KVC_CHECK(suffix_avg >= 1, "windowkv: suffix_avg must be >= 1, got ", suffix_avg);
  }
  bool evicts_on_decode() const { return false; }
  bool observes_attention() const { return false; }

  int suffix() const { return task == WindowKvTask::qa ? suffix_max : suffix_avg; }

  // Budget of every layer, [L].
  std::vector<int> layer_budgets(int layers) const {
    const std::vector<int> groups = windowkv_group_budgets(budget, layers, shared, beta);
    std::vector<int> b;
    for (int l = 0; l < layers; ++l) b.push_back(groups[l / shared]);
    return b;
  }

  // One score per window of `w` prefix tokens from the window scores s [Hq, len].
  std::vector<double> window_scores(const std::vector<float>& s, std::int64_t heads,
                                    std::int64_t len) const {
    const int w = review_window;
    const std::int64_t windows = (len + w - 1) / w;
    std::vector<double> scores(windows);
    std::vector<float> values;
    for (std::int64_t i = 0; i < windows; ++i) {
      const std::int64_t begin = i * w, end = std::min<std::int64_t>(begin + w, len);
      double total = 0;
      std::int64_t count = 0;
      for (std::int64_t h = 0; h < heads; ++h) {
        values.assign(s.begin() + h * len + begin, s.begin() + h * len + end);
        std::int64_t take = end - begin;
        if (task == WindowKvTask::qa) {
          take = std::min<std::int64_t>(w / 2, end - begin);
          std::partial_sort(values.begin(), values.begin() + take, values.end(),
                            std::greater<float>());
        }
        for (std::int64_t j = 0; j < take; ++j) total += values[j];
        count += take;
      }
      scores[i] = count > 0 ? total / count : 0.0;
    }
    return scores;
  }

  // The group's selection from this layer's scores (ascending prompt indices, suffix included).
  std::vector<std::int32_t> select(const PrefillInput& in, int layer_budget) const {
    const std::int64_t tokens = in.keys.size(1), heads = in.queries.size(0);
    const int w = review_window, sfx = suffix();
    const std::int64_t len = tokens - sfx;
    KVC_CHECK(in.queries.size(1) >= sfx, "windowkv: needs the last suffix = ", sfx,
              " prompt queries, the prefill gave ", in.queries.size(1));
    std::vector<float> s(static_cast<std::size_t>(heads * len));  // [Hq, len]
    ops::window_scores(Cpu{}, in.queries.slice(1, in.queries.size(1) - sfx, in.queries.size(1)),
                       in.keys, make_view(s.data(), {heads, len}));
    const std::vector<double> scores = window_scores(s, heads, len);
    const std::vector<bool> kept_window =
        windowkv_kept_windows(scores, len, review_window, layer_budget, reference_compat);
    const auto windows = static_cast<std::int64_t>(scores.size());
    std::vector<std::int32_t> keep;
    for (std::int64_t i = 0; i < windows; ++i)
      if (kept_window[i])
        for (std::int64_t j = i * w; j < std::min<std::int64_t>((i + 1) * w, len); ++j)
          keep.push_back(static_cast<std::int32_t>(j));
    for (std::int64_t j = len; j < tokens; ++j) keep.push_back(static_cast<std::int32_t>(j));
    return keep;
  }

  Selection prefill(State& state, const PrefillInput& in) const {
    const int kv_heads = static_cast<int>(in.keys.size(0));
    const std::int64_t tokens = in.keys.size(1);
    const int layer_budget = layer_budgets(in.num_layers).at(in.layer);
    Selection s = keep_all(kv_heads, tokens);
    if (tokens - suffix() <= layer_budget) return s;
    const int group = in.layer / shared;
    if (static_cast<int>(state.groups.size()) < in.num_layers / shared)
      state.groups.resize(in.num_layers / shared);
    GroupSelection& chosen = state.groups[group];
    if (chosen.tokens != tokens) chosen = {tokens, select(in, layer_budget)};
    for (auto& keep : s.keep) keep = chosen.keep;
    return s;
  }

  DecodeKeep decode(State&, const DecodeInput&) const { return std::nullopt; }
};
static_assert(EvictionPolicy<WindowKv>);

}  // namespace kvc
