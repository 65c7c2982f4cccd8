// Key-projection policies: ShadowKV (layout and selection vectors of ALGORITHMS.md section 25.11,
// full-rank reconstruction), ThinK (section 25.13), Loki and the Palu-style latent keys; byte
// counts by hand; the errors for a missing k_prerope, bad parameters and impossible
// combinations; every method through `kvc eval` on tests/data/seq0 (calibrated on seq1).
#include <algorithm>
#include <catch2/catch.hpp>
#include <cmath>
#include <filesystem>
#include <sstream>
#include <string>
#include <vector>

#include "kvc/cache/kv_cache.hpp"
#include "kvc/eval/registry.hpp"
#include "kvc/ops/lowrank.hpp"
#include "kvc/ops/rope.hpp"
#include "kvc/policies/keyproj/loki.hpp"
#include "kvc/policies/keyproj/palu.hpp"
#include "kvc/policies/keyproj/shadowkv.hpp"
#include "kvc/policies/keyproj/think.hpp"
#include "test_support.hpp"
#include "tool_runner.hpp"

namespace fs = std::filesystem;
using namespace kvc_test;

namespace {

const fs::path kDataDir = fs::path(KVC_TEST_DATA_DIR);
constexpr double kHalfEps = 1.0 / 2048;  // f16 unit roundoff 2^-11

// Post-RoPE copy of pre-RoPE keys [H, T, D] (positions 0..T-1).
std::vector<float> rotated(const std::vector<float>& pre, int heads, int tokens, int d) {
  std::vector<float> post = pre;
  std::vector<std::int32_t> positions(tokens);
  for (int t = 0; t < tokens; ++t) positions[t] = t;
  for (int h = 0; h < heads; ++h)
    kvc::ops::rope_rotate(
        kvc::Cpu{}, kvc::ops::Rope{},
        kvc::make_view(post.data() + static_cast<std::size_t>(h) * tokens * d, {tokens, d}),
        positions);
  return post;
}

template <class KP>
struct Cfg : kvc::DefaultConfig {
  using KeyProjection = KP;
};

struct Row {
  double rel_error = -1;
  long long bytes = -1, index = -1, host = -1;
};
Row find_row(const std::string& table, const std::string& spec) {
  std::istringstream lines(table);
  std::string line;
  while (std::getline(lines, line)) {
    std::istringstream fields(line);
    std::string name, full;
    Row r;
    double recall = 0, ratio = 0, bits = 0;
    if (fields >> name >> r.rel_error >> recall >> r.bytes >> full >> ratio >> bits >> r.index >>
            r.host &&
        name == spec)
      return r;
  }
  return {};
}

}  // namespace

// ---- ShadowKV -------------------------------------------------------------------------------

TEST_CASE("shadowkv: the T = 8197 layout of section 18(e) in both classes", "[keyproj]") {
  kvc::ShadowKv p{.budget = 2048, .chunk = 8, .local_chunks = 4, .outliers = 48};
  const kvc::ShadowKvPlan acc = p.plan(8197);
  CHECK(acc.chunks == 1020);
  CHECK(acc.local == 37);
  p.layout = kvc::ShadowKvLayout::efficient;
  const kvc::ShadowKvPlan eff = p.plan(8197);
  CHECK(eff.chunks == 1016);
  CHECK(eff.local == 69);
  CHECK(eff.landmarks == 968);
  CHECK(eff.selected == 256);
}

namespace {

// One KV head (D = 8, two query heads), 16 chunks of 8 tokens whose keys all point along one
// random direction per chunk; chunk 11 has one token pointing elsewhere, so it is the outlier.
struct ShadowCase {
  static constexpr int kD = 8, kT = 128;
  std::vector<float> pre, post, values;
  std::vector<float> direction;  // [16, D]
  ShadowCase() {
    direction = lcg_floats(16 * kD, 7);
    pre.resize(kT * kD);
    const auto noise = lcg_floats(kT * kD, 9);
    for (int t = 0; t < kT; ++t)
      for (int c = 0; c < kD; ++c)
        pre[t * kD + c] = direction[(t / 8) * kD + c] + 0.01f * noise[t * kD + c];
    for (int c = 0; c < kD; ++c) pre[(11 * 8 + 3) * kD + c] = -direction[11 * kD + c];
    // Selection reads post-RoPE landmarks; identity rotation keeps the directions readable.
    post = pre;
    values = lcg_floats(kT * kD, 11);
  }
};

}  // namespace

