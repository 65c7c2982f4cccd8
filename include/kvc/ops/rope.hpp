// kvc/ops/rope.hpp: rotary position embedding, applied or re-applied by a position delta.
//
//   kvc::ops::Rope rope{.theta = 10000.0, .convention = kvc::ops::RopeConvention::rotate_half};
//   kvc::ops::rope_rotate(kvc::Cpu{}, rope, keys, positions);   // keys [n, D], positions [n]
//   kvc::ops::rope_rotate(kvc::Cpu{}, rope, keys, deltas);      // re-rotate kept keys by new - old
//
// A rotation by p followed by one by d equals a rotation by p + d, so applying RoPE and re-indexing
// a post-RoPE key (kvpress KeyRerotation) are the same op. Angles are computed in double.
#pragma once

#include <cstdint>
#include <span>
#include <string_view>

#include "kvc/core/backend.hpp"
#include "kvc/core/view.hpp"

namespace kvc::ops {

// rotate_half (HF Llama): channel c < D/2 pairs with c + D/2, frequency index c.
// interleaved (GPT-J / Meta original): channel 2i pairs with 2i + 1, frequency index i.
enum class RopeConvention { rotate_half, interleaved };

struct Rope {
  double theta = 10000.0;
  RopeConvention convention = RopeConvention::rotate_half;
};

RopeConvention parse_rope_convention(std::string_view name);  // "rotate_half" | "interleaved"

// Rotates every row of x [n, D] by its own amount (a position or a delta); D must be even.
void rope_rotate(Cpu, const Rope& rope, HostView<float, 2> x,
                 std::span<const std::int32_t> amounts);

}  // namespace kvc::ops
