// kvc/core/cuda_runtime.hpp: the few CUDA runtime services host code needs (device count and
// properties, device memory, copies, streams, events), declared without any CUDA header. Defined in
// cuda/device.cu; link kvc::cuda. Every call is checked and failures throw kvc::Error.
//
//   if (kvc::cuda_runtime::device_count() == 0) return;  // no GPU or no driver: nothing to do
//   kvc::cuda_runtime::DeviceBuffer buffer(bytes);
//   kvc::cuda_runtime::copy_host_to_device(buffer.data(), host.data(), bytes, kvc::Cuda{});
//   kvc::cuda_runtime::synchronize(kvc::Cuda{});
#pragma once

#include <cstddef>
#include <string>
#include <utility>

#include "kvc/core/backend.hpp"

struct CUevent_st;

namespace kvc::cuda_runtime {

// Number of visible devices; 0 (not an exception) when there is no device or no driver.
int device_count();
// The calling thread's current device.
int current_device();

struct DeviceProperties {
  std::string name;
  int compute_major = 0;
  int compute_minor = 0;
  int multiprocessor_count = 0;
  std::size_t global_memory_bytes = 0;
  std::size_t l2_cache_bytes = 0;
};
DeviceProperties device_properties(int device);

// cudaMalloc / cudaFree. allocate(0) returns nullptr; release(nullptr) does nothing.
void* allocate(std::size_t bytes);
void release(void* pointer) noexcept;

// Asynchronous on `stream`: synchronize before reading a host destination or freeing a source.
void copy_host_to_device(void* dst, const void* src, std::size_t bytes, Cuda stream);
void copy_device_to_host(void* dst, const void* src, std::size_t bytes, Cuda stream);
// kvc's own copy kernel (grid-stride, 16-byte vectors where dst and src share their alignment):
// the device-to-device bandwidth reference that benchmarks report `frac_copy` against.
void copy_device_to_device(void* dst, const void* src, std::size_t bytes, Cuda stream);
// The runtime's cudaMemcpyAsync, for comparison with copy_device_to_device.
void memcpy_device_to_device(void* dst, const void* src, std::size_t bytes, Cuda stream);
// Sets `bytes` bytes at dst to `value` (cudaMemsetAsync).
void fill_bytes(void* dst, unsigned char value, std::size_t bytes, Cuda stream);

void synchronize(Cuda stream);
Cuda create_stream();                       // a non-blocking stream
void destroy_stream(Cuda stream) noexcept;  // nullptr (the default stream) is ignored

// Timing events: elapsed_ms waits for `stop` and returns the time between the two records.
CUevent_st* create_event();
void destroy_event(CUevent_st* event) noexcept;
void record_event(CUevent_st* event, Cuda stream);
float elapsed_ms(CUevent_st* start, CUevent_st* stop);

// Owning device allocation, move-only.
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  explicit DeviceBuffer(std::size_t bytes) : data_(allocate(bytes)), bytes_(bytes) {}
  DeviceBuffer(DeviceBuffer&& other) noexcept
      : data_(std::exchange(other.data_, nullptr)), bytes_(std::exchange(other.bytes_, 0)) {}
  DeviceBuffer& operator=(DeviceBuffer&& other) noexcept {
    if (this != &other) {
      release(data_);
      data_ = std::exchange(other.data_, nullptr);
      bytes_ = std::exchange(other.bytes_, 0);
    }
    return *this;
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  ~DeviceBuffer() { release(data_); }

  void* data() const { return data_; }
  template <class T>
  T* as() const {
    return static_cast<T*>(data_);
  }
  std::size_t bytes() const { return bytes_; }

 private:
  void* data_ = nullptr;
  std::size_t bytes_ = 0;
};

}  // namespace kvc::cuda_runtime
