// `kvc eval --device cuda` (kvc/eval/evaluate_cuda.hpp): picks the KVCache<Config, Cuda> of a
// spec's eviction and quantizer at run time and runs the shared protocol (src/eval/protocol.hpp).
#include "kvc/eval/evaluate_cuda.hpp"

#include <string>
#include <type_traits>
#include <variant>

#include "eval/protocol.hpp"
#include "kvc/cache/kv_cache_cuda.hpp"
#include "kvc/core/cuda_runtime.hpp"
#include "kvc/core/error.hpp"
#include "kvc/eval/registry.hpp"

namespace kvc {
namespace {

template <class E, class Q>
struct CudaEvalConfig : DefaultConfig {
  using Eviction = E;
  using Quant = Q;
};

constexpr const char* kSupported =
    "the cuda backend supports eviction none (spec full), streamingllm, snapkv, h2o and "
    "quantization none, kivi, int8/int4, fp8, without merge, key projection or layer sharing";

std::string device_label() {
  const int count = cuda_runtime::device_count();
  KVC_CHECK(count > 0,
            "--device cuda: no CUDA device is visible (no GPU or no driver); use --device cpu");
  return "cuda: " + cuda_runtime::device_properties(cuda_runtime::current_device()).name;
}

}  // namespace

PolicyResult evaluate_policy_cuda(const KvDump& dump, const std::string& spec,
                                  const EvalOptions& options, int policy_index) {
  eval_detail::checked_prefix(dump, options);
  const RuntimePolicies policies = build_policies(spec);
  KVC_CHECK(policies.merge.name() == "none", spec, ": merge stage ", policies.merge.name(),
            " has no cuda path; ", kSupported);
  KVC_CHECK(policies.key_projection.name() == "none", spec, ": key projection ",
            policies.key_projection.name(), " has no cuda path; ", kSupported);
  KVC_CHECK(policies.layer_sharing.name() == "none", spec, ": layer sharing ",
            policies.layer_sharing.name(), " has no cuda path; ", kSupported);
  return std::visit(
      [&](const auto& eviction) -> PolicyResult {
        using E = std::decay_t<decltype(eviction)>;
        if constexpr (!cuda_cache_detail::kSupportedEviction<E>) {
          KVC_FAIL(spec, ": eviction ", E::kName, " has no cuda path; ", kSupported);
        } else {
          return std::visit(
              [&](const auto& quant) -> PolicyResult {
                using Q = std::decay_t<decltype(quant)>;
                if constexpr (!cuda_cache_detail::kSupportedQuant<Q>) {
                  KVC_FAIL(spec, ": quantization ", Q::kName, " has no cuda path; ", kSupported);
                } else {
                  KVCache<CudaEvalConfig<E, Q>, Cuda> cache{
                      eval_detail::shape_of(dump), eviction, quant,
                      eval_detail::cache_options_of(dump, options)};
                  return eval_detail::run_protocol(cache, dump, policies, spec, options,
                                                   policy_index);
                }
              },
              policies.quant.policy);
        }
      },
      policies.eviction.policy);
}

EvalResult evaluate_cuda(const KvDump& dump, const std::vector<std::string>& specs,
                         const EvalOptions& options) {
  KVC_CHECK(options.device == EvalDevice::cuda, "evaluate_cuda: options.device must be cuda");
  return eval_detail::evaluate_all(dump, specs, options, device_label(), evaluate_policy_cuda);
}

}  // namespace kvc
