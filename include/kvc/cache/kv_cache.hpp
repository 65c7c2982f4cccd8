// kvc/cache/kv_cache.hpp: KVCache<Config, Backend>, the cache that owns storage per (layer, storage
// head) and runs the compression pipeline of DESIGN.md section 5.
//
//   struct Config : kvc::DefaultConfig { using Eviction = kvc::SnapKv; using Quant = kvc::Kivi; };
//   kvc::KVCache<Config, kvc::Cpu> cache{kvc::CacheShape{8, 8, 2, 64}, kvc::SnapKv{.budget = 256},
//                                        kvc::Kivi{.key_bits = 2, .value_bits = 2}};
//   cache.prefill(layer, k, v, q); cache.compress(layer);        // end of prompt
//   cache.append(layer, k_t, v_t); cache.attend(layer, q_t, out); cache.observe(layer, q_t);
//   cache.step(layer);                                           // decode-time policies act
//
// Storage: per (layer, storage head) a ragged list of tokens, each with its original absolute
// position (int32). Storage head s serves query heads [s*g', (s+1)*g') with g' = Hq / S; normally
// S = Hkv. Position modes: absolute (keys keep their original rotation; default) or reindexed
// (kept keys and the query are re-rotated so that positions are in-cache indices, StreamingLLM's
// pos-shift; uses the cache's RoPE settings).
// Pipeline at compress(): Eviction selects -> Merge folds (rewrites the kept rows from the dropped
// ones, or selects by itself when alone) -> LayerSharing -> KeyProjection -> Quant stores. After
// each decode step: Eviction.decode, Merge.decode (folds what it dropped; rewritten heads are
// re-loaded into their stores), then the Quant flushes.
// LayerSharing (kvc/cache/shared_layers.hpp) fixes a plan over layers: a CLA reader stores nothing
// and attends to its source layer; a MiniCache pair is merged when its upper layer compresses
// (the lower layer is kept whole until then), with no eviction, merge or key projection.
#pragma once

#include <algorithm>
#include <cstdint>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

#include "kvc/cache/key_projection.hpp"
#include "kvc/cache/shared_layers.hpp"
#include "kvc/cache/staging.hpp"
#include "kvc/core/backend.hpp"
#include "kvc/core/error.hpp"
#include "kvc/ops/attention.hpp"
#include "kvc/ops/rope.hpp"
#include "kvc/policies/concepts.hpp"
#include "kvc/policies/quant/dense.hpp"

namespace kvc {

struct DefaultConfig {
  using Eviction = NoEviction;
  using Merge = NoMerge;
  using Quant = NoQuant;
  using KeyProjection = NoKeyProjection;
  using LayerSharing = NoLayerSharing;
};

struct CacheShape {
  int layers = 1;
  int q_heads = 1;
  int kv_heads = 1;
  int head_dim = 64;
  void validate() const {
    KVC_CHECK(layers >= 1, "cache shape: layers must be >= 1, got ", layers);
    KVC_CHECK(kv_heads >= 1 && q_heads >= kv_heads && q_heads % kv_heads == 0,
              "cache shape: q_heads = ", q_heads,
              " must be a positive multiple of kv_heads = ", kv_heads);
    KVC_CHECK(head_dim >= 1, "cache shape: head_dim must be >= 1, got ", head_dim);
  }
};

enum class PositionMode { absolute, reindexed };

struct CacheOptions {
  PositionMode positions = PositionMode::absolute;
  ops::Rope rope{};  // used by PositionMode::reindexed
  ops::AttentionOptions attention{};
};

// The name a policy reports in messages: a runtime name() where the policy has one (the variant
// policies of the registry), its kName otherwise.
template <class P>
std::string policy_name(const P& p) {
  if constexpr (requires { p.name(); })
    return std::string(p.name());
  else
    return std::string(P::kName);
}

// Dense contents of one storage head (dequantized), for engines with their own attention kernel.
struct HeadContents {
  int source_head = 0;
  std::vector<std::int32_t> positions;  // [n]
  std::vector<float> keys;              // [n, D]
  std::vector<float> values;            // [n, D]
};

template <class Config, class Backend>
class KVCache;

template <class Config>
class KVCache<Config, Cpu> {
 public:
  using Eviction = typename Config::Eviction;
  using Merge = typename Config::Merge;
  using Quant = typename Config::Quant;
  using KeyProjection = typename Config::KeyProjection;
  using LayerSharing = typename Config::LayerSharing;
  static_assert(EvictionPolicy<Eviction>, "Config::Eviction must satisfy kvc::EvictionPolicy");
  static_assert(MergePolicy<Merge>, "Config::Merge must satisfy kvc::MergePolicy");
  static_assert(QuantPolicy<Quant>, "Config::Quant must satisfy kvc::QuantPolicy");
  static_assert(KeyProjectionPolicy<KeyProjection>,
                "Config::KeyProjection must satisfy kvc::KeyProjectionPolicy");
  static_assert(LayerSharingPolicy<LayerSharing>,
                "Config::LayerSharing must satisfy kvc::LayerSharingPolicy");

  // Policies and CacheOptions may be given in any order; each goes to the slot of its type.
  template <class... Args>
  explicit KVCache(CacheShape shape, const Args&... args) : shape_(shape) {
    (assign(args), ...);
    shape_.validate();
    eviction_.validate();
    merge_.validate();
    quant_.validate();
    key_projection_.validate();
    layer_sharing_.validate();
    KVC_CHECK(!(eviction_.evicts_on_decode() && !quant_.supports_decode_eviction()),
              "cannot combine ", policy_name(eviction_), " (evicts tokens during decode) with ",
              policy_name(quant_),
              " (quantized groups span several tokens, so single tokens cannot be removed)");
    check_merge_combination();
    check_key_projection(key_projection_, eviction_, merge_, quant_,
                         options_.positions == PositionMode::reindexed);
    layers_.resize(shape_.layers);
    init_layer_sharing();  // layer sharing: combinations, and the plan when it needs no data
  }

