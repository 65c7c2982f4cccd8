// Dense decode attention on the GPU against the CPU reference: random inputs of awkward shapes and
// the bundled real dump, every output element checked, outputs poisoned before each run.
#include <algorithm>
#include <catch2/catch.hpp>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <vector>

#include "cuda/support.hpp"
#include "kvc/core/cuda_runtime.hpp"
#include "kvc/core/dtype.hpp"
#include "kvc/eval/dump.hpp"
#include "kvc/ops/attention.hpp"

namespace {

namespace rt = kvc::cuda_runtime;

struct Case {
  int batch, q_heads, kv_heads, head_dim, max_length;
  std::vector<int> lengths;
};

using kvc::test::HostInputs;
using kvc::test::random_inputs;
using kvc::test::upload;

template <class Storage>
std::vector<float> to_float(const std::vector<Storage>& x) {
  std::vector<float> out(x.size());
  for (std::size_t i = 0; i < x.size(); ++i) out[i] = static_cast<float>(x[i]);
  return out;
}

// Runs the GPU op and compares every element with the fp32 CPU reference on the same (rounded)
// inputs. Tolerance, derived: the GPU output is rounded to Storage (relative error <= u, the unit
// roundoff: 2^-8 for bf16, 2^-11 for f16); both sides accumulate n products in fp32 in different
// orders and the GPU uses exp2f on log2(e)-scaled scores, so the weights differ by at most about
// (n + 8) * 2^-24 relative, which moves the output by at most twice that times max|v|.
template <class Storage>
void check_case(const Case& c, const HostInputs<Storage>& in, double unit_roundoff) {
  const std::int64_t b = c.batch, hq = c.q_heads, hkv = c.kv_heads, d = c.head_dim,
                     t = c.max_length;
  auto q = upload(in.q), k = upload(in.k), v = upload(in.v);
  auto lengths = upload(c.lengths);
  rt::DeviceBuffer out(static_cast<std::size_t>(b * hq * d) * sizeof(Storage));
  rt::fill_bytes(out.data(), 0xFF, out.bytes(), kvc::Cuda{});  // poison: NaN in bf16 and f16
  const std::size_t workspace_floats = kvc::ops::decode_attention_workspace_floats(
      c.batch, c.q_heads, c.kv_heads, c.head_dim, c.max_length);
  rt::DeviceBuffer workspace(std::max<std::size_t>(workspace_floats, 1) * sizeof(float));
  rt::fill_bytes(workspace.data(), 0xFF, workspace.bytes(), kvc::Cuda{});
  kvc::ops::decode_attention(kvc::Cuda{},
                             kvc::make_device_view(q.template as<const Storage>(), {b, hq, d}),
                             kvc::make_device_view(k.template as<const Storage>(), {b, hkv, t, d}),
                             kvc::make_device_view(v.template as<const Storage>(), {b, hkv, t, d}),
                             kvc::make_device_view(lengths.template as<const std::int32_t>(), {b}),
                             kvc::make_device_view(out.template as<Storage>(), {b, hq, d}),
                             kvc::make_device_view(workspace.template as<float>(),
                                                   {static_cast<std::int64_t>(workspace_floats)}));
  std::vector<Storage> result(static_cast<std::size_t>(b * hq * d));
  rt::copy_device_to_host(result.data(), out.data(), out.bytes(), kvc::Cuda{});
  rt::synchronize(kvc::Cuda{});

  const auto qf = to_float(in.q), kf = to_float(in.k), vf = to_float(in.v);
  double worst_excess = -1;
  std::int64_t worst_index = -1;
  double worst_gpu = 0, worst_ref = 0;
  for (std::int64_t s = 0; s < b; ++s) {
    const int n = c.lengths[s];
    std::vector<float> reference(static_cast<std::size_t>(hq * d), 0.0f);
    float max_v = 0.0f;
    if (n > 0) {
      const float* kp = kf.data() + s * hkv * t * d;
      const float* vp = vf.data() + s * hkv * t * d;
      kvc::HostView<const float, 3> kv{kp, {hkv, n, d}, {t * d, d, 1}};
      kvc::HostView<const float, 3> vv{vp, {hkv, n, d}, {t * d, d, 1}};
      kvc::ops::decode_attention(kvc::Cpu{}, kvc::make_view(qf.data() + s * hq * d, {hq, d}), kv,
                                 vv, kvc::make_view(reference.data(), {hq, d}));
      for (std::int64_t h = 0; h < hkv; ++h)
        for (int j = 0; j < n; ++j)
          for (std::int64_t c2 = 0; c2 < d; ++c2) max_v = std::max(max_v, std::fabs(vv(h, j, c2)));
    }
    for (std::int64_t i = 0; i < hq * d; ++i) {
      const double gpu = static_cast<float>(result[s * hq * d + i]);
      const double ref = reference[i];
      const double tolerance =
          unit_roundoff * std::fabs(ref) + 2.0 * (n + 8) * std::ldexp(1.0, -24) * max_v;
      const double excess = std::isnan(gpu) ? INFINITY : std::fabs(gpu - ref) - tolerance;
      if (excess > worst_excess) {
        worst_excess = excess;
        worst_index = s * hq * d + i;
        worst_gpu = gpu;
        worst_ref = ref;
      }
    }
  }
  INFO("shape B=" << c.batch << " Hq=" << c.q_heads << " Hkv=" << c.kv_heads << " D=" << c.head_dim
                  << " Tmax=" << c.max_length << "; worst element " << worst_index << ": gpu "
                  << worst_gpu << " vs reference " << worst_ref << " (excess over tolerance "
                  << worst_excess << ")");
  REQUIRE(worst_excess <= 0.0);
}

}  // namespace

