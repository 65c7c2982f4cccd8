// KVCache and the first policies (StreamingLLM, SnapKV, KIVI): ALGORITHMS.md section 25 vectors 4,
// 7 and 9, the pipeline lifecycle, byte accounting and composition rules.
#include <algorithm>
#include <catch2/catch.hpp>
#include <cmath>
#include <numeric>
#include <random>
#include <vector>

#include "kvc/cache/kv_cache.hpp"
#include "kvc/eval/registry.hpp"
#include "kvc/ops/attention.hpp"
#include "kvc/ops/quantize.hpp"
#include "kvc/policies/eviction/snapkv.hpp"
#include "kvc/policies/eviction/streaming_llm.hpp"
#include "kvc/policies/quant/kivi.hpp"
#include "test_support.hpp"

namespace {

using kvc_test::positions_of;
using kvc_test::random_f16_values;
using kvc_test::token;
using Tensors = kvc_test::RandomQkv;
using kvc_test::iota_range;

}  // namespace

TEST_CASE("a full cache attends exactly like the naive formula", "[cache]") {
  const Tensors x(8, 2, 40, 16, 7);
  kvc::KVCache<kvc::DefaultConfig, kvc::Cpu> cache{kvc::CacheShape{1, 8, 2, 16}};
  const int prefix = 30;
  cache.prefill(0, x.kv().slice(1, 0, prefix), x.vv().slice(1, 0, prefix),
                x.qv().slice(1, 0, prefix));
  cache.compress(0);
  std::vector<float> out(8 * 16);
  for (int t = prefix; t < x.t; ++t) {
    cache.append(0, token(x.kv(), t), token(x.vv(), t));
    cache.attend(0, token(x.qv(), t), kvc::make_view(out.data(), {8, 16}));
    // Naive double-precision softmax attention of query t over tokens 0..t, query head h reading
    // KV head h / 4.
    double worst = 0;
    for (int h = 0; h < 8; ++h) {
      const int kvh = h / 4;
      std::vector<double> logits(t + 1);
      for (int j = 0; j <= t; ++j) {
        double dot = 0;
        for (int c = 0; c < 16; ++c)
          dot += double(x.q[(h * x.t + t) * 16 + c]) * x.k[(kvh * x.t + j) * 16 + c];
        logits[j] = dot / 4.0;  // 1 / sqrt(16)
      }
      const double m = *std::max_element(logits.begin(), logits.end());
      double z = 0;
      for (auto& l : logits) z += (l = std::exp(l - m));
      for (int c = 0; c < 16; ++c) {
        double o = 0;
        for (int j = 0; j <= t; ++j) o += logits[j] / z * x.v[(kvh * x.t + j) * 16 + c];
        worst = std::max(worst, std::abs(o - out[h * 16 + c]));
      }
    }
    // fp32 accumulation over at most 40 terms of magnitude ~3: a few 1e-6 at most.
    INFO("step " << t << " worst abs error " << worst);
    REQUIRE(worst < 1e-5);
    cache.step(0);
  }
  REQUIRE(cache.tokens(0, 0) == x.t);
  // f16 K and V of 40 tokens, 2 heads, 16 channels; positions apart.
  REQUIRE(cache.bytes().stored() == 2 * 40 * 16 * 2 * 2);
  REQUIRE(cache.bytes().index == 2 * 40 * 4);
}

TEST_CASE("StreamingLLM keeps sinks and the recent window (section 25 vector 7)",
          "[cache][streamingllm]") {
  const kvc::StreamingLlm p{.sink = 4, .recent = 8};
  auto expected = iota_range(0, 4);
  for (int i = 12; i < 20; ++i) expected.push_back(i);
  REQUIRE(p.keep(20) == expected);
  // evict_for_space(m = 3) at n = 12 keeps 0..3 and 7..11.
  auto for_space = iota_range(0, 4);
  for (int i = 7; i < 12; ++i) for_space.push_back(i);
  REQUIRE(p.keep_for_space(12, 3) == for_space);
  REQUIRE(p.keep(12) == iota_range(0, 12));
  REQUIRE_THROWS_WITH(p.keep_for_space(12, 9), Catch::Contains("incoming tokens m = 9"));

  // Through the cache: prefill 10 tokens, then decode to 20 tokens: positions 0..3 and 12..19.
  const Tensors x(4, 2, 20, 8, 11);
  struct Config : kvc::DefaultConfig {
    using Eviction = kvc::StreamingLlm;
  };
  kvc::KVCache<Config, kvc::Cpu> cache{kvc::CacheShape{1, 4, 2, 8}, p};
  cache.prefill(0, x.kv().slice(1, 0, 10), x.vv().slice(1, 0, 10), x.qv().slice(1, 0, 10));
  cache.compress(0);
  std::vector<float> out(4 * 8);
  for (int t = 10; t < 20; ++t) {
    cache.append(0, token(x.kv(), t), token(x.vv(), t));
    cache.attend(0, token(x.qv(), t), kvc::make_view(out.data(), {4, 8}));
    cache.step(0);
    REQUIRE(cache.tokens(0, 0) == std::min(t + 1, 12));
  }
  REQUIRE(positions_of(cache, 0, 0) == expected);
  REQUIRE(positions_of(cache, 0, 1) == expected);
  // The kept keys are the original ones (absolute mode: no re-rotation).
  const auto heads = cache.materialize(0);
  REQUIRE(heads[1].keys[8 * 5 + 3] == x.k[(1 * 20 + 13) * 8 + 3]);
}

