// kvc/policies/keyproj/think.hpp: ThinK (ALGORITHMS.md section 19): query-driven key-channel
// pruning. After the eviction stage, each storage head keeps only the key channels with the
// largest q^2 * k^2 score for its older tokens; the most recent tokens and decode tokens keep all
// channels. Values are untouched (the Quant stage holds them).
//
//   struct Config : kvc::DefaultConfig { using Eviction = kvc::SnapKv; using KeyProjection =
//   kvc::Think; }; kvc::KVCache<Config, kvc::Cpu> cache{shape, kvc::SnapKv{.budget = 256},
//   kvc::Think{.ratio = 0.4}};
//   // kvc eval --policy 'snapkv(budget=128)+think(ratio=0.5)'
//
// Parameters and defaults (ThinK_flash, KVCache-Factory --pruning_ratio): ratio lambda = 0.4
// (int(D * ratio) channels pruned per head; 0 <= ratio < 1), recent = 32 (the last tokens of the
// compressed cache kept at full width), window = 32 (prompt queries scored; the release hard-codes
// 32, independent of the eviction's window).
// When it acts: once, at prefill compression, on what the eviction kept; decode tokens are stored
// at full width. Per storage head s serving query heads G_s:
//   qn[c] = mean over G_s and the last `window` prompt queries of q[c]^2 (the release uses one
//           query head per head, its heads repeated; with GQA the group's mean, as kvpress)
//   kn[c] = mean over all n kept keys (recent ones included) of k[c]^2
//   prune the int(D * ratio) channels with the smallest qn * kn (ties: the higher channel is
//   pruned, i.e. kept = top-(D - pruned) with ties to the lower channel); the first n - recent
//   tokens in store order keep only the other channels (none when n <= recent).
// Attention: q . k over the kept channels for pruned tokens (exactly q . k with the pruned
// channels zero), full q . k for the others.
// State per storage head: kept channel list, pruned rows [m, D - pruned] f16, full rows [n - m, D]
// f16. bytes(): payload = 2 * (m * (D - pruned) + (n - m) * D); params = the channel mask,
// ceil(D / 32) uint32 words per head. Decode eviction (H2O, StreamingLLM) removes rows from either
// part. Deterministic.
#pragma once

#include <cstdint>
#include <span>
#include <string_view>
#include <vector>

#include "kvc/core/dtype.hpp"
#include "kvc/ops/select.hpp"
#include "kvc/policies/concepts.hpp"
#include "kvc/policies/quant/dense.hpp"

namespace kvc {

struct Think {
  static constexpr std::string_view kName = "think";
  static constexpr PolicyKind kKind = PolicyKind::key_projection;

  double ratio = 0.4;
  int recent = 32;
  int window = 32;

  void validate() const {
    KVC_CHECK(ratio >= 0.0 && ratio < 1.0, "think: ratio = ", ratio, " must be in [0, 1)");
    KVC_CHECK(recent >= 0, "think: recent = ", recent, " must be >= 0");
    KVC_CHECK(window >= 1, "think: window = ", window, " must be >= 1");
  }
  int pruned_channels(int head_dim) const { return static_cast<int>(head_dim * ratio); }

  struct Head {
    std::vector<std::int32_t> kept;  // ascending kept channels [D - pruned]
    HalfRows pruned;                 // [m, D - pruned], the older tokens
    HalfRows full;                   // [n - m, D], the recent and decode tokens
  };
  struct LayerState {
    int head_dim = 0;
    std::vector<std::vector<float>> query_norms;  // [S][D] qn, until the head is loaded
    std::vector<Head> heads;
  };

  bool active() const { return true; }
  bool needs_prerope() const { return false; }
  bool needs_all_tokens() const { return false; }
  bool owns_keys() const { return true; }
  bool offloads_values(const LayerState&) const { return false; }
  bool supports_decode_eviction() const { return true; }

