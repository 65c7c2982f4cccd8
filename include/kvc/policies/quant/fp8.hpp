// kvc/policies/quant/fp8.hpp: FP8 K/V (OCP E4M3 or E5M2), one byte per element, with fp32 scales:
// static (given, per tensor) or computed from the prefill (vLLM's calculate_kv_scales semantics),
// per storage head or per tensor (the whole layer).
//
//   struct Config : kvc::DefaultConfig { using Quant = kvc::Fp8; };
//   kvc::Fp8 fp8{.kind = kvc::ops::Fp8Kind::e4m3};                 // scales from the data
//   // kvc eval: --policy 'fp8'  --policy 'fp8(kind=e5m2,scope=tensor)'  --policy 'fp8(scale=0.05)'
//
// Parameters and defaults: kind = e4m3 (or e5m2); kscale = vscale = 0 (computed); scope = head.
// A scale > 0 is static: the same value for every layer and head (a per-tensor scale, as engines
// load it from the checkpoint). A computed scale (K and V apart) is
//   scale = max|x| / fp8_max (448 for E4M3, 57344 for E5M2), in fp32, computed once,
// with max|x| over the tokens the storage head receives at prefill (scope = head) or over the
// layer's whole prompt, every KV head, before eviction (scope = tensor; KVCache::compress shows it
// through see_layer); 1 when that maximum is 0 or there is no prefill token.
// When it acts: at prefill compression and at every append (each token is encoded on arrival).
// Encoding: code = fp8(x / scale) (fp32 division, round to nearest even, saturating at +-fp8_max:
// later tokens larger than the prefill maximum clip); decoding: float(code) * scale.
// NaN/Inf keys or values are rejected with a kvc::Error naming layer, KV head (when the cache
// located the store), position and channel, never encoded.
// State per storage head: codes, the two scales, positions. Deterministic. Tokens are independent,
// so decode-time eviction works. Layout and byte accounting: docs/formats.md.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <span>
#include <string_view>
#include <vector>

#include "kvc/ops/quantize.hpp"
#include "kvc/ops/select.hpp"
#include "kvc/policies/concepts.hpp"
#include "kvc/policies/quant/quantized_rows.hpp"

namespace kvc {

// What a computed FP8 scale covers: one storage head's prefill, or the whole layer's (all KV
// heads, every prompt token, before eviction: vLLM's per-layer k_scale / v_scale).
enum class Fp8Scope { head, tensor };

struct Fp8 {
  static constexpr std::string_view kName = "fp8";
  static constexpr PolicyKind kKind = PolicyKind::quant;

  ops::Fp8Kind kind = ops::Fp8Kind::e4m3;
  double key_scale = 0;             // > 0: static per-tensor scale; 0: computed from the prefill
  double value_scale = 0;           // the same for values
  Fp8Scope scope = Fp8Scope::head;  // what a computed scale covers

  void validate() const {
    for (double s : {key_scale, value_scale})
      KVC_CHECK(std::isfinite(s) && s >= 0 && static_cast<float>(s) < INFINITY, "fp8: scale = ", s,
                " is not allowed; need 0 (computed from the data) or a finite value > 0");
  }
  bool supports_decode_eviction() const { return true; }

  class HeadStore {
   public:
    void load(const Fp8& q, HostView<const float, 2> keys, HostView<const float, 2> values,
              std::span<const std::int32_t> positions) {
      head_dim_ = static_cast<int>(keys.size(1));
      kind_ = q.kind;
      scope_ = q.scope;
      key_codes_.clear(), value_codes_.clear(), positions_.clear();
      for (std::int64_t t = 0; t < keys.size(0); ++t) {
        check_finite_row("fp8", where_, "key", &keys(t, 0), head_dim_, positions[t]);
        check_finite_row("fp8", where_, "value", &values(t, 0), head_dim_, positions[t]);
      }
      computed_scales_ = (q.key_scale == 0) + (q.value_scale == 0);
      KVC_CHECK(q.scope == Fp8Scope::head || computed_scales_ == 0 || layer_seen_,
                "fp8: scope=tensor computes its scales over the whole layer, which this store was "
                "not shown (KVCache::compress shows it through see_layer); give static scales or "
                "use scope=head");
      const bool tensor = q.scope == Fp8Scope::tensor;
      key_scale_ = q.key_scale > 0 ? static_cast<float>(q.key_scale)
                                   : scale_for(q, tensor ? layer_key_amax_ : amax(keys));
      value_scale_ = q.value_scale > 0 ? static_cast<float>(q.value_scale)
                                       : scale_for(q, tensor ? layer_value_amax_ : amax(values));
      for (std::int64_t t = 0; t < keys.size(0); ++t)
        append(q, &keys(t, 0), &values(t, 0), positions[t]);
    }
    void append(const Fp8&, const float* key, const float* value, std::int32_t position) {
      check_finite_row("fp8", where_, "key", key, head_dim_, position);
      check_finite_row("fp8", where_, "value", value, head_dim_, position);
      encode(key, key_scale_, key_codes_);
      encode(value, value_scale_, value_codes_);
      positions_.push_back(position);
    }
    void after_step(const Fp8&) {}
    // The cache names the layer and KV head, for error messages (and per-tensor scale bytes).
    void locate(const Fp8&, int layer, int kv_head) { where_ = {layer, kv_head}; }
    // The layer's whole prefill [Hkv, T, D], before eviction: the per-tensor maxima.
    void see_layer(const Fp8& q, HostView<const float, 3> keys, HostView<const float, 3> values) {
      if (q.scope != Fp8Scope::tensor) return;
      layer_key_amax_ = layer_value_amax_ = 0.0f;
      for (std::int64_t h = 0; h < keys.size(0); ++h) {
        layer_key_amax_ = std::max(layer_key_amax_, amax(keys.sub(h)));
        layer_value_amax_ = std::max(layer_value_amax_, amax(values.sub(h)));
      }
      layer_seen_ = true;
    }

