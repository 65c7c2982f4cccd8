// kvc/ops/attention.hpp: exact softmax attention (decode and causal prefill) with GQA.
//
//   kvc::ops::decode_attention(kvc::Cpu{}, q, k, v, out);   // q [Hq, D], k/v [Hkv, n, D], out [Hq,
//   D] kvc::ops::prefill_attention(kvc::Cpu{}, q, k, v, out);  // q [Hq, Tq, D], k/v [Hkv, Tk, D]
//
// Query head h reads KV head h / (Hq / Hkv); K/V are never expanded to query heads. The scale is
// 1/sqrt(D) unless given. Softmax is computed max-subtracted in fp32 (fp64 accumulation on
// request).
#pragma once

#include <cstdint>

#include "kvc/core/backend.hpp"
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

}  // namespace kvc::ops
