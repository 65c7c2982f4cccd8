// `kvc calibrate prefixkv`: PrefixKV's offline search (ALGORITHMS.md section 6, OFFLINE) on a KV
// dump; writes the per-layer forget ratios the prefixkv policy reads (ratios=FILE).
#include <fmt/format.h>

#include <charconv>
#include <fstream>
#include <iostream>
#include <string>
#include <vector>

#include "commands.hpp"
#include "kvc/core/error.hpp"
#include "kvc/eval/dump.hpp"
#include "kvc/eval/json.hpp"
#include "kvc/policies/eviction/prefixkv.hpp"

namespace {

constexpr const char* kHelp =
    R"(usage: kvc calibrate prefixkv --data PATH --ratio r --out ratios.json [options]

PrefixKV's offline calibration: per layer the importance of every token (head-mean column sums of
the full causal attention of the first N tokens of the dump), then a binary search for one
cumulative-mass level p that makes the per-layer forget counts sum to r * L * N within the
tolerance, then a proportional rescale to that sum. Writes a JSON array of per-layer forget ratios
(count / N), the format of the released confs/*.json; use it with
  kvc eval --policy 'prefixkv(ratios=FILE)'
Calibrate on a different sequence (or prefix length) than the one you evaluate.

options:
  --data PATH          KV dump (directory or .safetensors)
  --ratio r            fraction of all tokens to forget, in [0, 1]
  --out FILE           JSON file to write
  --tokens N           calibrate on the first N tokens (default: all T)
  --start-size S       sinks the policy protects (default 4; protect = S + 1 with the last token)
  --tolerance X        stop when |sum - target| < X tokens (default 5)
  --max-iterations K   cap on the halvings of the search (default 100)
  --reference-compat   truncate each rescaled count as the released code does (the sum may fall
                       short of the target); default: largest remainders make it exact
)";

int parse_int(const std::string& flag, const std::string& text) {
  int value = 0;
  const auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), value);
  KVC_CHECK(ec == std::errc() && end == text.data() + text.size(), "calibrate prefixkv: ", flag,
            " = '", text, "' is not an integer");
  return value;
}

double parse_double(const std::string& flag, const std::string& text) {
  double value = 0;
  const auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), value);
  KVC_CHECK(ec == std::errc() && end == text.data() + text.size(), "calibrate prefixkv: ", flag,
            " = '", text, "' is not a number");
  return value;
}

int run_calibrate_prefixkv(const std::vector<std::string>& args) {
  std::string data, out;
  double ratio = -1, tolerance = 5.0;
  int tokens = -1, start_size = 4, max_iterations = 100;
  bool reference_compat = false;
  const char* options =
      "--data --ratio --out --tokens --start-size --tolerance --max-iterations --reference-compat";
  for (std::size_t i = 0; i < args.size(); ++i) {
    const std::string& flag = args[i];
    if (flag == "--help" || flag == "-h") {
      std::cout << kHelp;
      return 0;
    }
    if (flag == "--reference-compat") {
      reference_compat = true;
      continue;
    }
    KVC_CHECK(i + 1 < args.size(), "calibrate prefixkv: ", flag,
              " needs a value (or is unknown); options: ", options);
    const std::string& value = args[++i];
    if (flag == "--data")
      data = value;
    else if (flag == "--out")
      out = value;
    else if (flag == "--ratio")
      ratio = parse_double(flag, value);
    else if (flag == "--tokens")
      tokens = parse_int(flag, value);
    else if (flag == "--start-size")
      start_size = parse_int(flag, value);
    else if (flag == "--tolerance")
      tolerance = parse_double(flag, value);
    else if (flag == "--max-iterations")
      max_iterations = parse_int(flag, value);
    else
      KVC_FAIL("calibrate prefixkv: unknown option '", flag, "'; options: ", options);
  }
  KVC_CHECK(!data.empty() && !out.empty() && ratio >= 0,
            "calibrate prefixkv needs --data PATH, --ratio r and --out FILE");
  KVC_CHECK(ratio <= 1, "calibrate prefixkv: --ratio = ", ratio, " must be in [0, 1]");
  KVC_CHECK(start_size >= 0, "calibrate prefixkv: --start-size = ", start_size, " must be >= 0");
  const kvc::KvDump dump = kvc::load_dump(data);
  if (tokens < 0) tokens = dump.tokens;
  KVC_CHECK(tokens >= 2 && tokens <= dump.tokens, "calibrate prefixkv: --tokens = ", tokens,
            " must be in [2, T = ", dump.tokens, "]");
  std::vector<std::vector<float>> importance;
  for (int l = 0; l < dump.layers; ++l)
    importance.push_back(
        kvc::prefixkv_importance(dump.q(l).slice(1, 0, tokens), dump.k(l).slice(1, 0, tokens)));
  const kvc::PrefixKvProfile profile = kvc::prefixkv_profile(
      importance, ratio, start_size + 1, tolerance, max_iterations, reference_compat);
  kvc::json::Value ratios = kvc::json::Value::array();
  std::int64_t sum = 0;
  for (std::size_t l = 0; l < profile.ratios.size(); ++l) {
    ratios.push_back(profile.ratios[l]);
    sum += profile.forget[l];
  }
  std::ofstream file(out, std::ios::binary);
  KVC_CHECK(file, "calibrate prefixkv: cannot open '", out, "' for writing");
  file << kvc::json::dump(ratios) << '\n';
  file.close();
  KVC_CHECK(file, "calibrate prefixkv: error while writing '", out, "'");
  std::cout << fmt::format(
      "wrote {}: {} layers, forget {} of {} tokens (target {:.1f}), p = {:.6f} after {} "
      "iterations{}\n",
      out, dump.layers, sum, static_cast<std::int64_t>(tokens) * dump.layers, profile.target,
      profile.p, profile.iterations, profile.converged ? "" : " (iteration cap reached)");
  return 0;
}

}  // namespace

namespace kvc::cli {
const RegisterCalibrate kRegisteredPrefixKv{
    {"prefixkv", "per-layer forget ratios for prefixkv (binary search on prefill attention)",
     run_calibrate_prefixkv}};
}  // namespace kvc::cli
