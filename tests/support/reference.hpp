// tests/support/reference.hpp: small helpers shared by the CPU tests: seeded random data, a naive
// double-precision attention to compare the reference against, and compare-and-report helpers.
//
//   std::vector<float> q = kvc::test::random_floats(8 * 64, /*seed=*/7);
//   const auto c = kvc::test::compare(actual, expected, tolerance, {8, 64}, /*seed=*/7);
//   INFO(c.report);   // worst element, its index, both values, the tolerance, seed and shape
//   CHECK(c.ok);
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <random>
#include <span>
#include <sstream>
#include <string>
#include <vector>

namespace kvc::test {

// Uniform floats in [lo, hi) from a 64-bit Mersenne Twister. The mapping from engine output to
// float is spelled out (not std::uniform_real_distribution) so the data is the same with every
// standard library.
inline std::vector<float> random_floats(std::size_t count, std::uint64_t seed, float lo = -1.0f,
                                        float hi = 1.0f) {
  std::mt19937_64 engine(seed);
  std::vector<float> out(count);
  for (auto& x : out) {
    const double unit = static_cast<double>(engine() >> 11) * 0x1.0p-53;  // [0, 1)
    x = static_cast<float>(lo + (static_cast<double>(hi) - lo) * unit);
  }
  return out;
}

// "[a, b, c]"
inline std::string shape_string(const std::vector<std::int64_t>& shape) {
  std::ostringstream out;
  out << '[';
  for (std::size_t i = 0; i < shape.size(); ++i) out << (i ? ", " : "") << shape[i];
  out << ']';
  return out.str();
}

// The multi-index of flat (row-major) index `flat` in `shape`, as "[i, j, k]".
inline std::string index_string(std::size_t flat, const std::vector<std::int64_t>& shape) {
  if (shape.empty()) return shape_string({static_cast<std::int64_t>(flat)});
  std::vector<std::int64_t> index(shape.size());
  auto rest = static_cast<std::int64_t>(flat);
  for (std::size_t d = shape.size(); d-- > 0;) {
    index[d] = shape[d] > 0 ? rest % shape[d] : 0;
    rest = shape[d] > 0 ? rest / shape[d] : 0;
  }
  return shape_string(index);
}

struct Comparison {
  bool ok = true;
  std::size_t failures = 0;  // elements outside their tolerance
  std::string report;        // always describes the worst element (largest |diff| / tolerance)
};

// Elementwise |actual - expected| <= tolerance[i]; NaN anywhere fails.
inline Comparison compare(std::span<const float> actual, std::span<const double> expected,
                          std::span<const double> tolerance, const std::vector<std::int64_t>& shape,
                          std::uint64_t seed) {
  Comparison c;
  std::ostringstream out;
  out.precision(10);
  if (actual.size() != expected.size() || tolerance.size() != expected.size()) {
    c.ok = false;
    out << "size mismatch: actual " << actual.size() << ", expected " << expected.size()
        << ", tolerance " << tolerance.size() << " (shape " << shape_string(shape) << ")";
    c.report = out.str();
    return c;
  }
  std::size_t worst = 0;
  double worst_ratio = -1.0;
  for (std::size_t i = 0; i < actual.size(); ++i) {
    const double diff = std::fabs(static_cast<double>(actual[i]) - expected[i]);
    double ratio = tolerance[i] > 0 ? diff / tolerance[i]
                                    : (diff == 0 ? 0.0 : std::numeric_limits<double>::infinity());
    if (std::isnan(diff)) ratio = std::numeric_limits<double>::infinity();
    if (!(diff <= tolerance[i])) ++c.failures;
    if (ratio > worst_ratio) worst_ratio = ratio, worst = i;
  }
  c.ok = c.failures == 0;
  out << (c.ok ? "all " : "")
      << (c.ok ? std::to_string(actual.size()) + " elements within tolerance"
               : std::to_string(c.failures) + " of " + std::to_string(actual.size()) +
                     " elements FAIL");
  if (!actual.empty())
    out << "; worst element " << index_string(worst, shape) << " (flat " << worst << "): actual "
        << actual[worst] << ", expected " << expected[worst] << ", |diff| "
        << std::fabs(static_cast<double>(actual[worst]) - expected[worst]) << ", tolerance "
        << tolerance[worst];
  out << "; seed " << seed << ", shape " << shape_string(shape);
  c.report = out.str();
  return c;
}

inline Comparison compare(std::span<const float> actual, std::span<const double> expected,
                          double tolerance, const std::vector<std::int64_t>& shape,
                          std::uint64_t seed) {
  const std::vector<double> tol(expected.size(), tolerance);
  return compare(actual, expected, tol, shape, seed);
}

inline Comparison compare(std::span<const float> actual, std::span<const float> expected,
                          double tolerance, const std::vector<std::int64_t>& shape,
                          std::uint64_t seed) {
  const std::vector<double> wide(expected.begin(), expected.end());
  return compare(actual, wide, tolerance, shape, seed);
}

// Exact equality of integer (or bit-pattern) arrays; reports the first mismatch.
template <class T>
Comparison compare_exact(std::span<const T> actual, std::span<const T> expected,
                         const std::vector<std::int64_t>& shape, std::uint64_t seed) {
  Comparison c;
  std::ostringstream out;
  if (actual.size() != expected.size()) {
    c.ok = false;
    out << "size mismatch: actual " << actual.size() << ", expected " << expected.size();
  } else {
    std::size_t first = actual.size();
    for (std::size_t i = 0; i < actual.size(); ++i)
      if (!(actual[i] == expected[i])) {
        if (first == actual.size()) first = i;
        ++c.failures;
      }
    c.ok = c.failures == 0;
    if (c.ok) {
      out << "all " << actual.size() << " elements equal";
    } else {
      out << c.failures << " of " << actual.size() << " elements differ; first at "
          << index_string(first, shape) << " (flat " << first << "): actual " << +actual[first]
          << ", expected " << +expected[first];
    }
  }
  out << "; seed " << seed << ", shape " << shape_string(shape);
  c.report = out.str();
  return c;
}

// Naive causal attention in double: q [Hq, Tq, D], k/v [Hkv, Tk, D] (row-major), query i sees keys
// j <= Tk - Tq + i, query head h reads KV head h / (Hq / Hkv). out [Hq, Tq, D], probabilities
// [Hq, Tq, Tk] (0 where masked). scale 0 selects 1/sqrt(D). Written from the formula, directly:
// no max subtraction is needed in double for the small test inputs.
struct NaiveAttention {
  std::vector<double> out;
  std::vector<double> probabilities;
};

inline NaiveAttention naive_attention(std::span<const float> q, std::span<const float> k,
                                      std::span<const float> v, std::int64_t hq, std::int64_t hkv,
                                      std::int64_t tq, std::int64_t tk, std::int64_t d,
                                      double scale = 0.0) {
  if (scale == 0.0) scale = 1.0 / std::sqrt(static_cast<double>(d));
  NaiveAttention r;
  r.out.assign(static_cast<std::size_t>(hq * tq * d), 0.0);
  r.probabilities.assign(static_cast<std::size_t>(hq * tq * tk), 0.0);
  for (std::int64_t h = 0; h < hq; ++h) {
    const std::int64_t g = h / (hq / hkv);
    for (std::int64_t i = 0; i < tq; ++i) {
      const std::int64_t visible = tk - tq + i + 1;
      double* p = &r.probabilities[static_cast<std::size_t>((h * tq + i) * tk)];
      double total = 0.0;
      for (std::int64_t j = 0; j < visible; ++j) {
        double dot = 0.0;
        for (std::int64_t c = 0; c < d; ++c)
          dot += static_cast<double>(q[(h * tq + i) * d + c]) * k[(g * tk + j) * d + c];
        p[j] = std::exp(dot * scale);
        total += p[j];
      }
      for (std::int64_t j = 0; j < visible; ++j) p[j] /= total;
      for (std::int64_t c = 0; c < d; ++c) {
        double acc = 0.0;
        for (std::int64_t j = 0; j < visible; ++j) acc += p[j] * v[(g * tk + j) * d + c];
        r.out[static_cast<std::size_t>((h * tq + i) * d + c)] = acc;
      }
    }
  }
  return r;
}

}  // namespace kvc::test
