// bench/cuda/bench_support.hpp: what the CUDA benchmarks share: random bf16 inputs uploaded once,
// rotation over input sets larger than L2, CUDA-event timing (median of repeated calls) and the
// device-to-device copy every kernel is measured against in the same binary.
//
//   const int sets = kvc_bench::rotation_sets(set_bytes);  // >= 512 MB of inputs in all
//   const double copy_ms = kvc_bench::copy_ms(keys, bytes, kTimedCalls);  // sources rotate
//   const double ms = kvc_bench::time_iterations(state, [&](int i) { run(i % sets); },
//   kTimedCalls); state.counters["copy_GB_per_s"] = kvc_bench::copy_bytes_per_s(bytes, copy_ms) /
//   1e9;
#pragma once

#include <benchmark/benchmark.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <random>
#include <span>
#include <type_traits>
#include <vector>

#include "kvc/core/cuda_runtime.hpp"
#include "kvc/core/dtype.hpp"
#include "kvc/core/view.hpp"

namespace kvc_bench {

// Inputs rotate over sets of at least this many bytes in all, so that L2 (50 MB on H100) holds none
// of them when a call reads its set again.
inline constexpr std::size_t kMinRotationBytes = 512ull << 20;

// How many sets of `set_bytes` make up kMinRotationBytes (at least one).
inline int rotation_sets(std::size_t set_bytes) {
  return static_cast<int>(
      std::max<std::size_t>(1, (kMinRotationBytes + set_bytes - 1) / set_bytes));
}

inline kvc::cuda_runtime::DeviceBuffer upload_bf16(const std::vector<kvc::bf16>& host) {
  kvc::cuda_runtime::DeviceBuffer buffer(host.size() * sizeof(kvc::bf16));
  kvc::cuda_runtime::copy_host_to_device(buffer.data(), host.data(), buffer.bytes(), kvc::Cuda{});
  return buffer;
}

// Random bf16 in [-2, 2) from std::uniform_real_distribution over a Mersenne Twister.
inline kvc::cuda_runtime::DeviceBuffer uniform_random_bf16(std::size_t count, std::uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> uniform(-2.0f, 2.0f);
  std::vector<kvc::bf16> host(count);
  for (auto& x : host) x = kvc::bf16(uniform(rng));
  return upload_bf16(host);
}

// Random bf16 in [-2, 2) from a xorshift generator (fast enough for 128K-token layers).
inline kvc::cuda_runtime::DeviceBuffer xorshift_random_bf16(std::size_t count, std::uint32_t seed) {
  std::vector<kvc::bf16> host(count);
  std::uint32_t x = seed * 2654435761u + 1;
  for (auto& value : host) {
    x ^= x << 13;
    x ^= x >> 17;
    x ^= x << 5;
    value = kvc::bf16(static_cast<float>(x >> 8) * (4.0f / 16777216.0f) - 2.0f);
  }
  return upload_bf16(host);
}

// Median time in ms of `timed_calls` calls, each between two CUDA events (behind an untimed call
// that keeps the GPU busy), after 3 warm-up calls.
// `call` takes the call's index (to pick the input set: i % sets) or nothing.
template <class F>
double median_ms(F&& call, int timed_calls) {
  auto invoke = [&](int i) {
    if constexpr (std::is_invocable_v<F&, int>)
      call(i);
    else
      call();
  };
  auto* start = kvc::cuda_runtime::create_event();
  auto* stop = kvc::cuda_runtime::create_event();
  for (int i = 0; i < 3; ++i) invoke(i);  // warm-up
  std::vector<float> times;
  for (int i = 0; i < timed_calls; ++i) {
    // The next input set's call first, untimed: the GPU runs it while the host records `start`
    // and enqueues the timed call, so `start` fires just before that call begins. On an idle GPU
    // the host's launch latency (the op's checks, split planning, two launches) would be timed as
    // GPU time: an engine's layers run back to back, so that gap is not the kernel's cost.
    invoke(i + 1);
    kvc::cuda_runtime::record_event(start, kvc::Cuda{});
    invoke(i);
    kvc::cuda_runtime::record_event(stop, kvc::Cuda{});
    times.push_back(kvc::cuda_runtime::elapsed_ms(start, stop));
  }
  kvc::cuda_runtime::destroy_event(start);
  kvc::cuda_runtime::destroy_event(stop);
  std::sort(times.begin(), times.end());
  return times[times.size() / 2];
}

// The benchmark loop of a manual-time benchmark: each iteration reports median_ms(call); returns
// the last one.
template <class F>
double time_iterations(benchmark::State& state, F&& call, int timed_calls) {
  double ms = 0;
  for (auto _ : state) {
    ms = median_ms(call, timed_calls);
    state.SetIterationTime(ms / 1e3);
  }
  return ms;
}

// Median time of kvc's device-to-device copy of `bytes` from sources[i % sources.size()] (rotating
// like the kernel's inputs) into one destination.
inline double copy_ms(std::span<const kvc::cuda_runtime::DeviceBuffer> sources, std::size_t bytes,
                      int timed_calls) {
  kvc::cuda_runtime::DeviceBuffer destination(bytes);
  return median_ms(
      [&](int i) {
        const auto& source = sources[static_cast<std::size_t>(i) % sources.size()];
        kvc::cuda_runtime::copy_device_to_device(destination.data(), source.data(), bytes,
                                                 kvc::Cuda{});
      },
      timed_calls);
}

// Copy bandwidth credited with read + write: 2 * bytes / time.
inline double copy_bytes_per_s(std::size_t bytes, double copy_ms) {
  return 2.0 * static_cast<double>(bytes) / (copy_ms / 1e3);
}

inline kvc::DeviceView<std::byte, 1> bytes_view(const kvc::cuda_runtime::DeviceBuffer& buffer) {
  return kvc::make_device_view(buffer.as<std::byte>(), {static_cast<std::int64_t>(buffer.bytes())});
}

}  // namespace kvc_bench
