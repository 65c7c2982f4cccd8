// Quantize + pack on the GPU (kvc/ops/quantize_cuda.hpp) against the CPU stores, byte for byte:
// KIVI channel blocks and token rows (ChannelQuantBlocks / TokenQuantRows, the layouts of
// docs/formats.md), per-token INT8/INT4, FP8 with static and computed scales (kvc::Fp8), and the
// KIVI / INT decode schedules (prefill split, appends, flushes) against kvc::Kivi and
// kvc::IntPerToken head stores. The math is the same on both sides, so codes and parameters must
// be identical: every field is compared and the mismatch count printed. Output buffers are
// poisoned, and rows or blocks past what an op should write must stay poisoned.
#include <algorithm>
#include <bit>
#include <catch2/catch.hpp>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "cuda/support.hpp"
#include "kvc/core/cuda_runtime.hpp"
#include "kvc/core/dtype.hpp"
#include "kvc/eval/dump.hpp"
#include "kvc/ops/quantize.hpp"
#include "kvc/ops/quantize_cuda.hpp"
#include "kvc/policies/quant/fp8.hpp"
#include "kvc/policies/quant/int_per_token.hpp"
#include "kvc/policies/quant/kivi.hpp"
#include "kvc/policies/quant/quantized_rows.hpp"

