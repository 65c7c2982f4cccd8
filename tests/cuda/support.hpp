// tests/cuda/support.hpp: helpers shared by the CUDA tests: host <-> device transfers, poisoned
// output buffers, the bundled real dump's path, and random dense attention inputs.
//
//   auto q = kvc::test::upload(host_q);                     // a DeviceBuffer holding host_q
//   auto out = kvc::test::poisoned(bytes);                  // 0xFF bytes: NaN in bf16, f16, f32
//   auto got = kvc::test::download<float>(out, count);      // synchronizes
//   const kvc::KvDump dump = kvc::load_dump(kvc::test::dump_path());
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <random>
#include <vector>

#include "kvc/core/cuda_runtime.hpp"
#include "kvc/core/view.hpp"

namespace kvc::test {

// A device copy of `x` (at least one byte, so that an empty vector still has a valid pointer).
template <class T>
kvc::cuda_runtime::DeviceBuffer upload(const std::vector<T>& x) {
  kvc::cuda_runtime::DeviceBuffer buffer(std::max<std::size_t>(x.size(), 1) * sizeof(T));
  if (!x.empty())
    kvc::cuda_runtime::copy_host_to_device(buffer.data(), x.data(), x.size() * sizeof(T),
                                           kvc::Cuda{});
  return buffer;
}

// The first `count` elements of `buffer`, after the default stream has finished.
template <class T>
std::vector<T> download(const kvc::cuda_runtime::DeviceBuffer& buffer, std::size_t count) {
  std::vector<T> x(count);
  kvc::cuda_runtime::copy_device_to_host(x.data(), buffer.data(), count * sizeof(T), kvc::Cuda{});
  kvc::cuda_runtime::synchronize(kvc::Cuda{});
  return x;
}

// A buffer of `bytes` (at least one) filled with `value`, so that what an op leaves unwritten
// shows (0xFF: NaN in bf16, f16 and f32).
inline kvc::cuda_runtime::DeviceBuffer poisoned(std::size_t bytes, unsigned char value = 0xFF) {
  kvc::cuda_runtime::DeviceBuffer buffer(std::max<std::size_t>(bytes, 1));
  kvc::cuda_runtime::fill_bytes(buffer.data(), value, buffer.bytes(), kvc::Cuda{});
  return buffer;
}

inline kvc::DeviceView<std::byte, 1> bytes_view(const kvc::cuda_runtime::DeviceBuffer& buffer) {
  return kvc::make_device_view(buffer.as<std::byte>(), {static_cast<std::int64_t>(buffer.bytes())});
}

// tests/data/seq0. The binary may run on another machine from the repository root: the configured
// path first, then the relative one.
inline std::filesystem::path dump_path() {
  std::filesystem::path data = std::filesystem::path(KVC_TEST_DATA_DIR) / "seq0";
  if (!std::filesystem::exists(data)) data = "tests/data/seq0";
  return data;
}

// Dense decode attention inputs as the model dtype holds them.
template <class Storage>
struct HostInputs {
  std::vector<Storage> q, k, v;  // [B, Hq, D], [B, Hkv, Tmax, D], [B, Hkv, Tmax, D]
};

// Standard normal q (times q_scale) and k, and v of standard deviation 2, in that order from one
// std::mt19937(seed); `shape` has batch, q_heads, kv_heads, head_dim and max_length.
template <class Storage, class Shape>
HostInputs<Storage> random_inputs(const Shape& shape, std::uint32_t seed, float q_scale = 1.0f) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> gaussian(0.0f, 1.0f);
  HostInputs<Storage> in;
  in.q.resize(static_cast<std::size_t>(shape.batch) * shape.q_heads * shape.head_dim);
  in.k.resize(static_cast<std::size_t>(shape.batch) * shape.kv_heads * shape.max_length *
              shape.head_dim);
  in.v.resize(in.k.size());
  for (auto& x : in.q) x = Storage(gaussian(rng) * q_scale);
  for (auto& x : in.k) x = Storage(gaussian(rng));
  for (auto& x : in.v) x = Storage(gaussian(rng) * 2.0f);
  return in;
}

}  // namespace kvc::test