TEST_CASE("shadowkv: chunk rows, outliers and selection by a landmark direction", "[keyproj]") {
  ShadowCase c;
  const kvc::ShadowKv p{
      .budget = 8, .rank = 4, .chunk = 8, .local_chunks = 2, .outliers = 1, .threshold = 0};
  kvc::KVCache<Cfg<kvc::ShadowKv>, kvc::Cpu> cache{kvc::CacheShape{1, 2, 1, ShadowCase::kD}, p};
  std::vector<float> q(2 * ShadowCase::kD, 0.0f);
  cache.prefill(0, kvc::make_view(static_cast<const float*>(c.post.data()), {1, 128, 8}),
                kvc::make_view(static_cast<const float*>(c.values.data()), {1, 128, 8}),
                kvc::make_view(static_cast<const float*>(q.data()), {2, 0, 8}));
  cache.prefill_prerope(0, kvc::make_view(static_cast<const float*>(c.pre.data()), {1, 128, 8}));
  cache.compress(0);
  const auto& st = cache.key_projection_state(0);
  REQUIRE(st.sparse);
  CHECK(st.plan.chunks == 14);  // 128 / 8 - 2 local chunks
  CHECK(st.plan.local == 16);
  REQUIRE(st.heads[0].outlier_chunk == std::vector<std::int32_t>{11});
  REQUIRE(st.heads[0].landmark_chunk.size() == 13);
  for (const int target : {0, 5, 12}) {
    // Query heads: one along chunk `target`'s landmark, one silent (the group's max decides).
    std::vector<float> query(2 * 8, 0.0f);
    for (int k = 0; k < 8; ++k) query[k] = 50.0f * c.direction[target * 8 + k];
    const auto qv = kvc::make_view(static_cast<const float*>(query.data()), {2, 8});
    const std::vector<float> scores = p.chunk_scores(st, 0, qv);
    const auto best = std::max_element(scores.begin(), scores.end()) - scores.begin();
    CHECK(st.heads[0].landmark_chunk[best] == target);
    const kvc::KeyRows rows = p.select(st, 0, qv, qv);
    REQUIRE(rows);
    REQUIRE(rows->size() == 1);
    std::vector<std::int32_t> expected;
    for (int t = 0; t < 128; ++t)
      if (t / 8 == target || t / 8 == 11 || t >= 112) expected.push_back(t);
    CHECK((*rows)[0] == expected);  // chunk c is rows 8c .. 8c+7
  }
}

