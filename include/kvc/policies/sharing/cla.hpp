// kvc/policies/sharing/cla.hpp: Cross-Layer Attention sharing (ALGORITHMS.md section 22) applied
// to a model that was not trained for it, to measure what sharing would cost: layer l attends to
// the K/V of layer s(l) <= l and stores nothing; only the layers with s(l) = l store.
//
//   struct Config : kvc::DefaultConfig { using LayerSharing = kvc::Cla; };
//   kvc::KVCache<Config, kvc::Cpu> cache{shape, kvc::Cla::from_map({0, 0, 2, 2})};  // CLA2 layout
//   // kvc eval: cla(map=0:0:2:2:4:4:6:6)   or   cla(share=2)   or   cla(share=2,pick=groups)
//
// Parameters and defaults: either `map` (s(0), ..., s(L-1); every entry s(l) <= l and a layer
// read by another stores itself: s(s(l)) = s(l); s(0) = 0), or `share` = 2 (the sharing factor:
// ceil(L / share) layers store) with `pick` = similarity (default) or groups. groups: the paper's
// layout, consecutive groups of `share` layers read the group's first layer. similarity: chosen
// from the prompt keys, with sim(i, j) the mean over KV heads and prompt tokens of the cosine of
// layer i's and layer j's key at the same position (post-RoPE keys of one position share their
// rotation): the L - ceil(L / share) layers l >= 1 of highest max_{j<l} sim(l, j) read (ties:
// lower l), each from the storing layer j < l of highest sim(l, j) (ties: the nearer layer).
// Greedy, not an optimum over all maps: a reader's best match may itself be a reader.
// When it acts: the map is fixed at cache construction (map, groups) or at the first compress()
// (similarity: every layer must be prefilled by then). A reading layer's prefill and appended
// tokens are discarded (the layer would have no K/V projection); attend() reads its source layer,
// which must have received this step's token first (engines run layers in order).
// State: none. Deterministic. Combines with any eviction/quant: a reading layer sees its source
// layer's storage, evictions included.
#pragma once

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <span>
#include <string_view>
#include <vector>

#include "kvc/core/error.hpp"
#include "kvc/policies/concepts.hpp"

namespace kvc {

enum class ClaPick { similarity, groups };

struct Cla {
  static constexpr std::string_view kName = "cla";
  static constexpr PolicyKind kKind = PolicyKind::layer_sharing;
  static constexpr int kMaxLayers = 256;

  int share = 2;
  ClaPick pick = ClaPick::similarity;
  int map_size = 0;  // 0: no map, the layout comes from share/pick
  std::array<std::int16_t, kMaxLayers> map{};

  static Cla from_map(std::initializer_list<int> layers) {
    return from_map(std::vector<int>(layers));
  }
  static Cla from_map(const std::vector<int>& layers) {
    KVC_CHECK(!layers.empty() && layers.size() <= kMaxLayers, "cla: map has ", layers.size(),
              " entries; allowed 1 to ", kMaxLayers);
    Cla c;
    c.map_size = static_cast<int>(layers.size());
    for (std::size_t l = 0; l < layers.size(); ++l) {
      KVC_CHECK(layers[l] >= 0 && layers[l] < kMaxLayers, "cla: map entry ", l, " = ", layers[l],
                " out of range [0, ", kMaxLayers, ")");
      c.map[l] = static_cast<std::int16_t>(layers[l]);
    }
    return c;
  }

  void validate() const {
    KVC_CHECK(share >= 1, "cla: share = ", share, " must be >= 1");
    KVC_CHECK(map_size >= 0 && map_size <= kMaxLayers, "cla: map has ", map_size,
              " entries; allowed 0 to ", kMaxLayers);
    for (int l = 0; l < map_size; ++l) {
      const int s = map[l];
      KVC_CHECK(s >= 0 && s < map_size, "cla: layer ", l, " reads layer ", s, ", out of range [0, ",
                map_size, ") (the map has one entry per layer)");
      KVC_CHECK(s <= l, "cla: layer ", l, " reads the later layer ", s,
                "; a layer may read only itself or an earlier layer [0, ", l, "]");
      KVC_CHECK(map[s] == s, "cla: layer ", l, " reads layer ", s, ", which itself reads layer ",
                map[s], "; a layer that is read must store its own K/V (map[", s, "] = ", s, ")");
    }
  }
  bool needs_prompt_keys() const { return map_size == 0 && pick == ClaPick::similarity; }

