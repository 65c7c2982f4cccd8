// `kvc calibrate locret-proxy`: writes per-token, per-KV-head scores [L, Hkv, T] (scores.npy) for
// the locret policy from a KV dump's own attention: a documented stand-in for Locret's trained
// retaining head, which KV dumps cannot run.
#include <fmt/format.h>

#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstdint>
#include <iostream>
#include <limits>
#include <string>
#include <vector>

#include "commands.hpp"
#include "kvc/core/error.hpp"
#include "kvc/eval/array.hpp"
#include "kvc/eval/dump.hpp"
#include "kvc/eval/evaluate.hpp"
#include "kvc/eval/npy.hpp"

namespace {

constexpr const char* kHelp =
    R"(usage: kvc calibrate locret-proxy --data PATH --out scores.npy [options]

Writes f32 scores [L, Hkv, T] for  kvc eval --policy 'locret(...)'  (copy the file into the dump
directory as scores.npy). THIS IS A PROXY, not Locret: Locret scores each token with a trained
retaining head (an MLP on the token's q, k, v) that KV dumps cannot run. The proxy scores token j
of KV head h by the mean causal attention probability it receives from the (up to) W queries
j, j+1, ..., j+W-1, averaged over the query heads of h's group. Only prompt queries are used for
prompt tokens (i < prefix when j < prefix), so the scores do not see the decode steps kvc eval
measures; tokens past the prefix use the queries up to T (the policy never reads those).

options:
  --data PATH     KV dump (directory or .safetensors)
  --out FILE      .npy file to write
  --window W      queries averaged per token (default 32)
  --prefix N      prompt length the scores must not look past (default floor(0.75 * T), as
                  kvc eval; use the same --prefix for both)
)";

int parse_int(const std::string& flag, const std::string& text) {
  int value = 0;
  const auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), value);
  KVC_CHECK(ec == std::errc() && end == text.data() + text.size(), "calibrate locret-proxy: ", flag,
            " = '", text, "' is not an integer");
  return value;
}

// scores [L, Hkv, T] as described in kHelp.
std::vector<float> locret_proxy_scores(const kvc::KvDump& dump, int window, int prefix) {
  const int tokens = dump.tokens, d = dump.head_dim, group = dump.group_size();
  const double scale = 1.0 / std::sqrt(static_cast<double>(d));
  std::vector<float> scores(static_cast<std::size_t>(dump.layers) * dump.kv_heads * tokens);
  std::vector<double> sums(static_cast<std::size_t>(dump.kv_heads) * tokens);
  std::vector<double> probabilities(tokens);
  for (int l = 0; l < dump.layers; ++l) {
    const auto q = dump.q(l), k = dump.k(l);
    std::fill(sums.begin(), sums.end(), 0.0);
    for (int h = 0; h < dump.q_heads; ++h) {
      const int kvh = h / group;
      for (int i = 0; i < tokens; ++i) {
        double m = -std::numeric_limits<double>::infinity();
        for (int j = 0; j <= i; ++j) {
          double dot = 0;
          for (int c = 0; c < d; ++c) dot += static_cast<double>(q(h, i, c)) * k(kvh, j, c);
          probabilities[j] = dot * scale;
          m = std::max(m, probabilities[j]);
        }
        double z = 0;
        for (int j = 0; j <= i; ++j) z += (probabilities[j] = std::exp(probabilities[j] - m));
        // Query i contributes to the tokens j whose window [j, j + W) (cut at the limit) holds i.
        for (int j = std::max(0, i - window + 1); j <= i; ++j) {
          const int limit = j < prefix ? prefix : tokens;
          if (i < limit) sums[static_cast<std::size_t>(kvh) * tokens + j] += probabilities[j] / z;
        }
      }
    }
    for (int kvh = 0; kvh < dump.kv_heads; ++kvh)
      for (int j = 0; j < tokens; ++j) {
        const int limit = j < prefix ? prefix : tokens;
        const int queries = std::min(j + window, limit) - j;
        scores[(static_cast<std::size_t>(l) * dump.kv_heads + kvh) * tokens + j] =
            static_cast<float>(sums[static_cast<std::size_t>(kvh) * tokens + j] /
                               (static_cast<double>(queries) * group));
      }
  }
  return scores;
}

}  // namespace

namespace kvc::cli {

int run_calibrate_locret_proxy(const std::vector<std::string>& args) {
  std::string data, out;
  int window = 32, prefix = -1;
  for (std::size_t i = 0; i < args.size(); ++i) {
    const std::string& flag = args[i];
    if (flag == "--help" || flag == "-h") {
      std::cout << kHelp;
      return 0;
    }
    KVC_CHECK(i + 1 < args.size(), "calibrate locret-proxy: ", flag,
              " needs a value (or is unknown); options: --data --out --window --prefix");
    const std::string& value = args[++i];
    if (flag == "--data")
      data = value;
    else if (flag == "--out")
      out = value;
    else if (flag == "--window")
      window = parse_int(flag, value);
    else if (flag == "--prefix")
      prefix = parse_int(flag, value);
    else
      KVC_FAIL("calibrate locret-proxy: unknown option '", flag,
               "'; options: --data --out --window --prefix");
  }
  KVC_CHECK(!data.empty() && !out.empty(),
            "calibrate locret-proxy needs --data PATH and --out FILE");
  KVC_CHECK(window >= 1, "calibrate locret-proxy: --window = ", window, " must be >= 1");
  const kvc::KvDump dump = load_dump(data);
  if (prefix < 0) prefix = default_prefix(dump.tokens);
  KVC_CHECK(prefix >= 1 && prefix <= dump.tokens, "calibrate locret-proxy: --prefix = ", prefix,
            " must be in [1, T = ", dump.tokens, "]");
  const std::vector<float> scores = locret_proxy_scores(dump, window, prefix);
  write_npy(out, Array::from_float(scores, {dump.layers, dump.kv_heads, dump.tokens}, DType::f32));
  std::cout << fmt::format("wrote {} [{}, {}, {}] (locret proxy: window {}, prefix {})\n", out,
                           dump.layers, dump.kv_heads, dump.tokens, window, prefix);
  return 0;
}

const RegisterCalibrate kRegisteredLocretProxy{
    {"locret-proxy",
     "per-token scores.npy for locret from the dump's attention (a proxy, not a trained head)",
     run_calibrate_locret_proxy}};

}  // namespace kvc::cli
