// Seeded Gaussian inputs shared by the CPU benchmarks.
#pragma once

#include <random>
#include <vector>

namespace kvc::bench {

inline std::vector<float> normal_values(std::size_t count, unsigned seed) {
  std::mt19937 generator(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> out(count);
  for (auto& x : out) x = normal(generator);
  return out;
}

}  // namespace kvc::bench
