// The registry: policy names -> policies of the runtime cache's slots, with strict parameter
// parsing. The entries live in the per-family src/eval/policies_*.cpp files.
#include "kvc/eval/registry.hpp"

#include <charconv>
#include <cmath>
#include <map>
#include <sstream>

#include "registry_internal.hpp"

namespace kvc {
namespace {

std::vector<PolicyEntry> all_families() {
  std::vector<PolicyEntry> entries;
  for (auto family :
       {core_policies, quant_policies, scored_eviction_policies, calibrated_quant_policies,
        external_eviction_policies, merge_policies, sharing_policies, keyproj_policies}) {
    auto more = family();
    entries.insert(entries.end(), more.begin(), more.end());
  }
  return entries;
}

const std::vector<PolicyEntry>& registry() {
  static const std::vector<PolicyEntry> entries = all_families();
  return entries;
}

const PolicyEntry& find_entry(const std::string& name) {
  std::vector<std::string> names;
  for (const auto& entry : registry()) {
    if (entry.info.name == name) return entry;
    names.push_back(entry.info.name);
  }
  KVC_FAIL("unknown policy '", name, "'; valid policies: ", join_names(names));
}

}  // namespace

std::string join_names(const std::vector<std::string>& names) {
  std::ostringstream out;
  for (std::size_t i = 0; i < names.size(); ++i) out << (i ? ", " : "") << names[i];
  return out.str();
}

ParamReader::ParamReader(const StageSpec& stage, const PolicyInfo& info)
    : stage_(stage), info_(info) {
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

const std::string* ParamReader::find(const char* key) const {
  for (const auto& [k, v] : stage_.params)
    if (k == key) return &v;
  return nullptr;
}

void ParamReader::read_int(const char* key, int& target) const {
  const std::string* value = find(key);
  if (!value) return;
  int parsed = 0;
  const auto [end, ec] = std::from_chars(value->data(), value->data() + value->size(), parsed);
  KVC_CHECK(ec == std::errc() && end == value->data() + value->size(), info_.name, ": ", key,
            " = '", *value, "' is not an integer");
  target = parsed;
}

void ParamReader::read_double(const char* key, double& target) const {
  const std::string* value = find(key);
  if (!value) return;
  double parsed = 0;
  const auto [end, ec] = std::from_chars(value->data(), value->data() + value->size(), parsed);
  KVC_CHECK(ec == std::errc() && end == value->data() + value->size() && std::isfinite(parsed),
            info_.name, ": ", key, " = '", *value, "' is not a finite number");
  target = parsed;
}

void ParamReader::read_bool(const char* key, bool& target) const {
  const std::string* value = find(key);
  if (!value) return;
  if (*value == "true" || *value == "1") {
    target = true;
  } else if (*value == "false" || *value == "0") {
    target = false;
  } else {
    fail_choice(key, *value, {"true", "false", "1", "0"});
  }
}

void ParamReader::read_string(const char* key, std::string& target) const {
  if (const std::string* value = find(key)) target = *value;
}

void ParamReader::fail_choice(const char* key, const std::string& value,
                              const std::vector<std::string>& names) const {
  KVC_FAIL(info_.name, ": ", key, " = '", value, "' is not one of ", join_names(names));
}

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
    std::vector<PolicyInfo> infos;
    for (const auto& entry : registry()) infos.push_back(entry.info);
    return infos;
  }();
  return catalog;
}

RuntimePolicies build_policies(std::string_view spec) {
  RuntimePolicies policies;
  std::map<PolicyKind, std::string> taken;  // slot -> the stage that filled it
  for (const StageSpec& stage : parse_spec(spec)) {
    const PolicyEntry& entry = find_entry(stage.name);
    const ParamReader params(stage, entry.info);
    auto [slot, fresh] = taken.emplace(entry.info.kind, stage.name);
    KVC_CHECK(fresh, "policy spec '", spec, "' names two ", kind_name(entry.info.kind),
              " policies: ", slot->second, " and ", stage.name,
              "; a spec holds one policy per kind");
    entry.build(params, policies);
  }
  return policies;
}

}  // namespace kvc
