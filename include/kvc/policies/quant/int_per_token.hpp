// kvc/policies/quant/int_per_token.hpp: per-token INT8 / INT4 K/V, the formats inference engines
// cache (vLLM-style int8 per token and head, QServe KV8/KV4): every token of every head is
// quantized on its own, in groups of `group` channels (default: the whole head), symmetric or
// asymmetric.
//
//   struct Config : kvc::DefaultConfig { using Quant = kvc::IntPerToken; };
//   kvc::IntPerToken int4{.bits = 4, .symmetric = false, .group = 32};
//   // kvc eval: --policy 'int8'  --policy 'int4(sym=false,group=32,scales=f32)'
//
// Parameters and defaults: bits = 8 (4 or 8); symmetric = true (scale = max|x| / (2^(b-1) - 1),
// codes in [-qmax, qmax], two's complement); symmetric = false is the asymmetric min-max quantizer
// of ALGORITHMS.md P5 (codes in [0, 2^b - 1], scale and minimum); group = 0 (whole head_dim D,
// otherwise a divisor of D); scales = f16 (or f32); residual = 0 (the newest `residual` tokens stay
// f16).
// When it acts: at prefill compression (all but the newest `residual` tokens are quantized) and at
// every append (the newest token enters the f16 window; the window's oldest token beyond
// `residual` is quantized at once, so with residual = 0 a token is quantized before it is first
// attended, as engines write the cache before attention).
// State per storage head: quantized token rows, the f16 window, positions.
// Determinism: round half to even in fp32 from the stored (dtype-rounded) parameters; a zero group
// (scale 0) gets codes 0. NaN/Inf keys or values are rejected, naming layer, KV head, position
// and channel.
// Tokens are independent, so decode-time eviction works (gather). Layout: docs/formats.md.
#pragma once

#include <cstdint>
#include <span>
#include <string_view>
#include <vector>

#include "kvc/policies/concepts.hpp"
#include "kvc/policies/quant/dense.hpp"
#include "kvc/policies/quant/quantized_rows.hpp"

namespace kvc {

struct IntPerToken {
  static constexpr std::string_view kName = "int_per_token";
  static constexpr PolicyKind kKind = PolicyKind::quant;

  int bits = 8;
  bool symmetric = true;
  int group = 0;  // 0: the whole head_dim
  ops::ParamDType scales = ops::ParamDType::f16;
  int residual = 0;

  void validate() const {
    KVC_CHECK(bits == 4 || bits == 8, "int_per_token: bits = ", bits,
              " is not supported; allowed: {4, 8}");
    KVC_CHECK(group >= 0, "int_per_token: group = ", group,
              " is not allowed; need 0 (whole head) or a positive divisor of head_dim");
    KVC_CHECK(residual >= 0, "int_per_token: residual = ", residual, " must be >= 0");
  }
  bool supports_decode_eviction() const { return true; }

  GroupFormat format(int head_dim) const {
    return {bits, group == 0 ? head_dim : group, scales,
            symmetric ? QuantScheme::symmetric : QuantScheme::asymmetric};
  }

  class HeadStore {
   public:
    void load(const IntPerToken& q, HostView<const float, 2> keys, HostView<const float, 2> values,
              std::span<const std::int32_t> positions) {
      head_dim_ = static_cast<int>(keys.size(1));
      KVC_CHECK(q.group == 0 || head_dim_ % q.group == 0, "int_per_token: head_dim D = ", head_dim_,
                " must be a multiple of group = ", q.group);
      keys_.reset(q.format(head_dim_), head_dim_);
      values_.reset(q.format(head_dim_), head_dim_);
      key_window_.reset(head_dim_);
      value_window_.reset(head_dim_);
      positions_.clear();
      for (std::int64_t t = 0; t < keys.size(0); ++t)
        append(q, &keys(t, 0), &values(t, 0), positions[t]);
    }

    void append(const IntPerToken& q, const float* key, const float* value, std::int32_t position) {
      check_finite_row("int_per_token", where_, "key", key, head_dim_, position);
      check_finite_row("int_per_token", where_, "value", value, head_dim_, position);
      key_window_.push(key);
      value_window_.push(value);
      positions_.push_back(position);
      if (key_window_.rows() > q.residual) {
        // The window holds f16 values; the quantizer sees the original fp32 row.
        keys_.push(key_window_.rows() == 1 ? key : oldest(key_window_).data());
        values_.push(value_window_.rows() == 1 ? value : oldest(value_window_).data());
        key_window_.erase_front(1);
        value_window_.erase_front(1);
      }
    }
    void after_step(const IntPerToken&) {}
    // The cache names the layer and KV head, for error messages.
    void locate(const IntPerToken&, int layer, int kv_head) { where_ = {layer, kv_head}; }

    int size() const { return static_cast<int>(positions_.size()); }
    std::span<const std::int32_t> positions() const { return positions_; }
    int quantized() const { return keys_.rows(); }
    int window() const { return key_window_.rows(); }
    const TokenQuantRows& quantized_keys() const { return keys_; }
    const TokenQuantRows& quantized_values() const { return values_; }

    void keys(HostView<float, 2> out) const {  // [n, D]
      keys_.dequantize(out, 0);
      key_window_.copy_to(out, keys_.rows());
    }
    void values(HostView<float, 2> out) const {  // [n, D]
      values_.dequantize(out, 0);
      value_window_.copy_to(out, values_.rows());
    }
    StorageBytes bytes() const {
      StorageBytes b;
      b.payload =
          keys_.code_bytes() + values_.code_bytes() + key_window_.bytes() + value_window_.bytes();
      b.params = keys_.param_bytes() + values_.param_bytes();
      b.index = static_cast<std::int64_t>(positions_.size() * sizeof(std::int32_t));
      return b;
    }
    void gather(std::span<const std::int32_t> keep) {
      const int quantized_rows = keys_.rows();
      std::vector<std::int32_t> in_quantized, in_window;
      for (const std::int32_t i : keep)
        (i < quantized_rows ? in_quantized : in_window)
            .push_back(i < quantized_rows ? i : i - quantized_rows);
      keys_.gather(in_quantized);
      values_.gather(in_quantized);
      key_window_.gather(in_window);
      value_window_.gather(in_window);
      ops::compact_rows(Cpu{}, keep, positions_, 1);
    }

   private:
    // Only reached when residual > 0: the window's oldest row, as stored (f16).
    std::vector<float> oldest(const HalfRows& window) const {
      std::vector<float> row(head_dim_);
      for (int c = 0; c < head_dim_; ++c) row[c] = window.at(0, c);
      return row;
    }

    int head_dim_ = 0;
    StoreLocation where_;
    TokenQuantRows keys_;                  // [n_q, ceil(D / (32/bits))] words
    TokenQuantRows values_;                // [n_q, ceil(D / (32/bits))] words
    HalfRows key_window_;                  // [n - n_q <= residual, D] f16
    HalfRows value_window_;                // [n - n_q <= residual, D] f16
    std::vector<std::int32_t> positions_;  // [n]
  };
};
static_assert(QuantPolicy<IntPerToken>);

}  // namespace kvc
