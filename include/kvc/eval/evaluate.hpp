// kvc/eval/evaluate.hpp: the `kvc eval` protocol: what a policy costs in accuracy and bytes on a KV
// dump.
//
//   kvc::KvDump dump = kvc::load_dump("tests/data/seq0");
//   kvc::EvalResult r = kvc::evaluate(dump, {"full", "snapkv(budget=128)"}, kvc::EvalOptions{});
//   std::cout << kvc::format_table(r);
//
// Protocol: tokens [0, prefix) go through prefill + compress; then for each decode step
// t = prefix .. T-1 the key and value of token t are appended, the query of t attends over the
// cache, and decode-time policies observe the step and act. Metrics (per layer, and overall with
// the same sums over all layers):
//   rel_error   = sqrt(sum |o_c - o_f|^2) / sqrt(sum |o_f|^2) over all steps and query heads, o_f =
//                 exact attention of query t over tokens 0..t of the dump
//   attn_recall = mean over steps and query heads of o_f's attention mass on tokens still cached
//   bytes       = payload + quantization parameters held right after prefill compression
//   full_bytes  = f16 K + V of the prefix; compression_ratio = full_bytes / bytes
//   bits_per_value = 8 * bytes / (2 * L * Hkv * prefix * D): stored bits (payload + scales) per K/V
//                 element of the prefix (16 for full)
//   index_bytes = the int32 positions, reported apart
//   host_bytes  = a tier held in host memory (ShadowKV's offloaded values), reported apart and
//                 not part of bytes (which is what the accelerator holds)
#pragma once

#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

#include "kvc/cache/kv_cache.hpp"
#include "kvc/eval/dump.hpp"

namespace kvc {

// Where the caches live: cpu = KVCache<RuntimeConfig, Cpu> (every policy); cuda =
// KVCache<Config, Cuda> (kvc/eval/evaluate_cuda.hpp: the policies with a CUDA cache path).
enum class EvalDevice { cpu, cuda };

struct EvalOptions {
  EvalDevice device = EvalDevice::cpu;
  int prefix = -1;  // -1 selects floor(0.75 * T)
  PositionMode positions = PositionMode::absolute;
  std::filesystem::path dump_dir;  // empty: no --dump output
};

struct LayerResult {
  int layer = 0;
  double rel_error = 0;
  double attn_recall = 0;
  std::int64_t bytes = 0;
};

struct PolicyResult {
  std::string spec;
  double rel_error = 0;
  double attn_recall = 0;
  std::int64_t bytes = 0;
  std::int64_t full_bytes = 0;
  double compression_ratio = 0;
  double bits_per_value = 0;
  std::int64_t index_bytes = 0;
  std::int64_t host_bytes = 0;
  std::vector<LayerResult> layers;
};

struct EvalResult {
  std::string data;
  std::string device = "cpu";  // "cpu" or "cuda: <device name>"
  int prefix = 0;
  int tokens = 0;
  std::vector<PolicyResult> policies;
};

int default_prefix(int tokens);

// Runs one spec; when options.dump_dir is set, writes the state after prefill compression to
// options.dump_dir / <policy_index> / layer_<l> / {positions,keys,values}.npy.
PolicyResult evaluate_policy(const KvDump& dump, const std::string& spec,
                             const EvalOptions& options, int policy_index = 0);
// The CPU evaluation (options.device must be cpu; kvc/eval/evaluate_cuda.hpp has the GPU one).
EvalResult evaluate(const KvDump& dump, const std::vector<std::string>& specs,
                    const EvalOptions& options);

std::string format_table(const EvalResult& result);
std::string format_json(const EvalResult& result);  // the stable schema documented in README.md

}  // namespace kvc
