// kvc/policies/keyproj/shadowkv.hpp: ShadowKV (ALGORITHMS.md section 18): pre-RoPE keys of the
// prompt kept as a rank-r SVD shared by the layer's KV heads, chunk landmarks, outlier chunks and a
// local window kept exact, values offloaded to a host tier; each decode step attends over
// [local | outliers | the budget best chunks by landmark score | generated].
//
//   struct Config : kvc::DefaultConfig { using KeyProjection = kvc::ShadowKv; };
//   kvc::KVCache<Config, kvc::Cpu> cache{shape, kvc::ShadowKv{.budget = 2048, .rank = 160}};
//   cache.prefill(l, k, v, q); cache.prefill_prerope(l, k_prerope); cache.compress(l);
//   // kvc eval --policy 'shadowkv(budget=64,rank=32,outliers=4,threshold=0)+kivi(bits=2)'
//
// Parameters and defaults (the released accuracy class): budget = 2048 tokens selected per KV head
// and step (a multiple of chunk), rank r = 160, chunk cs = 8, local_chunks = 4, outliers = 48
// chunks, threshold = 4096 (acts when the prompt has more tokens; shorter prompts stay exact, as
// the released code routes them to its plain decode path), layout = accuracy | efficient (the CPU
// variant: the chunk count rounded down to a multiple of 8), reference_compat = false (true:
// landmark logits scaled by 1/sqrt(128) as released, instead of 1/sqrt(D)).
// When it acts: at prefill compression (SVD, landmarks, outliers) and at every decode step
// (selection with the step's query). Needs every prompt token of every KV head (eviction `full`,
// no merge) and the pre-RoPE keys (KVCache::prefill_prerope; `k_prerope` in a KV dump).
// Prefill, per layer: Kpre [T, Hkv*D] = U S V^T in double; U[:, :r] kept for the context tokens
// [0, chunks*cs), diag(S[:r]) V^T[:r] kept per head [Hkv, r, D], both f16 (the release: bf16).
// chunks = T / cs - local_chunks (efficient: minus chunks % 8); the last T - chunks*cs tokens are
// the local window. Per head: landmark of chunk c = mean of its post-RoPE keys; outlier score =
// min over its tokens of cos(landmark, key) (eps 1e-8 as torch); the `outliers` chunks with the
// smallest scores (ties: lower chunk) keep exact keys and values; the others are landmarks.
// Decode, per head: per query head softmax over landmarks of q.lm * scale (fp32), max over the
// GQA group, top budget / cs chunks (ties: lower chunk); their keys are U[t] SV[h] rotated with
// their absolute positions. Generated tokens are appended exact and never evicted.
// Values: the Quant store holds all values (host tier, bytes().host; with kivi they are
// quantized); local, outlier and generated values also stay exact on the device (f16 copies the
// attention reads), as the released buffer [local | outliers | sparse | generated] does.
// State per layer: U, SV, per head landmarks + chunk ids, outlier chunk ids, exact keys and values,
// positions. bytes() (device): U + SV + landmarks + exact keys and values + the sparse buffers
// (selected chunks * cs rows of K and V, f16); index: landmark and outlier chunk ids (int32);
// host: the Quant store's values. Deterministic (the selection's ties go to the lower chunk).
// Not reproduced: the hit/miss reuse of last step's chunks (a transfer optimisation; it does not
// change the result) and the CPU variant's initial fill from the last prompt query.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <span>
#include <string_view>
#include <vector>

#include "kvc/core/dtype.hpp"
#include "kvc/ops/lowrank.hpp"
#include "kvc/ops/rope.hpp"
#include "kvc/ops/select.hpp"
#include "kvc/policies/concepts.hpp"
#include "kvc/policies/quant/dense.hpp"

