// Coupled Quantization calibration (k-means) and codebook files; see kvc/eval/cq_codebook.hpp.
#include "kvc/eval/cq_codebook.hpp"

#include <algorithm>
#include <cmath>
#include <map>
#include <memory>
#include <mutex>

#include "kvc/eval/safetensors.hpp"

namespace kvc {
namespace {

constexpr const char* kFormat = "kvc-cq-codebook/1";

// SplitMix64: a tiny generator whose output is fixed by its definition on every platform.
struct SplitMix64 {
  std::uint64_t state;
  std::uint64_t next() {
    std::uint64_t z = (state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
  double uniform() { return static_cast<double>(next() >> 11) * 0x1.0p-53; }  // [0, 1)
};

double squared_distance(const float* a, const float* b, int c) {
  double s = 0;
  for (int i = 0; i < c; ++i) {
    const double d = static_cast<double>(a[i]) - b[i];
    s += d * d;
  }
  return s;
}

int index_below(double u, int n) { return std::min(n - 1, static_cast<int>(u * n)); }

const char* key_space_name(CqKeySpace s) {
  return s == CqKeySpace::prerope ? "prerope" : "postrope";
}

int metadata_int(const SafetensorsFile& f, const std::filesystem::path& path, const char* key) {
  const auto it = f.metadata.find(key);
  KVC_CHECK(it != f.metadata.end(), "cq codebook ", path.string(), ": metadata has no '", key, "'");
  try {
    return std::stoi(it->second);
  } catch (const std::exception&) {
    KVC_FAIL("cq codebook ", path.string(), ": metadata '", key, "' = '", it->second,
             "' is not an integer");
  }
}

}  // namespace

KmeansResult kmeans(std::span<const float> points, int n, int c, int k, int iterations,
                    std::uint64_t seed) {
  KVC_CHECK(n >= 1 && c >= 1 && k >= 1 &&
                static_cast<std::int64_t>(points.size()) == static_cast<std::int64_t>(n) * c,
            "kmeans: need n >= 1 points of c >= 1 channels ([n, c] = ", points.size(),
            " floats for n = ", n, ", c = ", c, ") and k >= 1 (got ", k, ")");
  KVC_CHECK(iterations >= 0, "kmeans: iterations = ", iterations, " must be >= 0");
  for (std::size_t i = 0; i < points.size(); ++i)
    KVC_CHECK(std::isfinite(points[i]), "kmeans: point ", i / c, " channel ", i % c, " is ",
              points[i], "; points must be finite");
  KmeansResult result;
  result.centroids.resize(static_cast<std::size_t>(k) * c);
  float* centroids = result.centroids.data();
  const float* x = points.data();
  SplitMix64 rng{seed};

  // k-means++ seeding.
  std::vector<double> nearest(n);
  int first = index_below(rng.uniform(), n);
  std::copy(x + first * c, x + (first + 1) * c, centroids);
  for (int i = 0; i < n; ++i) nearest[i] = squared_distance(x + i * c, centroids, c);
  for (int j = 1; j < k; ++j) {
    double total = 0;
    for (int i = 0; i < n; ++i) total += nearest[i];
    int pick = n - 1;
    if (total > 0) {
      const double target = rng.uniform() * total;
      double running = 0;
      for (int i = 0; i < n; ++i) {
        running += nearest[i];
        if (running > target && nearest[i] > 0) {
          pick = i;
          break;
        }
      }
      if (nearest[pick] == 0)  // rounding at the end of the scan: take the last positive one
        for (int i = n - 1; i >= 0; --i)
          if (nearest[i] > 0) {
            pick = i;
            break;
          }
    } else {
      pick = index_below(rng.uniform(), n);
    }
    std::copy(x + pick * c, x + (pick + 1) * c, centroids + j * c);
    for (int i = 0; i < n; ++i)
      nearest[i] = std::min(nearest[i], squared_distance(x + i * c, centroids + j * c, c));
  }

  // Lloyd iterations.
  std::vector<int> assignment(n, -1);
  auto assign = [&] {
    bool changed = false;
    double objective = 0;
    for (int i = 0; i < n; ++i) {
      const int a = cq_nearest(x + i * c, centroids, k, c);
      changed = changed || a != assignment[i];
      assignment[i] = a;
      objective += squared_distance(x + i * c, centroids + a * c, c);
    }
    return std::pair{changed, objective};
  };
  result.objective.push_back(assign().second);
  std::vector<double> sums(static_cast<std::size_t>(k) * c);
  std::vector<int> counts(k);
  std::vector<float> candidate(c);
  for (int it = 0; it < iterations; ++it) {
    std::fill(sums.begin(), sums.end(), 0.0);
    std::fill(counts.begin(), counts.end(), 0);
    for (int i = 0; i < n; ++i) {
      ++counts[assignment[i]];
      for (int ch = 0; ch < c; ++ch) sums[assignment[i] * c + ch] += x[i * c + ch];
    }
    for (int j = 0; j < k; ++j) {
      if (counts[j] == 0) continue;
      for (int ch = 0; ch < c; ++ch)
        candidate[ch] = static_cast<float>(sums[j * c + ch] / counts[j]);
      double old_cost = 0, new_cost = 0;
      for (int i = 0; i < n; ++i) {
        if (assignment[i] != j) continue;
        old_cost += squared_distance(x + i * c, centroids + j * c, c);
        new_cost += squared_distance(x + i * c, candidate.data(), c);
      }
      if (new_cost <= old_cost) std::copy(candidate.begin(), candidate.end(), centroids + j * c);
    }
    const auto [changed, objective] = assign();
    result.objective.push_back(objective);
    if (!changed) break;
  }
  return result;
}

CqCalibration calibrate_cq(const KvDump& dump, const CqCalibrateOptions& options) {
  CqCalibration out;
  out.options = options;
  CqCodebook& book = out.codebook;
  book.layers = dump.layers;
  book.kv_heads = dump.kv_heads;
  book.head_dim = dump.head_dim;
  book.channels = options.channels;
  book.bits = options.bits;
  book.key_space = options.key_space;
  book.rope = ops::Rope{dump.rope_theta, ops::parse_rope_convention(dump.rope_convention)};
  KVC_CHECK(options.iterations >= 0, "calibrate cq: iterations = ", options.iterations,
            " must be >= 0");
  const auto allowed = [](int v) { return v == 1 || v == 2 || v == 4 || v == 8; };
  KVC_CHECK(
      allowed(options.channels) && allowed(options.bits) && dump.head_dim % options.channels == 0,
      "calibrate cq: channels = ", options.channels, " and bits = ", options.bits,
      " must each be one of {1, 2, 4, 8}, with head_dim = ", dump.head_dim,
      " a multiple of channels");
  book.keys.resize(book.table_size());
  book.values.resize(book.table_size());
  book.validate();
  const int c = book.channels, groups = book.groups(), k = book.centroids(), n = dump.tokens;
  std::vector<float> samples(static_cast<std::size_t>(n) * c);
  for (int l = 0; l < book.layers; ++l) {
    const auto keys = options.key_space == CqKeySpace::prerope
                          ? dump.k_prerope(l, "cq calibration with key_space=prerope")
                          : dump.k(l);
    const auto values = dump.v(l);
    for (int h = 0; h < book.kv_heads; ++h)
      for (int g = 0; g < groups; ++g)
        for (const bool is_key : {true, false}) {
          const auto src = (is_key ? keys : values).sub(h);  // [T, D]
          for (int t = 0; t < n; ++t)
            for (int ch = 0; ch < c; ++ch) samples[t * c + ch] = src(t, g * c + ch);
          const std::uint64_t index =
              ((static_cast<std::uint64_t>(l) * book.kv_heads + h) * groups + g) * 2 +
              (is_key ? 0 : 1);
          KmeansResult r = kmeans(samples, n, c, k, options.iterations, options.seed + 1 + index);
          const std::size_t offset =
              book.table(is_key, l, h, g) - (is_key ? book.keys.data() : book.values.data());
          std::copy(r.centroids.begin(), r.centroids.end(),
                    (is_key ? book.keys : book.values).begin() + offset);
          out.initial_objective.push_back(r.objective.front());
          out.final_objective.push_back(r.objective.back());
        }
  }
  return out;
}

void write_cq_codebook(const std::filesystem::path& path, const CqCodebook& book,
                       const CqCalibrateOptions& options, const std::string& source) {
  book.validate();
  const std::vector<std::int64_t> shape{book.layers, book.kv_heads, book.groups(), book.centroids(),
                                        book.channels};
  write_safetensors(
      path,
      {{"keys", Array::from_float(book.keys, shape, DType::f32)},
       {"values", Array::from_float(book.values, shape, DType::f32)}},
      {{"format", kFormat},
       {"channels", std::to_string(book.channels)},
       {"bits", std::to_string(book.bits)},
       {"key_space", key_space_name(book.key_space)},
       {"rope_theta", std::to_string(book.rope.theta)},
       {"rope_convention",
        book.rope.convention == ops::RopeConvention::rotate_half ? "rotate_half" : "interleaved"},
       {"distance", "squared_euclidean (plain k-means, unweighted)"},
       {"seeding", "kmeans++ splitmix64"},
       {"seed", std::to_string(options.seed)},
       {"iterations", std::to_string(options.iterations)},
       {"source", source}});
}

CqCodebook read_cq_codebook(const std::filesystem::path& path) {
  const SafetensorsFile f = read_safetensors_file(path);
  const auto format = f.metadata.find("format");
  KVC_CHECK(format != f.metadata.end() && format->second == kFormat, "cq codebook ", path.string(),
            ": metadata 'format' must be '", kFormat, "' (written by `kvc calibrate cq`)");
  CqCodebook book;
  book.channels = metadata_int(f, path, "channels");
  book.bits = metadata_int(f, path, "bits");
  const auto space = f.metadata.find("key_space");
  KVC_CHECK(
      space != f.metadata.end() && (space->second == "prerope" || space->second == "postrope"),
      "cq codebook ", path.string(), ": key_space must be prerope or postrope");
  book.key_space = space->second == "prerope" ? CqKeySpace::prerope : CqKeySpace::postrope;
  const auto theta = f.metadata.find("rope_theta");
  const auto convention = f.metadata.find("rope_convention");
  KVC_CHECK(theta != f.metadata.end() && convention != f.metadata.end(), "cq codebook ",
            path.string(), ": metadata needs rope_theta and rope_convention");
  book.rope = ops::Rope{std::stod(theta->second), ops::parse_rope_convention(convention->second)};
  for (const char* name : {"keys", "values"}) {
    const auto it = f.tensors.find(name);
    KVC_CHECK(it != f.tensors.end() && it->second.rank() == 5, "cq codebook ", path.string(),
              ": needs a 5-d tensor '", name, "' [L, Hkv, D/c, 2^b, c]");
    const auto& s = it->second.shape;
    KVC_CHECK(s[3] == (std::int64_t{1} << book.bits) && s[4] == book.channels, "cq codebook ",
              path.string(), ": tensor ", name, " has shape [", s[0], ", ", s[1], ", ", s[2], ", ",
              s[3], ", ", s[4], "]; expected [L, Hkv, D/c, ", 1 << book.bits, ", ", book.channels,
              "]");
    book.layers = static_cast<int>(s[0]);
    book.kv_heads = static_cast<int>(s[1]);
    book.head_dim = static_cast<int>(s[2] * s[4]);
    (std::string(name) == "keys" ? book.keys : book.values) = it->second.to_float();
  }
  book.validate();
  return book;
}

const CqCodebook* shared_cq_codebook(const std::filesystem::path& path) {
  static std::mutex mutex;
  static std::map<std::string, std::unique_ptr<const CqCodebook>> table;
  const std::string key = std::filesystem::absolute(path).lexically_normal().string();
  std::lock_guard lock(mutex);
  auto& slot = table[key];
  if (!slot) {
    try {
      slot = std::make_unique<const CqCodebook>(read_cq_codebook(path));
    } catch (...) {
      table.erase(key);
      throw;
    }
  }
  return slot.get();
}

}  // namespace kvc
