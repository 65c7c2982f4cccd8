// KVCache<Config, kvc::Cuda> (kvc/cache/kv_cache_cuda.hpp) against KVCache<Config, kvc::Cpu> on
// the real dump, through the kvc eval protocol (prefill a prefix, compress, then per decode token
// append + attend + observe + step): stored positions and (dequantized) rows identical after every
// step (full, StreamingLLM, SnapKV, H2O; f16 rows, KIVI, INT8/INT4, FP8: the dump is f16, so the
// GPU quantizes exactly the CPU's values and codes and parameters must be bit-identical; a SnapKV
// token may change sides only on a near-tie of the pooled scores, derived below), attention
// outputs within a derived tolerance, bytes() equal.
#include <algorithm>
#include <catch2/catch.hpp>
#include <cmath>
#include <cstdint>
#include <set>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include "cuda/support.hpp"
#include "kvc/cache/kv_cache.hpp"
#include "kvc/cache/kv_cache_cuda.hpp"
#include "kvc/core/error.hpp"
#include "kvc/eval/dump.hpp"
#include "kvc/ops/attention.hpp"
#include "kvc/policies/eviction/h2o.hpp"
#include "kvc/policies/eviction/snapkv.hpp"
#include "kvc/policies/eviction/streaming_llm.hpp"
#include "kvc/policies/quant/fp8.hpp"
#include "kvc/policies/quant/int_per_token.hpp"
#include "kvc/policies/quant/kivi.hpp"