  SharingPlan plan(const SharingInput& in) const {
    const int layers = in.num_layers;
    SharingPlan plan = no_sharing(layers);
    if (map_size > 0) {
      KVC_CHECK(map_size == layers, "cla: map has ", map_size, " entries for ", layers,
                " layers; give one source layer per layer");
      for (int l = 0; l < layers; ++l) plan.reads[l] = map[l];
      return plan;
    }
    if (pick == ClaPick::groups) {
      for (int l = 0; l < layers; ++l) plan.reads[l] = l - l % share;
      return plan;
    }
    KVC_CHECK(static_cast<int>(in.keys.size()) == layers,
              "cla: share with pick=similarity needs the prompt keys of all ", layers,
              " layers, got ", in.keys.size());
    const auto sim = similarity(in.keys);
    const int storing = (layers + share - 1) / share;
    // A layer's case for reading: its best similarity to any earlier layer.
    std::vector<double> best_below(layers, 0.0);
    std::vector<int> order;
    for (int l = 1; l < layers; ++l) {
      order.push_back(l);
      best_below[l] = sim[l * layers];
      for (int j = 1; j < l; ++j) best_below[l] = std::max(best_below[l], sim[l * layers + j]);
    }
    std::stable_sort(order.begin(), order.end(),
                     [&](int x, int y) { return best_below[x] > best_below[y]; });
    std::vector<char> reader(layers, 0);
    for (int i = 0; i < layers - storing; ++i) reader[order[i]] = 1;
    for (int l = 1; l < layers; ++l) {
      if (!reader[l]) continue;
      int best = -1;
      for (int j = l - 1; j >= 0; --j)
        if (!reader[j] && (best < 0 || sim[l * layers + j] > sim[l * layers + best])) best = j;
      plan.reads[l] = best;  // layer 0 always stores, so best >= 0
    }
    return plan;
  }

  // [L, L] mean cosine between the keys of two layers at the same (KV head, position).
  static std::vector<double> similarity(std::span<const HostView<const float, 3>> keys) {
    const auto layers = static_cast<int>(keys.size());
    std::vector<double> sim(static_cast<std::size_t>(layers) * layers, 1.0);
    for (int i = 0; i < layers; ++i) {
      for (int j = 0; j < i; ++j) {
        const auto& a = keys[i];
        const auto& b = keys[j];
        KVC_CHECK(a.size(0) == b.size(0) && a.size(1) == b.size(1) && a.size(2) == b.size(2),
                  "cla: layers ", j, " and ", i, " hold prompts of different shapes");
        double total = 0;
        std::int64_t count = 0;
        for (std::int64_t h = 0; h < a.size(0); ++h)
          for (std::int64_t t = 0; t < a.size(1); ++t) {
            double dot = 0, na = 0, nb = 0;
            for (std::int64_t c = 0; c < a.size(2); ++c) {
              dot += static_cast<double>(a(h, t, c)) * b(h, t, c);
              na += static_cast<double>(a(h, t, c)) * a(h, t, c);
              nb += static_cast<double>(b(h, t, c)) * b(h, t, c);
            }
            total += na > 0 && nb > 0 ? dot / std::sqrt(na * nb) : 0.0;
            ++count;
          }
        sim[i * layers + j] = sim[j * layers + i] = count > 0 ? total / count : 0.0;
      }
    }
    return sim;
  }

  SharedHead merge(const LayerPair&) const {
    KVC_FAIL("cla pairs no layers for merging; merge() is never called");
  }
};
static_assert(LayerSharingPolicy<Cla>);

}  // namespace kvc
