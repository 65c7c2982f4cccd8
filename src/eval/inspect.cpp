// Realism statistics of a KV dump (definitions in kvc/eval/inspect.hpp).
#include "kvc/eval/inspect.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>

#include "kvc/ops/attention.hpp"

namespace kvc {
namespace {

constexpr int kRecentTokens = 32;

double kurtosis(HostView<const float, 3> x) {
  double mean = 0;
  const double count = static_cast<double>(x.numel());
  for (std::int64_t h = 0; h < x.size(0); ++h)
    for (std::int64_t t = 0; t < x.size(1); ++t)
      for (std::int64_t c = 0; c < x.size(2); ++c) mean += x(h, t, c);
  mean /= count;
  double m2 = 0, m4 = 0;
  for (std::int64_t h = 0; h < x.size(0); ++h)
    for (std::int64_t t = 0; t < x.size(1); ++t)
      for (std::int64_t c = 0; c < x.size(2); ++c) {
        const double d2 = (x(h, t, c) - mean) * (x(h, t, c) - mean);
        m2 += d2;
        m4 += d2 * d2;
      }
  m2 /= count;
  m4 /= count;
  return m2 > 0 ? m4 / (m2 * m2) : 0.0;
}

double channel_outlier_ratio(HostView<const float, 3> k) {
  std::vector<double> magnitude(k.size(2), 0.0);
  for (std::int64_t h = 0; h < k.size(0); ++h)
    for (std::int64_t t = 0; t < k.size(1); ++t)
      for (std::int64_t c = 0; c < k.size(2); ++c) magnitude[c] += std::fabs(k(h, t, c));
  std::vector<double> sorted = magnitude;
  std::sort(sorted.begin(), sorted.end());
  const std::size_t n = sorted.size();
  const double median = n % 2 ? sorted[n / 2] : 0.5 * (sorted[n / 2 - 1] + sorted[n / 2]);
  return median > 0 ? sorted.back() / median : 0.0;
}

std::string dtypes_line(const DumpStats& s) {
  std::string line = "dtypes:";
  for (const auto& [name, dtype] : s.stored_dtypes)
    line += fmt::format(" {} {}", name, dtype_name(dtype));
  return line + "\n";
}

}  // namespace

DumpStats inspect_dump(const KvDump& dump) {
  DumpStats stats;
  stats.source = dump.source;
  stats.layers = dump.layers;
  stats.q_heads = dump.q_heads;
  stats.kv_heads = dump.kv_heads;
  stats.tokens = dump.tokens;
  stats.head_dim = dump.head_dim;
  stats.has_k_prerope = dump.has_k_prerope();
  stats.stored_dtypes = dump.stored_dtypes;
  const int first_query = dump.tokens > kRecentTokens ? kRecentTokens : 1;
  std::vector<float> out(static_cast<std::size_t>(dump.q_heads) * dump.head_dim);
  std::vector<float> probabilities;
  for (int l = 0; l < dump.layers; ++l) {
    const auto q = dump.q(l), k = dump.k(l), v = dump.v(l);
    LayerStats s;
    s.layer = l;
    double sink = 0, recent = 0;
    std::int64_t samples = 0;
    for (int t = first_query; t < dump.tokens; ++t) {
      HostView<const float, 2> q_t{
          q.data + t * q.strides[1], {q.shape[0], q.shape[2]}, {q.strides[0], q.strides[2]}};
      probabilities.resize(static_cast<std::size_t>(dump.q_heads) * (t + 1));
      ops::decode_attention(Cpu{}, q_t, k.slice(1, 0, t + 1), v.slice(1, 0, t + 1),
                            make_view(out.data(), {dump.q_heads, dump.head_dim}),
                            make_view(probabilities.data(), {dump.q_heads, t + 1}));
      for (int h = 0; h < dump.q_heads; ++h) {
        const float* row = probabilities.data() + static_cast<std::size_t>(h) * (t + 1);
        sink += row[0];
        for (int j = std::max(0, t - kRecentTokens + 1); j <= t; ++j) recent += row[j];
        ++samples;
      }
    }
    s.sink_mass = samples ? sink / static_cast<double>(samples) : 0.0;
    s.recent_mass = samples ? recent / static_cast<double>(samples) : 0.0;
    s.k_outlier = channel_outlier_ratio(k);
    s.k_kurtosis = kurtosis(k);
    s.v_kurtosis = kurtosis(v);
    stats.per_layer.push_back(s);
  }
  return stats;
}

std::string format_stats(const DumpStats& s) {
  std::string text = fmt::format(
      "data: {}\nlayers {}  q_heads {}  kv_heads {}  tokens {}  head_dim {}  k_prerope {}\n"
      "q [{}, {}, {}, {}]  k/v [{}, {}, {}, {}]\n"
      "{}"
      "attention statistics over queries t >= {} (exact causal attention)\n",
      s.source, s.layers, s.q_heads, s.kv_heads, s.tokens, s.head_dim,
      s.has_k_prerope ? "yes" : "no", s.layers, s.q_heads, s.tokens, s.head_dim, s.layers,
      s.kv_heads, s.tokens, s.head_dim, dtypes_line(s),
      s.tokens > kRecentTokens ? kRecentTokens : 1);
  text += fmt::format("{:>5} {:>10} {:>12} {:>10} {:>11} {:>11}\n", "layer", "sink_mass",
                      "recent_mass", "k_outlier", "k_kurtosis", "v_kurtosis");
  for (const auto& l : s.per_layer)
    text += fmt::format("{:>5} {:>10.4f} {:>12.4f} {:>10.2f} {:>11.2f} {:>11.2f}\n", l.layer,
                        l.sink_mass, l.recent_mass, l.k_outlier, l.k_kurtosis, l.v_kurtosis);
  return text;
}

}  // namespace kvc
