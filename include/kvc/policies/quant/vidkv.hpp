// kvc/policies/quant/vidkv.hpp: VidKV (ALGORITHMS.md section 13): 1.x-bit K/V. Keys: mixed
// precision over channels; the "hard" channels (largest range, ranked over all KV heads of the
// layer) take 2-bit asymmetric min-max, the "easy" ones a DFT along channels followed by 1-bit sign
// codes with a mean-|x| scale. Values: 1.58-bit ternary with a mean-|x| scale; optionally some
// "protected" tokens' values take 2-bit min-max instead. All groups are per channel, G tokens.
//
//   struct Config : kvc::DefaultConfig { using Quant = kvc::VidKv; };
//   kvc::VidKv vid{.key_bits = 1.5, .group = 32, .residual = 128, .protect = 0.1};
//   kvc::KVCache<Config, kvc::Cpu> cache{shape, vid};
//
// Parameters and defaults (the reference's demo.py): key_bits = 1.5 in [1, 2] (ratio key_bits - 1
// of the D channels are hard: int(D * ratio), or min(32, D) when that is 0 with ratio > 0; 1 = all
// easy, 2 = all hard); group G = 32 (a multiple of 32: 1-bit codes fill uint32 words along tokens);
// residual R = 128 (a multiple of G); protect = 0: a count (>= 1) or a ratio (< 1) of tokens whose
// values are protected (2-bit min-max). STAND-IN: the released STP ranks vision tokens by their
// mean similarity to the text embeddings, which KV dumps do not hold; kvc ranks tokens by the L2
// norm of their value (ties to the lower position). A count applies to the prompt's quantized
// tokens; a ratio to every batch of newly quantized tokens. reference_compat = false: decodes as
// the paper describes (ternary code * scale, binary (2 bit - 1) * scale); true reproduces the
// released decode (ternary code without its scale, binary {0, scale}).
// Hard channels: ranked once per layer at prefill by range (max - min) over all KV heads and all
// prompt tokens (the reference pools batch x heads x tokens); ties to the lower channel. The set is
// fixed afterwards (a departure: the reference re-ranks at every flush; a store sees only its own
// head after prefill). The DFT is a plain O(d_easy^2) DFT in double of the d_easy easy channels
// (ascending channel order), viewed as 2 * d_easy reals (re, im interleaved), as torch.fft.fft +
// view_as_real do: the easy channels cost 2 bits each, which bytes() counts.
// When it acts / state: prefill quantizes the first T - T % G tokens and keeps the rest in an f16
// buffer; after each decode step, when the buffer holds R tokens, everything is DEQUANTIZED, joined
// with the buffer and the WHOLE sequence RE-QUANTIZED (the reference flush; errors compound).
// Tokens cannot be evicted after quantization (groups span G tokens).
// Determinism: 2-bit codes round half to even from f16 scale/min; ternary: +1 if x > scale/2,
// -1 if x < -scale/2, else 0; binary: 1 if x >= 0. Storage: docs/formats.md, "VidKV".
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numbers>
#include <span>
#include <string_view>
#include <vector>

#include "kvc/ops/quantize.hpp"
#include "kvc/policies/concepts.hpp"
#include "kvc/policies/quant/dense.hpp"

namespace kvc {

// Forward DFT of x [m] into out [2m] = (re, im) interleaved, X[k] = sum_j x[j] e^{-2 pi i jk/m}.
inline void vidkv_dft(std::span<const float> x, std::span<float> out) {
  const auto m = static_cast<int>(x.size());
  for (int k = 0; k < m; ++k) {
    double re = 0, im = 0;
    for (int j = 0; j < m; ++j) {
      const double angle = -2.0 * std::numbers::pi * static_cast<double>((j * k) % m) / m;
      re += x[j] * std::cos(angle);
      im += x[j] * std::sin(angle);
    }
    out[2 * k] = static_cast<float>(re);
    out[2 * k + 1] = static_cast<float>(im);
  }
}
// Real part of the inverse DFT: x[j] = Re(1/m sum_k X[k] e^{2 pi i jk/m}), X given as [2m].
inline void vidkv_idft_real(std::span<const float> spectrum, std::span<float> x) {
  const auto m = static_cast<int>(x.size());
  for (int j = 0; j < m; ++j) {
    double re = 0;
    for (int k = 0; k < m; ++k) {
      const double angle = 2.0 * std::numbers::pi * static_cast<double>((j * k) % m) / m;
      re += spectrum[2 * k] * std::cos(angle) - spectrum[2 * k + 1] * std::sin(angle);
    }
    x[j] = static_cast<float>(re / m);
  }
}

// Ternary codes of one group (reference 1.58-bit): scale = mean |x| (f16), code in {-1, 0, 1}.
inline float vidkv_ternary(std::span<const float> x, std::span<int> codes) {
  double sum = 0;
  for (float v : x) sum += std::fabs(v);
  const float scale =
      x.empty() ? 0.0f : static_cast<float>(f16(static_cast<float>(sum / x.size())));
  const float t = 0.5f * scale;
  for (std::size_t i = 0; i < x.size(); ++i) codes[i] = x[i] > t ? 1 : (x[i] < -t ? -1 : 0);
  return scale;
}

struct VidKv {
  static constexpr std::string_view kName = "vidkv";
  static constexpr PolicyKind kKind = PolicyKind::quant;

