// Decode attention with the H2O/TOVA score side output on the GPU
// (kvc::ops::decode_attention_with_scores) against the CPU reference: random ragged batches (one
// split and many, one-token and empty caches, lengths off every tile), the bundled real dump, and
// several accumulated decode steps. Every output and every score element is checked; outputs are
// poisoned, and entries past a sequence's length must come back bit-identical.
#include <algorithm>
#include <catch2/catch.hpp>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <random>
#include <vector>

#include "cuda/support.hpp"
#include "kvc/core/cuda_runtime.hpp"
#include "kvc/core/dtype.hpp"
#include "kvc/eval/dump.hpp"
#include "kvc/ops/attention.hpp"

namespace {

namespace rt = kvc::cuda_runtime;
namespace ops = kvc::ops;

constexpr double kU32 = 0x1p-24;  // fp32 unit roundoff

struct Case {
  int batch, q_heads, kv_heads, head_dim, max_length;
  std::vector<int> lengths;
  std::int64_t scores_pitch = 0;  // token rows of the score buffer per head (0: max_length)
};

using kvc::test::download;
using kvc::test::HostInputs;
using kvc::test::upload;

template <class Storage>
HostInputs<Storage> random_inputs(const Case& c, std::uint32_t seed) {
  return kvc::test::random_inputs<Storage>(c, seed, 1.5f);  // q peaky enough to exercise the max
}

std::uint32_t bits_of(float x) {
  std::uint32_t b;
  std::memcpy(&b, &x, sizeof b);
  return b;
}

// One GPU call. scores: the [B, Hkv, pitch] host buffer, uploaded, updated in place.
template <class Storage>
std::vector<float> run_gpu(const Case& c, const HostInputs<Storage>& in, std::vector<float>& scores,
                           const ops::ScoreOptions& score_options) {
  const std::int64_t b = c.batch, hq = c.q_heads, hkv = c.kv_heads, d = c.head_dim,
                     t = c.max_length, pitch = c.scores_pitch ? c.scores_pitch : c.max_length;
  auto q = upload(in.q), k = upload(in.k), v = upload(in.v);
  auto lengths = upload(c.lengths);
  auto scores_device = upload(scores);
  rt::DeviceBuffer out(static_cast<std::size_t>(b * hq * d) * sizeof(Storage));
  rt::fill_bytes(out.data(), 0xFF, out.bytes(), kvc::Cuda{});  // poison: NaN in bf16 and f16
  const std::size_t workspace_floats = ops::decode_attention_with_scores_workspace_floats(
      c.batch, c.q_heads, c.kv_heads, c.head_dim, c.max_length);
  rt::DeviceBuffer workspace(std::max<std::size_t>(workspace_floats, 1) * sizeof(float));
  rt::fill_bytes(workspace.data(), 0xFF, workspace.bytes(), kvc::Cuda{});
  kvc::DeviceView<float, 3> scores_view{
      scores_device.as<float>(), {b, hkv, t}, {hkv * pitch, pitch, 1}};
  ops::decode_attention_with_scores(
      kvc::Cuda{}, kvc::make_device_view(q.template as<const Storage>(), {b, hq, d}),
      kvc::make_device_view(k.template as<const Storage>(), {b, hkv, t, d}),
      kvc::make_device_view(v.template as<const Storage>(), {b, hkv, t, d}),
      kvc::make_device_view(lengths.template as<const std::int32_t>(), {b}),
      kvc::make_device_view(out.template as<Storage>(), {b, hq, d}), scores_view,
      kvc::make_device_view(workspace.template as<float>(),
                            {static_cast<std::int64_t>(workspace_floats)}),
      score_options);
  const auto result = download<Storage>(out, static_cast<std::size_t>(b * hq * d));
  scores = download<float>(scores_device, scores.size());
  std::vector<float> out_float(result.size());
  for (std::size_t i = 0; i < result.size(); ++i) out_float[i] = static_cast<float>(result[i]);
  return out_float;
}

// The reference of one step for one sequence: outputs, the group-reduced scores (overwrite
// semantics, double) and each score's tolerance.
//
// Tolerance of r[h, j] = sum over the group's heads of p[qh, j], derived: a probability's relative
// error on either side is at most e = (D + 2) u (A_j + 3 A_max) + (n + 8) u per side, where
// A_j = scale * sum_c |q_c k_jc| bounds the dot product's rounding (both sides round D products in
// different orders, the GPU also the log2(e) scaling), 3 A_max covers the subtraction of the max
// and the normaliser's terms, n u the normaliser's summation and the online rescaling, 8 u the exp.
// With round_f16 the two values can fall on either side of an f16 rounding boundary: one f16
// spacing more (2^-10 relative, 2^-24 absolute for subnormals). The g-term fp32 sum and the fp32
// update on the GPU add (g + 4) u of the magnitudes.
struct StepReference {
  std::vector<float> out;         // [Hq, D]
  std::vector<double> r;          // [Hkv, n]
  std::vector<double> tolerance;  // [Hkv, n]
  float max_v = 0.0f;
};

StepReference reference_step(const float* q, const float* k, const float* v, std::int64_t hq,
                             std::int64_t hkv, std::int64_t d, std::int64_t pitch, int n,
                             bool round_f16) {
  StepReference ref;
  ref.out.assign(static_cast<std::size_t>(hq * d), 0.0f);
  if (n == 0) return ref;
  kvc::HostView<const float, 3> kv{k, {hkv, n, d}, {pitch * d, d, 1}};
  kvc::HostView<const float, 3> vv{v, {hkv, n, d}, {pitch * d, d, 1}};
  const auto qv = kvc::make_view(q, {hq, d});
  std::vector<float> probabilities(static_cast<std::size_t>(hq * n));
  ops::decode_attention(kvc::Cpu{}, qv, kv, vv, kvc::make_view(ref.out.data(), {hq, d}),
                        kvc::make_view(probabilities.data(), {hq, n}));
  // The public CPU op must give the same scores as the sum written out here.
  std::vector<float> out2(ref.out.size()), op_scores(static_cast<std::size_t>(hkv * n), 0.0f);
  ops::decode_attention_with_scores(kvc::Cpu{}, qv, kv, vv, kvc::make_view(out2.data(), {hq, d}),
                                    kvc::make_view(op_scores.data(), {hkv, n}),
                                    {ops::ScoreUpdate::overwrite, round_f16});
  const std::int64_t group = hq / hkv;
  const double scale = 1.0 / std::sqrt(static_cast<double>(d));
  ref.r.assign(static_cast<std::size_t>(hkv * n), 0.0);
  ref.tolerance.assign(ref.r.size(), 0.0);
  std::vector<double> magnitude(static_cast<std::size_t>(n));
  for (std::int64_t h = 0; h < hq; ++h) {
    const std::int64_t kvh = h / group;
    double a_max = 0;
    for (int j = 0; j < n; ++j) {
      double a = 0;
      for (std::int64_t c = 0; c < d; ++c) a += std::fabs(double(q[h * d + c]) * kv(kvh, j, c));
      magnitude[j] = a * scale;
      a_max = std::max(a_max, magnitude[j]);
    }
    for (int j = 0; j < n; ++j) {
      const double p = probabilities[h * n + j];
      const double e = (d + 2) * kU32 * (magnitude[j] + 3 * a_max) + (n + 8) * kU32;
      double tol = 2 * e * p;
      if (round_f16)
        tol +=
            std::max(0x1p-24, std::ldexp(1.0, std::ilogb(std::max(p * (1 + 2 * e), 0x1p-24)) - 10));
      ref.r[kvh * n + j] += round_f16 ? static_cast<float>(kvc::f16(static_cast<float>(p))) : p;
      ref.tolerance[kvh * n + j] += tol;
    }
  }
  for (std::size_t i = 0; i < ref.r.size(); ++i) {
    ref.tolerance[i] += (group + 4) * kU32 * std::fabs(ref.r[i]);
    REQUIRE(std::fabs(op_scores[i] - ref.r[i]) <= kU32 * std::fabs(ref.r[i]));
  }
  for (std::int64_t h = 0; h < hkv; ++h)
    for (int j = 0; j < n; ++j)
      for (std::int64_t c = 0; c < d; ++c) ref.max_v = std::max(ref.max_v, std::fabs(vv(h, j, c)));
  return ref;
}

struct Worst {
  double excess = -1;
  std::int64_t index = -1;
  double gpu = 0, ref = 0;
  void update(double gpu_value, double ref_value, double tolerance, std::int64_t i) {
    const double e =
        std::isnan(gpu_value) ? INFINITY : std::fabs(gpu_value - ref_value) - tolerance;
    if (e > excess) excess = e, index = i, gpu = gpu_value, ref = ref_value;
  }
};

// Runs `steps` decode steps (step s uses the query rotated by s heads, so each step's attention
// differs) with the given score options, the score buffer starting from `initial`, and checks the
// outputs of the last step and the score buffer after all steps against the references.
template <class Storage>
void check_case(const Case& c, const HostInputs<Storage>& base, double unit_roundoff,
                const ops::ScoreOptions& options, int steps, std::uint32_t seed) {
  const std::int64_t b = c.batch, hq = c.q_heads, hkv = c.kv_heads, d = c.head_dim,
                     t = c.max_length, pitch = c.scores_pitch ? c.scores_pitch : c.max_length;
  const bool accumulate = options.update == ops::ScoreUpdate::accumulate;
  // Accumulation starts from random prior scores; overwriting from NaN (must be overwritten).
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> prior(0.0f, 4.0f);
  std::vector<float> scores(static_cast<std::size_t>(b * hkv * pitch));
  for (auto& x : scores) x = accumulate ? prior(rng) : std::nanf("");
  const std::vector<float> initial = scores;

  std::vector<double> expected(scores.size()), tolerance(scores.size(), 0.0);
  for (std::size_t i = 0; i < scores.size(); ++i) expected[i] = accumulate ? initial[i] : 0.0;
  HostInputs<Storage> in = base;
  std::vector<float> out;
  std::vector<StepReference> last(static_cast<std::size_t>(b));
  for (int step = 0; step < steps; ++step) {
    if (step > 0)  // the next query: heads rotated by one
      for (std::int64_t s = 0; s < b; ++s)
        std::rotate(in.q.begin() + s * hq * d, in.q.begin() + s * hq * d + d,
                    in.q.begin() + (s + 1) * hq * d);
    out = run_gpu(c, in, scores, options);
    std::vector<float> qf(in.q.size()), kf(in.k.size()), vf(in.v.size());
    for (std::size_t i = 0; i < qf.size(); ++i) qf[i] = static_cast<float>(in.q[i]);
    for (std::size_t i = 0; i < kf.size(); ++i) kf[i] = static_cast<float>(in.k[i]);
    for (std::size_t i = 0; i < vf.size(); ++i) vf[i] = static_cast<float>(in.v[i]);
    for (std::int64_t s = 0; s < b; ++s) {
      const int n = c.lengths[s];
      last[s] = reference_step(qf.data() + s * hq * d, kf.data() + s * hkv * t * d,
                               vf.data() + s * hkv * t * d, hq, hkv, d, t, n, options.round_f16);
      for (std::int64_t h = 0; h < hkv; ++h)
        for (int j = 0; j < n; ++j) {
          const std::size_t at = static_cast<std::size_t>((s * hkv + h) * pitch + j);
          const double r = last[s].r[h * n + j];
          expected[at] = accumulate ? expected[at] + r : r;
          // The fp32 update rounds once more per step on the GPU.
          tolerance[at] = (accumulate ? tolerance[at] : 0.0) + last[s].tolerance[h * n + j] +
                          2 * kU32 * std::fabs(expected[at]);
        }
    }
  }

  // Outputs of the last step, as the dense test checks them.
  Worst out_worst;
  for (std::int64_t s = 0; s < b; ++s) {
    const int n = c.lengths[s];
    for (std::int64_t i = 0; i < hq * d; ++i) {
      const double ref = last[s].out[i];
      const double tol = unit_roundoff * std::fabs(ref) + 2.0 * (n + 8) * kU32 * last[s].max_v;
      out_worst.update(out[s * hq * d + i], ref, tol, s * hq * d + i);
    }
  }
  // Every score element: within tolerance below the length, bit-identical to the initial buffer
  // beyond it (and in the padding of a pitched buffer).
  Worst score_worst;
  std::int64_t touched_beyond = 0;
  for (std::int64_t s = 0; s < b; ++s)
    for (std::int64_t h = 0; h < hkv; ++h)
      for (std::int64_t j = 0; j < pitch; ++j) {
        const std::size_t at = static_cast<std::size_t>((s * hkv + h) * pitch + j);
        if (j < c.lengths[s])
          score_worst.update(scores[at], expected[at], tolerance[at],
                             static_cast<std::int64_t>(at));
        else
          touched_beyond += bits_of(scores[at]) != bits_of(initial[at]);
      }
  INFO("shape B=" << c.batch << " Hq=" << c.q_heads << " Hkv=" << c.kv_heads << " D=" << c.head_dim
                  << " Tmax=" << c.max_length << " steps=" << steps
                  << " update=" << (accumulate ? "accumulate" : "overwrite")
                  << " round_f16=" << options.round_f16 << " seed=" << seed
                  << "; output: worst element " << out_worst.index << ": gpu " << out_worst.gpu
                  << " vs reference " << out_worst.ref << " (excess " << out_worst.excess
                  << "); scores: worst element " << score_worst.index << ": gpu " << score_worst.gpu
                  << " vs reference " << score_worst.ref << " (excess " << score_worst.excess
                  << "); entries changed beyond a length: " << touched_beyond);
  REQUIRE(out_worst.excess <= 0.0);
  REQUIRE(score_worst.excess <= 0.0);
  REQUIRE(touched_beyond == 0);
}

const std::vector<Case>& awkward_cases() {
  static const std::vector<Case> cases = {
      {3, 8, 2, 64, 777, {777, 1, 300}},                  // ragged, a one-token cache, 4 splits
      {2, 32, 8, 128, 5000, {5000, 4097}},                // several splits, Hq/Hkv = 4
      {1, 4, 4, 128, 33, {33}},                           // MHA (G = 1), one split
      {2, 16, 2, 128, 256, {256, 255}},                   // G = 8, one full split
      {2, 8, 1, 64, 2000, {1999, 0}, 2003},               // G = 8, empty sequence, pitched buffer
      {4, 16, 8, 128, 70000, {70000, 123, 65537, 4096}},  // long context, G = 2
      {1, 16, 2, 128, 200000, {199999}},                  // 125 splits (the cap is 128)
  };
  return cases;
}

}  // namespace