TEST_CASE("shadowkv: the SVD reproduces pre-RoPE keys at full rank", "[keyproj]") {
  // The op in float: rank = min(m, n) is exact to float round-off.
  const int m = 40, n = 16;
  const auto x = lcg_floats(m * n, 3);
  std::vector<float> u(m * n), sv(n * n);
  kvc::ops::truncated_svd(kvc::Cpu{}, kvc::make_view(x.data(), {m, n}),
                          kvc::make_view(u.data(), {m, n}), kvc::make_view(sv.data(), {n, n}));
  for (int i = 0; i < m; ++i)
    for (int j = 0; j < n; ++j) {
      double back = 0;
      for (int k = 0; k < n; ++k) back += double(u[i * n + k]) * sv[k * n + j];
      CHECK(back == Approx(x[i * n + j]).margin(1e-5));
    }
  // The policy: rank = Hkv * D; the low-rank rows come back rotated with their position, to the
  // f16 rounding of U and SV: |err| <= 2^-10 * sum_k |U_tk SV_kc| per channel, and RoPE keeps a
  // pair's norm, so each rotated pair's error is bounded by the norm of its two bounds.
  const int heads = 2, d = 8, tokens = 96;
  const auto pre = lcg_floats(heads * tokens * d, 5);
  const auto post = rotated(pre, heads, tokens, d);
  const kvc::ShadowKv p{
      .budget = 8, .rank = heads * d, .chunk = 8, .local_chunks = 1, .outliers = 1, .threshold = 0};
  kvc::KVCache<Cfg<kvc::ShadowKv>, kvc::Cpu> cache{kvc::CacheShape{1, 2, heads, d}, p};
  std::vector<float> none;
  cache.prefill(0, kvc::make_view(post.data(), {heads, tokens, d}),
                kvc::make_view(post.data(), {heads, tokens, d}),
                kvc::make_view(static_cast<const float*>(none.data()), {2, 0, d}));
  cache.prefill_prerope(0, kvc::make_view(pre.data(), {heads, tokens, d}));
  cache.compress(0);
  const auto& st = cache.key_projection_state(0);
  const auto contents = cache.materialize(0);
  int low_rank_rows = 0;
  for (int h = 0; h < heads; ++h)
    for (int t = 0; t < tokens; ++t) {
      std::vector<double> bound(d);
      for (int ch = 0; ch < d; ++ch) {
        double sum = 0;
        for (int k = 0; k < st.rank; ++k)
          sum += std::abs(static_cast<float>(st.u.size() > static_cast<std::size_t>(t * st.rank)
                                                 ? static_cast<float>(st.u[t * st.rank + k])
                                                 : 0.0f) *
                          static_cast<float>(st.sv[(h * st.rank + k) * d + ch]));
        bound[ch] =
            2 * kHalfEps * sum * 1.01 + kHalfEps * std::abs(post[(h * tokens + t) * d + ch]) + 1e-5;
      }
      low_rank_rows += st.heads[h].exact_row[t] < 0;
      for (int ch = 0; ch < d / 2; ++ch) {
        const double e1 = contents[h].keys[t * d + ch] - post[(h * tokens + t) * d + ch];
        const double e2 =
            contents[h].keys[t * d + ch + d / 2] - post[(h * tokens + t) * d + ch + d / 2];
        CHECK(std::hypot(e1, e2) <= std::hypot(bound[ch], bound[ch + d / 2]));
      }
    }
  CHECK(low_rank_rows == heads * (tokens - 8 - 8));  // all but the local and outlier chunks
}

TEST_CASE("shadowkv: bytes by hand, values in the host tier", "[keyproj]") {
  ShadowCase c;
  const kvc::ShadowKv p{
      .budget = 16, .rank = 4, .chunk = 8, .local_chunks = 2, .outliers = 1, .threshold = 0};
  kvc::KVCache<Cfg<kvc::ShadowKv>, kvc::Cpu> cache{kvc::CacheShape{1, 2, 1, 8}, p};
  std::vector<float> none;
  cache.prefill(0, kvc::make_view(c.post.data(), {1, 128, 8}),
                kvc::make_view(c.values.data(), {1, 128, 8}),
                kvc::make_view(static_cast<const float*>(none.data()), {2, 0, 8}));
  cache.prefill_prerope(0, kvc::make_view(c.pre.data(), {1, 128, 8}));
  cache.compress(0);
  // U [112, 4] + SV [1, 4, 8]; landmarks 13 x 8; exact keys and values of 16 local + 8 outlier
  // tokens; sparse buffers 2 x 16 x 8; all f16. Index: 13 + 1 chunk ids + 128 positions.
  const long long payload = (112 * 4 + 4 * 8 + 13 * 8 + 2 * 24 * 8 + 2 * 16 * 8) * 2;
  kvc::StorageBytes b = cache.bytes(0);
  CHECK(b.payload == payload);
  CHECK(b.params == 0);
  CHECK(b.index == (14 + 128) * 4);
  CHECK(b.host == 128 * 8 * 2);
  // A decode token: exact K and V on the device, its value in the host tier too.
  std::vector<float> row(8, 0.5f);
  cache.append(0, kvc::make_view(row.data(), {1, 8}), kvc::make_view(row.data(), {1, 8}));
  b = cache.bytes(0);
  CHECK(b.payload == payload + 2 * 8 * 2);
  CHECK(b.host == 129 * 8 * 2);
  // Below the threshold nothing is decomposed: exact keys and values, no host tier.
  kvc::KVCache<Cfg<kvc::ShadowKv>, kvc::Cpu> exact{kvc::CacheShape{1, 2, 1, 8},
                                                   kvc::ShadowKv{.threshold = 4096}};
  exact.prefill(0, kvc::make_view(c.post.data(), {1, 128, 8}),
                kvc::make_view(c.values.data(), {1, 128, 8}),
                kvc::make_view(static_cast<const float*>(none.data()), {2, 0, 8}));
  exact.compress(0);
  b = exact.bytes(0);
  CHECK(b.payload == 128 * 8 * 2 * 3);  // own K and V copies + the store's values
  CHECK(b.host == 0);
}

