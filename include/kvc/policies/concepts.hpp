// kvc/policies/concepts.hpp: the five policy kinds, what the cache hands each of them, the concepts
// that check a policy next to its definition, and the no-op policy of every slot.
//
//   struct Config : kvc::DefaultConfig { using Eviction = kvc::SnapKv; };
//   static_assert(kvc::EvictionPolicy<kvc::SnapKv>);
//   kvc::Selection all = kvc::keep_all(/*source heads=*/2, /*tokens=*/100);
//
// Policies are small trivially copyable structs: parameters are plain members holding the
// published defaults; whatever a policy must remember between calls lives in its State (for
// eviction: one per cache, shared by all layers, so that a decision may span layers, e.g.
// WindowKV's layer groups; every input names its layer) or its HeadStore (for quantization, one per
// storage head), owned by the cache, never in the policy: a policy value can be shared by many
// requests.
#pragma once

#include <concepts>
#include <cstdint>
#include <optional>
#include <span>
#include <string_view>
#include <type_traits>
#include <vector>

#include "kvc/core/error.hpp"
#include "kvc/core/view.hpp"

namespace kvc {

enum class PolicyKind { eviction, merge, quant, key_projection, layer_sharing };

// What a prefill-time decision sees for one layer.
struct PrefillInput {
  int layer = 0;
  int num_layers = 1;
  HostView<const float, 3> keys;            // [Hkv, T, D], post-RoPE (as engines cache them)
  HostView<const float, 3> values;          // [Hkv, T, D]
  HostView<const float, 3> queries;         // [Hq, Tq, D], the last Tq prompt queries (Tq may be 0)
  std::span<const std::int32_t> positions;  // [T] absolute positions of the prompt tokens
  // External per-token scores supplied by the caller (Locret-style retaining heads), [Hkv, T];
  // size(1) == 0 when none were given.
  HostView<const float, 2> token_scores;
};

// The outcome of a prefill decision: which prompt tokens each storage head keeps. A storage head
// copies the tokens of one KV head (source_head); normally storage head s is KV head s, but a
// policy may store more heads than the model has KV heads (SnapKV's gqa=repeat keeps one per
// query head, as the released code does, at g times the memory).
struct Selection {
  std::vector<int> source_head;                 // [S]
  std::vector<std::vector<std::int32_t>> keep;  // [S][n_s], ascending indices into the T tokens
  // The keep lists are in the policy's own order (unique, not ascending) and the cache stores the
  // tokens in that order: the released SnapKV gathers in top-k (score-descending) order, which
  // snapkv(reference_compat=true) reproduces. Attention does not depend on the order; what a
  // dump shows, and which tokens share a quantization group, do.
  bool keep_order_given = false;
};

inline Selection keep_all(int source_heads, std::int64_t tokens) {
  Selection s;
  s.source_head.resize(source_heads);
  s.keep.resize(source_heads);
  for (int h = 0; h < source_heads; ++h) {
    s.source_head[h] = h;
    s.keep[h].resize(tokens);
    for (std::int64_t t = 0; t < tokens; ++t) s.keep[h][t] = static_cast<std::int32_t>(t);
  }
  return s;
}

// What a decode-time decision sees for one layer, after the step's forward.
struct DecodeInput {
  int layer = 0;
  int num_layers = 1;
  std::span<const int> head_sizes;  // [S] tokens currently stored per storage head
  // Attention probabilities of this step, per storage head [g_s, n_s] flattened (g_s = query
  // heads reading that head). Filled only for policies with kObservesAttention.
  const std::vector<std::vector<float>>* probabilities = nullptr;
};

// Decode-time keep sets per storage head (ascending in-cache indices); nullopt = keep everything.
using DecodeKeep = std::optional<std::vector<std::vector<std::int32_t>>>;

template <class P>
concept Policy = std::is_trivially_copyable_v<P> && requires(const P& p) {
  { P::kName } -> std::convertible_to<std::string_view>;
  { P::kKind } -> std::convertible_to<PolicyKind>;
  p.validate();
};

template <class P>
concept EvictionPolicy =
    Policy<P> && P::kKind ==
    PolicyKind::eviction&& std::default_initializable<typename P::State>&& requires(
        const P& p, typename P::State& state, const PrefillInput& in, const DecodeInput& dec) {
  { p.prefill(state, in) } -> std::same_as<Selection>;
  { p.decode(state, dec) } -> std::same_as<DecodeKeep>;
  { p.evicts_on_decode() } -> std::convertible_to<bool>;
  { p.observes_attention() } -> std::convertible_to<bool>;
};

// Per storage head bytes, exact: payload (codes, full-precision K/V), quantization parameters
// (scales, minimums) and index (positions) kept apart.
struct StorageBytes {
  std::int64_t payload = 0;
  std::int64_t params = 0;
  std::int64_t index = 0;
  std::int64_t stored() const { return payload + params; }
  StorageBytes& operator+=(const StorageBytes& o) {
    payload += o.payload;
    params += o.params;
    index += o.index;
    return *this;
  }
};

// A quantization policy owns the representation of one storage head (its HeadStore).
template <class Q>
concept QuantPolicy = Policy<Q> && Q::kKind ==
                      PolicyKind::quant&& requires(const Q& q, typename Q::HeadStore& store,
                                                   const typename Q::HeadStore& cstore,
                                                   HostView<const float, 2> rows,
                                                   std::span<const std::int32_t> positions,
                                                   const float* row, HostView<float, 2> out) {
  store.load(q, rows, rows, positions);  // keys [n, D], values [n, D], positions [n]
  store.append(q, row, row, std::int32_t{0});
  store.after_step(q);
  { cstore.size() } -> std::convertible_to<int>;
  { cstore.positions() } -> std::convertible_to<std::span<const std::int32_t>>;
  cstore.keys(out);    // dequantized [n, D]
  cstore.values(out);  // dequantized [n, D]
  { cstore.bytes() } -> std::same_as<StorageBytes>;
  { q.supports_decode_eviction() } -> std::convertible_to<bool>;
  store.gather(positions);  // keep these in-cache indices
};

// ---- no-op policies: the defaults of every slot -------------------------------------------------

struct NoEviction {
  static constexpr std::string_view kName = "full";
  static constexpr PolicyKind kKind = PolicyKind::eviction;
  struct State {};
  void validate() const {}
  bool evicts_on_decode() const { return false; }
  bool observes_attention() const { return false; }
  Selection prefill(State&, const PrefillInput& in) const {
    return keep_all(static_cast<int>(in.keys.size(0)), in.keys.size(1));
  }
  DecodeKeep decode(State&, const DecodeInput&) const { return std::nullopt; }
};

// Merge: folds what eviction drops into what stays. The no-op merge drops nothing extra.
struct NoMerge {
  static constexpr std::string_view kName = "none";
  static constexpr PolicyKind kKind = PolicyKind::merge;
  void validate() const {}
};

struct NoKeyProjection {
  static constexpr std::string_view kName = "none";
  static constexpr PolicyKind kKind = PolicyKind::key_projection;
  void validate() const {}
};

struct NoLayerSharing {
  static constexpr std::string_view kName = "none";
  static constexpr PolicyKind kKind = PolicyKind::layer_sharing;
  void validate() const {}
};

template <class P>
concept MergePolicy = Policy<P> && P::kKind == PolicyKind::merge;
template <class P>
concept KeyProjectionPolicy = Policy<P> && P::kKind == PolicyKind::key_projection;
template <class P>
concept LayerSharingPolicy = Policy<P> && P::kKind == PolicyKind::layer_sharing;

static_assert(EvictionPolicy<NoEviction>);
static_assert(MergePolicy<NoMerge>);
static_assert(KeyProjectionPolicy<NoKeyProjection>);
static_assert(LayerSharingPolicy<NoLayerSharing>);

}  // namespace kvc
