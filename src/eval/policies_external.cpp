// Registry entries of the policies driven by external inputs: duoattention (gate table), locret
// (caller-supplied token scores), prefixkv (calibrated per-layer ratios), moa (per-head spans).
// Policies are trivially copyable, so a file named by a parameter is read here, at build time,
// into the policy's fixed-capacity arrays; the file formats are in docs/formats.md.
#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "kvc/eval/json.hpp"
#include "registry_internal.hpp"

namespace kvc {
namespace {

std::string read_policy_file(const char* policy, const char* param, const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  KVC_CHECK(in, policy, ": cannot open ", param, " file '", path, "'");
  std::stringstream text;
  text << in.rdbuf();
  return text.str();
}

// DuoAttention's full_attention_heads.tsv: one line per layer, one tab-separated gate per KV head.
void load_gate_table(const std::string& path, DuoAttention& p) {
  const std::string text = read_policy_file("duoattention", "gates", path);
  std::istringstream lines(text);
  std::string line;
  std::vector<float> values;
  int rows = 0, cols = 0, line_number = 0;
  while (std::getline(lines, line)) {
    ++line_number;
    if (!line.empty() && line.back() == '\r') line.pop_back();
    if (line.find_first_not_of(" \t") == std::string::npos) continue;
    int row_cols = 0;
    const char* s = line.c_str();
    while (true) {
      while (*s == '\t' || *s == ' ') ++s;
      if (*s == '\0') break;
      char* end = nullptr;
      const float v = std::strtof(s, &end);
      KVC_CHECK(end != s && (*end == '\0' || *end == '\t' || *end == ' '), "duoattention: gates '",
                path, "' line ", line_number, ": '",
                std::string(s, s + std::min<std::size_t>(20, std::strlen(s))), "' is not a number");
      values.push_back(v);
      ++row_cols;
      s = end;
    }
    KVC_CHECK(rows == 0 || row_cols == cols, "duoattention: gates '", path, "' line ", line_number,
              " has ", row_cols, " columns, the first row has ", cols,
              " (rows = layers, columns = KV heads)");
    cols = row_cols;
    ++rows;
  }
  KVC_CHECK(rows > 0, "duoattention: gates '", path, "' holds no gate values");
  p.set_gates(rows, cols, values);
}

// PrefixKV's per-layer forget ratios: a JSON array of numbers in [0, 1] (the shipped confs/*.json).
void load_layer_ratios(const std::string& path, PrefixKv& p) {
  const std::string text = read_policy_file("prefixkv", "ratios", path);
  json::Value root;
  try {
    root = json::parse(text);
  } catch (const Error& e) {
    KVC_FAIL("prefixkv: ratios '", path, "' is not valid JSON: ", e.what());
  }
  KVC_CHECK(root.is_array() && root.size() > 0, "prefixkv: ratios '", path,
            "' must be a non-empty JSON array of per-layer forget ratios, e.g. [0.11, 0.70]");
  std::vector<double> ratios;
  for (const auto& v : root.as_array()) {
    KVC_CHECK(v.is_number(), "prefixkv: ratios '", path, "' element ", ratios.size(),
              " is not a number");
    ratios.push_back(v.as_number());
  }
  p.set_layer_ratios(ratios);
}

// MoA spans: {"layers": [[{"sink": 4, "a": 64, "b": 0.25}, ... per KV head], ... per layer]}.
void load_span_table(const std::string& path, Moa& p) {
  const std::string text = read_policy_file("moa", "config", path);
  json::Value root;
  try {
    root = json::parse(text);
  } catch (const Error& e) {
    KVC_FAIL("moa: config '", path, "' is not valid JSON: ", e.what());
  }
  const char* schema = R"( must be {"layers": [[{"sink": 4, "a": 64, "b": 0.25}, ...], ...]})";
  KVC_CHECK(root.is_object() && root.contains("layers") && root.at("layers").is_array() &&
                root.at("layers").size() > 0,
            "moa: config '", path, "'", schema);
  std::vector<MoaSpan> spans;
  int cols = 0, rows = 0;
  for (const auto& layer : root.at("layers").as_array()) {
    KVC_CHECK(layer.is_array() && layer.size() > 0, "moa: config '", path, "' layer ", rows,
              " is not a non-empty array of per-head spans;", schema);
    KVC_CHECK(rows == 0 || static_cast<int>(layer.size()) == cols, "moa: config '", path,
              "' layer ", rows, " has ", layer.size(), " heads, layer 0 has ", cols);
    cols = static_cast<int>(layer.size());
    int head = 0;
    for (const auto& entry : layer.as_array()) {
      KVC_CHECK(entry.is_object(), "moa: config '", path, "' layer ", rows, " head ", head,
                " is not an object;", schema);
      for (const auto& [key, value] : entry.as_object())
        KVC_CHECK((key == "sink" || key == "a" || key == "b") && value.is_number(), "moa: config '",
                  path, "' layer ", rows, " head ", head, ": unknown or non-numeric key '", key,
                  "'; keys: sink, a, b (numbers)");
      KVC_CHECK(entry.contains("sink") && entry.contains("a"), "moa: config '", path, "' layer ",
                rows, " head ", head, " needs \"sink\" and \"a\" (\"b\" defaults to 0)");
      MoaSpan s;
      s.sink = static_cast<int>(entry.at("sink").as_int64());
      s.a = static_cast<float>(entry.at("a").as_number());
      s.b = entry.contains("b") ? static_cast<float>(entry.at("b").as_number()) : 0.0f;
      spans.push_back(s);
      ++head;
    }
    ++rows;
  }
  p.set_spans(rows, cols, spans);
}

}  // namespace

std::vector<PolicyEntry> external_eviction_policies() {
  const DuoAttention duo{};
  const Locret locret{};
  const PrefixKv prefix{};
  const Moa moa{};
  return {
      {{"duoattention",
        PolicyKind::eviction,
        "DuoAttention: retrieval heads keep everything, streaming heads sink + recent",
        {{"gates", "",
          "full_attention_heads.tsv (rows = layers, columns = KV heads); none: all gates 1"},
         {"sparsity", default_text(duo.sparsity),
          "fraction of streaming heads; < 0 uses threshold"},
         {"threshold", default_text(duo.threshold), "retrieval iff gate >= threshold"},
         {"sink", std::to_string(duo.sink), "sink tokens of a streaming head"},
         {"recent", std::to_string(duo.recent), "recent tokens of a streaming head"}}},
       [](const ParamReader& params, RuntimePolicies& out) {
         DuoAttention p;
         params.read_int("sink", p.sink);
         params.read_int("recent", p.recent);
         params.read_double("sparsity", p.sparsity);
         params.read_double("threshold", p.threshold);
         std::string gates;
         params.read_string("gates", gates);
         if (!gates.empty()) load_gate_table(gates, p);
         p.validate();
         out.eviction.policy = p;
       }},
      {{"locret",
        PolicyKind::eviction,
        "Locret: chunked-prefill eviction by external token scores (the dump's scores.npy)",
        {{"budget", std::to_string(locret.budget), "tokens kept per KV head during prefill"},
         {"local_len", std::to_string(locret.local_len), "last prompt tokens never evicted"},
         {"chunk_size", std::to_string(locret.chunk_size), "prefill chunk length"},
         {"stabilizers", std::to_string(locret.stabilizers),
          "newest entries forced in non-final chunks (<= budget)"}}},
       [](const ParamReader& params, RuntimePolicies& out) {
         Locret p;
         params.read_int("budget", p.budget);
         params.read_int("local_len", p.local_len);
         params.read_int("chunk_size", p.chunk_size);
         params.read_int("stabilizers", p.stabilizers);
         p.validate();
         out.eviction.policy = p;
       }},
      {{"prefixkv",
        PolicyKind::eviction,
        "PrefixKV: per-layer forget ratios, importance eviction at prefill, 1 deletion per step",
        {{"ratio", default_text(prefix.ratio), "forget ratio of every layer (no ratios file)"},
         {"ratios", "", "JSON array of per-layer forget ratios (kvc calibrate prefixkv)"},
         {"start_size", std::to_string(prefix.start_size), "first tokens always kept"},
         {"distance", std::to_string(prefix.distance),
          "decode deletion index = T - forget + distance"}}},
       [](const ParamReader& params, RuntimePolicies& out) {
         PrefixKv p;
         params.read_double("ratio", p.ratio);
         params.read_int("start_size", p.start_size);
         params.read_int("distance", p.distance);
         std::string ratios;
         params.read_string("ratios", ratios);
         KVC_CHECK(!(params.find("ratio") && !ratios.empty()),
                   "prefixkv: give either ratio=r or ratios=PATH, not both");
         if (!ratios.empty()) load_layer_ratios(ratios, p);
         p.validate();
         out.eviction.policy = p;
       }},
      {{"moa",
        PolicyKind::eviction,
        "MoA: per-head sinks + elastic windows a + b*N, trimmed after every forward",
        {{"config", "", "JSON span table (docs/formats.md); none: the uniform span below"},
         {"sink", std::to_string(moa.uniform.sink), "sinks of every head (no config)"},
         {"a", default_text(moa.uniform.a), "window at N = 0 (no config)"},
         {"b", default_text(moa.uniform.b), "window growth per token seen (no config)"}}},
       [](const ParamReader& params, RuntimePolicies& out) {
         Moa p;
         params.read_int("sink", p.uniform.sink);
         double a = p.uniform.a, b = p.uniform.b;
         params.read_double("a", a);
         params.read_double("b", b);
         p.uniform.a = static_cast<float>(a);
         p.uniform.b = static_cast<float>(b);
         std::string config;
         params.read_string("config", config);
         KVC_CHECK(config.empty() || !(params.find("sink") || params.find("a") || params.find("b")),
                   "moa: give either config=PATH or sink/a/b, not both");
         if (!config.empty()) load_span_table(config, p);
         p.validate();
         out.eviction.policy = p;
       }},
  };
}

}  // namespace kvc