TEST_CASE("SnapKV invariants (section 25 vector 4)", "[cache][snapkv]") {
  const int hq = 8, hkv = 2, t = 64, d = 16;
  Tensors x(hq, hkv, t, d, 21);
  struct Config : kvc::DefaultConfig {
    using Eviction = kvc::SnapKv;
  };
  SECTION("output length is exactly C, the window is kept unchanged, positions ascend") {
    const kvc::SnapKv p{.budget = 24, .window = 8, .kernel = 5, .pool = kvc::ops::Pool::avg};
    kvc::KVCache<Config, kvc::Cpu> cache{kvc::CacheShape{1, hq, hkv, d}, p};
    cache.prefill(0, x.kv(), x.vv(), x.qv());
    cache.compress(0);
    REQUIRE(cache.storage_heads(0) == hkv);
    const auto heads = cache.materialize(0);
    for (int h = 0; h < hkv; ++h) {
      const auto& pos = heads[h].positions;
      REQUIRE(pos.size() == 24);
      REQUIRE(std::is_sorted(pos.begin(), pos.end()));
      REQUIRE(std::adjacent_find(pos.begin(), pos.end()) == pos.end());
      REQUIRE(std::vector<std::int32_t>(pos.end() - 8, pos.end()) == iota_range(t - 8, t));
      for (int i = 0; i < 24; ++i)
        for (int c = 0; c < d; ++c)
          REQUIRE(heads[h].values[i * d + c] == x.v[(h * t + pos[i]) * d + c]);
    }
  }
  SECTION("T < C is the identity") {
    kvc::KVCache<Config, kvc::Cpu> cache{kvc::CacheShape{1, hq, hkv, d},
                                         kvc::SnapKv{.budget = 65, .window = 8}};
    cache.prefill(0, x.kv(), x.vv(), x.qv());
    cache.compress(0);
    REQUIRE(positions_of(cache, 0, 0) == iota_range(0, t));
  }
  SECTION("a column that dominates every window row is selected in every head") {
    // Key 5 of every KV head aligns with every window query; all other keys are tiny.
    for (auto& k : x.k) k = static_cast<float>(kvc::f16(k * 0.01f));
    for (int h = 0; h < hkv; ++h)
      for (int c = 0; c < d; ++c) x.k[(h * t + 5) * d + c] = c == 0 ? 8.0f : 0.0f;
    for (int h = 0; h < hq; ++h)
      for (int i = t - 8; i < t; ++i) x.q[(h * t + i) * d + 0] = 8.0f;
    const kvc::SnapKv p{.budget = 9, .window = 8, .kernel = 1};
    for (auto gqa : {kvc::GqaMode::mean, kvc::GqaMode::repeat}) {
      kvc::SnapKv policy = p;
      policy.gqa = gqa;
      kvc::KVCache<Config, kvc::Cpu> cache{kvc::CacheShape{1, hq, hkv, d}, policy};
      cache.prefill(0, x.kv(), x.vv(), x.qv());
      cache.compress(0);
      const int storage = gqa == kvc::GqaMode::mean ? hkv : hq;
      REQUIRE(cache.storage_heads(0) == storage);
      for (int s = 0; s < storage; ++s) {
        auto expected = iota_range(t - 8, t);
        expected.insert(expected.begin(), 5);
        REQUIRE(positions_of(cache, 0, s) == expected);
      }
    }
  }
  SECTION("gqa=repeat stores one head per query head: g times the bytes of gqa=mean") {
    kvc::KVCache<Config, kvc::Cpu> mean{kvc::CacheShape{1, hq, hkv, d},
                                        kvc::SnapKv{.budget = 24, .window = 8}};
    kvc::KVCache<Config, kvc::Cpu> repeat{
        kvc::CacheShape{1, hq, hkv, d},
        kvc::SnapKv{.budget = 24, .window = 8, .gqa = kvc::GqaMode::repeat}};
    for (auto* c : {&mean, &repeat}) {
      c->prefill(0, x.kv(), x.vv(), x.qv());
      c->compress(0);
    }
    REQUIRE(mean.bytes().stored() == 2 * 24 * d * 2 * 2);
    REQUIRE(repeat.bytes().stored() == 4 * mean.bytes().stored());
  }
  SECTION("reference_compat stores the same tokens in score order; attention is unchanged") {
    const kvc::SnapKv paper{.budget = 24, .window = 8, .kernel = 5};
    kvc::SnapKv released = paper;
    released.reference_compat = true;
    kvc::KVCache<Config, kvc::Cpu> sorted{kvc::CacheShape{1, hq, hkv, d}, paper};
    kvc::KVCache<Config, kvc::Cpu> scored{kvc::CacheShape{1, hq, hkv, d}, released};
    for (auto* c : {&sorted, &scored}) {
      c->prefill(0, x.kv(), x.vv(), x.qv());
      c->compress(0);
    }
    // The pooled scores the selection ranked by, recomputed from the same inputs.
    kvc::PrefillInput in;
    in.keys = x.kv();
    in.values = x.vv();
    in.queries = x.qv();
    const std::vector<float> pooled =
        kvc::snapkv_pooled_scores(in, 8, 5, kvc::ops::Pool::avg, kvc::GqaMode::mean, "test");
    const int prefix = t - 8;
    bool some_head_reordered = false;
    for (int h = 0; h < hkv; ++h) {
      const auto ascending = positions_of(sorted, 0, h);
      const auto released_order = positions_of(scored, 0, h);
      auto same_set = released_order;
      std::sort(same_set.begin(), same_set.end());
      REQUIRE(same_set == ascending);
      // The window comes last, in order; the survivors before it by non-increasing score, ties by
      // the lower position.
      REQUIRE(std::vector<std::int32_t>(released_order.end() - 8, released_order.end()) ==
              iota_range(t - 8, t));
      for (int i = 0; i + 1 < 16; ++i) {
        const float a = pooled[h * prefix + released_order[i]];
        const float b = pooled[h * prefix + released_order[i + 1]];
        REQUIRE((a > b || (a == b && released_order[i] < released_order[i + 1])));
      }
      some_head_reordered = some_head_reordered || released_order != ascending;
    }
    REQUIRE(some_head_reordered);  // random scores: the two orders must differ somewhere
    std::vector<float> out_sorted(hq * d), out_scored(hq * d);
    const auto q_last = token(x.qv(), t - 1);
    sorted.attend(0, q_last, kvc::make_view(out_sorted.data(), {hq, d}));
    scored.attend(0, q_last, kvc::make_view(out_scored.data(), {hq, d}));
    for (int i = 0; i < hq * d; ++i)
      REQUIRE(out_scored[i] == Approx(out_sorted[i]).epsilon(1e-5).margin(1e-6));
  }
  SECTION("too few prompt queries for the window is an error") {
    kvc::KVCache<Config, kvc::Cpu> cache{kvc::CacheShape{1, hq, hkv, d},
                                         kvc::SnapKv{.budget = 24, .window = 8}};
    cache.prefill(0, x.kv(), x.vv(), x.qv().slice(1, t - 4, t));
    REQUIRE_THROWS_WITH(cache.compress(0), Catch::Contains("window = 8"));
  }
}