  double key_bits = 1.5;
  int group = 32;
  int residual = 128;
  double protect = 0;  // >= 1: a token count; in (0, 1): a ratio; 0: none
  bool reference_compat = false;

  void validate() const {
    KVC_CHECK(key_bits >= 1.0 && key_bits <= 2.0, "vidkv: key_bits = ", key_bits,
              " out of range; allowed: [1, 2] (1.5 = half the channels at 2 bits)");
    KVC_CHECK(group > 0 && group % 32 == 0, "vidkv: group = ", group,
              " must be a positive multiple of 32 (1-bit codes are packed 32 per word)");
    KVC_CHECK(residual > 0 && residual % group == 0, "vidkv: residual = ", residual,
              " must be a positive multiple of group = ", group);
    KVC_CHECK(protect >= 0 && (protect < 1 || protect == std::floor(protect)),
              "vidkv: protect = ", protect,
              " must be 0, a ratio in (0, 1) or a whole token count >= 1");
  }
  bool supports_decode_eviction() const { return false; }

  // Channels taking the 2-bit path for a head dim of d.
  int hard_channels(int d) const {
    const double ratio = key_bits - 1.0;
    int hard = static_cast<int>(d * ratio);
    if (ratio > 0 && hard == 0) hard = std::min(32, d);
    return hard;
  }

  class HeadStore {
   public:
    // The layer's prompt keys of every KV head [Hkv, T, D]: ranks the hard channels (pooled).
    void see_layer(const VidKv& q, HostView<const float, 3> keys) {
      const int d = static_cast<int>(keys.size(2));
      std::vector<float> lo(d, INFINITY), hi(d, -INFINITY);
      for (std::int64_t h = 0; h < keys.size(0); ++h)
        for (std::int64_t t = 0; t < keys.size(1); ++t)
          for (int c = 0; c < d; ++c) {
            lo[c] = std::min(lo[c], keys(h, t, c));
            hi[c] = std::max(hi[c], keys(h, t, c));
          }
      std::vector<int> order(d);
      for (int c = 0; c < d; ++c) order[c] = c;
      std::stable_sort(order.begin(), order.end(), [&](int a, int b) {
        const float ra = keys.size(1) > 0 ? hi[a] - lo[a] : 0,
                    rb = keys.size(1) > 0 ? hi[b] - lo[b] : 0;
        return ra > rb;
      });
      hard_mask_.assign(d, 0);
      for (int i = 0; i < q.hard_channels(d); ++i) hard_mask_[order[i]] = 1;
    }

