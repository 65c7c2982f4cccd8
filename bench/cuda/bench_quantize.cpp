// Quantize + pack on the GPU (kvc/ops/quantize_cuda.hpp): one tensor (K or V) of a layer's
// prefill, bf16 [B, Hkv, T, D], into each cache format, against the device-to-device copy measured
// in the same binary; and the KIVI decode-time flushes.
//
//   build/kvc_cuda_bench --benchmark_filter=quantize
//
// Bytes counted (compulsory traffic): the input read once (B * Hkv * T * D * 2) + everything
// written: codes (T * D * bits / 8 per head) and parameters (2 or 4 bytes each; KIVI channel axis
// 2 * D per block of G tokens, token axis 2 * D / G per token). frac_copy = (bytes / time) /
// (2 * N / copy time), the copy moving N = the input's bytes and credited read + write. FP8 with
// computed scales reads the input twice (max|x| per head, then the encoding: vLLM's
// calculate_kv_scales needs the maximum before the first code) and is still credited one read.
// Times: CUDA events around each call, median of 20; the 512 MB input is larger than L2 (50 MB).
#include <benchmark/benchmark.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <vector>

#include "bench_support.hpp"
#include "kvc/core/cuda_runtime.hpp"
#include "kvc/core/dtype.hpp"
#include "kvc/ops/quantize_cuda.hpp"

