// kvc/policies/quant/kivi.hpp: KIVI (ALGORITHMS.md section 10): asymmetric low-bit K/V with keys
// quantized per channel (groups of `group` tokens) and values per token (groups of `group`
// channels), plus full-precision residuals.
//
//   struct Config : kvc::DefaultConfig { using Quant = kvc::Kivi; };
//   kvc::Kivi kivi{.key_bits = 2, .value_bits = 2, .group = 32, .residual = 128};
//
// Parameters and defaults: key_bits = value_bits = 2 (2, 4 or 8), group G = 32, residual R = 128
// (the paper's setting; the repository's example.py uses R = 32). R % G == 0 and D % G == 0.
// When it acts: at prefill compression (the exact split below) and after every decode step
// (flushes). State, per storage head: quantized key groups, the key residual (0..R-1 tokens),
// quantized value tokens, the value residual (a sliding window of R tokens).
//   prefill of n tokens: keys  -> n < R: none quantized; else the first n - n % R
//                        values-> n <= R: none quantized; else the first n - R
//   after each decode step: key residual == R -> quantize all R; value residual > R -> quantize the
//   oldest value token alone.
// Determinism: round half to even on fp32 from f16-rounded scale/min; zero-range groups give code
// 0. Storage: codes in uint32 words (LSB-first fields), scales and minimums f16 (docs/formats.md).
#pragma once

#include <cstdint>
#include <span>
#include <string_view>
#include <vector>

#include "kvc/ops/quantize.hpp"
#include "kvc/policies/concepts.hpp"
#include "kvc/policies/quant/dense.hpp"

namespace kvc {

struct Kivi {
  static constexpr std::string_view kName = "kivi";
  static constexpr PolicyKind kKind = PolicyKind::quant;

  int key_bits = 2;
  int value_bits = 2;
  int group = 32;
  int residual = 128;

  void validate() const {
    for (int bits : {key_bits, value_bits})
      KVC_CHECK(bits == 2 || bits == 4 || bits == 8, "kivi: bits = ", bits,
                " is not supported; allowed: {2, 4, 8}");
    KVC_CHECK(group > 0, "kivi: group must be > 0, got ", group);
    for (int bits : {key_bits, value_bits})
      KVC_CHECK(group % ops::codes_per_word(bits) == 0, "kivi: group = ", group,
                " must be a multiple of ", ops::codes_per_word(bits), " (codes per word at ", bits,
                " bits)");
    KVC_CHECK(residual > 0 && residual % group == 0, "kivi: residual = ", residual,
              " must be a positive multiple of group = ", group);
  }

  // Quantized key groups span `group` tokens: no single token can leave them.
  bool supports_decode_eviction() const { return false; }

  class HeadStore {
   public:
    void load(const Kivi& q, HostView<const float, 2> keys, HostView<const float, 2> values,
              std::span<const std::int32_t> positions) {
      head_dim_ = static_cast<int>(keys.size(1));
      KVC_CHECK(head_dim_ % q.group == 0, "kivi: head_dim D = ", head_dim_,
                " must be a multiple of group = ", q.group);
      const std::int64_t n = keys.size(0);
      key_codes_.clear(), key_scale_.clear(), key_min_.clear(), key_groups_ = 0;
      value_codes_.clear(), value_scale_.clear(), value_min_.clear(), value_tokens_ = 0;
      key_residual_.reset(head_dim_);
      value_residual_.reset(head_dim_);
      positions_.assign(positions.begin(), positions.end());

      const std::int64_t quantized_keys = n < q.residual ? 0 : n - n % q.residual;
      for (std::int64_t g = 0; g < quantized_keys; g += q.group)
        quantize_key_group(q, keys.slice(0, g, g + q.group));
      key_residual_.push_rows(keys, quantized_keys, n);

      const std::int64_t quantized_values = n <= q.residual ? 0 : n - q.residual;
      for (std::int64_t t = 0; t < quantized_values; ++t) quantize_value_token(q, &values(t, 0));
      value_residual_.push_rows(values, quantized_values, n);
    }

    void append(const Kivi&, const float* key, const float* value, std::int32_t position) {
      key_residual_.push(key);
      value_residual_.push(value);
      positions_.push_back(position);
    }

    // The decode flushes, run after the step's attention (the reference order).
    void after_step(const Kivi& q) {
      if (key_residual_.rows() == q.residual) {
        std::vector<float> block(static_cast<std::size_t>(q.residual) * head_dim_);  // [R, D]
        auto view = make_view(block.data(), {q.residual, head_dim_});
        key_residual_.copy_to(view, 0);
        for (int g = 0; g < q.residual; g += q.group)
          quantize_key_group(q, view.slice(0, g, g + q.group));
        key_residual_.clear();
      }
      if (value_residual_.rows() > q.residual) {
        std::vector<float> oldest(head_dim_);
        for (int c = 0; c < head_dim_; ++c) oldest[c] = value_residual_.at(0, c);
        quantize_value_token(q, oldest.data());
        value_residual_.erase_front(1);
      }
    }

