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
#include <random>
#include <vector>

#include "kvc/core/cuda_runtime.hpp"
#include "kvc/core/dtype.hpp"
#include "kvc/ops/attention.hpp"

namespace {

namespace rt = kvc::cuda_runtime;

constexpr std::size_t kMinRotationBytes = 512ull << 20;
constexpr int kTimedCalls = 30;

// Random bf16 bits in [-2, 2) written on the host once per size, uploaded to every set.
rt::DeviceBuffer random_bf16(std::size_t count, std::uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> uniform(-2.0f, 2.0f);
  std::vector<kvc::bf16> host(count);
  for (auto& x : host) x = kvc::bf16(uniform(rng));
  rt::DeviceBuffer buffer(count * sizeof(kvc::bf16));
  rt::copy_host_to_device(buffer.data(), host.data(), buffer.bytes(), kvc::Cuda{});
  return buffer;
}

template <class F>
double median_ms(F&& call) {
  auto* start = rt::create_event();
  auto* stop = rt::create_event();
  for (int i = 0; i < 3; ++i) call(i);  // warm-up
  std::vector<float> times;
  for (int i = 0; i < kTimedCalls; ++i) {
    rt::record_event(start, kvc::Cuda{});
    call(i);
    rt::record_event(stop, kvc::Cuda{});
    times.push_back(rt::elapsed_ms(start, stop));
  }
  rt::destroy_event(start);
  rt::destroy_event(stop);
  std::sort(times.begin(), times.end());
  return times[times.size() / 2];
}

void decode_attention(benchmark::State& state) {
  const std::int64_t batch = state.range(0), q_heads = state.range(1), kv_heads = state.range(2),
                     d = state.range(3), t = state.range(4);
  const std::size_t kv_elements = static_cast<std::size_t>(batch * kv_heads * t * d);
  const std::size_t kv_bytes = 2 * kv_elements * sizeof(kvc::bf16);
  const int sets =
      static_cast<int>(std::max<std::size_t>(1, (kMinRotationBytes + kv_bytes - 1) / kv_bytes));
  std::vector<rt::DeviceBuffer> keys, values;
  for (int s = 0; s < sets; ++s) {
    keys.push_back(random_bf16(kv_elements, 10 + 2 * s));
    values.push_back(random_bf16(kv_elements, 11 + 2 * s));
  }
  auto q = random_bf16(static_cast<std::size_t>(batch * q_heads * d), 3);
  rt::DeviceBuffer out(static_cast<std::size_t>(batch * q_heads * d) * sizeof(kvc::bf16));
  std::vector<std::int32_t> host_lengths(batch, static_cast<std::int32_t>(t));
  rt::DeviceBuffer lengths(host_lengths.size() * sizeof(std::int32_t));
  rt::copy_host_to_device(lengths.data(), host_lengths.data(), lengths.bytes(), kvc::Cuda{});
  const std::size_t workspace_floats = kvc::ops::decode_attention_workspace_floats(
      static_cast<int>(batch), static_cast<int>(q_heads), static_cast<int>(kv_heads),
      static_cast<int>(d), static_cast<int>(t));
  rt::DeviceBuffer workspace(std::max<std::size_t>(workspace_floats, 1) * sizeof(float));

  auto attend = [&](int i) {
    const int s = i % sets;
    kvc::ops::decode_attention(
        kvc::Cuda{}, kvc::make_device_view(q.as<const kvc::bf16>(), {batch, q_heads, d}),
        kvc::make_device_view(keys[s].as<const kvc::bf16>(), {batch, kv_heads, t, d}),
        kvc::make_device_view(values[s].as<const kvc::bf16>(), {batch, kv_heads, t, d}),
        kvc::make_device_view(lengths.as<const std::int32_t>(), {batch}),
        kvc::make_device_view(out.as<kvc::bf16>(), {batch, q_heads, d}),
        kvc::make_device_view(workspace.as<float>(),
                              {static_cast<std::int64_t>(workspace_floats)}));
  };
  // The copy reference: the same byte count, source rotating like the attention's inputs.
  rt::DeviceBuffer copy_destination(kv_bytes / 2);
  auto copy = [&](int i) {
    const int s = i % sets;
    rt::copy_device_to_device(copy_destination.data(), keys[s].data(), kv_bytes / 2, kvc::Cuda{});
  };
  const double copy_ms = median_ms(copy);  // copies half the bytes: K only, credited read + write
  double attention_ms = 0;
  for (auto _ : state) {
    attention_ms = median_ms(attend);
    state.SetIterationTime(attention_ms / 1e3);
  }
  const double copy_bandwidth = 2.0 * (kv_bytes / 2) / (copy_ms / 1e3);
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

}  // namespace

BENCHMARK_MAIN();
