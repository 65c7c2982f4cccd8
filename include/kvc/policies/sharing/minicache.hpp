// kvc/policies/sharing/minicache.hpp: MiniCache (ALGORITHMS.md section 17), cross-layer merging
// of adjacent layer pairs: one SLERP-interpolated unit direction per token shared by the pair,
// magnitudes kept per layer, and the tokens whose key directions disagree most kept unmerged.
//
//   struct Config : kvc::DefaultConfig { using LayerSharing = kvc::MiniCache; };
//   kvc::KVCache<Config, kvc::Cpu> cache{shape, kvc::MiniCache{.t = 0.6, .gamma = 0.05}};
//   // kvc eval: minicache(t=0.6,gamma=0.05)+kivi(bits=4)   ("MiniCache-4": quantize what remains)
//
// Parameters and defaults: t = 0.6 (SLERP weight of the upper layer: t = 0 gives the lower
// layer's direction, t = 1 the upper's), start = -1 (first merged layer; -1 = L/2), pairs
// (start, start+1), (start+2, start+3), ... (a last unpaired layer stores alone); retention
// rule `range` (default): with d_i = theta_i / pi the angular distance of token i's keys in the
// two layers and d_min, d_max their extremes over the prompt (per KV head), the tokens with
// d_i > d_max - gamma * (d_max - d_min) are retained, gamma = 0.05 (the paper's gamma; its exact
// threshold formula is UNVERIFIED, section 27.3: this form retains more tokens as gamma grows, as
// the paper's ablation does); rule `ratio`: the ceil(ratio * T) tokens of largest d_i (the
// KVCache-Factory re-implementation, ratio = 0.05; ties: lower position first). The retention set
// is decided on the keys and reused for the values (as in the runtime port). eps = 1e-6.
// When it acts: at prefill compression of the upper layer of a pair (the lower layer stays whole
// until then). Decode-time tokens are NOT merged: each layer appends them to its own unmerged
// store (with the Quant slot's flushes), as the paper's decode-time cadence is unverified
// (section 17(d)); the compression therefore applies to the prompt only.
// State: none in the policy; the cache keeps per pair and storage head the shared directions
// (through the Quant slot), per layer f16 magnitudes and its retained + decode tokens.
// Determinism: computed in double from the f32 inputs; theta = 2 atan2(|u_a - u_b|, |u_a + u_b|)
// (the re-implementation's acos(clamp(<u_a, u_b>, -1 + eps, 1 - eps)) never reaches 0; this form
// gives theta = 0 for identical directions, which take the LERP path, section 25.12); LERP when
// sin(theta) <= eps; zero vectors: direction x / max(|x|, eps), magnitude |x| (0 restores 0).
// Zero vectors count as orthogonal (theta = pi/2) to anything but another zero vector.
// Not combinable with an eviction policy other than `full` (pairs need the same tokens in both
// layers) or a Quant that keeps evicted tokens (mikv): the cache rejects those naming both.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numbers>
#include <string_view>
#include <vector>

#include "kvc/core/error.hpp"
#include "kvc/policies/concepts.hpp"

namespace kvc {

enum class RetentionRule { range, ratio };

struct MiniCache {
  static constexpr std::string_view kName = "minicache";
  static constexpr PolicyKind kKind = PolicyKind::layer_sharing;

  double t = 0.6;
  int start = -1;
  RetentionRule retain = RetentionRule::range;
  double gamma = 0.05;
  double ratio = 0.05;
  double eps = 1e-6;

  void validate() const {
    KVC_CHECK(t >= 0.0 && t <= 1.0, "minicache: t = ", t, " must be in [0, 1]");
    KVC_CHECK(start >= -1, "minicache: start = ", start, " must be >= 0, or -1 for L/2");
    KVC_CHECK(gamma >= 0.0 && gamma <= 1.0, "minicache: gamma = ", gamma, " must be in [0, 1]");
    KVC_CHECK(ratio >= 0.0 && ratio <= 1.0, "minicache: ratio = ", ratio, " must be in [0, 1]");
    KVC_CHECK(eps > 0.0 && eps < 0.1, "minicache: eps = ", eps, " must be in (0, 0.1)");
  }
  bool needs_prompt_keys() const { return false; }

  int first_layer(int layers) const { return start < 0 ? layers / 2 : start; }

  SharingPlan plan(const SharingInput& in) const {
    const int first = first_layer(in.num_layers);
    KVC_CHECK(first < in.num_layers, "minicache: start = ", first,
              " must be < layers = ", in.num_layers);
    SharingPlan plan = no_sharing(in.num_layers);
    for (int a = first; a + 1 < in.num_layers; a += 2) {
      plan.partner[a] = a + 1;
      plan.partner[a + 1] = a;
    }
    return plan;
  }

  // Angular distance / pi of every token's vectors in the two layers, [T].
  std::vector<float> distances(HostView<const float, 2> a, HostView<const float, 2> b) const {
    std::vector<float> d(a.size(0));
    std::vector<double> u(a.size(1)), w(a.size(1));
    for (std::int64_t i = 0; i < a.size(0); ++i) {
      unit(a, i, u);
      unit(b, i, w);
      d[i] = static_cast<float>(angle(u, w) / std::numbers::pi);
    }
    return d;
  }

