// Reference decode attention (fp32, GQA): Hq = 8 query heads over Hkv = 2 KV heads, D = 64.
//
//   build/kvc_cpu_bench --benchmark_filter=decode_attention
#include <benchmark/benchmark.h>

#include <cstdint>
#include <random>
#include <vector>

#include "kvc/core/backend.hpp"
#include "kvc/core/view.hpp"
#include "kvc/ops/attention.hpp"
#include "random_inputs.hpp"

namespace {

constexpr std::int64_t kQueryHeads = 8;
constexpr std::int64_t kKvHeads = 2;
constexpr std::int64_t kHeadDim = 64;

using kvc::bench::normal_values;

void decode_attention(benchmark::State& state) {
  const std::int64_t n = state.range(0);
  const auto q = normal_values(kQueryHeads * kHeadDim, 1);   // [Hq, D]
  const auto k = normal_values(kKvHeads * n * kHeadDim, 2);  // [Hkv, n, D]
  const auto v = normal_values(kKvHeads * n * kHeadDim, 3);  // [Hkv, n, D]
  std::vector<float> out(kQueryHeads * kHeadDim);            // [Hq, D]
  const auto q_view = kvc::make_view(q.data(), {kQueryHeads, kHeadDim});
  const auto k_view = kvc::make_view(k.data(), {kKvHeads, n, kHeadDim});
  const auto v_view = kvc::make_view(v.data(), {kKvHeads, n, kHeadDim});
  const auto out_view = kvc::make_view(out.data(), {kQueryHeads, kHeadDim});
  for (auto _ : state) {
    kvc::ops::decode_attention(kvc::Cpu{}, q_view, k_view, v_view, out_view);
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
  }
  // Compulsory traffic, fp32: read q (Hq*D) + K and V once each (2*Hkv*n*D), write out (Hq*D).
  const std::int64_t bytes =
      4 * (kQueryHeads * kHeadDim + 2 * kKvHeads * n * kHeadDim + kQueryHeads * kHeadDim);
  state.SetBytesProcessed(state.iterations() * bytes);  // reported in binary units (GiB/s)
  state.counters["GB"] =  // decimal GB, shown per second: how bench/RESULTS.md reports bandwidth
      benchmark::Counter(static_cast<double>(state.iterations() * bytes) / 1e9,
                         benchmark::Counter::kIsRate);
  state.counters["n"] = static_cast<double>(n);
}

BENCHMARK(decode_attention)->Arg(512)->Arg(2048)->Arg(8192)->Unit(benchmark::kMicrosecond);

}  // namespace