namespace {

namespace rt = kvc::cuda_runtime;
namespace ops = kvc::ops;
using kvc::Cuda;
using I64 = std::int64_t;

using kvc::test::download;
using kvc::test::dump_path;
using kvc::test::poisoned;
using kvc::test::upload;

// A [B, H, n, D] input as the model dtype holds it, and the exact float values the CPU reads.
template <class S>
struct Input {
  int batch = 0, heads = 0, tokens = 0, dim = 0;
  std::vector<S> x;
  std::vector<float> f;
  const float* row(int b, int h, int t) const {
    return f.data() + ((static_cast<I64>(b) * heads + h) * tokens + t) * dim;
  }
  kvc::HostView<const float, 2> head(int b, int h) const {  // [n, D]
    return kvc::make_view(row(b, h, 0), {I64{tokens}, I64{dim}});
  }
};

// Gaussian values with the awkward cases mixed in: rows of one value (zero-range token groups),
// rows of signed zeros (the minimum's sign must agree), rows of halves (exact ties before
// rounding), rows 300x wider, and on head 0 a constant channel (zero-range key blocks).
template <class S>
Input<S> random_input(int batch, int heads, int tokens, int dim, std::uint32_t seed) {
  Input<S> in{batch, heads, tokens, dim, {}, {}};
  std::mt19937 rng(seed);
  std::normal_distribution<float> gaussian(0.0f, 1.5f);
  for (int b = 0; b < batch; ++b)
    for (int h = 0; h < heads; ++h)
      for (int t = 0; t < tokens; ++t)
        for (int c = 0; c < dim; ++c) {
          float v = gaussian(rng);
          if (t % 11 == 3) v = -0.75f;
          if (t % 13 == 5) v = (c % 2) ? -0.0f : 0.0f;
          if (t % 7 == 2) v = 0.5f * static_cast<float>((c * 5 + t) % 9) - 2.0f;
          if (t % 17 == 9) v *= 300.0f;
          if (h == 0 && c == 5 % dim) v = 1.25f;
          in.x.push_back(S(v));
          in.f.push_back(static_cast<float>(in.x.back()));
        }
  return in;
}

template <class S>
Input<S> from_floats(const std::vector<float>& all, int batch, int heads, int tokens, int dim) {
  Input<S> in{batch, heads, tokens, dim, {}, {}};
  for (float v : all) {
    in.x.push_back(S(v));
    in.f.push_back(static_cast<float>(in.x.back()));
  }
  return in;
}

template <class S>
kvc::DeviceView<const S, 4> device_input(const rt::DeviceBuffer& buffer, const Input<S>& in) {
  return kvc::make_device_view(buffer.as<const S>(),
                               {I64{in.batch}, I64{in.heads}, I64{in.tokens}, I64{in.dim}});
}

std::uint32_t param_bits(float v, ops::ParamDType dtype) {
  return dtype == ops::ParamDType::f16 ? kvc::f16(v).bits : std::bit_cast<std::uint32_t>(v);
}

// Device parameters [B, H, rows, cols] of either dtype, poisoned.
struct ParamBuffer {
  ops::ParamDType dtype;
  I64 shape[4];
  rt::DeviceBuffer buffer;
  ParamBuffer(ops::ParamDType d, I64 b, I64 h, I64 rows, I64 cols)
      : dtype(d), shape{b, h, rows, cols}, buffer(poisoned(b * h * rows * cols * bytes())) {}
  I64 bytes() const { return ops::param_bytes(dtype); }
  ops::DeviceParams view() const {
    if (dtype == ops::ParamDType::f16)
      return ops::device_params(
          kvc::make_device_view(buffer.as<kvc::f16>(), {shape[0], shape[1], shape[2], shape[3]}));
    return ops::device_params(
        kvc::make_device_view(buffer.as<float>(), {shape[0], shape[1], shape[2], shape[3]}));
  }
  std::vector<std::uint32_t> bits() const {  // every element, widened
    const std::size_t n = static_cast<std::size_t>(shape[0] * shape[1] * shape[2] * shape[3]);
    std::vector<std::uint32_t> out(n);
    if (dtype == ops::ParamDType::f16) {
      const auto h = download<std::uint16_t>(buffer, n);
      std::copy(h.begin(), h.end(), out.begin());
    } else {
      out = download<std::uint32_t>(buffer, n);
    }
    return out;
  }
  std::uint32_t poison() const { return dtype == ops::ParamDType::f16 ? 0xFFFFu : 0xFFFFFFFFu; }
};

// Counts mismatching b-bit fields between two word arrays (and whole words for b = 32).
struct Mismatch {
  std::int64_t count = 0, first = -1;
  std::uint32_t got = 0, want = 0;
  void add(std::int64_t index, std::uint32_t g, std::uint32_t w) {
    if (count++ == 0) first = index, got = g, want = w;
  }
  std::string describe(const char* what) const {
    std::ostringstream out;
    out << what << ": " << count << " mismatches";
    if (count)
      out << "; first at " << first << ": got 0x" << std::hex << got << ", want 0x" << want;
    return out.str();
  }
};

void compare_field(Mismatch& m, std::int64_t index, std::uint32_t got, std::uint32_t want,
                   int bits) {
  if (bits >= 32) {
    if (got != want) m.add(index, got, want);
    return;
  }
  for (int j = 0; j < 32 / bits; ++j) {
    const auto g = ops::unpack_field(got, j, bits), w = ops::unpack_field(want, j, bits);
    if (g != w) m.add(index * (32 / bits) + j, g, w);
  }
}

// ---- channel axis ------------------------------------------------------------------------------

struct ChannelCase {
  int batch, heads, tokens, dim, bits, group;
  ops::ParamDType params;
};

template <class S>
void check_channel(const ChannelCase& c, const Input<S>& in) {
  const int words = c.group / (32 / c.bits), blocks = c.tokens / c.group, capacity = blocks + 1;
  const I64 b = c.batch, h = c.heads, d = c.dim;
  auto x = upload(in.x);
  auto codes = poisoned(b * h * capacity * d * words * 4);
  ParamBuffer scale(c.params, b, h, capacity, d), minimum(c.params, b, h, capacity, d);
  ops::ChannelBlocks out{
      kvc::make_device_view(codes.as<std::uint32_t>(), {b, h, I64{capacity}, d, I64{words}}),
      scale.view(), minimum.view()};
  const ops::QuantSpec spec{c.bits, c.group, false, c.params};
  ops::quantize_channel_blocks(Cuda{}, device_input(x, in), spec, out);
  const auto got = download<std::uint32_t>(codes, b * h * capacity * d * words);
  const auto got_scale = scale.bits(), got_minimum = minimum.bits();

  Mismatch code_m, scale_m, min_m, poison_m;
  for (int bi = 0; bi < c.batch; ++bi)
    for (int hi = 0; hi < c.heads; ++hi) {
      kvc::ChannelQuantBlocks ref;
      ref.reset({c.bits, c.group, c.params, kvc::QuantScheme::asymmetric}, c.dim);
      for (int k = 0; k < blocks; ++k)
        ref.push_block(in.head(bi, hi).slice(0, I64{k} * c.group, I64{k + 1} * c.group));
      const I64 head = I64{bi} * c.heads + hi;
      for (I64 i = 0; i < I64{capacity} * d * words; ++i) {
        const std::uint32_t g = got[head * capacity * d * words + i];
        if (i < I64{blocks} * d * words)
          compare_field(code_m, i, g, ref.codes()[i], c.bits);
        else if (g != 0xFFFFFFFFu)
          poison_m.add(i, g, 0xFFFFFFFFu);
      }
      for (I64 i = 0; i < I64{capacity} * d; ++i) {
        const std::uint32_t gs = got_scale[head * capacity * d + i];
        const std::uint32_t gm = got_minimum[head * capacity * d + i];
        if (i < I64{blocks} * d) {
          if (gs != param_bits(ref.scales()[i], c.params))
            scale_m.add(i, gs, param_bits(ref.scales()[i], c.params));
          if (gm != param_bits(ref.minimums()[i], c.params))
            min_m.add(i, gm, param_bits(ref.minimums()[i], c.params));
        } else if (gs != scale.poison() || gm != minimum.poison()) {
          poison_m.add(i, gs, scale.poison());
        }
      }
    }
  INFO("B " << c.batch << " H " << c.heads << " n " << c.tokens << " D " << c.dim << " bits "
            << c.bits << " G " << c.group << (c.params == ops::ParamDType::f32 ? " f32" : " f16"));
  INFO(code_m.describe("codes") << "; " << scale_m.describe("scales") << "; "
                                << min_m.describe("minimums") << "; "
                                << poison_m.describe("writes past the blocks"));
  CHECK(code_m.count == 0);
  CHECK(scale_m.count == 0);
  CHECK(min_m.count == 0);
  CHECK(poison_m.count == 0);
}

// ---- token axis --------------------------------------------------------------------------------

struct TokenCase {
  int batch, heads, tokens, dim;
  ops::QuantSpec spec;
  bool offsets = false;  // first_row per (b, h), some rows past the capacity
};

template <class S>
void check_token(const TokenCase& c, const Input<S>& in) {
  const auto& spec = c.spec;
  const I64 b = c.batch, h = c.heads, d = c.dim, words = ops::words_for(d, spec.bits);
  const I64 groups = d / spec.group;
  std::vector<std::int32_t> first(static_cast<std::size_t>(b * h), 0);
  if (c.offsets)
    for (std::size_t i = 0; i < first.size(); ++i) first[i] = static_cast<std::int32_t>(3 * i + 1);
  // With offsets the last head's rows partly pass the capacity and must be skipped.
  const I64 capacity = c.offsets ? c.tokens + 3 * (b * h - 1) + 1 - 2 : c.tokens + 2;
  auto x = upload(in.x);
  auto first_row = upload(first);
  auto codes = poisoned(b * h * capacity * words * 4);
  ParamBuffer scale(spec.params, b, h, capacity, groups),
      minimum(spec.params, b, h, capacity, groups);
  ops::TokenRows out{kvc::make_device_view(codes.as<std::uint32_t>(), {b, h, capacity, words}),
                     scale.view(), spec.symmetric ? ops::DeviceParams{} : minimum.view()};
  ops::quantize_token_rows(Cuda{}, device_input(x, in), spec, out,
                           c.offsets
                               ? kvc::make_device_view(first_row.as<const std::int32_t>(), {b, h})
                               : kvc::DeviceView<const std::int32_t, 2>{});
  const auto got = download<std::uint32_t>(codes, b * h * capacity * words);
  const auto got_scale = scale.bits(), got_minimum = minimum.bits();

  Mismatch code_m, scale_m, min_m, poison_m;
  for (int bi = 0; bi < c.batch; ++bi)
    for (int hi = 0; hi < c.heads; ++hi) {
      kvc::TokenQuantRows ref;
      ref.reset({spec.bits, spec.group, spec.params,
                 spec.symmetric ? kvc::QuantScheme::symmetric : kvc::QuantScheme::asymmetric},
                c.dim);
      for (int t = 0; t < c.tokens; ++t) ref.push(in.row(bi, hi, t));
      const I64 head = I64{bi} * c.heads + hi, offset = first[head];
      for (I64 r = 0; r < capacity; ++r) {
        const I64 t = r - offset;
        const bool written = t >= 0 && t < c.tokens;
        for (I64 w = 0; w < words; ++w) {
          const std::uint32_t g = got[(head * capacity + r) * words + w];
          if (written)
            compare_field(code_m, t * words + w, g, ref.codes()[t * words + w], spec.bits);
          else if (g != 0xFFFFFFFFu)
            poison_m.add(r * words + w, g, 0xFFFFFFFFu);
        }
        for (I64 k = 0; k < groups; ++k) {
          const std::uint32_t gs = got_scale[(head * capacity + r) * groups + k];
          const std::uint32_t gm = got_minimum[(head * capacity + r) * groups + k];
          if (written) {
            const std::uint32_t ws = param_bits(ref.scales()[t * groups + k], spec.params);
            if (gs != ws) scale_m.add(t * groups + k, gs, ws);
            if (!spec.symmetric) {
              const std::uint32_t wm = param_bits(ref.minimums()[t * groups + k], spec.params);
              if (gm != wm) min_m.add(t * groups + k, gm, wm);
            }
          } else if (gs != scale.poison()) {
            poison_m.add(r * groups + k, gs, scale.poison());
          }
          if ((spec.symmetric || !written) && gm != minimum.poison())
            poison_m.add(r * groups + k, gm, minimum.poison());
        }
      }
    }
  INFO("B " << c.batch << " H " << c.heads << " n " << c.tokens << " D " << c.dim << " bits "
            << spec.bits << " G " << spec.group << (spec.symmetric ? " sym" : " asym")
            << (spec.params == ops::ParamDType::f32 ? " f32" : " f16")
            << (c.offsets ? " with first_row" : ""));
  INFO(code_m.describe("codes") << "; " << scale_m.describe("scales") << "; "
                                << min_m.describe("minimums") << "; "
                                << poison_m.describe("writes outside the rows"));
  CHECK(code_m.count == 0);
  CHECK(scale_m.count == 0);
  CHECK(min_m.count == 0);
  CHECK(poison_m.count == 0);
}

// ---- FP8 ---------------------------------------------------------------------------------------

enum class ScaleMode { head, sequence, fixed };

template <class S>
void check_fp8(const Input<S>& in, ops::Fp8Kind kind, ScaleMode mode, float fixed_scale = 0.0f,
               bool offsets = false) {
  const I64 b = in.batch, h = in.heads, n = in.tokens, d = in.dim;
  auto x = upload(in.x);
  std::vector<std::int32_t> first(static_cast<std::size_t>(b * h), 0);
  if (offsets)
    for (std::size_t i = 0; i < first.size(); ++i) first[i] = static_cast<std::int32_t>(i % 3);
  const I64 capacity = n + 2;
  auto first_row = upload(first);
  auto codes = poisoned(b * h * capacity * d);
  auto scale = poisoned(b * h * 4);
  std::vector<float> fixed(1, fixed_scale);
  auto fixed_buffer = upload(fixed);
  kvc::DeviceView<const float, 2> scale_view;
  if (mode == ScaleMode::fixed) {
    scale_view = kvc::make_device_view(fixed_buffer.as<const float>(), {b, h});
    scale_view.strides = {0, 0};
  } else {
    const auto writable = kvc::make_device_view(scale.as<float>(), {b, h});
    ops::fp8_scales(
        Cuda{}, device_input(x, in), kind,
        mode == ScaleMode::head ? ops::Fp8ScaleScope::head : ops::Fp8ScaleScope::sequence,
        writable);
    scale_view = writable;
  }
  ops::quantize_fp8(Cuda{}, device_input(x, in), scale_view, kind,
                    kvc::make_device_view(codes.as<std::uint8_t>(), {b, h, capacity, d}),
                    offsets ? kvc::make_device_view(first_row.as<const std::int32_t>(), {b, h})
                            : kvc::DeviceView<const std::int32_t, 2>{});
  const auto got = download<std::uint8_t>(codes, b * h * capacity * d);
  const auto got_scale = download<std::uint32_t>(scale, b * h);

  Mismatch code_m, scale_m, poison_m;
  for (int bi = 0; bi < in.batch; ++bi) {
    // The oracle: kvc::Fp8 head stores fed the same float values (keys and values alike).
    kvc::Fp8 policy{.kind = kind};
    if (mode == ScaleMode::fixed) policy.key_scale = policy.value_scale = fixed_scale;
    if (mode == ScaleMode::sequence) policy.scope = kvc::Fp8Scope::tensor;
    const auto layer = kvc::make_view(in.row(bi, 0, 0), {h, n, d});
    for (int hi = 0; hi < in.heads; ++hi) {
      kvc::Fp8::HeadStore store;
      store.see_layer(policy, layer, layer);
      std::vector<std::int32_t> positions(static_cast<std::size_t>(n));
      for (int t = 0; t < n; ++t) positions[t] = t;
      store.load(policy, in.head(bi, hi), in.head(bi, hi), positions);
      const I64 head = I64{bi} * in.heads + hi, offset = first[head];
      if (mode != ScaleMode::fixed &&
          got_scale[head] != std::bit_cast<std::uint32_t>(store.key_scale()))
        scale_m.add(head, got_scale[head], std::bit_cast<std::uint32_t>(store.key_scale()));
      for (I64 r = 0; r < capacity; ++r)
        for (I64 c = 0; c < d; ++c) {
          const std::uint8_t g = got[(head * capacity + r) * d + c];
          const I64 t = r - offset;
          if (t >= 0 && t < n) {
            if (g != store.key_codes()[t * d + c])
              code_m.add(t * d + c, g, store.key_codes()[t * d + c]);
          } else if (g != 0xFF) {
            poison_m.add(r * d + c, g, 0xFF);
          }
        }
    }
  }
  INFO("B " << b << " H " << h << " n " << n << " D " << d << " kind "
            << (kind == ops::Fp8Kind::e4m3 ? "e4m3" : "e5m2") << " scale mode "
            << static_cast<int>(mode) << " fixed " << fixed_scale);
  INFO(code_m.describe("codes") << "; " << scale_m.describe("scales") << "; "
                                << poison_m.describe("writes outside the rows"));
  CHECK(code_m.count == 0);
  CHECK(scale_m.count == 0);
  CHECK(poison_m.count == 0);
}

// f16 rows of a device buffer [B, H, capacity, D] against float values (f16-exact) row by row.
void compare_f16_rows(Mismatch& m, const std::vector<std::uint16_t>& got, I64 head, I64 capacity,
                      I64 d, const std::vector<float>& want_rows, I64 first_want_row, I64 rows) {
  for (I64 r = 0; r < rows; ++r)
    for (I64 c = 0; c < d; ++c) {
      const std::uint16_t g = got[(head * capacity + r) * d + c];
      const std::uint16_t w = kvc::f16(want_rows[(first_want_row + r) * d + c]).bits;
      if (g != w) m.add(r * d + c, g, w);
    }
}

}  // namespace

