// The SnapKV prefill path on the GPU (kvc/ops/selection.hpp) against the CPU reference: window
// scores with GQA reduction and pooling within derived bounds, top-k index sets exactly equal (on
// identical scores, distinct and tied), compaction bit-exact; awkward shapes and the real dump.
#include <algorithm>
#include <catch2/catch.hpp>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <functional>
#include <limits>
#include <numeric>
#include <random>
#include <set>
#include <vector>

#include "cuda/support.hpp"
#include "kvc/core/cuda_runtime.hpp"
#include "kvc/core/dtype.hpp"
#include "kvc/eval/dump.hpp"
#include "kvc/ops/scores.hpp"
#include "kvc/ops/select.hpp"
#include "kvc/ops/selection.hpp"

namespace {

namespace rt = kvc::cuda_runtime;
namespace ops = kvc::ops;
using kvc::Cuda;

using kvc::test::bytes_view;
using kvc::test::download;
using kvc::test::dump_path;
using kvc::test::poisoned;
using kvc::test::upload;

struct ScoreCase {
  int q_heads, kv_heads, head_dim, tokens, window, kernel;
  ops::Pool pool;
  bool per_query_head;  // S = Hq (repeat) rather than Hkv (group mean)
  ops::ScoreReduction reduction = ops::ScoreReduction::sum;
  ops::ProbabilityRounding rounding = ops::ProbabilityRounding::f16;
};

// Inputs as the model dtype holds them; the CPU reference reads their exact float values.
template <class Storage>
struct ScoreInputs {
  std::vector<Storage> q, k;  // [Hq, W, D], [Hkv, T, D]
  std::vector<float> qf, kf;
};

template <class Storage>
ScoreInputs<Storage> random_score_inputs(const ScoreCase& c, std::uint32_t seed, float q_scale) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> gaussian(0.0f, 1.0f);
  ScoreInputs<Storage> in;
  for (std::int64_t i = 0; i < std::int64_t{c.q_heads} * c.window * c.head_dim; ++i)
    in.q.push_back(Storage(gaussian(rng) * q_scale));
  for (std::int64_t i = 0; i < std::int64_t{c.kv_heads} * c.tokens * c.head_dim; ++i)
    in.k.push_back(Storage(gaussian(rng)));
  for (auto x : in.q) in.qf.push_back(static_cast<float>(x));
  for (auto x : in.k) in.kf.push_back(static_cast<float>(x));
  return in;
}

struct Reference {
  std::vector<float> pooled;     // [S, T - W]: the CPU reference chain
  std::vector<float> tolerance;  // [S, T - W]: bound on |gpu - reference|
};

