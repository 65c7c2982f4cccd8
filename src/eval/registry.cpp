// The registry: policy names -> policies of the runtime cache's slots, with strict parameter
// parsing.
#include "kvc/eval/registry.hpp"

#include <charconv>
#include <sstream>

#include "kvc/eval/spec.hpp"

namespace kvc {
namespace {

std::string join_names(const std::vector<std::string>& names) {
  std::ostringstream out;
  for (std::size_t i = 0; i < names.size(); ++i) out << (i ? ", " : "") << names[i];
  return out.str();
}

const PolicyInfo& find_policy(const std::string& name) {
  std::vector<std::string> names;
  for (const auto& info : policy_catalog()) {
    if (info.name == name) return info;
    names.push_back(info.name);
  }
  KVC_FAIL("unknown policy '", name, "'; valid policies: ", join_names(names));
}

// Reads the parameters of one stage, rejecting unknown ones with the list of valid ones.
class ParamReader {
 public:
  ParamReader(const StageSpec& stage, const PolicyInfo& info) : stage_(stage), info_(info) {
    for (const auto& [key, value] : stage.params) {
      bool known = false;
      for (const auto& p : info.params) known = known || p.name == key;
      if (!known) {
        std::vector<std::string> names;
        for (const auto& p : info.params) names.push_back(p.name);
        KVC_FAIL("unknown parameter '", key, "' for policy ", info.name,
                 names.empty() ? std::string("; it takes no parameters")
                               : "; valid parameters: " + join_names(names));
      }
    }
  }

  const std::string* find(const char* key) const {
    for (const auto& [k, v] : stage_.params)
      if (k == key) return &v;
    return nullptr;
  }

  void read_int(const char* key, int& target) const {
    const std::string* value = find(key);
    if (!value) return;
    int parsed = 0;
    const auto [end, ec] = std::from_chars(value->data(), value->data() + value->size(), parsed);
    KVC_CHECK(ec == std::errc() && end == value->data() + value->size(), info_.name, ": ", key,
              " = '", *value, "' is not an integer");
    target = parsed;
  }

  template <class Enum>
  void read_choice(const char* key, Enum& target,
                   std::initializer_list<std::pair<const char*, Enum>> choices) const {
    const std::string* value = find(key);
    if (!value) return;
    std::vector<std::string> names;
    for (const auto& [name, e] : choices) {
      if (*value == name) {
        target = e;
        return;
      }
      names.push_back(name);
    }
    KVC_FAIL(info_.name, ": ", key, " = '", *value, "' is not one of ", join_names(names));
  }

 private:
  const StageSpec& stage_;
  const PolicyInfo& info_;
};

const char* pool_name(ops::Pool p) { return p == ops::Pool::avg ? "avg" : "max"; }
const char* gqa_name(GqaMode g) { return g == GqaMode::mean ? "mean" : "repeat"; }

}  // namespace

std::string_view kind_name(PolicyKind kind) {
  switch (kind) {
    case PolicyKind::eviction:
      return "eviction";
    case PolicyKind::merge:
      return "merge";
    case PolicyKind::quant:
      return "quant";
    case PolicyKind::key_projection:
      return "key_projection";
    case PolicyKind::layer_sharing:
      return "layer_sharing";
  }
  return "?";
}

const std::vector<PolicyInfo>& policy_catalog() {
  static const std::vector<PolicyInfo> catalog = [] {
    const StreamingLlm streaming{};
    const SnapKv snap{};
    const Kivi kivi{};
    return std::vector<PolicyInfo>{
        {"full", PolicyKind::eviction, "no compression: every token kept in f16", {}},
        {"streamingllm",
         PolicyKind::eviction,
         "StreamingLLM: sink tokens + recent window, trimmed after every forward",
         {{"sink", std::to_string(streaming.sink), "initial tokens always kept"},
          {"recent", std::to_string(streaming.recent), "most recent tokens kept"}}},
        {"snapkv",
         PolicyKind::eviction,
         "SnapKV: observation-window scores + pooling at prefill, top budget-window + window",
         {{"budget", std::to_string(snap.budget), "tokens kept per head, window included"},
          {"window", std::to_string(snap.window), "observation window W (last prompt queries)"},
          {"kernel", std::to_string(snap.kernel), "pooling kernel (odd)"},
          {"pool", pool_name(snap.pool), "avg | max"},
          {"gqa", gqa_name(snap.gqa),
           "mean (one selection per KV head) | repeat (per query head)"}}},
        {"kivi",
         PolicyKind::quant,
         "KIVI: keys per channel, values per token, asymmetric min-max, f16 residual",
         {{"bits", std::to_string(kivi.key_bits), "key and value bits (2, 4, 8)"},
          {"kbits", std::to_string(kivi.key_bits), "key bits, overrides bits"},
          {"vbits", std::to_string(kivi.value_bits), "value bits, overrides bits"},
          {"group", std::to_string(kivi.group), "group size G"},
          {"residual", std::to_string(kivi.residual),
           "full-precision residual R (multiple of G)"}}},
    };
  }();
  return catalog;
}

RuntimePolicies build_policies(std::string_view spec) {
  RuntimePolicies policies;
  std::string eviction_stage, quant_stage;
  for (const StageSpec& stage : parse_spec(spec)) {
    const PolicyInfo& info = find_policy(stage.name);
    const ParamReader params(stage, info);
    std::string& slot = info.kind == PolicyKind::eviction ? eviction_stage : quant_stage;
    KVC_CHECK(slot.empty(), "policy spec '", spec, "' names two ", kind_name(info.kind),
              " policies: ", slot, " and ", stage.name, "; a spec holds one policy per kind");
    slot = stage.name;
    if (stage.name == "full") {
      policies.eviction.policy = NoEviction{};
    } else if (stage.name == "streamingllm") {
      StreamingLlm p;
      params.read_int("sink", p.sink);
      params.read_int("recent", p.recent);
      p.validate();
      policies.eviction.policy = p;
    } else if (stage.name == "snapkv") {
      SnapKv p;
      params.read_int("budget", p.budget);
      params.read_int("window", p.window);
      params.read_int("kernel", p.kernel);
      params.read_choice("pool", p.pool, {{"avg", ops::Pool::avg}, {"max", ops::Pool::max}});
      params.read_choice("gqa", p.gqa, {{"mean", GqaMode::mean}, {"repeat", GqaMode::repeat}});
      p.validate();
      policies.eviction.policy = p;
    } else if (stage.name == "kivi") {
      Kivi p;
      int bits = p.key_bits;
      params.read_int("bits", bits);
      p.key_bits = p.value_bits = bits;
      params.read_int("kbits", p.key_bits);
      params.read_int("vbits", p.value_bits);
      params.read_int("group", p.group);
      params.read_int("residual", p.residual);
      p.validate();
      policies.quant.policy = p;
    } else {
      KVC_FAIL("policy '", stage.name, "' is listed but has no builder");
    }
  }
  return policies;
}

}  // namespace kvc
