// kvc/policies/keyproj/palu.hpp: Palu-style latent keys (ALGORITHMS.md section 20) where no model
// weights are available: instead of decomposing k_proj, the pre-RoPE keys of a group of g KV heads
// are projected onto the top r right singular vectors B [g*D, r] of calibration keys
// (`kvc calibrate palu`); the cache holds the latent h = k B (optionally quantized) and attention
// reconstructs k = h B^T, then applies RoPE at the token's position.
//
//   const kvc::KeyBasis* b = kvc::shared_key_basis("palu.safetensors", "palu");
//   struct Config : kvc::DefaultConfig { using KeyProjection = kvc::Palu; };
//   kvc::KVCache<Config, kvc::Cpu> cache{shape, kvc::Palu{.basis = b, .bits = 3}};
//   // kvc eval --policy 'palu(basis=palu.safetensors,bits=4)'
//
// Parameters and defaults: basis (required; its group size g and rank r = round(ratio * g * D)
// were fixed at calibration: Palu's head_group_size = 4 and ratio 0.5), bits = 0 (f16 latents;
// 2, 3, 4 or 8: Palu's asymmetric quantizer with an integer zero point, P5: scale =
// max(mx - mn, 1e-5) / (2^b - 1) rounded to f16, z = clamp(round(-mn / scale), 0, 2^b - 1),
// q = clamp(round(x / scale) + z, 0, 2^b - 1), x^ = (q - z) * scale, round half to even), qgroup =
// 32 (latent values per (scale, zero) of one token; must divide r).
// Not reproduced: the Hadamard rotation fused into the factors before quantization, the
// Fisher-information rank search (the rank is uniform) and the weight whitening (no weights).
// When it acts: at prefill compression and for every decode token. Needs the storage heads of a
// group to hold the same tokens (eviction `full` or one that keeps the same positions in every
// head of a group, and no decode eviction). Pre-RoPE keys: the cached post-RoPE key rotated back
// by its position with the cache's RoPE (CacheOptions::rope; kvc eval: the dump's).
// State per group: latents (f16 [n, r] or packed codes [n, r/qgroup, ceil(qgroup*bits/32)] uint32
// + f16 scale and zero per (token, qgroup)); per head its positions.
// bytes(): latent payload (+ scales and zeros as params), plus the basis of the layer's groups
// as f32 params (g*D * r * 4 bytes per group; a per-model constant in Palu, where it replaces the
// k_proj weights, counted here because the weights stay unchanged). Values: the Quant stage.
// Deterministic.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <span>
#include <string_view>
#include <vector>

#include "kvc/core/dtype.hpp"
#include "kvc/ops/rope.hpp"
#include "kvc/policies/concepts.hpp"
#include "kvc/policies/keyproj/key_basis.hpp"

namespace kvc {

struct Palu {
  static constexpr std::string_view kName = "palu";
  static constexpr PolicyKind kKind = PolicyKind::key_projection;

  const KeyBasis* basis = nullptr;  // not owned; immutable; outlives every cache using it
  int bits = 0;
  int qgroup = 32;

  void validate() const {
    KVC_CHECK(
        basis != nullptr,
        "palu: no basis given; the latent keys need calibration: run `kvc calibrate palu "
        "--data DUMP --group g --out palu.safetensors` and pass palu(basis=palu.safetensors)");
    basis->validate();
    KVC_CHECK(basis->method == "palu", "palu: the basis was written by `kvc calibrate ",
              basis->method, "`; needs one from `kvc calibrate palu`");
    KVC_CHECK(bits == 0 || bits == 2 || bits == 3 || bits == 4 || bits == 8, "palu: bits = ", bits,
              " is not supported; allowed: {0 (f16), 2, 3, 4, 8}");
    KVC_CHECK(bits == 0 || (qgroup >= 1 && basis->rank % qgroup == 0), "palu: qgroup = ", qgroup,
              " must divide the basis rank r = ", basis->rank);
  }
  int words_per_group() const { return (qgroup * bits + 31) / 32; }