namespace {

using kvc::test::dump_path;

struct FullConfig : kvc::DefaultConfig {};
struct StreamingConfig : kvc::DefaultConfig {
  using Eviction = kvc::StreamingLlm;
};
struct SnapConfig : kvc::DefaultConfig {
  using Eviction = kvc::SnapKv;
};
template <class E, class Q>
struct Composed : kvc::DefaultConfig {
  using Eviction = E;
  using Quant = Q;
};

// Token t of a [H, T, D] view as contiguous [H, D] rows.
std::vector<float> token_rows(kvc::HostView<const float, 3> x, std::int64_t t) {
  std::vector<float> rows;
  for (std::int64_t h = 0; h < x.size(0); ++h)
    for (std::int64_t c = 0; c < x.size(2); ++c) rows.push_back(x(h, t, c));
  return rows;
}

// The first difference between two caches' contents ("" when they are the same), for the
// failure message.
std::string first_difference(const std::vector<kvc::HeadContents>& a,
                             const std::vector<kvc::HeadContents>& b) {
  if (a.size() != b.size()) return "storage head counts differ";
  for (std::size_t s = 0; s < a.size(); ++s) {
    if (a[s].source_head != b[s].source_head) return "head " + std::to_string(s) + ": source head";
    if (a[s].positions != b[s].positions) return "head " + std::to_string(s) + ": positions";
    for (const auto& [name, x, y] : {std::tuple{"key", &a[s].keys, &b[s].keys},
                                     std::tuple{"value", &a[s].values, &b[s].values}}) {
      if (x->size() != y->size()) return "head " + std::to_string(s) + ": " + name + " sizes";
      for (std::size_t i = 0; i < x->size(); ++i)
        if ((*x)[i] != (*y)[i])
          return "head " + std::to_string(s) + " " + name + " element " + std::to_string(i) +
                 " (row " + std::to_string(i / 64) + "): cpu " + std::to_string((*x)[i]) + " gpu " +
                 std::to_string((*y)[i]) + " of " + std::to_string(x->size());
    }
  }
  return "";
}

bool same_contents(const std::vector<kvc::HeadContents>& a,
                   const std::vector<kvc::HeadContents>& b) {
  return first_difference(a, b).empty();
}

void require_equal_bytes(const kvc::StorageBytes& cpu, const kvc::StorageBytes& gpu) {
  REQUIRE(gpu.payload == cpu.payload);
  REQUIRE(gpu.params == cpu.params);
  REQUIRE(gpu.index == cpu.index);
  REQUIRE(gpu.host == cpu.host);
}

// Every stored row of the GPU cache is the dump's row at its position, rounded to f16 (what the
// CPU cache stores too): checks the compaction when the kept sets legitimately differ.
void require_rows_from_dump(const std::vector<kvc::HeadContents>& heads,
                            kvc::HostView<const float, 3> k, kvc::HostView<const float, 3> v) {
  for (const auto& head : heads) {
    const std::int64_t d = k.size(2);
    for (std::size_t i = 0; i < head.positions.size(); ++i) {
      const std::int32_t p = head.positions[i];
      REQUIRE((p >= 0 && p < k.size(1)));
      for (std::int64_t c = 0; c < d; ++c) {
        REQUIRE(head.keys[i * d + c] == static_cast<float>(kvc::f16(k(head.source_head, p, c))));
        REQUIRE(head.values[i * d + c] == static_cast<float>(kvc::f16(v(head.source_head, p, c))));
      }
    }
  }
}

// The SnapKV tokens kept by one cache and not the other must be near-ties of the CPU's pooled
// scores. Bound, derived: the GPU computes each window probability in fp32 like the CPU but in
// another order (a few fp32 ulps apart), so the f16 rounding of a probability can land one f16
// ulp (<= 2^-10 relative) apart; summing, averaging over the group and pooling (all with
// non-negative weights) keeps that relative bound on a pooled score. A token and the k-th score
// can each move by it: |score - threshold| <= 2^-10 * (score + threshold) (+ 1e-7 absolute for
// fp32 sums of tiny values).
int check_snapkv_differences(const kvc::SnapKv& snap, const std::vector<kvc::HeadContents>& cpu,
                             const std::vector<kvc::HeadContents>& gpu,
                             kvc::HostView<const float, 3> k, kvc::HostView<const float, 3> v,
                             kvc::HostView<const float, 3> q) {
  std::vector<std::int32_t> positions(static_cast<std::size_t>(k.size(1)));
  for (std::size_t i = 0; i < positions.size(); ++i) positions[i] = static_cast<std::int32_t>(i);
  kvc::PrefillInput in;
  in.keys = k;
  in.values = v;
  in.queries = q;
  in.positions = positions;
  const std::vector<float> pooled = kvc::snapkv_pooled_scores(
      in, snap.window, snap.kernel, snap.pool, snap.gqa, "snapkv");  // [S, T - W]
  const std::int64_t prefix = k.size(1) - snap.window;
  const int selected = snap.budget - snap.window;
  REQUIRE(cpu.size() == gpu.size());
  int differing = 0;
  for (std::size_t s = 0; s < cpu.size(); ++s) {
    const float* row = pooled.data() + s * prefix;
    std::vector<float> sorted(row, row + prefix);
    std::sort(sorted.begin(), sorted.end(), std::greater<>());
    const double threshold = sorted[selected - 1];
    const std::set<std::int32_t> a(cpu[s].positions.begin(), cpu[s].positions.end());
    const std::set<std::int32_t> b(gpu[s].positions.begin(), gpu[s].positions.end());
    REQUIRE(a.size() == b.size());
    for (std::int64_t j = 0; j < k.size(1); ++j) {
      if (a.count(static_cast<std::int32_t>(j)) == b.count(static_cast<std::int32_t>(j))) continue;
      ++differing;
      REQUIRE(j < prefix);  // the window is always kept
      INFO("head " << s << " token " << j << " score " << row[j] << " threshold " << threshold);
      REQUIRE(std::fabs(row[j] - threshold) <=
              std::ldexp(1.0, -10) * (std::fabs(row[j]) + std::fabs(threshold)) + 1e-7);
    }
  }
  return differing;
}

// GPU attend output against `reference` (the CPU fp32 attention over the same f16 rows), every
// element. Tolerance, derived: the GPU rounds its output to f16 (relative u = 2^-11); both sides
// accumulate the n weights in fp32 in different orders and the GPU uses exp2f on log2(e)-scaled
// scores, so the weights differ by at most about (n + 8) * 2^-24 relative; the D-term dot products
// q.k in fp32 differ by at most (D + 2) * 2^-24 * scale * sum_c |q_c k_c| each, which perturbs
// every weight by twice that relative. A relative weight perturbation e moves the output by at
// most e * max|v| (per coordinate).
// Quantized stores (quantized = true): the fused kernels compute q.k as sum_c (q_c s_c) code_c +
// sum_c q_c m_c and p.v as sum_t (p_t s_t) code_t + sum_t p_t m_t, so the rounding errors scale
// with |s code| + |m| instead of |k| (|v|): for min-max codes |s code| <= max - min and |m| =
// |min|, both at most the group's max |x| <= the column's (row's) max over the head, M; so the dot
// bound uses 3 * sum_c |q_c| M_c and the value bound 3 * max|v|. (FP8 and symmetric INT have no
// minimum: the factor 3 covers them too.)
void require_attention_close(const std::vector<float>& gpu, const std::vector<float>& reference,
                             const std::vector<float>& q,
                             const std::vector<kvc::HeadContents>& heads, int q_heads, int head_dim,
                             const std::string& where, bool quantized = false) {
  const int per_store = q_heads / static_cast<int>(heads.size());
  const double scale = 1.0 / std::sqrt(static_cast<double>(head_dim));
  double worst_excess = -INFINITY;
  int worst = -1;
  for (int h = 0; h < q_heads; ++h) {
    const auto& head = heads[h / per_store];
    const std::size_t n = head.positions.size();
    double max_v = 0, max_dot = 0;
    std::vector<double> column_max(head_dim, 0.0);
    for (std::size_t j = 0; j < n; ++j) {
      double dot = 0;
      for (int c = 0; c < head_dim; ++c) {
        dot += std::fabs(static_cast<double>(q[h * head_dim + c]) * head.keys[j * head_dim + c]);
        max_v = std::max(max_v, std::fabs(static_cast<double>(head.values[j * head_dim + c])));
        column_max[c] =
            std::max(column_max[c], std::fabs(static_cast<double>(head.keys[j * head_dim + c])));
      }
      max_dot = std::max(max_dot, dot);
    }
    if (quantized) {
      double bound = 0;
      for (int c = 0; c < head_dim; ++c)
        bound += std::fabs(static_cast<double>(q[h * head_dim + c])) * column_max[c];
      max_dot = 3 * bound;
      max_v *= 3;
    }
    const double dot_error = (head_dim + 2) * std::ldexp(1.0, -24) * scale * max_dot;
    const double weight_error = (static_cast<double>(n) + 8) * std::ldexp(1.0, -24) + 2 * dot_error;
    const double u = std::ldexp(1.0, -11);
    for (int c = 0; c < head_dim; ++c) {
      const double ref = reference[h * head_dim + c], got = gpu[h * head_dim + c];
      const double tolerance = u * std::fabs(ref) + (1 + u) * 2 * weight_error * max_v;
      const double excess = std::isnan(got) ? INFINITY : std::fabs(got - ref) - tolerance;
      if (excess > worst_excess) {
        worst_excess = excess;
        worst = h * head_dim + c;
      }
    }
  }
  INFO(where << ": worst element " << worst << ": gpu " << gpu[worst] << " vs reference "
             << reference[worst] << ", excess over tolerance " << worst_excess);
  REQUIRE(worst_excess <= 0);
}

// The CPU fp32 attention of q [Hq, D] over the given heads' rows.
std::vector<float> cpu_attention(const std::vector<float>& q,
                                 const std::vector<kvc::HeadContents>& heads, int q_heads,
                                 int head_dim) {
  const int per_store = q_heads / static_cast<int>(heads.size());
  std::vector<float> out(static_cast<std::size_t>(q_heads) * head_dim);
  for (std::size_t s = 0; s < heads.size(); ++s) {
    const std::int64_t n = static_cast<std::int64_t>(heads[s].positions.size());
    kvc::ops::decode_attention(
        kvc::Cpu{}, kvc::make_view(q.data() + s * per_store * head_dim, {per_store, head_dim}),
        kvc::make_view(heads[s].keys.data(), {1, n, std::int64_t{head_dim}}),
        kvc::make_view(heads[s].values.data(), {1, n, std::int64_t{head_dim}}),
        kvc::make_view(out.data() + s * per_store * head_dim, {per_store, head_dim}));
  }
  return out;
}

struct ProtocolResult {
  int snapkv_differing_tokens = 0;
  int steps_checked = 0;
};

// The kvc eval protocol on the first `layers` layers of seq0, both caches side by side.
template <class Config, class Policy, class Quant = kvc::NoQuant>
ProtocolResult run_protocol(const Policy& policy, int layers, int prefix, int decode_tokens,
                            const Quant& quant = {}) {
  constexpr bool quantized = !std::is_same_v<Quant, kvc::NoQuant>;
  const kvc::KvDump dump = kvc::load_dump(dump_path());
  REQUIRE(prefix + decode_tokens <= dump.tokens);
  const kvc::CacheShape shape{layers, dump.q_heads, dump.kv_heads, dump.head_dim};
  kvc::KVCache<Config, kvc::Cpu> cpu{shape, policy, quant};
  kvc::KVCache<Config, kvc::Cuda> gpu{shape, policy, quant};
  const int hq = dump.q_heads, d = dump.head_dim;
  ProtocolResult result;
  for (int l = 0; l < layers; ++l) {
    const auto q = dump.q(l), k = dump.k(l), v = dump.v(l);
    const auto kp = k.slice(1, 0, prefix), vp = v.slice(1, 0, prefix), qp = q.slice(1, 0, prefix);
    cpu.prefill(l, kp, vp, qp);
    gpu.prefill(l, kp, vp, qp);
    cpu.compress(l);
    gpu.compress(l);
    auto cpu_heads = cpu.materialize(l);
    auto gpu_heads = gpu.materialize(l);
    REQUIRE(gpu.storage_heads(l) == cpu.storage_heads(l));
    bool identical = same_contents(cpu_heads, gpu_heads);
    if (!identical) {
      // Only SnapKV's GPU selection may differ, and only on near-ties.
      if constexpr (std::is_same_v<Policy, kvc::SnapKv>) {
        require_rows_from_dump(gpu_heads, kp, vp);
        result.snapkv_differing_tokens +=
            check_snapkv_differences(policy, cpu_heads, gpu_heads, kp, vp, qp);
      } else {
        FAIL("layer " << l << ": the CUDA cache stores other rows than the CPU cache");
      }
    }
    require_equal_bytes(cpu.bytes(l), gpu.bytes(l));

    std::vector<float> cpu_out(static_cast<std::size_t>(hq) * d), gpu_out(cpu_out.size());
    for (int t = prefix; t < prefix + decode_tokens; ++t) {
      const std::vector<float> kt = token_rows(k, t), vt = token_rows(v, t), qt = token_rows(q, t);
      const auto k_view = kvc::make_view(kt.data(), {std::int64_t{dump.kv_heads}, std::int64_t{d}});
      const auto v_view = kvc::make_view(vt.data(), {std::int64_t{dump.kv_heads}, std::int64_t{d}});
      const auto q_view = kvc::make_view(qt.data(), {std::int64_t{hq}, std::int64_t{d}});
      cpu.append(l, k_view, v_view);
      gpu.append(l, k_view, v_view);
      cpu.attend(l, q_view, kvc::make_view(cpu_out.data(), {hq, d}));
      std::fill(gpu_out.begin(), gpu_out.end(), NAN);  // poison: what attend leaves shows
      gpu.attend(l, q_view, kvc::make_view(gpu_out.data(), {hq, d}));
      gpu_heads = gpu.materialize(l);
      const std::string where = "layer " + std::to_string(l) + " token " + std::to_string(t);
      if (identical) {
        cpu_heads = cpu.materialize(l);
        INFO(where << ": first difference: " << first_difference(cpu_heads, gpu_heads));
        REQUIRE(same_contents(cpu_heads, gpu_heads));
        require_attention_close(gpu_out, cpu_out, qt, cpu_heads, hq, d, where, quantized);
      } else {
        require_attention_close(gpu_out, cpu_attention(qt, gpu_heads, hq, d), qt, gpu_heads, hq, d,
                                where, quantized);
      }
      cpu.observe(l, q_view);
      gpu.observe(l, q_view);
      cpu.step(l);
      gpu.step(l);
      // After the decode-time eviction (StreamingLLM, H2O) and the flushes (KIVI, INT windows):
      // the same positions on both, and the same (dequantized) contents.
      const auto gpu_after = gpu.materialize(l);
      for (int s = 0; s < gpu.storage_heads(l); ++s) {
        REQUIRE(gpu.tokens(l, s) == cpu.tokens(l, s));
        if (identical) {
          const auto cpu_positions = cpu.positions(l, s);
          INFO(where << " storage head " << s);
          REQUIRE(gpu_after[s].positions ==
                  std::vector<std::int32_t>(cpu_positions.begin(), cpu_positions.end()));
        }
      }
      if (identical) {
        const auto cpu_after = cpu.materialize(l);
        INFO(where << " after step: first difference: " << first_difference(cpu_after, gpu_after));
        REQUIRE(same_contents(cpu_after, gpu_after));
      }
      require_equal_bytes(cpu.bytes(l), gpu.bytes(l));
      ++result.steps_checked;
    }
  }
  require_equal_bytes(cpu.bytes(), gpu.bytes());
  return result;
}

constexpr int kLayers = 3, kPrefix = 448, kDecode = 64;

}  // namespace

