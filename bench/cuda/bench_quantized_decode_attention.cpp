// Decode attention over quantized caches on the GPU (KIVI-2/4, per-token INT8/INT4, FP8 E4M3): time
// relative to kvc's dense bf16 kernel on the same shape, measured in the same run, and achieved
// bandwidth on the bytes really read as a fraction of kvc's device-to-device copy.
//
//   build/kvc_cuda_bench --benchmark_filter=quantized_decode_attention
//
// Bytes read per (sequence, KV head) with n tokens (docs/formats.md; q and out left out):
//   KIVI (G = 32, f16 parameters; qk = n - 64 quantized keys, qv = n - 128 quantized values):
//     qk D b/8 + 4 D qk/G  +  qv D b/8 + 4 qv D/G  +  2 D (n - qk) + 2 D (n - qv)
//   INT8 / INT4 (symmetric, one f16 scale per token and tensor, no window): 2 (n D b/8 + 2 n)
//   FP8: 2 n D (+ 8 bytes of scales)
// ratio_vs_dense = time / dense bf16 time (K + V = 4 n D bytes); frac_copy = (bytes / time) /
// (copy bandwidth, read + write, on the same byte count). Inputs rotate over >= 512 MB so the
// 50 MB L2 holds none of them; codes are random bytes (finite for FP8), parameters random f16 in
// [1/256, 1/64]. Times: CUDA events, median of 30 calls after 3 warm-up calls, each behind an
// untimed call (kvc_bench::median_ms).
#include <benchmark/benchmark.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <map>
#include <random>
#include <tuple>
#include <utility>
#include <vector>

#include "bench_support.hpp"
#include "kvc/core/cuda_runtime.hpp"
#include "kvc/core/dtype.hpp"
#include "kvc/ops/attention.hpp"
#include "kvc/ops/quantized_attention.hpp"

