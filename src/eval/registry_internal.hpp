// Private to src/eval: how policy families register with the runtime registry.
//
//   std::vector<PolicyEntry> core_policies() {
//     return {{{"streamingllm", PolicyKind::eviction, "...", {{"sink", "4", "..."}}},
//              [](const ParamReader& p, RuntimePolicies& out) { ... }}};
//   }
//
// Each family lives in its own src/eval/policies_<family>.cpp and is listed once in
// registry.cpp's all_families(). A builder reads its parameters through the ParamReader (unknown
// parameters were already rejected), validates the policy and stores it in its slot.
#pragma once

#include <cstdio>
#include <initializer_list>
#include <string>
#include <utility>
#include <vector>

#include "kvc/eval/registry.hpp"
#include "kvc/eval/spec.hpp"

namespace kvc {

std::string join_names(const std::vector<std::string>& names);

// A floating-point default as a user would type it in a spec: 0.5, 64, 0.125 (not 0.500000).
inline std::string default_text(double value) {
  char text[32];
  std::snprintf(text, sizeof text, "%g", value);
  return text;
}

class ParamReader {
 public:
  ParamReader(const StageSpec& stage, const PolicyInfo& info);

  const std::string* find(const char* key) const;
  void read_int(const char* key, int& target) const;
  void read_double(const char* key, double& target) const;
  void read_bool(const char* key, bool& target) const;  // true/false/1/0
  void read_string(const char* key, std::string& target) const;

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
    fail_choice(key, *value, names);
  }

 private:
  [[noreturn]] void fail_choice(const char* key, const std::string& value,
                                const std::vector<std::string>& names) const;
  const StageSpec& stage_;
  const PolicyInfo& info_;
};

struct PolicyEntry {
  PolicyInfo info;
  void (*build)(const ParamReader& params, RuntimePolicies& out);
};

// The families; each returns its entries in the order `kvc eval --help` lists them.
std::vector<PolicyEntry> core_policies();   // full, streamingllm, snapkv
std::vector<PolicyEntry> quant_policies();  // kivi, int8, int4, fp8
// h2o, tova, knorm, pyramidkv, adakv, windowkv (policies_scored.cpp)
std::vector<PolicyEntry> scored_eviction_policies();
std::vector<PolicyEntry> calibrated_quant_policies();  // cq (policies_quant_calibrated.cpp)

// duoattention, locret, prefixkv, moa (policies_external.cpp)
std::vector<PolicyEntry> external_eviction_policies();

// minicache, cla (policies_sharing.cpp)
std::vector<PolicyEntry> sharing_policies();

// kvmerger, cam, elastic (policies_merge.cpp)
std::vector<PolicyEntry> merge_policies();

// shadowkv, think, loki, palu (policies_keyproj.cpp)
std::vector<PolicyEntry> keyproj_policies();

}  // namespace kvc