// The CPU chain (window_scores, group mean in double as snapkv_pooled_scores does, pool1d) and a
// bound on the GPU's distance from it, derived per element:
//  - a score s_ij = scale * q_i . k_j differs by at most eps = (D + 1) 2^-22 sigma_i with
//    sigma_i = scale * max_j sum_c |q_ic k_jc| (fp32 accumulations in different orders, tensor-core
//    accumulation counted at 2^-23 per add);
//  - exp(s - max) then differs relatively by e = 2 eps + 4 sigma_i 2^-24 + 2^-21 (expf: 2 ulp), the
//    row sum by e + (T + 128 + tiles) 2^-24 (the CPU's sequential sum and the GPU's tile sums),
//    so the probability by delta_i = 2 e + (T + 128 + tiles) 2^-24 + 2^-23;
//  - rounding to the model dtype (unit roundoff u) may then land on neighbouring values: |dr| <=
//    (delta_i + 2u) p_ij, plus the f16 subnormal step 2^-24;
//  - the W-row sum adds 2 W 2^-24 relative, the group mean (G + 2) 2^-24; avg pooling sums the
//    bounds of its window / kernel (+ 2 kernel 2^-24 relative), max pooling takes their max.
template <class Storage>
Reference reference_scores(const ScoreCase& c, const ScoreInputs<Storage>& in) {
  const int hq = c.q_heads, hkv = c.kv_heads, d = c.head_dim, t = c.tokens, w = c.window;
  const int prefix = t - w, group = hq / hkv, s_heads = c.per_query_head ? hq : hkv;
  const double ulp24 = std::ldexp(1.0, -24);
  const double u = c.rounding == ops::ProbabilityRounding::f16    ? std::ldexp(1.0, -11)
                   : c.rounding == ops::ProbabilityRounding::bf16 ? std::ldexp(1.0, -8)
                                                                  : 0.0;
  const double subnormal = c.rounding == ops::ProbabilityRounding::f16 ? ulp24 : 1e-37;
  const double scale = 1.0 / std::sqrt(static_cast<double>(d));
  const int tiles = (t + 127) / 128;

  std::vector<float> scores(static_cast<std::size_t>(hq) * prefix);
  ops::WindowScoreOptions options;
  options.reduction = c.reduction;
  options.rounding = c.rounding;
  ops::window_scores(kvc::Cpu{}, kvc::make_view(in.qf.data(), {hq, w, d}),
                     kvc::make_view(in.kf.data(), {hkv, t, d}),
                     kvc::make_view(scores.data(), {hq, prefix}), options);

  std::vector<double> head_tolerance(static_cast<std::size_t>(hq) * prefix, 0.0);
  std::vector<double> logits(t), magnitude(t);
  for (int h = 0; h < hq; ++h) {
    const int kv = h / group;
    for (int i = 0; i < w; ++i) {
      const int last = prefix + i;
      double sigma = 0, max_logit = -INFINITY;
      for (int j = 0; j <= last; ++j) {
        double dot = 0, abs_dot = 0;
        for (int ch = 0; ch < d; ++ch) {
          const double x =
              in.qf[(static_cast<std::size_t>(h) * w + i) * d + ch] *
              static_cast<double>(in.kf[(static_cast<std::size_t>(kv) * t + j) * d + ch]);
          dot += x;
          abs_dot += std::fabs(x);
        }
        logits[j] = dot * scale;
        sigma = std::max(sigma, abs_dot * scale);
        max_logit = std::max(max_logit, logits[j]);
      }
      double total = 0;
      for (int j = 0; j <= last; ++j) total += std::exp(logits[j] - max_logit);
      const double eps = (d + 1) * std::ldexp(1.0, -22) * sigma;
      const double e = 2 * eps + 4 * sigma * ulp24 + std::ldexp(1.0, -21);
      const double delta = 2 * e + (t + 128 + tiles) * ulp24 + std::ldexp(1.0, -23);
      for (int j = 0; j < prefix; ++j) {
        const double p = std::exp(logits[j] - max_logit) / total;
        head_tolerance[static_cast<std::size_t>(h) * prefix + j] +=
            (delta + 2 * u) * p * 1.001 + subnormal;
      }
    }
  }
  std::vector<float> reduced(static_cast<std::size_t>(s_heads) * prefix);
  std::vector<double> reduced_tolerance(reduced.size());
  for (int s = 0; s < s_heads; ++s) {
    for (int j = 0; j < prefix; ++j) {
      const auto at = [&](int h) { return static_cast<std::size_t>(h) * prefix + j; };
      const double mean_divisor = c.reduction == ops::ScoreReduction::mean ? w : 1.0;
      if (c.per_query_head) {
        reduced[s * prefix + j] = scores[at(s)];
        reduced_tolerance[s * prefix + j] =
            head_tolerance[at(s)] / mean_divisor + 2 * w * ulp24 * std::fabs(scores[at(s)]);
      } else {
        double sum = 0, tolerance = 0;
        for (int h = s * group; h < (s + 1) * group; ++h) {
          sum += scores[at(h)];
          tolerance += head_tolerance[at(h)] / mean_divisor + 2 * w * ulp24 * scores[at(h)];
        }
        reduced[s * prefix + j] = static_cast<float>(sum / group);
        reduced_tolerance[s * prefix + j] =
            tolerance / group + (group + 2) * ulp24 * std::fabs(sum / group);
      }
    }
  }
  Reference ref;
  ref.pooled.resize(reduced.size());
  ref.tolerance.resize(reduced.size());
  ops::pool1d(kvc::Cpu{},
              kvc::make_view(static_cast<const float*>(reduced.data()), {s_heads, prefix}),
              kvc::make_view(ref.pooled.data(), {s_heads, prefix}), c.kernel, c.pool);
  const int radius = c.kernel / 2;
  for (int s = 0; s < s_heads; ++s)
    for (int j = 0; j < prefix; ++j) {
      double bound = 0;
      for (int x = std::max(0, j - radius); x < std::min(prefix, j + radius + 1); ++x) {
        const double b = reduced_tolerance[s * prefix + x];
        bound = c.pool == ops::Pool::avg ? bound + b / c.kernel : std::max(bound, b);
      }
      if (c.pool == ops::Pool::avg)
        bound += 2 * c.kernel * ulp24 * std::fabs(ref.pooled[s * prefix + j]);
      ref.tolerance[s * prefix + j] = static_cast<float>(bound * 1.01 + 1e-30);
    }
  return ref;
}

