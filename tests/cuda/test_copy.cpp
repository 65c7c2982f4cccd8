// Device-to-device copies (kvc's copy kernel and cudaMemcpyAsync) against the source, byte for
// byte: odd lengths, unaligned and mismatched offsets, a poisoned destination whose guard bytes
// around the copied range must survive. Also checks that a failing CUDA call throws kvc::Error
// naming it.
#include <catch2/catch.hpp>
#include <cstddef>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "kvc/core/cuda_runtime.hpp"
#include "kvc/core/error.hpp"

namespace {

namespace rt = kvc::cuda_runtime;

constexpr unsigned char kPoison = 0xA5;
constexpr std::size_t kGuard = 64;  // bytes on each side of the destination range

// Deterministic bytes that never equal the poison, so an unwritten byte cannot pass.
std::vector<unsigned char> source_pattern(std::size_t bytes, std::uint64_t seed) {
  std::vector<unsigned char> out(bytes);
  std::uint64_t state = seed;
  for (auto& byte : out) {
    state += 0x9E3779B97F4A7C15ull;  // splitmix64
    std::uint64_t z = state;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    byte = static_cast<unsigned char>(z ^ (z >> 31));
    if (byte == kPoison) byte = 0x5A;
  }
  return out;
}

enum class CopyPath { kernel, memcpy };

void copy(CopyPath path, void* dst, const void* src, std::size_t bytes, kvc::Cuda stream) {
  if (path == CopyPath::kernel) {
    rt::copy_device_to_device(dst, src, bytes, stream);
  } else {
    rt::memcpy_device_to_device(dst, src, bytes, stream);
  }
}

// Copies `bytes` from src + src_offset to dst + dst_offset and checks every byte of the destination
// buffer: the copied range equals the source, the guards keep the poison.
void check_copy(CopyPath path, std::size_t bytes, std::size_t src_offset, std::size_t dst_offset,
                kvc::Cuda stream) {
  const std::size_t src_size = src_offset + bytes;
  const std::size_t dst_size = dst_offset + kGuard + bytes + kGuard;
  const auto source = source_pattern(src_size, bytes * 131 + src_offset);
  rt::DeviceBuffer src(src_size);
  rt::DeviceBuffer dst(dst_size);
  rt::copy_host_to_device(src.data(), source.data(), src_size, stream);
  rt::fill_bytes(dst.data(), kPoison, dst_size, stream);

  unsigned char* dst_begin = dst.as<unsigned char>() + dst_offset + kGuard;
  copy(path, dst_begin, src.as<unsigned char>() + src_offset, bytes, stream);
  std::vector<unsigned char> result(dst_size, 0);
  rt::copy_device_to_host(result.data(), dst.data(), dst_size, stream);
  rt::synchronize(stream);

  const std::size_t begin = dst_offset + kGuard;
  std::size_t mismatches = 0;
  std::size_t first_bad = dst_size;
  for (std::size_t i = 0; i < dst_size; ++i) {
    const bool inside = i >= begin && i < begin + bytes;
    const unsigned char want = inside ? source[src_offset + (i - begin)] : kPoison;
    if (result[i] != want) {
      if (mismatches == 0) first_bad = i;
      ++mismatches;
    }
  }
  std::string first_wrong = "none";
  if (mismatches != 0) {
    const bool inside = first_bad >= begin && first_bad < begin + bytes;
    const unsigned want = inside ? source[src_offset + (first_bad - begin)] : kPoison;
    first_wrong = "destination index " + std::to_string(first_bad) +
                  (inside ? " (copied range)" : " (guard)") + ": got " +
                  std::to_string(unsigned{result[first_bad]}) + ", want " + std::to_string(want);
  }
  INFO((path == CopyPath::kernel ? "copy_device_to_device" : "cudaMemcpyAsync")
       << ", bytes " << bytes << ", src offset " << src_offset << ", dst offset " << dst_offset
       << ": " << mismatches << " wrong bytes; first wrong byte: " << first_wrong);
  CHECK(mismatches == 0);
}

}  // namespace

TEST_CASE("device-to-device copies match the source byte for byte", "[cuda][copy]") {
  const kvc::Cuda stream = rt::create_stream();
  const std::size_t lengths[] = {1, 17, 4096 + 3, std::size_t{1} << 24};
  // (src offset, dst offset): aligned, same misalignment, different misalignments.
  const std::pair<std::size_t, std::size_t> offsets[] = {{0, 0}, {1, 1},  {15, 15}, {3, 0},
                                                         {0, 5}, {7, 12}, {16, 32}};
  for (const CopyPath path : {CopyPath::kernel, CopyPath::memcpy}) {
    for (const std::size_t bytes : lengths) {
      for (const auto& [src_offset, dst_offset] : offsets) {
        check_copy(path, bytes, src_offset, dst_offset, stream);
      }
    }
  }
  rt::destroy_stream(stream);
}

TEST_CASE("copies on the default stream and of zero bytes", "[cuda][copy]") {
  check_copy(CopyPath::kernel, 4096 + 3, 1, 1, kvc::Cuda{});
  check_copy(CopyPath::kernel, 0, 0, 0, kvc::Cuda{});
}

TEST_CASE("copy_device_to_device rejects overlapping and null ranges", "[cuda][copy][errors]") {
  rt::DeviceBuffer buffer(256);
  auto* base = buffer.as<unsigned char>();
  CHECK_THROWS_AS(rt::copy_device_to_device(base + 8, base, 64, kvc::Cuda{}), kvc::Error);
  CHECK_THROWS_AS(rt::copy_device_to_device(nullptr, base, 64, kvc::Cuda{}), kvc::Error);
  CHECK_NOTHROW(rt::copy_device_to_device(base + 64, base, 64, kvc::Cuda{}));
  rt::synchronize(kvc::Cuda{});
}

TEST_CASE("a failing CUDA call throws kvc::Error naming the call", "[cuda][errors]") {
  // 2^60 bytes cannot be allocated; cudaErrorMemoryAllocation is not sticky.
  try {
    rt::DeviceBuffer impossible(std::size_t{1} << 60);
    FAIL("allocating 2^60 bytes succeeded");
  } catch (const kvc::Error& e) {
    const std::string message = e.message();
    INFO("message: " << message);
    CHECK(message.find("cudaMalloc") != std::string::npos);
    CHECK(message.find("cudaErrorMemoryAllocation") != std::string::npos);
  }
  // The context is still usable afterwards.
  check_copy(CopyPath::kernel, 17, 0, 0, kvc::Cuda{});
}

TEST_CASE("events time work on a stream", "[cuda][events]") {
  const kvc::Cuda stream = rt::create_stream();
  CUevent_st* start = rt::create_event();
  CUevent_st* stop = rt::create_event();
  rt::DeviceBuffer a(std::size_t{1} << 26);
  rt::DeviceBuffer b(std::size_t{1} << 26);
  rt::record_event(start, stream);
  rt::copy_device_to_device(b.data(), a.data(), a.bytes(), stream);
  rt::record_event(stop, stream);
  const float ms = rt::elapsed_ms(start, stop);
  INFO("copy of 64 MiB took " << ms << " ms");
  CHECK(ms > 0.0f);
  rt::destroy_event(start);
  rt::destroy_event(stop);
  rt::destroy_stream(stream);
}