TEST_CASE("cuda KVCache full matches the CPU cache on the real dump", "[cuda][kv_cache_cuda]") {
  const auto r = run_protocol<FullConfig>(kvc::NoEviction{}, kLayers, kPrefix, kDecode);
  REQUIRE(r.steps_checked == kLayers * kDecode);
}

TEST_CASE("cuda KVCache streamingllm matches the CPU cache on the real dump",
          "[cuda][kv_cache_cuda]") {
  // 4 + 400 < 448 prompt tokens: prefill evicts, and every decode step evicts one more token.
  const auto r = run_protocol<StreamingConfig>(kvc::StreamingLlm{.sink = 4, .recent = 400}, kLayers,
                                               kPrefix, kDecode);
  REQUIRE(r.steps_checked == kLayers * kDecode);
}

TEST_CASE("cuda KVCache snapkv matches the CPU cache on the real dump", "[cuda][kv_cache_cuda]") {
  SECTION("group mean, max pooling (GPU selection)") {
    const auto r = run_protocol<SnapConfig>(
        kvc::SnapKv{.budget = 256, .window = 32, .kernel = 7, .pool = kvc::ops::Pool::max}, kLayers,
        kPrefix, kDecode);
    WARN("snapkv mean: " << r.snapkv_differing_tokens
                         << " prompt tokens kept differently from the CPU cache (near-ties)");
    REQUIRE(r.steps_checked == kLayers * kDecode);
  }
  SECTION("gqa repeat, avg pooling: one storage head per query head (GPU selection)") {
    const auto r = run_protocol<SnapConfig>(kvc::SnapKv{.budget = 200,
                                                        .window = 16,
                                                        .kernel = 5,
                                                        .pool = kvc::ops::Pool::avg,
                                                        .gqa = kvc::GqaMode::repeat},
                                            kLayers, kPrefix, kDecode);
    WARN("snapkv repeat: " << r.snapkv_differing_tokens
                           << " prompt tokens kept differently from the CPU cache (near-ties)");
    REQUIRE(r.steps_checked == kLayers * kDecode);
  }
  SECTION("budget above the prompt: everything is kept (host rule)") {
    const auto r = run_protocol<SnapConfig>(kvc::SnapKv{.budget = 1000}, kLayers, kPrefix, 8);
    REQUIRE(r.snapkv_differing_tokens == 0);
  }
}

