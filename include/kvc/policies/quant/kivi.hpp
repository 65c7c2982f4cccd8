// kvc/policies/quant/kivi.hpp: KIVI (ALGORITHMS.md section 10): asymmetric low-bit K/V with keys
// quantized per channel (groups of `group` tokens) and values per token (groups of `group`
// channels), plus full-precision residuals; the axis of either tensor and the scale dtype are
// selectable (HF QuantizedCache's axis choice, VidKV's per-channel values).
//
//   struct Config : kvc::DefaultConfig { using Quant = kvc::Kivi; };
//   kvc::Kivi kivi{.key_bits = 2, .value_bits = 2, .group = 32, .residual = 128};
//   kvc::Kivi hf{.key_bits = 4, .value_bits = 4, .group = 64, .residual = 128,
//                .key_axis = kvc::QuantAxis::token};   // kvc eval: kivi(bits=4,kaxis=token,...)
//
// Parameters and defaults: key_bits = value_bits = 2 (2, 4 or 8), group G = 32 (32, 64, 128, any
// multiple of 32/bits), residual R = 128 (the paper's setting; the repository's example.py uses
// R = 32), key_axis = channel, value_axis = token (either may be channel or token), scales = f16
// (or f32, for scales and minimums). R % G == 0; D % G == 0 when either tensor is per token.
// When it acts: at prefill compression (the exact split below) and after every decode step
// (flushes). The schedule belongs to the axis, for keys and values alike:
//   channel axis (groups of G tokens): prefill of n tokens quantizes the first n - n % R (none if
//     n < R); after a step, a residual of R tokens is quantized whole (R / G blocks) and emptied,
//     so the residual holds 0..R-1 tokens. (KIVI's keys.)
//   token axis (groups of G channels): prefill quantizes the first n - R (none if n <= R); after a
//     step, a residual of more than R tokens quantizes its oldest token alone, so the residual is
//     a sliding window of R tokens. (KIVI's values.)
// State, per storage head: per tensor its quantized part (channel blocks or token rows) and its
// f16 residual; positions.
// Determinism: round half to even on fp32 from the stored (f16- or f32-rounded) scale/min;
// zero-range groups give code 0. Storage: codes in uint32 words (LSB-first fields), scales and
// minimums f16 or f32 (docs/formats.md). Not reproduced: HF QuantizedCache re-quantizing the whole
// cache at each flush (here quantized groups are never re-quantized).
#pragma once

#include <cstdint>
#include <span>
#include <string_view>
#include <vector>

#include "kvc/ops/quantize.hpp"
#include "kvc/policies/concepts.hpp"
#include "kvc/policies/quant/dense.hpp"
#include "kvc/policies/quant/quantized_rows.hpp"

namespace kvc {

// One tensor (keys or values) of a KIVI store: its quantized part on the chosen axis and its f16
// residual, with the flush schedule of that axis (see the header comment).
class KiviTensor {
 public:
  void reset(QuantAxis axis, const GroupFormat& format, int head_dim) {
    axis_ = axis;
    group_ = format.group;
    if (axis == QuantAxis::channel)
      blocks_.reset(format, head_dim);
    else
      tokens_.reset(format, head_dim);
    residual_.reset(head_dim);
  }
  // Prefill of n rows: channel axis quantizes the first n - n % R (none if n < R), token axis the
  // first n - R (none if n <= R); the rest stays in the residual.
  void load(HostView<const float, 2> rows, int residual) {
    const std::int64_t n = rows.size(0);
    const std::int64_t quantized = axis_ == QuantAxis::channel
                                       ? (n < residual ? 0 : n - n % residual)
                                       : (n <= residual ? 0 : n - residual);
    if (axis_ == QuantAxis::channel)
      for (std::int64_t g = 0; g < quantized; g += group_)
        blocks_.push_block(rows.slice(0, g, g + group_));
    else
      for (std::int64_t t = 0; t < quantized; ++t) tokens_.push(&rows(t, 0));
    residual_.push_rows(rows, quantized, n);
  }
  void push(const float* row) { residual_.push(row); }
  // After a decode step: channel axis quantizes the residual when it holds R rows (R / G blocks),
  // token axis quantizes the oldest residual row when it holds more than R.
  void flush(int residual) {
    const int d = residual_.width();
    if (axis_ == QuantAxis::channel && residual_.rows() == residual) {
      std::vector<float> block(static_cast<std::size_t>(residual) * d);  // [R, D]
      auto view = make_view(block.data(), {residual, d});
      residual_.copy_to(view, 0);
      for (int g = 0; g < residual; g += group_)
        blocks_.push_block(make_view(static_cast<const float*>(block.data()) + g * d, {group_, d}));
      residual_.clear();
    } else if (axis_ == QuantAxis::token && residual_.rows() > residual) {
      std::vector<float> oldest(d);
      for (int c = 0; c < d; ++c) oldest[c] = residual_.at(0, c);
      tokens_.push(oldest.data());
      residual_.erase_front(1);
    }
  }
  int quantized() const { return axis_ == QuantAxis::channel ? blocks_.rows() : tokens_.rows(); }
  int residual_rows() const { return residual_.rows(); }
  // Dequantized rows [n, D]: quantized (older) rows first, then the residual.
  void dequantize(HostView<float, 2> out) const {
    if (axis_ == QuantAxis::channel)
      blocks_.dequantize(out, 0);
    else
      tokens_.dequantize(out, 0);
    residual_.copy_to(out, quantized());
  }
  std::int64_t payload_bytes() const {
    return blocks_.code_bytes() + tokens_.code_bytes() + residual_.bytes();
  }
  std::int64_t param_bytes() const { return blocks_.param_bytes() + tokens_.param_bytes(); }
  const ChannelQuantBlocks& channel_blocks() const { return blocks_; }
  const TokenQuantRows& token_rows() const { return tokens_; }

