// `kvc calibrate cq`: learns Coupled Quantization codebooks by k-means on a KV dump
// (kvc/eval/cq_codebook.hpp) and writes them as .safetensors.
#include <fmt/format.h>

#include <charconv>
#include <cstdint>
#include <iostream>
#include <string>
#include <vector>

#include "commands.hpp"
#include "kvc/core/error.hpp"
#include "kvc/eval/cq_codebook.hpp"
#include "kvc/eval/dump.hpp"

namespace {

constexpr const char* kHelp =
    R"(usage: kvc calibrate cq --data PATH --out FILE [options]

Learns a Coupled Quantization codebook (ALGORITHMS.md section 12): for every (layer, KV head,
group of c contiguous channels, K or V) 2^b centroids in R^c, by k-means over all tokens of the
dump. Plain k-means only (squared Euclidean distance, unweighted): the Fisher-guided variant needs
loss gradients w.r.t. K/V, which KV dumps do not hold. Calibrate on a different sequence than the
one you evaluate; use the codebook with  kvc eval --policy 'cq(codebook=FILE)'.

options:
  --data PATH        KV dump (directory or .safetensors); keys pre-RoPE need k_prerope
  --out FILE         codebook .safetensors to write
  --channels c       coupled channels per group, one of 1, 2, 4, 8 (default 8)
  --bits b           bits per code (2^b centroids), one of 1, 2, 4, 8 (default 8);
                     bits per channel = b / c (8c8b = 1, 4c8b = 2, 4c4b = 1)
  --keys SPACE       prerope (default; codebooks independent of position) | postrope
  --iterations N     Lloyd iterations after k-means++ seeding (default 25)
  --seed S           seed of the k-means++ draws (default 0)
  --fisher           refused: no gradients in KV dumps (plain k-means only)
)";

int parse_int(const std::string& flag, const std::string& text) {
  int value = 0;
  const auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), value);
  KVC_CHECK(ec == std::errc() && end == text.data() + text.size(), "calibrate cq: ", flag, " = '",
            text, "' is not an integer");
  return value;
}

int run_calibrate_cq(const std::vector<std::string>& args) {
  std::string data, out;
  kvc::CqCalibrateOptions options;
  for (std::size_t i = 0; i < args.size(); ++i) {
    const std::string& flag = args[i];
    if (flag == "--help" || flag == "-h") {
      std::cout << kHelp;
      return 0;
    }
    KVC_CHECK(flag != "--fisher",
              "calibrate cq: --fisher is not available: Fisher-guided k-means weights each sample "
              "by squared loss gradients w.r.t. K/V, and KV dumps hold no gradients; plain k-means "
              "only");
    KVC_CHECK(i + 1 < args.size(), "calibrate cq: ", flag,
              " needs a value (or is unknown); options: --data --out --channels --bits --keys "
              "--iterations --seed");
    const std::string& value = args[++i];
    if (flag == "--data") {
      data = value;
    } else if (flag == "--out") {
      out = value;
    } else if (flag == "--channels") {
      options.channels = parse_int(flag, value);
    } else if (flag == "--bits") {
      options.bits = parse_int(flag, value);
    } else if (flag == "--iterations") {
      options.iterations = parse_int(flag, value);
    } else if (flag == "--seed") {
      const int seed = parse_int(flag, value);
      KVC_CHECK(seed >= 0, "calibrate cq: --seed = ", seed, " must be >= 0");
      options.seed = static_cast<std::uint64_t>(seed);
    } else if (flag == "--keys") {
      KVC_CHECK(value == "prerope" || value == "postrope", "calibrate cq: --keys = '", value,
                "' is not one of prerope, postrope");
      options.key_space = value == "prerope" ? kvc::CqKeySpace::prerope : kvc::CqKeySpace::postrope;
    } else {
      KVC_FAIL("calibrate cq: unknown option '", flag,
               "'; options: --data --out --channels --bits --keys --iterations --seed --help");
    }
  }
  KVC_CHECK(!data.empty() && !out.empty(), "calibrate cq needs --data PATH and --out FILE");
  const kvc::KvDump dump = kvc::load_dump(data);
  const kvc::CqCalibration cal = kvc::calibrate_cq(dump, options);
  kvc::write_cq_codebook(out, cal.codebook, options, data);
  double before = 0, after = 0;
  for (double v : cal.initial_objective) before += v;
  for (double v : cal.final_objective) after += v;
  std::cout << fmt::format(
      "cq codebook: {} layers x {} KV heads x {} groups x {} centroids of {} channels "
      "({} bits/channel), keys {}, {} tokens of {}\n"
      "k-means objective (sum over tables): {:.6g} after seeding -> {:.6g} after refinement\n"
      "written to {}\n",
      cal.codebook.layers, cal.codebook.kv_heads, cal.codebook.groups(), cal.codebook.centroids(),
      cal.codebook.channels, static_cast<double>(cal.codebook.bits) / cal.codebook.channels,
      options.key_space == kvc::CqKeySpace::prerope ? "pre-RoPE" : "post-RoPE", dump.tokens, data,
      before, after, out);
  // k-means with about as many centroids as samples puts a centroid on every calibration vector:
  // the objective reaches 0 and says nothing about other sequences (8c8b wants 2048+ tokens).
  if (dump.tokens < 4 * static_cast<std::int64_t>(cal.codebook.centroids())) {
    std::cerr << fmt::format(
        "kvc: warning: {} calibration tokens for {} centroids per table (fewer than 4 per "
        "centroid): the codebook memorises the calibration set; calibrate on more tokens or use "
        "fewer bits per code (e.g. --channels 4 --bits 4)\n",
        dump.tokens, cal.codebook.centroids());
  }
  return 0;
}

const kvc::cli::RegisterCalibrate kRegistered{
    {"cq", "Coupled Quantization codebooks by k-means (kvc calibrate cq --help)",
     run_calibrate_cq}};

}  // namespace