TEST_CASE("cuda KVCache quantized stores match the CPU cache on the real dump",
          "[cuda][kv_cache_cuda][quantized]") {
  using kvc::QuantAxis;
  SECTION("kivi-2, G 32, R 64: key flush after 64 steps, a value flush every step") {
    const auto r = run_protocol<Composed<kvc::NoEviction, kvc::Kivi>>(
        kvc::NoEviction{}, kLayers, kPrefix, kDecode, kvc::Kivi{.group = 32, .residual = 64});
    REQUIRE(r.steps_checked == kLayers * kDecode);
  }
  SECTION("kivi-4, G 64, R 128, over SnapKV (GPU selection)") {
    const auto r = run_protocol<Composed<kvc::SnapKv, kvc::Kivi>>(
        kvc::SnapKv{.budget = 256, .window = 32}, kLayers, kPrefix, kDecode,
        kvc::Kivi{.key_bits = 4, .value_bits = 4, .group = 64, .residual = 128});
    WARN("snapkv+kivi: " << r.snapkv_differing_tokens << " prompt tokens kept differently");
    REQUIRE(r.steps_checked == kLayers * kDecode);
  }
  SECTION("int8 symmetric over StreamingLLM: a token evicted every step") {
    const auto r = run_protocol<Composed<kvc::StreamingLlm, kvc::IntPerToken>>(
        kvc::StreamingLlm{.sink = 4, .recent = 300}, kLayers, kPrefix, kDecode, kvc::IntPerToken{});
    REQUIRE(r.steps_checked == kLayers * kDecode);
  }
  SECTION("int4 asymmetric, group 32, f32 scales, f16 window of 16, over StreamingLLM") {
    const auto r = run_protocol<Composed<kvc::StreamingLlm, kvc::IntPerToken>>(
        kvc::StreamingLlm{.sink = 4, .recent = 300}, kLayers, kPrefix, kDecode,
        kvc::IntPerToken{.bits = 4,
                         .symmetric = false,
                         .group = 32,
                         .scales = kvc::ops::ParamDType::f32,
                         .residual = 16});
    REQUIRE(r.steps_checked == kLayers * kDecode);
  }
  SECTION("fp8 e4m3, scales per head, over SnapKV") {
    const auto r = run_protocol<Composed<kvc::SnapKv, kvc::Fp8>>(
        kvc::SnapKv{.budget = 192, .window = 16}, kLayers, kPrefix, kDecode, kvc::Fp8{});
    WARN("snapkv+fp8: " << r.snapkv_differing_tokens << " prompt tokens kept differently");
    REQUIRE(r.steps_checked == kLayers * kDecode);
  }
  SECTION("fp8 e5m2, one scale per layer (scope tensor), over StreamingLLM") {
    const auto r = run_protocol<Composed<kvc::StreamingLlm, kvc::Fp8>>(
        kvc::StreamingLlm{.sink = 4, .recent = 300}, kLayers, kPrefix, kDecode,
        kvc::Fp8{.kind = kvc::ops::Fp8Kind::e5m2, .scope = kvc::Fp8Scope::tensor});
    REQUIRE(r.steps_checked == kLayers * kDecode);
  }
  SECTION("fp8 e4m3 with static scales, over H2O's prefill variant") {
    const auto r = run_protocol<Composed<kvc::H2o, kvc::Fp8>>(
        kvc::H2o{.variant = kvc::H2oVariant::prefill, .budget = 256, .window = 16}, kLayers,
        kPrefix, kDecode, kvc::Fp8{.key_scale = 0.05, .value_scale = 0.01});
    REQUIRE(r.steps_checked == kLayers * kDecode);
  }
}