TEST_CASE("cuda decode attention (bf16) equals the reference on awkward shapes",
          "[cuda][attention]") {
  const std::vector<Case> cases = {
      {3, 8, 2, 64, 777, {777, 1, 300}},                  // ragged batch, a one-token cache
      {2, 32, 8, 128, 5000, {5000, 4097}},                // several splits, Hq/Hkv = 4
      {1, 4, 4, 128, 33, {33}},                           // MHA (G = 1), shorter than a chunk
      {2, 8, 1, 64, 2000, {1999, 0}},                     // G = 8, an empty sequence gives zeros
      {4, 16, 8, 128, 70000, {70000, 123, 65537, 4096}},  // long context
  };
  std::uint32_t seed = 100;
  for (const auto& c : cases)
    check_case(c, random_inputs<kvc::bf16>(c, seed++), std::ldexp(1.0, -8));
}

TEST_CASE("cuda decode attention (f16) equals the reference", "[cuda][attention]") {
  const Case c{2, 8, 2, 128, 3000, {3000, 2999}};
  check_case(c, random_inputs<kvc::f16>(c, 7), std::ldexp(1.0, -11));
}

TEST_CASE("cuda decode attention on the bundled real dump", "[cuda][attention]") {
  const std::filesystem::path data = kvc::test::dump_path();
  REQUIRE(std::filesystem::exists(data));
  const kvc::KvDump dump = kvc::load_dump(data);
  const int t = 511;
  for (int layer : {0, 5, 7}) {
    Case c{1, dump.q_heads, dump.kv_heads, dump.head_dim, t + 1, {t + 1}};
    HostInputs<kvc::bf16> in;
    const auto q = dump.q(layer), k = dump.k(layer), v = dump.v(layer);
    for (int h = 0; h < dump.q_heads; ++h)
      for (int ch = 0; ch < dump.head_dim; ++ch) in.q.push_back(kvc::bf16(q(h, t, ch)));
    for (int h = 0; h < dump.kv_heads; ++h)
      for (int j = 0; j <= t; ++j)
        for (int ch = 0; ch < dump.head_dim; ++ch) {
          in.k.push_back(kvc::bf16(k(h, j, ch)));
          in.v.push_back(kvc::bf16(v(h, j, ch)));
        }
    check_case(c, in, std::ldexp(1.0, -8));
  }
}