namespace kvc {

enum class ShadowKvLayout { accuracy, efficient };

// The token layout of a prompt of T tokens (ALGORITHMS.md section 18(e)).
struct ShadowKvPlan {
  int chunks = 0;     // context chunks of cs tokens: [0, chunks * cs)
  int local = 0;      // exact local tokens: the last T - chunks * cs
  int landmarks = 0;  // chunks - outliers
  int selected = 0;   // chunks picked per step: min(budget / cs, landmarks)
};

struct ShadowKv {
  static constexpr std::string_view kName = "shadowkv";
  static constexpr PolicyKind kKind = PolicyKind::key_projection;

  int budget = 2048;
  int rank = 160;
  int chunk = 8;
  int local_chunks = 4;
  int outliers = 48;
  int threshold = 4096;
  ShadowKvLayout layout = ShadowKvLayout::accuracy;
  bool reference_compat = false;

  void validate() const {
    KVC_CHECK(chunk >= 1, "shadowkv: chunk = ", chunk, " must be >= 1");
    KVC_CHECK(budget >= chunk && budget % chunk == 0, "shadowkv: budget = ", budget,
              " must be a positive multiple of chunk = ", chunk);
    KVC_CHECK(rank >= 1, "shadowkv: rank = ", rank, " must be >= 1");
    KVC_CHECK(local_chunks >= 0, "shadowkv: local_chunks = ", local_chunks, " must be >= 0");
    KVC_CHECK(outliers >= 0, "shadowkv: outliers = ", outliers, " must be >= 0");
    KVC_CHECK(threshold >= 0, "shadowkv: threshold = ", threshold, " must be >= 0");
  }

  ShadowKvPlan plan(std::int64_t tokens) const {
    ShadowKvPlan p;
    p.chunks = static_cast<int>(tokens / chunk) - local_chunks;
    if (layout == ShadowKvLayout::efficient) p.chunks -= p.chunks % 8;
    KVC_CHECK(p.chunks > outliers, "shadowkv: a prompt of ", tokens, " tokens gives ", p.chunks,
              " context chunks of ", chunk, " (after ", local_chunks,
              " local chunks); needs more than outliers = ", outliers);
    p.local = static_cast<int>(tokens - static_cast<std::int64_t>(p.chunks) * chunk);
    p.landmarks = p.chunks - outliers;
    p.selected = std::min(budget / chunk, p.landmarks);
    return p;
  }

  struct Head {
    std::vector<std::int32_t> positions;       // [n] absolute, store order
    std::vector<std::int32_t> exact_row;       // [n] row of exact_keys/values, -1: low rank
    HalfRows exact_keys;                       // [local + outliers*cs + generated, D]
    HalfRows exact_values;                     // [local + outliers*cs + generated, D]
    std::vector<f16> landmarks;                // [landmarks, D]
    std::vector<std::int32_t> landmark_chunk;  // [landmarks] ascending chunk ids
    std::vector<std::int32_t> outlier_chunk;   // [outliers] ascending chunk ids
  };
  struct LayerState {
    bool sparse = false;  // the prompt exceeded the threshold
    int head_dim = 0;
    int rank = 0;
    ShadowKvPlan plan;
    ops::Rope rope;
    std::vector<f16> u;   // [chunks * cs, r]
    std::vector<f16> sv;  // [Hkv, r, D]
    std::vector<Head> heads;
    // The prompt's values [Hkv, T, D] during compress(): load_head copies the rows the device
    // keeps exact; cleared after the last head (the cache frees its staged data).
    HostView<const float, 3> prompt_values;
  };

  bool active() const { return true; }
  bool needs_prerope() const { return true; }
  bool needs_all_tokens() const { return true; }
  bool owns_keys() const { return true; }
  bool offloads_values(const LayerState& st) const { return st.sparse; }
  bool supports_decode_eviction() const { return false; }