TEST_CASE("cuda channel blocks (KIVI keys) equal the CPU store byte for byte", "[cuda][quantize]") {
  using P = ops::ParamDType;
  const std::vector<ChannelCase> cases = {
      {2, 3, 96, 64, 2, 32, P::f16},    // several blocks, two channel chunks of 32 + 32
      {1, 2, 128, 128, 4, 32, P::f16},  // KIVI-4
      {2, 1, 64, 64, 8, 16, P::f32},    // 8 bits, f32 parameters
      {1, 1, 32, 48, 2, 32, P::f16},    // D = 48: a partial channel chunk
      {1, 2, 256, 128, 2, 128, P::f16}, {1, 1, 16, 20, 4, 8, P::f16},  // D = 20: scalar loads
      {3, 2, 256, 64, 4, 256, P::f32},                                 // G = 256: 32 KB tiles
      {1, 1, 0, 64, 2, 32, P::f16},                                    // nothing to quantize
      {2, 2, 128, 128, 2, 64, P::f16},  // register kernel with G = 64
      {1, 3, 64, 6, 4, 16, P::f32},     // D = 6: three channel pairs, G = 16
      {2, 1, 64, 96, 8, 32, P::f16},    // 8 bits, G = 32
  };
  std::uint32_t seed = 11;
  for (const auto& c : cases) {
    check_channel(c, random_input<kvc::bf16>(c.batch, c.heads, c.tokens, c.dim, seed++));
    check_channel(c, random_input<kvc::f16>(c.batch, c.heads, c.tokens, c.dim, seed++));
  }
}

