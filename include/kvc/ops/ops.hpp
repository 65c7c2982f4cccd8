// kvc/ops/ops.hpp: every stateless op of the CPU reference in one include.
//
//   #include "kvc/ops/ops.hpp"
//   kvc::ops::decode_attention(kvc::Cpu{}, q, k, v, out);
#pragma once

#include "kvc/ops/attention.hpp"
#include "kvc/ops/quantize.hpp"
#include "kvc/ops/quantized_attention.hpp"
#include "kvc/ops/rope.hpp"
#include "kvc/ops/scores.hpp"
#include "kvc/ops/select.hpp"
