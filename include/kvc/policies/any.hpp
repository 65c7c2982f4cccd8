// kvc/policies/any.hpp: policies chosen at run time: a slot that holds one of several policies of
// the same kind, so one KVCache instantiation serves every spec `kvc eval` is given.
//
//   using Eviction = kvc::AnyEviction<kvc::NoEviction, kvc::StreamingLlm, kvc::SnapKv>;
//   Eviction e{kvc::SnapKv{.budget = 256}};
//   e.name();   // "snapkv"
//
// Each adapter satisfies its kind's concept by forwarding to the policy it holds; its per-layer or
// per-head state is the matching alternative of a variant of the policies' states, created on
// first use. std::variant of trivially copyable types is trivially copyable, so the adapters stay
// policies in the sense of DESIGN.md section 6.
#pragma once

#include <string_view>
#include <type_traits>
#include <utility>
#include <variant>

#include "kvc/policies/concepts.hpp"

namespace kvc {

namespace detail {
template <class Alternative, class Variant>
Alternative& ensure_alternative(Variant& v) {
  if (!std::holds_alternative<Alternative>(v)) v.template emplace<Alternative>();
  return std::get<Alternative>(v);
}

// What every adapter shares: the policy it holds, that policy's name and validation, and call(f)
// = f(the policy held). Adapters add their kind's queries and steps, forwarded through call.
template <class... Policies>
struct AnyPolicy {
  std::variant<Policies...> policy;

  std::string_view name() const {
    return call([]<class P>(const P&) { return std::string_view(P::kName); });
  }
  void validate() const {
    call([](const auto& p) { p.validate(); });
  }
  template <class F>
  decltype(auto) call(F&& f) const {
    return std::visit(std::forward<F>(f), policy);
  }
};
}  // namespace detail

template <class... Policies>
struct AnyEviction : detail::AnyPolicy<Policies...> {
  static_assert((EvictionPolicy<Policies> && ...));
  static constexpr std::string_view kName = "any-eviction";
  static constexpr PolicyKind kKind = PolicyKind::eviction;

  struct State {
    std::variant<typename Policies::State...> state;
  };

  bool evicts_on_decode() const {
    return this->call([](const auto& p) { return p.evicts_on_decode(); });
  }
  bool observes_attention() const {
    return this->call([](const auto& p) { return p.observes_attention(); });
  }
  Selection prefill(State& s, const PrefillInput& in) const {
    return this->call([&]<class P>(const P& p) {
      return p.prefill(detail::ensure_alternative<typename P::State>(s.state), in);
    });
  }
  DecodeKeep decode(State& s, const DecodeInput& in) const {
    return this->call([&]<class P>(const P& p) {
      return p.decode(detail::ensure_alternative<typename P::State>(s.state), in);
    });
  }
};

// ---- Merge slot --------------------------------------------------------------------------------
template <class... Policies>
struct AnyMerge : detail::AnyPolicy<Policies...> {
  static_assert((MergePolicy<Policies> && ...));
  static constexpr std::string_view kName = "any-merge";
  static constexpr PolicyKind kKind = PolicyKind::merge;

  struct State {
    std::variant<typename Policies::State...> state;
  };

  bool active() const {
    return this->call([](const auto& p) { return p.active(); });
  }
  bool needs_eviction() const {
    return this->call([](const auto& p) { return p.needs_eviction(); });
  }
  bool allows_eviction() const {
    return this->call([](const auto& p) { return p.allows_eviction(); });
  }
  bool acts_on_decode() const {
    return this->call([](const auto& p) { return p.acts_on_decode(); });
  }
  bool observes_attention() const {
    return this->call([](const auto& p) { return p.observes_attention(); });
  }
  void prefill(State& s, const PrefillInput& in, Selection& selection, MergeRows& rows) const {
    this->call([&]<class P>(const P& p) {
      p.prefill(detail::ensure_alternative<typename P::State>(s.state), in, selection, rows);
    });
  }
  DecodeKeep decode(State& s, const MergeDecodeInput& in, MergeDecodeRows* rows) const {
    return this->call([&]<class P>(const P& p) {
      return p.decode(detail::ensure_alternative<typename P::State>(s.state), in, rows);
    });
  }
};

template <class... Policies>
struct AnyQuant : detail::AnyPolicy<Policies...> {
  static_assert((QuantPolicy<Policies> && ...));
  static constexpr std::string_view kName = "any-quant";
  static constexpr PolicyKind kKind = PolicyKind::quant;