TEST_CASE("SnapKV rejects bad parameters", "[snapkv]") {
  REQUIRE_THROWS_WITH((kvc::SnapKv{.budget = 0}.validate()), Catch::Contains("budget must be > 0"));
  REQUIRE_THROWS_WITH((kvc::SnapKv{.budget = 8, .window = 8}.validate()),
                      Catch::Contains("window = 8 must be < budget = 8"));
  REQUIRE_THROWS_WITH((kvc::SnapKv{.kernel = 4}.validate()), Catch::Contains("kernel must be odd"));
}

TEST_CASE("KIVI prefill split and decode flush schedule (section 25 vector 9)", "[cache][kivi]") {
  const kvc::Kivi kivi{.key_bits = 2, .value_bits = 2, .group = 32, .residual = 32};
  const int d = 32;
  auto make_store = [&](int n) {
    const auto k = random_f16_values(static_cast<std::size_t>(n) * d, 3);
    const auto v = random_f16_values(static_cast<std::size_t>(n) * d, 4);
    kvc::Kivi::HeadStore store;
    const auto positions = iota_range(0, n);
    store.load(kivi, kvc::make_view(k.data(), {n, d}), kvc::make_view(v.data(), {n, d}), positions);
    return store;
  };
  SECTION("T = 100: 96 keys + 4 residual, 68 values + 32 residual; flush after 28 steps") {
    auto store = make_store(100);
    REQUIRE(store.quantized_keys() == 96);
    REQUIRE(store.residual_keys() == 4);
    REQUIRE(store.quantized_values() == 68);
    REQUIRE(store.residual_values() == 32);
    const auto row = random_f16_values(d, 9);
    for (int step = 1; step <= 28; ++step) {
      store.append(kivi, row.data(), row.data(), 99 + step);
      // Attention of this step would see the new key in the residual (4 + step keys).
      REQUIRE(store.residual_keys() == (step < 28 ? 4 + step : 32));
      store.after_step(kivi);
      REQUIRE(store.residual_values() == 32);
      REQUIRE(store.quantized_values() == 68 + step);
    }
    REQUIRE(store.quantized_keys() == 128);
    REQUIRE(store.residual_keys() == 0);
    REQUIRE(store.size() == 128);
  }
  SECTION("T = 64: every key quantized, key residual empty") {
    auto store = make_store(64);
    REQUIRE(store.quantized_keys() == 64);
    REQUIRE(store.residual_keys() == 0);
    REQUIRE(store.quantized_values() == 32);
  }
  SECTION("T = 20: nothing quantized") {
    auto store = make_store(20);
    REQUIRE(store.quantized_keys() == 0);
    REQUIRE(store.quantized_values() == 0);
    REQUIRE(store.bytes().params == 0);
    REQUIRE(store.bytes().payload == 2 * 20 * d * 2);
  }
  SECTION("bytes equal the documented layout") {
    auto store = make_store(100);
    // keys: 3 groups x 32 channels x (32 tokens / 16 per word) words; values: 68 tokens x
    // (32 channels / 16) words; f16 residuals 4 and 32 tokens; params: f16 scale + min per
    // (group, channel) for keys and per (token, channel group) for values.
    const std::int64_t payload = (3 * 32 * 2 + 68 * 2) * 4 + (4 + 32) * d * 2;
    const std::int64_t params = (3 * 32 + 68 * 1) * 2 * 2;
    REQUIRE(store.bytes().payload == payload);
    REQUIRE(store.bytes().params == params);
    REQUIRE(store.bytes().index == 100 * 4);
  }
}