template <class Storage>
std::vector<float> gpu_scores(const ScoreCase& c, const ScoreInputs<Storage>& in) {
  const std::int64_t hq = c.q_heads, hkv = c.kv_heads, d = c.head_dim, t = c.tokens, w = c.window;
  const std::int64_t s = c.per_query_head ? hq : hkv, prefix = t - w;
  auto q = upload(in.q), k = upload(in.k);
  auto pooled = poisoned(static_cast<std::size_t>(s * prefix) * sizeof(float));
  auto workspace = poisoned(
      ops::snapkv_scores_workspace_bytes(c.q_heads, c.window, c.tokens, static_cast<int>(s)));
  ops::WindowScoreOptions options;
  options.reduction = c.reduction;
  options.rounding = c.rounding;
  ops::snapkv_scores(Cuda{}, kvc::make_device_view(q.template as<const Storage>(), {hq, w, d}),
                     kvc::make_device_view(k.template as<const Storage>(), {hkv, t, d}), c.kernel,
                     c.pool, kvc::make_device_view(pooled.as<float>(), {s, prefix}),
                     bytes_view(workspace), options);
  return download<float>(pooled, static_cast<std::size_t>(s * prefix));
}

// Every element within its bound; prints the worst one.
void require_within(const ScoreCase& c, const std::vector<float>& gpu, const Reference& ref,
                    std::uint32_t seed) {
  REQUIRE(gpu.size() == ref.pooled.size());
  double worst_ratio = -1;
  std::size_t worst = 0;
  for (std::size_t i = 0; i < gpu.size(); ++i) {
    const double error = std::fabs(static_cast<double>(gpu[i]) - ref.pooled[i]);
    const double ratio = std::isnan(gpu[i]) ? INFINITY : error / ref.tolerance[i];
    if (ratio > worst_ratio) {
      worst_ratio = ratio;
      worst = i;
    }
  }
  const std::size_t prefix = static_cast<std::size_t>(c.tokens - c.window);
  INFO("shape Hq=" << c.q_heads << " Hkv=" << c.kv_heads << " D=" << c.head_dim << " T=" << c.tokens
                   << " W=" << c.window << " kernel=" << c.kernel << " seed=" << seed
                   << "; worst element [" << (prefix ? worst / prefix : 0) << ", "
                   << (prefix ? worst % prefix : 0) << "]: gpu "
                   << (gpu.empty() ? 0.0f : gpu[worst]) << " vs reference "
                   << (gpu.empty() ? 0.0f : ref.pooled[worst])
                   << ", |error| / bound = " << worst_ratio);
  REQUIRE(worst_ratio <= 1.0);
}

std::vector<std::int32_t> cpu_top_k(const std::vector<float>& scores, int rows, int n, int k) {
  std::vector<std::int32_t> indices(static_cast<std::size_t>(rows) * k);
  ops::top_k(kvc::Cpu{}, kvc::make_view(scores.data(), {rows, n}), k,
             kvc::make_view(indices.data(), {rows, k}));
  return indices;
}

std::vector<std::int32_t> gpu_top_k(const std::vector<float>& scores, int rows, int n, int k) {
  auto d_scores = upload(scores);
  auto indices = poisoned(static_cast<std::size_t>(rows) * k * sizeof(std::int32_t));
  auto workspace = poisoned(ops::top_k_workspace_bytes(rows, n, k));
  ops::top_k(Cuda{}, kvc::make_device_view(d_scores.as<const float>(), {rows, n}), k,
             kvc::make_device_view(indices.as<std::int32_t>(), {rows, k}), bytes_view(workspace));
  return download<std::int32_t>(indices, static_cast<std::size_t>(rows) * k);
}

}  // namespace

