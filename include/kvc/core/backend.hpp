// kvc/core/backend.hpp: the compile-time backend tags every op is dispatched on.
//
//   kvc::ops::decode_attention(kvc::Cpu{}, q, k, v, out);
//   kvc::ops::decode_attention(kvc::Cuda{stream}, dq, dk, dv, dout);  // device views only
//
// The CUDA stream is held as the driver's opaque handle so host-only users need no CUDA header.
#pragma once

#include "kvc/core/view.hpp"

struct CUstream_st;

namespace kvc {

struct Cpu {
  static constexpr MemorySpace kSpace = MemorySpace::Host;
  static constexpr const char* kName = "cpu";
};

struct Cuda {
  static constexpr MemorySpace kSpace = MemorySpace::Device;
  static constexpr const char* kName = "cuda";
  CUstream_st* stream = nullptr;  // nullptr = the legacy default stream
};

}  // namespace kvc