TEST_CASE("KIVI stores exactly the quantizer's codes (keys per channel, values per token)",
          "[cache][kivi]") {
  const kvc::Kivi kivi{.key_bits = 4, .value_bits = 2, .group = 32, .residual = 32};
  const int n = 70, d = 64;
  const auto k = random_f16_values(static_cast<std::size_t>(n) * d, 31);
  const auto v = random_f16_values(static_cast<std::size_t>(n) * d, 32);
  kvc::Kivi::HeadStore store;
  store.load(kivi, kvc::make_view(k.data(), {n, d}), kvc::make_view(v.data(), {n, d}),
             iota_range(0, n));
  std::vector<float> keys(n * d), values(n * d);
  store.keys(kvc::make_view(keys.data(), {n, d}));
  store.values(kvc::make_view(values.data(), {n, d}));
  // Key channel 5, token group 1 (tokens 32..63): one min-max group of 32 tokens.
  std::vector<float> group(32);
  std::vector<std::uint8_t> codes(32);
  for (int i = 0; i < 32; ++i) group[i] = k[(32 + i) * d + 5];
  auto params = kvc::ops::quantize_group(kvc::Cpu{}, group, 4, codes);
  for (int i = 0; i < 32; ++i)
    REQUIRE(keys[(32 + i) * d + 5] == kvc::ops::dequantize_code(codes[i], params));
  // Tokens 64..69 are the key residual: exact.
  for (int i = 64 * d; i < n * d; ++i) REQUIRE(keys[i] == k[i]);
  // Value token 10, channel group 1 (channels 32..63).
  for (int c = 0; c < 32; ++c) group[c] = v[10 * d + 32 + c];
  params = kvc::ops::quantize_group(kvc::Cpu{}, group, 2, codes);
  for (int c = 0; c < 32; ++c)
    REQUIRE(values[10 * d + 32 + c] == kvc::ops::dequantize_code(codes[c], params));
  // The last 32 values are the residual: exact.
  for (int i = (n - 32) * d; i < n * d; ++i) REQUIRE(values[i] == v[i]);
}

