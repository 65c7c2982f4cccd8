// Stateless ops example, as an engine would use them on its own buffers: SnapKV-style selection
// (window scores -> pooling -> top-k -> compaction) for one KV head, then KIVI 2-bit packing of the
// survivors' values. No cache object, no hidden state.
//
//   ./example_ops_engine
#include <cstdint>
#include <iostream>
#include <random>
#include <vector>

#include "kvc/ops/ops.hpp"

int main() try {
  const int hq = 4, hkv = 1, tokens = 96, window = 8, d = 64, budget = 40;
  std::mt19937 rng(1);
  std::normal_distribution<float> gaussian;
  std::vector<float> q_window(hq * window * d), keys(hkv * tokens * d), values(hkv * tokens * d);
  for (auto* buffer : {&q_window, &keys, &values})
    for (auto& x : *buffer) x = gaussian(rng);

  std::vector<float> scores(hq * (tokens - window));  // [Hq, T - W]
  kvc::ops::window_scores(kvc::Cpu{}, kvc::make_view(q_window.data(), {hq, window, d}),
                          kvc::make_view(keys.data(), {hkv, tokens, d}),
                          kvc::make_view(scores.data(), {hq, tokens - window}));
  std::vector<float> group_mean(tokens - window, 0.0f);  // [T - W], mean over the GQA group
  for (int h = 0; h < hq; ++h)
    for (int j = 0; j < tokens - window; ++j)
      group_mean[j] += scores[h * (tokens - window) + j] / hq;
  std::vector<float> pooled(group_mean.size());
  kvc::ops::pool1d(kvc::Cpu{}, kvc::make_view(group_mean.data(), {1, tokens - window}),
                   kvc::make_view(pooled.data(), {1, tokens - window}), 7, kvc::ops::Pool::max);
  std::vector<std::int32_t> keep = kvc::ops::top_k(kvc::Cpu{}, pooled, budget - window);
  for (int j = tokens - window; j < tokens; ++j) keep.push_back(j);

  std::vector<std::int32_t> positions(tokens);
  for (int i = 0; i < tokens; ++i) positions[i] = i;
  kvc::ops::compact_rows(kvc::Cpu{}, keep, keys, d);
  kvc::ops::compact_rows(kvc::Cpu{}, keep, values, d);
  kvc::ops::compact_rows(kvc::Cpu{}, keep, positions, 1);

  const int group = 32, bits = 2, n = budget;
  std::vector<std::uint32_t> packed(n * d / kvc::ops::codes_per_word(bits));  // [n, D / 16]
  std::vector<kvc::f16> scale(n * d / group), minimum(n * d / group);         // [n, D / G]
  kvc::ops::quantize_values_per_token(
      kvc::Cpu{}, kvc::make_view(values.data(), {n, d}), bits, group,
      kvc::make_view(packed.data(), {n, d / kvc::ops::codes_per_word(bits)}),
      kvc::make_view(scale.data(), {n, d / group}), kvc::make_view(minimum.data(), {n, d / group}));
  std::cout << "kept " << positions.size() << " of " << tokens << " tokens (first "
            << positions.front() << ", last " << positions.back() << "); values packed into "
            << packed.size() * 4 + (scale.size() + minimum.size()) * 2 << " bytes instead of "
            << n * d * 2 << '\n';
  return 0;
} catch (const kvc::Error& e) {
  std::cerr << "error: " << e.what() << '\n';
  return 1;
}
