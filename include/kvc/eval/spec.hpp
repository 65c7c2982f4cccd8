// kvc/eval/spec.hpp: the policy-spec grammar of `kvc eval --policy`.
//
//   auto stages = kvc::parse_spec("snapkv(budget=256,window=32)+kivi(bits=2)");
//   stages[0].name == "snapkv"; stages[0].params[0] == {"budget", "256"};
//
// Grammar: spec := stage ('+' stage)*; stage := name ['(' [param (',' param)*] ')'];
// param := key '=' value. Names and keys are [a-z0-9_]; values run to the next ',' or ')'.
// Whitespace around tokens is ignored. Errors name the offending character and its column.
#pragma once

#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace kvc {

struct StageSpec {
  std::string name;
  std::vector<std::pair<std::string, std::string>> params;  // in the order written
};

std::vector<StageSpec> parse_spec(std::string_view spec);

}  // namespace kvc