  void prefill(LayerState& st, const KeyProjectionInput& in) const {
    const auto& keys = in.prompt->keys;  // [Hkv, T, D]
    const int kv_heads = static_cast<int>(keys.size(0));
    const std::int64_t tokens = keys.size(1);
    const int d = static_cast<int>(keys.size(2));
    const Selection& sel = *in.selection;
    bool all = static_cast<int>(sel.keep.size()) == kv_heads;
    for (int s = 0; all && s < kv_heads; ++s) {
      all = sel.source_head[s] == s && static_cast<std::int64_t>(sel.keep[s].size()) == tokens;
      for (std::int64_t t = 0; all && t < tokens; ++t) all = sel.keep[s][t] == t;
    }
    KVC_CHECK(all,
              "shadowkv: needs every prompt token of every KV head in position order (it "
              "decomposes the whole prompt [T, Hkv*D]); an eviction or merge stage kept fewer");
    st = LayerState{};
    st.head_dim = d;
    st.rope = ops::Rope{in.rope_theta, in.rope_interleaved ? ops::RopeConvention::interleaved
                                                           : ops::RopeConvention::rotate_half};
    st.heads.assign(kv_heads, Head{});
    st.prompt_values = in.prompt->values;
    st.sparse = tokens > threshold;
    if (!st.sparse) return;
    KVC_CHECK(in.keys_prerope.size(1) == tokens,
              "shadowkv: needs the pre-RoPE keys of the prompt (k_prerope in the KV dump, "
              "KVCache::prefill_prerope() in code) to decompose them; none were given");
    st.plan = plan(tokens);
    const std::int64_t width = static_cast<std::int64_t>(kv_heads) * d;
    KVC_CHECK(rank <= std::min<std::int64_t>(tokens, width), "shadowkv: rank = ", rank,
              " exceeds min(T, Hkv*D) = ", std::min<std::int64_t>(tokens, width));
    st.rank = rank;
    std::vector<float> x(static_cast<std::size_t>(tokens * width));  // [T, Hkv*D]
    for (std::int64_t t = 0; t < tokens; ++t)
      for (int h = 0; h < kv_heads; ++h)
        for (int c = 0; c < d; ++c) x[t * width + h * d + c] = in.keys_prerope(h, t, c);
    std::vector<float> u(static_cast<std::size_t>(tokens * rank)),
        sv(static_cast<std::size_t>(rank * width));
    ops::truncated_svd(Cpu{}, make_view(static_cast<const float*>(x.data()), {tokens, width}),
                       make_view(u.data(), {tokens, static_cast<std::int64_t>(rank)}),
                       make_view(sv.data(), {static_cast<std::int64_t>(rank), width}));
    const std::int64_t context = static_cast<std::int64_t>(st.plan.chunks) * chunk;
    st.u.resize(static_cast<std::size_t>(context * rank));
    for (std::size_t i = 0; i < st.u.size(); ++i) st.u[i] = f16(u[i]);
    st.sv.resize(static_cast<std::size_t>(rank * width));
    for (int h = 0; h < kv_heads; ++h)
      for (int k = 0; k < rank; ++k)
        for (int c = 0; c < d; ++c)
          st.sv[(static_cast<std::size_t>(h) * rank + k) * d + c] = f16(sv[k * width + h * d + c]);
  }