  // ---- key projection (kvc/cache/key_projection.hpp) ----
  const KeyProjection& key_projection() const { return key_projection_; }
  const typename KeyProjection::LayerState& key_projection_state(int layer) const {
    return layer_data(layer).projection;
  }
  // Pre-RoPE keys of the tokens of the matching prefill() call, for key projections that decompose
  // them (ShadowKV); give them after every prefill chunk of the layer, or never.
  void prefill_prerope(int layer, HostView<const float, 3> k_prerope) {  // [Hkv, T, D]
    LayerData& data = layer_data(layer);
    KVC_CHECK(!data.compressed, "prefill_prerope(layer ", layer, "): the layer is compressed");
    check_heads("prefill pre-RoPE keys", k_prerope, shape_.kv_heads);
    KVC_CHECK(data.staged_prerope_tokens + k_prerope.size(1) == data.staged_tokens,
              "prefill_prerope(layer ", layer,
              "): ", data.staged_prerope_tokens + k_prerope.size(1), " pre-RoPE keys for ",
              data.staged_tokens,
              " staged tokens; call it after each prefill() with the same tokens");
    append_heads(data.staged_prerope, data.staged_prerope_tokens, k_prerope);
    data.staged_prerope_tokens += k_prerope.size(1);
  }
  // ---- end key projection ----

  const CacheShape& shape() const { return shape_; }
  const CacheOptions& options() const { return options_; }
  const Eviction& eviction() const { return eviction_; }
  const Merge& merge() const { return merge_; }
  const Quant& quant() const { return quant_; }

  // Stages prompt tokens of one layer (several calls append, as in chunked prefill).
  void prefill(int layer, HostView<const float, 3> k,  // [Hkv, T, D]
               HostView<const float, 3> v,             // [Hkv, T, D]
               HostView<const float, 3> q) {           // [Hq, Tq, D], Tq may be 0
    prefill(layer, k, v, q, HostView<const float, 2>{});
  }
  // The same, with external per-token scores for policies that take them (Locret).
  void prefill(int layer, HostView<const float, 3> k, HostView<const float, 3> v,
               HostView<const float, 3> q,
               HostView<const float, 2> token_scores) {  // [Hkv, T], or empty
    LayerData& data = layer_data(layer);
    KVC_CHECK(!data.compressed, "prefill(layer ", layer,
              "): the layer is already compressed; prefill comes before compress()");
    check_heads("prefill keys", k, shape_.kv_heads);
    check_heads("prefill values", v, shape_.kv_heads);
    KVC_CHECK(k.size(1) == v.size(1), "prefill(layer ", layer, "): keys have ", k.size(1),
              " tokens but values have ", v.size(1));
    if (q.size(1) > 0) check_heads("prefill queries", q, shape_.q_heads);
    const bool has_scores = token_scores.size(1) > 0;
    KVC_CHECK(!has_scores ||
                  (token_scores.size(0) == shape_.kv_heads && token_scores.size(1) == k.size(1)),
              "prefill(layer ", layer, "): token scores must be [", shape_.kv_heads, ", ",
              k.size(1), "], got [", token_scores.size(0), ", ", token_scores.size(1), "]");
    KVC_CHECK(data.staged_tokens == 0 || has_scores == !data.staged_scores.empty(),
              "prefill(layer ", layer,
              "): give token scores with every prefill chunk or with none");
    if (has_scores) {
      std::vector<float> merged(static_cast<std::size_t>(shape_.kv_heads) *
                                (data.staged_tokens + k.size(1)));
      for (int h = 0; h < shape_.kv_heads; ++h) {
        for (std::int64_t t = 0; t < data.staged_tokens; ++t)
          merged[h * (data.staged_tokens + k.size(1)) + t] =
              data.staged_scores[h * data.staged_tokens + t];
        for (std::int64_t t = 0; t < k.size(1); ++t)
          merged[h * (data.staged_tokens + k.size(1)) + data.staged_tokens + t] =
              token_scores(h, t);
      }
      data.staged_scores.swap(merged);
    }
    append_heads(data.staged_keys, data.staged_tokens, k);
    append_heads(data.staged_values, data.staged_tokens, v);
    for (std::int64_t t = 0; t < k.size(1); ++t)
      data.staged_positions.push_back(data.next_position++);
    data.staged_tokens += k.size(1);
    if (q.size(1) > 0) {
      append_heads(data.staged_queries, data.staged_query_count, q);
      data.staged_query_count += q.size(1);
    }
  }

