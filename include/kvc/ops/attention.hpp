// kvc/ops/attention.hpp: exact softmax attention (decode and causal prefill) with GQA.
//
//   kvc::ops::decode_attention(kvc::Cpu{}, q, k, v, out);   // q [Hq, D], k/v [Hkv, n, D], out [Hq,
//   D] kvc::ops::prefill_attention(kvc::Cpu{}, q, k, v, out);  // q [Hq, Tq, D], k/v [Hkv, Tk, D]
//
// Query head h reads KV head h / (Hq / Hkv); K/V are never expanded to query heads. The scale is
// 1/sqrt(D) unless given. Softmax is computed max-subtracted in fp32 (fp64 accumulation on
// request).
#pragma once

#include <cstddef>
#include <cstdint>

#include "kvc/core/backend.hpp"
#include "kvc/core/dtype.hpp"
#include "kvc/core/view.hpp"

namespace kvc::ops {

struct AttentionOptions {
  float scale = 0.0f;            // 0 selects 1/sqrt(D)
  bool accumulate_fp64 = false;  // dot products, softmax sums and outputs accumulated in double
};

// One query per head against n cached keys. probabilities, when non-null, receives the softmax
// weights [Hq, n] (what H2O-style policies accumulate).
void decode_attention(Cpu, HostView<const float, 2> q,  // [Hq, D]
                      HostView<const float, 3> k,       // [Hkv, n, D]
                      HostView<const float, 3> v,       // [Hkv, n, D]
                      HostView<float, 2> out,           // [Hq, D]
                      const AttentionOptions& options = {});
void decode_attention(Cpu, HostView<const float, 2> q, HostView<const float, 3> k,
                      HostView<const float, 3> v, HostView<float, 2> out,
                      HostView<float, 2> probabilities,  // [Hq, n]
                      const AttentionOptions& options = {});

// Causal attention of the last Tq tokens of a Tk-token sequence: query i (absolute index
// Tk - Tq + i) sees keys j <= Tk - Tq + i. Tq == Tk is ordinary causal prefill.
void prefill_attention(Cpu, HostView<const float, 3> q,  // [Hq, Tq, D]
                       HostView<const float, 3> k,       // [Hkv, Tk, D]
                       HostView<const float, 3> v,       // [Hkv, Tk, D]
                       HostView<float, 3> out,           // [Hq, Tq, D]
                       const AttentionOptions& options = {});

// ---- CUDA backend (kvc::cuda) ------------------------------------------------------------------
// Batched decode attention on the GPU over dense bf16 or f16 K/V: B sequences, each of its own
// length (lengths[b] tokens of the Tmax rows are used; a sequence of length 0 yields zeros). Query
// heads of a GQA group share every K/V load; long sequences are split along the tokens
// (flash-decoding) and merged with a max-subtracted log-sum-exp. fp32 accumulation; the output is
// rounded to the input dtype. The last dimension must be contiguous and rows 16-byte aligned; K and
// V are read by the tensor memory accelerator, so their other strides must be positive (a
// dimension of size 1 may have any stride), q's and out's are free. `workspace` holds the split
// partials: at least decode_attention_workspace_floats(...) floats for the current device, owned
// by the caller (no hidden allocation). head_dim: 64 or 128; Hq / Hkv: 1, 2, 4 or 8. A length
// outside [0, Tmax] cannot be checked on the host (lengths live on the device): that sequence's
// output is NaN.
std::size_t decode_attention_workspace_floats(int batch, int q_heads, int kv_heads, int head_dim,
                                              int max_length);
void decode_attention(Cuda, DeviceView<const bf16, 3> q,          // [B, Hq, D]
                      DeviceView<const bf16, 4> k,                // [B, Hkv, Tmax, D]
                      DeviceView<const bf16, 4> v,                // [B, Hkv, Tmax, D]
                      DeviceView<const std::int32_t, 1> lengths,  // [B] on the device
                      DeviceView<bf16, 3> out,                    // [B, Hq, D]
                      DeviceView<float, 1> workspace, const AttentionOptions& options = {});
void decode_attention(Cuda, DeviceView<const f16, 3> q, DeviceView<const f16, 4> k,
                      DeviceView<const f16, 4> v, DeviceView<const std::int32_t, 1> lengths,
                      DeviceView<f16, 3> out, DeviceView<float, 1> workspace,
                      const AttentionOptions& options = {});

// ---- Decode attention that also returns importance (H2O / TOVA scores) -------------------------
//   kvc::ops::decode_attention_with_scores(kvc::Cpu{}, q, k, v, out, scores, kvc::ops::kH2oScores);
//
// The attention above, plus the per-key attention probabilities p[qh, j] of this decode query,
// reduced over each GQA group into a caller score buffer (fp32), in the same pass over K:
//   r[h, j] = sum over the group's query heads qh of p[qh, j]   (h = qh / (Hq / Hkv))
//   accumulate: scores[h, j] += r[h, j]   H2O's accumulated attention (kH2oScores)
//   overwrite:  scores[h, j]  = r[h, j]   TOVA's current-step scores (kTovaScores; the group sum
//                                         ranks exactly like TOVA's group mean, r / g)
// With round_f16 every p is rounded to f16 (nearest even) before the group sum, as H2O's released
// code casts its fp32 softmax to fp16 (kvc::H2o does the same); TOVA sums the fp32 values.
// The CPU reference sums in double and rounds to fp32 once per update; the GPU sums the g values
// and the update in fp32.
enum class ScoreUpdate { accumulate, overwrite };
struct ScoreOptions {
  ScoreUpdate update = ScoreUpdate::accumulate;
  bool round_f16 = true;
};
inline constexpr ScoreOptions kH2oScores{ScoreUpdate::accumulate, /*round_f16=*/true};
inline constexpr ScoreOptions kTovaScores{ScoreUpdate::overwrite, /*round_f16=*/false};

void decode_attention_with_scores(Cpu, HostView<const float, 2> q,  // [Hq, D]
                                  HostView<const float, 3> k,       // [Hkv, n, D]
                                  HostView<const float, 3> v,       // [Hkv, n, D]
                                  HostView<float, 2> out,           // [Hq, D]
                                  HostView<float, 2> scores,        // [Hkv, n]
                                  const ScoreOptions& score_options = {},
                                  const AttentionOptions& options = {});

// CUDA: shapes, strides, dtypes and lengths as decode_attention(Cuda, ...); scores [B, Hkv, Tmax]
// fp32 with free strides. Only the first lengths[b] entries of a row are touched (a sequence of
// length 0 leaves its row as it is); an invalid length fills its whole row with NaN. The workspace
// (decode_attention_with_scores_workspace_floats, 16-byte aligned) holds the split partials and
// each key's scores for the group's heads: each split writes its keys' raw scores s = q.k * scale,
// and once the final max M and normaliser L of every head are known (after the flash-decoding
// merge, or at the end of the only split), p = exp(s - M) / L is formed, rounded, reduced over the
// group and written, without reading K again.
std::size_t decode_attention_with_scores_workspace_floats(int batch, int q_heads, int kv_heads,
                                                          int head_dim, int max_length);
void decode_attention_with_scores(Cuda, DeviceView<const bf16, 3> q,          // [B, Hq, D]
                                  DeviceView<const bf16, 4> k,                // [B, Hkv, Tmax, D]
                                  DeviceView<const bf16, 4> v,                // [B, Hkv, Tmax, D]
                                  DeviceView<const std::int32_t, 1> lengths,  // [B] on the device
                                  DeviceView<bf16, 3> out,                    // [B, Hq, D]
                                  DeviceView<float, 3> scores,                // [B, Hkv, Tmax]
                                  DeviceView<float, 1> workspace,
                                  const ScoreOptions& score_options = {},
                                  const AttentionOptions& options = {});
void decode_attention_with_scores(Cuda, DeviceView<const f16, 3> q, DeviceView<const f16, 4> k,
                                  DeviceView<const f16, 4> v,
                                  DeviceView<const std::int32_t, 1> lengths, DeviceView<f16, 3> out,
                                  DeviceView<float, 3> scores, DeviceView<float, 1> workspace,
                                  const ScoreOptions& score_options = {},
                                  const AttentionOptions& options = {});

}  // namespace kvc::ops
