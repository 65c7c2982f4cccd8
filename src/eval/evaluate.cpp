// The `kvc eval` protocol and its metrics (see kvc/eval/evaluate.hpp for the definitions) on the
// CPU; the steps themselves are src/eval/protocol.hpp, shared with --device cuda.
#include "kvc/eval/evaluate.hpp"

#include <string>

#include "eval/protocol.hpp"
#include "kvc/eval/registry.hpp"

namespace kvc {

int default_prefix(int tokens) { return static_cast<int>(std::floor(0.75 * tokens)); }

PolicyResult evaluate_policy(const KvDump& dump, const std::string& spec,
                             const EvalOptions& options, int policy_index) {
  KVC_CHECK(options.device == EvalDevice::cpu,
            "evaluate_policy runs on the CPU; --device cuda goes through evaluate_cuda "
            "(kvc/eval/evaluate_cuda.hpp)");
  eval_detail::checked_prefix(dump, options);
  const RuntimePolicies policies = build_policies(spec);
  RuntimeCache cache{eval_detail::shape_of(dump),
                     policies.eviction,
                     policies.merge,
                     policies.quant,
                     policies.layer_sharing,
                     policies.key_projection,
                     eval_detail::cache_options_of(dump, options)};
  return eval_detail::run_protocol(cache, dump, policies, spec, options, policy_index);
}

EvalResult evaluate(const KvDump& dump, const std::vector<std::string>& specs,
                    const EvalOptions& options) {
  return eval_detail::evaluate_all(dump, specs, options, "cpu", evaluate_policy);
}

}  // namespace kvc
