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
#include <variant>

#include "kvc/policies/concepts.hpp"

namespace kvc {

namespace detail {
template <class Alternative, class Variant>
Alternative& ensure_alternative(Variant& v) {
  if (!std::holds_alternative<Alternative>(v)) v.template emplace<Alternative>();
  return std::get<Alternative>(v);
}
}  // namespace detail

template <class... Policies>
struct AnyEviction {
  static_assert((EvictionPolicy<Policies> && ...));
  static constexpr std::string_view kName = "any-eviction";
  static constexpr PolicyKind kKind = PolicyKind::eviction;

  std::variant<Policies...> policy;

  struct State {
    std::variant<typename Policies::State...> state;
  };

  std::string_view name() const {
    return std::visit(
        [](const auto& p) { return std::string_view(std::decay_t<decltype(p)>::kName); }, policy);
  }
  void validate() const {
    std::visit([](const auto& p) { p.validate(); }, policy);
  }
  bool evicts_on_decode() const {
    return std::visit([](const auto& p) { return p.evicts_on_decode(); }, policy);
  }
  bool observes_attention() const {
    return std::visit([](const auto& p) { return p.observes_attention(); }, policy);
  }
  Selection prefill(State& s, const PrefillInput& in) const {
    return std::visit(
        [&](const auto& p) {
          using P = std::decay_t<decltype(p)>;
          return p.prefill(detail::ensure_alternative<typename P::State>(s.state), in);
        },
        policy);
  }
  DecodeKeep decode(State& s, const DecodeInput& in) const {
    return std::visit(
        [&](const auto& p) {
          using P = std::decay_t<decltype(p)>;
          return p.decode(detail::ensure_alternative<typename P::State>(s.state), in);
        },
        policy);
  }
};

template <class... Policies>
struct AnyQuant {
  static_assert((QuantPolicy<Policies> && ...));
  static constexpr std::string_view kName = "any-quant";
  static constexpr PolicyKind kKind = PolicyKind::quant;

  std::variant<Policies...> policy;

  std::string_view name() const {
    return std::visit(
        [](const auto& p) { return std::string_view(std::decay_t<decltype(p)>::kName); }, policy);
  }
  void validate() const {
    std::visit([](const auto& p) { p.validate(); }, policy);
  }
  bool supports_decode_eviction() const {
    return std::visit([](const auto& p) { return p.supports_decode_eviction(); }, policy);
  }
  // Policies that keep evicted tokens at lower precision (MiKV); false for the others.
  bool keeps_evicted() const {
    return std::visit(
        [](const auto& p) {
          if constexpr (requires { p.keeps_evicted(); })
            return p.keeps_evicted();
          else
            return false;
        },
        policy);
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
      std::visit(
          [&](const auto& p) {
            using P = std::decay_t<decltype(p)>;
            f(p, detail::ensure_alternative<typename P::HeadStore>(store_));
          },
          q.policy);
    }
    std::variant<typename Policies::HeadStore...> store_;
  };
};

}  // namespace kvc
