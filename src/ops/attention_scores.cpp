// src/ops/attention_scores.cpp: CPU reference of decode attention that also returns importance
// (kvc::ops::decode_attention_with_scores, Cpu).
//
// The probabilities come from the reference decode attention (fp32 softmax, or fp64 on request);
// for KV head h and key j the g probabilities of the group's query heads are summed in double,
// each first rounded to f16 when ScoreOptions::round_f16 (exactly kvc::H2o's per-step sum), and
// the score is updated (added or overwritten) and rounded to fp32 once.
#include <cstdint>
#include <vector>

#include "kvc/core/dtype.hpp"
#include "kvc/core/error.hpp"
#include "kvc/ops/attention.hpp"

namespace kvc::ops {

void decode_attention_with_scores(Cpu, HostView<const float, 2> q, HostView<const float, 3> k,
                                  HostView<const float, 3> v, HostView<float, 2> out,
                                  HostView<float, 2> scores, const ScoreOptions& score_options,
                                  const AttentionOptions& options) {
  const std::int64_t hq = q.size(0), hkv = k.size(0), n = k.size(1);
  KVC_CHECK(scores.size(0) == hkv && scores.size(1) == n,
            "decode_attention_with_scores: scores has shape [", scores.size(0), ", ",
            scores.size(1), "]; expected [Hkv, n] = [", hkv, ", ", n, "]");
  std::vector<float> probabilities(static_cast<std::size_t>(hq * n));
  // Validates everything else (GQA ratio, shapes, finiteness) and fills [Hq, n].
  decode_attention(Cpu{}, q, k, v, out, make_view(probabilities.data(), {hq, n}), options);
  const std::int64_t group = hq / hkv;
  for (std::int64_t h = 0; h < hkv; ++h)
    for (std::int64_t j = 0; j < n; ++j) {
      double sum = 0;
      for (std::int64_t r = h * group; r < (h + 1) * group; ++r) {
        const float p = probabilities[r * n + j];
        sum += score_options.round_f16 ? static_cast<float>(f16(p)) : p;
      }
      if (score_options.update == ScoreUpdate::accumulate) sum += scores(h, j);
      scores(h, j) = static_cast<float>(sum);
    }
}

}  // namespace kvc::ops
