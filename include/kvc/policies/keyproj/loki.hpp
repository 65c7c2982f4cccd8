// kvc/policies/keyproj/loki.hpp: Loki (ALGORITHMS.md section 21): low-rank keys for sparse
// attention. Each decode step scores the cached keys in the first r PCA directions of their head
// (calibrated offline, `kvc calibrate loki`), and each query head attends exactly to its top-k.
// A retrieval method: nothing is dropped, keys and values stay as the Quant stage holds them.
//
//   const kvc::KeyBasis* pca = kvc::shared_key_basis("loki.safetensors", "loki");
//   struct Config : kvc::DefaultConfig { using KeyProjection = kvc::Loki; };
//   kvc::KVCache<Config, kvc::Cpu> cache{shape, kvc::Loki{.basis = pca, .dims = 0.25, .topk =
//   0.25}};
//   // kvc eval --policy 'loki(basis=loki.safetensors,dims=0.25,topk=0.25)'
//
// Parameters and defaults ([UNVERIFIED] in the paper, section 27): basis (required), dims
// d_f = 0.25 (r = max(1, int(d_f * D)) directions; >= 1: r = int(dims)), variance = 0 (when in
// (0, 1): the released rule instead, r = the max over the layer's heads of the number of leading
// components whose cumulative explained variance is < variance, at least 1), topk k_f = 0.25
// (k = max(1, int(k_f * n)); >= 1: k = int(topk); k >= n: full attention), recent = 0 (the last
// int(recent * n) tokens always attended, on top of the k).
// When it acts: at every attention (decode step); prefill only fixes r per layer.
// Per query head h of KV head s: approx_j = (q_h P_r) . (k_j P_r) (no centring; the scale does
// not change the ranking), top-k (ties: lower row), exact attention over those rows with the
// stored keys (q.k = (qP).(kP) for the full orthonormal P, so no rotated copy is kept). GQA: the
// KV head's components serve each of its query heads (the release repeats them).
// State per layer: r. bytes(): the Quant store's keys and values (uncompressed with none) plus the
// projection P[:, :r] of every KV head of the layer as f32 params (D * r * 4 bytes per head).
// Deterministic.
#pragma once

#include <algorithm>
#include <cstdint>
#include <span>
#include <string_view>
#include <vector>

#include "kvc/ops/select.hpp"
#include "kvc/policies/concepts.hpp"
#include "kvc/policies/keyproj/key_basis.hpp"

namespace kvc {

struct Loki {
  static constexpr std::string_view kName = "loki";
  static constexpr PolicyKind kKind = PolicyKind::key_projection;

  const KeyBasis* basis = nullptr;  // not owned; immutable; outlives every cache using it
  double dims = 0.25;
  double variance = 0.0;
  double topk = 0.25;
  double recent = 0.0;

  void validate() const {
    KVC_CHECK(basis != nullptr,
              "loki: no basis given; Loki needs calibration: run `kvc calibrate loki --data DUMP "
              "--out loki.safetensors` and pass loki(basis=loki.safetensors)");
    basis->validate();
    KVC_CHECK(basis->method == "loki" && basis->group_heads == 1,
              "loki: the basis was written by `kvc calibrate ", basis->method,
              "`; needs one from `kvc calibrate loki`");
    KVC_CHECK(dims > 0, "loki: dims = ", dims, " must be > 0 (a share of D below 1, or a count)");
    KVC_CHECK(variance >= 0 && variance < 1, "loki: variance = ", variance, " must be in [0, 1)");
    KVC_CHECK(topk > 0, "loki: topk = ", topk, " must be > 0 (a share of n below 1, or a count)");
    KVC_CHECK(recent >= 0 && recent < 1, "loki: recent = ", recent, " must be in [0, 1)");
  }

  struct LayerState {
    int layer = 0;
    int rank = 0;
    int head_dim = 0;
    std::vector<int> source_head;  // [S] KV head whose components serve storage head s
  };