  bool supports_decode_eviction() const {
    return this->call([](const auto& p) { return p.supports_decode_eviction(); });
  }
  // Policies that keep evicted tokens at lower precision (MiKV); false for the others.
  bool keeps_evicted() const {
    return this->call([](const auto& p) {
      if constexpr (requires { p.keeps_evicted(); })
        return p.keeps_evicted();
      else
        return false;
    });
  }

  class HeadStore {
   public:
    void load(const AnyQuant& q, HostView<const float, 2> keys, HostView<const float, 2> values,
              std::span<const std::int32_t> positions) {
      with(q, [&](const auto& p, auto& store) { store.load(p, keys, values, positions); });
    }
    void append(const AnyQuant& q, const float* key, const float* value, std::int32_t position) {
      with(q, [&](const auto& p, auto& store) { store.append(p, key, value, position); });
    }
    // Tells the store its (layer, KV head), for stores whose parameters depend on it (CQ
    // codebooks).
    void locate(const AnyQuant& q, int layer, int kv_head) {
      with(q, [&](const auto& p, auto& store) {
        if constexpr (requires { store.locate(p, layer, kv_head); })
          store.locate(p, layer, kv_head);
      });
    }
    // Shows the store the layer's whole prefill (keys, values [Hkv, T, D]), for layer-wide
    // parameters (FP8 per-tensor scales).
    void see_layer(const AnyQuant& q, HostView<const float, 3> keys,
                   HostView<const float, 3> values) {
      with(q, [&](const auto& p, auto& store) {
        if constexpr (requires { store.see_layer(p, keys, values); })
          store.see_layer(p, keys, values);
      });
    }
    // Shows the store the prompt keys of every KV head of its layer [Hkv, T, D] (VidKV).
    void see_layer(const AnyQuant& q, HostView<const float, 3> keys) {
      with(q, [&](const auto& p, auto& store) {
        if constexpr (requires { store.see_layer(p, keys); }) store.see_layer(p, keys);
      });
    }
    // MiKV forwarding: every token plus the kept set; active (high-precision) tokens; demotion.
    void load_ranked(const AnyQuant& q, HostView<const float, 2> keys,
                     HostView<const float, 2> values, std::span<const std::int32_t> positions,
                     std::span<const std::int32_t> kept) {
      with(q, [&](const auto& p, auto& store) {
        if constexpr (requires { store.load_ranked(p, keys, values, positions, kept); })
          store.load_ranked(p, keys, values, positions, kept);
        else
          KVC_FAIL(std::decay_t<decltype(p)>::kName, " does not keep evicted tokens");
      });
    }
    int active_count() const {
      return std::visit(
          [](const auto& s) {
            if constexpr (requires { s.active_count(); })
              return s.active_count();
            else
              return s.size();
          },
          store_);
    }
    bool is_active(int i) const {
      return std::visit(
          [&](const auto& s) {
            if constexpr (requires { s.is_active(i); })
              return s.is_active(i);
            else
              return true;
          },
          store_);
    }
    void demote(const AnyQuant& q, std::span<const std::int32_t> keep) {
      with(q, [&](const auto& p, auto& store) {
        if constexpr (requires { store.demote(p, keep); })
          store.demote(p, keep);
        else
          KVC_FAIL(std::decay_t<decltype(p)>::kName, " cannot demote tokens");
      });
    }
    void after_step(const AnyQuant& q) {
      with(q, [&](const auto& p, auto& store) { store.after_step(p); });
    }
    int size() const {
      return std::visit([](const auto& s) { return s.size(); }, store_);
    }
    std::span<const std::int32_t> positions() const {
      return std::visit([](const auto& s) { return s.positions(); }, store_);
    }
    void keys(HostView<float, 2> out) const {
      std::visit([&](const auto& s) { s.keys(out); }, store_);
    }
    void values(HostView<float, 2> out) const {
      std::visit([&](const auto& s) { s.values(out); }, store_);
    }
    StorageBytes bytes() const {
      return std::visit([](const auto& s) { return s.bytes(); }, store_);
    }
    void gather(std::span<const std::int32_t> keep) {
      std::visit([&](auto& s) { s.gather(keep); }, store_);
    }
    // The concrete store, for callers that know which policy they configured.
    template <class Store>
    const Store* get_if() const {
      return std::get_if<Store>(&store_);
    }