TEST_CASE("cuda snapkv scores equal the reference on awkward shapes", "[cuda][selection]") {
  using P = ops::Pool;
  using R = ops::ProbabilityRounding;
  const std::vector<ScoreCase> cases = {
      {8, 2, 128, 1000, 32, 5, P::avg, false},  // T not a multiple of the 128-key tile
      {8, 2, 64, 777, 1, 1, P::max, true},      // window 1, kernel 1, per query head
      {6, 2, 64, 129, 40, 3, P::avg, false, ops::ScoreReduction::sum, R::none},  // G = 3, GW = 120
      {32, 8, 128, 4133, 64, 7, P::max, false, ops::ScoreReduction::mean, R::bf16},
      {4, 1, 128, 300, 299, 7, P::max, false},  // W = T - 1: one prefix key
      {2, 2, 64, 40, 13, 9, P::avg, true},      // MHA, kernel wider than half the prefix
  };
  std::uint32_t seed = 1;
  for (const auto& c : cases) {
    const auto in = random_score_inputs<kvc::bf16>(c, seed, 2.0f);
    require_within(c, gpu_scores(c, in), reference_scores(c, in), seed);
    ++seed;
  }
}

TEST_CASE("cuda snapkv scores (f16 inputs) equal the reference", "[cuda][selection]") {
  const ScoreCase c{8, 4, 128, 2000, 16, 5, ops::Pool::max, false};
  const auto in = random_score_inputs<kvc::f16>(c, 42, 3.0f);
  require_within(c, gpu_scores(c, in), reference_scores(c, in), 42);
}

TEST_CASE("cuda snapkv scores with W = T leave nothing to score", "[cuda][selection]") {
  const ScoreCase c{4, 2, 64, 50, 50, 5, ops::Pool::avg, false};
  const auto in = random_score_inputs<kvc::bf16>(c, 3, 1.0f);
  REQUIRE(gpu_scores(c, in).empty());
}

TEST_CASE("cuda top-k equals the reference on distinct scores", "[cuda][selection]") {
  struct Shape {
    int rows, n, k;
  };
  const std::vector<Shape> shapes = {{8, 32736, 2016}, {3, 1000, 0}, {3, 1000, 1}, {3, 1000, 1000},
                                     {3, 1000, 500},   {1, 1, 1},    {5, 7, 3},    {16, 4999, 17}};
  std::mt19937 rng(11);
  for (const auto& s : shapes) {
    // Distinct: a random permutation of distinct values.
    std::vector<float> scores(static_cast<std::size_t>(s.rows) * s.n);
    for (int r = 0; r < s.rows; ++r) {
      std::vector<int> order(s.n);
      for (int j = 0; j < s.n; ++j) order[j] = j;
      std::shuffle(order.begin(), order.end(), rng);
      for (int j = 0; j < s.n; ++j)
        scores[static_cast<std::size_t>(r) * s.n + j] = 0.001f * order[j] - 3.0f;
    }
    INFO("rows=" << s.rows << " n=" << s.n << " k=" << s.k);
    REQUIRE(gpu_top_k(scores, s.rows, s.n, s.k) == cpu_top_k(scores, s.rows, s.n, s.k));
  }
}

TEST_CASE("cuda top-k breaks exact ties by lower position", "[cuda][selection]") {
  std::mt19937 rng(12);
  std::uniform_int_distribution<int> level(0, 3);
  const int rows = 4, n = 5000;
  std::vector<float> scores(static_cast<std::size_t>(rows) * n);
  for (auto& x : scores) x = static_cast<float>(level(rng));
  // Row 1: +0 and -0 are equal; row 2: infinities; row 3: all equal.
  for (int j = 0; j < n; ++j) {
    scores[n + j] = (j % 3 == 0) ? -0.0f : (j % 3 == 1 ? 0.0f : -1.0f);
    if (j % 7 == 0) scores[2 * n + j] = j % 2 ? INFINITY : -INFINITY;
    scores[3 * n + j] = 0.5f;
  }
  for (int k : {0, 1, 1234, 2500, 4999, 5000}) {
    INFO("k=" << k);
    REQUIRE(gpu_top_k(scores, rows, n, k) == cpu_top_k(scores, rows, n, k));
  }
}