TEST_CASE("shadowkv: without pre-RoPE keys the error says what is missing", "[keyproj]") {
  ShadowCase c;
  kvc::KVCache<Cfg<kvc::ShadowKv>, kvc::Cpu> cache{
      kvc::CacheShape{1, 2, 1, 8},
      kvc::ShadowKv{.budget = 8, .rank = 4, .outliers = 1, .threshold = 0}};
  std::vector<float> none;
  cache.prefill(0, kvc::make_view(c.post.data(), {1, 128, 8}),
                kvc::make_view(c.values.data(), {1, 128, 8}),
                kvc::make_view(static_cast<const float*>(none.data()), {2, 0, 8}));
  CHECK_THROWS_WITH(cache.compress(0), Catch::Contains("pre-RoPE keys"));

  // kvc eval on a dump without k_prerope names the missing tensor and the policy.
  const fs::path dir = scratch_dir("keyproj_no_prerope");
  for (const char* f : {"q.npy", "k.npy", "v.npy", "meta.json"})
    fs::copy_file(kDataDir / "seq0" / f, dir / f);
  const ToolRun r = run_tool("eval --data \"" + dir.string() +
                             "\" --policy 'shadowkv(budget=64,rank=32,outliers=4,threshold=0)'");
  require_one_line_error(r, "no k_prerope (needed by shadowkv)");
}

// ---- ThinK ----------------------------------------------------------------------------------

TEST_CASE("think: channel scores [4, 1, 3, 2] at ratio 0.5 prune channels 1 and 3", "[keyproj]") {
  const kvc::Think p{.ratio = 0.5};
  const std::vector<float> scores{4, 1, 3, 2};
  CHECK(p.kept_channels(scores) == std::vector<std::int32_t>{0, 2});
  // Through the cache: queries of ones (q^2 = 1) and constant keys with k^2 = the scores; 40
  // tokens, so the first 8 are pruned and the recent 32 keep all 4 channels.
  const int t = 40;
  const float row[4] = {2.0f, 1.0f, std::sqrt(3.0f), std::sqrt(2.0f)};
  std::vector<float> keys(t * 4), values = lcg_floats(t * 4, 1), queries(t * 4, 1.0f);
  for (int i = 0; i < t; ++i)
    for (int c = 0; c < 4; ++c) keys[i * 4 + c] = row[c];
  kvc::KVCache<Cfg<kvc::Think>, kvc::Cpu> cache{kvc::CacheShape{1, 1, 1, 4}, p};
  cache.prefill(0, kvc::make_view(keys.data(), {1, t, 4}), kvc::make_view(values.data(), {1, t, 4}),
                kvc::make_view(queries.data(), {1, t, 4}));
  cache.compress(0);
  CHECK(cache.key_projection_state(0).heads[0].kept == std::vector<std::int32_t>{0, 2});
  const auto contents = cache.materialize(0);
  for (int i = 0; i < t; ++i)
    for (int c = 0; c < 4; ++c) {
      const bool pruned = i < 8 && (c == 1 || c == 3);
      CHECK(contents[0].keys[i * 4 + c] == (pruned ? 0.0f : static_cast<float>(kvc::f16(row[c]))));
    }
  // Bytes: 8 x 2 + 32 x 4 f16 keys, a 1-word channel mask, 40 x 4 f16 values, 40 positions.
  const kvc::StorageBytes b = cache.bytes(0);
  CHECK(b.payload == (8 * 2 + 32 * 4) * 2 + t * 4 * 2);
  CHECK(b.params == 4);
  CHECK(b.index == t * 4);
  // Attention equals q . k with the pruned channels zero.
  std::vector<float> out(4);
  const std::vector<float> qt{0.3f, -0.2f, 0.5f, 0.1f};
  cache.attend(0, kvc::make_view(qt.data(), {1, 4}), kvc::make_view(out.data(), {1, 4}));
  std::vector<float> ref(4);
  kvc::ops::decode_attention(
      kvc::Cpu{}, kvc::make_view(qt.data(), {1, 4}),
      kvc::make_view(static_cast<const float*>(contents[0].keys.data()), {1, t, 4}),
      kvc::make_view(static_cast<const float*>(contents[0].values.data()), {1, t, 4}),
      kvc::make_view(ref.data(), {1, 4}));
  for (int c = 0; c < 4; ++c) CHECK(out[c] == Approx(ref[c]).margin(1e-6));
}

