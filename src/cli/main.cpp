// The `kvc` command-line tool: `kvc eval` (what a policy costs on a KV dump) and `kvc inspect`
// (realism statistics of a dump). Errors print one line and exit non-zero.
#include <fmt/format.h>

#include <charconv>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <string>
#include <string_view>
#include <vector>

#include "commands.hpp"
#include "kvc/core/error.hpp"
#include "kvc/eval/dump.hpp"
#include "kvc/eval/evaluate.hpp"
#if defined(KVC_HAVE_CUDA_EVAL)
#include "kvc/eval/evaluate_cuda.hpp"
#endif
#include "kvc/eval/inspect.hpp"
#include "kvc/eval/registry.hpp"

namespace kvc::cli {
std::vector<CalibrateCommand>& calibrate_commands() {
  static std::vector<CalibrateCommand> commands;
  return commands;
}
}  // namespace kvc::cli

namespace {

constexpr std::string_view kMainHelp =
    R"(kvc: KV-cache compression policies, measured on KV dumps.

usage: kvc <command> [options]

commands:
  eval      run compression policies on a KV dump and report error, recall and bytes
  inspect   print shapes and realism statistics of a KV dump
  calibrate compute offline calibration data for a method (kvc calibrate --help)
  help      this text (also: kvc --help, kvc <command> --help)
)";

constexpr std::string_view kEvalHelp =
    R"(usage: kvc eval --data PATH --policy SPEC [--policy SPEC ...] [options]

Runs every policy through the same protocol on a KV dump: tokens [0, prefix) are prefilled and
compressed; then for each step t = prefix .. T-1 token t's key and value are appended, its query
attends over the cache, and decode-time policies act.

options:
  --data PATH         KV dump: a directory (q.npy, k.npy, v.npy, optional k_prerope.npy and
                      scores.npy [L, Hkv, T] for locret, meta.json) or one .safetensors file
                      (tensors q, k, v, optional k_prerope, scores)
  --policy SPEC       a policy spec, repeatable; stages joined by '+', e.g.
                      'snapkv(budget=256,window=32,kernel=7,pool=max)+kivi(bits=2)'
  --prefix N          prompt length; default floor(0.75 * T); must be in [1, T-1]
  --positions MODE    absolute (default: keys keep their rotation) | reindexed (kept keys and the
                      query re-rotated to in-cache indices, StreamingLLM pos-shift)
  --device DEVICE     cpu (default: the reference caches, every policy) | cuda (the caches live
                      on the GPU: KVCache<Config, Cuda>; eviction none (spec full), streamingllm,
                      snapkv, h2o with quantization none, kivi, int8/int4, fp8)
  --json FILE         also write the results as JSON
  --dump DIR          write DIR/<i>/layer_<l>/{positions,keys,values}.npy: the state of policy i
                      right after prefill compression (positions int32 [S, n_max] padded with -1;
                      keys, values f32 [S, n_max, D] dequantized)
  --help              this text

metrics: rel_error = sqrt(sum |o_c - o_f|^2) / sqrt(sum |o_f|^2) over all decode steps and query
heads (o_f = exact attention over tokens 0..t); attn_recall = mean attention mass of o_f on tokens
still cached; bytes = payload + quantization parameters after prefill compression; full_bytes =
f16 K+V of the prefix; ratio = full_bytes / bytes; index = int32 position bytes (apart).
)";

constexpr std::string_view kInspectHelp =
    R"(usage: kvc inspect PATH

Prints the shapes of a KV dump and, per layer, statistics that show whether the data has what KV
compression must handle: attention mass on token 0 (sinks) and on the last 32 tokens (locality),
the key outlier-channel ratio (max / median over channels of mean |k|) and the kurtosis of k and v.
)";

struct UsageError : kvc::Error {
  using kvc::Error::Error;
};

std::string policies_help() {
  std::string text = "\npolicies (name(param=default, ...)):\n";
  for (const auto& info : kvc::policy_catalog()) {
    std::string params;
    for (const auto& p : info.params)
      params += fmt::format("{}{}={}", params.empty() ? "" : ",", p.name, p.default_value);
    text += fmt::format("  {:<14} [{}] {}\n",
                        params.empty() ? info.name : info.name + "(" + params + ")",
                        kvc::kind_name(info.kind), info.summary);
    for (const auto& p : info.params) text += fmt::format("      {:<10} {}\n", p.name, p.help);
  }
  return text;
}

// Returns the value following option `args[i]`, advancing i.
std::string option_value(const std::vector<std::string>& args, std::size_t& i) {
  if (i + 1 >= args.size()) throw UsageError(fmt::format("option {} needs a value", args[i]));
  return args[++i];
}

int parse_int(std::string_view what, const std::string& text) {
  int value = 0;
  const auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), value);
  if (ec != std::errc() || end != text.data() + text.size())
    throw UsageError(fmt::format("{} = '{}' is not an integer", what, text));
  return value;
}

void write_file(const std::string& path, const std::string& text) {
  std::ofstream out(path, std::ios::binary);
  KVC_CHECK(out, "cannot open '", path, "' for writing");
  out << text;
  out.close();
  KVC_CHECK(out, "error while writing '", path, "'");
}