TEST_CASE("cuda KVCache h2o matches the CPU cache on the real dump", "[cuda][kv_cache_cuda]") {
  SECTION("decode variant: scores from the attention kernel, one eviction per step") {
    const auto r = run_protocol<Composed<kvc::H2o, kvc::NoQuant>>(
        kvc::H2o{.heavy = 96, .recent = 160}, kLayers, kPrefix, kDecode);
    REQUIRE(r.steps_checked == kLayers * kDecode);
  }
  SECTION("decode variant, observed-attention normalisation") {
    const auto r = run_protocol<Composed<kvc::H2o, kvc::NoQuant>>(
        kvc::H2o{.heavy = 64, .recent = 64, .normalize = kvc::ScoreNormalize::observed}, kLayers,
        kPrefix, kDecode);
    REQUIRE(r.steps_checked == kLayers * kDecode);
  }
}

TEST_CASE("cuda KVCache rejects what it does not support, naming both sides",
          "[cuda][kv_cache_cuda]") {
  const kvc::CacheShape shape{1, 8, 2, 64};
  using Catch::Matchers::Contains;
  REQUIRE_THROWS_WITH((kvc::KVCache<SnapConfig, kvc::Cuda>{
                          shape, kvc::SnapKv{.budget = 64, .window = 8, .reference_compat = true}}),
                      Contains("snapkv") && Contains("cuda"));
  kvc::CacheOptions reindexed;
  reindexed.positions = kvc::PositionMode::reindexed;
  REQUIRE_THROWS_WITH((kvc::KVCache<StreamingConfig, kvc::Cuda>{shape, reindexed}),
                      Contains("streamingllm") && Contains("reindexed"));
  REQUIRE_THROWS_WITH((kvc::KVCache<FullConfig, kvc::Cuda>{kvc::CacheShape{1, 8, 2, 96}}),
                      Contains("head_dim = 96"));
  REQUIRE_THROWS_WITH((kvc::KVCache<FullConfig, kvc::Cuda>{kvc::CacheShape{1, 32, 2, 64}}),
                      Contains("16 query heads per storage head"));
  REQUIRE_THROWS_WITH((kvc::KVCache<Composed<kvc::H2o, kvc::IntPerToken>, kvc::Cuda>{
                          shape, kvc::H2o{.heavy = 8, .recent = 8}, kvc::IntPerToken{}}),
                      Contains("h2o") && Contains("int_per_token") && Contains("cuda"));
  REQUIRE_THROWS_WITH((kvc::KVCache<Composed<kvc::StreamingLlm, kvc::Kivi>, kvc::Cuda>{
                          shape, kvc::StreamingLlm{}, kvc::Kivi{}}),
                      Contains("streamingllm") && Contains("kivi"));
  REQUIRE_THROWS_WITH((kvc::KVCache<Composed<kvc::NoEviction, kvc::Kivi>, kvc::Cuda>{
                          shape, kvc::Kivi{.key_bits = 8, .value_bits = 8}}),
                      Contains("kivi") && Contains("cuda"));
  REQUIRE_THROWS_WITH((kvc::KVCache<Composed<kvc::NoEviction, kvc::IntPerToken>, kvc::Cuda>{
                          shape, kvc::IntPerToken{.group = 8}}),
                      Contains("group=8") && Contains("cuda"));
  // A quantized store refuses a NaN key, naming where it is.
  {
    kvc::KVCache<Composed<kvc::NoEviction, kvc::Fp8>, kvc::Cuda> fp8{shape, kvc::Fp8{}};
    std::vector<float> kv(2 * 4 * 64, 1.0f), q(8 * 4 * 64, 1.0f);
    kv[2 * 64 + 5] = NAN;  // KV head 0, position 2, channel 5
    const auto view = kvc::make_view(static_cast<const float*>(kv.data()), {2, 4, 64});
    REQUIRE_THROWS_WITH(
        fp8.prefill(0, view, view, kvc::make_view(static_cast<const float*>(q.data()), {8, 4, 64})),
        Contains("position 2") && Contains("channel 5"));
  }
  // An attend before anything was stored names the layer's state.
  kvc::KVCache<FullConfig, kvc::Cuda> empty{shape};
  std::vector<float> q(8 * 64, 0.0f), out(8 * 64);
  REQUIRE_THROWS_WITH(empty.attend(0, kvc::make_view(static_cast<const float*>(q.data()), {8, 64}),
                                   kvc::make_view(out.data(), {8, 64})),
                      Contains("holds no compressed tokens"));
}