TEST_CASE("cuda snapkv_select on the real dump matches the reference chain", "[cuda][selection]") {
  const kvc::KvDump dump = kvc::load_dump(dump_path());
  const int w = 32, t = dump.tokens, d = dump.head_dim, prefix = t - w, selected = 100;
  for (int layer = 0; layer < dump.layers; ++layer) {
    for (bool per_query_head : {false, true}) {
      const ScoreCase c{dump.q_heads,
                        dump.kv_heads,
                        d,
                        t,
                        w,
                        per_query_head ? 5 : 7,
                        per_query_head ? ops::Pool::avg : ops::Pool::max,
                        per_query_head};
      ScoreInputs<kvc::bf16> in;
      const auto q = dump.q(layer), k = dump.k(layer);
      for (int h = 0; h < dump.q_heads; ++h)
        for (int i = prefix; i < t; ++i)
          for (int ch = 0; ch < d; ++ch) in.q.push_back(kvc::bf16(q(h, i, ch)));
      for (int h = 0; h < dump.kv_heads; ++h)
        for (int j = 0; j < t; ++j)
          for (int ch = 0; ch < d; ++ch) in.k.push_back(kvc::bf16(k(h, j, ch)));
      for (auto x : in.q) in.qf.push_back(static_cast<float>(x));
      for (auto x : in.k) in.kf.push_back(static_cast<float>(x));
      const Reference ref = reference_scores(c, in);
      const std::vector<float> pooled = gpu_scores(c, in);
      require_within(c, pooled, ref, static_cast<std::uint32_t>(layer));

      // The selection: exactly the CPU top-k of the GPU's scores, then the window.
      const int s_heads = per_query_head ? dump.q_heads : dump.kv_heads;
      auto d_q = upload(in.q), d_k = upload(in.k);
      auto keep = poisoned(static_cast<std::size_t>(s_heads) * (selected + w) * 4);
      auto workspace =
          poisoned(ops::snapkv_select_workspace_bytes(dump.q_heads, w, t, s_heads, selected));
      ops::snapkv_select(
          Cuda{}, kvc::make_device_view(d_q.as<const kvc::bf16>(), {dump.q_heads, w, d}),
          kvc::make_device_view(d_k.as<const kvc::bf16>(), {dump.kv_heads, t, d}), selected,
          c.kernel, c.pool, kvc::make_device_view(keep.as<std::int32_t>(), {s_heads, selected + w}),
          bytes_view(workspace));
      const auto gpu_keep =
          download<std::int32_t>(keep, static_cast<std::size_t>(s_heads) * (selected + w));
      const auto expected = cpu_top_k(pooled, s_heads, prefix, selected);
      const auto reference_top = cpu_top_k(ref.pooled, s_heads, prefix, selected);
      int differing = 0;
      for (int s = 0; s < s_heads; ++s) {
        for (int i = 0; i < selected; ++i)
          REQUIRE(gpu_keep[s * (selected + w) + i] == expected[s * selected + i]);
        for (int i = 0; i < w; ++i)
          REQUIRE(gpu_keep[s * (selected + w) + selected + i] == prefix + i);
        // Against the all-CPU chain: a token may change sides only where the scores are closer
        // to the row's k-th score than the two bounds allow.
        const float* row = ref.pooled.data() + static_cast<std::size_t>(s) * prefix;
        const float* bound = ref.tolerance.data() + static_cast<std::size_t>(s) * prefix;
        std::vector<float> sorted(row, row + prefix);
        std::sort(sorted.begin(), sorted.end(), std::greater<>());
        const float threshold = sorted[selected - 1];
        const float max_bound = *std::max_element(bound, bound + prefix);
        std::set<int> a(expected.begin() + s * selected, expected.begin() + (s + 1) * selected);
        std::set<int> b(reference_top.begin() + s * selected,
                        reference_top.begin() + (s + 1) * selected);
        for (int j = 0; j < prefix; ++j) {
          if (a.count(j) == b.count(j)) continue;
          ++differing;
          INFO("layer " << layer << " head " << s << " token " << j << " score " << row[j]
                        << " threshold " << threshold);
          REQUIRE(std::fabs(row[j] - threshold) <= bound[j] + max_bound);
        }
      }
      WARN("layer " << layer << (per_query_head ? " per query head" : " group mean") << ": "
                    << differing << " tokens selected differently from the all-CPU chain");
    }
  }
}