  void prefill(LayerState& st, const KeyProjectionInput& in) const {
    const auto& q = in.prompt->queries;  // [Hq, Tq, D]
    const int d = static_cast<int>(in.prompt->keys.size(2));
    const auto storage = static_cast<int>(in.selection->keep.size());
    KVC_CHECK(q.size(1) >= window, "think: needs the last window = ", window,
              " prompt queries, the prefill gave ", q.size(1));
    st = LayerState{};
    st.head_dim = d;
    st.heads.assign(storage, Head{});
    st.query_norms.assign(storage, std::vector<float>(d, 0.0f));
    const int group = static_cast<int>(q.size(0)) / storage;
    for (int s = 0; s < storage; ++s)
      for (int c = 0; c < d; ++c) {
        double sum = 0;
        for (int h = s * group; h < (s + 1) * group; ++h)
          for (std::int64_t t = q.size(1) - window; t < q.size(1); ++t)
            sum += double(q(h, t, c)) * q(h, t, c);
        st.query_norms[s][c] = static_cast<float>(sum / (static_cast<double>(group) * window));
      }
  }

  // The channels kept for one head from its query and key norms (exposed for tests).
  std::vector<std::int32_t> kept_channels(std::span<const float> scores) const {
    const int d = static_cast<int>(scores.size());
    return ops::top_k(Cpu{}, scores, d - pruned_channels(d));
  }

  void load_head(LayerState& st, int s, HostView<const float, 2> keys,
                 std::span<const std::int32_t>) const {
    Head& head = st.heads.at(s);
    const std::int64_t n = keys.size(0);
    const int d = st.head_dim;
    std::vector<float> score(d);
    for (int c = 0; c < d; ++c) {
      double kn = 0;
      for (std::int64_t t = 0; t < n; ++t) kn += double(keys(t, c)) * keys(t, c);
      score[c] = st.query_norms[s][c] * static_cast<float>(n > 0 ? kn / n : 0.0);
    }
    head.kept = kept_channels(score);
    const std::int64_t m = n > recent ? n - recent : 0;
    head.pruned.reset(static_cast<int>(head.kept.size()));
    head.full.reset(d);
    std::vector<float> row(head.kept.size());
    for (std::int64_t t = 0; t < m; ++t) {
      for (std::size_t j = 0; j < head.kept.size(); ++j) row[j] = keys(t, head.kept[j]);
      head.pruned.push(row.data());
    }
    head.full.push_rows(keys, m, n);
  }

  void append(LayerState& st, int s, const float* key, const float*, std::int32_t) const {
    st.heads.at(s).full.push(key);
  }
  KeyRows select(const LayerState&, int, HostView<const float, 2>, HostView<const float, 2>) const {
    return std::nullopt;
  }
  void keys(const LayerState& st, int s, std::span<const std::int32_t> rows,
            HostView<float, 2> out) const {
    const Head& head = st.heads.at(s);
    const int m = head.pruned.rows();
    for (std::size_t i = 0; i < rows.size(); ++i) {
      const int r = rows[i];
      if (r < m) {
        for (int c = 0; c < st.head_dim; ++c) out(i, c) = 0.0f;
        for (std::size_t j = 0; j < head.kept.size(); ++j)
          out(i, head.kept[j]) = head.pruned.at(r, static_cast<int>(j));
      } else {
        for (int c = 0; c < st.head_dim; ++c) out(i, c) = head.full.at(r - m, c);
      }
    }
  }
  void patch_values(const LayerState&, int, std::span<const std::int32_t>,
                    HostView<float, 2>) const {}
  void gather(LayerState& st, int s, std::span<const std::int32_t> keep) const {
    Head& head = st.heads.at(s);
    const int m = head.pruned.rows();
    std::vector<std::int32_t> old_part, new_part;
    for (const std::int32_t r : keep) (r < m ? old_part : new_part).push_back(r < m ? r : r - m);
    head.pruned.gather(old_part);
    head.full.gather(new_part);
  }
  StorageBytes bytes(const LayerState& st) const {
    StorageBytes b;
    for (const Head& head : st.heads) {
      b.payload += head.pruned.bytes() + head.full.bytes();
      b.params += (st.head_dim + 31) / 32 * static_cast<std::int64_t>(sizeof(std::uint32_t));
    }
    return b;
  }
};
static_assert(KeyProjectionPolicy<Think>);

}  // namespace kvc