TEST_CASE("cuda token rows (KIVI values, INT8/INT4) equal the CPU store byte for byte",
          "[cuda][quantize]") {
  using P = ops::ParamDType;
  const std::vector<TokenCase> cases = {
      {2, 2, 70, 128, {2, 32, false, P::f16}},        // KIVI-2 values (fast path)
      {1, 3, 33, 128, {4, 64, false, P::f16}},        // KIVI-4 values
      {2, 1, 19, 64, {8, 16, false, P::f32}},         // 8 bits, f32
      {1, 2, 25, 48, {2, 16, false, P::f16}},         // D = 48
      {1, 1, 17, 96, {2, 48, false, P::f16}},         // G = 48: generic kernel
      {2, 2, 41, 128, {8, 128, true, P::f16}},        // INT8 symmetric, one group (vLLM-style)
      {1, 2, 40, 128, {4, 128, true, P::f16}},        // INT4 symmetric
      {2, 1, 37, 64, {4, 32, false, P::f16}},         // INT4 asymmetric, groups of 32
      {1, 2, 29, 64, {8, 64, true, P::f32}},          // INT8, f32 scales
      {1, 1, 23, 64, {4, 4, false, P::f16}},          // INT4, G = 4: groups share words (generic)
      {1, 1, 21, 100, {8, 100, true, P::f16}},        // D = 100: no vector loads (generic)
      {1, 2, 18, 36, {4, 12, true, P::f32}},          // D = 36: a partial last word (generic)
      {2, 3, 27, 128, {2, 32, false, P::f16}, true},  // first_row offsets, capacity cut
      {2, 3, 27, 64, {8, 64, true, P::f16}, true},
      {1, 2, 9, 36, {4, 12, false, P::f16}, true},  // generic with offsets
      {1, 1, 1, 128, {4, 128, true, P::f16}},       // one token
  };
  std::uint32_t seed = 101;
  for (const auto& c : cases) {
    check_token(c, random_input<kvc::bf16>(c.batch, c.heads, c.tokens, c.dim, seed++));
    check_token(c, random_input<kvc::f16>(c.batch, c.heads, c.tokens, c.dim, seed++));
  }
}