TEST_CASE("cuda compaction gathers rows bit-exactly for ragged counts", "[cuda][selection]") {
  const int h = 4, t = 1000, d = 128, kept = 300, scored = 900;
  std::mt19937 rng(21);
  std::vector<kvc::bf16> k(static_cast<std::size_t>(h) * t * d), v(k.size());
  for (auto& x : k) x = kvc::bf16::from_bits(static_cast<std::uint16_t>(rng() & 0x7F7F));
  for (auto& x : v) x = kvc::bf16::from_bits(static_cast<std::uint16_t>(rng() & 0xBF7F));
  std::vector<std::int32_t> positions(static_cast<std::size_t>(h) * t);
  for (auto& p : positions) p = static_cast<std::int32_t>(rng() % 100000);
  auto d_k = upload(k), d_v = upload(v), d_positions = upload(positions);

  for (int s_heads : {4, 8}) {  // plain, and repeat-mode GQA (two storage heads per KV head)
    const std::vector<int> counts_host = s_heads == 4
                                             ? std::vector<int>{300, 0, 1, 157}
                                             : std::vector<int>{5, 300, 299, 0, 1, 7, 64, 128};
    std::vector<std::int32_t> keep(static_cast<std::size_t>(s_heads) * kept, -7);
    for (int s = 0; s < s_heads; ++s) {
      std::vector<int> all(t);
      for (int j = 0; j < t; ++j) all[j] = j;
      std::shuffle(all.begin(), all.end(), rng);
      std::sort(all.begin(), all.begin() + counts_host[s]);
      for (int i = 0; i < counts_host[s]; ++i) keep[s * kept + i] = all[i];
    }
    keep[3 * kept + 5] = t + 3;                  // out of range, inside the count of row 3
    if (s_heads == 8) keep[1 * kept + 10] = -1;  // out of range, inside the count
    std::vector<float> scores(static_cast<std::size_t>(s_heads) * scored);
    for (auto& x : scores) x = std::uniform_real_distribution<float>(0, 1)(rng);
    auto d_keep = upload(keep), d_counts = upload(counts_host), d_scores = upload(scores);
    const std::size_t out_elements = static_cast<std::size_t>(s_heads) * kept * d;
    auto k_out = poisoned(out_elements * 2, 0x5A), v_out = poisoned(out_elements * 2, 0x5A);
    auto pos_out = poisoned(static_cast<std::size_t>(s_heads) * kept * 4, 0x5A);
    auto score_out = poisoned(static_cast<std::size_t>(s_heads) * kept * 4, 0x5A);
    ops::CompactSide side;
    side.positions = kvc::make_device_view(d_positions.as<const std::int32_t>(), {h, t});
    side.positions_out = kvc::make_device_view(pos_out.as<std::int32_t>(), {s_heads, kept});
    side.scores = kvc::make_device_view(d_scores.as<const float>(), {s_heads, scored});
    side.scores_out = kvc::make_device_view(score_out.as<float>(), {s_heads, kept});
    ops::compact_rows(Cuda{},
                      kvc::make_device_view(d_keep.as<const std::int32_t>(), {s_heads, kept}),
                      kvc::make_device_view(d_counts.as<const std::int32_t>(), {s_heads}),
                      kvc::make_device_view(d_k.as<const kvc::bf16>(), {h, t, d}),
                      kvc::make_device_view(d_v.as<const kvc::bf16>(), {h, t, d}),
                      kvc::make_device_view(k_out.as<kvc::bf16>(), {s_heads, kept, d}),
                      kvc::make_device_view(v_out.as<kvc::bf16>(), {s_heads, kept, d}), side);
    const auto gk = download<std::uint16_t>(k_out, out_elements);
    const auto gv = download<std::uint16_t>(v_out, out_elements);
    const auto gp = download<std::int32_t>(pos_out, static_cast<std::size_t>(s_heads) * kept);
    const auto gs = download<float>(score_out, static_cast<std::size_t>(s_heads) * kept);
    std::int32_t poison_int;
    std::memset(&poison_int, 0x5A, 4);
    int checked_rows = 0;
    for (int s = 0; s < s_heads; ++s) {
      const int head = s * h / s_heads;
      for (int i = 0; i < kept; ++i) {
        INFO("s_heads=" << s_heads << " row " << s << " slot " << i);
        const std::size_t out = (static_cast<std::size_t>(s) * kept + i) * d;
        if (i >= counts_host[s]) {  // untouched
          for (int c = 0; c < d; ++c) REQUIRE((gk[out + c] == 0x5A5A && gv[out + c] == 0x5A5A));
          REQUIRE(gp[s * kept + i] == poison_int);
          continue;
        }
        const int src = keep[s * kept + i];
        ++checked_rows;
        if (src < 0 || src >= t) {
          for (int c = 0; c < d; ++c) REQUIRE((gk[out + c] == 0xFFFF && gv[out + c] == 0xFFFF));
          REQUIRE(gp[s * kept + i] == -1);
          continue;
        }
        const std::size_t in = (static_cast<std::size_t>(head) * t + src) * d;
        for (int c = 0; c < d; ++c)
          REQUIRE((gk[out + c] == k[in + c].bits && gv[out + c] == v[in + c].bits));
        REQUIRE(gp[s * kept + i] == positions[static_cast<std::size_t>(head) * t + src]);
        const float expected = src < scored ? scores[s * scored + src] : INFINITY;
        REQUIRE(std::memcmp(&gs[s * kept + i], &expected, 4) == 0);
      }
    }
    REQUIRE(checked_rows > 0);
  }
}

