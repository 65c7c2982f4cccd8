// src/ops/rope.cpp: CPU reference of rotary position embedding (ALGORITHMS.md P7).
//
// Pair (a, b) with frequency index i rotates by angle = amount * theta^(-2i/D) (HF inv_freq):
//   x'[a] = x[a] * cos - x[b] * sin
//   x'[b] = x[b] * cos + x[a] * sin
// rotate_half pairs a = i, b = i + D/2; interleaved pairs a = 2i, b = 2i + 1. The frequency, angle,
// cos/sin and the rotation itself are computed in double and rounded to fp32 once.
#include "kvc/ops/rope.hpp"

#include <cmath>
#include <cstdint>
#include <vector>

#include "kvc/core/error.hpp"

namespace kvc::ops {

RopeConvention parse_rope_convention(std::string_view name) {
  if (name == "rotate_half") return RopeConvention::rotate_half;
  if (name == "interleaved") return RopeConvention::interleaved;
  KVC_FAIL("unknown rope convention \"", name, "\"; allowed: rotate_half, interleaved");
}

void rope_rotate(Cpu, const Rope& rope, HostView<float, 2> x,
                 std::span<const std::int32_t> amounts) {
  const std::int64_t n = x.size(0), d = x.size(1);
  KVC_CHECK(d >= 2 && d % 2 == 0, "rope_rotate: head dim D = ", d,
            " is not allowed; D must be even and >= 2");
  KVC_CHECK(static_cast<std::int64_t>(amounts.size()) == n, "rope_rotate: ", amounts.size(),
            " amounts for n = ", n, " rows; need one amount per row");
  KVC_CHECK(std::isfinite(rope.theta) && rope.theta > 0.0, "rope_rotate: theta = ", rope.theta,
            " is not allowed; theta must be finite and > 0");
  KVC_CHECK(rope.convention == RopeConvention::rotate_half ||
                rope.convention == RopeConvention::interleaved,
            "rope_rotate: convention = ", static_cast<int>(rope.convention),
            " is not a RopeConvention; allowed: rotate_half, interleaved");

  const std::int64_t half = d / 2;
  std::vector<double> frequency(static_cast<std::size_t>(half));  // [D/2]
  for (std::int64_t i = 0; i < half; ++i)
    frequency[i] = std::pow(rope.theta, -2.0 * static_cast<double>(i) / static_cast<double>(d));

  const bool interleaved = rope.convention == RopeConvention::interleaved;
  for (std::int64_t r = 0; r < n; ++r) {
    for (std::int64_t i = 0; i < half; ++i) {
      const std::int64_t a = interleaved ? 2 * i : i;
      const std::int64_t b = interleaved ? 2 * i + 1 : i + half;
      const double angle = static_cast<double>(amounts[r]) * frequency[i];
      const double cos_angle = std::cos(angle), sin_angle = std::sin(angle);
      const double xa = x(r, a), xb = x(r, b);
      x(r, a) = static_cast<float>(xa * cos_angle - xb * sin_angle);
      x(r, b) = static_cast<float>(xb * cos_angle + xa * sin_angle);
    }
  }
}

}  // namespace kvc::ops