    int size() const { return static_cast<int>(positions_.size()); }
    std::span<const std::int32_t> positions() const { return positions_; }
    float key_scale() const { return key_scale_; }
    float value_scale() const { return value_scale_; }
    std::span<const std::uint8_t> key_codes() const { return key_codes_; }      // [n, D]
    std::span<const std::uint8_t> value_codes() const { return value_codes_; }  // [n, D]

    void keys(HostView<float, 2> out) const { decode(key_codes_, key_scale_, out); }
    void values(HostView<float, 2> out) const { decode(value_codes_, value_scale_, out); }
    StorageBytes bytes() const {
      StorageBytes b;
      b.payload = static_cast<std::int64_t>(key_codes_.size() + value_codes_.size());
      // A computed scale is stored with the cache (fp32 per head and tensor); a static one is a
      // model constant, not cache bytes. A per-tensor computed scale is stored once per layer,
      // counted with the storage head(s) of KV head 0.
      const bool holds_scales =
          scope_ == Fp8Scope::head || where_.kv_head <= 0;  // unlocated: a store of its own
      b.params = holds_scales ? computed_scales_ * static_cast<std::int64_t>(sizeof(float)) : 0;
      b.index = static_cast<std::int64_t>(positions_.size() * sizeof(std::int32_t));
      return b;
    }
    void gather(std::span<const std::int32_t> keep) {
      ops::compact_rows(Cpu{}, keep, key_codes_, head_dim_);
      ops::compact_rows(Cpu{}, keep, value_codes_, head_dim_);
      ops::compact_rows(Cpu{}, keep, positions_, 1);
    }

   private:
    static float amax(HostView<const float, 2> x) {
      float m = 0.0f;
      for (std::int64_t t = 0; t < x.size(0); ++t)
        for (std::int64_t c = 0; c < x.size(1); ++c) m = std::max(m, std::fabs(x(t, c)));
      return m;
    }
    static float scale_for(const Fp8& q, float amax) {
      return amax > 0.0f ? amax / ops::fp8_max(q.kind) : 1.0f;
    }
    void encode(const float* row, float scale, std::vector<std::uint8_t>& codes) const {
      const std::size_t first = codes.size();
      codes.resize(first + head_dim_);
      ops::quantize_fp8(Cpu{}, std::span(row, head_dim_), scale, kind_,
                        std::span(codes.data() + first, head_dim_));
    }
    void decode(const std::vector<std::uint8_t>& codes, float scale, HostView<float, 2> out) const {
      for (std::size_t i = 0; i < codes.size(); ++i)
        out(static_cast<std::int64_t>(i / head_dim_), static_cast<std::int64_t>(i % head_dim_)) =
            ops::fp8_decode(kind_, codes[i]) * scale;
    }

    int head_dim_ = 0;
    StoreLocation where_;
    ops::Fp8Kind kind_ = ops::Fp8Kind::e4m3;
    int computed_scales_ = 0;  // 0, 1 or 2
    Fp8Scope scope_ = Fp8Scope::head;
    bool layer_seen_ = false;
    float layer_key_amax_ = 0.0f, layer_value_amax_ = 0.0f;  // scope tensor: the layer's max|x|
    float key_scale_ = 1.0f, value_scale_ = 1.0f;
    std::vector<std::uint8_t> key_codes_;    // [n, D] fp8 bytes
    std::vector<std::uint8_t> value_codes_;  // [n, D] fp8 bytes
    std::vector<std::int32_t> positions_;    // [n]
  };
};
static_assert(QuantPolicy<Fp8>);

}  // namespace kvc