TEST_CASE("cuda decode attention rejects bad arguments", "[cuda][attention]") {
  rt::DeviceBuffer buffer(1 << 20);
  const auto* base = buffer.as<const kvc::bf16>();
  auto* out = buffer.as<kvc::bf16>();
  const auto lengths = kvc::make_device_view(buffer.as<const std::int32_t>(), {1});
  const auto workspace = kvc::make_device_view(buffer.as<float>(), {1024});
  REQUIRE_THROWS_WITH(
      kvc::ops::decode_attention(kvc::Cuda{}, kvc::make_device_view(base, {1, 4, 96}),
                                 kvc::make_device_view(base, {1, 2, 8, 96}),
                                 kvc::make_device_view(base, {1, 2, 8, 96}), lengths,
                                 kvc::make_device_view(out, {1, 4, 96}), workspace),
      Catch::Contains("head_dim = 96 is not supported; allowed: {64, 128}"));
  REQUIRE_THROWS_WITH(
      kvc::ops::decode_attention(kvc::Cuda{}, kvc::make_device_view(base, {1, 6, 64}),
                                 kvc::make_device_view(base, {1, 4, 8, 64}),
                                 kvc::make_device_view(base, {1, 4, 8, 64}), lengths,
                                 kvc::make_device_view(out, {1, 6, 64}), workspace),
      Catch::Contains("must be a multiple of Hkv = 4"));
  REQUIRE_THROWS_WITH(
      kvc::ops::decode_attention(kvc::Cuda{}, kvc::make_device_view(base + 1, {1, 4, 64}),
                                 kvc::make_device_view(base, {1, 2, 8, 64}),
                                 kvc::make_device_view(base, {1, 2, 8, 64}), lengths,
                                 kvc::make_device_view(out, {1, 4, 64}), workspace),
      Catch::Contains("16-byte boundaries"));
}

namespace {

// decode_attention on one set of inputs, K and V either contiguous [B, Hkv, Tmax, D] or interleaved
// in one buffer [B, Hkv, Tmax + 3, 2, D] (row stride 2 D, K at 0, V at D): the output's bytes.
std::vector<kvc::bf16> run_layout(const Case& c, const HostInputs<kvc::bf16>& in,
                                  bool interleaved) {
  const std::int64_t b = c.batch, hq = c.q_heads, hkv = c.kv_heads, d = c.head_dim,
                     t = c.max_length, capacity = t + 3;
  std::vector<kvc::bf16> kv(static_cast<std::size_t>(b * hkv * capacity * 2 * d), kvc::bf16(0.0f));
  for (std::int64_t r = 0; r < b * hkv; ++r)
    for (std::int64_t j = 0; j < t; ++j)
      for (std::int64_t ch = 0; ch < d; ++ch) {
        const std::size_t src = static_cast<std::size_t>((r * t + j) * d + ch);
        const std::size_t dst = static_cast<std::size_t>(((r * capacity + j) * 2) * d + ch);
        kv[dst] = in.k[src];
        kv[dst + d] = in.v[src];
      }
  auto q = upload(in.q), k = upload(in.k), v = upload(in.v), both = upload(kv);
  auto lengths = upload(c.lengths);
  rt::DeviceBuffer out(static_cast<std::size_t>(b * hq * d) * sizeof(kvc::bf16));
  rt::fill_bytes(out.data(), 0xFF, out.bytes(), kvc::Cuda{});
  const std::size_t workspace_floats = kvc::ops::decode_attention_workspace_floats(
      c.batch, c.q_heads, c.kv_heads, c.head_dim, c.max_length);
  rt::DeviceBuffer workspace(std::max<std::size_t>(workspace_floats, 1) * sizeof(float));
  auto kview = kvc::make_device_view(k.as<const kvc::bf16>(), {b, hkv, t, d});
  auto vview = kvc::make_device_view(v.as<const kvc::bf16>(), {b, hkv, t, d});
  if (interleaved) {
    const std::int64_t strides[4] = {hkv * capacity * 2 * d, capacity * 2 * d, 2 * d, 1};
    kview.data = both.as<const kvc::bf16>();
    vview.data = both.as<const kvc::bf16>() + d;
    for (int i = 0; i < 4; ++i) kview.strides[i] = vview.strides[i] = strides[i];
  }
  kvc::ops::decode_attention(
      kvc::Cuda{}, kvc::make_device_view(q.as<const kvc::bf16>(), {b, hq, d}), kview, vview,
      kvc::make_device_view(lengths.as<const std::int32_t>(), {b}),
      kvc::make_device_view(out.as<kvc::bf16>(), {b, hq, d}),
      kvc::make_device_view(workspace.as<float>(), {static_cast<std::int64_t>(workspace_floats)}));
  std::vector<kvc::bf16> result(static_cast<std::size_t>(b * hq * d));
  rt::copy_device_to_host(result.data(), out.data(), out.bytes(), kvc::Cuda{});
  rt::synchronize(kvc::Cuda{});
  return result;
}

}  // namespace