  // Runs the prefill pipeline over the staged tokens and stores the result.
  void compress(int layer) {
    LayerData& data = layer_data(layer);
    KVC_CHECK(!data.compressed, "compress(layer ", layer, "): already compressed");
    // Layer sharing: a reading layer stores nothing; a merged pair stores through its own path.
    if (compress_shared_layer(layer, data)) return;
    const std::int64_t tokens = data.staged_tokens;
    const int d = shape_.head_dim;
    PrefillInput in;
    in.layer = layer;
    in.num_layers = shape_.layers;
    in.keys =
        make_view(static_cast<const float*>(data.staged_keys.data()), {shape_.kv_heads, tokens, d});
    in.values = make_view(static_cast<const float*>(data.staged_values.data()),
                          {shape_.kv_heads, tokens, d});
    in.queries = make_view(static_cast<const float*>(data.staged_queries.data()),
                           {shape_.q_heads, data.staged_query_count, d});
    in.positions = data.staged_positions;
    if (!data.staged_scores.empty())
      in.token_scores = make_view(static_cast<const float*>(data.staged_scores.data()),
                                  {shape_.kv_heads, tokens});
    Selection selection = eviction_.prefill(eviction_state_, in);
    check_selection(layer, selection, tokens);
    // Merge slot: folds what the eviction dropped into the rows that stay (or, alone, selects).
    MergeRows merged;
    if (merge_.active()) {
      merged = merge_rows(in, selection);
      merge_.prefill(merge_state_, in, selection, merged);
      check_selection(layer, selection, tokens);
    }

    const int storage_heads = static_cast<int>(selection.keep.size());
    data.heads.assign(storage_heads, typename Quant::HeadStore{});
    // A Quant that keeps evicted tokens (MiKV) receives every prompt token plus the kept set.
    const bool ranked = quant_keeps_evicted();
    KVC_CHECK(!(ranked && selection.keep_order_given), policy_name(eviction_),
              " stores its tokens in score order (reference_compat), which ", policy_name(quant_),
              " cannot combine with: it ranks tokens by position");
    std::vector<std::int32_t> every_token(ranked ? tokens : 0);
    for (std::size_t i = 0; i < every_token.size(); ++i)
      every_token[i] = static_cast<std::int32_t>(i);
    data.source_head = selection.source_head;
    // KeyProjection slot: layer-wide decomposition first, then each head's stored rows (below).
    const bool projecting = key_projection_.active();
    if (projecting) {
      KeyProjectionInput kp_in;
      kp_in.prompt = &in;
      kp_in.selection = &selection;
      KVC_CHECK(data.staged_prerope_tokens == 0 || data.staged_prerope_tokens == tokens,
                "compress(layer ", layer, "): pre-RoPE keys cover ", data.staged_prerope_tokens,
                " of ", tokens, " staged tokens");
      if (data.staged_prerope_tokens > 0)
        kp_in.keys_prerope = make_view(static_cast<const float*>(data.staged_prerope.data()),
                                       {shape_.kv_heads, tokens, d});
      kp_in.rope_theta = options_.rope.theta;
      kp_in.rope_interleaved = options_.rope.convention == ops::RopeConvention::interleaved;
      key_projection_.prefill(data.projection, kp_in);
    }
    std::vector<float> keys, values;
    std::vector<std::int32_t> positions;
    for (int s = 0; s < storage_heads; ++s) {
      const auto& keep = ranked ? every_token : selection.keep[s];
      const auto n = static_cast<std::int64_t>(keep.size());
      keys.resize(static_cast<std::size_t>(n) * d);
      values.resize(static_cast<std::size_t>(n) * d);
      positions.resize(n);
      HostView<const float, 2> src_k = in.keys.sub(selection.source_head[s]);
      HostView<const float, 2> src_v = in.values.sub(selection.source_head[s]);
      if (!merged.keys.empty()) {  // the rows the Merge rewrote
        src_k = merged.keys_of(s);
        src_v = merged.values_of(s);
      }
      for (std::int64_t i = 0; i < n; ++i) {
        positions[i] = data.staged_positions[keep[i]];
        for (int c = 0; c < d; ++c) {
          keys[i * d + c] = src_k(keep[i], c);
          values[i * d + c] = src_v(keep[i], c);
        }
      }
      // Stores whose parameters depend on the layer and head (CQ codebooks) or on the whole
      // layer's prompt keys (VidKV's channel ranking, pooled over KV heads) learn them first.
      if constexpr (requires { data.heads[s].see_layer(quant_, in.keys); })
        data.heads[s].see_layer(quant_, in.keys);
      if constexpr (requires { data.heads[s].locate(quant_, layer, selection.source_head[s]); })
        data.heads[s].locate(quant_, layer, selection.source_head[s]);
      // Stores with layer-wide parameters (FP8 per-tensor scales) see the whole prefill first.
      if constexpr (requires { data.heads[s].see_layer(quant_, in.keys, in.values); })
        data.heads[s].see_layer(quant_, in.keys, in.values);
      if constexpr (requires {
                      data.heads[s].load_ranked(quant_, in.keys.sub(0), in.keys.sub(0), positions,
                                                keep);
                    }) {
        if (ranked) {
          data.heads[s].load_ranked(quant_,
                                    make_view(static_cast<const float*>(keys.data()), {n, d}),
                                    make_view(static_cast<const float*>(values.data()), {n, d}),
                                    positions, selection.keep[s]);
          continue;
        }
      }
      if (projecting)
        key_projection_.load_head(data.projection, s,
                                  make_view(static_cast<const float*>(keys.data()), {n, d}),
                                  positions);
      data.heads[s].load(quant_, make_view(static_cast<const float*>(keys.data()), {n, d}),
                         make_view(static_cast<const float*>(values.data()), {n, d}), positions);
    }
    finish_staging(data);
  }

  // Appends one decode token (its key and value per KV head) at the next absolute position.
  void append(int layer, HostView<const float, 2> k,  // [Hkv, D]
              HostView<const float, 2> v) {           // [Hkv, D]
    LayerData& data = ready_layer(layer, "append");
    KVC_CHECK(k.size(0) == shape_.kv_heads && k.size(1) == shape_.head_dim &&
                  v.size(0) == shape_.kv_heads && v.size(1) == shape_.head_dim,
              "append(layer ", layer, "): keys/values must be [", shape_.kv_heads, ", ",
              shape_.head_dim, "], got [", k.size(0), ", ", k.size(1), "] and [", v.size(0), ", ",
              v.size(1), "]");
    const std::int32_t position = data.next_position++;
    // Layer sharing: a reading layer has no heads (the token is dropped); a merged layer appends
    // to its own unmerged store and keeps its position list in step.
    check_shared_append(layer, data, position);
    std::vector<float> key(shape_.head_dim), value(shape_.head_dim);
    for (std::size_t s = 0; s < data.heads.size(); ++s) {
      for (int c = 0; c < shape_.head_dim; ++c) {
        key[c] = k(data.source_head[s], c);
        value[c] = v(data.source_head[s], c);
      }
      data.heads[s].append(quant_, key.data(), value.data(), position);
      if (key_projection_.active())
        key_projection_.append(data.projection, static_cast<int>(s), key.data(), value.data(),
                               position);
    }
  }

