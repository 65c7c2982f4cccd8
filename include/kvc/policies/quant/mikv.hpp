// kvc/policies/quant/mikv.hpp: MiKV, "No Token Left Behind" (ALGORITHMS.md section 11; no
// reference code): importance-aware mixed precision. The tokens the eviction policy keeps stay at
// high precision ("active"); the ones it evicts are DEMOTED to low precision instead of dropped.
//
//   kvc::RuntimePolicies p = kvc::build_policies("snapkv(budget=128)+mikv(hi=8,lo=2)");
//   struct Config : kvc::DefaultConfig { using Eviction = kvc::StreamingLlm; using Quant =
//   kvc::Mikv; }; kvc::KVCache<Config, kvc::Cpu> cache{shape, kvc::StreamingLlm{.sink = 4, .recent
//   = 60},
//                                        kvc::Mikv{.hi_bits = 8, .lo_bits = 2}};
//
// Parameters and defaults ([UNVERIFIED] in the spec; chosen here): hi_bits = 8 (4, 8, or 16 =
// f16 rows), lo_bits = 2 (2, 4 or 8; < hi_bits), group = 32 channels per (scale, minimum) of the
// asymmetric min-max per-token quantizer (P5; D % group == 0), balance = true: per-channel key
// outlier balancing — keys are divided channel-wise by s_c = f16(sqrt(max_t |K[t, c]|)) (over the
// head's prompt keys; 1 when 0) before quantization and multiplied back after dequantization.
// This is the "divide K channel c by s_c, multiply query channel c by s_c" balancer with the query
// side folded into the dequantization (logits unchanged); s_c from K statistics only, since the
// store never sees queries (the spec's choice of statistics is unverified). f16 rows are never
// balanced.
// When it acts (with KVCache, which asks keeps_evicted()): compress() loads EVERY prompt token of
// the source head with the eviction policy's kept set (load_ranked): kept tokens are quantized at
// hi_bits, the others at lo_bits. Appended tokens arrive at hi_bits. When a decode-time eviction
// policy returns a keep set, it is over the ACTIVE tokens only (the cache shows it the active
// counts and the attention columns of the active tokens); the active tokens it drops are demoted:
// re-quantized at lo_bits from their high-precision reconstruction. No token is ever removed.
// State per storage head: per token (in position order) its precision and codes/parameters; the
// balance scales. Determinism: round half to even (P5) from f16 scale/minimum.
// Storage (docs/formats.md, "MiKV"): per token and tensor D/(32/b) uint32 words of b-bit codes
// packed along channels + D/group (scale, minimum) f16 pairs, or D f16 for a 16-bit row; balance
// scales D f16 per head (params).
#pragma once

#include <cmath>
#include <cstdint>
#include <span>
#include <string_view>
#include <vector>

#include "kvc/ops/quantize.hpp"
#include "kvc/policies/concepts.hpp"
#include "kvc/policies/quant/dense.hpp"

namespace kvc {

struct Mikv {
  static constexpr std::string_view kName = "mikv";
  static constexpr PolicyKind kKind = PolicyKind::quant;

  int hi_bits = 8;
  int lo_bits = 2;
  int group = 32;
  bool balance = true;

  void validate() const {
    KVC_CHECK(hi_bits == 4 || hi_bits == 8 || hi_bits == 16, "mikv: hi = ", hi_bits,
              " is not supported; allowed: {4, 8, 16 (f16)}");
    KVC_CHECK((lo_bits == 2 || lo_bits == 4 || lo_bits == 8) && lo_bits < hi_bits,
              "mikv: lo = ", lo_bits, " must be one of {2, 4, 8} and below hi = ", hi_bits);
    KVC_CHECK(group > 0 && group % 16 == 0, "mikv: group = ", group,
              " must be a positive multiple of 16 (2-bit codes fill 32-bit words)");
  }
  bool supports_decode_eviction() const { return true; }
  // Asks KVCache for every token plus the kept set, and for demotion instead of eviction.
  bool keeps_evicted() const { return true; }