TEST_CASE("cuda compaction (f16, no counts, no side arrays) equals a host gather",
          "[cuda][selection]") {
  const int h = 2, t = 77, d = 64, kept = 33;
  std::mt19937 rng(5);
  std::vector<kvc::f16> k(static_cast<std::size_t>(h) * t * d), v(k.size());
  for (auto& x : k) x = kvc::f16::from_bits(static_cast<std::uint16_t>(rng() & 0x7BFF));
  for (auto& x : v) x = kvc::f16::from_bits(static_cast<std::uint16_t>(rng() & 0xFBFF));
  std::vector<std::int32_t> keep;
  for (int s = 0; s < h; ++s)
    for (int i = 0; i < kept; ++i) keep.push_back(2 * i + s);
  auto d_k = upload(k), d_v = upload(v), d_keep = upload(keep);
  auto k_out = poisoned(static_cast<std::size_t>(h) * kept * d * 2);
  auto v_out = poisoned(static_cast<std::size_t>(h) * kept * d * 2);
  ops::compact_rows(Cuda{}, kvc::make_device_view(d_keep.as<const std::int32_t>(), {h, kept}), {},
                    kvc::make_device_view(d_k.as<const kvc::f16>(), {h, t, d}),
                    kvc::make_device_view(d_v.as<const kvc::f16>(), {h, t, d}),
                    kvc::make_device_view(k_out.as<kvc::f16>(), {h, kept, d}),
                    kvc::make_device_view(v_out.as<kvc::f16>(), {h, kept, d}));
  const auto gk = download<std::uint16_t>(k_out, static_cast<std::size_t>(h) * kept * d);
  const auto gv = download<std::uint16_t>(v_out, static_cast<std::size_t>(h) * kept * d);
  for (int s = 0; s < h; ++s) {
    // The CPU reference op on one head's rows.
    std::vector<std::uint16_t> ck, cv;
    for (int j = 0; j < t; ++j)
      for (int c = 0; c < d; ++c) {
        ck.push_back(k[(static_cast<std::size_t>(s) * t + j) * d + c].bits);
        cv.push_back(v[(static_cast<std::size_t>(s) * t + j) * d + c].bits);
      }
    const std::vector<std::int32_t> row(keep.begin() + s * kept, keep.begin() + (s + 1) * kept);
    ops::compact_rows(kvc::Cpu{}, row, ck, d);
    ops::compact_rows(kvc::Cpu{}, row, cv, d);
    REQUIRE(
        std::equal(ck.begin(), ck.end(), gk.begin() + static_cast<std::ptrdiff_t>(s) * kept * d));
    REQUIRE(
        std::equal(cv.begin(), cv.end(), gv.begin() + static_cast<std::ptrdiff_t>(s) * kept * d));
  }
}