// The kernel copies K and V row by row, so a row stride other than D (K and V interleaved in one
// cache buffer) must give bit-identical outputs to the contiguous layout, itself checked above.
TEST_CASE("cuda decode attention on interleaved K/V rows equals the contiguous layout",
          "[cuda][attention]") {
  const std::vector<Case> cases = {
      {2, 32, 8, 128, 5000, {5000, 2100}},  // several splits
      {3, 8, 2, 64, 300, {300, 1, 45}},     // one split, ragged
  };
  std::uint32_t seed = 300;
  for (const auto& c : cases) {
    const auto in = random_inputs<kvc::bf16>(c, seed++);
    const auto contiguous = run_layout(c, in, false);
    const auto interleaved = run_layout(c, in, true);
    std::size_t differing = 0;
    for (std::size_t i = 0; i < contiguous.size(); ++i) {
      const float x = static_cast<float>(contiguous[i]), y = static_cast<float>(interleaved[i]);
      if (!(x == y)) ++differing;  // NaN (unwritten) counts as differing
    }
    INFO("shape B=" << c.batch << " Hq=" << c.q_heads << " D=" << c.head_dim);
    REQUIRE(differing == 0);
  }
}

// K and V rows past a sequence's length are cache memory the op must not let through: the kernel
// copies whole 32-row tiles, so the tail of the last tile (up to Tmax, which is not a multiple of
// 32 here) holds them. NaN and Inf there must leave the output bit-identical to finite values.
TEST_CASE("cuda decode attention ignores NaN and Inf past each sequence's length",
          "[cuda][attention]") {
  const std::vector<Case> cases = {
      {3, 16, 4, 128, 300, {290, 33, 0}},  // one split: tails inside and past Tmax
      {2, 8, 1, 64, 5000, {4999, 2085}},   // several splits, G = 8
  };
  std::uint32_t seed = 400;
  for (const auto& c : cases) {
    const auto in = random_inputs<kvc::bf16>(c, seed++);
    auto poisoned = in;
    const std::int64_t rows = c.max_length, d = c.head_dim;
    for (int s = 0; s < c.batch; ++s)
      for (std::int64_t h = 0; h < c.kv_heads; ++h)
        for (std::int64_t j = c.lengths[s]; j < rows; ++j)
          for (std::int64_t ch = 0; ch < d; ++ch) {
            const std::size_t i =
                static_cast<std::size_t>(((s * c.kv_heads + h) * rows + j) * d + ch);
            poisoned.k[i] = kvc::bf16(ch % 2 ? INFINITY : NAN);
            poisoned.v[i] = kvc::bf16(ch % 2 ? NAN : -INFINITY);
          }
    const auto clean = run_layout(c, in, false);
    const auto dirty = run_layout(c, poisoned, false);
    std::size_t differing = 0;
    for (std::size_t i = 0; i < clean.size(); ++i) {
      const float x = static_cast<float>(clean[i]), y = static_cast<float>(dirty[i]);
      if (!(x == y)) ++differing;  // NaN counts as differing
    }
    INFO("shape B=" << c.batch << " Hq=" << c.q_heads << " D=" << c.head_dim);
    REQUIRE(differing == 0);
  }
}
