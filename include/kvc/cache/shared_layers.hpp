// kvc/cache/shared_layers.hpp: the cache side of the LayerSharing slot: the role of each layer in
// a SharingPlan, the storage of a merged pair (MiniCache) and its restore path.
//
//   kvc::check_sharing_plan(plan, layers, "cla");          // throws on a malformed plan
//   kvc::LayerShare<kvc::NoQuant> share;                     // one per layer, owned by KVCache
//   kvc::merge_layer_pair(quant, minicache, ka, va, kb, vb, positions, own_a, own_b, sa, sb);
//
// A merged pair (a < b) stores per storage head: in layer a, `shared`, a Quant store holding the
// unit shared directions of the merged tokens (keys and values, with their positions, once for the
// pair); in each layer its f16 magnitudes of those tokens and, in its own Quant store (the cache's
// usual per-head store), the retained tokens' original rows followed by its decode-time tokens.
// Rows are restored as direction x magnitude, merged with the own store in position order.
// Bytes: shared store (layer a) + 2 bytes per magnitude (payload) + own store, per layer.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "kvc/core/dtype.hpp"
#include "kvc/core/error.hpp"
#include "kvc/core/view.hpp"
#include "kvc/policies/concepts.hpp"

namespace kvc {

// The name of a sharing policy in messages: name() of a runtime variant, else kName.
template <class P>
std::string sharing_name(const P& p) {
  if constexpr (requires { p.name(); })
    return std::string(p.name());
  else
    return std::string(P::kName);
}

// Throws unless plan is well formed for `layers` layers (see SharingPlan).
inline void check_sharing_plan(const SharingPlan& plan, int layers, const std::string& name) {
  KVC_CHECK(static_cast<int>(plan.reads.size()) == layers &&
                static_cast<int>(plan.partner.size()) == layers,
            name, ": the sharing plan covers ", plan.reads.size(), " layers; the cache has ",
            layers);
  for (int l = 0; l < layers; ++l) {
    const int s = plan.reads[l];
    KVC_CHECK(s >= 0 && s <= l, name, ": layer ", l, " reads layer ", s, "; allowed [0, ", l, "]");
    KVC_CHECK(plan.reads[s] == s, name, ": layer ", l, " reads layer ", s,
              ", which itself reads layer ", plan.reads[s]);
    const int p = plan.partner[l];
    KVC_CHECK(p == -1 || (p >= 0 && p < layers && p != l && plan.partner[p] == l &&
                          plan.reads[l] == l && plan.reads[p] == p),
              name, ": layer ", l, " is paired with layer ", p,
              "; pairs must be mutual, of distinct storing layers");
  }
}

template <class Quant>
struct LayerShare {
  using Store = typename Quant::HeadStore;
  int reads = -1;    // the layer whose K/V this one reads (itself when it stores); -1: no plan yet
  int partner = -1;  // the other layer of its merged pair, -1 = none
  // The lower layer of a pair compressed before its partner: its whole prompt kept in f32.
  bool pending = false;
  std::vector<float> pending_keys, pending_values;   // [Hkv, T, D]
  bool merged = false;                               // rows = shared x magnitude + own store
  std::vector<Store> shared;                         // [S], lower layer of a pair only
  std::vector<std::vector<f16>> key_magnitude;       // [S][n_m]
  std::vector<std::vector<f16>> value_magnitude;     // [S][n_m]
  std::vector<std::vector<std::int32_t>> positions;  // [S][n] every stored token, ascending

