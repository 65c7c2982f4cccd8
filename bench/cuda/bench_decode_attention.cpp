// Dense decode attention on the GPU (bf16 K/V, fp32 accumulation): achieved bandwidth as a fraction
// of kvc's device-to-device copy measured in the same binary, on the same number of bytes.
//
//   build/kvc_cuda_bench --benchmark_filter=decode_attention
//
// Bytes counted (compulsory traffic): K + V read once = 2 * B * Hkv * T * D * 2 bytes (q and out
// are B * Hq * D * 2 bytes each, < 0.01% here, left out). The copy moves the same byte count and is
// credited with read + write (2 * bytes), the usual definition of copy bandwidth; frac_copy =
// (K+V bytes / attention time) / (2 * bytes / copy time). Times: CUDA events around each call,
// median of the repetitions; inputs rotate over enough sets to defeat the 50 MB L2.
#include <benchmark/benchmark.h>

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <vector>

#include "bench_support.hpp"
#include "kvc/core/cuda_runtime.hpp"
#include "kvc/core/dtype.hpp"
#include "kvc/ops/attention.hpp"

namespace {

namespace rt = kvc::cuda_runtime;

constexpr int kTimedCalls = 30;

double median_ms(auto&& call) { return kvc_bench::median_ms(call, kTimedCalls); }

// Random bf16 values tiled from a 4 Mi-element block (timing does not depend on the values; this
// keeps the set-up of the 128K shapes short).
rt::DeviceBuffer tiled_random_bf16(std::size_t count, std::uint32_t seed) {
  const std::size_t block = std::min<std::size_t>(count, 1u << 22);
  rt::DeviceBuffer source = kvc_bench::uniform_random_bf16(block, seed);
  rt::DeviceBuffer buffer(count * sizeof(kvc::bf16));
  for (std::size_t at = 0; at < count; at += block)
    rt::copy_device_to_device(buffer.as<kvc::bf16>() + at, source.data(),
                              std::min(block, count - at) * sizeof(kvc::bf16), kvc::Cuda{});
  rt::synchronize(kvc::Cuda{});
  return buffer;
}

// One decode shape's inputs (Args: batch, Hq, Hkv, D, context): K and V rotating over `sets`, the
// query, the output and every sequence at full length. Values in [-2, 2) from `random_bf16`
// (tiled_random_bf16 for the timed shapes: several GB of host-side random numbers per shape would
// dominate the run).
struct DecodeInputs {
  std::int64_t batch, q_heads, kv_heads, d, t;
  std::size_t kv_bytes;  // K + V of one set
  int sets;
  std::vector<rt::DeviceBuffer> keys, values;  // per set: [B, Hkv, T, D] each
  rt::DeviceBuffer q, out, lengths;            // [B, Hq, D], [B, Hq, D], [B]

  template <class Random>
  DecodeInputs(const benchmark::State& state, Random&& random_bf16, std::uint32_t kv_seed)
      : batch(state.range(0)),
        q_heads(state.range(1)),
        kv_heads(state.range(2)),
        d(state.range(3)),
        t(state.range(4)),
        kv_bytes(2 * kv_elements() * sizeof(kvc::bf16)),
        sets(kvc_bench::rotation_sets(kv_bytes)) {
    for (int s = 0; s < sets; ++s) {
      keys.push_back(random_bf16(kv_elements(), kv_seed + 2 * s));
      values.push_back(random_bf16(kv_elements(), kv_seed + 1 + 2 * s));
    }
    q = kvc_bench::uniform_random_bf16(static_cast<std::size_t>(batch * q_heads * d), 3);
    out = rt::DeviceBuffer(static_cast<std::size_t>(batch * q_heads * d) * sizeof(kvc::bf16));
    std::vector<std::int32_t> host_lengths(batch, static_cast<std::int32_t>(t));
    lengths = rt::DeviceBuffer(host_lengths.size() * sizeof(std::int32_t));
    rt::copy_host_to_device(lengths.data(), host_lengths.data(), lengths.bytes(), kvc::Cuda{});
  }
  std::size_t kv_elements() const { return static_cast<std::size_t>(batch * kv_heads * t * d); }

