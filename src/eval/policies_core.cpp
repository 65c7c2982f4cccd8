// Registry entries of the first policies: full, streamingllm, snapkv (kivi: policies_quant.cpp).
#include <string>

#include "registry_internal.hpp"

namespace kvc {
namespace {

const char* pool_name(ops::Pool p) { return p == ops::Pool::avg ? "avg" : "max"; }
const char* gqa_name(GqaMode g) { return g == GqaMode::mean ? "mean" : "repeat"; }

}  // namespace

std::vector<PolicyEntry> core_policies() {
  const StreamingLlm streaming{};
  const SnapKv snap{};
  return {
      {{"full", PolicyKind::eviction, "no compression: every token kept in f16", {}},
       [](const ParamReader&, RuntimePolicies& out) { out.eviction.policy = NoEviction{}; }},
      {{"streamingllm",
        PolicyKind::eviction,
        "StreamingLLM: sink tokens + recent window, trimmed after every forward",
        {{"sink", std::to_string(streaming.sink), "initial tokens always kept"},
         {"recent", std::to_string(streaming.recent), "most recent tokens kept"}}},
       [](const ParamReader& params, RuntimePolicies& out) {
         StreamingLlm p;
         params.read_int("sink", p.sink);
         params.read_int("recent", p.recent);
         p.validate();
         out.eviction.policy = p;
       }},
      {{"snapkv",
        PolicyKind::eviction,
        "SnapKV: observation-window scores + pooling at prefill, top budget-window + window",
        {{"budget", std::to_string(snap.budget), "tokens kept per head, window included"},
         {"window", std::to_string(snap.window), "observation window W (last prompt queries)"},
         {"kernel", std::to_string(snap.kernel), "pooling kernel (odd)"},
         {"pool", pool_name(snap.pool), "avg | max"},
         {"gqa", gqa_name(snap.gqa), "mean (one selection per KV head) | repeat (per query head)"},
         {"reference_compat", snap.reference_compat ? "true" : "false",
          "true: survivors stored in score order (released code); false: ascending position"}}},
       [](const ParamReader& params, RuntimePolicies& out) {
         SnapKv p;
         params.read_int("budget", p.budget);
         params.read_int("window", p.window);
         params.read_int("kernel", p.kernel);
         params.read_choice("pool", p.pool, {{"avg", ops::Pool::avg}, {"max", ops::Pool::max}});
         params.read_choice("gqa", p.gqa, {{"mean", GqaMode::mean}, {"repeat", GqaMode::repeat}});
         params.read_bool("reference_compat", p.reference_compat);
         p.validate();
         out.eviction.policy = p;
       }},
  };
}

}  // namespace kvc
