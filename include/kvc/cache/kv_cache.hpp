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
// Pipeline at compress(): Eviction selects -> Merge folds (no-op so far) -> LayerSharing ->
// KeyProjection -> Quant stores. After each decode step: Eviction.decode, then the Quant flushes.
#pragma once

#include <algorithm>
#include <cstdint>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

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
    layers_.resize(shape_.layers);
  }

  const CacheShape& shape() const { return shape_; }
  const CacheOptions& options() const { return options_; }
  const Eviction& eviction() const { return eviction_; }
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
    std::vector<float> keys, values;
    std::vector<std::int32_t> positions;
    for (int s = 0; s < storage_heads; ++s) {
      const auto& keep = ranked ? every_token : selection.keep[s];
      const auto n = static_cast<std::int64_t>(keep.size());
      keys.resize(static_cast<std::size_t>(n) * d);
      values.resize(static_cast<std::size_t>(n) * d);
      positions.resize(n);
      const auto src_k = in.keys.sub(selection.source_head[s]);
      const auto src_v = in.values.sub(selection.source_head[s]);
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
      data.heads[s].load(quant_, make_view(static_cast<const float*>(keys.data()), {n, d}),
                         make_view(static_cast<const float*>(values.data()), {n, d}), positions);
    }
    data.staged_keys.clear();
    data.staged_values.clear();
    data.staged_queries.clear();
    data.staged_positions.clear();
    data.staged_scores.clear();
    data.staged_tokens = data.staged_query_count = 0;
    data.compressed = true;
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
    std::vector<float> key(shape_.head_dim), value(shape_.head_dim);
    for (std::size_t s = 0; s < data.heads.size(); ++s) {
      for (int c = 0; c < shape_.head_dim; ++c) {
        key[c] = k(data.source_head[s], c);
        value[c] = v(data.source_head[s], c);
      }
      data.heads[s].append(quant_, key.data(), value.data(), position);
    }
  }

  // Attention of one query per head over the stored tokens (dequantized where quantized).
  // probabilities, when given, receives per storage head the softmax weights [g', n_s].
  void attend(int layer, HostView<const float, 2> q,  // [Hq, D]
              HostView<float, 2> out,                 // [Hq, D]
              std::vector<std::vector<float>>* probabilities = nullptr) const {
    const LayerData& data = ready_layer(layer, "attend");
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
      const auto& store = data.heads[s];
      const std::int64_t n = store.size();
      KVC_CHECK(n > 0, "attend(layer ", layer, "): storage head ", s, " is empty");
      keys.resize(static_cast<std::size_t>(n) * d);
      values.resize(static_cast<std::size_t>(n) * d);
      auto key_view = make_view(keys.data(), {n, d});
      store.keys(key_view);
      store.values(make_view(values.data(), {n, d}));
      query.resize(static_cast<std::size_t>(per_store) * d);
      for (int h = 0; h < per_store; ++h)
        for (int c = 0; c < d; ++c) query[h * d + c] = q(s * per_store + h, c);
      if (options_.positions == PositionMode::reindexed) {
        // Keys move from their original position to their in-cache index, the query from its own
        // position to the in-cache index of the newest token.
        std::vector<std::int32_t> deltas(n);
        for (std::int64_t i = 0; i < n; ++i)
          deltas[i] = static_cast<std::int32_t>(i) - store.positions()[i];
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
      if (probabilities) {
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
    if (!eviction_.observes_attention()) return;
    std::vector<float> scratch(static_cast<std::size_t>(shape_.q_heads) * shape_.head_dim);
    attend(layer, q, make_view(scratch.data(), {shape_.q_heads, shape_.head_dim}), &data.observed);
    data.has_observation = true;
  }

  // The decode-time part of the pipeline, after the step's forward: eviction, then quant flushes.
  void step(int layer) {
    LayerData& data = ready_layer(layer, "step");
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
      }
    }
    for (auto& store : data.heads) store.after_step(quant_);
    data.observed.clear();
    data.has_observation = false;
  }

  // Dense dequantized contents of every storage head of a layer.
  std::vector<HeadContents> materialize(int layer) const {
    const LayerData& data = ready_layer(layer, "materialize");
    std::vector<HeadContents> heads(data.heads.size());
    for (std::size_t s = 0; s < data.heads.size(); ++s) {
      const auto& store = data.heads[s];
      const std::int64_t n = store.size();
      heads[s].source_head = data.source_head[s];
      heads[s].positions.assign(store.positions().begin(), store.positions().end());
      heads[s].keys.resize(static_cast<std::size_t>(n) * shape_.head_dim);
      heads[s].values.resize(static_cast<std::size_t>(n) * shape_.head_dim);
      store.keys(make_view(heads[s].keys.data(), {n, static_cast<std::int64_t>(shape_.head_dim)}));
      store.values(
          make_view(heads[s].values.data(), {n, static_cast<std::int64_t>(shape_.head_dim)}));
    }
    return heads;
  }

  int storage_heads(int layer) const { return static_cast<int>(layer_data(layer).heads.size()); }
  int tokens(int layer, int storage_head) const {
    return layer_data(layer).heads.at(storage_head).size();
  }
  std::span<const std::int32_t> positions(int layer, int storage_head) const {
    return layer_data(layer).heads.at(storage_head).positions();
  }
  const typename Quant::HeadStore& store(int layer, int storage_head) const {
    return layer_data(layer).heads.at(storage_head);
  }

  // Exact bytes held: payload + quantization parameters, index bytes apart.
  StorageBytes bytes(int layer) const {
    StorageBytes total;
    for (const auto& store : layer_data(layer).heads) total += store.bytes();
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
    std::vector<std::vector<float>> observed;  // [S][g', n_s] this step's probabilities
    bool has_observation = false;
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

  LayerData& layer_data(int layer) {
    KVC_CHECK(layer >= 0 && layer < shape_.layers, "layer ", layer, " out of range [0, ",
              shape_.layers, ")");
    return layers_[layer];
  }
  const LayerData& layer_data(int layer) const {
    KVC_CHECK(layer >= 0 && layer < shape_.layers, "layer ", layer, " out of range [0, ",
              shape_.layers, ")");
    return layers_[layer];
  }
  // A layer that decode operations may use: compressed, or never prefilled (an empty cache).
  LayerData& ready_layer(int layer, const char* what) {
    LayerData& data = layer_data(layer);
    if (!data.compressed) {
      KVC_CHECK(
          data.staged_tokens == 0, what, "(layer ", layer,
          "): the layer has prefilled tokens that were not compressed; call compress() first");
      compress(layer);
    }
    return data;
  }
  const LayerData& ready_layer(int layer, const char* what) const {
    const LayerData& data = layer_data(layer);
    KVC_CHECK(data.compressed, what, "(layer ", layer,
              "): the layer holds no compressed tokens yet");
    return data;
  }

  template <class T>
  void check_heads(const char* what, HostView<const T, 3> x, int heads) const {
    KVC_CHECK(x.size(0) == heads && x.size(2) == shape_.head_dim, what, " must be [", heads,
              ", T, ", shape_.head_dim, "], got [", x.size(0), ", ", x.size(1), ", ", x.size(2),
              "]");
  }

  // Appends x [H, T, D] to a staged [H, T_old, D] buffer, giving [H, T_old + T, D].
  static void append_heads(std::vector<float>& buffer, std::int64_t old_tokens,
                           HostView<const float, 3> x) {
    const std::int64_t heads = x.size(0), tokens = x.size(1), d = x.size(2);
    std::vector<float> merged(static_cast<std::size_t>(heads * (old_tokens + tokens) * d));
    for (std::int64_t h = 0; h < heads; ++h) {
      for (std::int64_t t = 0; t < old_tokens; ++t)
        for (std::int64_t c = 0; c < d; ++c)
          merged[(h * (old_tokens + tokens) + t) * d + c] = buffer[(h * old_tokens + t) * d + c];
      for (std::int64_t t = 0; t < tokens; ++t)
        for (std::int64_t c = 0; c < d; ++c)
          merged[(h * (old_tokens + tokens) + old_tokens + t) * d + c] = x(h, t, c);
    }
    buffer.swap(merged);
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

  CacheShape shape_;
  CacheOptions options_{};
  Eviction eviction_{};
  Merge merge_{};
  Quant quant_{};
  KeyProjection key_projection_{};
  LayerSharing layer_sharing_{};
  typename Eviction::State eviction_state_{};  // one per cache (request), shared by all layers
  std::vector<LayerData> layers_;
};

}  // namespace kvc