TEST_CASE("cuda FP8 codes and computed scales equal kvc::Fp8", "[cuda][quantize]") {
  for (auto kind : {ops::Fp8Kind::e4m3, ops::Fp8Kind::e5m2}) {
    const auto in = random_input<kvc::bf16>(2, 3, 45, 128, 7);
    check_fp8(in, kind, ScaleMode::head);
    check_fp8(in, kind, ScaleMode::sequence);
    check_fp8(in, kind, ScaleMode::fixed, 0.01f);      // most values saturate at +-max
    check_fp8(in, kind, ScaleMode::fixed, 3.0e3f);     // many values in the subnormal range
    check_fp8(in, kind, ScaleMode::head, 0.0f, true);  // rows at first_row offsets
    check_fp8(random_input<kvc::f16>(1, 2, 9, 20, 8), kind, ScaleMode::head);      // scalar path
    check_fp8(random_input<kvc::f16>(1, 1, 1, 64, 9), kind, ScaleMode::sequence);  // one token
  }
  // An all-zero head: scale 1 (vLLM / kvc::Fp8), codes of signed zeros keep their sign.
  Input<kvc::bf16> zeros{1, 2, 4, 16, {}, {}};
  for (int i = 0; i < 2 * 4 * 16; ++i) {
    zeros.x.push_back(kvc::bf16(i % 3 ? 0.0f : -0.0f));
    zeros.f.push_back(static_cast<float>(zeros.x.back()));
  }
  check_fp8(zeros, ops::Fp8Kind::e4m3, ScaleMode::head);
}

TEST_CASE("cuda quantize kernels equal the CPU stores on the real dump", "[cuda][quantize]") {
  const kvc::KvDump dump = kvc::load_dump(dump_path());
  const int l = dump.layers, h = dump.kv_heads, t = dump.tokens, d = dump.head_dim;
  // Layers as the batch axis; the dump is f16, so the f16 input holds its values exactly.
  const auto keys = from_floats<kvc::f16>(dump.k_all, l, h, t, d);
  const auto values = from_floats<kvc::f16>(dump.v_all, l, h, t, d);
  const auto keys_bf16 = from_floats<kvc::bf16>(dump.k_all, l, h, t, d);
  const int quantized = t - t % 32;
  auto prefix = [&](const auto& in) {  // the first `quantized` tokens (channel blocks)
    auto out = in;
    out.tokens = quantized;
    out.x.clear(), out.f.clear();
    for (int i = 0; i < l * h; ++i)
      for (I64 e = 0; e < I64{quantized} * d; ++e) {
        out.x.push_back(in.x[i * I64{t} * d + e]);
        out.f.push_back(in.f[i * I64{t} * d + e]);
      }
    return out;
  };
  using P = ops::ParamDType;
  for (int bits : {2, 4}) {
    check_channel({l, h, quantized, d, bits, 32, P::f16}, prefix(keys));
    check_channel({l, h, quantized, d, bits, 32, P::f16}, prefix(keys_bf16));
    check_token({l, h, t, d, {bits, 32, false, P::f16}}, values);
  }
  check_token({l, h, t, d, {8, 0 + d, true, P::f16}}, keys);  // int8
  check_token({l, h, t, d, {4, 32, false, P::f16}}, values);  // int4(sym=false, group=32)
  check_fp8(keys, ops::Fp8Kind::e4m3, ScaleMode::head);
  check_fp8(values, ops::Fp8Kind::e5m2, ScaleMode::sequence);

  // The packed keys are KIVI's [D, n / per_word] layout cut into blocks of G tokens: the CPU
  // op quantize_keys_per_channel gives the same words in that order.
  const auto in = prefix(keys);
  auto x = upload(in.x);
  const int words = 32 / (32 / 2);
  const I64 blocks = quantized / 32;
  auto codes = poisoned(I64{l} * h * blocks * d * words * 4);
  ParamBuffer scale(P::f16, l, h, blocks, d), minimum(P::f16, l, h, blocks, d);
  ops::quantize_channel_blocks(Cuda{}, device_input(x, in), {2, 32, false, P::f16},
                               {kvc::make_device_view(codes.as<std::uint32_t>(),
                                                      {I64{l}, I64{h}, blocks, I64{d}, I64{words}}),
                                scale.view(), minimum.view()});
  const auto got = download<std::uint32_t>(codes, I64{l} * h * blocks * d * words);
  Mismatch m;
  for (int head = 0; head < l * h; ++head) {
    std::vector<std::uint32_t> packed(static_cast<std::size_t>(d) * quantized / 16);
    std::vector<kvc::f16> s(static_cast<std::size_t>(d) * blocks), mn(s.size());
    ops::quantize_keys_per_channel(kvc::Cpu{}, in.head(head / h, head % h), 2, 32,
                                   kvc::make_view(packed.data(), {I64{d}, I64{quantized / 16}}),
                                   kvc::make_view(s.data(), {I64{d}, blocks}),
                                   kvc::make_view(mn.data(), {I64{d}, blocks}));
    for (I64 k = 0; k < blocks; ++k)
      for (I64 c = 0; c < d; ++c)
        for (I64 w = 0; w < words; ++w) {
          const std::uint32_t g = got[((head * blocks + k) * d + c) * words + w];
          const std::uint32_t want = packed[c * (quantized / 16) + k * words + w];
          if (g != want) m.add(((head * blocks + k) * d + c) * words + w, g, want);
        }
  }
  INFO(m.describe("blocks vs quantize_keys_per_channel"));
  CHECK(m.count == 0);
}

