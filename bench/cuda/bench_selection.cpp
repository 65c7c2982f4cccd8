// SnapKV selection at prefill on the GPU (kvc/ops/selection.hpp), one layer: window scores + GQA
// mean + pooling + top-k + compaction of K and V into a new buffer; and compaction alone against
// the device-to-device copy measured in the same binary.
//
//   build/kvc_cuda_bench --benchmark_filter=snapkv --benchmark_format=json > selection.json
//   python3 bench/compare_torch_selection.py --kvc-json selection.json   # vs SDPA causal prefill
//
// snapkv_selection: Hq 32, Hkv 8, D 128, bf16, window 32, budget 2048 (2016 selected + the window),
// kernel 7, max pooling; counters: total ms and its parts (scores, top-k, compaction), each the
// median of CUDA-event timings of separate runs. compaction: bytes = the kept K and V rows read and
// written (2 * Hkv * C * D * 2 bytes each way); frac_copy = copy time / compaction time on that
// byte count (both credited read + write). Inputs rotate over sets of >= 512 MB so that L2 (50 MB)
// holds none of them.
#include <benchmark/benchmark.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <vector>

#include "bench_support.hpp"
#include "kvc/core/cuda_runtime.hpp"
#include "kvc/core/dtype.hpp"
#include "kvc/ops/selection.hpp"