// ---- Loki and Palu on hand-made bases ---------------------------------------------------------

namespace {
// Identity basis [1 layer, 1 head, D = 4]: scores are the first r channels.
kvc::KeyBasis identity_basis(const char* method, int rank) {
  kvc::KeyBasis b;
  b.method = method;
  b.key_space = std::string(method) == "loki" ? "postrope" : "prerope";
  b.layers = 1;
  b.kv_heads = 1;
  b.head_dim = 4;
  b.rank = rank;
  b.basis.assign(4 * rank, 0.0f);
  for (int j = 0; j < rank; ++j) b.basis[j * rank + j] = 1.0f;
  b.explained = {0.4f, 0.3f, 0.2f, 0.1f};
  b.explained.resize(rank);
  return b;
}
}  // namespace

TEST_CASE("loki: top-k in the reduced space, exact attention on it, bytes", "[keyproj]") {
  const kvc::KeyBasis basis = identity_basis("loki", 4);
  const kvc::Loki p{.basis = &basis, .dims = 2, .topk = 2};
  CHECK(p.rank_for(0) == 2);
  CHECK(kvc::Loki{.basis = &basis, .variance = 0.75}.rank_for(0) == 2);  // 0.4 + 0.3 < 0.75
  // Keys: channels 0-1 decide the approximate score, channels 2-3 would reverse it.
  const std::vector<float> keys{1, 0, -9, 0, 0, 0, 9, 0, 2, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 9};
  const std::vector<float> values = lcg_floats(20, 2);
  std::vector<float> none;
  kvc::KVCache<Cfg<kvc::Loki>, kvc::Cpu> cache{kvc::CacheShape{1, 1, 1, 4}, p};
  cache.prefill(0, kvc::make_view(keys.data(), {1, 5, 4}), kvc::make_view(values.data(), {1, 5, 4}),
                kvc::make_view(static_cast<const float*>(none.data()), {1, 0, 4}));
  cache.compress(0);
  const std::vector<float> q{1, 0.5f, 1, 1};
  const auto qv = kvc::make_view(q.data(), {1, 4});
  const kvc::KeyRows rows =
      p.select(cache.key_projection_state(0), 0, qv, kvc::make_view(keys.data(), {5, 4}));
  REQUIRE(rows);
  CHECK((*rows)[0] == std::vector<std::int32_t>{0, 2});  // approx 1, 0, 2, 0.5, 0
  // Bytes: uncompressed K and V (f16) + P[:, :2] as f32 + positions.
  const kvc::StorageBytes b = cache.bytes(0);
  CHECK(b.payload == 5 * 4 * 2 * 2);
  CHECK(b.params == 4 * 2 * 4);
  CHECK(b.index == 5 * 4);
}

TEST_CASE("palu: latents of keys in the basis span reconstruct exactly, bytes", "[keyproj]") {
  // Pre-RoPE keys in span(e0, e1), rotated by RoPE: the rank-2 latent reconstructs them.
  const int t = 6;
  std::vector<float> pre(t * 4, 0.0f);
  const auto r = lcg_floats(t * 2, 4);
  // Opposite signs in each latent pair, so Palu's zero point lies inside [0, 15] (a same-sign
  // group is clamped by its integer zero point, as the released quantizer does).
  for (int i = 0; i < t; ++i)
    pre[i * 4] = std::abs(r[2 * i]) + 0.1f, pre[i * 4 + 1] = -std::abs(r[2 * i + 1]) - 0.1f;
  const auto post = rotated(pre, 1, t, 4);
  const std::vector<float> values = lcg_floats(t * 4, 5);
  const kvc::KeyBasis basis = identity_basis("palu", 2);
  std::vector<float> none;
  for (const int bits : {0, 4}) {
    const kvc::Palu p{.basis = &basis, .bits = bits, .qgroup = 2};
    kvc::KVCache<Cfg<kvc::Palu>, kvc::Cpu> cache{kvc::CacheShape{1, 1, 1, 4}, p};
    cache.prefill(0, kvc::make_view(post.data(), {1, t, 4}),
                  kvc::make_view(values.data(), {1, t, 4}),
                  kvc::make_view(static_cast<const float*>(none.data()), {1, 0, 4}));
    cache.compress(0);
    const auto contents = cache.materialize(0);
    // f16 latents: 2^-11 relative; 4-bit codes: one step s = (max - min) / 15 per latent (half a
    // step of rounding, and the top code may clamp), and RoPE mixes a pair: sqrt(2) s.
    for (int i = 0; i < t; ++i) {
      const double step = (pre[i * 4] - pre[i * 4 + 1]) / 15.0;
      const double tol = bits == 0 ? 2e-3 : step * 1.01 * std::sqrt(2.0) + 2e-3;
      for (int c = 0; c < 4; ++c)
        CHECK(contents[0].keys[i * 4 + c] == Approx(post[i * 4 + c]).margin(tol));
    }
    const kvc::StorageBytes b = cache.bytes(0);
    const long long latent = bits == 0 ? t * 2 * 2 : t * 4;      // f16 [t, 2] or one word per token
    CHECK(b.payload == latent + t * 4 * 2);                      // + f16 values
    CHECK(b.params == (bits == 0 ? 0 : t * 2 * 2) + 4 * 2 * 4);  // scale + zero; basis f32
  }
}