int run_eval(const std::vector<std::string>& args) {
  std::string data, json_path;
  std::vector<std::string> specs;
  kvc::EvalOptions options;
  for (std::size_t i = 0; i < args.size(); ++i) {
    const std::string& a = args[i];
    if (a == "--help" || a == "-h") {
      std::cout << kEvalHelp << policies_help();
      return 0;
    } else if (a == "--data") {
      data = option_value(args, i);
    } else if (a == "--policy") {
      specs.push_back(option_value(args, i));
    } else if (a == "--prefix") {
      options.prefix = parse_int("--prefix", option_value(args, i));
      if (options.prefix < 1)
        throw kvc::Error(fmt::format("prefix = {} out of range: must be >= 1", options.prefix));
    } else if (a == "--positions") {
      const std::string mode = option_value(args, i);
      if (mode == "absolute")
        options.positions = kvc::PositionMode::absolute;
      else if (mode == "reindexed")
        options.positions = kvc::PositionMode::reindexed;
      else
        throw UsageError(fmt::format("--positions = '{}' is not one of absolute, reindexed", mode));
    } else if (a == "--device") {
      const std::string device = option_value(args, i);
      if (device == "cpu")
        options.device = kvc::EvalDevice::cpu;
      else if (device == "cuda")
        options.device = kvc::EvalDevice::cuda;
      else
        throw UsageError(fmt::format("--device = '{}' is not one of cpu, cuda", device));
    } else if (a == "--json") {
      json_path = option_value(args, i);
    } else if (a == "--dump") {
      options.dump_dir = option_value(args, i);
    } else {
      throw UsageError(fmt::format("unknown option '{}' for eval (see kvc eval --help)", a));
    }
  }
  if (data.empty()) throw UsageError("eval needs --data PATH (see kvc eval --help)");
  if (specs.empty())
    throw UsageError("eval needs at least one --policy SPEC (see kvc eval --help)");
  for (const auto& spec : specs) kvc::build_policies(spec);  // spec errors before loading data
  const kvc::KvDump dump = kvc::load_dump(data);
  kvc::EvalResult result;
  if (options.device == kvc::EvalDevice::cuda) {
#if defined(KVC_HAVE_CUDA_EVAL)
    result = kvc::evaluate_cuda(dump, specs, options);
#else
    throw kvc::Error(
        "--device cuda: this kvc was built without CUDA (configure with -DKVC_ENABLE_CUDA=ON)");
#endif
  } else {
    result = kvc::evaluate(dump, specs, options);
  }
  std::cout << kvc::format_table(result);
  if (!json_path.empty()) write_file(json_path, kvc::format_json(result));
  return 0;
}

int run_inspect(const std::vector<std::string>& args) {
  std::string path;
  for (const auto& a : args) {
    if (a == "--help" || a == "-h") {
      std::cout << kInspectHelp;
      return 0;
    }
    if (a.starts_with("-")) throw UsageError(fmt::format("unknown option '{}' for inspect", a));
    if (!path.empty()) throw UsageError("inspect takes one PATH");
    path = a;
  }
  if (path.empty()) throw UsageError("inspect needs a PATH (see kvc inspect --help)");
  std::cout << kvc::format_stats(kvc::inspect_dump(kvc::load_dump(path)));
  return 0;
}

int run_calibrate(const std::vector<std::string>& args) {
  const auto& commands = kvc::cli::calibrate_commands();
  std::string names;
  for (const auto& c : commands) names += (names.empty() ? "" : ", ") + std::string(c.name);
  if (args.empty() || args[0] == "--help" || args[0] == "-h") {
    std::string text =
        "usage: kvc calibrate <method> [options]   (kvc calibrate <method> --help)\n\nmethods:\n";
    for (const auto& c : commands) text += fmt::format("  {:<10} {}\n", c.name, c.summary);
    if (commands.empty()) text += "  (none yet)\n";
    if (args.empty())
      throw UsageError("calibrate needs a method; methods: " + (names.empty() ? "none" : names));
    std::cout << text;
    return 0;
  }
  for (const auto& c : commands)
    if (c.name == args[0]) return c.run(std::vector<std::string>(args.begin() + 1, args.end()));
  throw UsageError(fmt::format("unknown calibration method '{}'; methods: {}", args[0],
                               names.empty() ? "none" : names));
}

}  // namespace

int main(int argc, char** argv) {
  const std::vector<std::string> all(argv + 1, argv + argc);
  if (all.empty()) {
    std::cerr << kMainHelp;
    return 2;
  }
  const std::string& command = all[0];
  const std::vector<std::string> args(all.begin() + 1, all.end());
  try {
    if (command == "--help" || command == "-h" || command == "help") {
      std::cout << kMainHelp;
      return 0;
    }
    if (command == "eval") return run_eval(args);
    if (command == "inspect") return run_inspect(args);
    if (command == "calibrate") return run_calibrate(args);
    throw UsageError(
        fmt::format("unknown command '{}'; commands: eval, inspect, calibrate, help", command));
  } catch (const UsageError& e) {
    std::cerr << "kvc: error: " << e.what() << '\n';
    return 2;
  } catch (const kvc::Error& e) {
    std::cerr << "kvc: error: " << e.what() << '\n';
    return 1;
  } catch (const std::exception& e) {
    std::cerr << "kvc: error: " << e.what() << '\n';
    return 1;
  }
}