  // Attention of one query per head over the stored tokens (dequantized where quantized).
  // probabilities, when given, receives per storage head the softmax weights [g', n_s].
  void attend(int layer, HostView<const float, 2> q,  // [Hq, D]
              HostView<float, 2> out,                 // [Hq, D]
              std::vector<std::vector<float>>* probabilities = nullptr) const {
    const LayerData& data = storage_layer(layer, "attend");  // a CLA reader: its source layer
    KVC_CHECK(q.size(0) == shape_.q_heads && q.size(1) == shape_.head_dim &&
                  out.size(0) == shape_.q_heads && out.size(1) == shape_.head_dim,
              "attend(layer ", layer, "): q and out must be [", shape_.q_heads, ", ",
              shape_.head_dim, "]");
    const int d = shape_.head_dim;
    const int storage_heads = static_cast<int>(data.heads.size());
    const int per_store = shape_.q_heads / storage_heads;
    if (probabilities) probabilities->assign(storage_heads, {});
    std::vector<float> keys, values, query;
    for (int s = 0; s < storage_heads; ++s) {
      // Dequantized rows (a merged layer's restored in position order, layer sharing).
      const std::int64_t n = head_rows(data, s, keys, values);
      KVC_CHECK(n > 0, "attend(layer ", layer, "): storage head ", s, " is empty");
      auto key_view = make_view(keys.data(), {n, d});
      query.resize(static_cast<std::size_t>(per_store) * d);
      for (int h = 0; h < per_store; ++h)
        for (int c = 0; c < d; ++c) query[h * d + c] = q(s * per_store + h, c);
      if (options_.positions == PositionMode::reindexed) {
        // Keys move from their original position to their in-cache index, the query from its own
        // position to the in-cache index of the newest token.
        std::vector<std::int32_t> deltas(n);
        for (std::int64_t i = 0; i < n; ++i)
          deltas[i] = static_cast<std::int32_t>(i) - head_positions(data, s)[i];
        ops::rope_rotate(Cpu{}, options_.rope, key_view, deltas);
        std::vector<std::int32_t> query_delta(
            per_store, static_cast<std::int32_t>(n - 1) - (data.next_position - 1));
        ops::rope_rotate(Cpu{}, options_.rope, make_view(query.data(), {per_store, d}),
                         query_delta);
      }
      std::vector<float> head_out(static_cast<std::size_t>(per_store) * d);
      auto q_view = make_view(static_cast<const float*>(query.data()), {per_store, d});
      auto k_view = make_view(static_cast<const float*>(keys.data()), {1, n, d});
      auto v_view = make_view(static_cast<const float*>(values.data()), {1, n, d});
      auto o_view = make_view(head_out.data(), {per_store, d});
      if (key_projection_.active()) {  // its keys, on the rows it selects (kv/key_projection.hpp)
        attend_projected(key_projection_, data.projection, s, q_view,
                         make_view(static_cast<const float*>(keys.data()), {n, d}),
                         make_view(static_cast<const float*>(values.data()), {n, d}), o_view,
                         probabilities ? &(*probabilities)[s] : nullptr, options_.attention);
      } else if (probabilities) {
        (*probabilities)[s].resize(static_cast<std::size_t>(per_store) * n);
        ops::decode_attention(Cpu{}, q_view, k_view, v_view, o_view,
                              make_view((*probabilities)[s].data(), {per_store, n}),
                              options_.attention);
      } else {
        ops::decode_attention(Cpu{}, q_view, k_view, v_view, o_view, options_.attention);
      }
      for (int h = 0; h < per_store; ++h)
        for (int c = 0; c < d; ++c) out(s * per_store + h, c) = head_out[h * d + c];
    }
  }

  // Hands this step's query to decode-time policies that score by attention (H2O-style).
  void observe(int layer, HostView<const float, 2> q) {  // [Hq, D]
    LayerData& data = ready_layer(layer, "observe");
    if (data.share.reader(layer)) return;  // a CLA reader holds nothing; its source observes
    if (!eviction_.observes_attention() && !merge_observes()) return;
    std::vector<float> scratch(static_cast<std::size_t>(shape_.q_heads) * shape_.head_dim);
    attend(layer, q, make_view(scratch.data(), {shape_.q_heads, shape_.head_dim}), &data.observed);
    data.has_observation = true;
  }