TEST_CASE("cuda KIVI prefill split, appends and flushes equal kvc::Kivi", "[cuda][quantize]") {
  // Ragged batch: sequence b starts with its own prompt length, so the flushes of different
  // sequences happen at different steps; every step appends one token to every sequence.
  const int batch = 3, heads = 2, dim = 64, group = 32, residual = 64, steps = 150;
  const std::vector<int> prompt = {70, 64, 10};
  const kvc::Kivi policy{.key_bits = 2, .value_bits = 4, .group = group, .residual = residual};
  const int total = *std::max_element(prompt.begin(), prompt.end()) + steps;
  const auto keys = random_input<kvc::bf16>(batch, heads, total, dim, 31);
  const auto values = random_input<kvc::bf16>(batch, heads, total, dim, 32);
  const I64 b = batch, h = heads, d = dim;
  const I64 key_blocks = total / group + 1, value_rows = total + 1;
  const ops::QuantSpec key_spec{2, group, false, ops::ParamDType::f16};
  const ops::QuantSpec value_spec{4, group, false, ops::ParamDType::f16};

  auto k_all = upload(keys.x), v_all = upload(values.x);
  const auto k_view = device_input(k_all, keys), v_view = device_input(v_all, values);
  auto key_codes = poisoned(b * h * key_blocks * d * (group / 16) * 4);
  ParamBuffer key_scale(ops::ParamDType::f16, b, h, key_blocks, d);
  ParamBuffer key_min(ops::ParamDType::f16, b, h, key_blocks, d);
  auto value_codes = poisoned(b * h * value_rows * (d / 8) * 4);
  ParamBuffer value_scale(ops::ParamDType::f16, b, h, value_rows, d / group);
  ParamBuffer value_min(ops::ParamDType::f16, b, h, value_rows, d / group);
  auto key_residual = poisoned(b * h * residual * d * 2);
  auto value_window = poisoned(b * h * (residual + 1) * d * 2);
  std::vector<std::int32_t> zeros(static_cast<std::size_t>(b * h), 0);
  auto key_rows = upload(zeros), key_quantized = upload(zeros);
  auto value_rows_n = upload(zeros), value_quantized = upload(zeros);
  const ops::ChannelBlocks key_out{
      kvc::make_device_view(key_codes.as<std::uint32_t>(), {b, h, key_blocks, d, I64{group / 16}}),
      key_scale.view(), key_min.view()};
  const ops::TokenRows value_out{
      kvc::make_device_view(value_codes.as<std::uint32_t>(), {b, h, value_rows, d / 8}),
      value_scale.view(), value_min.view()};
  const auto residual_view =
      kvc::make_device_view(key_residual.as<kvc::f16>(), {b, h, I64{residual}, d});
  const auto window_view =
      kvc::make_device_view(value_window.as<kvc::f16>(), {b, h, I64{residual + 1}, d});
  auto counts = [](rt::DeviceBuffer& buffer, I64 bb, I64 hh) {
    return kvc::make_device_view(buffer.as<std::int32_t>(), {bb, hh});
  };

  // Prefill, one sequence at a time (B = 1 slices): the KIVI split of n tokens.
  for (int bi = 0; bi < batch; ++bi) {
    const int n = prompt[bi];
    const int kq = n < residual ? 0 : n - n % residual, vq = n <= residual ? 0 : n - residual;
    auto seq = [&](auto view, I64 first, I64 last) {
      auto s = view.slice(0, bi, bi + 1);
      return s.slice(2, first, last);
    };
    auto key_slice = key_out;
    key_slice.codes = key_out.codes.slice(0, bi, bi + 1);
    auto slice_params = [&](ops::DeviceParams p) {
      p.data = static_cast<char*>(p.data) + bi * p.strides[0] * ops::param_bytes(p.dtype);
      p.shape[0] = 1;
      return p;
    };
    key_slice.scale = slice_params(key_out.scale);
    key_slice.minimum = slice_params(key_out.minimum);
    ops::quantize_channel_blocks(Cuda{}, seq(k_view, 0, kq), key_spec, key_slice);
    auto value_slice = value_out;
    value_slice.codes = value_out.codes.slice(0, bi, bi + 1);
    value_slice.scale = slice_params(value_out.scale);
    value_slice.minimum = slice_params(value_out.minimum);
    ops::quantize_token_rows(Cuda{}, seq(v_view, 0, vq), value_spec, value_slice);
    ops::append_rows(Cuda{}, seq(k_view, kq, n), residual_view.slice(0, bi, bi + 1),
                     counts(key_rows, b, h).slice(0, bi, bi + 1));
    ops::append_rows(Cuda{}, seq(v_view, vq, n), window_view.slice(0, bi, bi + 1),
                     counts(value_rows_n, b, h).slice(0, bi, bi + 1));
    std::vector<std::int32_t> q(static_cast<std::size_t>(h));
    std::fill(q.begin(), q.end(), kq);
    rt::copy_host_to_device(key_quantized.as<std::int32_t>() + bi * h, q.data(), h * 4, Cuda{});
    std::fill(q.begin(), q.end(), vq);
    rt::copy_host_to_device(value_quantized.as<std::int32_t>() + bi * h, q.data(), h * 4, Cuda{});
  }

  // The CPU stores, per (sequence, head).
  std::vector<kvc::Kivi::HeadStore> stores(static_cast<std::size_t>(b * h));
  for (int bi = 0; bi < batch; ++bi)
    for (int hi = 0; hi < heads; ++hi) {
      std::vector<std::int32_t> positions(prompt[bi]);
      for (int t = 0; t < prompt[bi]; ++t) positions[t] = t;
      stores[bi * h + hi].load(policy, keys.head(bi, hi).slice(0, 0, prompt[bi]),
                               values.head(bi, hi).slice(0, 0, prompt[bi]), positions);
    }

  for (int s = 0; s < steps; ++s) {
    // Token prompt[b] + s of every sequence: a [B, H, 1, D] view with per-sequence offsets is
    // not a strided view, so append one sequence at a time.
    for (int bi = 0; bi < batch; ++bi) {
      const I64 t = prompt[bi] + s;
      ops::append_rows(Cuda{}, k_view.slice(0, bi, bi + 1).slice(2, t, t + 1),
                       residual_view.slice(0, bi, bi + 1),
                       counts(key_rows, b, h).slice(0, bi, bi + 1));
      ops::append_rows(Cuda{}, v_view.slice(0, bi, bi + 1).slice(2, t, t + 1),
                       window_view.slice(0, bi, bi + 1),
                       counts(value_rows_n, b, h).slice(0, bi, bi + 1));
      for (int hi = 0; hi < heads; ++hi) {
        stores[bi * h + hi].append(policy, keys.row(bi, hi, static_cast<int>(t)),
                                   values.row(bi, hi, static_cast<int>(t)),
                                   static_cast<std::int32_t>(t));
        stores[bi * h + hi].after_step(policy);
      }
    }
    ops::flush_channel_residual(Cuda{}, residual_view, key_spec, key_out, counts(key_rows, b, h),
                                counts(key_quantized, b, h));
    ops::flush_token_window(Cuda{}, window_view, residual, value_spec, value_out,
                            counts(value_rows_n, b, h), counts(value_quantized, b, h));
  }

  const auto got_key_codes = download<std::uint32_t>(key_codes, b * h * key_blocks * d * 2);
  const auto got_value_codes = download<std::uint32_t>(value_codes, b * h * value_rows * d / 8);
  const auto got_key_scale = key_scale.bits(), got_key_min = key_min.bits();
  const auto got_value_scale = value_scale.bits(), got_value_min = value_min.bits();
  const auto got_residual = download<std::uint16_t>(key_residual, b * h * residual * d);
  const auto got_window = download<std::uint16_t>(value_window, b * h * (residual + 1) * d);
  const auto kq = download<std::int32_t>(key_quantized, b * h);
  const auto kr = download<std::int32_t>(key_rows, b * h);
  const auto vq = download<std::int32_t>(value_quantized, b * h);
  const auto vr = download<std::int32_t>(value_rows_n, b * h);

  Mismatch codes_m, params_m, rows_m;
  for (I64 head = 0; head < b * h; ++head) {
    const auto& store = stores[head];
    INFO("sequence " << head / h << " head " << head % h);
    REQUIRE(kq[head] == store.quantized_keys());
    REQUIRE(kr[head] == store.residual_keys());
    REQUIRE(vq[head] == store.quantized_values());
    REQUIRE(vr[head] == store.residual_values());
    const auto& kb = store.key_tensor().channel_blocks();
    for (std::size_t i = 0; i < kb.codes().size(); ++i)
      compare_field(codes_m, static_cast<I64>(i), got_key_codes[head * key_blocks * d * 2 + i],
                    kb.codes()[i], 2);
    for (std::size_t i = 0; i < kb.scales().size(); ++i) {
      const auto ws = param_bits(kb.scales()[i], ops::ParamDType::f16);
      const auto wm = param_bits(kb.minimums()[i], ops::ParamDType::f16);
      if (got_key_scale[head * key_blocks * d + i] != ws)
        params_m.add(i, got_key_scale[head * key_blocks * d + i], ws);
      if (got_key_min[head * key_blocks * d + i] != wm)
        params_m.add(i, got_key_min[head * key_blocks * d + i], wm);
    }
    const auto& vt = store.value_tensor().token_rows();
    for (std::size_t i = 0; i < vt.codes().size(); ++i)
      compare_field(codes_m, static_cast<I64>(i), got_value_codes[head * value_rows * d / 8 + i],
                    vt.codes()[i], 4);
    for (std::size_t i = 0; i < vt.scales().size(); ++i) {
      const auto ws = param_bits(vt.scales()[i], ops::ParamDType::f16);
      const auto wm = param_bits(vt.minimums()[i], ops::ParamDType::f16);
      if (got_value_scale[head * value_rows * (d / group) + i] != ws)
        params_m.add(i, got_value_scale[head * value_rows * (d / group) + i], ws);
      if (got_value_min[head * value_rows * (d / group) + i] != wm)
        params_m.add(i, got_value_min[head * value_rows * (d / group) + i], wm);
    }
    // Residual rows: the stores' dequantized output ends with them, f16-exact.
    std::vector<float> k_out(static_cast<std::size_t>(store.size()) * d), v_out(k_out.size());
    store.keys(kvc::make_view(k_out.data(), {I64{store.size()}, d}));
    store.values(kvc::make_view(v_out.data(), {I64{store.size()}, d}));
    compare_f16_rows(rows_m, got_residual, head, residual, d, k_out, store.quantized_keys(),
                     store.residual_keys());
    compare_f16_rows(rows_m, got_window, head, residual + 1, d, v_out, store.quantized_values(),
                     store.residual_values());
  }
  INFO(codes_m.describe("codes") << "; " << params_m.describe("parameters") << "; "
                                 << rows_m.describe("residual rows"));
  CHECK(codes_m.count == 0);
  CHECK(params_m.count == 0);
  CHECK(rows_m.count == 0);
}

