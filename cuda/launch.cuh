// cuda/launch.cuh (private): launch helpers the ops share.
//
//   allow_dynamic_shared_memory(kernel, bytes);   // once per (kernel, device), then a lookup
//   kernel<<<grid, threads, bytes, stream>>>(p);
//   launch_dependent(merge_kernel, blocks, threads, stream, p);  // PDL on sm_90 and later
//   if (clusters_fit(kernel, threads, bytes, n))                  // clusters sized at run time
//     launch_clustered(kernel, grid, threads, bytes, stream, n, p);
//
// Dynamic shared memory beyond 48 KB must be allowed per kernel, and cudaFuncSetAttribute applies
// to the current device only: a process that runs on two GPUs has to set it on each. Setting it on
// every launch costs host time on the launch path, setting it once per process misses the second
// GPU; this cache remembers each (kernel, device, bytes).
//
// Programmatic dependent launch: a kernel launched with launch_dependent may start while the
// kernel before it in the stream still runs (once every block of that one has called
// allow_dependent_launch or exited). Its threads call wait_for_prior_grid before reading anything
// the earlier kernel writes: that waits until the earlier grid has completed and its memory is
// visible, exactly the guarantee of ordinary stream order. What is saved is the launch gap between
// the two kernels (the merge of the split partials after a decode attention kernel).
#pragma once

#include <cuda_runtime.h>

#include <mutex>
#include <utility>
#include <vector>

#include "check.cuh"

// The host always asks for programmatic launches, so the device code must always contain the
// wait: built for an older architecture (and run through PTX JIT), the merge would read the
// partials before the split grid wrote them. CMakeLists.txt refuses such builds too.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
#error "kvc's CUDA kernels need sm_90 or later (griddepcontrol in cuda/launch.cuh)"
#endif

namespace kvc::cuda_detail {

inline void allow_dynamic_shared_memory(const void* kernel, int bytes) {
  struct Allowed {
    const void* kernel;
    int device, bytes;
  };
  static std::mutex mutex;
  static std::vector<Allowed> allowed;
  int device = 0;
  KVC_CUDA_CHECK(cudaGetDevice(&device));
  const std::lock_guard<std::mutex> lock(mutex);
  for (Allowed& a : allowed)
    if (a.kernel == kernel && a.device == device) {
      if (a.bytes >= bytes) return;
      KVC_CUDA_CHECK(
          cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
      a.bytes = bytes;
      return;
    }
  KVC_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
  allowed.push_back({kernel, device, bytes});
}

template <class... Params>
void allow_dynamic_shared_memory(void (*kernel)(Params...), int bytes) {
  allow_dynamic_shared_memory(reinterpret_cast<const void*>(kernel), bytes);
}

// Called by the earlier kernel (any thread; a block counts once all of it has called or exited).
__device__ __forceinline__ void allow_dependent_launch() {
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
}

// Called by the dependent kernel before it reads the earlier kernel's output. Without a
// programmatic launch it returns at once: stream order already holds.
__device__ __forceinline__ void wait_for_prior_grid() {
  asm volatile("griddepcontrol.wait;" ::: "memory");
}

// kernel<<<blocks, threads, 0, stream>>>(args...), allowed to overlap the end of the kernel before
// it; the kernel must call wait_for_prior_grid first. (No device check: the kernels exist for
// sm_90 and later only, so any device that runs them supports it.)
template <class... Params, class... Args>
void launch_dependent(void (*kernel)(Params...), unsigned blocks, unsigned threads,
                      cudaStream_t stream, Args&&... args) {
  cudaLaunchConfig_t config{};
  config.gridDim = dim3(blocks);
  config.blockDim = dim3(threads);
  config.dynamicSmemBytes = 0;
  config.stream = stream;
  cudaLaunchAttribute attribute[1];
  attribute[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute[0].val.programmaticStreamSerializationAllowed = 1;
  config.attrs = attribute;
  config.numAttrs = 1;
  KVC_CUDA_CHECK(cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...));
  KVC_CUDA_CHECK_LAUNCH(stream);
}

// A launch configuration of clusters of cluster_x blocks along x (grid.x a multiple of it), for a
// cluster size known only at run time. config.attrs points into the object: not copyable.
struct ClusterConfig {
  cudaLaunchConfig_t config{};
  cudaLaunchAttribute attribute[1]{};
  ClusterConfig(dim3 grid, unsigned threads, int bytes, cudaStream_t stream, unsigned cluster_x) {
    config.gridDim = grid;
    config.blockDim = dim3(threads);
    config.dynamicSmemBytes = static_cast<std::size_t>(bytes);
    config.stream = stream;
    attribute[0].id = cudaLaunchAttributeClusterDimension;
    attribute[0].val.clusterDim.x = cluster_x;
    attribute[0].val.clusterDim.y = 1;
    attribute[0].val.clusterDim.z = 1;
    config.attrs = attribute;
    config.numAttrs = 1;
  }
  ClusterConfig(const ClusterConfig&) = delete;
  ClusterConfig& operator=(const ClusterConfig&) = delete;
};

// Whether clusters of cluster_x blocks of `kernel` (threads and dynamic shared memory `bytes` per
// block) can be resident on the current device at all: a cluster must fit into one GPC, which a
// partitioned GPU (MIG, green contexts) or a large block may not allow. Asked of the driver once
// per (kernel, device, cluster size, bytes), then a lookup; allow_dynamic_shared_memory first.
inline bool clusters_fit(const void* kernel, unsigned threads, int bytes, unsigned cluster_x) {
  struct Known {
    const void* kernel;
    int device, bytes;
    unsigned threads, cluster_x;
    bool fits;
  };
  static std::mutex mutex;
  static std::vector<Known> known;
  int device = 0;
  KVC_CUDA_CHECK(cudaGetDevice(&device));
  const std::lock_guard<std::mutex> lock(mutex);
  for (const Known& k : known)
    if (k.kernel == kernel && k.device == device && k.bytes == bytes && k.threads == threads &&
        k.cluster_x == cluster_x)
      return k.fits;
  const ClusterConfig cluster(dim3(cluster_x), threads, bytes, nullptr, cluster_x);
  int clusters = 0;
  // A refused query (a size the device does not take at all) also means: launch without clusters;
  // its error is cleared so that the next launch check does not report it.
  const cudaError_t status = cudaOccupancyMaxActiveClusters(&clusters, kernel, &cluster.config);
  if (status != cudaSuccess) (void)cudaGetLastError();
  const bool fits = status == cudaSuccess && clusters > 0;
  known.push_back({kernel, device, bytes, threads, cluster_x, fits});
  return fits;
}

template <class... Params>
bool clusters_fit(void (*kernel)(Params...), unsigned threads, int bytes, unsigned cluster_x) {
  return clusters_fit(reinterpret_cast<const void*>(kernel), threads, bytes, cluster_x);
}

// kernel<<<grid, threads, bytes, stream>>>(args...) as clusters of cluster_x blocks along x.
template <class... Params, class... Args>
void launch_clustered(void (*kernel)(Params...), dim3 grid, unsigned threads, int bytes,
                      cudaStream_t stream, unsigned cluster_x, Args&&... args) {
  const ClusterConfig cluster(grid, threads, bytes, stream, cluster_x);
  KVC_CUDA_CHECK(cudaLaunchKernelEx(&cluster.config, kernel, std::forward<Args>(args)...));
  KVC_CUDA_CHECK_LAUNCH(stream);
}

}  // namespace kvc::cuda_detail
