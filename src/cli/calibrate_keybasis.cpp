// `kvc calibrate loki` and `kvc calibrate palu`: key bases for the key-projection policies
// (kvc/eval/key_basis.hpp), written as .safetensors (docs/formats.md, "Key bases").
#include <fmt/format.h>

#include <charconv>
#include <cstdlib>
#include <iostream>
#include <string>
#include <vector>

#include "commands.hpp"
#include "kvc/core/error.hpp"
#include "kvc/eval/dump.hpp"
#include "kvc/eval/key_basis.hpp"

namespace {

constexpr const char* kLokiHelp =
    R"(usage: kvc calibrate loki --data PATH --out FILE

Learns Loki's PCA bases (ALGORITHMS.md section 21): per layer and KV head, the principal
components of the post-RoPE keys of every token of the dump (mean-centred covariance), all D of
them, sorted by explained variance, with their explained-variance shares. Calibrate on a different
sequence than the one you evaluate; use the file with
  kvc eval --policy 'loki(basis=FILE,dims=0.25,topk=0.25)'

options:
  --data PATH   KV dump (directory or .safetensors)
  --out FILE    basis .safetensors to write
)";

constexpr const char* kPaluHelp =
    R"(usage: kvc calibrate palu --data PATH --out FILE [options]

Learns the basis of Palu-style latent keys (ALGORITHMS.md section 20, without model weights): per
layer and group of g KV heads, the top r right singular vectors of the pre-RoPE keys [T, g*D] of
the dump (k_prerope; not centred), r = round(ratio * g * D). Calibrate on a different sequence
than the one you evaluate; use the file with  kvc eval --policy 'palu(basis=FILE,bits=4)'

options:
  --data PATH    KV dump with k_prerope (directory or .safetensors)
  --out FILE     basis .safetensors to write
  --group g      KV heads per group, dividing Hkv (default 4, Palu's head_group_size; 1 = per head)
  --ratio x      latent size r / (g * D), in (0, 1] (default 0.5)
)";

struct Args {
  std::string data, out;
  int group = 4;
  double ratio = 0.5;
};

Args parse(const char* who, const std::vector<std::string>& args, bool palu, bool& help) {
  Args a;
  for (std::size_t i = 0; i < args.size(); ++i) {
    const std::string& flag = args[i];
    if (flag == "--help" || flag == "-h") {
      help = true;
      return a;
    }
    const char* options = palu ? "--data --out --group --ratio --help" : "--data --out --help";
    KVC_CHECK(i + 1 < args.size(), "calibrate ", who, ": ", flag,
              " needs a value (or is unknown); options: ", options);
    const std::string& value = args[++i];
    if (flag == "--data") {
      a.data = value;
    } else if (flag == "--out") {
      a.out = value;
    } else if (palu && flag == "--group") {
      const auto [end, ec] = std::from_chars(value.data(), value.data() + value.size(), a.group);
      KVC_CHECK(ec == std::errc() && end == value.data() + value.size(), "calibrate ", who,
                ": --group = '", value, "' is not an integer");
    } else if (palu && flag == "--ratio") {
      char* end = nullptr;
      a.ratio = std::strtod(value.c_str(), &end);
      KVC_CHECK(end && *end == '\0' && !value.empty(), "calibrate ", who, ": --ratio = '", value,
                "' is not a number");
    } else {
      KVC_FAIL("calibrate ", who, ": unknown option '", flag, "'; options: ", options);
    }
  }
  KVC_CHECK(!a.data.empty() && !a.out.empty(), "calibrate ", who,
            " needs --data PATH and --out FILE");
  return a;
}

int run_calibrate_loki(const std::vector<std::string>& args) {
  bool help = false;
  const Args a = parse("loki", args, false, help);
  if (help) {
    std::cout << kLokiHelp;
    return 0;
  }
  const kvc::KvDump dump = kvc::load_dump(a.data);
  const kvc::KeyBasis b = kvc::calibrate_loki(dump);
  kvc::write_key_basis(a.out, b, a.data);
  double top_quarter = 0;  // mean explained share of the first D/4 components
  for (int l = 0; l < b.layers; ++l)
    for (int h = 0; h < b.kv_heads; ++h)
      for (int j = 0; j < b.head_dim / 4; ++j) top_quarter += b.explained_at(l, h)[j];
  std::cout << fmt::format(
      "loki basis: {} layers x {} KV heads, {} components of D = {} (post-RoPE keys, {} tokens of "
      "{})\nmean variance explained by the first D/4 components: {:.4f}\nwritten to {}\n",
      b.layers, b.kv_heads, b.rank, b.head_dim, dump.tokens, a.data,
      top_quarter / (b.layers * b.kv_heads), a.out);
  return 0;
}

int run_calibrate_palu(const std::vector<std::string>& args) {
  bool help = false;
  const Args a = parse("palu", args, true, help);
  if (help) {
    std::cout << kPaluHelp;
    return 0;
  }
  const kvc::KvDump dump = kvc::load_dump(a.data);
  const kvc::KeyBasis b = kvc::calibrate_palu(dump, a.group, a.ratio);
  kvc::write_key_basis(a.out, b, a.data);
  double kept = 0;
  for (int l = 0; l < b.layers; ++l)
    for (int g = 0; g < b.groups(); ++g)
      for (int j = 0; j < b.rank; ++j) kept += b.explained_at(l, g)[j];
  std::cout << fmt::format(
      "palu basis: {} layers x {} groups of {} KV heads, rank {} of {} (pre-RoPE keys, {} tokens "
      "of {})\nmean key energy kept on the calibration data: {:.4f}\nwritten to {}\n",
      b.layers, b.groups(), b.group_heads, b.rank, b.width(), dump.tokens, a.data,
      kept / (b.layers * b.groups()), a.out);
  return 0;
}

const kvc::cli::RegisterCalibrate kLoki{
    {"loki", "Loki PCA bases of post-RoPE keys (kvc calibrate loki --help)", run_calibrate_loki}};
const kvc::cli::RegisterCalibrate kPalu{
    {"palu", "Palu-style SVD bases of pre-RoPE keys per head group (kvc calibrate palu --help)",
     run_calibrate_palu}};

}  // namespace