// ---- errors -----------------------------------------------------------------------------------

TEST_CASE("key projections: bad parameters and impossible combinations", "[keyproj]") {
  CHECK_THROWS_WITH(kvc::build_policies("shadowkv(budget=12)"),
                    Catch::Contains("budget = 12") && Catch::Contains("multiple of chunk = 8"));
  CHECK_THROWS_WITH(kvc::build_policies("shadowkv(layout=fast)"),
                    Catch::Contains("accuracy, efficient"));
  CHECK_THROWS_WITH(kvc::build_policies("think(ratio=1)"), Catch::Contains("[0, 1)"));
  CHECK_THROWS_WITH(kvc::build_policies("loki"), Catch::Contains("kvc calibrate loki"));
  CHECK_THROWS_WITH(kvc::build_policies("palu(basis=/nonexistent.safetensors)"),
                    Catch::Contains("does not exist"));
  CHECK_THROWS_WITH(kvc::build_policies("shadowkv+think"),
                    Catch::Contains("two key_projection policies"));
  const kvc::CacheShape shape{1, 8, 2, 64};
  const auto make = [&](const char* spec) {
    const kvc::RuntimePolicies p = kvc::build_policies(spec);
    kvc::RuntimeCache cache{shape,
                            p.eviction,
                            p.merge,
                            p.quant,
                            p.layer_sharing,
                            p.key_projection,
                            kvc::CacheOptions{}};
  };
  CHECK_THROWS_WITH(make("snapkv(budget=64)+shadowkv"),
                    Catch::Contains("snapkv") && Catch::Contains("shadowkv"));
  CHECK_THROWS_WITH(make("shadowkv+int8"),
                    Catch::Contains("int_per_token") && Catch::Contains("shadowkv"));
  CHECK_THROWS_WITH(make("h2o+think+kivi"), Catch::Contains("h2o") && Catch::Contains("kivi"));
  CHECK_NOTHROW(make("h2o+think"));
  CHECK_NOTHROW(make("shadowkv+kivi(bits=2)"));
  kvc::CacheOptions reindexed;
  reindexed.positions = kvc::PositionMode::reindexed;
  CHECK_THROWS_WITH((kvc::KVCache<Cfg<kvc::Think>, kvc::Cpu>{shape, kvc::Think{}, reindexed}),
                    Catch::Contains("think") && Catch::Contains("reindexed"));
}

// ---- kvc eval on seq0 -------------------------------------------------------------------------

