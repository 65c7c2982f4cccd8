// cuda/device.cu: kvc::cuda_runtime (include/kvc/core/cuda_runtime.hpp): checked runtime calls and
// the device-to-device copy kernel that benchmarks use as their bandwidth reference.
#include <algorithm>
#include <cstdint>

#include "check.cuh"
#include "kvc/core/cuda_runtime.hpp"

namespace kvc::cuda_runtime {
namespace {

// One 16-byte vector per thread over a grid that covers the whole copy: measured on an H100 at
// 3.0 TB/s (read + write, 1 GiB), on par with cudaMemcpyAsync, where a persistent grid-stride
// loop (8 blocks per SM) reached 2.8 TB/s.
constexpr int kCopyThreads = 1024;
constexpr std::size_t kMaxBlocks = 0x7FFFFFFF;  // gridDim.x limit; larger copies loop
constexpr std::size_t kVectorBytes = sizeof(uint4);
constexpr std::size_t kLineBytes = 128;

cudaStream_t native(Cuda stream) { return stream.stream; }

// Bytes [head, head + 16 * vectors) move as 16-byte vectors; the head (up to the destination's next
// 128-byte line) and the tail move byte by byte. The caller guarantees dst + head and src + head
// are 16-byte aligned.
__global__ void copy_bytes_kernel(unsigned char* __restrict__ dst,
                                  const unsigned char* __restrict__ src, std::size_t bytes,
                                  std::size_t head, std::size_t vectors) {
  const std::size_t stride = static_cast<std::size_t>(gridDim.x) * blockDim.x;
  const std::size_t first = static_cast<std::size_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  auto* dst_vectors = reinterpret_cast<uint4*>(dst + head);
  const auto* src_vectors = reinterpret_cast<const uint4*>(src + head);
  for (std::size_t i = first; i < vectors; i += stride) dst_vectors[i] = src_vectors[i];

  const std::size_t tail_begin = head + vectors * kVectorBytes;
  const std::size_t edge_bytes = head + (bytes - tail_begin);
  for (std::size_t i = first; i < edge_bytes; i += stride) {
    const std::size_t at = i < head ? i : tail_begin + (i - head);
    dst[at] = src[at];
  }
}

void check_copy_arguments(void* dst, const void* src, std::size_t bytes, const char* what) {
  KVC_CHECK(dst != nullptr && src != nullptr, what, ": null pointer (dst ", dst, ", src ", src,
            ") for ", bytes, " bytes; both must be non-null when bytes > 0");
}

}  // namespace

int device_count() {
  int count = 0;
  const cudaError_t status = cudaGetDeviceCount(&count);
  if (status == cudaErrorNoDevice || status == cudaErrorInsufficientDriver ||
      status == cudaErrorStubLibrary) {
    (void)cudaGetLastError();  // not sticky: leave no error behind for the next check
    return 0;
  }
  KVC_CUDA_CHECK(status);
  return count;
}

int current_device() {
  int device = 0;
  KVC_CUDA_CHECK(cudaGetDevice(&device));
  return device;
}

DeviceProperties device_properties(int device) {
  const int count = device_count();
  KVC_CHECK(device >= 0 && device < count, "device ", device, " out of range [0, ", count, ")");
  cudaDeviceProp native_properties{};
  KVC_CUDA_CHECK(cudaGetDeviceProperties(&native_properties, device));
  DeviceProperties properties;
  properties.name = native_properties.name;
  properties.compute_major = native_properties.major;
  properties.compute_minor = native_properties.minor;
  properties.multiprocessor_count = native_properties.multiProcessorCount;
  properties.global_memory_bytes = native_properties.totalGlobalMem;
  properties.l2_cache_bytes = static_cast<std::size_t>(native_properties.l2CacheSize);
  return properties;
}

void* allocate(std::size_t bytes) {
  if (bytes == 0) return nullptr;
  void* pointer = nullptr;
  KVC_CUDA_CHECK(cudaMalloc(&pointer, bytes));
  return pointer;
}

void release(void* pointer) noexcept {
  if (pointer == nullptr) return;
  if (cudaFree(pointer) != cudaSuccess) (void)cudaGetLastError();
}

void copy_host_to_device(void* dst, const void* src, std::size_t bytes, Cuda stream) {
  if (bytes == 0) return;
  check_copy_arguments(dst, src, bytes, "copy_host_to_device");
  KVC_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, native(stream)));
}

