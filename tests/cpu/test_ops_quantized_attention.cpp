// The CPU reference of decode attention over quantized cache layouts
// (kvc/ops/quantized_attention.hpp): on the bundled dump, reading the bytes of the library's own
// KIVI, INT8/INT4 and FP8 stores through the layout description gives the same output as exact
// attention over the stores' own dequantized K/V (so the layout description and docs/formats.md
// agree with the stores), and inconsistent counts are rejected.
#include <catch2/catch.hpp>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <vector>

#include "kvc/eval/dump.hpp"
#include "kvc/ops/quantized_attention.hpp"
#include "kvc/policies/quant/fp8.hpp"
#include "kvc/policies/quant/int_per_token.hpp"
#include "kvc/policies/quant/kivi.hpp"

namespace {

using kvc::MemorySpace;

const kvc::KvDump& dump() {
  static const kvc::KvDump d = kvc::load_dump(std::filesystem::path(KVC_TEST_DATA_DIR) / "seq0");
  return d;
}

// One KV head of layer `layer`: tokens [0, n), prefill of n - decode then one step per token.
template <class Policy>
typename Policy::HeadStore store_for(const Policy& policy, int layer, int head, int n, int decode) {
  const auto k = dump().k(layer), v = dump().v(layer);
  const int d = dump().head_dim, prefill = n - decode;
  std::vector<float> keys, values;
  for (int t = 0; t < n; ++t)
    for (int c = 0; c < d; ++c) keys.push_back(k(head, t, c)), values.push_back(v(head, t, c));
  std::vector<std::int32_t> positions(n);
  for (int t = 0; t < n; ++t) positions[t] = t;
  typename Policy::HeadStore store;
  store.load(policy, kvc::make_view(keys.data(), {prefill, d}),
             kvc::make_view(values.data(), {prefill, d}), std::span(positions.data(), prefill));
  for (int t = prefill; t < n; ++t) {
    store.append(policy, &keys[static_cast<std::size_t>(t) * d],
                 &values[static_cast<std::size_t>(t) * d], t);
    store.after_step(policy);
  }
  return store;
}

struct Query {
  std::vector<float> q;  // [1, G, D]: the query heads of KV head `head` at token n - 1
  int group = 0, d = 0;
};
Query query(int layer, int head, int n) {
  Query out;
  out.group = dump().group_size(), out.d = dump().head_dim;
  const auto q = dump().q(layer);
  for (int h = 0; h < out.group; ++h)
    for (int c = 0; c < out.d; ++c) out.q.push_back(q(head * out.group + h, n - 1, c));
  return out;
}

// Exact attention over the store's own dequantized K/V; the layout path must agree to fp32
// rounding of the same dequantized values (both accumulate in fp64).
template <class Store>
void require_same(const Store& store, const Query& q, int n, const std::vector<float>& layout_out) {
  std::vector<float> keys(static_cast<std::size_t>(n) * q.d), values(keys.size());
  store.keys(kvc::make_view(keys.data(), {n, q.d}));
  store.values(kvc::make_view(values.data(), {n, q.d}));
  std::vector<float> expected(layout_out.size());
  kvc::ops::AttentionOptions exact;
  exact.accumulate_fp64 = true;
  kvc::ops::decode_attention(kvc::Cpu{}, kvc::make_view(q.q.data(), {q.group, q.d}),
                             kvc::make_view(static_cast<const float*>(keys.data()), {1, n, q.d}),
                             kvc::make_view(static_cast<const float*>(values.data()), {1, n, q.d}),
                             kvc::make_view(expected.data(), {q.group, q.d}), exact);
  float max_v = 0;
  for (float x : values) max_v = std::max(max_v, std::fabs(x));
  for (std::size_t i = 0; i < expected.size(); ++i) {
    INFO("element " << i << ": layout " << layout_out[i] << " vs store " << expected[i]);
    REQUIRE(std::fabs(layout_out[i] - expected[i]) <= 4 * std::ldexp(1.0f, -24) * max_v);
  }
}

std::vector<kvc::f16> halves(std::span<const float> x) {
  std::vector<kvc::f16> out;
  for (float v : x) out.push_back(kvc::f16(v));
  return out;
}

}  // namespace

