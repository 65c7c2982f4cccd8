// src/ops/scores.cpp: CPU reference of observation-window scores (ALGORITHMS.md P1) and 1-D
// pooling along the token axis (P2).
//
// window_scores, per query head h (KV head h / (Hq / Hkv)) and window row i (absolute token
// T - W + i), all in fp32:
//   S[i, j] = scale * dot(q_window[h, i], k[h / g, j])        j <= T - W + i (causal inside the
//   window) A[i, :] = softmax(S[i, :]) over the visible columns, rounded to f16/bf16 (or not) per
//   options s[h, j] = sum_i A[i, j]   (or that sum / W)              j < T - W
// Masked columns contribute exactly 0, as they do in the released code (exp of the most negative
// finite value minus the row max is 0 in fp32). Sums run over i in increasing order in fp32 and the
// result is not rounded again.
#include "kvc/ops/scores.hpp"

#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "kvc/core/dtype.hpp"
#include "kvc/core/error.hpp"

namespace kvc::ops {
namespace {

float round_probability(float p, ProbabilityRounding rounding) {
  switch (rounding) {
    case ProbabilityRounding::none:
      return p;
    case ProbabilityRounding::f16:
      return round_through<f16>(p);
    case ProbabilityRounding::bf16:
      return round_through<bf16>(p);
  }
  KVC_FAIL("window_scores: rounding = ", static_cast<int>(rounding),
           " is not a ProbabilityRounding; allowed: none, f16, bf16");
}

void check_finite(const char* name, HostView<const float, 3> x) {
  for (std::int64_t h = 0; h < x.size(0); ++h)
    for (std::int64_t t = 0; t < x.size(1); ++t)
      for (std::int64_t c = 0; c < x.size(2); ++c)
        KVC_CHECK(std::isfinite(x(h, t, c)), "window_scores: ", name, "[", h, ", ", t, ", ", c,
                  "] = ", x(h, t, c), " is not finite; inputs must be finite numbers");
}

}  // namespace

void window_scores(Cpu, HostView<const float, 3> q_window, HostView<const float, 3> k,
                   HostView<float, 2> scores, const WindowScoreOptions& options) {
  const std::int64_t hq = q_window.size(0), w = q_window.size(1), d = q_window.size(2);
  const std::int64_t hkv = k.size(0), t = k.size(1);
  KVC_CHECK(hkv >= 1, "window_scores: k has Hkv = ", hkv, " heads; need Hkv >= 1");
  KVC_CHECK(hq >= 1, "window_scores: q_window has Hq = ", hq, " heads; need Hq >= 1");
  KVC_CHECK(hq % hkv == 0, "window_scores: Hq = ", hq, " is not a multiple of Hkv = ", hkv,
            "; GQA needs Hq % Hkv == 0");
  KVC_CHECK(d >= 1, "window_scores: head dim D = ", d, "; need D >= 1");
  KVC_CHECK(k.size(2) == d, "window_scores: k has D = ", k.size(2), " but q_window has D = ", d,
            "; D must be equal");
  KVC_CHECK(w >= 1 && w <= t, "window_scores: window W = ", w, " with T = ", t,
            " tokens; need 1 <= W <= T");
  KVC_CHECK(scores.size(0) == hq && scores.size(1) == t - w, "window_scores: scores has shape [",
            scores.size(0), ", ", scores.size(1), "]; expected [Hq, T - W] = [", hq, ", ", t - w,
            "]");
  KVC_CHECK(std::isfinite(options.scale) && options.scale >= 0.0f,
            "window_scores: scale = ", options.scale,
            " is not allowed; use a finite scale > 0, or 0 for 1/sqrt(D)");
  KVC_CHECK(options.reduction == ScoreReduction::sum || options.reduction == ScoreReduction::mean,
            "window_scores: reduction = ", static_cast<int>(options.reduction),
            " is not a ScoreReduction; allowed: sum, mean");
  round_probability(0.0f, options.rounding);  // validates the enum once, at the edge
  check_finite("q_window", q_window);
  check_finite("k", k);

  const float scale =
      options.scale == 0.0f ? 1.0f / std::sqrt(static_cast<float>(d)) : options.scale;
  const std::int64_t group = hq / hkv, prefix = t - w;
  std::vector<float> row(static_cast<std::size_t>(t));         // [T] scores, then probabilities
  std::vector<float> total(static_cast<std::size_t>(prefix));  // [T - W]

  for (std::int64_t h = 0; h < hq; ++h) {
    const std::int64_t kv_head = h / group;
    for (auto& s : total) s = 0.0f;
    for (std::int64_t i = 0; i < w; ++i) {
      const std::int64_t last = prefix + i;  // the last visible column (inclusive)
      float max_score = -std::numeric_limits<float>::infinity();
      for (std::int64_t j = 0; j <= last; ++j) {
        float dot = 0.0f;
        for (std::int64_t c = 0; c < d; ++c) dot += q_window(h, i, c) * k(kv_head, j, c);
        const float score = dot * scale;
        KVC_CHECK(std::isfinite(score), "window_scores: score of query head ", h, ", window row ",
                  i, ", key ", j, " overflowed to ", score, "; the inputs are too large");
        row[j] = score;
        if (score > max_score) max_score = score;
      }
      float sum = 0.0f;
      for (std::int64_t j = 0; j <= last; ++j) {
        row[j] = std::exp(row[j] - max_score);
        sum += row[j];
      }
      for (std::int64_t j = 0; j < prefix; ++j)
        total[j] += round_probability(row[j] / sum, options.rounding);
    }
    for (std::int64_t j = 0; j < prefix; ++j)
      scores(h, j) =
          options.reduction == ScoreReduction::mean ? total[j] / static_cast<float>(w) : total[j];
  }
}

void pool1d(Cpu, HostView<const float, 2> in, HostView<float, 2> out, int kernel, Pool pool) {
  KVC_CHECK(kernel >= 1 && kernel % 2 == 1, "pool1d: kernel = ", kernel,
            " is not allowed; the kernel must be odd and >= 1 (1, 3, 5, ...) so the output keeps "
            "the input length");
  KVC_CHECK(pool == Pool::avg || pool == Pool::max, "pool1d: pool = ", static_cast<int>(pool),
            " is not a Pool; allowed: avg, max");
  const std::int64_t rows = in.size(0), n = in.size(1);
  KVC_CHECK(out.size(0) == rows && out.size(1) == n, "pool1d: out has shape [", out.size(0), ", ",
            out.size(1), "]; expected the input shape [", rows, ", ", n, "]");
  for (std::int64_t r = 0; r < rows; ++r)
    for (std::int64_t j = 0; j < n; ++j)
      KVC_CHECK(!std::isnan(in(r, j)), "pool1d: in[", r, ", ", j,
                "] is NaN; scores must not be NaN");

  const std::int64_t radius = kernel / 2;
  std::vector<float> pooled(static_cast<std::size_t>(n));  // [n]; out may alias in
  for (std::int64_t r = 0; r < rows; ++r) {
    for (std::int64_t i = 0; i < n; ++i) {
      const std::int64_t begin = i - radius < 0 ? 0 : i - radius;
      const std::int64_t end = i + radius + 1 > n ? n : i + radius + 1;
      if (pool == Pool::avg) {
        float sum = 0.0f;  // the zero padding adds nothing but still counts in the divisor
        for (std::int64_t j = begin; j < end; ++j) sum += in(r, j);
        pooled[i] = sum / static_cast<float>(kernel);
      } else {
        float best = -std::numeric_limits<float>::infinity();  // the padding
        for (std::int64_t j = begin; j < end; ++j)
          if (in(r, j) > best) best = in(r, j);
        pooled[i] = best;
      }
    }
    for (std::int64_t i = 0; i < n; ++i) out(r, i) = pooled[i];
  }
}

}  // namespace kvc::ops
