// kvc/cache/key_projection.hpp: how KVCache drives its KeyProjection slot (the hooks are in
// kv_cache.hpp; the logic that is not a one-liner lives here): combination checks, attention over
// the rows and keys a projection hands out, and the byte accounting of the value tier.
//
//   kvc::check_key_projection(projection, eviction, quant, options);   // in the constructor
//   kvc::attend_projected(projection, state, s, q, store_keys, values, out, probabilities, opts);
//   kvc::StorageBytes b = kvc::projected_bytes(projection, state, quant, stores);
//
// A projection that owns the keys (ShadowKV, ThinK, Palu) leaves the Quant store to hold the
// values: the store still receives keys through its interface, but they are neither read nor
// counted, so the Quant policy must report its value bytes apart (NoQuant and KIVI do; any other
// fails at construction naming both stages).
#pragma once

#include <algorithm>
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "kvc/core/error.hpp"
#include "kvc/ops/attention.hpp"
#include "kvc/policies/any.hpp"
#include "kvc/policies/concepts.hpp"
#include "kvc/policies/quant/dense.hpp"
#include "kvc/policies/quant/kivi.hpp"

namespace kvc {

namespace detail {
template <class P>
std::string stage_name(const P& p) {
  if constexpr (requires { p.name(); })
    return std::string(p.name());
  else
    return std::string(P::kName);
}
}  // namespace detail

// Value bytes of one Quant store (payload, params, index), when the policy reports them apart.
inline std::optional<StorageBytes> value_tier_bytes(const NoQuant&, const NoQuant::HeadStore& s) {
  StorageBytes all = s.bytes();  // K and V: two f16 [n, D] tensors of the same size
  return StorageBytes{all.payload / 2, 0, all.index, 0};
}
inline std::optional<StorageBytes> value_tier_bytes(const Kivi&, const Kivi::HeadStore& s) {
  return StorageBytes{s.value_tensor().payload_bytes(), s.value_tensor().param_bytes(),
                      s.bytes().index, 0};
}
template <class Q>
std::optional<StorageBytes> value_tier_bytes(const Q&, const typename Q::HeadStore&) {
  return std::nullopt;
}
template <class... Ps>
std::optional<StorageBytes> value_tier_bytes(const AnyQuant<Ps...>& q,
                                             const typename AnyQuant<Ps...>::HeadStore& s) {
  return std::visit(
      [&](const auto& p) -> std::optional<StorageBytes> {
        using P = std::decay_t<decltype(p)>;
        const auto* store = s.template get_if<typename P::HeadStore>();
        if (!store) return std::nullopt;
        return value_tier_bytes(p, *store);
      },
      q.policy);
}
// Whether the policy's stores report value bytes apart (checked before any store exists).
template <class Q>
bool has_value_tier(const Q& q) {
  return value_tier_bytes(q, typename Q::HeadStore{}).has_value();
}
template <class... Ps>
bool has_value_tier(const AnyQuant<Ps...>& q) {
  return std::visit([](const auto& p) { return has_value_tier(p); }, q.policy);
}

// Rejects the combinations a key projection cannot serve, naming both stages.
template <class KP, class Eviction, class Merge, class Quant>
void check_key_projection(const KP& kp, const Eviction& eviction, const Merge& merge,
                          const Quant& quant, bool reindexed_positions) {
  if (!kp.active()) return;
  const std::string name = detail::stage_name(kp);
  bool merge_rewrites = false;  // a decode-time merge rewrites stored keys behind the projection
  if constexpr (requires { merge.acts_on_decode(); }) merge_rewrites = merge.acts_on_decode();
  KVC_CHECK(!(merge_rewrites && kp.owns_keys()), "cannot combine ", detail::stage_name(merge),
            " (rewrites stored keys during decode) with ", name, " (it holds the keys itself)");
  KVC_CHECK(!reindexed_positions, "cannot use ", name,
            " with reindexed positions: key projections keep absolute positions (keys rotated "
            "with their original position)");
  KVC_CHECK(!(eviction.evicts_on_decode() && !kp.supports_decode_eviction()), "cannot combine ",
            detail::stage_name(eviction), " (evicts tokens during decode) with ", name,
            " (its key representation spans the whole prompt, single tokens cannot leave it)");
  bool merging = false;
  if constexpr (requires { merge.active(); }) merging = merge.active();
  KVC_CHECK(
      !kp.needs_all_tokens() || (detail::stage_name(eviction) == NoEviction::kName && !merging),
      "cannot combine ", merging ? detail::stage_name(merge) : detail::stage_name(eviction),
      " with ", name, ": ", name,
      " needs every prompt token of every KV head (it decomposes the whole prompt)");
  bool keeps_evicted = false;
  if constexpr (requires { quant.keeps_evicted(); }) keeps_evicted = quant.keeps_evicted();
  KVC_CHECK(!keeps_evicted, "cannot combine ", name, " with ", detail::stage_name(quant),
            " (it keeps evicted tokens in its own ranked layout)");
  KVC_CHECK(!kp.owns_keys() || has_value_tier(quant), "cannot combine ", name, " with ",
            detail::stage_name(quant), ": ", name,
            " holds the keys and the Quant stage must hold the values alone; supported: none, "
            "kivi");
}

// Attention of the query group [g', D] of storage head s over the rows and keys the projection
// gives. probabilities, when given, receives [g', n] with 0 on rows not read this step.
template <class KP>
void attend_projected(const KP& kp, const typename KP::LayerState& state, int s,
                      HostView<const float, 2> queries,     // [g', D]
                      HostView<const float, 2> store_keys,  // [n, D] as the Quant store holds them
                      HostView<const float, 2> values,      // [n, D]
                      HostView<float, 2> out,               // [g', D]
                      std::vector<float>* probabilities,    // [g' * n] or null
                      const ops::AttentionOptions& options) {
  const std::int64_t n = store_keys.size(0), d = store_keys.size(1);
  const std::int64_t group = queries.size(0);
  const KeyRows picked = kp.select(state, s, queries, store_keys);
  std::vector<std::int32_t> all;
  if (!picked) {
    all.resize(n);
    for (std::int64_t i = 0; i < n; ++i) all[i] = static_cast<std::int32_t>(i);
  }
  KVC_CHECK(!picked || picked->size() == 1 || static_cast<std::int64_t>(picked->size()) == group,
            detail::stage_name(kp), " selected rows for ", picked ? picked->size() : 0,
            " query heads of a group of ", group);
  if (probabilities) probabilities->assign(static_cast<std::size_t>(group * n), 0.0f);
  std::vector<float> keys, vals, p;
  std::vector<std::int32_t> previous;
  for (std::int64_t h = 0; h < group; ++h) {
    const std::vector<std::int32_t>& rows = !picked ? all : (*picked)[picked->size() == 1 ? 0 : h];
    const auto k = static_cast<std::int64_t>(rows.size());
    KVC_CHECK(k >= 1, detail::stage_name(kp), " selected no rows for storage head ", s);
    if (h == 0 || rows != previous) {  // the group usually shares its rows: gather once
      keys.resize(static_cast<std::size_t>(k * d));
      vals.resize(keys.size());
      for (std::int64_t i = 0; i < k; ++i) {
        KVC_CHECK(rows[i] >= 0 && rows[i] < n && (i == 0 || rows[i] > rows[i - 1]),
                  detail::stage_name(kp), ": selected rows must be ascending in [0, ", n, ")");
        for (std::int64_t c = 0; c < d; ++c) vals[i * d + c] = values(rows[i], c);
      }
      kp.patch_values(state, s, rows, make_view(vals.data(), {k, d}));
      if (kp.owns_keys()) {
        kp.keys(state, s, rows, make_view(keys.data(), {k, d}));
      } else {
        for (std::int64_t i = 0; i < k; ++i)
          for (std::int64_t c = 0; c < d; ++c) keys[i * d + c] = store_keys(rows[i], c);
      }
      previous = rows;
    }
    p.resize(static_cast<std::size_t>(k));
    ops::decode_attention(Cpu{}, queries.slice(0, h, h + 1),
                          make_view(static_cast<const float*>(keys.data()), {1, k, d}),
                          make_view(static_cast<const float*>(vals.data()), {1, k, d}),
                          out.slice(0, h, h + 1), make_view(p.data(), {1, k}), options);
    if (probabilities)
      for (std::int64_t i = 0; i < k; ++i) (*probabilities)[h * n + rows[i]] = p[i];
  }
}

// Dense keys of every row of storage head s [n, D]: the projection's when it owns them.
template <class KP>
void projected_keys(const KP& kp, const typename KP::LayerState& state, int s,
                    HostView<float, 2> out) {
  std::vector<std::int32_t> all(static_cast<std::size_t>(out.size(0)));
  for (std::size_t i = 0; i < all.size(); ++i) all[i] = static_cast<std::int32_t>(i);
  kp.keys(state, s, all, out);
}

// Bytes of a layer under a key projection: its own, plus the Quant stores' values (host bytes
// when it offloads them), plus their keys when it does not own the keys (Loki).
template <class KP, class Quant, class Stores>
StorageBytes projected_bytes(const KP& kp, const typename KP::LayerState& state, const Quant& quant,
                             const Stores& stores) {
  StorageBytes total = kp.bytes(state);
  for (const auto& store : stores) {
    if (!kp.owns_keys()) {
      total += store.bytes();
      continue;
    }
    const std::optional<StorageBytes> v = value_tier_bytes(quant, store);
    KVC_CHECK(v.has_value(), detail::stage_name(quant),
              " does not report its value bytes apart from its key bytes");
    if (kp.offloads_values(state)) {
      total.host += v->payload + v->params;
      total.index += v->index;
    } else {
      total += *v;
    }
  }
  return total;
}

}  // namespace kvc