   private:
    template <class F>
    void with(const AnyQuant& q, F&& f) {
      q.call([&]<class P>(const P& p) {
        f(p, detail::ensure_alternative<typename P::HeadStore>(store_));
      });
    }
    std::variant<typename Policies::HeadStore...> store_;
  };
};

// ---- layer sharing (MiniCache, CLA): stateless, so the adapter only forwards ------------------
template <class... Policies>
struct AnyLayerSharing : detail::AnyPolicy<Policies...> {
  static_assert((LayerSharingPolicy<Policies> && ...));
  static constexpr std::string_view kName = "any-layer-sharing";
  static constexpr PolicyKind kKind = PolicyKind::layer_sharing;

  bool needs_prompt_keys() const {
    return this->call([](const auto& p) { return p.needs_prompt_keys(); });
  }
  SharingPlan plan(const SharingInput& in) const {
    return this->call([&](const auto& p) { return p.plan(in); });
  }
  SharedHead merge(const LayerPair& pair) const {
    return this->call([&](const auto& p) { return p.merge(pair); });
  }
};

// ---- key projection (ShadowKV, ThinK, Loki, Palu): per-layer state as a variant ----------------
template <class... Policies>
struct AnyKeyProjection : detail::AnyPolicy<Policies...> {
  static_assert((KeyProjectionPolicy<Policies> && ...));
  static constexpr std::string_view kName = "any-key-projection";
  static constexpr PolicyKind kKind = PolicyKind::key_projection;

  struct LayerState {
    std::variant<typename Policies::LayerState...> state;
  };

  bool active() const {
    return this->call([](const auto& p) { return p.active(); });
  }
  bool needs_prerope() const {
    return this->call([](const auto& p) { return p.needs_prerope(); });
  }
  bool owns_keys() const {
    return this->call([](const auto& p) { return p.owns_keys(); });
  }
  bool supports_decode_eviction() const {
    return this->call([](const auto& p) { return p.supports_decode_eviction(); });
  }
  bool needs_all_tokens() const {
    return this->call([](const auto& p) { return p.needs_all_tokens(); });
  }
  bool offloads_values(const LayerState& s) const {
    return with(s, [](const auto& p, const auto& st) { return p.offloads_values(st); });
  }
  void prefill(LayerState& s, const KeyProjectionInput& in) const {
    with(s, [&](const auto& p, auto& st) { p.prefill(st, in); });
  }
  void load_head(LayerState& s, int head, HostView<const float, 2> keys,
                 std::span<const std::int32_t> positions) const {
    with(s, [&](const auto& p, auto& st) { p.load_head(st, head, keys, positions); });
  }
  void append(LayerState& s, int head, const float* key, const float* value,
              std::int32_t position) const {
    with(s, [&](const auto& p, auto& st) { p.append(st, head, key, value, position); });
  }
  KeyRows select(const LayerState& s, int head, HostView<const float, 2> queries,
                 HostView<const float, 2> keys) const {
    return with(s,
                [&](const auto& p, const auto& st) { return p.select(st, head, queries, keys); });
  }
  void keys(const LayerState& s, int head, std::span<const std::int32_t> rows,
            HostView<float, 2> out) const {
    with(s, [&](const auto& p, const auto& st) { p.keys(st, head, rows, out); });
  }
  void patch_values(const LayerState& s, int head, std::span<const std::int32_t> rows,
                    HostView<float, 2> values) const {
    with(s, [&](const auto& p, const auto& st) { p.patch_values(st, head, rows, values); });
  }
  void gather(LayerState& s, int head, std::span<const std::int32_t> keep) const {
    with(s, [&](const auto& p, auto& st) { p.gather(st, head, keep); });
  }
  StorageBytes bytes(const LayerState& s) const {
    return with(s, [](const auto& p, const auto& st) { return p.bytes(st); });
  }

 private:
  // The policy held and its alternative of the state (created on first mutable use; a const
  // state that was never prefilled reads a default one).
  template <class F>
  auto with(LayerState& s, F&& f) const {
    return this->call([&]<class P>(const P& p) {
      return f(p, detail::ensure_alternative<typename P::LayerState>(s.state));
    });
  }
  template <class F>
  auto with(const LayerState& s, F&& f) const {
    return this->call([&]<class P>(const P& p) {
      using S = typename P::LayerState;
      if (const S* st = std::get_if<S>(&s.state)) return f(p, *st);
      static const S empty{};
      return f(p, empty);
    });
  }
};

}  // namespace kvc