TEST_CASE("cuda INT4 with an f16 window equals kvc::IntPerToken", "[cuda][quantize]") {
  // residual > 0: prefill quantizes all but the newest `residual` tokens from their f16 values,
  // each later token enters the window and the window's oldest row is quantized.
  const int batch = 2, heads = 2, dim = 64, window = 16, prompt = 40, steps = 30;
  const kvc::IntPerToken policy{.bits = 4, .symmetric = false, .group = 32, .residual = window};
  const ops::QuantSpec spec{4, 32, false, ops::ParamDType::f16};
  const int total = prompt + steps;
  const auto keys = random_input<kvc::bf16>(batch, heads, total, dim, 41);
  const I64 b = batch, h = heads, d = dim, capacity = total;
  auto x = upload(keys.x);
  const auto x_view = device_input(x, keys);
  auto staged = poisoned(b * h * prompt * d * 2);  // the prompt rounded to f16
  auto codes = poisoned(b * h * capacity * (d / 8) * 4);
  ParamBuffer scale(ops::ParamDType::f16, b, h, capacity, d / 32);
  ParamBuffer minimum(ops::ParamDType::f16, b, h, capacity, d / 32);
  auto window_rows = poisoned(b * h * (window + 1) * d * 2);
  std::vector<std::int32_t> zeros(static_cast<std::size_t>(b * h), 0);
  std::vector<std::int32_t> quantized0(static_cast<std::size_t>(b * h), prompt - window);
  auto staged_n = upload(zeros), window_n = upload(zeros), quantized_n = upload(quantized0);
  const ops::TokenRows out{
      kvc::make_device_view(codes.as<std::uint32_t>(), {b, h, capacity, d / 8}), scale.view(),
      minimum.view()};
  const auto staged_view = kvc::make_device_view(staged.as<kvc::f16>(), {b, h, I64{prompt}, d});
  const auto window_view =
      kvc::make_device_view(window_rows.as<kvc::f16>(), {b, h, I64{window + 1}, d});
  ops::append_rows(Cuda{}, x_view.slice(2, 0, prompt), staged_view,
                   kvc::make_device_view(staged_n.as<std::int32_t>(), {b, h}));
  const kvc::DeviceView<const kvc::f16, 4> staged_input = staged_view;
  ops::quantize_token_rows(Cuda{}, staged_input.slice(2, 0, prompt - window), spec, out);
  ops::append_rows(Cuda{}, x_view.slice(2, prompt - window, prompt), window_view,
                   kvc::make_device_view(window_n.as<std::int32_t>(), {b, h}));
  for (int s = 0; s < steps; ++s) {
    ops::append_rows(Cuda{}, x_view.slice(2, prompt + s, prompt + s + 1), window_view,
                     kvc::make_device_view(window_n.as<std::int32_t>(), {b, h}));
    ops::flush_token_window(Cuda{}, window_view, window, spec, out,
                            kvc::make_device_view(window_n.as<std::int32_t>(), {b, h}),
                            kvc::make_device_view(quantized_n.as<std::int32_t>(), {b, h}));
  }
  const auto got = download<std::uint32_t>(codes, b * h * capacity * d / 8);
  const auto got_scale = scale.bits(), got_min = minimum.bits();
  const auto got_window = download<std::uint16_t>(window_rows, b * h * (window + 1) * d);
  const auto qn = download<std::int32_t>(quantized_n, b * h);
  Mismatch codes_m, params_m, rows_m;
  for (int bi = 0; bi < batch; ++bi)
    for (int hi = 0; hi < heads; ++hi) {
      kvc::IntPerToken::HeadStore store;
      std::vector<std::int32_t> positions(prompt);
      for (int t = 0; t < prompt; ++t) positions[t] = t;
      store.load(policy, keys.head(bi, hi).slice(0, 0, prompt),
                 keys.head(bi, hi).slice(0, 0, prompt), positions);
      for (int t = prompt; t < total; ++t)
        store.append(policy, keys.row(bi, hi, t), keys.row(bi, hi, t), t);
      const I64 head = I64{bi} * h + hi;
      REQUIRE(qn[head] == store.quantized());
      const auto& rows = store.quantized_keys();
      for (std::size_t i = 0; i < rows.codes().size(); ++i)
        compare_field(codes_m, static_cast<I64>(i), got[head * capacity * d / 8 + i],
                      rows.codes()[i], 4);
      for (std::size_t i = 0; i < rows.scales().size(); ++i) {
        const auto ws = param_bits(rows.scales()[i], ops::ParamDType::f16);
        const auto wm = param_bits(rows.minimums()[i], ops::ParamDType::f16);
        if (got_scale[head * capacity * 2 + i] != ws)
          params_m.add(i, got_scale[head * capacity * 2 + i], ws);
        if (got_min[head * capacity * 2 + i] != wm)
          params_m.add(i, got_min[head * capacity * 2 + i], wm);
      }
      std::vector<float> k_out(static_cast<std::size_t>(store.size()) * d);
      store.keys(kvc::make_view(k_out.data(), {I64{store.size()}, d}));
      compare_f16_rows(rows_m, got_window, head, window + 1, d, k_out, store.quantized(),
                       store.window());
    }
  INFO(codes_m.describe("codes") << "; " << params_m.describe("parameters") << "; "
                                 << rows_m.describe("window rows"));
  CHECK(codes_m.count == 0);
  CHECK(params_m.count == 0);
  CHECK(rows_m.count == 0);
}

