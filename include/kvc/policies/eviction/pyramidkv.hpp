// kvc/policies/eviction/pyramidkv.hpp: PyramidKV (ALGORITHMS.md section 5): SnapKV's selection
// with a per-layer capacity that shrinks linearly from the first layer to the last, and the budget
// schedules (the paper's exact total, the released integer one, kvpress's real-valued one).
//
//   struct Config : kvc::DefaultConfig { using Eviction = kvc::PyramidKv; };
//   kvc::PyramidKv pyramid{.budget = 512, .window = 8, .kernel = 7, .pool = kvc::ops::Pool::max};
//   kvc::PyramidBudgets b = kvc::pyramid_budgets(512, 8, 32, 20, 1008);  // b.selected[l] = 983-30l
//
// Parameters and defaults (init_pyramidkv): budget C = 2048 tokens per layer and head including the
// window (the nominal average), window W = 32, kernel = 5, pool = avg, beta = 20, gqa = mean
// (as SnapKV), schedule = paper. The KVCache-Factory LongBench scripts use W = 8, kernel = 7,
// max pooling.
// Schedules (each gives, per layer, the number of prefix tokens selected; the W window is kept on
// top of it):
//   paper (default): the arithmetic sequence of the paper with exactly the nominal total L * base:
//     min, max and the branches as `integer` below, but the real step (max - min) / (L - 1);
//     cap_l = floor(max - l * step) plus one token for the layers with the largest fractional
//     parts (ties: lower layer) until the caps sum to L * base (max + min = 2 base, so the real
//     caps already do). No overshoot.
//   integer (reference_compat = true, or schedule = integer; the released code, exactly):
//     base = C - W, min = base / beta, max = 2 base - min (integer division)
//     max >= T - W: max = T - W, min = 2 base - max      (very short prompts)
//     steps = (max - min) / (L - 1) floored, cap_l = max - l * steps
//     T < C: keep everything; T < 2 base: every layer selects base (uniform SnapKV)
//     The floor makes the total overshoot L * base (C=512, W=8, L=32, beta=20: 16576 vs 16128).
//     L = 1 (the released code divides by zero): the single layer selects base.
//   kvpress (PyramidKVPress.get_layer_budget, real-valued): with C playing kvpress's
//     max_capacity_prompt = W + T (1 - r): min = (C - W) / beta, max = 2 (C - W) - min;
//     unless T >= max >= min >= W (and L > 1) every layer keeps round(C - W) tokens in total,
//     otherwise layer l keeps round(max - l (max - min) / (L - 1)) tokens in total. kvpress counts
//     the window inside this total: selected = total - W (at least 0; the window is always kept).
//     A layer whose total is >= T keeps everything.
// When it acts: once, at prefill compression; decode appends without eviction. State: none.
// Scores, pooling, GQA handling, top-k (ties: lower position) and storage order (ascending
// position, then the window) are SnapKV's: both call snapkv_select.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string_view>
#include <vector>

#include "kvc/policies/concepts.hpp"
#include "kvc/policies/eviction/snapkv.hpp"

