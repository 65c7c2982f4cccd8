// kvc/eval/evaluate_cuda.hpp: `kvc eval --device cuda`: the protocol of kvc/eval/evaluate.hpp
// with every policy's cache a KVCache<Config, kvc::Cuda> (kvc/cache/kv_cache_cuda.hpp), so that
// the GPU path is measured with the same steps and metrics as the CPU reference.
//
//   kvc::EvalOptions options;
//   options.device = kvc::EvalDevice::cuda;
//   kvc::EvalResult r = kvc::evaluate_cuda(dump, {"snapkv(budget=128)+kivi(bits=2)"}, options);
//
// Specs the CUDA cache supports: eviction none (spec full), streamingllm, snapkv (not
// reference_compat), h2o; quantization none, kivi (2 or 4 bits, KIVI's axes, f16 scales), int8/int4
// (int_per_token, groups of a multiple of 16 channels), fp8; no merge, key projection or layer
// sharing; positions absolute. Any other spec fails with a kvc::Error naming the stage and what is
// supported; no GPU fails with a kvc::Error too. Defined in the kvc_eval_cuda library (built with
// KVC_ENABLE_CUDA).
#pragma once

#include <string>
#include <vector>

#include "kvc/eval/dump.hpp"
#include "kvc/eval/evaluate.hpp"

namespace kvc {

PolicyResult evaluate_policy_cuda(const KvDump& dump, const std::string& spec,
                                  const EvalOptions& options, int policy_index = 0);
EvalResult evaluate_cuda(const KvDump& dump, const std::vector<std::string>& specs,
                         const EvalOptions& options);

}  // namespace kvc