TEST_CASE("cuda decode attention with H2O scores (bf16) equals the reference",
          "[cuda][attention][scores]") {
  std::uint32_t seed = 300;
  for (const auto& c : awkward_cases()) {
    const auto in = random_inputs<kvc::bf16>(c, seed);
    check_case(c, in, 0x1p-8, ops::kH2oScores, 1, seed);
    ++seed;
  }
}

TEST_CASE("cuda decode attention with TOVA scores (bf16) equals the reference",
          "[cuda][attention][scores]") {
  std::uint32_t seed = 400;
  for (const auto& c : awkward_cases()) {
    const auto in = random_inputs<kvc::bf16>(c, seed);
    check_case(c, in, 0x1p-8, ops::kTovaScores, 1, seed);
    ++seed;
  }
}

TEST_CASE("cuda decode attention scores (f16) in every rounding and update mode",
          "[cuda][attention][scores][scores_small]") {
  // 12 splits; then one split (the block writes the scores itself), G = 8.
  for (const Case& c :
       {Case{2, 8, 2, 128, 3000, {3000, 2999}}, Case{3, 16, 2, 64, 200, {200, 1, 130}}}) {
    const auto in = random_inputs<kvc::f16>(c, 7);
    for (bool round : {true, false})
      for (auto update : {ops::ScoreUpdate::accumulate, ops::ScoreUpdate::overwrite})
        check_case(c, in, 0x1p-11, ops::ScoreOptions{update, round}, 1, 8);
  }
}