    void load(const VidKv& q, HostView<const float, 2> keys, HostView<const float, 2> values,
              std::span<const std::int32_t> positions) {
      d_ = static_cast<int>(keys.size(1));
      if (static_cast<int>(hard_mask_.size()) != d_) {  // no layer view: rank this head alone
        HostView<const float, 3> one;
        one.data = keys.data;
        one.shape = {1, keys.size(0), keys.size(1)};
        one.strides = {0, keys.strides[0], keys.strides[1]};
        see_layer(q, one);
      }
      hard_.clear(), easy_.clear();
      for (int c = 0; c < d_; ++c) (hard_mask_[c] ? hard_ : easy_).push_back(c);
      positions_.assign(positions.begin(), positions.end());
      const std::int64_t n = keys.size(0), quantized = n - n % q.group;
      std::vector<float> k(static_cast<std::size_t>(quantized) * d_), v(k.size());
      for (std::int64_t t = 0; t < quantized; ++t)
        for (int c = 0; c < d_; ++c) k[t * d_ + c] = keys(t, c), v[t * d_ + c] = values(t, c);
      protected_.clear();
      choose_protected(q, v, static_cast<int>(quantized), true);
      quantize_all(q, k, v);
      key_buffer_.reset(d_);
      value_buffer_.reset(d_);
      key_buffer_.push_rows(keys, quantized, n);
      value_buffer_.push_rows(values, quantized, n);
    }
    void append(const VidKv&, const float* key, const float* value, std::int32_t position) {
      key_buffer_.push(key);
      value_buffer_.push(value);
      positions_.push_back(position);
    }
    // The reference flush: when the buffer holds R tokens, dequantize everything, append the
    // buffer and re-quantize the whole sequence.
    void after_step(const VidKv& q) {
      if (key_buffer_.rows() < q.residual) return;
      const int old = tokens_, fresh = key_buffer_.rows(), n = old + fresh;
      std::vector<float> k(static_cast<std::size_t>(n) * d_), v(k.size());
      keys(make_view(k.data(), {n, d_}));
      values(make_view(v.data(), {n, d_}));
      std::vector<float> fresh_values(v.begin() + static_cast<std::ptrdiff_t>(old) * d_, v.end());
      choose_protected(q, fresh_values, fresh, false);
      quantize_all(q, k, v);
      key_buffer_.clear();
      value_buffer_.clear();
    }

    int size() const { return static_cast<int>(positions_.size()); }
    std::span<const std::int32_t> positions() const { return positions_; }
    int quantized_tokens() const { return tokens_; }
    int buffered_tokens() const { return key_buffer_.rows(); }
    std::span<const int> hard_channel_list() const { return hard_; }
    std::span<const std::uint8_t> protected_tokens() const { return protected_; }  // [n_q]
    std::span<const std::uint32_t> value_codes() const { return value_codes_; }

    // Dequantized keys [n, D]. The quantized part is decoded once per (re)quantization and kept
    // as a CPU-side copy (not counted by bytes(): it is what attention would compute on the fly).
    void keys(HostView<float, 2> out) const {
      refresh_decoded();
      for (int t = 0; t < tokens_; ++t)
        for (int c = 0; c < d_; ++c)
          out(t, c) = decoded_keys_[static_cast<std::size_t>(t) * d_ + c];
      key_buffer_.copy_to(out, tokens_);
    }
    void values(HostView<float, 2> out) const {  // [n, D]
      refresh_decoded();
      for (int t = 0; t < tokens_; ++t)
        for (int c = 0; c < d_; ++c)
          out(t, c) = decoded_values_[static_cast<std::size_t>(t) * d_ + c];
      value_buffer_.copy_to(out, tokens_);
    }

   private:
    void refresh_decoded() const {
      if (decoded_valid_) return;
      decoded_keys_.assign(static_cast<std::size_t>(tokens_) * d_, 0.0f);
      decoded_values_.assign(decoded_keys_.size(), 0.0f);
      decode_keys(make_view(decoded_keys_.data(), {tokens_, d_}));
      decode_values(make_view(decoded_values_.data(), {tokens_, d_}));
      decoded_valid_ = true;
    }
    void decode_keys(HostView<float, 2> out) const {  // [n_q, D]
      const int easy_reals = 2 * static_cast<int>(easy_.size());
      const int hard_words = group_ / 16, easy_words = group_ / 32;
      std::vector<float> spectrum(easy_reals), easy(easy_.size());
      for (int t = 0; t < tokens_; ++t) {
        const int g = t / group_, i = t % group_;
        for (std::size_t h = 0; h < hard_.size(); ++h) {
          const std::size_t p = static_cast<std::size_t>(g) * hard_.size() + h;
          const std::uint32_t word = hard_codes_[p * hard_words + static_cast<std::size_t>(i / 16)];
          out(t, hard_[h]) = ops::dequantize_code(ops::unpack_field(word, i % 16, 2),
                                                  ops::GroupParams{hard_scale_[p], hard_min_[p]});
        }
        if (easy_.empty()) continue;
        for (int r = 0; r < easy_reals; ++r) {
          const std::size_t p = static_cast<std::size_t>(g) * easy_reals + r;
          const std::uint32_t bit =
              ops::unpack_field(easy_codes_[p * easy_words + i / 32], i % 32, 1);
          const float s = static_cast<float>(easy_scale_[p]);
          spectrum[r] = compat_ ? bit * s : (2.0f * bit - 1.0f) * s;
        }
        vidkv_idft_real(spectrum, easy);
        for (std::size_t e = 0; e < easy_.size(); ++e) out(t, easy_[e]) = easy[e];
      }
    }
    void decode_values(HostView<float, 2> out) const {  // [n_q, D]
      const int words = group_ / 16;
      for (int t = 0; t < tokens_; ++t) {
        const int g = t / group_, i = t % group_;
        for (int c = 0; c < d_; ++c) {
          const std::size_t p = static_cast<std::size_t>(g) * d_ + c;
          const std::uint32_t code = ops::unpack_field(value_codes_[p * words + i / 16], i % 16, 2);
          if (protected_[t]) {
            out(t, c) = ops::dequantize_code(code, ops::GroupParams{prot_scale_[p], prot_min_[p]});
          } else {
            const float ternary = static_cast<float>(code) - 1.0f;
            out(t, c) = compat_ ? ternary : ternary * static_cast<float>(value_scale_[p]);
          }
        }
      }
    }