void copy_device_to_host(void* dst, const void* src, std::size_t bytes, Cuda stream) {
  if (bytes == 0) return;
  check_copy_arguments(dst, src, bytes, "copy_device_to_host");
  KVC_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, native(stream)));
}

void copy_device_to_device(void* dst, const void* src, std::size_t bytes, Cuda stream) {
  if (bytes == 0) return;
  check_copy_arguments(dst, src, bytes, "copy_device_to_device");
  const auto dst_address = reinterpret_cast<std::uintptr_t>(dst);
  const auto src_address = reinterpret_cast<std::uintptr_t>(src);
  KVC_CHECK(dst_address + bytes <= src_address || src_address + bytes <= dst_address,
            "copy_device_to_device: ranges overlap (dst ", dst, ", src ", src, ", ", bytes,
            " bytes); they must be disjoint");

  // Vectors only when both pointers reach 16-byte alignment after the same number of bytes; the
  // vector part then starts on a 128-byte line of the destination, so no warp's stores straddle
  // an extra line.
  std::size_t head = 0;
  std::size_t vectors = 0;
  if (((dst_address ^ src_address) % kVectorBytes) == 0) {
    head = std::min(bytes, (kLineBytes - dst_address % kLineBytes) % kLineBytes);
    vectors = (bytes - head) / kVectorBytes;
  }
  const std::size_t edge_bytes = bytes - vectors * kVectorBytes;
  const std::size_t work = std::max(vectors, edge_bytes);
  const auto blocks =
      static_cast<unsigned>(std::min(kMaxBlocks, (work + kCopyThreads - 1) / kCopyThreads));
  copy_bytes_kernel<<<blocks, kCopyThreads, 0, native(stream)>>>(
      static_cast<unsigned char*>(dst), static_cast<const unsigned char*>(src), bytes, head,
      vectors);
  KVC_CUDA_CHECK_LAUNCH(native(stream));
}

void memcpy_device_to_device(void* dst, const void* src, std::size_t bytes, Cuda stream) {
  if (bytes == 0) return;
  check_copy_arguments(dst, src, bytes, "memcpy_device_to_device");
  KVC_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, native(stream)));
}

void fill_bytes(void* dst, unsigned char value, std::size_t bytes, Cuda stream) {
  if (bytes == 0) return;
  KVC_CHECK(dst != nullptr, "fill_bytes: null dst for ", bytes, " bytes; must be non-null");
  KVC_CUDA_CHECK(cudaMemsetAsync(dst, value, bytes, native(stream)));
}

void synchronize(Cuda stream) { KVC_CUDA_CHECK(cudaStreamSynchronize(native(stream))); }

Cuda create_stream() {
  cudaStream_t stream = nullptr;
  KVC_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  return Cuda{stream};
}

void destroy_stream(Cuda stream) noexcept {
  if (stream.stream == nullptr) return;
  if (cudaStreamDestroy(native(stream)) != cudaSuccess) (void)cudaGetLastError();
}

CUevent_st* create_event() {
  cudaEvent_t event = nullptr;
  KVC_CUDA_CHECK(cudaEventCreate(&event));
  return event;
}

void destroy_event(CUevent_st* event) noexcept {
  if (event == nullptr) return;
  if (cudaEventDestroy(event) != cudaSuccess) (void)cudaGetLastError();
}

void record_event(CUevent_st* event, Cuda stream) {
  KVC_CUDA_CHECK(cudaEventRecord(event, native(stream)));
}

float elapsed_ms(CUevent_st* start, CUevent_st* stop) {
  KVC_CUDA_CHECK(cudaEventSynchronize(stop));
  float milliseconds = 0.0f;
  KVC_CUDA_CHECK(cudaEventElapsedTime(&milliseconds, start, stop));
  return milliseconds;
}

}  // namespace kvc::cuda_runtime