  // Palu's fake-quant of one group of latent values in place; returns the codes (and scale, zero).
  void quantize(std::span<float> x, std::span<std::uint32_t> words, f16& scale_out,
                f16& zero_out) const {
    const int levels = (1 << bits) - 1;
    float mn = x[0], mx = x[0];
    for (float v : x) mn = std::min(mn, v), mx = std::max(mx, v);
    const float scale = static_cast<float>(f16(std::max(mx - mn, 1e-5f) / levels));
    const float zero = std::clamp(std::nearbyint(-mn / scale), 0.0f, static_cast<float>(levels));
    std::fill(words.begin(), words.end(), 0u);
    for (std::size_t i = 0; i < x.size(); ++i) {
      const auto q = static_cast<std::uint32_t>(
          std::clamp(std::nearbyint(x[i] / scale) + zero, 0.0f, static_cast<float>(levels)));
      const std::size_t bit = i * bits;
      words[bit / 32] |= q << (bit % 32);
      if (bit % 32 + bits > 32) words[bit / 32 + 1] |= q >> (32 - bit % 32);
    }
    scale_out = f16(scale);
    zero_out = f16(zero);
  }
  void dequantize(std::span<const std::uint32_t> words, f16 scale, f16 zero,
                  std::span<float> out) const {
    const std::uint32_t mask = (1u << bits) - 1;
    for (std::size_t i = 0; i < out.size(); ++i) {
      const std::size_t bit = i * bits;
      std::uint32_t q = words[bit / 32] >> (bit % 32);
      if (bit % 32 + bits > 32) q |= words[bit / 32 + 1] << (32 - bit % 32);
      out[i] =
          (static_cast<float>(q & mask) - static_cast<float>(zero)) * static_cast<float>(scale);
    }
  }

  struct Group {
    std::vector<f16> latent;           // bits == 0: [n, r]
    std::vector<std::uint32_t> codes;  // bits > 0: [n, r / qgroup, words_per_group]
    std::vector<f16> scales, zeros;    // bits > 0: [n, r / qgroup]
    std::vector<float> pending;        // [g * D] pre-RoPE rows of the heads seen so far
    int tokens = 0;
  };
  struct LayerState {
    int layer = 0;
    int head_dim = 0;
    ops::Rope rope;
    std::vector<Group> groups;
    std::vector<std::vector<std::int32_t>> positions;  // [S][n]
    std::vector<std::vector<float>> prompt_rows;       // [S][n * D] pre-RoPE, until grouped
  };

  bool active() const { return true; }
  bool needs_prerope() const { return false; }
  bool needs_all_tokens() const { return false; }
  bool owns_keys() const { return true; }
  bool offloads_values(const LayerState&) const { return false; }
  bool supports_decode_eviction() const { return false; }

  void prefill(LayerState& st, const KeyProjectionInput& in) const {
    const auto& keys = in.prompt->keys;
    const int kv_heads = static_cast<int>(keys.size(0));
    basis->check_shape("palu", in.prompt->num_layers, kv_heads, static_cast<int>(keys.size(2)));
    const Selection& sel = *in.selection;
    bool ok = static_cast<int>(sel.keep.size()) == kv_heads;
    for (int s = 0; ok && s < kv_heads; ++s)
      ok = sel.source_head[s] == s &&
           sel.keep[s] == sel.keep[s / basis->group_heads * basis->group_heads];
    KVC_CHECK(ok, "palu: the ", basis->group_heads,
              " KV heads of a group share one latent per token, so they must keep the same "
              "tokens; the eviction stage kept different tokens per head");
    st = LayerState{};
    st.layer = in.prompt->layer;
    st.head_dim = static_cast<int>(keys.size(2));
    st.rope = ops::Rope{in.rope_theta, in.rope_interleaved ? ops::RopeConvention::interleaved
                                                           : ops::RopeConvention::rotate_half};
    st.groups.assign(basis->groups(), Group{});
    st.positions.assign(kv_heads, {});
    st.prompt_rows.assign(kv_heads, {});
  }

  // Rows of the heads of group g (pre-RoPE, [g*D] per token) -> latents.
  void push_latent(LayerState& st, int g, const float* x) const {
    const int r = basis->rank, width = basis->width();
    const float* b = basis->at(st.layer, g);  // [width, r]
    std::vector<float> h(r, 0.0f);
    for (int a = 0; a < r; ++a) {
      double sum = 0;
      for (int c = 0; c < width; ++c) sum += double(x[c]) * b[c * r + a];
      h[a] = static_cast<float>(sum);
    }
    Group& group = st.groups[g];
    ++group.tokens;
    if (bits == 0) {
      for (float v : h) group.latent.push_back(f16(v));
      return;
    }
    for (int q = 0; q < r / qgroup; ++q) {
      std::vector<std::uint32_t> words(words_per_group());
      f16 scale, zero;
      quantize(std::span<float>(h.data() + q * qgroup, qgroup), words, scale, zero);
      group.codes.insert(group.codes.end(), words.begin(), words.end());
      group.scales.push_back(scale);
      group.zeros.push_back(zero);
    }
  }
  // The latent of token i of group g, dequantized [r].
  void latent(const LayerState& st, int g, int i, std::span<float> out) const {
    const Group& group = st.groups[g];
    const int r = basis->rank;
    if (bits == 0) {
      for (int a = 0; a < r; ++a)
        out[a] = static_cast<float>(group.latent[static_cast<std::size_t>(i) * r + a]);
      return;
    }
    const int per = r / qgroup, words = words_per_group();
    for (int q = 0; q < per; ++q) {
      const std::size_t slot = static_cast<std::size_t>(i) * per + q;
      dequantize(std::span<const std::uint32_t>(group.codes.data() + slot * words, words),
                 group.scales[slot], group.zeros[slot], out.subspan(q * qgroup, qgroup));
    }
  }

