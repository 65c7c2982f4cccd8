// kvc/ops/scores.hpp: observation-window attention scores (ALGORITHMS.md P1) and 1-D pooling (P2).
//
//   kvc::ops::window_scores(kvc::Cpu{}, q_window, keys, scores);     // scores [Hq, T - W]
//   kvc::ops::pool1d(kvc::Cpu{}, scores, pooled, 7, kvc::ops::Pool::max);
//
// Window row i (absolute token T - W + i) sees keys j <= T - W + i. Probabilities are computed in
// fp32 and, like the released code, rounded to the model dtype before they are reduced.
#pragma once

#include "kvc/core/backend.hpp"
#include "kvc/core/view.hpp"

namespace kvc::ops {

enum class ScoreReduction { sum, mean };             // over the W window rows
enum class ProbabilityRounding { none, f16, bf16 };  // cast applied before the reduction

struct WindowScoreOptions {
  ScoreReduction reduction = ScoreReduction::sum;
  ProbabilityRounding rounding = ProbabilityRounding::f16;
  float scale = 0.0f;  // 0 selects 1/sqrt(D)
};

// Scores of the T - W prefix columns for each query head.
void window_scores(Cpu, HostView<const float, 3> q_window,  // [Hq, W, D], the last W queries
                   HostView<const float, 3> k,              // [Hkv, T, D]
                   HostView<float, 2> scores,               // [Hq, T - W]
                   const WindowScoreOptions& options = {});

enum class Pool { avg, max };

// Stride 1, padding kernel/2, odd kernel only. avg divides by `kernel` everywhere (PyTorch
// count_include_pad=True); max treats the padding as -inf. kernel == 1 copies.
void pool1d(Cpu, HostView<const float, 2> in,  // [rows, n]
            HostView<float, 2> out,            // [rows, n]
            int kernel, Pool pool);

}  // namespace kvc::ops