   public:
    StorageBytes bytes() const {
      StorageBytes b;
      b.payload = static_cast<std::int64_t>(
                      (hard_codes_.size() + easy_codes_.size() + value_codes_.size()) * 4) +
                  key_buffer_.bytes() + value_buffer_.bytes();
      b.params =
          static_cast<std::int64_t>((hard_scale_.size() + hard_min_.size() + easy_scale_.size() +
                                     value_scale_.size() + prot_scale_.size() + prot_min_.size()) *
                                    sizeof(f16)) +
          static_cast<std::int64_t>(protect_words_.size() * 4) +
          (d_ + 31) / 32 * 4;  // the hard-channel bitmask
      b.index = static_cast<std::int64_t>(positions_.size() * sizeof(std::int32_t));
      return b;
    }
    void gather(std::span<const std::int32_t>) {
      KVC_FAIL("vidkv: quantized groups span ", group_,
               " tokens, so tokens cannot be evicted from a VidKV store");
    }

   private:
    // Appends protection flags for `count` new tokens whose values are rows of v [count, D].
    void choose_protected(const VidKv& q, const std::vector<float>& v, int count, bool prompt) {
      int chosen = 0;
      if (q.protect >= 1)
        chosen = prompt ? std::min(count, static_cast<int>(q.protect)) : 0;
      else if (q.protect > 0)
        chosen = static_cast<int>(std::floor(q.protect * count));
      std::vector<double> norm(count);
      for (int t = 0; t < count; ++t) {
        double s = 0;
        for (int c = 0; c < d_; ++c) s += static_cast<double>(v[t * d_ + c]) * v[t * d_ + c];
        norm[t] = s;
      }
      std::vector<int> order(count);
      for (int t = 0; t < count; ++t) order[t] = t;
      std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return norm[a] > norm[b]; });
      const std::size_t first = protected_.size();
      protected_.resize(first + count, 0);
      for (int i = 0; i < chosen; ++i) protected_[first + order[i]] = 1;
    }