TEST_CASE("SnapKV then KIVI: quantization applies to what eviction kept", "[cache][kivi][snapkv]") {
  const Tensors x(8, 2, 200, 64, 41);
  struct Config : kvc::DefaultConfig {
    using Eviction = kvc::SnapKv;
    using Quant = kvc::Kivi;
  };
  kvc::KVCache<Config, kvc::Cpu> cache{kvc::CacheShape{1, 8, 2, 64},
                                       kvc::SnapKv{.budget = 100, .window = 16},
                                       kvc::Kivi{.group = 32, .residual = 32}};
  cache.prefill(0, x.kv(), x.vv(), x.qv());
  cache.compress(0);
  const auto& store = cache.store(0, 0);
  REQUIRE(store.size() == 100);
  REQUIRE(store.quantized_keys() == 96);
  REQUIRE(store.quantized_values() == 68);
}

TEST_CASE("decode-time eviction cannot combine with KIVI", "[cache][composition]") {
  const auto p = kvc::build_policies("streamingllm(sink=4,recent=64)+kivi(bits=2)");
  REQUIRE_THROWS_WITH(
      (kvc::RuntimeCache{kvc::CacheShape{1, 8, 2, 64}, p.eviction, p.quant}),
      Catch::Contains("cannot combine streamingllm") && Catch::Contains("with kivi"));
}

TEST_CASE("the runtime cache from a spec equals the statically configured cache",
          "[cache][registry]") {
  const Tensors x(8, 2, 120, 64, 51);
  const auto p =
      kvc::build_policies("snapkv(budget=64,window=8,kernel=7,pool=max)+kivi(bits=4,residual=32)");
  kvc::RuntimeCache runtime{kvc::CacheShape{1, 8, 2, 64}, p.eviction, p.quant};
  struct Config : kvc::DefaultConfig {
    using Eviction = kvc::SnapKv;
    using Quant = kvc::Kivi;
  };
  kvc::KVCache<Config, kvc::Cpu> fixed{
      kvc::CacheShape{1, 8, 2, 64},
      kvc::SnapKv{.budget = 64, .window = 8, .kernel = 7, .pool = kvc::ops::Pool::max},
      kvc::Kivi{.key_bits = 4, .value_bits = 4, .residual = 32}};
  runtime.prefill(0, x.kv().slice(1, 0, 100), x.vv().slice(1, 0, 100), x.qv().slice(1, 0, 100));
  fixed.prefill(0, x.kv().slice(1, 0, 100), x.vv().slice(1, 0, 100), x.qv().slice(1, 0, 100));
  runtime.compress(0);
  fixed.compress(0);
  std::vector<float> a(8 * 64), b(8 * 64);
  for (int t = 100; t < 120; ++t) {
    runtime.append(0, token(x.kv(), t), token(x.vv(), t));
    fixed.append(0, token(x.kv(), t), token(x.vv(), t));
    runtime.attend(0, token(x.qv(), t), kvc::make_view(a.data(), {8, 64}));
    fixed.attend(0, token(x.qv(), t), kvc::make_view(b.data(), {8, 64}));
    REQUIRE(a == b);
    runtime.step(0);
    fixed.step(0);
  }
  REQUIRE(runtime.bytes().stored() == fixed.bytes().stored());
}

TEST_CASE("lifecycle errors are clear", "[cache]") {
  const Tensors x(8, 2, 10, 16, 61);
  kvc::KVCache<kvc::DefaultConfig, kvc::Cpu> cache{kvc::CacheShape{2, 8, 2, 16}};
  cache.prefill(0, x.kv(), x.vv(), x.qv());
  REQUIRE_THROWS_WITH(cache.append(0, token(x.kv(), 0), token(x.vv(), 0)),
                      Catch::Contains("call compress() first"));
  REQUIRE_THROWS_WITH(cache.compress(2), Catch::Contains("layer 2 out of range [0, 2)"));
  REQUIRE_THROWS_WITH((kvc::KVCache<kvc::DefaultConfig, kvc::Cpu>{kvc::CacheShape{1, 6, 4, 16}}),
                      Catch::Contains("q_heads = 6 must be a positive multiple of kv_heads = 4"));
  // A layer that was never prefilled starts empty and grows by appends.
  cache.append(1, token(x.kv(), 0), token(x.vv(), 0));
  REQUIRE(cache.tokens(1, 0) == 1);
}