  bool reader(int layer) const { return reads >= 0 && reads != layer; }
  StorageBytes extra_bytes() const {
    StorageBytes b;
    for (const auto& s : shared) b += s.bytes();
    for (std::size_t s = 0; s < key_magnitude.size(); ++s)
      b.payload += static_cast<std::int64_t>((key_magnitude[s].size() + value_magnitude[s].size()) *
                                             sizeof(f16));
    return b;
  }
};

// Rows of storage head s of a merged layer in ascending position order: shared directions times
// this layer's magnitudes, interleaved with the own store's rows. Returns n; keys/values [n, D].
template <class Store>
std::int64_t merged_rows(const Store& shared, const std::vector<f16>& key_magnitude,
                         const std::vector<f16>& value_magnitude, const Store& own, int d,
                         std::vector<float>& keys, std::vector<float>& values) {
  const std::int64_t ns = shared.size(), no = own.size();
  std::vector<float> sk(static_cast<std::size_t>(ns) * d), sv(sk.size());
  std::vector<float> ok(static_cast<std::size_t>(no) * d), ov(ok.size());
  shared.keys(make_view(sk.data(), {ns, static_cast<std::int64_t>(d)}));
  shared.values(make_view(sv.data(), {ns, static_cast<std::int64_t>(d)}));
  own.keys(make_view(ok.data(), {no, static_cast<std::int64_t>(d)}));
  own.values(make_view(ov.data(), {no, static_cast<std::int64_t>(d)}));
  keys.resize(static_cast<std::size_t>(ns + no) * d);
  values.resize(keys.size());
  const auto sp = shared.positions();
  const auto op = own.positions();
  std::int64_t i = 0, j = 0;
  for (std::int64_t r = 0; r < ns + no; ++r) {
    if (j >= no || (i < ns && sp[i] < op[j])) {
      const float km = static_cast<float>(key_magnitude[i]);
      const float vm = static_cast<float>(value_magnitude[i]);
      for (int c = 0; c < d; ++c) {
        keys[r * d + c] = sk[i * d + c] * km;
        values[r * d + c] = sv[i * d + c] * vm;
      }
      ++i;
    } else {
      for (int c = 0; c < d; ++c) {
        keys[r * d + c] = ok[j * d + c];
        values[r * d + c] = ov[j * d + c];
      }
      ++j;
    }
  }
  return ns + no;
}

// Positions of a merged head: the shared store's and the own store's, merged ascending.
template <class Store>
std::vector<std::int32_t> merged_positions(const Store& shared, const Store& own) {
  const auto sp = shared.positions();
  const auto op = own.positions();
  std::vector<std::int32_t> out;
  out.reserve(sp.size() + op.size());
  std::size_t i = 0, j = 0;
  while (i < sp.size() || j < op.size())
    out.push_back(j >= op.size() || (i < sp.size() && sp[i] < op[j]) ? sp[i++] : op[j++]);
  return out;
}

namespace detail {
// Shows a store its (layer, head) and its rows [1, n, D] as the layer's data, for stores whose
// parameters are fit to the data (fp8 per-tensor scales, VidKV channel ranking, CQ codebooks).
template <class Quant, class Store>
void introduce(const Quant& q, Store& store, int layer, int head, HostView<const float, 2> keys,
               HostView<const float, 2> values) {
  const auto k3 = make_view(keys.data, {1, keys.size(0), keys.size(1)});
  const auto v3 = make_view(values.data, {1, values.size(0), values.size(1)});
  if constexpr (requires { store.see_layer(q, k3); }) store.see_layer(q, k3);
  if constexpr (requires { store.locate(q, layer, head); }) store.locate(q, layer, head);
  if constexpr (requires { store.see_layer(q, k3, v3); }) store.see_layer(q, k3, v3);
}
}  // namespace detail

// Merges the prompts of the layer pair (a, b) (keys/values [Hkv, T, D], positions [T]) with
// `sharing.merge` per KV head and fills both layers' stores (see the header comment).
template <class Quant, class Sharing>
void merge_layer_pair(const Quant& q, const Sharing& sharing, int layer_a, int layer_b,
                      HostView<const float, 3> keys_a, HostView<const float, 3> values_a,
                      HostView<const float, 3> keys_b, HostView<const float, 3> values_b,
                      std::span<const std::int32_t> positions,
                      std::vector<typename Quant::HeadStore>& own_a,
                      std::vector<typename Quant::HeadStore>& own_b, LayerShare<Quant>& share_a,
                      LayerShare<Quant>& share_b) {
  const std::int64_t heads = keys_a.size(0), tokens = keys_a.size(1), d = keys_a.size(2);
  KVC_CHECK(keys_b.size(0) == heads && keys_b.size(1) == tokens, sharing_name(sharing), ": layers ",
            layer_a, " and ", layer_b, " must hold the same prompt tokens to be merged, got ",
            tokens, " and ", keys_b.size(1));
  using Store = typename Quant::HeadStore;
  own_a.assign(heads, Store{});
  own_b.assign(heads, Store{});
  share_a.shared.assign(heads, Store{});
  for (auto* share : {&share_a, &share_b}) {
    share->key_magnitude.assign(heads, {});
    share->value_magnitude.assign(heads, {});
    share->positions.assign(heads, {});
    share->merged = true;
  }
  std::vector<float> rk, rv;
  std::vector<std::int32_t> rp;
  for (std::int64_t h = 0; h < heads; ++h) {
    const LayerPair pair{keys_a.sub(h), keys_b.sub(h), values_a.sub(h), values_b.sub(h)};
    const SharedHead merged = sharing.merge(pair);
    const auto nm = static_cast<std::int64_t>(merged.merged.size());
    rp.clear();
    for (auto i : merged.merged) rp.push_back(positions[i]);
    const auto dk = make_view(merged.key_direction.data(), {nm, d});
    const auto dv = make_view(merged.value_direction.data(), {nm, d});
    detail::introduce(q, share_a.shared[h], layer_a, static_cast<int>(h), dk, dv);
    share_a.shared[h].load(q, dk, dv, rp);
    for (int which = 0; which < 2; ++which) {
      LayerShare<Quant>& share = which == 0 ? share_a : share_b;
      for (std::int64_t m = 0; m < nm; ++m) {
        share.key_magnitude[h].push_back(f16(merged.key_magnitude[which][m]));
        share.value_magnitude[h].push_back(f16(merged.value_magnitude[which][m]));
      }
      const auto& src_k = which == 0 ? pair.keys_a : pair.keys_b;
      const auto& src_v = which == 0 ? pair.values_a : pair.values_b;
      const auto nr = static_cast<std::int64_t>(merged.retained.size());
      rk.resize(static_cast<std::size_t>(nr * d));
      rv.resize(rk.size());
      rp.clear();
      for (std::int64_t r = 0; r < nr; ++r) {
        rp.push_back(positions[merged.retained[r]]);
        for (std::int64_t c = 0; c < d; ++c) {
          rk[r * d + c] = src_k(merged.retained[r], c);
          rv[r * d + c] = src_v(merged.retained[r], c);
        }
      }
      Store& own = which == 0 ? own_a[h] : own_b[h];
      const auto ok = make_view(static_cast<const float*>(rk.data()), {nr, d});
      const auto ov = make_view(static_cast<const float*>(rv.data()), {nr, d});
      detail::introduce(q, own, which == 0 ? layer_a : layer_b, static_cast<int>(h), ok, ov);
      own.load(q, ok, ov, rp);
    }
    share_a.positions[h] = merged_positions(share_a.shared[h], own_a[h]);
    share_b.positions[h] = merged_positions(share_a.shared[h], own_b[h]);
  }
}

}  // namespace kvc