  // Ascending indices of the tokens kept unmerged, from the key distances (see the header).
  std::vector<std::int32_t> retained(const std::vector<float>& d) const {
    std::vector<std::int32_t> keep;
    const auto n = static_cast<std::int64_t>(d.size());
    if (n == 0) return keep;
    if (retain == RetentionRule::range) {
      const auto [lo, hi] = std::minmax_element(d.begin(), d.end());
      const double threshold = *hi - gamma * (static_cast<double>(*hi) - *lo);
      for (std::int64_t i = 0; i < n; ++i)
        if (d[i] > threshold) keep.push_back(static_cast<std::int32_t>(i));
      return keep;
    }
    const auto count = std::min<std::int64_t>(
        n, static_cast<std::int64_t>(std::ceil(ratio * static_cast<double>(n) - 1e-9)));
    std::vector<std::int32_t> order(n);
    for (std::int64_t i = 0; i < n; ++i) order[i] = static_cast<std::int32_t>(i);
    std::stable_sort(order.begin(), order.end(),
                     [&](std::int32_t x, std::int32_t y) { return d[x] > d[y]; });
    keep.assign(order.begin(), order.begin() + count);
    std::sort(keep.begin(), keep.end());
    return keep;
  }

  // SLERP of the unit directions u (lower layer) and w (upper layer) at weight t, unit length.
  void shared_direction(const std::vector<double>& u, const std::vector<double>& w,
                        std::vector<double>& out) const {
    const double theta = angle(u, w);
    const double s = std::sin(theta);
    const bool lerp = s <= eps;
    const double wa = lerp ? 1.0 - t : std::sin((1.0 - t) * theta) / s;
    const double wb = lerp ? t : std::sin(t * theta) / s;
    double norm = 0;
    for (std::size_t c = 0; c < u.size(); ++c) {
      out[c] = wa * u[c] + wb * w[c];
      norm += out[c] * out[c];
    }
    norm = std::max(std::sqrt(norm), eps);
    for (auto& x : out) x /= norm;
  }

  SharedHead merge(const LayerPair& p) const {
    const std::int64_t n = p.keys_a.size(0), d = p.keys_a.size(1);
    KVC_CHECK(p.keys_b.size(0) == n && p.values_a.size(0) == n && p.values_b.size(0) == n,
              "minicache: the two layers of a pair must hold the same tokens, got ", n, " and ",
              p.keys_b.size(0));
    SharedHead out;
    out.key_distance = distances(p.keys_a, p.keys_b);
    out.retained = retained(out.key_distance);
    std::vector<char> is_retained(n, 0);
    for (auto i : out.retained) is_retained[i] = 1;
    std::vector<double> u(d), w(d), dir(d);
    for (std::int64_t i = 0; i < n; ++i) {
      if (is_retained[i]) continue;
      out.merged.push_back(static_cast<std::int32_t>(i));
      out.key_magnitude[0].push_back(static_cast<float>(unit(p.keys_a, i, u)));
      out.key_magnitude[1].push_back(static_cast<float>(unit(p.keys_b, i, w)));
      shared_direction(u, w, dir);
      for (auto x : dir) out.key_direction.push_back(static_cast<float>(x));
      out.value_magnitude[0].push_back(static_cast<float>(unit(p.values_a, i, u)));
      out.value_magnitude[1].push_back(static_cast<float>(unit(p.values_b, i, w)));
      shared_direction(u, w, dir);
      for (auto x : dir) out.value_direction.push_back(static_cast<float>(x));
    }
    return out;
  }

  // The restore path in f32, for layer 0 (lower) or 1 (upper): merged tokens as shared direction
  // times the layer's magnitude, retained tokens copied from the originals in `p`.
  static void restore(const SharedHead& s, const LayerPair& p, int which,
                      HostView<float, 2> keys,      // [T, D]
                      HostView<float, 2> values) {  // [T, D]
    const std::int64_t d = keys.size(1);
    const auto& ok = which == 0 ? p.keys_a : p.keys_b;
    const auto& ov = which == 0 ? p.values_a : p.values_b;
    for (auto i : s.retained)
      for (std::int64_t c = 0; c < d; ++c) {
        keys(i, c) = ok(i, c);
        values(i, c) = ov(i, c);
      }
    for (std::size_t m = 0; m < s.merged.size(); ++m)
      for (std::int64_t c = 0; c < d; ++c) {
        keys(s.merged[m], c) = s.key_direction[m * d + c] * s.key_magnitude[which][m];
        values(s.merged[m], c) = s.value_direction[m * d + c] * s.value_magnitude[which][m];
      }
  }

 private:
  // Writes row i of x as a unit vector (divided by max(|x|, eps)); returns |x|.
  double unit(HostView<const float, 2> x, std::int64_t i, std::vector<double>& u) const {
    double norm = 0;
    for (std::size_t c = 0; c < u.size(); ++c) norm += static_cast<double>(x(i, c)) * x(i, c);
    norm = std::sqrt(norm);
    const double div = std::max(norm, eps);
    for (std::size_t c = 0; c < u.size(); ++c) u[c] = x(i, c) / div;
    return norm;
  }
  // The angle between unit vectors as 2 atan2(|u - w|, |u + w|): well conditioned near 0 and pi,
  // and exactly 0 for identical directions (acos of a rounded dot product is not).
  static double angle(const std::vector<double>& u, const std::vector<double>& w) {
    double minus = 0, plus = 0;
    for (std::size_t c = 0; c < u.size(); ++c) {
      minus += (u[c] - w[c]) * (u[c] - w[c]);
      plus += (u[c] + w[c]) * (u[c] + w[c]);
    }
    return 2.0 * std::atan2(std::sqrt(minus), std::sqrt(plus));
  }
};
static_assert(LayerSharingPolicy<MiniCache>);

}  // namespace kvc
