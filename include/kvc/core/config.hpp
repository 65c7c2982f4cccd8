// kvc/core/config.hpp: the few macros shared by host and device code.
//
//   KVC_HOST_DEVICE inline int words_for(int n, int per_word) { return (n + per_word - 1) /
//   per_word; }
#pragma once

#if defined(__CUDACC__)
#define KVC_HOST_DEVICE __host__ __device__
#else
#define KVC_HOST_DEVICE
#endif
