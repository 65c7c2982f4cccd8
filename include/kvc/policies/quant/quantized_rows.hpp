// kvc/policies/quant/quantized_rows.hpp: the two quantized layouts the quantization stores are
// built from (docs/formats.md): tokens quantized one at a time (groups along channels, codes
// packed along channels) and blocks of tokens quantized per channel (groups along tokens, codes
// packed along tokens).
//
//   kvc::TokenQuantRows rows;                      // per token, groups of G channels
//   rows.reset({.bits = 4, .group = 64, .params = kvc::ops::ParamDType::f16}, /*head_dim=*/64);
//   rows.push(token_row);                          // [D]
//   rows.dequantize(out, /*first=*/0);             // out rows [0, rows())
//
// Parameters are kept in memory as float holding values already rounded to their storage dtype;
// bytes are counted at the storage dtype's size (f16: 2, f32: 4), as docs/formats.md lays them out.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <span>
#include <vector>

#include "kvc/core/error.hpp"
#include "kvc/core/view.hpp"
#include "kvc/ops/quantize.hpp"
#include "kvc/ops/select.hpp"

namespace kvc {

// The axis a group runs along: `channel` = per-channel quantization (a group is G consecutive
// tokens of one channel), `token` = per-token quantization (a group is G consecutive channels of
// one token).
enum class QuantAxis { channel, token };
enum class QuantScheme { asymmetric, symmetric };

struct GroupFormat {
  int bits = 2;
  int group = 32;  // elements per (scale, minimum); for TokenQuantRows a divisor of D
  ops::ParamDType params = ops::ParamDType::f16;
  QuantScheme scheme = QuantScheme::asymmetric;
};

// Where a store sits, when the cache told it (HeadStore::locate); -1 when unknown.
struct StoreLocation {
  int layer = -1;
  int kv_head = -1;
};

// Rejects a NaN or infinite element of one token row, naming the store, layer and KV head (when
// known), tensor, token position and channel.
inline void check_finite_row(const char* store, StoreLocation where, const char* tensor,
                             const float* row, int width, std::int32_t position) {
  for (int c = 0; c < width; ++c)
    if (!std::isfinite(row[c])) {
      if (where.layer >= 0)
        KVC_FAIL(store, ": layer ", where.layer, ", KV head ", where.kv_head, ": ", tensor,
                 " of the token at position ", position, ", channel ", c, " is ", row[c],
                 "; keys and values must be finite");
      KVC_FAIL(store, ": ", tensor, " of the token at position ", position, ", channel ", c, " is ",
               row[c], "; keys and values must be finite");
    }
}

// Tokens quantized one at a time: per token, groups of `group` consecutive channels, all D codes
// of a token packed along channels into ceil(D / (32/bits)) words (field j of word w = channel
// w*(32/bits) + j; signed codes as two's complement).
class TokenQuantRows {
 public:
  void reset(const GroupFormat& format, int head_dim) {
    KVC_CHECK(format.group >= 1 && head_dim % format.group == 0, "head_dim D = ", head_dim,
              " must be a multiple of group = ", format.group);
    format_ = format;
    head_dim_ = head_dim;
    words_per_row_ = static_cast<int>(ops::words_for(head_dim, format.bits));
    groups_per_row_ = head_dim / format.group;
    codes_.clear(), scale_.clear(), minimum_.clear();
  }
  int rows() const { return static_cast<int>(scale_.size() / std::max(groups_per_row_, 1)); }
  int words_per_row() const { return words_per_row_; }

  void push(const float* row) {  // [D]
    const int g_size = format_.group, bits = format_.bits;
    std::vector<std::uint32_t> fields(head_dim_);
    if (format_.scheme == QuantScheme::symmetric) {
      std::vector<std::int8_t> codes(g_size);
      for (int g = 0; g < groups_per_row_; ++g) {
        scale_.push_back(ops::quantize_symmetric(Cpu{}, std::span(row + g * g_size, g_size), bits,
                                                 format_.params, codes));
        for (int i = 0; i < g_size; ++i) fields[g * g_size + i] = ops::signed_field(codes[i], bits);
      }
    } else {
      std::vector<std::uint8_t> codes(g_size);
      for (int g = 0; g < groups_per_row_; ++g) {
        const auto p = ops::quantize_minmax(Cpu{}, std::span(row + g * g_size, g_size), bits,
                                            format_.params, codes);
        scale_.push_back(p.scale);
        minimum_.push_back(p.minimum);
        for (int i = 0; i < g_size; ++i) fields[g * g_size + i] = codes[i];
      }
    }
    const int per_word = ops::codes_per_word(bits);
    const std::size_t first = codes_.size();
    codes_.resize(first + words_per_row_, 0u);
    for (int c = 0; c < head_dim_; ++c)
      codes_[first + c / per_word] =
          ops::pack_field(codes_[first + c / per_word], c % per_word, bits, fields[c]);
  }

