// The `kvc eval` report: an aligned table for people, JSON with a stable schema for tools.
#include <fmt/format.h>

#include <algorithm>

#include "kvc/eval/evaluate.hpp"
#include "kvc/eval/json.hpp"

namespace kvc {

std::string format_table(const EvalResult& result) {
  std::size_t spec_width = 6;
  for (const auto& p : result.policies) spec_width = std::max(spec_width, p.spec.size());
  std::string text =
      fmt::format("data: {}  tokens: {}  prefix: {}  decode steps: {}{}\n", result.data,
                  result.tokens, result.prefix, result.tokens - result.prefix,
                  result.device == "cpu" ? "" : "  device: " + result.device);
  text += fmt::format("{:<{}}  {:>10}  {:>11}  {:>10}  {:>10}  {:>7}  {:>10}  {:>8}  {:>8}\n",
                      "policy", spec_width, "rel_error", "attn_recall", "bytes", "full_bytes",
                      "ratio", "bits/value", "index", "host");
  for (const auto& p : result.policies)
    text += fmt::format(
        "{:<{}}  {:>10.4e}  {:>11.4f}  {:>10}  {:>10}  {:>7.2f}  {:>10.3f}  {:>8}  {:>8}\n", p.spec,
        spec_width, p.rel_error, p.attn_recall, p.bytes, p.full_bytes, p.compression_ratio,
        p.bits_per_value, p.index_bytes, p.host_bytes);
  return text;
}

std::string format_json(const EvalResult& result) {
  json::Value root;
  root.set("data", result.data);
  root.set("device", result.device);
  root.set("tokens", result.tokens);
  root.set("prefix", result.prefix);
  json::Value policies = json::Value::array();
  for (const auto& p : result.policies) {
    json::Value entry;
    entry.set("spec", p.spec);
    entry.set("rel_error", p.rel_error);
    entry.set("attn_recall", p.attn_recall);
    entry.set("bytes", p.bytes);
    entry.set("full_bytes", p.full_bytes);
    entry.set("compression_ratio", p.compression_ratio);
    entry.set("bits_per_value", p.bits_per_value);
    entry.set("index_bytes", p.index_bytes);
    entry.set("host_bytes", p.host_bytes);
    json::Value layers = json::Value::array();
    for (const auto& l : p.layers) {
      json::Value layer;
      layer.set("layer", l.layer);
      layer.set("rel_error", l.rel_error);
      layer.set("attn_recall", l.attn_recall);
      layer.set("bytes", l.bytes);
      layers.push_back(std::move(layer));
    }
    entry.set("layers", std::move(layers));
    policies.push_back(std::move(entry));
  }
  root.set("policies", std::move(policies));
  return json::dump(root, 1) + "\n";
}

}  // namespace kvc