  void load_head(LayerState& st, int s, HostView<const float, 2> keys,
                 std::span<const std::int32_t> positions) const {
    const int d = st.head_dim, gh = basis->group_heads;
    const std::int64_t n = keys.size(0);
    st.positions[s].assign(positions.begin(), positions.end());
    auto& rows = st.prompt_rows[s];
    rows.resize(static_cast<std::size_t>(n) * d);
    for (std::int64_t t = 0; t < n; ++t)
      for (int c = 0; c < d; ++c) rows[t * d + c] = keys(t, c);
    ops::rope_rotate(Cpu{}, st.rope, make_view(rows.data(), {n, static_cast<std::int64_t>(d)}),
                     negated(positions));
    if (s % gh != gh - 1) return;  // the group's last head completes its rows
    const int g = s / gh;
    std::vector<float> x(static_cast<std::size_t>(gh) * d);
    for (std::int64_t t = 0; t < n; ++t) {
      for (int j = 0; j < gh; ++j)
        for (int c = 0; c < d; ++c) x[j * d + c] = st.prompt_rows[g * gh + j][t * d + c];
      push_latent(st, g, x.data());
    }
    for (int j = 0; j < gh; ++j) st.prompt_rows[g * gh + j] = {};
  }

  void append(LayerState& st, int s, const float* key, const float*, std::int32_t position) const {
    const int d = st.head_dim, gh = basis->group_heads;
    Group& group = st.groups[s / gh];
    st.positions[s].push_back(position);
    std::vector<float> row(key, key + d);
    const std::int32_t back = -position;
    ops::rope_rotate(Cpu{}, st.rope, make_view(row.data(), {1, static_cast<std::int64_t>(d)}),
                     std::span<const std::int32_t>(&back, 1));
    group.pending.insert(group.pending.end(), row.begin(), row.end());
    if (s % gh != gh - 1) return;
    push_latent(st, s / gh, group.pending.data());
    group.pending.clear();
  }

  KeyRows select(const LayerState&, int, HostView<const float, 2>, HostView<const float, 2>) const {
    return std::nullopt;
  }
  void keys(const LayerState& st, int s, std::span<const std::int32_t> rows,
            HostView<float, 2> out) const {
    const int d = st.head_dim, gh = basis->group_heads, r = basis->rank;
    const float* b = basis->at(st.layer, s / gh);  // [width, r]
    const int offset = (s % gh) * d;               // this head's rows of B
    std::vector<float> h(r);
    for (std::size_t i = 0; i < rows.size(); ++i) {
      latent(st, s / gh, rows[i], h);
      for (int c = 0; c < d; ++c) {
        double sum = 0;
        for (int a = 0; a < r; ++a) sum += double(h[a]) * b[(offset + c) * r + a];
        out(i, c) = static_cast<float>(sum);
      }
      ops::rope_rotate(Cpu{}, st.rope, out.slice(0, i, i + 1),
                       std::span<const std::int32_t>(&st.positions[s][rows[i]], 1));
    }
  }
  void patch_values(const LayerState&, int, std::span<const std::int32_t>,
                    HostView<float, 2>) const {}
  void gather(LayerState&, int, std::span<const std::int32_t>) const {
    KVC_FAIL("palu: tokens cannot be evicted during decode (one latent serves a group of heads)");
  }
  StorageBytes bytes(const LayerState& st) const {
    StorageBytes b;
    for (const Group& g : st.groups) {
      b.payload += static_cast<std::int64_t>(g.latent.size() * sizeof(f16) +
                                             g.codes.size() * sizeof(std::uint32_t));
      b.params += static_cast<std::int64_t>((g.scales.size() + g.zeros.size()) * sizeof(f16));
    }
    if (!st.groups.empty())
      b.params += static_cast<std::int64_t>(basis->groups()) * basis->width() * basis->rank *
                  static_cast<std::int64_t>(sizeof(float));
    return b;
  }

 private:
  static std::vector<std::int32_t> negated(std::span<const std::int32_t> positions) {
    std::vector<std::int32_t> out(positions.size());
    for (std::size_t i = 0; i < out.size(); ++i) out[i] = -positions[i];
    return out;
  }
};
static_assert(KeyProjectionPolicy<Palu>);

}  // namespace kvc