  // The views of call i: q, K and V of set i % sets, lengths, out.
  auto views(int i) const {
    const int s = i % sets;
    return std::tuple{
        kvc::make_device_view(q.as<const kvc::bf16>(), {batch, q_heads, d}),
        kvc::make_device_view(keys[s].as<const kvc::bf16>(), {batch, kv_heads, t, d}),
        kvc::make_device_view(values[s].as<const kvc::bf16>(), {batch, kv_heads, t, d}),
        kvc::make_device_view(lengths.as<const std::int32_t>(), {batch}),
        kvc::make_device_view(out.as<kvc::bf16>(), {batch, q_heads, d})};
  }
};

void decode_attention(benchmark::State& state) {
  const DecodeInputs in(state, tiled_random_bf16, 10);
  const std::size_t workspace_floats = kvc::ops::decode_attention_workspace_floats(
      static_cast<int>(in.batch), static_cast<int>(in.q_heads), static_cast<int>(in.kv_heads),
      static_cast<int>(in.d), static_cast<int>(in.t));
  rt::DeviceBuffer workspace(std::max<std::size_t>(workspace_floats, 1) * sizeof(float));

  auto attend = [&](int i) {
    auto [qv, kv, vv, lv, ov] = in.views(i);
    kvc::ops::decode_attention(
        kvc::Cuda{}, qv, kv, vv, lv, ov,
        kvc::make_device_view(workspace.as<float>(),
                              {static_cast<std::int64_t>(workspace_floats)}));
  };
  // The copy reference: the same byte count, source rotating like the attention's inputs; it
  // copies half the bytes (K only), credited read + write.
  const std::size_t kv_bytes = in.kv_bytes;
  const double copy_ms = kvc_bench::copy_ms(in.keys, kv_bytes / 2, kTimedCalls);
  const double attention_ms = kvc_bench::time_iterations(state, attend, kTimedCalls);
  const double copy_bandwidth = kvc_bench::copy_bytes_per_s(kv_bytes / 2, copy_ms);
  const double attention_bandwidth = kv_bytes / (attention_ms / 1e3);
  state.counters["ms"] = attention_ms;
  state.counters["GB_per_s"] = attention_bandwidth / 1e9;
  state.counters["copy_GB_per_s"] = copy_bandwidth / 1e9;
  state.counters["frac_copy"] = attention_bandwidth / copy_bandwidth;
}

void shapes(benchmark::internal::Benchmark* b) {
  // batch, Hq, Hkv, D, context: the headline (8, 32, 8, 128, 32768) and the curve around it.
  for (std::int64_t context : {4096, 16384, 32768, 131072}) b->Args({8, 32, 8, 128, context});
  for (std::int64_t batch : {1, 32}) b->Args({batch, 32, 8, 128, 32768});
  b->Args({1, 32, 8, 128, 131072});
}

BENCHMARK(decode_attention)
    ->Apply(shapes)
    ->UseManualTime()
    ->Iterations(1)
    ->Unit(benchmark::kMillisecond);

// ---- Decode attention with the H2O score side output (decode_attention_with_scores) -------------
//
//   build/kvc_cuda_bench --benchmark_filter=decode_attention_with_scores
//
// The same inputs timed with the score output (H2O: accumulate, f16 rounding) and with the plain
// kernel, in this function, so `ratio` = time with scores / plain time comes from one run. Extra
// compulsory traffic over the plain kernel: the score buffer read + written (2 * B * Hkv * T * 4
// bytes) and each key's G raw scores written and read back (2 * B * Hq * T * 4 bytes): at D 128,
// G 4 that is 40 bytes per key and KV head against 512 of K + V, ratio >= 1.08 at equal bandwidth.

void decode_attention_with_scores(benchmark::State& state) {
  const DecodeInputs in(state, tiled_random_bf16, 20);
  const std::int64_t batch = in.batch, kv_heads = in.kv_heads, t = in.t;
  const int bi = static_cast<int>(batch), hq = static_cast<int>(in.q_heads),
            hkv = static_cast<int>(kv_heads), di = static_cast<int>(in.d), ti = static_cast<int>(t);
  const std::size_t plain_floats = kvc::ops::decode_attention_workspace_floats(bi, hq, hkv, di, ti);
  const std::size_t score_floats =
      kvc::ops::decode_attention_with_scores_workspace_floats(bi, hq, hkv, di, ti);
  rt::DeviceBuffer workspace(std::max<std::size_t>({plain_floats, score_floats, 1}) *
                             sizeof(float));
  rt::DeviceBuffer scores(static_cast<std::size_t>(batch * kv_heads * t) * sizeof(float));
  rt::fill_bytes(scores.data(), 0, scores.bytes(), kvc::Cuda{});

  auto plain = [&](int i) {
    auto [qv, kv, vv, lv, ov] = in.views(i);
    kvc::ops::decode_attention(
        kvc::Cuda{}, qv, kv, vv, lv, ov,
        kvc::make_device_view(workspace.as<float>(), {static_cast<std::int64_t>(plain_floats)}));
  };
  auto with_scores = [&](int i) {
    auto [qv, kv, vv, lv, ov] = in.views(i);
    kvc::ops::decode_attention_with_scores(
        kvc::Cuda{}, qv, kv, vv, lv, ov,
        kvc::make_device_view(scores.as<float>(), {batch, kv_heads, t}),
        kvc::make_device_view(workspace.as<float>(), {static_cast<std::int64_t>(score_floats)}),
        kvc::ops::kH2oScores);
  };
  double plain_ms = 0, scores_ms = 0;
  for (auto _ : state) {
    plain_ms = median_ms(plain);
    scores_ms = median_ms(with_scores);
    state.SetIterationTime(scores_ms / 1e3);
  }
  state.counters["ms"] = scores_ms;
  state.counters["plain_ms"] = plain_ms;
  state.counters["ratio"] = scores_ms / plain_ms;
}

BENCHMARK(decode_attention_with_scores)
    ->Apply(shapes)
    ->UseManualTime()
    ->Iterations(1)
    ->Unit(benchmark::kMillisecond);

}  // namespace

BENCHMARK_MAIN();