  // The decode-time part of the pipeline, after the step's forward: eviction, then quant flushes.
  void step(int layer) {
    LayerData& data = ready_layer(layer, "step");
    if (data.share.reader(layer)) return;  // a CLA reader holds nothing; its source steps
    // With a Quant that keeps evicted tokens (MiKV), eviction sees only the active
    // (high-precision) tokens: their counts and their attention columns, and what it drops is
    // demoted instead of removed.
    const bool ranked = quant_keeps_evicted();
    std::vector<int> sizes;
    for (const auto& store : data.heads)
      sizes.push_back(ranked ? active_count(store) : store.size());
    std::vector<std::vector<float>> active_probabilities;
    if (ranked && data.has_observation) {
      active_probabilities.resize(data.heads.size());
      for (std::size_t s = 0; s < data.heads.size(); ++s) {
        const int n = data.heads[s].size();
        const auto& p = data.observed[s];  // [g', n]
        for (std::size_t r = 0; r < p.size() / std::max(n, 1); ++r)
          for (int j = 0; j < n; ++j)
            if (is_active(data.heads[s], j)) active_probabilities[s].push_back(p[r * n + j]);
      }
    }
    DecodeInput in;
    in.layer = layer;
    in.num_layers = shape_.layers;
    in.head_sizes = sizes;
    in.probabilities = !data.has_observation ? nullptr
                       : ranked              ? &active_probabilities
                                             : &data.observed;
    DecodeKeep keep = eviction_.decode(eviction_state_, in);
    if (merge_.acts_on_decode()) merge_step(data, layer, sizes, keep);
    if (keep) {
      KVC_CHECK(keep->size() == data.heads.size(), policy_name(eviction_), " returned ",
                keep->size(), " keep sets for ", data.heads.size(), " storage heads");
      for (std::size_t s = 0; s < data.heads.size(); ++s) {
        if constexpr (requires { data.heads[s].demote(quant_, (*keep)[s]); }) {
          if (ranked) {
            data.heads[s].demote(quant_, (*keep)[s]);
            continue;
          }
        }
        data.heads[s].gather((*keep)[s]);
        if (key_projection_.active())
          key_projection_.gather(data.projection, static_cast<int>(s), (*keep)[s]);
      }
    }
    for (auto& store : data.heads) store.after_step(quant_);
    data.observed.clear();
    data.has_observation = false;
  }

  // Dense dequantized contents of every storage head of a layer.
  std::vector<HeadContents> materialize(int layer) const {
    const LayerData& data = ready_layer(layer, "materialize");
    if (data.share.reader(layer) || data.share.merged) return materialize_shared(layer);
    std::vector<HeadContents> heads(data.heads.size());
    for (std::size_t s = 0; s < data.heads.size(); ++s) {
      const auto& store = data.heads[s];
      const std::int64_t n = store.size();
      heads[s].source_head = data.source_head[s];
      heads[s].positions.assign(store.positions().begin(), store.positions().end());
      heads[s].keys.resize(static_cast<std::size_t>(n) * shape_.head_dim);
      heads[s].values.resize(static_cast<std::size_t>(n) * shape_.head_dim);
      store.keys(make_view(heads[s].keys.data(), {n, static_cast<std::int64_t>(shape_.head_dim)}));
      if (key_projection_.active() && key_projection_.owns_keys())
        projected_keys(
            key_projection_, data.projection, static_cast<int>(s),
            make_view(heads[s].keys.data(), {n, static_cast<std::int64_t>(shape_.head_dim)}));
      store.values(
          make_view(heads[s].values.data(), {n, static_cast<std::int64_t>(shape_.head_dim)}));
    }
    return heads;
  }

  // A CLA reader answers with its source layer's storage; a merged layer (MiniCache) counts its
  // shared and its own tokens, and store() is its own store (retained + decode-time tokens).
  int storage_heads(int layer) const { return static_cast<int>(shared_data(layer).heads.size()); }
  int tokens(int layer, int storage_head) const {
    const LayerData& data = shared_data(layer);
    if (data.share.merged) return static_cast<int>(data.share.positions.at(storage_head).size());
    return data.heads.at(storage_head).size();
  }
  std::span<const std::int32_t> positions(int layer, int storage_head) const {
    const LayerData& data = shared_data(layer);
    if (data.share.merged) return data.share.positions.at(storage_head);
    return data.heads.at(storage_head).positions();
  }
  const typename Quant::HeadStore& store(int layer, int storage_head) const {
    return shared_data(layer).heads.at(storage_head);
  }

  // Exact bytes held: payload + quantization parameters, index bytes apart.
  StorageBytes bytes(int layer) const {
    if (key_projection_.active())  // its keys + the stores' values (host when offloaded)
      return projected_bytes(key_projection_, layer_data(layer).projection, quant_,
                             layer_data(layer).heads);
    StorageBytes total;
    for (const auto& store : layer_data(layer).heads) total += store.bytes();
    total += layer_data(layer).share.extra_bytes();  // merged pair: directions, magnitudes
    return total;
  }
  StorageBytes bytes() const {
    StorageBytes total;
    for (int l = 0; l < shape_.layers; ++l) total += bytes(l);
    return total;
  }

 private:
  struct LayerData {
    std::vector<typename Quant::HeadStore> heads;  // [S]
    std::vector<int> source_head;                  // [S]
    std::vector<float> staged_keys;                // [Hkv, T, D]
    std::vector<float> staged_values;              // [Hkv, T, D]
    std::vector<float> staged_queries;             // [Hq, Tq, D]
    std::vector<std::int32_t> staged_positions;    // [T]
    std::vector<float> staged_scores;              // [Hkv, T] external token scores, or empty
    std::int64_t staged_tokens = 0;
    std::int64_t staged_query_count = 0;
    std::int32_t next_position = 0;
    bool compressed = false;
    LayerShare<Quant> share;  // layer sharing: the layer's role, merged-pair storage
    std::vector<std::vector<float>> observed;  // [S][g', n_s] this step's probabilities
    bool has_observation = false;
    // Key projection: its per-layer state and the staged pre-RoPE keys [Hkv, T, D] (or empty).
    typename KeyProjection::LayerState projection{};
    std::vector<float> staged_prerope;
    std::int64_t staged_prerope_tokens = 0;
  };

  // MiKV-style Quant policies keep the tokens eviction drops (at low precision).
  bool quant_keeps_evicted() const {
    if constexpr (requires { quant_.keeps_evicted(); })
      return quant_.keeps_evicted();
    else
      return false;
  }
  static int active_count(const typename Quant::HeadStore& store) {
    if constexpr (requires { store.active_count(); })
      return store.active_count();
    else
      return store.size();
  }
  static bool is_active(const typename Quant::HeadStore& store, int i) {
    if constexpr (requires { store.is_active(i); })
      return store.is_active(i);
    else
      return true;
  }