  void load_head(LayerState& st, int s, HostView<const float, 2> keys,
                 std::span<const std::int32_t> positions) const {
    Head& head = st.heads.at(s);
    const std::int64_t n = keys.size(0);
    const int d = st.head_dim;
    head.positions.assign(positions.begin(), positions.end());
    head.exact_keys.reset(d);
    head.exact_values.reset(d);
    head.exact_row.assign(n, -1);
    const auto values = st.prompt_values.sub(s);  // [T, D]
    auto keep_exact = [&](std::int64_t t) {
      head.exact_row[t] = head.exact_keys.rows();
      head.exact_keys.push(&keys(t, 0));
      head.exact_values.push(&values(t, 0));
    };
    if (!st.sparse) {
      for (std::int64_t t = 0; t < n; ++t) keep_exact(t);
      if (s + 1 == static_cast<int>(st.heads.size())) st.prompt_values = {};
      return;
    }
    const int chunks = st.plan.chunks;
    std::vector<float> lm(static_cast<std::size_t>(chunks) * d);  // [chunks, D]
    std::vector<double> outlier_score(chunks);
    for (int c = 0; c < chunks; ++c) {
      for (int j = 0; j < d; ++j) {
        double sum = 0;
        for (int i = 0; i < chunk; ++i) sum += keys(c * chunk + i, j);
        lm[c * d + j] = static_cast<float>(sum / chunk);
      }
      double lm_norm = 0;
      for (int j = 0; j < d; ++j) lm_norm += double(lm[c * d + j]) * lm[c * d + j];
      double lowest = 0;
      for (int i = 0; i < chunk; ++i) {
        double dot = 0, k_norm = 0;
        for (int j = 0; j < d; ++j) {
          dot += double(lm[c * d + j]) * keys(c * chunk + i, j);
          k_norm += double(keys(c * chunk + i, j)) * keys(c * chunk + i, j);
        }
        const double cosine = dot / std::max(std::sqrt(lm_norm) * std::sqrt(k_norm), 1e-8);
        lowest = i == 0 ? cosine : std::min(lowest, cosine);
      }
      outlier_score[c] = lowest;
    }
    std::vector<std::int32_t> order(chunks);
    for (int c = 0; c < chunks; ++c) order[c] = c;
    std::stable_sort(order.begin(), order.end(), [&](std::int32_t a, std::int32_t b) {
      return outlier_score[a] < outlier_score[b];
    });
    std::vector<char> is_outlier(chunks, 0);
    for (int i = 0; i < outliers; ++i) is_outlier[order[i]] = 1;
    for (int c = 0; c < chunks; ++c) {
      if (is_outlier[c]) {
        head.outlier_chunk.push_back(c);
        for (int i = 0; i < chunk; ++i) keep_exact(static_cast<std::int64_t>(c) * chunk + i);
      } else {
        head.landmark_chunk.push_back(c);
        for (int j = 0; j < d; ++j) head.landmarks.push_back(f16(lm[c * d + j]));
      }
    }
    for (std::int64_t t = static_cast<std::int64_t>(chunks) * chunk; t < n; ++t) keep_exact(t);
    if (s + 1 == static_cast<int>(st.heads.size())) st.prompt_values = {};  // staged data goes away
  }

  void append(LayerState& st, int s, const float* key, const float* value,
              std::int32_t position) const {
    Head& head = st.heads.at(s);
    head.exact_row.push_back(head.exact_keys.rows());
    head.exact_keys.push(key);
    head.exact_values.push(value);
    head.positions.push_back(position);
  }

  // Per-chunk scores of one KV head: softmax over landmarks per query head, max over the group.
  std::vector<float> chunk_scores(const LayerState& st, int s,
                                  HostView<const float, 2> queries) const {  // [g', D]
    const Head& head = st.heads.at(s);
    const int d = st.head_dim;
    const auto count = static_cast<int>(head.landmark_chunk.size());
    const float scale =
        reference_compat ? 1.0f / std::sqrt(128.0f) : 1.0f / std::sqrt(static_cast<float>(d));
    std::vector<float> best(count, 0.0f), logits(count);
    for (std::int64_t h = 0; h < queries.size(0); ++h) {
      float top = -INFINITY;
      for (int j = 0; j < count; ++j) {
        float dot = 0;
        for (int c = 0; c < d; ++c)
          dot += queries(h, c) *
                 static_cast<float>(head.landmarks[static_cast<std::size_t>(j) * d + c]);
        logits[j] = dot * scale;
        top = std::max(top, logits[j]);
      }
      float sum = 0;
      for (int j = 0; j < count; ++j) sum += (logits[j] = std::exp(logits[j] - top));
      for (int j = 0; j < count; ++j)
        best[j] = h == 0 ? logits[j] / sum : std::max(best[j], logits[j] / sum);
    }
    return best;
  }