 private:
  QuantAxis axis_ = QuantAxis::channel;
  int group_ = 32;
  ChannelQuantBlocks blocks_;  // channel axis: [blocks, D, G / (32/bits)] words
  TokenQuantRows tokens_;      // token axis: [tokens, D / (32/bits)] words
  HalfRows residual_;          // [n_residual, D] f16
};

struct Kivi {
  static constexpr std::string_view kName = "kivi";
  static constexpr PolicyKind kKind = PolicyKind::quant;

  int key_bits = 2;
  int value_bits = 2;
  int group = 32;
  int residual = 128;
  QuantAxis key_axis = QuantAxis::channel;  // KIVI: keys per channel
  QuantAxis value_axis = QuantAxis::token;  // KIVI: values per token
  ops::ParamDType scales = ops::ParamDType::f16;

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
      KVC_CHECK((q.key_axis == QuantAxis::channel && q.value_axis == QuantAxis::channel) ||
                    head_dim_ % q.group == 0,
                "kivi: head_dim D = ", head_dim_, " must be a multiple of group = ", q.group);
      keys_.reset(q.key_axis, {q.key_bits, q.group, q.scales, QuantScheme::asymmetric}, head_dim_);
      values_.reset(q.value_axis, {q.value_bits, q.group, q.scales, QuantScheme::asymmetric},
                    head_dim_);
      positions_.assign(positions.begin(), positions.end());
      for (std::int64_t t = 0; t < keys.size(0); ++t) {
        check_finite_row("kivi", where_, "key", &keys(t, 0), head_dim_, positions[t]);
        check_finite_row("kivi", where_, "value", &values(t, 0), head_dim_, positions[t]);
      }
      keys_.load(keys, q.residual);
      values_.load(values, q.residual);
    }

    void append(const Kivi&, const float* key, const float* value, std::int32_t position) {
      check_finite_row("kivi", where_, "key", key, head_dim_, position);
      check_finite_row("kivi", where_, "value", value, head_dim_, position);
      keys_.push(key);
      values_.push(value);
      positions_.push_back(position);
    }

    // The decode flushes, run after the step's attention (the reference order).
    void after_step(const Kivi& q) {
      keys_.flush(q.residual);
      values_.flush(q.residual);
    }

    // The cache names the layer and KV head, for error messages.
    void locate(const Kivi&, int layer, int kv_head) { where_ = {layer, kv_head}; }

    int size() const { return static_cast<int>(positions_.size()); }
    std::span<const std::int32_t> positions() const { return positions_; }
    int quantized_keys() const { return keys_.quantized(); }
    int quantized_values() const { return values_.quantized(); }
    int residual_keys() const { return keys_.residual_rows(); }
    int residual_values() const { return values_.residual_rows(); }
    const KiviTensor& key_tensor() const { return keys_; }
    const KiviTensor& value_tensor() const { return values_; }

    // Dequantized keys [n, D]: quantized tokens first (older tokens), then the residual.
    void keys(HostView<float, 2> out) const { keys_.dequantize(out); }
    // Dequantized values [n, D]: quantized tokens first, then the residual.
    void values(HostView<float, 2> out) const { values_.dequantize(out); }

    StorageBytes bytes() const {
      StorageBytes b;
      b.payload = keys_.payload_bytes() + values_.payload_bytes();
      b.params = keys_.param_bytes() + values_.param_bytes();
      b.index = static_cast<std::int64_t>(positions_.size() * sizeof(std::int32_t));
      return b;
    }
    void gather(std::span<const std::int32_t>) {
      KVC_FAIL(
          "kivi: quantized groups span several tokens, so tokens cannot be evicted from a "
          "KIVI store after quantization");
    }

   private:
    int head_dim_ = 0;
    StoreLocation where_;
    KiviTensor keys_;                      // [n, D]: quantized part + f16 residual
    KiviTensor values_;                    // [n, D]: quantized part + f16 residual
    std::vector<std::int32_t> positions_;  // [n]
  };
};
static_assert(QuantPolicy<Kivi>);

}  // namespace kvc