  class HeadStore {
   public:
    void load(const Mikv& q, HostView<const float, 2> keys, HostView<const float, 2> values,
              std::span<const std::int32_t> positions) {
      std::vector<std::int32_t> all(positions.size());
      for (std::size_t i = 0; i < all.size(); ++i) all[i] = static_cast<std::int32_t>(i);
      load_ranked(q, keys, values, positions, all);
    }
    // Every token of the head [n, D] with `kept` (ascending indices into the n rows) high.
    void load_ranked(const Mikv& q, HostView<const float, 2> keys, HostView<const float, 2> values,
                     std::span<const std::int32_t> positions, std::span<const std::int32_t> kept) {
      d_ = static_cast<int>(keys.size(1));
      KVC_CHECK(d_ % q.group == 0, "mikv: head_dim D = ", d_,
                " must be a multiple of group = ", q.group);
      balance_.assign(d_, 1.0f);
      if (q.balance) {
        for (int c = 0; c < d_; ++c) {
          float m = 0;
          for (std::int64_t t = 0; t < keys.size(0); ++t) m = std::max(m, std::fabs(keys(t, c)));
          balance_[c] = m > 0 ? static_cast<float>(f16(std::sqrt(m))) : 1.0f;
        }
      }
      balanced_ = q.balance;
      rows_.clear();
      positions_.assign(positions.begin(), positions.end());
      std::size_t next = 0;
      for (std::int64_t t = 0; t < keys.size(0); ++t) {
        const bool high = next < kept.size() && kept[next] == t;
        if (high) ++next;
        rows_.push_back(encode(q, &keys(t, 0), &values(t, 0), high ? q.hi_bits : q.lo_bits));
      }
    }
    void append(const Mikv& q, const float* key, const float* value, std::int32_t position) {
      rows_.push_back(encode(q, key, value, q.hi_bits));
      positions_.push_back(position);
    }
    void after_step(const Mikv&) {}

    int size() const { return static_cast<int>(rows_.size()); }
    std::span<const std::int32_t> positions() const { return positions_; }
    int active_count() const {
      int n = 0;
      for (const auto& r : rows_) n += r.high;
      return n;
    }
    bool is_active(int i) const { return rows_[i].high; }
    int row_bits(int i) const { return rows_[i].bits; }

    void keys(HostView<float, 2> out) const {  // [n, D]
      for (std::size_t t = 0; t < rows_.size(); ++t) decode(rows_[t], true, out, t);
    }
    void values(HostView<float, 2> out) const {  // [n, D]
      for (std::size_t t = 0; t < rows_.size(); ++t) decode(rows_[t], false, out, t);
    }
    StorageBytes bytes() const {
      StorageBytes b;
      bool any_quantized = false;
      for (const auto& r : rows_) {
        b.payload += static_cast<std::int64_t>((r.key_codes.size() + r.value_codes.size()) * 4 +
                                               (r.key_raw.size() + r.value_raw.size()) * 2);
        b.params += static_cast<std::int64_t>((r.key_params.size() + r.value_params.size()) * 2);
        any_quantized = any_quantized || r.bits != 16;
      }
      if (balanced_ && any_quantized) b.params += static_cast<std::int64_t>(d_) * 2;
      b.index = static_cast<std::int64_t>(positions_.size() * sizeof(std::int32_t));
      return b;
    }
    // Plain eviction (a cache that does not ask keeps_evicted()): tokens really leave.
    void gather(std::span<const std::int32_t> keep) {
      std::vector<Row> rows;
      std::vector<std::int32_t> positions;
      for (const auto i : keep) rows.push_back(rows_[i]), positions.push_back(positions_[i]);
      rows_.swap(rows);
      positions_.swap(positions);
    }
    // Demotion: `keep` are ascending indices among the ACTIVE tokens (0 = the oldest active one);
    // the active tokens not in it move to lo_bits.
    void demote(const Mikv& q, std::span<const std::int32_t> keep) {
      std::vector<float> key(d_), value(d_);
      int active = 0;
      std::size_t next = 0;
      for (std::size_t t = 0; t < rows_.size(); ++t) {
        if (!rows_[t].high) continue;
        const bool stays = next < keep.size() && keep[next] == active;
        if (stays) ++next;
        ++active;
        if (stays) continue;
        auto k_view = make_view(key.data(), {1, d_});
        auto v_view = make_view(value.data(), {1, d_});
        decode(rows_[t], true, k_view, 0);
        decode(rows_[t], false, v_view, 0);
        rows_[t] = encode(q, key.data(), value.data(), q.lo_bits);
      }
      KVC_CHECK(next == keep.size(), "mikv: keep set names ", keep.size(),
                " active tokens but only ", next, " matched (indices must be ascending in [0, ",
                active, "))");
    }