TEST_CASE("cuda decode attention scores accumulated over steps equal the sum of the steps",
          "[cuda][attention][scores]") {
  const Case many{2, 32, 8, 128, 20011, {20011, 777}};  // several splits
  check_case(many, random_inputs<kvc::bf16>(many, 11), 0x1p-8, ops::kH2oScores, 4, 12);
  const Case one{3, 8, 2, 64, 200, {200, 1, 57}};  // one split
  check_case(one, random_inputs<kvc::bf16>(one, 13), 0x1p-8, ops::kH2oScores, 5, 14);
  // Overwriting keeps only the last step.
  check_case(many, random_inputs<kvc::bf16>(many, 15), 0x1p-8, ops::kTovaScores, 3, 16);
}

TEST_CASE("cuda decode attention scores on the bundled real dump, several decode steps",
          "[cuda][attention][scores]") {
  const std::filesystem::path data = kvc::test::dump_path();
  REQUIRE(std::filesystem::exists(data));
  const kvc::KvDump dump = kvc::load_dump(data);
  const int t = dump.tokens;
  for (int layer : {0, 5, 7}) {
    const auto q = dump.q(layer), k = dump.k(layer), v = dump.v(layer);
    HostInputs<kvc::bf16> in;
    for (int h = 0; h < dump.kv_heads; ++h)
      for (int j = 0; j < t; ++j)
        for (int ch = 0; ch < dump.head_dim; ++ch) {
          in.k.push_back(kvc::bf16(k(h, j, ch)));
          in.v.push_back(kvc::bf16(v(h, j, ch)));
        }
    // H2O over the last 8 decode steps: step i attends with query token t - 8 + i over its
    // t - 8 + i + 1 visible keys; the accumulated scores must equal the sum of the steps.
    std::vector<float> scores(static_cast<std::size_t>(dump.kv_heads * t), 0.0f);
    std::vector<double> expected(scores.size(), 0.0), tolerance(scores.size(), 0.0);
    for (int i = 0; i < 8; ++i) {
      const int at = t - 8 + i;
      Case c{1, dump.q_heads, dump.kv_heads, dump.head_dim, t, {at + 1}};
      in.q.clear();
      for (int h = 0; h < dump.q_heads; ++h)
        for (int ch = 0; ch < dump.head_dim; ++ch) in.q.push_back(kvc::bf16(q(h, at, ch)));
      const auto out = run_gpu(c, in, scores, ops::kH2oScores);
      std::vector<float> qf, kf, vf;
      for (auto x : in.q) qf.push_back(static_cast<float>(x));
      for (auto x : in.k) kf.push_back(static_cast<float>(x));
      for (auto x : in.v) vf.push_back(static_cast<float>(x));
      const auto ref = reference_step(qf.data(), kf.data(), vf.data(), dump.q_heads, dump.kv_heads,
                                      dump.head_dim, t, at + 1, true);
      Worst out_worst;
      for (std::size_t e = 0; e < out.size(); ++e)
        out_worst.update(out[e], ref.out[e],
                         0x1p-8 * std::fabs(ref.out[e]) + 2.0 * (at + 9) * kU32 * ref.max_v,
                         static_cast<std::int64_t>(e));
      INFO("layer " << layer << " step " << i << ": worst output " << out_worst.index << ": gpu "
                    << out_worst.gpu << " vs " << out_worst.ref);
      REQUIRE(out_worst.excess <= 0.0);
      for (int h = 0; h < dump.kv_heads; ++h)
        for (int j = 0; j <= at; ++j) {
          const std::size_t e = static_cast<std::size_t>(h * t + j);
          expected[e] += ref.r[h * (at + 1) + j];
          tolerance[e] += ref.tolerance[h * (at + 1) + j] + 2 * kU32 * std::fabs(expected[e]);
        }
    }
    Worst worst;
    for (std::size_t e = 0; e < scores.size(); ++e)
      worst.update(scores[e], expected[e], tolerance[e], static_cast<std::int64_t>(e));
    INFO("layer " << layer << ": worst score " << worst.index << ": gpu " << worst.gpu << " vs "
                  << worst.ref << " (excess " << worst.excess << ")");
    REQUIRE(worst.excess <= 0.0);
    // The real attention is far from uniform (8 steps of uniform attention would give every
    // token about 8 g / t): the scores carry that signal, so the normaliser is really checked.
    const auto top = *std::max_element(expected.begin(), expected.end());
    REQUIRE(top > 10.0 * 8 * dump.group_size() / t);
  }
}