namespace {

namespace rt = kvc::cuda_runtime;
using kvc::MemorySpace;

constexpr int kTimedCalls = 30;
constexpr std::size_t kPoolBytes = 64ull << 20;

enum Format { kKivi2, kKivi4, kInt8, kInt4, kFp8 };
const char* format_name(int f) {
  static const char* names[] = {"kivi2", "kivi4", "int8", "int4", "fp8_e4m3"};
  return names[f];
}

// Host pools copied over and over into device buffers: content does not matter for timing, only
// that it is finite.
const std::vector<unsigned char>& byte_pool() {  // random bytes; no FP8 E4M3 NaN (S.1111.111)
  static const std::vector<unsigned char> pool = [] {
    std::vector<unsigned char> p(kPoolBytes);
    std::mt19937_64 rng(7);
    for (std::size_t i = 0; i < p.size(); i += 8) {
      const std::uint64_t x = rng() & 0xF7F7F7F7F7F7F7F7ull;  // exponent top bit cleared
      std::memcpy(p.data() + i, &x, 8);
    }
    return p;
  }();
  return pool;
}
const std::vector<unsigned char>& half_pool() {  // f16 values in [1/256, 1/64]
  static const std::vector<unsigned char> pool = [] {
    std::vector<kvc::f16> h(kPoolBytes / 2);
    std::mt19937 rng(9);
    std::uniform_real_distribution<float> u(1.0f / 256, 1.0f / 64);
    for (auto& x : h) x = kvc::f16(u(rng));
    std::vector<unsigned char> p(kPoolBytes);
    std::memcpy(p.data(), h.data(), p.size());
    return p;
  }();
  return pool;
}

rt::DeviceBuffer filled(std::size_t bytes, const std::vector<unsigned char>& pool) {
  bytes = std::max<std::size_t>(16, (bytes + 15) / 16 * 16);
  rt::DeviceBuffer buffer(bytes);
  for (std::size_t at = 0; at < bytes; at += pool.size())
    rt::copy_host_to_device(buffer.as<unsigned char>() + at, pool.data(),
                            std::min(pool.size(), bytes - at), kvc::Cuda{});
  rt::synchronize(kvc::Cuda{});
  return buffer;
}

template <class F>
double median_ms(F&& call) {
  return kvc_bench::median_ms(std::forward<F>(call), kTimedCalls);
}
int sets_for(std::size_t bytes) { return kvc_bench::rotation_sets(bytes); }

// kvc's dense bf16 decode attention on the same shape (cached per shape within the run).
double dense_ms(std::int64_t batch, std::int64_t q_heads, std::int64_t kv_heads, std::int64_t d,
                std::int64_t t) {
  static std::map<std::tuple<std::int64_t, std::int64_t, std::int64_t, std::int64_t, std::int64_t>,
                  double>
      cache;
  const auto key = std::make_tuple(batch, q_heads, kv_heads, d, t);
  if (auto it = cache.find(key); it != cache.end()) return it->second;
  const std::size_t kv_bytes = static_cast<std::size_t>(batch * kv_heads * t * d) * 2;
  const int sets = sets_for(2 * kv_bytes);
  std::vector<rt::DeviceBuffer> keys, values;
  for (int s = 0; s < sets; ++s) {
    keys.push_back(filled(kv_bytes, half_pool()));
    values.push_back(filled(kv_bytes, half_pool()));
  }
  auto q = filled(static_cast<std::size_t>(batch * q_heads * d) * 2, half_pool());
  rt::DeviceBuffer out(static_cast<std::size_t>(batch * q_heads * d) * 2);
  std::vector<std::int32_t> host_lengths(batch, static_cast<std::int32_t>(t));
  rt::DeviceBuffer lengths(host_lengths.size() * 4);
  rt::copy_host_to_device(lengths.data(), host_lengths.data(), lengths.bytes(), kvc::Cuda{});
  const std::size_t ws = kvc::ops::decode_attention_workspace_floats(
      static_cast<int>(batch), static_cast<int>(q_heads), static_cast<int>(kv_heads),
      static_cast<int>(d), static_cast<int>(t));
  rt::DeviceBuffer workspace(std::max<std::size_t>(ws, 1) * 4);
  const double ms = median_ms([&](int i) {
    const int s = i % sets;
    kvc::ops::decode_attention(
        kvc::Cuda{}, kvc::make_device_view(q.as<const kvc::bf16>(), {batch, q_heads, d}),
        kvc::make_device_view(keys[s].as<const kvc::bf16>(), {batch, kv_heads, t, d}),
        kvc::make_device_view(values[s].as<const kvc::bf16>(), {batch, kv_heads, t, d}),
        kvc::make_device_view(lengths.as<const std::int32_t>(), {batch}),
        kvc::make_device_view(out.as<kvc::bf16>(), {batch, q_heads, d}),
        kvc::make_device_view(workspace.as<float>(), {static_cast<std::int64_t>(ws)}));
  });
  cache[key] = ms;
  return ms;
}

// The device buffers of one cache set, each part [B, Hkv, slot] with the slot sizes below.
struct CacheSet {
  std::vector<rt::DeviceBuffer> parts;
  const void* at(int i) const { return parts[i].data(); }
};

void quantized_decode_attention(benchmark::State& state) {
  const int format = static_cast<int>(state.range(0));
  const std::int64_t batch = state.range(1), q_heads = state.range(2), kv_heads = state.range(3),
                     d = state.range(4), t = state.range(5);
  state.SetLabel(format_name(format));
  const std::int64_t pairs = batch * kv_heads, group = 32;
  const bool kivi = format == kKivi2 || format == kKivi4;
  const int bits = format == kKivi2 ? 2 : (format == kKivi4 || format == kInt4) ? 4 : 8;
  const std::int64_t qk = kivi ? t - 64 : t, qv = kivi ? t - 128 : t;
  // Slot sizes in bytes per (sequence, KV head), part by part.
  std::vector<std::int64_t> slots;
  if (kivi)  // key codes, key scale, key min, key residual, value codes, value scale, min, residual
    slots = {qk * d * bits / 8, qk / group * d * 2,   qk / group * d * 2,   (t - qk) * d * 2,
             qv * d * bits / 8, qv * (d / group) * 2, qv * (d / group) * 2, (t - qv) * d * 2};
  else if (format == kFp8)
    slots = {t * d, t * d};
  else  // key codes, value codes, key scale, value scale
    slots = {t * d * bits / 8, t * d * bits / 8, t * 2, t * 2};
  std::size_t bytes_read = 0;
  for (auto s : slots) bytes_read += static_cast<std::size_t>(s * pairs);
  if (format == kFp8) bytes_read += 8 * static_cast<std::size_t>(pairs);
  const int sets = sets_for(bytes_read);
  std::vector<CacheSet> caches(sets);
  for (auto& c : caches)
    for (std::size_t i = 0; i < slots.size(); ++i) {
      const bool param =
          kivi ? (i % 4 == 1 || i % 4 == 2 || i % 4 == 3) : (format != kFp8 && i >= 2);
      c.parts.push_back(
          filled(static_cast<std::size_t>(slots[i] * pairs), param ? half_pool() : byte_pool()));
    }
  auto counts = [&](std::int64_t value) {
    std::vector<std::int32_t> host(pairs, static_cast<std::int32_t>(value));
    rt::DeviceBuffer buffer(host.size() * 4);
    rt::copy_host_to_device(buffer.data(), host.data(), buffer.bytes(), kvc::Cuda{});
    return buffer;
  };
  auto lengths = counts(t), quantized_keys = counts(qk), quantized_values = counts(qv);
  std::vector<float> host_scales(pairs, 0.01f);
  rt::DeviceBuffer scales(host_scales.size() * 4);
  rt::copy_host_to_device(scales.data(), host_scales.data(), scales.bytes(), kvc::Cuda{});
  auto q = filled(static_cast<std::size_t>(batch * q_heads * d) * 2, half_pool());
  rt::DeviceBuffer out(static_cast<std::size_t>(batch * q_heads * d) * 2);
  const std::size_t ws = kvc::ops::quantized_decode_attention_workspace_floats(
      static_cast<int>(batch), static_cast<int>(q_heads), static_cast<int>(kv_heads),
      static_cast<int>(d), static_cast<int>(t));
  rt::DeviceBuffer workspace(std::max<std::size_t>(ws, 1) * 4);
  const auto qv_view = kvc::make_device_view(q.as<const kvc::bf16>(), {batch, q_heads, d});
  const auto out_view = kvc::make_device_view(out.as<kvc::bf16>(), {batch, q_heads, d});
  const auto ws_view =
      kvc::make_device_view(workspace.as<float>(), {static_cast<std::int64_t>(ws)});
  const auto count_view = [&](const rt::DeviceBuffer& b) {
    return kvc::make_device_view(b.as<const std::int32_t>(), {batch, kv_heads});
  };
  auto part = [&](const CacheSet& c, int i, int element_bytes) {
    const std::int64_t slot = slots[i] / element_bytes;
    return std::make_tuple(c.at(i), kv_heads * slot, slot);
  };

  auto attend = [&](int i) {
    const CacheSet& c = caches[i % sets];
    if (kivi) {
      kvc::ops::KiviCache<MemorySpace::Device> cache;
      cache.bits = bits;
      cache.group = static_cast<int>(group);
      auto set_u32 = [&](kvc::ops::CachePart<const std::uint32_t>& p, int idx) {
        auto [data, b, h] = part(c, idx, 4);
        p = {static_cast<const std::uint32_t*>(data), b, h};
      };
      auto set_f16 = [&](kvc::ops::CachePart<const kvc::f16>& p, int idx) {
        auto [data, b, h] = part(c, idx, 2);
        p = {static_cast<const kvc::f16*>(data), b, h};
      };
      set_u32(cache.key_codes, 0), set_f16(cache.key_scale, 1), set_f16(cache.key_minimum, 2);
      set_f16(cache.key_residual, 3), set_u32(cache.value_codes, 4);
      set_f16(cache.value_scale, 5), set_f16(cache.value_minimum, 6);
      set_f16(cache.value_residual, 7);
      cache.lengths = count_view(lengths);
      cache.quantized_keys = count_view(quantized_keys);
      cache.quantized_values = count_view(quantized_values);
      cache.max_length = static_cast<int>(t);
      kvc::ops::decode_attention(kvc::Cuda{}, qv_view, cache, out_view, ws_view);
    } else if (format == kFp8) {
      kvc::ops::Fp8Cache<MemorySpace::Device> cache;
      auto set_u8 = [&](kvc::ops::CachePart<const std::uint8_t>& p, int idx) {
        auto [data, b, h] = part(c, idx, 1);
        p = {static_cast<const std::uint8_t*>(data), b, h};
      };
      set_u8(cache.key_codes, 0), set_u8(cache.value_codes, 1);
      cache.key_scale = cache.value_scale =
          kvc::make_device_view(scales.as<const float>(), {batch, kv_heads});
      cache.lengths = count_view(lengths);
      cache.max_length = static_cast<int>(t);
      kvc::ops::decode_attention(kvc::Cuda{}, qv_view, cache, out_view, ws_view);
    } else {
      kvc::ops::IntCache<MemorySpace::Device> cache;
      cache.bits = bits;
      cache.group = 0;
      cache.symmetric = true;
      auto set_u32 = [&](kvc::ops::CachePart<const std::uint32_t>& p, int idx) {
        auto [data, b, h] = part(c, idx, 4);
        p = {static_cast<const std::uint32_t*>(data), b, h};
      };
      auto set_raw = [&](kvc::ops::CachePart<const void>& p, int idx) {
        auto [data, b, h] = part(c, idx, 2);
        p = {data, b, h};
      };
      set_u32(cache.key_codes, 0), set_u32(cache.value_codes, 1);
      set_raw(cache.key_scale, 2), set_raw(cache.value_scale, 3);
      cache.key_window = cache.value_window = {static_cast<const kvc::f16*>(c.at(0)), 0, 0};
      cache.lengths = count_view(lengths);
      cache.quantized = count_view(lengths);
      cache.max_length = static_cast<int>(t);
      kvc::ops::decode_attention(kvc::Cuda{}, qv_view, cache, out_view, ws_view);
    }
  };
  const rt::DeviceBuffer copy_source[] = {filled(bytes_read, byte_pool())};
  const double copy_ms = kvc_bench::copy_ms(copy_source, bytes_read, kTimedCalls);
  const double dense = dense_ms(batch, q_heads, kv_heads, d, t);
  const double ms = kvc_bench::time_iterations(state, attend, kTimedCalls);
  const double dense_bytes = 4.0 * static_cast<double>(batch * kv_heads * t * d);
  const double bandwidth = bytes_read / (ms / 1e3),
               copy_bandwidth = kvc_bench::copy_bytes_per_s(bytes_read, copy_ms);
  state.counters["ms"] = ms;
  state.counters["dense_ms"] = dense;
  state.counters["ratio_vs_dense"] = ms / dense;
  state.counters["bytes_vs_dense"] = bytes_read / dense_bytes;
  state.counters["GB_per_s"] = bandwidth / 1e9;
  state.counters["frac_copy"] = bandwidth / copy_bandwidth;
}

void quantized_shapes(benchmark::internal::Benchmark* b) {
  // format, batch, Hq, Hkv, D, context: the headline (8, 32, 8, 128, 32768), 4K and 128K, then
  // batch 1 and 32 at 32K.
  for (std::int64_t context : {32768, 4096, 131072})
    for (int format : {kKivi2, kKivi4, kInt8, kInt4, kFp8})
      b->Args({format, 8, 32, 8, 128, context});
  for (std::int64_t batch : {1, 32})
    for (int format : {kKivi2, kKivi4, kInt8, kInt4, kFp8})
      b->Args({format, batch, 32, 8, 128, 32768});
}

BENCHMARK(quantized_decode_attention)
    ->Apply(quantized_shapes)
    ->UseManualTime()
    ->Iterations(1)
    ->Unit(benchmark::kMillisecond);

}  // namespace