    // (Re)quantizes tokens [0, n) from k, v [n, D]; n % G == 0; protected_ has n flags.
    void quantize_all(const VidKv& q, const std::vector<float>& k, const std::vector<float>& v) {
      group_ = q.group;
      compat_ = q.reference_compat;
      tokens_ = static_cast<int>(k.size() / d_);
      decoded_valid_ = false;
      const int groups = tokens_ / group_, easy_reals = 2 * static_cast<int>(easy_.size());
      hard_codes_.clear(), hard_scale_.clear(), hard_min_.clear();
      easy_codes_.clear(), easy_scale_.clear();
      value_codes_.clear(), value_scale_.clear(), prot_scale_.clear(), prot_min_.clear();
      protect_words_.clear();
      std::vector<float> x(group_), easy(easy_.size()), spectra;
      std::vector<std::uint8_t> codes(group_);
      std::vector<std::uint32_t> words;
      // Spectra of every token's easy sub-vector [n, 2 * d_easy].
      spectra.resize(static_cast<std::size_t>(tokens_) * easy_reals);
      for (int t = 0; t < tokens_ && !easy_.empty(); ++t) {
        for (std::size_t e = 0; e < easy_.size(); ++e) easy[e] = k[t * d_ + easy_[e]];
        vidkv_dft(easy, std::span<float>(spectra).subspan(static_cast<std::size_t>(t) * easy_reals,
                                                          easy_reals));
      }
      auto append_words = [&](std::vector<std::uint32_t>& store, int bits) {
        words.assign(ops::words_for(group_, bits), 0);
        ops::pack_codes(codes, bits, words);
        store.insert(store.end(), words.begin(), words.end());
      };
      for (int g = 0; g < groups; ++g) {
        const int t0 = g * group_;
        for (const int c : hard_) {  // 2-bit asymmetric min-max along tokens
          for (int i = 0; i < group_; ++i) x[i] = k[(t0 + i) * d_ + c];
          const auto p = ops::quantize_group(Cpu{}, x, 2, codes);
          hard_scale_.push_back(p.scale);
          hard_min_.push_back(p.minimum);
          append_words(hard_codes_, 2);
        }
        for (int r = 0; r < easy_reals; ++r) {  // 1-bit sign codes, scale = mean |x|
          double sum = 0;
          for (int i = 0; i < group_; ++i) {
            x[i] = spectra[static_cast<std::size_t>(t0 + i) * easy_reals + r];
            sum += std::fabs(x[i]);
            codes[i] = x[i] >= 0 ? 1 : 0;
          }
          easy_scale_.push_back(f16(static_cast<float>(sum / group_)));
          append_words(easy_codes_, 1);
        }
        std::uint32_t mask_word = 0;
        std::vector<int> ternary(group_);
        for (int c = 0; c < d_; ++c) {
          std::vector<float> plain, kept;
          for (int i = 0; i < group_; ++i)
            (protected_[t0 + i] ? kept : plain).push_back(v[(t0 + i) * d_ + c]);
          std::vector<int> tcodes(plain.size());
          value_scale_.push_back(f16(vidkv_ternary(plain, tcodes)));
          std::vector<std::uint8_t> pcodes(kept.size());
          ops::GroupParams pp{f16(0.0f), f16(0.0f)};
          if (!kept.empty()) pp = ops::quantize_group(Cpu{}, kept, 2, pcodes);
          if (q.protect > 0) prot_scale_.push_back(pp.scale), prot_min_.push_back(pp.minimum);
          std::size_t a = 0, b = 0;
          for (int i = 0; i < group_; ++i)
            codes[i] =
                protected_[t0 + i] ? pcodes[b++] : static_cast<std::uint8_t>(tcodes[a++] + 1);
          append_words(value_codes_, 2);
        }
        if (q.protect > 0) {
          for (int w = 0; w < group_ / 32; ++w) {
            mask_word = 0;
            for (int i = 0; i < 32; ++i)
              if (protected_[t0 + w * 32 + i]) mask_word |= 1u << i;
            protect_words_.push_back(mask_word);
          }
        }
      }
    }

    int d_ = 0, group_ = 32, tokens_ = 0;
    bool compat_ = false;
    std::vector<std::uint8_t> hard_mask_;       // [D] 1 = hard channel
    std::vector<int> hard_, easy_;              // ascending channel lists
    std::vector<std::uint32_t> hard_codes_;     // [groups, d_hard, G / 16], 2-bit along tokens
    std::vector<f16> hard_scale_, hard_min_;    // [groups, d_hard]
    std::vector<std::uint32_t> easy_codes_;     // [groups, 2 d_easy, G / 32], 1-bit along tokens
    std::vector<f16> easy_scale_;               // [groups, 2 d_easy] (minimum 0, not stored)
    std::vector<std::uint32_t> value_codes_;    // [groups, D, G / 16], 2-bit fields
    std::vector<f16> value_scale_;              // [groups, D] ternary scale
    std::vector<f16> prot_scale_, prot_min_;    // [groups, D] when protect > 0
    std::vector<std::uint32_t> protect_words_;  // [groups, G / 32] when protect > 0
    std::vector<std::uint8_t> protected_;       // [n_q] flags (mirror of protect_words_)
    HalfRows key_buffer_, value_buffer_;        // [< R, D] f16
    std::vector<std::int32_t> positions_;       // [n]
    mutable std::vector<float> decoded_keys_, decoded_values_;  // [n_q, D] decode of the above
    mutable bool decoded_valid_ = false;
  };
};
static_assert(QuantPolicy<VidKv>);

}  // namespace kvc