  template <class Arg>
  void assign(const Arg& arg) {
    if constexpr (std::is_same_v<Arg, Eviction>)
      eviction_ = arg;
    else if constexpr (std::is_same_v<Arg, Merge>)
      merge_ = arg;
    else if constexpr (std::is_same_v<Arg, Quant>)
      quant_ = arg;
    else if constexpr (std::is_same_v<Arg, KeyProjection>)
      key_projection_ = arg;
    else if constexpr (std::is_same_v<Arg, LayerSharing>)
      layer_sharing_ = arg;
    else if constexpr (std::is_same_v<Arg, CacheOptions>)
      options_ = arg;
    else
      static_assert(sizeof(Arg) == 0, "KVCache: argument matches no slot of the Config");
  }

  // The prompt is in the stores: drop the host staging and mark the layer compressed.
  static void finish_staging(LayerData& data) {
    data.staged_keys.clear();
    data.staged_values.clear();
    data.staged_queries.clear();
    data.staged_positions.clear();
    data.staged_scores.clear();
    data.staged_prerope.clear();
    data.staged_prerope_tokens = 0;
    data.staged_tokens = data.staged_query_count = 0;
    data.compressed = true;
  }

  LayerData& layer_data(int layer) {
    check_layer_index(layer, shape_.layers);
    return layers_[layer];
  }
  const LayerData& layer_data(int layer) const {
    check_layer_index(layer, shape_.layers);
    return layers_[layer];
  }
  // A layer that decode operations may use: compressed, or never prefilled (an empty cache).
  LayerData& ready_layer(int layer, const char* what) {
    return ready_decode_layer(layers_, layer, what, [this](int l) { compress(l); });
  }
  const LayerData& ready_layer(int layer, const char* what) const {
    return ready_decode_layer(layers_, layer, what);
  }

  template <class T>
  void check_heads(const char* what, HostView<const T, 3> x, int heads) const {
    check_head_shape(what, x, heads, shape_.head_dim);
  }

  void check_selection(int layer, const Selection& s, std::int64_t tokens) const {
    const auto storage_heads = static_cast<int>(s.keep.size());
    KVC_CHECK(storage_heads >= 1 && s.source_head.size() == s.keep.size() &&
                  shape_.q_heads % storage_heads == 0,
              policy_name(eviction_), " (layer ", layer, ") returned ", storage_heads,
              " storage heads; must divide q_heads = ", shape_.q_heads);
    for (int h = 0; h < storage_heads; ++h) {
      KVC_CHECK(s.source_head[h] >= 0 && s.source_head[h] < shape_.kv_heads, policy_name(eviction_),
                ": storage head ", h, " reads KV head ", s.source_head[h], " of ", shape_.kv_heads);
      if (s.keep_order_given) {
        // Any order, but every index once and in range.
        std::vector<std::int32_t> sorted = s.keep[h];
        std::sort(sorted.begin(), sorted.end());
        for (std::size_t i = 0; i < sorted.size(); ++i)
          KVC_CHECK(sorted[i] >= 0 && sorted[i] < tokens && (i == 0 || sorted[i] != sorted[i - 1]),
                    policy_name(eviction_), " (layer ", layer, ", head ", h,
                    "): kept indices must be unique in [0, ", tokens, "), got ", sorted[i]);
        continue;
      }
      std::int64_t previous = -1;
      for (auto i : s.keep[h]) {
        KVC_CHECK(i > previous && i < tokens, policy_name(eviction_), " (layer ", layer, ", head ",
                  h, "): kept indices must be ascending in [0, ", tokens, "), got ", i);
        previous = i;
      }
    }
  }

