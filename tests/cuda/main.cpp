// The Catch2 runner of kvc_cuda_tests. Without a usable GPU it prints why and returns 77, which
// CTest reports as skipped (SKIP_RETURN_CODE 77): CI without a GPU stays honest.
#define CATCH_CONFIG_RUNNER
#include <catch2/catch.hpp>
#include <iostream>

#include "kvc/core/cuda_runtime.hpp"
#include "kvc/core/error.hpp"

int main(int argc, char** argv) {
  int devices = 0;
  try {
    devices = kvc::cuda_runtime::device_count();
    if (devices == 0) {
      std::cout << "no CUDA device: skipping\n";
      return 77;
    }
    const int device = kvc::cuda_runtime::current_device();
    const auto properties = kvc::cuda_runtime::device_properties(device);
    std::cout << "CUDA device " << device << " of " << devices << ": " << properties.name << " (sm_"
              << properties.compute_major << properties.compute_minor << ", "
              << properties.multiprocessor_count << " SMs)\n";
  } catch (const kvc::Error& e) {
    std::cerr << "CUDA runtime error before the tests: " << e.what() << '\n';
    return 1;
  }
  return Catch::Session().run(argc, argv);
}
