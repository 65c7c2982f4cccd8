// src/ops/attention.cpp: CPU reference of exact softmax attention (decode and causal prefill, GQA).
//
// Plain loops from the math: for query head h (KV head h / (Hq / Hkv)) and query i at absolute
// index Tk - Tq + i,
//   s_j = scale * dot(q_i, k_j)            j <= Tk - Tq + i
//   p_j = exp(s_j - max s) / sum exp(s - max s)
//   out = sum_j p_j v_j
// in fp32, or in double throughout when AttentionOptions::accumulate_fp64 is set (the result is
// rounded to fp32 once, at the end). Decode is the Tq = 1 case of the same loop.
#include "kvc/ops/attention.hpp"

#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "kvc/core/error.hpp"

namespace kvc::ops {
namespace {

using View3 = HostView<float, 3>;
using ConstView3 = HostView<const float, 3>;

// Rejects NaN/Inf inputs, naming the head, token and channel (no token for a decode query).
void check_finite(const char* op, const char* name, ConstView3 x, bool has_token_axis) {
  for (std::int64_t h = 0; h < x.size(0); ++h)
    for (std::int64_t t = 0; t < x.size(1); ++t)
      for (std::int64_t c = 0; c < x.size(2); ++c)
        if (!std::isfinite(x(h, t, c))) {
          if (has_token_axis)
            KVC_FAIL(op, ": ", name, "[", h, ", ", t, ", ", c, "] = ", x(h, t, c),
                     " is not finite; inputs must be finite numbers");
          KVC_FAIL(op, ": ", name, "[", h, ", ", c, "] = ", x(h, t, c),
                   " is not finite; inputs must be finite numbers");
        }
}

// Validates q [Hq, Tq, D], k/v [Hkv, Tk, D], out [Hq, Tq, D] and the scale. Decode checks its own
// out and probabilities shapes first, so its [Hq, 1, D] views never show up in a message.
void check_arguments(const char* op, ConstView3 q, ConstView3 k, ConstView3 v, View3 out,
                     bool decode, const AttentionOptions& options) {
  const std::int64_t hq = q.size(0), tq = q.size(1), d = q.size(2);
  const std::int64_t hkv = k.size(0), tk = k.size(1);
  KVC_CHECK(hkv >= 1, op, ": k has Hkv = ", hkv, " heads; need Hkv >= 1");
  KVC_CHECK(hq >= 1, op, ": q has Hq = ", hq, " heads; need Hq >= 1");
  KVC_CHECK(hq % hkv == 0, op, ": Hq = ", hq, " is not a multiple of Hkv = ", hkv,
            "; GQA needs Hq % Hkv == 0");
  KVC_CHECK(d >= 1, op, ": head dim D = ", d, "; need D >= 1");
  KVC_CHECK(k.size(2) == d, op, ": k has D = ", k.size(2), " but q has D = ", d,
            "; D must be equal in q, k, v and out");
  KVC_CHECK(v.size(0) == hkv && v.size(1) == tk && v.size(2) == d, op, ": v has shape [", v.size(0),
            ", ", v.size(1), ", ", v.size(2), "] but k has [", hkv, ", ", tk, ", ", k.size(2),
            "]; k and v must have the same shape [Hkv, n, D]");
  KVC_CHECK(tk >= 1, op, ": the cache holds n = ", tk, " tokens; need n >= 1");
  KVC_CHECK(tq >= 1 && tq <= tk, op, ": Tq = ", tq, " queries against Tk = ", tk,
            " keys; need 1 <= Tq <= Tk");
  KVC_CHECK(out.size(0) == hq && out.size(1) == tq && out.size(2) == d, op, ": out has shape [",
            out.size(0), ", ", out.size(1), ", ", out.size(2), "]; expected [Hq, Tq, D] = [", hq,
            ", ", tq, ", ", d, "]");
  KVC_CHECK(std::isfinite(options.scale) && options.scale >= 0.0f, op, ": scale = ", options.scale,
            " is not allowed; use a finite scale > 0, or 0 for 1/sqrt(D)");
  check_finite(op, "q", q, !decode);
  check_finite(op, "k", k, true);
  check_finite(op, "v", v, true);
}

// The attention loop, with every intermediate in Acc (float or double). probabilities, when not
// null, receives [Hq, Tk] softmax weights of the single query row (decode only).
template <class Acc>
void attend(const char* op, ConstView3 q, ConstView3 k, ConstView3 v, View3 out,
            HostView<float, 2>* probabilities, const AttentionOptions& options) {
  const std::int64_t hq = q.size(0), tq = q.size(1), d = q.size(2);
  const std::int64_t hkv = k.size(0), tk = k.size(1);
  const std::int64_t group = hq / hkv;
  const Acc scale = options.scale == 0.0f ? Acc(1) / std::sqrt(static_cast<Acc>(d))
                                          : static_cast<Acc>(options.scale);
  std::vector<Acc> weight(static_cast<std::size_t>(tk));  // scores, then probabilities
  std::vector<Acc> acc(static_cast<std::size_t>(d));

  for (std::int64_t h = 0; h < hq; ++h) {
    const std::int64_t kv_head = h / group;
    for (std::int64_t i = 0; i < tq; ++i) {
      const std::int64_t last = tk - tq + i;  // the last key this query sees (inclusive)
      Acc max_score = -std::numeric_limits<Acc>::infinity();
      for (std::int64_t j = 0; j <= last; ++j) {
        Acc dot = 0;
        for (std::int64_t c = 0; c < d; ++c)
          dot += static_cast<Acc>(q(h, i, c)) * static_cast<Acc>(k(kv_head, j, c));
        const Acc score = dot * scale;
        KVC_CHECK(std::isfinite(score), op, ": score of query head ", h, ", query ", i, ", key ", j,
                  " overflowed to ", score, "; the inputs are too large");
        weight[j] = score;
        if (score > max_score) max_score = score;
      }
      Acc sum = 0;
      for (std::int64_t j = 0; j <= last; ++j) {
        weight[j] = std::exp(weight[j] - max_score);
        sum += weight[j];
      }
      for (std::int64_t j = 0; j <= last; ++j) weight[j] /= sum;

      for (auto& a : acc) a = 0;
      for (std::int64_t j = 0; j <= last; ++j)
        for (std::int64_t c = 0; c < d; ++c)
          acc[c] += weight[j] * static_cast<Acc>(v(kv_head, j, c));
      for (std::int64_t c = 0; c < d; ++c) out(h, i, c) = static_cast<float>(acc[c]);
      if (probabilities != nullptr)
        for (std::int64_t j = 0; j < tk; ++j)
          (*probabilities)(h, j) = j <= last ? static_cast<float>(weight[j]) : 0.0f;
    }
  }
}

void run(const char* op, ConstView3 q, ConstView3 k, ConstView3 v, View3 out,
         HostView<float, 2>* probabilities, bool decode, const AttentionOptions& options) {
  check_arguments(op, q, k, v, out, decode, options);
  if (options.accumulate_fp64)
    attend<double>(op, q, k, v, out, probabilities, options);
  else
    attend<float>(op, q, k, v, out, probabilities, options);
}

// [H, D] seen as [H, 1, D].
template <class T>
HostView<T, 3> with_unit_middle_axis(HostView<T, 2> x) {
  HostView<T, 3> y;
  y.data = x.data;
  y.shape = {x.shape[0], 1, x.shape[1]};
  y.strides = {x.strides[0], 0, x.strides[1]};
  return y;
}

void run_decode(ConstView3 k, ConstView3 v, HostView<const float, 2> q, HostView<float, 2> out,
                HostView<float, 2>* probabilities, const AttentionOptions& options) {
  constexpr const char* kOp = "decode_attention";
  KVC_CHECK(out.size(0) == q.size(0) && out.size(1) == q.size(1), kOp, ": out has shape [",
            out.size(0), ", ", out.size(1), "]; expected [Hq, D] = [", q.size(0), ", ", q.size(1),
            "]");
  if (probabilities != nullptr)
    KVC_CHECK(probabilities->size(0) == q.size(0) && probabilities->size(1) == k.size(1), kOp,
              ": probabilities has shape [", probabilities->size(0), ", ", probabilities->size(1),
              "]; expected [Hq, n] = [", q.size(0), ", ", k.size(1), "]");
  run(kOp, with_unit_middle_axis(q), k, v, with_unit_middle_axis(out), probabilities,
      /*decode=*/true, options);
}

}  // namespace

void decode_attention(Cpu, HostView<const float, 2> q, HostView<const float, 3> k,
                      HostView<const float, 3> v, HostView<float, 2> out,
                      const AttentionOptions& options) {
  run_decode(k, v, q, out, nullptr, options);
}

void decode_attention(Cpu, HostView<const float, 2> q, HostView<const float, 3> k,
                      HostView<const float, 3> v, HostView<float, 2> out,
                      HostView<float, 2> probabilities, const AttentionOptions& options) {
  run_decode(k, v, q, out, &probabilities, options);
}

void prefill_attention(Cpu, HostView<const float, 3> q, HostView<const float, 3> k,
                       HostView<const float, 3> v, HostView<float, 3> out,
                       const AttentionOptions& options) {
  run("prefill_attention", q, k, v, out, nullptr, /*decode=*/false, options);
}

}  // namespace kvc::ops