    int size() const { return static_cast<int>(positions_.size()); }
    std::span<const std::int32_t> positions() const { return positions_; }
    int quantized_keys() const { return key_groups_ * group_; }
    int quantized_values() const { return value_tokens_; }
    int residual_keys() const { return key_residual_.rows(); }
    int residual_values() const { return value_residual_.rows(); }

    // Dequantized keys [n, D]: quantized groups first (older tokens), then the residual.
    void keys(HostView<float, 2> out) const {
      const int words = group_ / ops::codes_per_word(key_bits_);
      for (int g = 0; g < key_groups_; ++g) {
        const std::size_t code_offset = static_cast<std::size_t>(g) * head_dim_ * words;
        const std::size_t param_offset = static_cast<std::size_t>(g) * head_dim_;
        ops::dequantize_keys_per_channel(
            Cpu{}, make_view(key_codes_.data() + code_offset, {head_dim_, words}),
            make_view(key_scale_.data() + param_offset, {head_dim_, 1}),
            make_view(key_min_.data() + param_offset, {head_dim_, 1}), key_bits_, group_,
            out.slice(0, static_cast<std::int64_t>(g) * group_,
                      static_cast<std::int64_t>(g + 1) * group_));
      }
      key_residual_.copy_to(out, quantized_keys());
    }
    // Dequantized values [n, D]: quantized tokens first, then the residual window.
    void values(HostView<float, 2> out) const {
      if (value_tokens_ > 0) {
        const int words = head_dim_ / ops::codes_per_word(value_bits_);
        const int groups = head_dim_ / group_;
        ops::dequantize_values_per_token(Cpu{},
                                         make_view(value_codes_.data(), {value_tokens_, words}),
                                         make_view(value_scale_.data(), {value_tokens_, groups}),
                                         make_view(value_min_.data(), {value_tokens_, groups}),
                                         value_bits_, group_, out.slice(0, 0, value_tokens_));
      }
      value_residual_.copy_to(out, value_tokens_);
    }

    StorageBytes bytes() const {
      StorageBytes b;
      b.payload = static_cast<std::int64_t>((key_codes_.size() + value_codes_.size()) *
                                            sizeof(std::uint32_t)) +
                  key_residual_.bytes() + value_residual_.bytes();
      b.params = static_cast<std::int64_t>(
          (key_scale_.size() + key_min_.size() + value_scale_.size() + value_min_.size()) *
          sizeof(f16));
      b.index = static_cast<std::int64_t>(positions_.size() * sizeof(std::int32_t));
      return b;
    }
    void gather(std::span<const std::int32_t>) {
      KVC_FAIL("kivi: quantized key groups span ", group_,
               " tokens, so tokens cannot be evicted from a KIVI store after quantization");
    }

   private:
    void quantize_key_group(const Kivi& q, HostView<const float, 2> rows) {  // rows [G, D]
      remember(q);
      const int words = q.group / ops::codes_per_word(q.key_bits);
      const std::size_t code_offset = key_codes_.size(), param_offset = key_scale_.size();
      key_codes_.resize(code_offset + static_cast<std::size_t>(head_dim_) * words);
      key_scale_.resize(param_offset + head_dim_);
      key_min_.resize(param_offset + head_dim_);
      ops::quantize_keys_per_channel(Cpu{}, rows, q.key_bits, q.group,
                                     make_view(key_codes_.data() + code_offset, {head_dim_, words}),
                                     make_view(key_scale_.data() + param_offset, {head_dim_, 1}),
                                     make_view(key_min_.data() + param_offset, {head_dim_, 1}));
      ++key_groups_;
    }
    void quantize_value_token(const Kivi& q, const float* row) {  // row [D]
      remember(q);
      const int words = head_dim_ / ops::codes_per_word(q.value_bits);
      const int groups = head_dim_ / q.group;
      const std::size_t code_offset = value_codes_.size(), param_offset = value_scale_.size();
      value_codes_.resize(code_offset + words);
      value_scale_.resize(param_offset + groups);
      value_min_.resize(param_offset + groups);
      ops::quantize_values_per_token(Cpu{}, make_view(row, {1, head_dim_}), q.value_bits, q.group,
                                     make_view(value_codes_.data() + code_offset, {1, words}),
                                     make_view(value_scale_.data() + param_offset, {1, groups}),
                                     make_view(value_min_.data() + param_offset, {1, groups}));
      ++value_tokens_;
    }
    void remember(const Kivi& q) {
      key_bits_ = q.key_bits;
      value_bits_ = q.value_bits;
      group_ = q.group;
    }

    int head_dim_ = 0, key_bits_ = 2, value_bits_ = 2, group_ = 32;
    std::vector<std::uint32_t> key_codes_;  // [key_groups, D, G / (32 / key_bits)]
    std::vector<f16> key_scale_, key_min_;  // [key_groups, D]
    int key_groups_ = 0;
    HalfRows key_residual_;                     // [0..R-1, D]
    std::vector<std::uint32_t> value_codes_;    // [value_tokens, D / (32 / value_bits)]
    std::vector<f16> value_scale_, value_min_;  // [value_tokens, D / G]
    int value_tokens_ = 0;
    HalfRows value_residual_;              // [R (after the first step), D]
    std::vector<std::int32_t> positions_;  // [n]
  };
};
static_assert(QuantPolicy<Kivi>);

}  // namespace kvc
