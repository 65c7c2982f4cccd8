// kvc/kvc.hpp: the umbrella header: core types, the CPU reference ops, every policy, the cache and
// the eval layer (dump IO, spec registry, metrics).
//
//   #include "kvc/kvc.hpp"
//   struct Config : kvc::DefaultConfig { using Eviction = kvc::SnapKv; };
//   kvc::KVCache<Config, kvc::Cpu> cache{kvc::CacheShape{32, 32, 8, 128},
//                                        kvc::SnapKv{.budget = 1024}};
#pragma once

#include "kvc/cache/kv_cache.hpp"
#include "kvc/core/backend.hpp"
#include "kvc/core/dispatch.hpp"
#include "kvc/core/dtype.hpp"
#include "kvc/core/error.hpp"
#include "kvc/core/view.hpp"
#include "kvc/eval/cq_codebook.hpp"
#include "kvc/eval/dump.hpp"
#include "kvc/eval/evaluate.hpp"
#include "kvc/eval/registry.hpp"
#include "kvc/ops/ops.hpp"
#include "kvc/policies/any.hpp"
#include "kvc/policies/concepts.hpp"
#include "kvc/policies/eviction/adakv.hpp"
#include "kvc/policies/eviction/duo_attention.hpp"
#include "kvc/policies/eviction/h2o.hpp"
#include "kvc/policies/eviction/knorm.hpp"
#include "kvc/policies/eviction/locret.hpp"
#include "kvc/policies/eviction/moa.hpp"
#include "kvc/policies/eviction/prefixkv.hpp"
#include "kvc/policies/eviction/pyramidkv.hpp"
#include "kvc/policies/eviction/snapkv.hpp"
#include "kvc/policies/eviction/streaming_llm.hpp"
#include "kvc/policies/eviction/tova.hpp"
#include "kvc/policies/eviction/windowkv.hpp"
#include "kvc/policies/quant/coupled.hpp"
#include "kvc/policies/quant/dense.hpp"
#include "kvc/policies/quant/fp8.hpp"
#include "kvc/policies/quant/int_per_token.hpp"
#include "kvc/policies/quant/kivi.hpp"
#include "kvc/policies/quant/mikv.hpp"
#include "kvc/policies/quant/quantized_rows.hpp"
#include "kvc/policies/quant/vidkv.hpp"
#include "kvc/policies/sharing/cla.hpp"
#include "kvc/policies/sharing/minicache.hpp"
