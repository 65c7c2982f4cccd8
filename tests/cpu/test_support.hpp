// Seeded test data and small cache helpers shared by the CPU tests: f16-exact random values, a
// random Q/K/V prompt with its views, an LCG for spread-out floats, and readers of cache contents.
//
//   const kvc_test::RandomQkv p(/*hq=*/4, /*hkv=*/2, /*t=*/64, /*d=*/16, /*seed=*/7);
//   cache.prefill(0, p.kv(), p.vv(), p.qv());
//   CHECK(kvc_test::positions_of(cache, 0, 0) == kvc_test::iota_range(0, 64));
#pragma once

#include <cstddef>
#include <cstdint>
#include <numeric>
#include <random>
#include <vector>

#include "kvc/core/dtype.hpp"
#include "kvc/core/view.hpp"

namespace kvc_test {

// Normal(0, scale) values rounded to f16, so that the cache's f16 rows hold them unchanged.
inline std::vector<float> random_f16_values(std::size_t n, std::uint32_t seed, float scale = 1.0f) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist(0.0f, scale);
  std::vector<float> x(n);
  for (auto& v : x) v = static_cast<float>(kvc::f16(dist(rng)));
  return x;
}

// Deterministic pseudo-random floats in [-1, 1) (an LCG; the values only need to be spread out).
inline std::vector<float> lcg_floats(std::size_t count, std::uint32_t seed) {
  std::vector<float> x(count);
  std::uint32_t s = seed;
  for (auto& v : x) {
    s = s * 1664525u + 1013904223u;
    v = static_cast<float>(s >> 8) / static_cast<float>(1u << 23) - 1.0f;
  }
  return x;
}

// A random prompt of f16-exact values: q from `seed`, k from seed + 1, v from seed + 2; q and k
// drawn with standard deviation qk_scale, v with 1.
struct RandomQkv {
  int hq, hkv, t, d;
  std::vector<float> q, k, v;  // [Hq, T, D], [Hkv, T, D], [Hkv, T, D]
  RandomQkv(int hq_, int hkv_, int t_, int d_, std::uint32_t seed, float qk_scale = 1.0f)
      : hq(hq_),
        hkv(hkv_),
        t(t_),
        d(d_),
        q(random_f16_values(static_cast<std::size_t>(hq_) * t_ * d_, seed, qk_scale)),
        k(random_f16_values(static_cast<std::size_t>(hkv_) * t_ * d_, seed + 1, qk_scale)),
        v(random_f16_values(static_cast<std::size_t>(hkv_) * t_ * d_, seed + 2)) {}
  kvc::HostView<const float, 3> qv() const { return kvc::make_view(q.data(), {hq, t, d}); }
  kvc::HostView<const float, 3> kv() const { return kvc::make_view(k.data(), {hkv, t, d}); }
  kvc::HostView<const float, 3> vv() const { return kvc::make_view(v.data(), {hkv, t, d}); }
};

// Token t of x [H, T, D]: [H, D].
inline kvc::HostView<const float, 2> token(kvc::HostView<const float, 3> x, std::int64_t t) {
  return {x.data + t * x.strides[1], {x.shape[0], x.shape[2]}, {x.strides[0], x.strides[2]}};
}

// begin, begin + 1, ..., end - 1
inline std::vector<std::int32_t> iota_range(int begin, int end) {
  std::vector<std::int32_t> r(end - begin);
  std::iota(r.begin(), r.end(), begin);
  return r;
}

// The positions a cache stores for (layer, head), as a vector to compare.
inline std::vector<std::int32_t> positions_of(const auto& cache, int layer, int head) {
  auto p = cache.positions(layer, head);
  return {p.begin(), p.end()};
}

}  // namespace kvc_test