  KeyRows select(const LayerState& st, int s, HostView<const float, 2> queries,
                 HostView<const float, 2>) const {
    if (!st.sparse) return std::nullopt;
    const Head& head = st.heads.at(s);
    const std::vector<float> scores = chunk_scores(st, s, queries);
    const std::vector<std::int32_t> picked = ops::top_k(Cpu{}, scores, st.plan.selected);
    std::vector<char> read(head.positions.size(), 0);
    for (std::size_t r = 0; r < read.size(); ++r) read[r] = head.exact_row[r] >= 0;
    for (const std::int32_t j : picked)
      for (int i = 0; i < chunk; ++i)
        read[static_cast<std::size_t>(head.landmark_chunk[j]) * chunk + i] = 1;
    std::vector<std::int32_t> rows;
    for (std::size_t r = 0; r < read.size(); ++r)
      if (read[r]) rows.push_back(static_cast<std::int32_t>(r));
    return KeyRows{std::vector<std::vector<std::int32_t>>{std::move(rows)}};
  }

  // Keys of `rows` [k, D]: exact rows as stored (f16), the others U[t] SV[h] rotated with their
  // absolute position.
  void keys(const LayerState& st, int s, std::span<const std::int32_t> rows,
            HostView<float, 2> out) const {
    const Head& head = st.heads.at(s);
    const int d = st.head_dim;
    for (std::size_t i = 0; i < rows.size(); ++i) {
      const std::int32_t r = rows[i];
      if (head.exact_row[r] >= 0) {
        for (int c = 0; c < d; ++c) out(i, c) = head.exact_keys.at(head.exact_row[r], c);
        continue;
      }
      for (int c = 0; c < d; ++c) {
        float sum = 0;
        for (int k = 0; k < st.rank; ++k)
          sum += static_cast<float>(st.u[static_cast<std::size_t>(r) * st.rank + k]) *
                 static_cast<float>(st.sv[(static_cast<std::size_t>(s) * st.rank + k) * d + c]);
        out(i, c) = sum;
      }
      ops::rope_rotate(Cpu{}, st.rope, out.slice(0, i, i + 1),
                       std::span<const std::int32_t>(&head.positions[r], 1));
    }
  }

  // The device's exact values replace the host tier's on the rows it keeps (local, outliers,
  // generated); the other rows are the Quant store's (fetched from the host tier).
  void patch_values(const LayerState& st, int s, std::span<const std::int32_t> rows,
                    HostView<float, 2> values) const {
    const Head& head = st.heads.at(s);
    for (std::size_t i = 0; i < rows.size(); ++i)
      if (head.exact_row[rows[i]] >= 0)
        for (int c = 0; c < st.head_dim; ++c)
          values(i, c) = head.exact_values.at(head.exact_row[rows[i]], c);
  }

  void gather(LayerState&, int, std::span<const std::int32_t>) const {
    KVC_FAIL(
        "shadowkv: tokens cannot be evicted during decode (the low-rank keys and chunk "
        "layout span the whole prompt)");
  }

  StorageBytes bytes(const LayerState& st) const {
    StorageBytes b;
    const auto half = static_cast<std::int64_t>(sizeof(f16));
    b.payload = static_cast<std::int64_t>(st.u.size() + st.sv.size()) * half;
    for (const Head& head : st.heads) {
      b.payload += head.exact_keys.bytes() + head.exact_values.bytes() +
                   static_cast<std::int64_t>(head.landmarks.size()) * half;
      if (st.sparse)  // the sparse region's K and V buffers
        b.payload += 2LL * st.plan.selected * chunk * st.head_dim * half;
      b.index += static_cast<std::int64_t>(head.landmark_chunk.size() + head.outlier_chunk.size()) *
                 static_cast<std::int64_t>(sizeof(std::int32_t));
    }
    return b;
  }
};
static_assert(KeyProjectionPolicy<ShadowKv>);

}  // namespace kvc
