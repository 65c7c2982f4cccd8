// Reference KIVI quantization (ALGORITHMS.md P5/P6): keys per channel, values per token, n = 4096
// tokens, D = 128, group 32, bits 2 and 4.
//
//   build/kvc_cpu_bench --benchmark_filter=quantize
#include <benchmark/benchmark.h>

#include <cstdint>
#include <random>
#include <vector>

#include "kvc/core/backend.hpp"
#include "kvc/core/dtype.hpp"
#include "kvc/core/view.hpp"
#include "kvc/ops/quantize.hpp"
#include "random_inputs.hpp"

namespace {

constexpr std::int64_t kTokens = 4096;
constexpr std::int64_t kHeadDim = 128;
constexpr int kGroup = 32;

using kvc::bench::normal_values;

void quantize_keys_per_channel(benchmark::State& state) {
  const int bits = static_cast<int>(state.range(0));
  const std::int64_t per_word = kvc::ops::codes_per_word(bits);
  const auto keys = normal_values(kTokens * kHeadDim, 1);              // [n, D]
  std::vector<std::uint32_t> packed(kHeadDim * (kTokens / per_word));  // [D, n / (32/b)]
  std::vector<kvc::f16> scale(kHeadDim * (kTokens / kGroup));          // [D, n / group]
  std::vector<kvc::f16> minimum(kHeadDim * (kTokens / kGroup));        // [D, n / group]
  const auto keys_view = kvc::make_view(keys.data(), {kTokens, kHeadDim});
  const auto packed_view = kvc::make_view(packed.data(), {kHeadDim, kTokens / per_word});
  const auto scale_view = kvc::make_view(scale.data(), {kHeadDim, kTokens / kGroup});
  const auto minimum_view = kvc::make_view(minimum.data(), {kHeadDim, kTokens / kGroup});
  for (auto _ : state) {
    kvc::ops::quantize_keys_per_channel(kvc::Cpu{}, keys_view, bits, kGroup, packed_view,
                                        scale_view, minimum_view);
    benchmark::DoNotOptimize(packed.data());
    benchmark::ClobberMemory();
  }
  // Read the fp32 keys (4*n*D); write the codes (n*D*b/8) and an f16 scale + min per group
  // (2*2*D*n/group).
  const std::int64_t bytes =
      4 * kTokens * kHeadDim + kTokens * kHeadDim * bits / 8 + 4 * kHeadDim * (kTokens / kGroup);
  state.SetBytesProcessed(state.iterations() * bytes);  // reported in binary units (GiB/s)
  state.counters["GB"] =  // decimal GB, shown per second: how bench/RESULTS.md reports bandwidth
      benchmark::Counter(static_cast<double>(state.iterations() * bytes) / 1e9,
                         benchmark::Counter::kIsRate);
  state.counters["bits"] = bits;
}

void quantize_values_per_token(benchmark::State& state) {
  const int bits = static_cast<int>(state.range(0));
  const std::int64_t per_word = kvc::ops::codes_per_word(bits);
  const auto values = normal_values(kTokens * kHeadDim, 2);            // [n, D]
  std::vector<std::uint32_t> packed(kTokens * (kHeadDim / per_word));  // [n, D / (32/b)]
  std::vector<kvc::f16> scale(kTokens * (kHeadDim / kGroup));          // [n, D / group]
  std::vector<kvc::f16> minimum(kTokens * (kHeadDim / kGroup));        // [n, D / group]
  const auto values_view = kvc::make_view(values.data(), {kTokens, kHeadDim});
  const auto packed_view = kvc::make_view(packed.data(), {kTokens, kHeadDim / per_word});
  const auto scale_view = kvc::make_view(scale.data(), {kTokens, kHeadDim / kGroup});
  const auto minimum_view = kvc::make_view(minimum.data(), {kTokens, kHeadDim / kGroup});
  for (auto _ : state) {
    kvc::ops::quantize_values_per_token(kvc::Cpu{}, values_view, bits, kGroup, packed_view,
                                        scale_view, minimum_view);
    benchmark::DoNotOptimize(packed.data());
    benchmark::ClobberMemory();
  }
  // Read the fp32 values (4*n*D); write the codes (n*D*b/8) and an f16 scale + min per group
  // (2*2*n*D/group).
  const std::int64_t bytes =
      4 * kTokens * kHeadDim + kTokens * kHeadDim * bits / 8 + 4 * kTokens * (kHeadDim / kGroup);
  state.SetBytesProcessed(state.iterations() * bytes);  // reported in binary units (GiB/s)
  state.counters["GB"] =  // decimal GB, shown per second: how bench/RESULTS.md reports bandwidth
      benchmark::Counter(static_cast<double>(state.iterations() * bytes) / 1e9,
                         benchmark::Counter::kIsRate);
  state.counters["bits"] = bits;
}

BENCHMARK(quantize_keys_per_channel)->Arg(2)->Arg(4)->Unit(benchmark::kMicrosecond);
BENCHMARK(quantize_values_per_token)->Arg(2)->Arg(4)->Unit(benchmark::kMicrosecond);

}  // namespace
