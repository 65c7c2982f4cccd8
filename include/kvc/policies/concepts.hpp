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
  // The same step's attention already reduced on the device, per storage head [n_s]: each
  // probability rounded to f16 and summed over the g_s query heads (decode_attention_with_scores
  // with kH2oScores, overwrite). Policies that accept it (H2O) read it when `probabilities` is
  // null; the sum is fp32 where the host path sums in double.
  const std::vector<std::vector<float>>* group_scores = nullptr;
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
// (scales, minimums) and index (positions) kept apart. payload + params is what the accelerator
// holds; host counts a tier offloaded to host memory (ShadowKV's values), reported apart and not
// part of stored().
struct StorageBytes {
  std::int64_t payload = 0;
  std::int64_t params = 0;
  std::int64_t index = 0;
  std::int64_t host = 0;
  std::int64_t stored() const { return payload + params; }
  StorageBytes& operator+=(const StorageBytes& o) {
    payload += o.payload;
    params += o.params;
    index += o.index;
    host += o.host;
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

// ---- merge slot (kvc/policies/merge/*.hpp) -----------------------------------------------------
// What a merge sees at prefill, besides the layer's PrefillInput and the eviction's Selection
// (which it may narrow when it selects by itself, e.g. kvmerger or elastic with eviction `full`):
// per storage head a copy of its source KV head's prompt rows, indexed by prompt token, that it
// rewrites in place (the cache then stores the rows of the kept tokens), and a ledger of how many
// prompt tokens each row stands for (1 each before the merge; a merge moves an absorbed token's
// mass onto the rows that receive it). The ledger is not stored; tests check conservation on it.
struct MergeRows {
  std::int64_t tokens = 0;                 // T
  std::int64_t head_dim = 0;               // D
  std::vector<std::vector<float>> keys;    // [S][T * D]
  std::vector<std::vector<float>> values;  // [S][T * D]
  std::vector<std::vector<double>> mass;   // [S][T]
  bool after_eviction = false;             // the Eviction slot holds a policy other than `full`
  HostView<float, 2> keys_of(int s) { return make_view(keys[s].data(), {tokens, head_dim}); }
  HostView<float, 2> values_of(int s) { return make_view(values[s].data(), {tokens, head_dim}); }
};

// What a merge sees after a decode step's forward, once the eviction decided.
struct MergeDecodeInput {
  int layer = 0;
  int num_layers = 1;
  std::span<const int> head_sizes;  // [S] tokens stored per storage head, before this step's keep
  const std::vector<std::vector<std::int32_t>>* positions = nullptr;  // [S][n_s] absolute
  // This step's attention per storage head [g_s, n_s] flattened, when observed (else nullptr).
  const std::vector<std::vector<float>>* probabilities = nullptr;
  const DecodeKeep* keep = nullptr;  // the eviction's keep sets of this step (nullopt: none)
};
// The stored rows of every storage head (dequantized), handed to the merge only in steps where the
// eviction drops tokens; a merge that rewrites a head's rows sets changed[s].
struct MergeDecodeRows {
  std::int64_t head_dim = 0;
  std::vector<std::vector<float>> keys;    // [S][n_s * D]
  std::vector<std::vector<float>> values;  // [S][n_s * D]
  std::vector<char> changed;               // [S]
};

// Merge: folds what eviction drops into what stays. The no-op merge drops nothing extra.
struct NoMerge {
  static constexpr std::string_view kName = "none";
  static constexpr PolicyKind kKind = PolicyKind::merge;
  struct State {};
  void validate() const {}
  bool active() const { return false; }          // false: the cache makes no row copies
  bool needs_eviction() const { return false; }  // folds only what an eviction policy drops
  bool allows_eviction() const { return true; }  // may follow an eviction policy
  bool acts_on_decode() const { return false; }  // decode() is called after every step
  bool observes_attention() const { return false; }
  void prefill(State&, const PrefillInput&, Selection&, MergeRows&) const {}
  // May return its own keep sets only in steps where the eviction kept everything.
  DecodeKeep decode(State&, const MergeDecodeInput&, MergeDecodeRows*) const {
    return std::nullopt;
  }
};

// ---- key-projection slot (kvc/policies/keyproj/*.hpp) -------------------------------------------
// A key projection changes how keys are held (low rank, pruned channels) and may restrict each
// decode step's attention to rows it selects (ShadowKV, Loki). Its state is per layer
// (LayerState, owned by the cache); rows are in-store indices, in the Quant store's order.
// What it sees at prefill, once per layer, before the storage heads are loaded:
struct KeyProjectionInput {
  const PrefillInput* prompt = nullptr;   // the layer's prompt: post-RoPE keys, queries, positions
  const Selection* selection = nullptr;   // the prompt tokens each storage head keeps
  HostView<const float, 3> keys_prerope;  // [Hkv, T, D]; size(1) == 0 when the caller gave none
  double rope_theta = 10000.0;            // the cache's RoPE (CacheOptions::rope), for projections
  bool rope_interleaved = false;          // that rotate reconstructed or appended keys
};
// The rows attention reads this step, per query head of a storage head ([g'] lists) or one list
// shared by the group ([1]); nullopt: every row.
using KeyRows = std::optional<std::vector<std::vector<std::int32_t>>>;  // [g'][k] ascending

struct NoKeyProjection {
  static constexpr std::string_view kName = "none";
  static constexpr PolicyKind kKind = PolicyKind::key_projection;
  struct LayerState {};
  void validate() const {}
  bool active() const { return false; }         // false: the cache skips every hook below
  bool needs_prerope() const { return false; }  // prefill needs KeyProjectionInput::keys_prerope
  bool owns_keys() const { return false; }      // keys come from keys(), not the Quant store
  // true: the Quant store of the layer holds its values in host memory (bytes().host)
  bool offloads_values(const LayerState&) const { return false; }
  bool supports_decode_eviction() const { return true; }
  bool needs_all_tokens() const { return false; }  // true: no eviction or merge stage before it
  void prefill(LayerState&, const KeyProjectionInput&) const {}
  // The rows the Quant store of storage head s receives (keys [n, D] post-RoPE, positions [n]).
  void load_head(LayerState&, int, HostView<const float, 2>, std::span<const std::int32_t>) const {}
  // A decode token of storage head s (key post-RoPE [D], value [D]).
  void append(LayerState&, int, const float*, const float*, std::int32_t) const {}
  // queries [g', D] of storage head s; keys [n, D] as the Quant store holds them.
  KeyRows select(const LayerState&, int, HostView<const float, 2>, HostView<const float, 2>) const {
    return std::nullopt;
  }
  // Keys of the given rows [k, D] post-RoPE (owns_keys()), and the values it keeps itself
  // written over the Quant store's on those rows (ShadowKV's device-resident values).
  void keys(const LayerState&, int, std::span<const std::int32_t>, HostView<float, 2>) const {}
  void patch_values(const LayerState&, int, std::span<const std::int32_t>,
                    HostView<float, 2>) const {}
  void gather(LayerState&, int, std::span<const std::int32_t>) const {}
  StorageBytes bytes(const LayerState&) const { return {}; }
};

// ---- layer-sharing slot (kvc/policies/sharing/*.hpp) -------------------------------------------
// Which layers hold K/V of their own. Layer l reads the K/V of layer reads[l] (l itself when it
// stores; a reader holds nothing, CLA); a layer with a partner stores its prompt tokens merged
// with the partner's (MiniCache: the lower layer of the pair holds what the two share).
struct SharingPlan {
  std::vector<int> reads;    // [L]; reads[l] <= l and reads[reads[l]] == reads[l]
  std::vector<int> partner;  // [L]; -1 = none, else partner[partner[l]] == l; only storing layers
};
inline SharingPlan no_sharing(int layers) {
  SharingPlan plan;
  plan.partner.assign(layers, -1);
  for (int l = 0; l < layers; ++l) plan.reads.push_back(l);
  return plan;
}

// What a plan sees: the layer count and, for a policy that chooses from the data
// (needs_prompt_keys()), the prompt keys of every layer (empty otherwise).
struct SharingInput {
  int num_layers = 1;
  std::span<const HostView<const float, 3>> keys;  // [L] of [Hkv, T, D]
};

// One storage head of a merged pair: the prompt rows of the lower (a) and upper (b) layer.
struct LayerPair {
  HostView<const float, 2> keys_a, keys_b;      // [T, D]
  HostView<const float, 2> values_a, values_b;  // [T, D]
};
// What a merge keeps of one storage head of a pair; the retained tokens' rows are the originals,
// which the cache stores per layer.
struct SharedHead {
  std::vector<std::int32_t> merged;       // [n_m] ascending token indices sharing one direction
  std::vector<std::int32_t> retained;     // [n_r] ascending token indices kept unmerged per layer
  std::vector<float> key_direction;       // [n_m, D] unit vectors, stored once for the pair
  std::vector<float> value_direction;     // [n_m, D]
  std::vector<float> key_magnitude[2];    // [2][n_m] per layer (0 = lower, 1 = upper)
  std::vector<float> value_magnitude[2];  // [2][n_m]
  std::vector<float> key_distance;        // [T] angular distance / pi of the keys
};

struct NoLayerSharing {
  static constexpr std::string_view kName = "none";
  static constexpr PolicyKind kKind = PolicyKind::layer_sharing;
  void validate() const {}
  bool needs_prompt_keys() const { return false; }
  SharingPlan plan(const SharingInput& in) const { return no_sharing(in.num_layers); }
  SharedHead merge(const LayerPair&) const {
    KVC_FAIL("layer sharing 'none' pairs no layers; merge() is never called");
  }
};

template <class P>
concept MergePolicy = Policy<P> && P::kKind ==
                      PolicyKind::merge&& std::default_initializable<typename P::State>&& requires(
                          const P& p, typename P::State& state, const PrefillInput& in,
                          Selection& selection, MergeRows& rows, const MergeDecodeInput& dec,
                          MergeDecodeRows* decode_rows) {
  { p.active() } -> std::convertible_to<bool>;
  { p.needs_eviction() } -> std::convertible_to<bool>;
  { p.allows_eviction() } -> std::convertible_to<bool>;
  { p.acts_on_decode() } -> std::convertible_to<bool>;
  { p.observes_attention() } -> std::convertible_to<bool>;
  p.prefill(state, in, selection, rows);
  { p.decode(state, dec, decode_rows) } -> std::same_as<DecodeKeep>;
};
template <class P>
concept KeyProjectionPolicy =
    Policy<P> && P::kKind ==
    PolicyKind::key_projection&& std::default_initializable<typename P::LayerState>&& requires(
        const P& p, typename P::LayerState& state, const typename P::LayerState& cstate,
        const KeyProjectionInput& in, HostView<const float, 2> rows,
        std::span<const std::int32_t> indices, const float* row, HostView<float, 2> out) {
  { p.active() } -> std::convertible_to<bool>;
  { p.needs_prerope() } -> std::convertible_to<bool>;
  { p.owns_keys() } -> std::convertible_to<bool>;
  { p.offloads_values(cstate) } -> std::convertible_to<bool>;
  { p.supports_decode_eviction() } -> std::convertible_to<bool>;
  { p.needs_all_tokens() } -> std::convertible_to<bool>;
  p.prefill(state, in);
  p.load_head(state, 0, rows, indices);
  p.append(state, 0, row, row, std::int32_t{0});
  { p.select(cstate, 0, rows, rows) } -> std::same_as<KeyRows>;
  p.keys(cstate, 0, indices, out);
  p.patch_values(cstate, 0, indices, out);
  p.gather(state, 0, indices);
  { p.bytes(cstate) } -> std::same_as<StorageBytes>;
};
// A layer-sharing policy: the plan (fixed for the cache's life, computed at construction, or at
// the first compress() when it needs every layer's prompt keys) and, for paired layers, the merge
// of one storage head.
template <class P>
concept LayerSharingPolicy = Policy<P> && P::kKind ==
                             PolicyKind::layer_sharing&& requires(const P& p,
                                                                  const SharingInput& in,
                                                                  const LayerPair& pair) {
  { p.needs_prompt_keys() } -> std::convertible_to<bool>;
  { p.plan(in) } -> std::same_as<SharingPlan>;
  { p.merge(pair) } -> std::same_as<SharedHead>;
};

static_assert(EvictionPolicy<NoEviction>);
static_assert(MergePolicy<NoMerge>);
static_assert(KeyProjectionPolicy<NoKeyProjection>);
static_assert(LayerSharingPolicy<NoLayerSharing>);

}  // namespace kvc