   private:
    struct Row {
      bool high = false;
      int bits = 16;
      std::vector<std::uint32_t> key_codes, value_codes;  // [D / (32 / bits)]
      std::vector<f16> key_params, value_params;          // [D / group, 2] (scale, minimum)
      std::vector<f16> key_raw, value_raw;                // [D] for 16-bit rows
    };

    Row encode(const Mikv& q, const float* key, const float* value, int bits) const {
      Row r;
      r.high = bits == q.hi_bits;
      r.bits = bits;
      group_ = q.group;
      if (bits == 16) {
        for (int c = 0; c < d_; ++c) r.key_raw.push_back(f16(key[c]));
        for (int c = 0; c < d_; ++c) r.value_raw.push_back(f16(value[c]));
        return r;
      }
      std::vector<float> x(d_);
      for (int c = 0; c < d_; ++c) x[c] = key[c] / balance_[c];
      quantize_row(x, bits, r.key_codes, r.key_params);
      for (int c = 0; c < d_; ++c) x[c] = value[c];
      quantize_row(x, bits, r.value_codes, r.value_params);
      return r;
    }
    void quantize_row(const std::vector<float>& x, int bits, std::vector<std::uint32_t>& words,
                      std::vector<f16>& params) const {
      std::vector<std::uint8_t> codes(d_);
      for (int g = 0; g < d_ / group_; ++g) {
        const auto p =
            ops::quantize_group(Cpu{}, std::span<const float>(x).subspan(g * group_, group_), bits,
                                std::span<std::uint8_t>(codes).subspan(g * group_, group_));
        params.push_back(p.scale);
        params.push_back(p.minimum);
      }
      words.assign(ops::words_for(d_, bits), 0);
      ops::pack_codes(codes, bits, words);
    }
    void decode(const Row& r, bool is_key, HostView<float, 2> out, std::size_t t) const {
      const auto i = static_cast<std::int64_t>(t);
      if (r.bits == 16) {
        const auto& raw = is_key ? r.key_raw : r.value_raw;
        for (int c = 0; c < d_; ++c) out(i, c) = static_cast<float>(raw[c]);
        return;
      }
      const auto& words = is_key ? r.key_codes : r.value_codes;
      const auto& params = is_key ? r.key_params : r.value_params;
      const int per_word = ops::codes_per_word(r.bits);
      for (int c = 0; c < d_; ++c) {
        const int g = c / group_;
        const float x =
            ops::dequantize_code(ops::unpack_field(words[c / per_word], c % per_word, r.bits),
                                 ops::GroupParams{params[2 * g], params[2 * g + 1]});
        out(i, c) = is_key ? x * balance_[c] : x;
      }
    }

    int d_ = 0;
    mutable int group_ = 32;
    bool balanced_ = false;
    std::vector<float> balance_;           // [D] key channel scales s_c (f16 values)
    std::vector<Row> rows_;                // [n] in position order
    std::vector<std::int32_t> positions_;  // [n]
  };
};
static_assert(QuantPolicy<Mikv>);

}  // namespace kvc