TEST_CASE("quantized attention (cpu): KIVI layout equals the store", "[ops][quantized_attention]") {
  for (int bits : {2, 4}) {
    const kvc::Kivi kivi{.key_bits = bits, .value_bits = bits, .group = 32, .residual = 64};
    const int n = 437, layer = 3, head = 1;
    const auto store = store_for(kivi, layer, head, n, 70);
    const auto q = query(layer, head, n);
    const int d = q.d, qk = store.quantized_keys(), qv = store.quantized_values();
    std::vector<float> dense(static_cast<std::size_t>(n) * d);
    store.keys(kvc::make_view(dense.data(), {n, d}));
    const auto key_residual = halves(std::span(dense).subspan(static_cast<std::size_t>(qk) * d));
    store.values(kvc::make_view(dense.data(), {n, d}));
    const auto value_residual = halves(std::span(dense).subspan(static_cast<std::size_t>(qv) * d));
    const auto& kb = store.key_tensor().channel_blocks();
    const auto& vr = store.value_tensor().token_rows();
    const auto ks = halves(kb.scales()), km = halves(kb.minimums());
    const auto vs = halves(vr.scales()), vm = halves(vr.minimums());
    const std::int32_t lengths[1] = {n}, qks[1] = {qk}, qvs[1] = {qv};
    kvc::ops::KiviCache<MemorySpace::Host> cache;
    cache.bits = bits;
    cache.group = 32;
    cache.key_codes = {kb.codes().data(), 0, 0};
    cache.key_scale = {ks.data(), 0, 0}, cache.key_minimum = {km.data(), 0, 0};
    cache.key_residual = {key_residual.data(), 0, 0};
    cache.value_codes = {vr.codes().data(), 0, 0};
    cache.value_scale = {vs.data(), 0, 0}, cache.value_minimum = {vm.data(), 0, 0};
    cache.value_residual = {value_residual.data(), 0, 0};
    cache.lengths = kvc::make_view(lengths, {1, 1});
    cache.quantized_keys = kvc::make_view(qks, {1, 1});
    cache.quantized_values = kvc::make_view(qvs, {1, 1});
    cache.max_length = n;
    std::vector<float> out(static_cast<std::size_t>(q.group) * d);
    kvc::ops::decode_attention(
        kvc::Cpu{}, kvc::make_view(static_cast<const float*>(q.q.data()), {1, q.group, d}), cache,
        kvc::make_view(out.data(), {1, q.group, d}));
    require_same(store, q, n, out);

    const std::int32_t bad[1] = {qk - 1};  // not a multiple of the group
    cache.quantized_keys = kvc::make_view(bad, {1, 1});
    REQUIRE_THROWS_WITH(
        kvc::ops::decode_attention(
            kvc::Cpu{}, kvc::make_view(static_cast<const float*>(q.q.data()), {1, q.group, d}),
            cache, kvc::make_view(out.data(), {1, q.group, d})),
        Catch::Contains("a multiple of group = 32"));
  }
}

TEST_CASE("quantized attention (cpu): INT8/INT4 and FP8 layouts equal the stores",
          "[ops][quantized_attention]") {
  const int n = 300, layer = 5, head = 0;
  const auto q = query(layer, head, n);
  const int d = q.d;
  std::vector<float> out(static_cast<std::size_t>(q.group) * d);
  const auto qv = kvc::make_view(static_cast<const float*>(q.q.data()), {1, q.group, d});
  for (int bits : {8, 4})
    for (bool symmetric : {true, false}) {
      // f32 parameters: the store's float arrays are the layout's bytes as they are.
      const kvc::IntPerToken policy{.bits = bits,
                                    .symmetric = symmetric,
                                    .group = 32,
                                    .scales = kvc::ops::ParamDType::f32,
                                    .residual = 5};
      const auto store = store_for(policy, layer, head, n, 40);
      const int m = store.quantized();
      std::vector<float> dense(static_cast<std::size_t>(n) * d);
      store.keys(kvc::make_view(dense.data(), {n, d}));
      const auto kw = halves(std::span(dense).subspan(static_cast<std::size_t>(m) * d));
      store.values(kvc::make_view(dense.data(), {n, d}));
      const auto vw = halves(std::span(dense).subspan(static_cast<std::size_t>(m) * d));
      const std::int32_t lengths[1] = {n}, quantized[1] = {m};
      kvc::ops::IntCache<MemorySpace::Host> cache;
      cache.bits = bits, cache.group = 32, cache.symmetric = symmetric;
      cache.params = kvc::ops::ParamDType::f32;
      cache.key_codes = {store.quantized_keys().codes().data(), 0, 0};
      cache.value_codes = {store.quantized_values().codes().data(), 0, 0};
      cache.key_scale = {store.quantized_keys().scales().data(), 0, 0};
      cache.value_scale = {store.quantized_values().scales().data(), 0, 0};
      if (!symmetric) {
        cache.key_minimum = {store.quantized_keys().minimums().data(), 0, 0};
        cache.value_minimum = {store.quantized_values().minimums().data(), 0, 0};
      }
      cache.key_window = {kw.data(), 0, 0}, cache.value_window = {vw.data(), 0, 0};
      cache.lengths = kvc::make_view(lengths, {1, 1});
      cache.quantized = kvc::make_view(quantized, {1, 1});
      cache.max_length = n;
      kvc::ops::decode_attention(kvc::Cpu{}, qv, cache,
                                 kvc::make_view(out.data(), {1, q.group, d}));
      require_same(store, q, n, out);
    }
  for (auto kind : {kvc::ops::Fp8Kind::e4m3, kvc::ops::Fp8Kind::e5m2}) {
    const auto store = store_for(kvc::Fp8{.kind = kind}, layer, head, n, 40);
    const std::int32_t lengths[1] = {n};
    const float ks[1] = {store.key_scale()}, vs[1] = {store.value_scale()};
    kvc::ops::Fp8Cache<MemorySpace::Host> cache;
    cache.kind = kind;
    cache.key_codes = {store.key_codes().data(), 0, 0};
    cache.value_codes = {store.value_codes().data(), 0, 0};
    cache.key_scale = kvc::make_view(ks, {1, 1}), cache.value_scale = kvc::make_view(vs, {1, 1});
    cache.lengths = kvc::make_view(lengths, {1, 1});
    cache.max_length = n;
    kvc::ops::decode_attention(kvc::Cpu{}, qv, cache, kvc::make_view(out.data(), {1, q.group, d}));
    require_same(store, q, n, out);

    cache.max_length = n - 1;  // a length beyond the bound
    REQUIRE_THROWS_WITH(kvc::ops::decode_attention(kvc::Cpu{}, qv, cache,
                                                   kvc::make_view(out.data(), {1, q.group, d})),
                        Catch::Contains("is outside [0, max_length = 299]"));
  }
}