TEST_CASE("key projections through kvc eval on seq0 (bases calibrated on seq1)", "[keyproj]") {
  const fs::path dir = scratch_dir("keyproj_eval");
  const std::string seq1 = (kDataDir / "seq1").string(), seq0 = (kDataDir / "seq0").string();
  const std::string loki = (dir / "loki.safetensors").string();
  const std::string palu = (dir / "palu.safetensors").string();
  const std::string palu_full = (dir / "palu_full.safetensors").string();
  REQUIRE(run_tool("calibrate loki --data \"" + seq1 + "\" --out \"" + loki + "\"").code == 0);
  REQUIRE(
      run_tool("calibrate palu --data \"" + seq1 + "\" --group 2 --out \"" + palu + "\"").code ==
      0);
  REQUIRE(run_tool("calibrate palu --data \"" + seq1 + "\" --group 1 --ratio 1 --out \"" +
                   palu_full + "\"")
              .code == 0);
  const std::string shadow = "shadowkv(budget=64,rank=32,outliers=4,threshold=0)";
  const std::string shadow_kivi = shadow + "+kivi(bits=2)";
  const std::string think = "think(ratio=0.5)";
  const std::string snap_think = "snapkv(budget=128)+think(ratio=0.5)";
  const std::string loki_spec = "loki(basis=" + loki + ")";
  const std::string palu_spec = "palu(basis=" + palu + ")";
  const std::string palu4 = "palu(basis=" + palu + ",bits=4)";
  const std::string palu_exact = "palu(basis=" + palu_full + ")";
  std::string args = "eval --data \"" + seq0 + "\"";
  for (const auto& s :
       {shadow, shadow_kivi, think, snap_think, loki_spec, palu_spec, palu4, palu_exact})
    args += " --policy '" + s + "'";
  const ToolRun r = run_tool(args);
  INFO(r.out << r.err);
  REQUIRE(r.code == 0);
  const Row a = find_row(r.out, shadow), ak = find_row(r.out, shadow_kivi),
            th = find_row(r.out, think), st = find_row(r.out, snap_think),
            lo = find_row(r.out, loki_spec), pa = find_row(r.out, palu_spec),
            p4 = find_row(r.out, palu4), pe = find_row(r.out, palu_exact);
  // Bytes by hand (8 layers, 2 KV heads, prefix 384, D = 64). ShadowKV: 44 chunks (4 outliers,
  // 40 landmarks), 32 local tokens; U [352, 32] + SV [2, 32, 64] per layer; per head landmarks
  // 40 x 64, exact K and V of 64 tokens, sparse K and V buffers of 64 tokens, all f16.
  CHECK(a.bytes == 8LL * (352 * 32 * 2 + 2 * 32 * 64 * 2 +
                          2 * (40 * 64 * 2 + 2 * 64 * 64 * 2 + 2 * 64 * 64 * 2)));
  CHECK(a.host == 8LL * 2 * 384 * 64 * 2);  // every value, f16
  CHECK(a.index == 8LL * (2 * 44 * 4 + 2 * 384 * 4));
  CHECK(ak.bytes == a.bytes);
  // KIVI values: 256 tokens x (2 groups x 32 2-bit codes = 4 words + 2 f16 scale/min pairs) and
  // a residual of 128 f16 tokens.
  CHECK(ak.host == 16LL * (256 * (16 + 8) + 128 * 64 * 2));
  // ThinK: 32 of 64 channels of 352 tokens + 32 recent full, a 2-word mask, f16 values.
  CHECK(th.bytes == 16LL * (352 * 32 * 2 + 32 * 64 * 2 + 8 + 384 * 64 * 2));
  CHECK(th.host == 0);
  // Loki: uncompressed + P[:, :16] per KV head (f32).
  CHECK(lo.bytes == 1572864 + 8LL * 2 * 64 * 16 * 4);
  // Palu (g = 2, r = 64): f16 latents [384, 64] per layer + f16 values + basis [128, 64] f32.
  CHECK(pa.bytes == 8LL * (384 * 64 * 2 + 2 * 384 * 64 * 2 + 128 * 64 * 4));
  // Recorded on this data: shadowkv 0.118, +kivi 0.129, think 0.090, snapkv+think 0.196, loki
  // 0.227, palu 0.198, palu 4-bit 0.261; the full-rank Palu basis is exact up to f16 latents.
  CHECK(a.rel_error > 0.02);
  CHECK(a.rel_error < 0.14);
  CHECK(ak.rel_error > a.rel_error);
  CHECK(ak.rel_error < 0.15);
  CHECK(th.rel_error > 0.02);
  CHECK(th.rel_error < 0.11);
  CHECK(st.rel_error > th.rel_error);
  CHECK(st.rel_error < 0.22);
  CHECK(lo.rel_error > 0.05);
  CHECK(lo.rel_error < 0.25);
  CHECK(pa.rel_error > 0.05);
  CHECK(pa.rel_error < 0.22);
  CHECK(p4.rel_error > pa.rel_error);
  CHECK(p4.rel_error < 0.29);
  CHECK(pe.rel_error < 5e-3);
}