namespace {

namespace rt = kvc::cuda_runtime;
namespace ops = kvc::ops;
using kvc_bench::bytes_view;

constexpr int kTimedCalls = 20;
constexpr std::int64_t kQHeads = 32, kKvHeads = 8, kHeadDim = 128, kWindow = 32, kBudget = 2048;
constexpr int kKernel = 7;

double median_ms(auto&& call) { return kvc_bench::median_ms(call, kTimedCalls); }

struct Layer {
  std::vector<rt::DeviceBuffer> q, k, v;  // per set: [Hq, W, D], [Hkv, T, D], [Hkv, T, D]
  int sets = 1;
};

Layer make_layer(std::int64_t tokens) {
  Layer layer;
  const std::size_t kv_elements = static_cast<std::size_t>(kKvHeads * tokens * kHeadDim);
  const std::size_t set_bytes = 2 * kv_elements * sizeof(kvc::bf16);
  layer.sets = kvc_bench::rotation_sets(set_bytes);
  for (int s = 0; s < layer.sets; ++s) {
    layer.q.push_back(kvc_bench::xorshift_random_bf16(
        static_cast<std::size_t>(kQHeads * kWindow * kHeadDim), 7 + s));
    layer.k.push_back(kvc_bench::xorshift_random_bf16(kv_elements, 100 + 2 * s));
    layer.v.push_back(kvc_bench::xorshift_random_bf16(kv_elements, 101 + 2 * s));
  }
  return layer;
}

void snapkv_selection(benchmark::State& state) {
  const std::int64_t t = state.range(0), prefix = t - kWindow, selected = kBudget - kWindow;
  Layer layer = make_layer(t);
  rt::DeviceBuffer workspace(ops::snapkv_select_workspace_bytes(
      kQHeads, kWindow, static_cast<int>(t), kKvHeads, static_cast<int>(selected)));
  rt::DeviceBuffer score_workspace(
      ops::snapkv_scores_workspace_bytes(kQHeads, kWindow, static_cast<int>(t), kKvHeads));
  rt::DeviceBuffer topk_workspace(
      ops::top_k_workspace_bytes(kKvHeads, static_cast<int>(prefix), static_cast<int>(selected)));
  rt::DeviceBuffer pooled(static_cast<std::size_t>(kKvHeads * prefix) * sizeof(float));
  rt::DeviceBuffer keep(static_cast<std::size_t>(kKvHeads * kBudget) * sizeof(std::int32_t));
  const std::size_t out_bytes = static_cast<std::size_t>(kKvHeads * kBudget * kHeadDim) * 2;
  rt::DeviceBuffer k_out(out_bytes), v_out(out_bytes);

  const auto q_view = [&](int s) {
    return kvc::make_device_view(layer.q[s].as<const kvc::bf16>(), {kQHeads, kWindow, kHeadDim});
  };
  const auto kv_view = [&](const rt::DeviceBuffer& b) {
    return kvc::make_device_view(b.as<const kvc::bf16>(), {kKvHeads, t, kHeadDim});
  };
  const auto keep_view = kvc::make_device_view(keep.as<std::int32_t>(), {kKvHeads, kBudget});
  auto select = [&](int i) {
    const int s = i % layer.sets;
    ops::snapkv_select(kvc::Cuda{}, q_view(s), kv_view(layer.k[s]), static_cast<int>(selected),
                       kKernel, ops::Pool::max, keep_view, bytes_view(workspace));
  };
  auto compact = [&](int i) {
    const int s = i % layer.sets;
    ops::compact_rows(kvc::Cuda{}, keep_view, {}, kv_view(layer.k[s]), kv_view(layer.v[s]),
                      kvc::make_device_view(k_out.as<kvc::bf16>(), {kKvHeads, kBudget, kHeadDim}),
                      kvc::make_device_view(v_out.as<kvc::bf16>(), {kKvHeads, kBudget, kHeadDim}));
  };
  auto scores = [&](int i) {
    const int s = i % layer.sets;
    ops::snapkv_scores(kvc::Cuda{}, q_view(s), kv_view(layer.k[s]), kKernel, ops::Pool::max,
                       kvc::make_device_view(pooled.as<float>(), {kKvHeads, prefix}),
                       bytes_view(score_workspace));
  };
  auto top = [&](int) {
    ops::top_k(kvc::Cuda{}, kvc::make_device_view(pooled.as<const float>(), {kKvHeads, prefix}),
               static_cast<int>(selected),
               kvc::make_device_view(keep.as<std::int32_t>(), {kKvHeads, selected}),
               bytes_view(topk_workspace));
  };
  const double total_ms = kvc_bench::time_iterations(
      state,
      [&](int i) {
        select(i);
        compact(i);
      },
      kTimedCalls);
  state.counters["ms"] = total_ms;
  state.counters["scores_ms"] = median_ms(scores);
  state.counters["topk_ms"] = median_ms(top);
  select(0);
  state.counters["compact_ms"] = median_ms(compact);
}

void compaction(benchmark::State& state) {
  const std::int64_t t = state.range(0), kept = state.range(1);
  Layer layer = make_layer(t);
  std::vector<std::int32_t> host_keep(static_cast<std::size_t>(kKvHeads * kept));
  for (std::int64_t h = 0; h < kKvHeads; ++h)  // every (t / kept)-th token, shifted per head
    for (std::int64_t i = 0; i < kept; ++i)
      host_keep[h * kept + i] = static_cast<std::int32_t>((i * t) / kept + (h % (t / kept)));
  rt::DeviceBuffer keep(host_keep.size() * sizeof(std::int32_t));
  rt::copy_host_to_device(keep.data(), host_keep.data(), keep.bytes(), kvc::Cuda{});
  const std::size_t kept_bytes = static_cast<std::size_t>(kKvHeads * kept * kHeadDim) * 2;
  rt::DeviceBuffer k_out(kept_bytes), v_out(kept_bytes);
  auto compact = [&](int i) {
    const int s = i % layer.sets;
    ops::compact_rows(
        kvc::Cuda{}, kvc::make_device_view(keep.as<const std::int32_t>(), {kKvHeads, kept}), {},
        kvc::make_device_view(layer.k[s].as<const kvc::bf16>(), {kKvHeads, t, kHeadDim}),
        kvc::make_device_view(layer.v[s].as<const kvc::bf16>(), {kKvHeads, t, kHeadDim}),
        kvc::make_device_view(k_out.as<kvc::bf16>(), {kKvHeads, kept, kHeadDim}),
        kvc::make_device_view(v_out.as<kvc::bf16>(), {kKvHeads, kept, kHeadDim}));
  };
  // The copy: the same K + V byte count, sources rotating likewise.
  const double copy_ms = kvc_bench::copy_ms(layer.k, 2 * kept_bytes, kTimedCalls);
  const double compact_ms = kvc_bench::time_iterations(state, compact, kTimedCalls);
  state.counters["ms"] = compact_ms;
  state.counters["GB_per_s"] = 2.0 * 2 * kept_bytes / (compact_ms / 1e3) / 1e9;
  state.counters["copy_GB_per_s"] = kvc_bench::copy_bytes_per_s(2 * kept_bytes, copy_ms) / 1e9;
  state.counters["frac_copy"] = copy_ms / compact_ms;
}

BENCHMARK(snapkv_selection)
    ->ArgName("T")
    ->Arg(4096)
    ->Arg(16384)
    ->Arg(32768)
    ->Arg(131072)
    ->UseManualTime()
    ->Iterations(1)
    ->Unit(benchmark::kMillisecond);

BENCHMARK(compaction)
    ->ArgNames({"T", "C"})
    ->Args({32768, 2048})
    ->Args({32768, 8192})
    ->Args({32768, 16384})
    ->Args({131072, 65536})
    ->UseManualTime()
    ->Iterations(1)
    ->Unit(benchmark::kMillisecond);

}  // namespace