TEST_CASE("cuda decode attention with scores: an invalid length gives NaN and bad arguments throw",
          "[cuda][attention][scores][scores_small]") {
  // A length beyond Tmax cannot be checked on the host: the output and the whole row are NaN.
  Case c{2, 8, 2, 64, 300, {301, 300}};
  const auto in = random_inputs<kvc::bf16>(c, 21);
  std::vector<float> scores(static_cast<std::size_t>(2 * 2 * 300), 1.0f);
  const auto out = run_gpu(c, in, scores, ops::kH2oScores);
  for (int i = 0; i < 8 * 64; ++i) REQUIRE(std::isnan(out[i]));
  for (int i = 0; i < 2 * 300; ++i) REQUIRE(std::isnan(scores[i]));
  for (int i = 2 * 300; i < 4 * 300; ++i) REQUIRE(!std::isnan(scores[i]));

  rt::DeviceBuffer buffer(1 << 20);
  const auto* base = buffer.as<const kvc::bf16>();
  auto* out_ptr = buffer.as<kvc::bf16>();
  const auto lengths = kvc::make_device_view(buffer.as<const std::int32_t>(), {1});
  const auto workspace = kvc::make_device_view(buffer.as<float>(), {4096});
  auto call = [&](std::int64_t score_tokens, kvc::DeviceView<float, 1> ws) {
    ops::decode_attention_with_scores(
        kvc::Cuda{}, kvc::make_device_view(base, {1, 4, 64}),
        kvc::make_device_view(base, {1, 2, 8, 64}), kvc::make_device_view(base, {1, 2, 8, 64}),
        lengths, kvc::make_device_view(out_ptr, {1, 4, 64}),
        kvc::make_device_view(buffer.as<float>(), {1, 2, score_tokens}), ws);
  };
  REQUIRE_THROWS_WITH(call(7, workspace),
                      Catch::Contains("scores has shape [1, 2, 7]; expected [B, Hkv, Tmax]"));
  REQUIRE_THROWS_WITH(call(8, kvc::make_device_view(buffer.as<float>() + 1, {4000})),
                      Catch::Contains("workspace must be 16-byte aligned"));
  REQUIRE_THROWS_WITH(call(8, kvc::make_device_view(buffer.as<float>(), {3})),
                      Catch::Contains("workspace has 3 floats, needs"));
  REQUIRE_THROWS_WITH(
      ops::decode_attention_with_scores(
          kvc::Cuda{}, kvc::make_device_view(base, {1, 4, 96}),
          kvc::make_device_view(base, {1, 2, 8, 96}), kvc::make_device_view(base, {1, 2, 8, 96}),
          lengths, kvc::make_device_view(out_ptr, {1, 4, 96}),
          kvc::make_device_view(buffer.as<float>(), {1, 2, 8}), workspace),
      Catch::Contains("decode_attention_with_scores(cuda): head_dim = 96 is not supported"));
}