  bool active() const { return true; }
  bool needs_prerope() const { return false; }
  bool needs_all_tokens() const { return false; }
  bool owns_keys() const { return false; }
  bool offloads_values(const LayerState&) const { return false; }
  bool supports_decode_eviction() const { return true; }

  // r for one layer (dims, or the released explained-variance rule).
  int rank_for(int layer) const {
    const int d = basis->head_dim;
    if (variance > 0) {
      int r = 1;
      for (int h = 0; h < basis->kv_heads; ++h) {
        const float* e = basis->explained_at(layer, h);
        double cumulative = 0;
        int count = 0;
        for (int j = 0; j < d; ++j) {
          cumulative += e[j];
          if (cumulative < variance) count = j + 1;
        }
        r = std::max(r, count);
      }
      return r;
    }
    const int r = dims >= 1 ? static_cast<int>(dims) : static_cast<int>(dims * d);
    return std::clamp(r, 1, d);
  }

  void prefill(LayerState& st, const KeyProjectionInput& in) const {
    const auto& keys = in.prompt->keys;
    basis->check_shape("loki", in.prompt->num_layers, static_cast<int>(keys.size(0)),
                       static_cast<int>(keys.size(2)));
    st = LayerState{};
    st.layer = in.prompt->layer;
    st.head_dim = static_cast<int>(keys.size(2));
    st.rank = rank_for(st.layer);
    st.source_head = in.selection->source_head;
  }
  void load_head(LayerState&, int, HostView<const float, 2>, std::span<const std::int32_t>) const {}
  void append(LayerState&, int, const float*, const float*, std::int32_t) const {}

  KeyRows select(const LayerState& st, int s, HostView<const float, 2> queries,
                 HostView<const float, 2> keys) const {
    const auto n = static_cast<int>(keys.size(0));
    const int k = topk >= 1 ? static_cast<int>(topk) : std::max(1, static_cast<int>(topk * n));
    const int window = static_cast<int>(recent * n);
    if (k + window >= n) return std::nullopt;
    const int d = st.head_dim, r = st.rank;
    const float* p = basis->at(st.layer, st.source_head.at(s));  // [D, D]
    std::vector<float> kp(static_cast<std::size_t>(n) * r);      // keys in the reduced space
    for (int j = 0; j < n; ++j)
      for (int a = 0; a < r; ++a) {
        float sum = 0;
        for (int c = 0; c < d; ++c) sum += keys(j, c) * p[c * d + a];
        kp[static_cast<std::size_t>(j) * r + a] = sum;
      }
    std::vector<std::vector<std::int32_t>> rows(queries.size(0));
    std::vector<float> qp(r), approx(n - window);
    for (std::int64_t h = 0; h < queries.size(0); ++h) {
      for (int a = 0; a < r; ++a) {
        float sum = 0;
        for (int c = 0; c < d; ++c) sum += queries(h, c) * p[c * d + a];
        qp[a] = sum;
      }
      for (int j = 0; j < n - window; ++j) {
        float sum = 0;
        for (int a = 0; a < r; ++a) sum += qp[a] * kp[static_cast<std::size_t>(j) * r + a];
        approx[j] = sum;
      }
      rows[h] = ops::top_k(Cpu{}, approx, k);
      for (int j = n - window; j < n; ++j) rows[h].push_back(j);
    }
    return rows;
  }
  void keys(const LayerState&, int, std::span<const std::int32_t>, HostView<float, 2>) const {}
  void patch_values(const LayerState&, int, std::span<const std::int32_t>,
                    HostView<float, 2>) const {}
  void gather(LayerState&, int, std::span<const std::int32_t>) const {}
  StorageBytes bytes(const LayerState& st) const {
    StorageBytes b;
    if (st.head_dim > 0)
      b.params = static_cast<std::int64_t>(basis->kv_heads) * st.head_dim * st.rank *
                 static_cast<std::int64_t>(sizeof(float));
    return b;
  }
};
static_assert(KeyProjectionPolicy<Loki>);

}  // namespace kvc