TEST_CASE("cuda gather_rows equals the host compaction for any row size", "[cuda][selection]") {
  // Row sizes of the quantized stores: 2 bytes (one f16 scale), 6 (odd words), 12, 64 (INT8 codes
  // at D 64) and 128 (f16 rows); ragged counts, one empty head, poisoned outputs.
  std::mt19937 rng(11);
  for (const std::int64_t row_bytes : {2, 6, 12, 64, 128}) {
    const std::int64_t s_heads = 3, t = 37, kmax = 20, capacity = 24;
    std::vector<std::uint8_t> src(static_cast<std::size_t>(s_heads * t * row_bytes));
    for (auto& b : src) b = static_cast<std::uint8_t>(rng());
    const std::vector<int> counts = {20, 7, 0};
    std::vector<std::int32_t> keep(static_cast<std::size_t>(s_heads * kmax), 0);
    std::vector<std::vector<std::int32_t>> keep_sets(s_heads);
    for (std::int64_t s = 0; s < s_heads; ++s) {
      std::vector<std::int32_t> all(t);
      std::iota(all.begin(), all.end(), 0);
      std::shuffle(all.begin(), all.end(), rng);
      keep_sets[s].assign(all.begin(), all.begin() + counts[s]);
      std::sort(keep_sets[s].begin(), keep_sets[s].end());
      std::copy(keep_sets[s].begin(), keep_sets[s].end(), keep.begin() + s * kmax);
    }
    auto src_dev = kvc::test::upload(src);
    auto keep_dev = kvc::test::upload(keep);
    auto counts_dev = kvc::test::upload(std::vector<std::int32_t>(counts.begin(), counts.end()));
    const std::size_t out_bytes = static_cast<std::size_t>(s_heads * capacity * row_bytes);
    auto out_dev = poisoned(out_bytes, 0x5A);
    ops::gather_rows(kvc::Cuda{},
                     kvc::make_device_view(keep_dev.as<const std::int32_t>(), {s_heads, kmax}),
                     kvc::make_device_view(counts_dev.as<const std::int32_t>(), {s_heads}),
                     kvc::make_device_view(src_dev.as<const std::byte>(), {s_heads, t, row_bytes}),
                     kvc::DeviceView<std::byte, 3>{out_dev.as<std::byte>(),
                                                   {s_heads, kmax, row_bytes},
                                                   {capacity * row_bytes, row_bytes, 1}});
    const auto out = kvc::test::download<std::uint8_t>(out_dev, out_bytes);
    for (std::int64_t s = 0; s < s_heads; ++s) {
      // The reference: the CPU compaction of this head's rows.
      std::vector<std::uint8_t> head(src.begin() + s * t * row_bytes,
                                     src.begin() + (s + 1) * t * row_bytes);
      kvc::ops::compact_rows(kvc::Cpu{}, keep_sets[s], head, static_cast<int>(row_bytes));
      INFO("row bytes " << row_bytes << " head " << s);
      for (std::int64_t i = 0; i < capacity * row_bytes; ++i) {
        const std::uint8_t got = out[static_cast<std::size_t>(s * capacity * row_bytes + i)];
        if (i < counts[s] * row_bytes)
          REQUIRE(got == head[static_cast<std::size_t>(i)]);
        else
          REQUIRE(got == 0x5A);  // rows past the count are left untouched
      }
    }
  }
}

TEST_CASE("cuda selection ops reject bad arguments", "[cuda][selection]") {
  rt::DeviceBuffer buffer(1 << 20);
  const auto* base = buffer.as<const kvc::bf16>();
  const auto workspace = kvc::make_device_view(buffer.as<std::byte>(), {1 << 20});
  const auto pooled = kvc::make_device_view(buffer.as<float>(), {2, 60});
  REQUIRE_THROWS_WITH(ops::snapkv_scores(Cuda{}, kvc::make_device_view(base, {4, 4, 64}),
                                         kvc::make_device_view(base, {2, 64, 64}), 4,
                                         ops::Pool::avg, pooled, workspace),
                      Catch::Contains("kernel = 4 is not allowed"));
  REQUIRE_THROWS_WITH(ops::snapkv_scores(Cuda{}, kvc::make_device_view(base, {4, 4, 96}),
                                         kvc::make_device_view(base, {2, 64, 96}), 5,
                                         ops::Pool::avg, pooled, workspace),
                      Catch::Contains("head_dim = 96 is not supported; allowed: {64, 128}"));
  REQUIRE_THROWS_WITH(
      ops::snapkv_scores(Cuda{}, kvc::make_device_view(base, {4, 4, 64}),
                         kvc::make_device_view(base, {2, 64, 64}), 5, ops::Pool::avg,
                         kvc::make_device_view(buffer.as<float>(), {3, 60}), workspace),
      Catch::Contains("expected [S, T - W]"));
  REQUIRE_THROWS_WITH(
      ops::top_k(Cuda{}, kvc::make_device_view(buffer.as<const float>(), {2, 10}), 11,
                 kvc::make_device_view(buffer.as<std::int32_t>(), {2, 11}), workspace),
      Catch::Contains("k = 11 is out of range"));
}