namespace {

namespace rt = kvc::cuda_runtime;
namespace ops = kvc::ops;
using I64 = std::int64_t;
using kvc_bench::xorshift_random_bf16;

constexpr int kTimedCalls = 20;
constexpr I64 kHeadDim = 128;

double median_ms(auto&& call) { return kvc_bench::median_ms(call, kTimedCalls); }

enum Format : int {
  kKiviKeys2,
  kKiviKeys4,
  kKiviValues2,
  kKiviValues4,
  kInt8,
  kInt4,
  kInt4Group32,
  kFp8Static,
  kFp8Computed
};

// Args: format, B, Hkv, T. D = 128.
void quantize(benchmark::State& state) {
  const auto format = static_cast<Format>(state.range(0));
  const I64 b = state.range(1), h = state.range(2), t = state.range(3), d = kHeadDim;
  const I64 elements = b * h * t * d;
  auto input = xorshift_random_bf16(static_cast<std::size_t>(elements), 5);
  const auto x = kvc::make_device_view(input.as<const kvc::bf16>(), {b, h, t, d});
  const double copy_ms = kvc_bench::copy_ms({&input, 1}, input.bytes(), kTimedCalls);

  std::vector<rt::DeviceBuffer> buffers;
  buffers.reserve(4);  // references to the elements stay valid
  auto allocate = [&](I64 bytes) -> rt::DeviceBuffer& {
    buffers.emplace_back(static_cast<std::size_t>(bytes));
    return buffers.back();
  };
  I64 written = 0;
  std::function<void()> call;
  if (format <= kKiviKeys4) {
    const int bits = format == kKiviKeys2 ? 2 : 4, group = 32, words = group * bits / 32;
    const I64 blocks = t / group;
    auto& codes = allocate(b * h * blocks * d * words * 4);
    auto& scale = allocate(b * h * blocks * d * 2);
    auto& minimum = allocate(b * h * blocks * d * 2);
    written = codes.bytes() + scale.bytes() + minimum.bytes();
    const ops::ChannelBlocks out{
        kvc::make_device_view(codes.as<std::uint32_t>(), {b, h, blocks, d, I64{words}}),
        ops::device_params(kvc::make_device_view(scale.as<kvc::f16>(), {b, h, blocks, d})),
        ops::device_params(kvc::make_device_view(minimum.as<kvc::f16>(), {b, h, blocks, d}))};
    call = [=] { ops::quantize_channel_blocks(kvc::Cuda{}, x, {bits, group}, out); };
  } else if (format <= kInt4Group32) {
    ops::QuantSpec spec;
    if (format == kKiviValues2 || format == kKiviValues4)
      spec = {format == kKiviValues2 ? 2 : 4, 32, false, ops::ParamDType::f16};
    else if (format == kInt8)
      spec = {8, static_cast<int>(d), true, ops::ParamDType::f16};
    else if (format == kInt4)
      spec = {4, static_cast<int>(d), true, ops::ParamDType::f16};
    else
      spec = {4, 32, false, ops::ParamDType::f16};
    const I64 words = d * spec.bits / 32, groups = d / spec.group;
    auto& codes = allocate(b * h * t * words * 4);
    auto& scale = allocate(b * h * t * groups * 2);
    auto& minimum = allocate(spec.symmetric ? 2 : b * h * t * groups * 2);
    written = codes.bytes() + scale.bytes() + (spec.symmetric ? 0 : minimum.bytes());
    const ops::TokenRows out{
        kvc::make_device_view(codes.as<std::uint32_t>(), {b, h, t, words}),
        ops::device_params(kvc::make_device_view(scale.as<kvc::f16>(), {b, h, t, groups})),
        spec.symmetric
            ? ops::DeviceParams{}
            : ops::device_params(kvc::make_device_view(minimum.as<kvc::f16>(), {b, h, t, groups}))};
    call = [=] { ops::quantize_token_rows(kvc::Cuda{}, x, spec, out); };
  } else {
    auto& codes = allocate(elements);
    auto& scale = allocate(b * h * 4);
    std::vector<float> fixed(static_cast<std::size_t>(b * h), 0.01f);
    rt::copy_host_to_device(scale.data(), fixed.data(), scale.bytes(), kvc::Cuda{});
    const auto codes_view = kvc::make_device_view(codes.as<std::uint8_t>(), {b, h, t, d});
    const auto scale_view = kvc::make_device_view(scale.as<float>(), {b, h});
    written = codes.bytes() + (format == kFp8Computed ? scale.bytes() : 0);
    const bool computed = format == kFp8Computed;
    call = [=] {
      if (computed)
        ops::fp8_scales(kvc::Cuda{}, x, ops::Fp8Kind::e4m3, ops::Fp8ScaleScope::head, scale_view);
      ops::quantize_fp8(kvc::Cuda{}, x, scale_view, ops::Fp8Kind::e4m3, codes_view);
    };
  }
  const double ms = kvc_bench::time_iterations(state, call, kTimedCalls);
  const double bytes = static_cast<double>(input.bytes() + written);
  state.counters["ms"] = ms;
  state.counters["GB_per_s"] = bytes / (ms / 1e3) / 1e9;
  state.counters["copy_GB_per_s"] = kvc_bench::copy_bytes_per_s(input.bytes(), copy_ms) / 1e9;
  state.counters["frac_copy"] = state.counters["GB_per_s"] / state.counters["copy_GB_per_s"];
}

// One decode step's KIVI flushes with every head flushing (the worst step): keys per channel
// (R = 128 residual rows -> 4 blocks of 32) and values per token (the oldest of R + 1 rows,
// then the window moves up by one row). Counts are restored before each call (a 2 x 256-byte
// copy, included in the time).
void kivi_flush(benchmark::State& state) {
  const I64 b = state.range(0), h = state.range(1), r = 128, d = kHeadDim, group = 32;
  const I64 capacity_blocks = 1024, capacity_rows = 32768;
  rt::DeviceBuffer residual =
      xorshift_random_bf16(static_cast<std::size_t>(b * h * r * d), 9);  // as f16
  rt::DeviceBuffer window = xorshift_random_bf16(static_cast<std::size_t>(b * h * (r + 1) * d), 10);
  rt::DeviceBuffer key_codes(static_cast<std::size_t>(b * h * capacity_blocks * d * 2 * 4));
  rt::DeviceBuffer key_scale(static_cast<std::size_t>(b * h * capacity_blocks * d * 2));
  rt::DeviceBuffer key_min(key_scale.bytes());
  rt::DeviceBuffer value_codes(static_cast<std::size_t>(b * h * capacity_rows * d / 16 * 4));
  rt::DeviceBuffer value_scale(static_cast<std::size_t>(b * h * capacity_rows * d / group * 2));
  rt::DeviceBuffer value_min(value_scale.bytes());
  std::vector<std::int32_t> initial;
  for (I64 i = 0; i < b * h; ++i) initial.push_back(static_cast<std::int32_t>(r));      // key rows
  for (I64 i = 0; i < b * h; ++i) initial.push_back(static_cast<std::int32_t>(4096));   // quantized
  for (I64 i = 0; i < b * h; ++i) initial.push_back(static_cast<std::int32_t>(r + 1));  // window
  for (I64 i = 0; i < b * h; ++i) initial.push_back(static_cast<std::int32_t>(4096));   // quantized
  rt::DeviceBuffer counts_init(initial.size() * 4), counts(initial.size() * 4);
  rt::copy_host_to_device(counts_init.data(), initial.data(), counts_init.bytes(), kvc::Cuda{});
  auto count_view = [&](int i) {
    return kvc::make_device_view(counts.as<std::int32_t>() + i * b * h, {b, h});
  };
  const ops::ChannelBlocks key_out{
      kvc::make_device_view(key_codes.as<std::uint32_t>(), {b, h, capacity_blocks, d, I64{2}}),
      ops::device_params(
          kvc::make_device_view(key_scale.as<kvc::f16>(), {b, h, capacity_blocks, d})),
      ops::device_params(
          kvc::make_device_view(key_min.as<kvc::f16>(), {b, h, capacity_blocks, d}))};
  const ops::TokenRows value_out{
      kvc::make_device_view(value_codes.as<std::uint32_t>(), {b, h, capacity_rows, d / 16}),
      ops::device_params(
          kvc::make_device_view(value_scale.as<kvc::f16>(), {b, h, capacity_rows, d / group})),
      ops::device_params(
          kvc::make_device_view(value_min.as<kvc::f16>(), {b, h, capacity_rows, d / group}))};
  const auto residual_view = kvc::make_device_view(residual.as<const kvc::f16>(), {b, h, r, d});
  const auto window_view = kvc::make_device_view(window.as<kvc::f16>(), {b, h, r + 1, d});
  const ops::QuantSpec spec{2, static_cast<int>(group)};
  auto reset = [&] {
    rt::copy_device_to_device(counts.data(), counts_init.data(), counts.bytes(), kvc::Cuda{});
  };
  auto keys = [&] {
    reset();
    ops::flush_channel_residual(kvc::Cuda{}, residual_view, spec, key_out, count_view(0),
                                count_view(1));
  };
  auto values = [&] {
    reset();
    ops::flush_token_window(kvc::Cuda{}, window_view, static_cast<int>(r), spec, value_out,
                            count_view(2), count_view(3));
  };
  const double reset_ms = median_ms(reset);
  const double key_ms = kvc_bench::time_iterations(state, keys, kTimedCalls);
  state.counters["key_flush_us"] = key_ms * 1e3;
  state.counters["value_flush_us"] = median_ms(values) * 1e3;
  state.counters["count_reset_us"] = reset_ms * 1e3;
}

BENCHMARK(quantize)
    ->ArgNames({"format", "B", "Hkv", "T"})
    ->Args({kKiviKeys2, 8, 8, 32768})
    ->Args({kKiviKeys4, 8, 8, 32768})
    ->Args({kKiviValues2, 8, 8, 32768})
    ->Args({kKiviValues4, 8, 8, 32768})
    ->Args({kInt8, 8, 8, 32768})
    ->Args({kInt4, 8, 8, 32768})
    ->Args({kInt4Group32, 8, 8, 32768})
    ->Args({kFp8Static, 8, 8, 32768})
    ->Args({kFp8Computed, 8, 8, 32768})
    ->Args({kKiviKeys2, 1, 8, 4096})
    ->Args({kKiviValues2, 1, 8, 4096})
    ->Args({kInt8, 1, 8, 4096})
    ->Args({kKiviKeys2, 1, 8, 131072})
    ->Args({kKiviValues2, 1, 8, 131072})
    ->Args({kKiviKeys2, 32, 8, 4096})
    ->Args({kKiviValues2, 32, 8, 4096})
    ->UseManualTime()
    ->Iterations(1)
    ->Unit(benchmark::kMillisecond);

BENCHMARK(kivi_flush)
    ->ArgNames({"B", "Hkv"})
    ->Args({8, 8})
    ->Args({1, 8})
    ->UseManualTime()
    ->Iterations(1)
    ->Unit(benchmark::kMicrosecond);

}  // namespace