TEST_CASE("cuda quantize ops reject bad arguments on the host", "[cuda][quantize]") {
  auto x = poisoned(2 * 64 * 64 * 2);
  const auto in = kvc::make_device_view(x.as<const kvc::bf16>(), {1, 2, 64, 64});
  auto codes = poisoned(2 * 2 * 64 * 4 * 4);
  ParamBuffer scale(ops::ParamDType::f16, 1, 2, 2, 64), minimum(ops::ParamDType::f16, 1, 2, 2, 64);
  const ops::ChannelBlocks blocks{
      kvc::make_device_view(codes.as<std::uint32_t>(), {1, 2, 2, 64, 2}), scale.view(),
      minimum.view()};
  ops::quantize_channel_blocks(Cuda{}, in, {2, 32}, blocks);  // fits: no throw
  rt::synchronize(Cuda{});
  CHECK_THROWS_AS(ops::quantize_channel_blocks(Cuda{}, in, {3, 32}, blocks), kvc::Error);
  CHECK_THROWS_AS(ops::quantize_channel_blocks(Cuda{}, in.slice(2, 0, 40), {2, 32}, blocks),
                  kvc::Error);  // n not a multiple of G
  CHECK_THROWS_AS(ops::quantize_channel_blocks(Cuda{}, in, {2, 24}, blocks),
                  kvc::Error);  // G not a multiple of 16 at 2 bits
  CHECK_THROWS_AS(ops::quantize_channel_blocks(Cuda{}, in, {2, 16}, blocks),
                  kvc::Error);  // codes shape disagrees with G
  CHECK_THROWS_AS(
      ops::quantize_channel_blocks(Cuda{}, in, {2, 32, false, ops::ParamDType::f32}, blocks),
      kvc::Error);  // parameter dtype disagrees
  const ops::TokenRows rows{kvc::make_device_view(codes.as<std::uint32_t>(), {1, 2, 64, 4}),
                            scale.view(), minimum.view()};
  CHECK_THROWS_AS(ops::quantize_token_rows(Cuda{}, in, {2, 32}, rows), kvc::Error);  // params
  CHECK_THROWS_AS(ops::quantize_token_rows(Cuda{}, in, {2, 48}, rows), kvc::Error);  // D % G
}
