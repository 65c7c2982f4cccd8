// kvc/eval/inspect.hpp: realism statistics of a KV dump (`kvc inspect`): does the data show what KV
// compression must handle (attention sinks, local attention, outlier key channels, heavy tails)?
//
//   kvc::DumpStats s = kvc::inspect_dump(kvc::load_dump("tests/data/seq0"));
//   std::cout << kvc::format_stats(s);
//
// Per layer, from exact causal attention over the dump (queries t >= 32 when T > 32, else t >= 1):
//   sink_mass    mean attention mass on token 0
//   recent_mass  mean attention mass on the last 32 tokens (t-31 .. t)
//   k_outlier    max over channels / median over channels of mean |k| (over heads and tokens)
//   k_kurtosis, v_kurtosis  Pearson kurtosis m4 / m2^2 of all elements (3 for a Gaussian)
#pragma once

#include <string>
#include <utility>
#include <vector>

#include "kvc/eval/dump.hpp"

namespace kvc {

struct LayerStats {
  int layer = 0;
  double sink_mass = 0;
  double recent_mass = 0;
  double k_outlier = 0;
  double k_kurtosis = 0;
  double v_kurtosis = 0;
};

struct DumpStats {
  std::string source;
  int layers = 0, q_heads = 0, kv_heads = 0, tokens = 0, head_dim = 0;
  bool has_k_prerope = false;
  std::vector<std::pair<std::string, DType>> stored_dtypes;  // each tensor's dtype on disk
  std::vector<LayerStats> per_layer;
};

DumpStats inspect_dump(const KvDump& dump);
std::string format_stats(const DumpStats& stats);

}  // namespace kvc