  // ---- Merge slot (kvc/policies/merge) ---------------------------------------------------------
  // Combinations that cannot work fail at construction, naming both stages.
  void check_merge_combination() const {
    if (!merge_.active()) return;
    const bool evicts = policy_name(eviction_) != NoEviction::kName;
    KVC_CHECK(!merge_.needs_eviction() || evicts, "cannot use ", policy_name(merge_),
              " with eviction ", policy_name(eviction_), ": ", policy_name(merge_),
              " merges the tokens an eviction policy drops and ", policy_name(eviction_),
              " drops none; compose it after one, e.g. h2o(...)+", policy_name(merge_), "(...)");
    KVC_CHECK(merge_.allows_eviction() || !evicts, "cannot combine ", policy_name(eviction_),
              " with ", policy_name(merge_), ": ", policy_name(merge_),
              " selects its own tokens; use it alone (eviction full)");
    KVC_CHECK(!quant_keeps_evicted(), "cannot combine ", policy_name(merge_), " with ",
              policy_name(quant_), ": ", policy_name(quant_),
              " keeps the evicted tokens at low precision, so there is nothing to merge");
    const bool merges_on_decode =
        merge_.acts_on_decode() && (eviction_.evicts_on_decode() || !merge_.allows_eviction());
    KVC_CHECK(!merges_on_decode || quant_.supports_decode_eviction(), "cannot combine ",
              policy_name(merge_), " (rewrites or removes single tokens during decode) with ",
              policy_name(quant_),
              " (quantized groups span several tokens, so single tokens cannot be removed)");
  }
  bool merge_observes() const {
    return merge_.observes_attention() && eviction_.evicts_on_decode();
  }
  // Per storage head copies of its source head's prompt rows, for the merge to rewrite.
  MergeRows merge_rows(const PrefillInput& in, const Selection& selection) const {
    MergeRows rows;
    rows.tokens = in.keys.size(1);
    rows.head_dim = shape_.head_dim;
    rows.after_eviction = policy_name(eviction_) != NoEviction::kName;
    for (int source : selection.source_head) {
      const auto k = in.keys.sub(source), v = in.values.sub(source);
      std::vector<float> keys, values;
      for (std::int64_t t = 0; t < rows.tokens; ++t)
        for (int c = 0; c < shape_.head_dim; ++c) {
          keys.push_back(k(t, c));
          values.push_back(v(t, c));
        }
      rows.keys.push_back(std::move(keys));
      rows.values.push_back(std::move(values));
      rows.mass.emplace_back(static_cast<std::size_t>(rows.tokens), 1.0);
    }
    return rows;
  }
  // After the eviction's decode decision: the merge folds what it drops (rewriting rows, which are
  // re-loaded into their stores) or, with eviction full, may return its own keep sets.
  void merge_step(LayerData& data, int layer, std::span<const int> sizes, DecodeKeep& keep) {
    const std::size_t heads = data.heads.size();
    KVC_CHECK(!keep || keep->size() == heads, policy_name(eviction_), " returned ",
              keep ? keep->size() : 0, " keep sets for ", heads, " storage heads");
    std::vector<std::vector<std::int32_t>> positions(heads);
    for (std::size_t s = 0; s < heads; ++s)
      positions[s].assign(data.heads[s].positions().begin(), data.heads[s].positions().end());
    MergeDecodeInput in;
    in.layer = layer;
    in.num_layers = shape_.layers;
    in.head_sizes = sizes;
    in.positions = &positions;
    in.probabilities = data.has_observation ? &data.observed : nullptr;
    in.keep = &keep;
    bool drops = false;
    for (std::size_t s = 0; keep && s < heads; ++s)
      drops = drops || static_cast<int>((*keep)[s].size()) < sizes[s];
    MergeDecodeRows rows;
    if (drops) {
      rows.head_dim = shape_.head_dim;
      rows.keys.resize(heads);
      rows.values.resize(heads);
      rows.changed.assign(heads, 0);
      for (std::size_t s = 0; s < heads; ++s) {
        const std::int64_t n = data.heads[s].size();
        rows.keys[s].resize(static_cast<std::size_t>(n) * shape_.head_dim);
        rows.values[s].resize(static_cast<std::size_t>(n) * shape_.head_dim);
        data.heads[s].keys(make_view(rows.keys[s].data(), {n, rows.head_dim}));
        data.heads[s].values(make_view(rows.values[s].data(), {n, rows.head_dim}));
      }
    }
    DecodeKeep own = merge_.decode(merge_state_, in, drops ? &rows : nullptr);
    if (own) {
      KVC_CHECK(!keep, policy_name(merge_), " and ", policy_name(eviction_),
                " both removed tokens in one decode step");
      keep = std::move(own);
    }
    for (std::size_t s = 0; s < rows.changed.size(); ++s) {
      if (!rows.changed[s]) continue;
      const std::int64_t n = data.heads[s].size();
      data.heads[s].load(
          quant_, make_view(static_cast<const float*>(rows.keys[s].data()), {n, rows.head_dim}),
          make_view(static_cast<const float*>(rows.values[s].data()), {n, rows.head_dim}),
          positions[s]);
    }
  }