  // Writes the dequantized rows into out rows [first, first + rows()).
  void dequantize(HostView<float, 2> out, std::int64_t first) const {
    const int per_word = ops::codes_per_word(format_.bits);
    for (int t = 0; t < rows(); ++t)
      for (int c = 0; c < head_dim_; ++c) {
        const std::uint32_t field =
            ops::unpack_field(codes_[static_cast<std::size_t>(t) * words_per_row_ + c / per_word],
                              c % per_word, format_.bits);
        const std::size_t p = static_cast<std::size_t>(t) * groups_per_row_ + c / format_.group;
        out(first + t, c) =
            format_.scheme == QuantScheme::symmetric
                ? static_cast<float>(ops::field_signed(field, format_.bits)) * scale_[p]
                : ops::dequantize_affine(field, {scale_[p], minimum_[p]});
      }
  }

  // Keeps rows `keep` (ascending indices into [0, rows())).
  void gather(std::span<const std::int32_t> keep) {
    if (rows() == 0) return;
    ops::compact_rows(Cpu{}, keep, codes_, words_per_row_);
    ops::compact_rows(Cpu{}, keep, scale_, groups_per_row_);
    if (!minimum_.empty()) ops::compact_rows(Cpu{}, keep, minimum_, groups_per_row_);
  }

  std::int64_t code_bytes() const {
    return static_cast<std::int64_t>(codes_.size() * sizeof(std::uint32_t));
  }
  std::int64_t param_bytes() const {
    return static_cast<std::int64_t>(scale_.size() + minimum_.size()) *
           ops::param_bytes(format_.params);
  }
  std::span<const std::uint32_t> codes() const { return codes_; }  // [rows, words_per_row]
  std::span<const float> scales() const { return scale_; }         // [rows, D / group]
  std::span<const float> minimums() const { return minimum_; }     // [rows, D / group] or empty

 private:
  GroupFormat format_{};
  int head_dim_ = 0, words_per_row_ = 0, groups_per_row_ = 0;
  std::vector<std::uint32_t> codes_;  // [rows, words_per_row]
  std::vector<float> scale_;          // [rows, D / group]
  std::vector<float> minimum_;        // [rows, D / group], asymmetric only
};

// Blocks of `group` tokens quantized per channel (asymmetric min-max): block b, channel c holds
// the codes of tokens [b*G, (b+1)*G) packed along tokens into G / (32/bits) words, with one
// (scale, minimum) pair. Layout [blocks, D, G / (32/bits)] words, parameters [blocks, D].
class ChannelQuantBlocks {
 public:
  void reset(const GroupFormat& format, int head_dim) {
    KVC_CHECK(format.group >= 1 && format.group % ops::codes_per_word(format.bits) == 0,
              "group = ", format.group, " must be a positive multiple of ",
              ops::codes_per_word(format.bits), " (codes per word at ", format.bits, " bits)");
    format_ = format;
    head_dim_ = head_dim;
    blocks_ = 0;
    codes_.clear(), scale_.clear(), minimum_.clear();
  }
  int rows() const { return blocks_ * format_.group; }

  void push_block(HostView<const float, 2> block) {  // [G, D]
    const int g_size = format_.group;
    const int words = g_size / ops::codes_per_word(format_.bits);
    std::vector<float> column(g_size);
    std::vector<std::uint8_t> codes(g_size);
    std::vector<std::uint32_t> packed(words);
    for (int c = 0; c < head_dim_; ++c) {
      for (int i = 0; i < g_size; ++i) column[i] = block(i, c);
      const auto p = ops::quantize_minmax(Cpu{}, column, format_.bits, format_.params, codes);
      scale_.push_back(p.scale);
      minimum_.push_back(p.minimum);
      ops::pack_codes(codes, format_.bits, packed);
      codes_.insert(codes_.end(), packed.begin(), packed.end());
    }
    ++blocks_;
  }

  void dequantize(HostView<float, 2> out, std::int64_t first) const {
    const int g_size = format_.group, per_word = ops::codes_per_word(format_.bits);
    const int words = g_size / per_word;
    for (int b = 0; b < blocks_; ++b)
      for (int c = 0; c < head_dim_; ++c) {
        const std::size_t row = static_cast<std::size_t>(b) * head_dim_ + c;
        for (int i = 0; i < g_size; ++i) {
          const std::uint32_t code =
              ops::unpack_field(codes_[row * words + i / per_word], i % per_word, format_.bits);
          out(first + static_cast<std::int64_t>(b) * g_size + i, c) =
              ops::dequantize_affine(code, {scale_[row], minimum_[row]});
        }
      }
  }

  std::int64_t code_bytes() const {
    return static_cast<std::int64_t>(codes_.size() * sizeof(std::uint32_t));
  }
  std::int64_t param_bytes() const {
    return static_cast<std::int64_t>(scale_.size() + minimum_.size()) *
           ops::param_bytes(format_.params);
  }
  std::span<const std::uint32_t> codes() const { return codes_; }  // [blocks, D, G/per_word]
  std::span<const float> scales() const { return scale_; }         // [blocks, D]
  std::span<const float> minimums() const { return minimum_; }     // [blocks, D]

 private:
  GroupFormat format_{};
  int head_dim_ = 0, blocks_ = 0;
  std::vector<std::uint32_t> codes_;  // [blocks, D, G / (32/bits)]
  std::vector<float> scale_;          // [blocks, D]
  std::vector<float> minimum_;        // [blocks, D]
};

}  // namespace kvc