namespace kvc {

// Per-layer prefix capacities of a schedule; the window W is kept on top of selected[l].
struct PyramidBudgets {
  bool keep_all = false;      // T < C: no layer compresses
  std::vector<int> selected;  // [L] prefix tokens selected per layer (empty when keep_all)
  std::int64_t total() const {
    std::int64_t sum = 0;
    for (int s : selected) sum += s;
    return sum;
  }
};

inline void check_pyramid_arguments(int budget, int window, int layers, int beta) {
  KVC_CHECK(budget > 0, "pyramidkv: budget must be > 0, got ", budget);
  KVC_CHECK(window >= 1 && window < budget, "pyramidkv: window = ", window,
            " must be in [1, budget = ", budget, ")");
  KVC_CHECK(layers >= 1, "pyramidkv: layers must be >= 1, got ", layers);
  KVC_CHECK(beta >= 1, "pyramidkv: beta must be >= 1, got ", beta);
}

// The released code's integer schedule (KVCache-Factory PyramidKVCluster.update_kv).
inline PyramidBudgets pyramid_budgets(int budget, int window, int layers, int beta,
                                      std::int64_t tokens) {
  check_pyramid_arguments(budget, window, layers, beta);
  PyramidBudgets b;
  if (tokens < budget) {
    b.keep_all = true;
    return b;
  }
  const std::int64_t base = budget - window;
  if (tokens < 2 * base || layers == 1) {
    b.selected.assign(layers, static_cast<int>(base));
    return b;
  }
  std::int64_t min_num = base / beta;
  std::int64_t max_num = 2 * base - min_num;
  if (max_num >= tokens - window) {
    max_num = tokens - window;
    min_num = 2 * base - max_num;
  }
  const std::int64_t steps = (max_num - min_num) / (layers - 1);
  for (int l = 0; l < layers; ++l) b.selected.push_back(static_cast<int>(max_num - l * steps));
  return b;
}

// kvpress's real-valued schedule (PyramidKVPress.get_layer_budget), see the header comment.
// A layer whose total reaches T keeps everything: selected = T - W.
inline PyramidBudgets pyramid_budgets_kvpress(int budget, int window, int layers, int beta,
                                              std::int64_t tokens) {
  check_pyramid_arguments(budget, window, layers, beta);
  PyramidBudgets b;
  const double base = budget - window;
  const double min_num = base / beta;
  const double max_num = 2 * base - min_num;
  const bool pyramid = layers > 1 && static_cast<double>(tokens) >= max_num && max_num >= min_num &&
                       min_num >= window;
  const double steps = pyramid ? (max_num - min_num) / (layers - 1) : 0.0;
  for (int l = 0; l < layers; ++l) {
    // std::nearbyint rounds half to even, as Python's round().
    const auto total =
        static_cast<std::int64_t>(std::nearbyint(pyramid ? max_num - l * steps : base));
    const std::int64_t kept = std::min<std::int64_t>(total, tokens);
    b.selected.push_back(static_cast<int>(std::max<std::int64_t>(kept - window, 0)));
  }
  return b;
}

// The paper's schedule: the same branches as the integer one, the real step, and caps rounded by
// largest remainders so that they sum to exactly L * base (see the header comment).
inline PyramidBudgets pyramid_budgets_paper(int budget, int window, int layers, int beta,
                                            std::int64_t tokens) {
  PyramidBudgets b = pyramid_budgets(budget, window, layers, beta, tokens);
  if (b.keep_all || layers == 1 || tokens < 2 * (budget - window)) return b;
  const std::int64_t base = budget - window;
  std::int64_t min_num = base / beta;
  std::int64_t max_num = 2 * base - min_num;
  if (max_num >= tokens - window) {
    max_num = tokens - window;
    min_num = 2 * base - max_num;
  }
  const double step = static_cast<double>(max_num - min_num) / (layers - 1);
  std::vector<double> fraction(layers);
  std::int64_t assigned = 0;
  for (int l = 0; l < layers; ++l) {
    const double cap = static_cast<double>(max_num) - l * step;
    const double whole = std::floor(cap);
    b.selected[l] = static_cast<int>(whole);
    fraction[l] = cap - whole;
    assigned += b.selected[l];
  }
  std::vector<int> order(layers);
  for (int l = 0; l < layers; ++l) order[l] = l;
  std::stable_sort(order.begin(), order.end(),
                   [&](int a, int c) { return fraction[a] > fraction[c]; });
  for (std::int64_t i = 0; assigned < layers * base; ++i, ++assigned) ++b.selected[order[i]];
  return b;
}

enum class PyramidSchedule { paper, integer, kvpress };

struct PyramidKv {
  static constexpr std::string_view kName = "pyramidkv";
  static constexpr PolicyKind kKind = PolicyKind::eviction;

  int budget = 2048;
  int window = 32;
  int kernel = 5;
  ops::Pool pool = ops::Pool::avg;
  int beta = 20;
  GqaMode gqa = GqaMode::mean;
  PyramidSchedule schedule = PyramidSchedule::paper;
  bool reference_compat = false;  // true: the released integer schedule, whatever `schedule` says

  struct State {};

  void validate() const {
    check_pyramid_arguments(budget, window, 1, beta);
    KVC_CHECK(kernel >= 1 && kernel % 2 == 1, "pyramidkv: kernel must be odd and >= 1, got ",
              kernel);
  }
  bool evicts_on_decode() const { return false; }
  bool observes_attention() const { return false; }

  PyramidBudgets budgets(int layers, std::int64_t tokens) const {
    if (reference_compat || schedule == PyramidSchedule::integer)
      return pyramid_budgets(budget, window, layers, beta, tokens);
    if (schedule == PyramidSchedule::kvpress)
      return pyramid_budgets_kvpress(budget, window, layers, beta, tokens);
    return pyramid_budgets_paper(budget, window, layers, beta, tokens);
  }

  Selection prefill(State&, const PrefillInput& in) const {
    const std::int64_t tokens = in.keys.size(1);
    const PyramidBudgets b = budgets(in.num_layers, tokens);
    if (b.keep_all || tokens <= window ||
        b.selected.at(in.layer) >= tokens - window) {  // nothing to drop in this layer
      const int kv_heads = static_cast<int>(in.keys.size(0));
      const int storage_heads =
          gqa == GqaMode::repeat ? static_cast<int>(in.queries.size(0)) : kv_heads;
      Selection all = keep_all(storage_heads, tokens);
      for (int s = 0; s < storage_heads; ++s) all.source_head[s] = s * kv_heads / storage_heads;
      return all;
    }
    return snapkv_select(in, b.selected[in.layer], window, kernel, pool, gqa, "pyramidkv");
  }

  DecodeKeep decode(State&, const DecodeInput&) const { return std::nullopt; }
};
static_assert(EvictionPolicy<PyramidKv>);

}  // namespace kvc