  // ---- layer sharing (kvc/cache/shared_layers.hpp) ----
  // The plan is fixed at construction, or at the first compress() when the policy chooses it from
  // every layer's prompt keys (cla(share=...)). Merged pairs take no eviction, merge, key
  // projection or MiKV-style quant: pairing needs the same tokens, whole, in both layers.
  void init_layer_sharing() {
    if (!layer_sharing_.needs_prompt_keys())
      apply_sharing_plan(layer_sharing_.plan(SharingInput{shape_.layers, {}}));
  }
  void apply_sharing_plan(const SharingPlan& plan) {
    const std::string name = sharing_name(layer_sharing_);
    check_sharing_plan(plan, shape_.layers, name);
    bool pairs = false;
    for (int l = 0; l < shape_.layers; ++l) {
      layers_[l].share.reads = plan.reads[l];
      layers_[l].share.partner = plan.partner[l];
      pairs = pairs || plan.partner[l] >= 0;
    }
    if (!pairs) return;
    const char* why = " (merges the same prompt tokens of two adjacent layers)";
    KVC_CHECK(policy_name(eviction_) == "full", "cannot combine ", policy_name(eviction_),
              " (keeps different tokens per layer and head) with ", name, why,
              "; use eviction 'full'");
    KVC_CHECK(policy_name(merge_) == "none", "cannot combine ", policy_name(merge_),
              " (merges tokens within a layer) with ", name, why);
    KVC_CHECK(policy_name(key_projection_) == "none", "cannot combine ",
              policy_name(key_projection_), " (stores keys in a projected form) with ", name, why);
    KVC_CHECK(!quant_keeps_evicted(), "cannot combine ", policy_name(quant_),
              " (keeps evicted tokens at low precision) with ", name, why);
  }
  // Runs compress() for a reading or merged layer; false for a layer that stores on its own.
  bool compress_shared_layer(int layer, LayerData& data) {
    if (data.share.reads < 0) plan_from_prompt_keys();
    LayerShare<Quant>& share = data.share;
    const int d = shape_.head_dim, hkv = shape_.kv_heads;
    if (share.reader(layer)) {
      data.heads.clear();
      data.source_head.clear();
    } else if (share.partner < 0) {
      return false;
    } else if (data.staged_tokens == 0 &&
               !(share.partner < layer && layers_[share.partner].share.pending)) {
      return false;  // an empty prompt (a cache decoding from scratch): nothing to merge
    } else if (share.partner > layer) {  // lower layer: stored whole until its partner arrives
      share.pending = true;
      share.pending_keys = data.staged_keys;
      share.pending_values = data.staged_values;
      data.heads.assign(hkv, typename Quant::HeadStore{});
      data.source_head.resize(hkv);
      for (int h = 0; h < hkv; ++h) {
        data.source_head[h] = h;
        const auto rows = [&](const std::vector<float>& x) {
          return make_view(x.data() + h * data.staged_tokens * d,
                           {data.staged_tokens, static_cast<std::int64_t>(d)});
        };
        detail::introduce(quant_, data.heads[h], layer, h, rows(data.staged_keys),
                          rows(data.staged_values));
        data.heads[h].load(quant_, rows(data.staged_keys), rows(data.staged_values),
                           data.staged_positions);
      }
    } else {  // upper layer: merge the pair
      LayerData& lower = layers_[share.partner];
      KVC_CHECK(lower.share.pending, sharing_name(layer_sharing_), ": layer ", layer,
                " is merged with layer ", share.partner,
                ", which holds no prompt to merge: compress", " layer ", share.partner,
                " first, with the same prompt tokens");
      const std::int64_t lower_tokens =
          static_cast<std::int64_t>(lower.share.pending_keys.size()) / (hkv * d);
      const auto view = [&](const std::vector<float>& x, std::int64_t t) {
        return make_view(x.data(), {static_cast<std::int64_t>(hkv), t, std::int64_t{d}});
      };
      merge_layer_pair(quant_, layer_sharing_, share.partner, layer,
                       view(lower.share.pending_keys, lower_tokens),
                       view(lower.share.pending_values, lower_tokens),
                       view(data.staged_keys, data.staged_tokens),
                       view(data.staged_values, data.staged_tokens), data.staged_positions,
                       lower.heads, data.heads, lower.share, share);
      data.source_head.resize(hkv);
      for (int h = 0; h < hkv; ++h) data.source_head[h] = h;
      lower.share.pending = false;
      lower.share.pending_keys = {};
      lower.share.pending_values = {};
    }
    finish_staging(data);
    return true;
  }
  void plan_from_prompt_keys() {
    std::vector<HostView<const float, 3>> keys;
    for (int l = 0; l < shape_.layers; ++l) {
      const LayerData& data = layers_[l];
      KVC_CHECK(!data.compressed && data.staged_tokens > 0, sharing_name(layer_sharing_),
                " chooses its layer map from every layer's prompt keys: prefill all ",
                shape_.layers, " layers before the first compress() (layer ", l,
                data.compressed ? " is already compressed)" : " holds no prompt)");
      keys.push_back(make_view(data.staged_keys.data(),
                               {static_cast<std::int64_t>(shape_.kv_heads), data.staged_tokens,
                                static_cast<std::int64_t>(shape_.head_dim)}));
    }
    apply_sharing_plan(layer_sharing_.plan(SharingInput{shape_.layers, keys}));
  }
  void check_shared_append(int layer, LayerData& data, std::int32_t position) {
    KVC_CHECK(!data.share.pending, sharing_name(layer_sharing_), ": layer ", layer,
              " is merged with layer ", data.share.partner, "; compress layer ", data.share.partner,
              " before decoding layer ", layer);
    if (data.share.merged)
      for (auto& p : data.share.positions) p.push_back(position);
  }
  // The layer whose storage `layer` attends to: itself, or a CLA reader's source.
  const LayerData& storage_layer(int layer, const char* what) const {
    const LayerData& data = ready_layer(layer, what);
    return data.share.reader(layer) ? ready_layer(data.share.reads, what) : data;
  }
  const LayerData& shared_data(int layer) const {
    const LayerData& data = layer_data(layer);
    return data.share.reader(layer) ? layer_data(data.share.reads) : data;
  }
  // Dense rows [n, D] of storage head s; a merged layer's restored in position order.
  std::int64_t head_rows(const LayerData& data, int s, std::vector<float>& keys,
                         std::vector<float>& values) const {
    const int d = shape_.head_dim;
    const auto& store = data.heads[s];
    if (data.share.merged) {
      const LayerData& lower = layers_[std::min(data.share.reads, data.share.partner)];
      return merged_rows(lower.share.shared[s], data.share.key_magnitude[s],
                         data.share.value_magnitude[s], store, d, keys, values);
    }
    const std::int64_t n = store.size();
    keys.resize(static_cast<std::size_t>(n) * d);
    values.resize(static_cast<std::size_t>(n) * d);
    store.keys(make_view(keys.data(), {n, static_cast<std::int64_t>(d)}));
    store.values(make_view(values.data(), {n, static_cast<std::int64_t>(d)}));
    return n;
  }
  std::span<const std::int32_t> head_positions(const LayerData& data, int s) const {
    if (data.share.merged) return data.share.positions[s];
    return data.heads[s].positions();
  }
  std::vector<HeadContents> materialize_shared(int layer) const {
    const LayerData& data = layer_data(layer);
    if (data.share.reader(layer)) return materialize(data.share.reads);
    std::vector<HeadContents> heads(data.heads.size());
    for (std::size_t s = 0; s < data.heads.size(); ++s) {
      heads[s].source_head = data.source_head[s];
      const auto p = head_positions(data, static_cast<int>(s));
      heads[s].positions.assign(p.begin(), p.end());
      head_rows(data, static_cast<int>(s), heads[s].keys, heads[s].values);
    }
    return heads;
  }
  // ---- end layer sharing ----

  CacheShape shape_;
  CacheOptions options_{};
  Eviction eviction_{};
  Merge merge_{};
  typename Merge::State merge_state_{};  // one per cache (request), shared by all layers
  Quant quant_{};
  KeyProjection key_projection_{};
  LayerSharing layer_sharing_{};
  typename Eviction::State eviction_state_{};  // one per cache (request), shared by all layers
  std::vector<LayerData> layers_;
};

}  // namespace kvc
