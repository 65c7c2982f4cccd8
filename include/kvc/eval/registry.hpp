// kvc/eval/registry.hpp: the one registry from policy names to policies, and the cache type that
// `kvc eval` runs every spec through.
//
//   kvc::RuntimePolicies p = kvc::build_policies("snapkv(budget=256)+kivi(bits=2)");
//   kvc::RuntimeCache cache{shape, p.eviction, p.quant, kvc::CacheOptions{}};
//   for (const auto& info : kvc::policy_catalog()) std::cout << info.name << '\n';
//
// Unknown names and parameters are rejected with the list of valid ones; a spec names at most one
// policy per kind (slot).
#pragma once

#include <string>
#include <string_view>
#include <vector>

#include "kvc/cache/kv_cache.hpp"
#include "kvc/policies/any.hpp"
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
#include "kvc/policies/keyproj/loki.hpp"
#include "kvc/policies/keyproj/palu.hpp"
#include "kvc/policies/keyproj/shadowkv.hpp"
#include "kvc/policies/keyproj/think.hpp"
#include "kvc/policies/merge/cam.hpp"
#include "kvc/policies/merge/elastic_cache.hpp"
#include "kvc/policies/merge/kvmerger.hpp"
#include "kvc/policies/quant/coupled.hpp"
#include "kvc/policies/quant/dense.hpp"
#include "kvc/policies/quant/fp8.hpp"
#include "kvc/policies/quant/int_per_token.hpp"
#include "kvc/policies/quant/kivi.hpp"
#include "kvc/policies/quant/mikv.hpp"
#include "kvc/policies/quant/vidkv.hpp"
#include "kvc/policies/sharing/cla.hpp"
#include "kvc/policies/sharing/minicache.hpp"

namespace kvc {

using RuntimeEviction = AnyEviction<NoEviction, StreamingLlm, SnapKv, H2o, Tova, Knorm, PyramidKv,
                                    AdaKv, DuoAttention, Locret, PrefixKv, Moa, WindowKv>;
using RuntimeMerge = AnyMerge<NoMerge, KvMerger, Cam, ElasticCache>;
using RuntimeQuant = AnyQuant<NoQuant, Kivi, IntPerToken, Fp8, CoupledQuant, VidKv, Mikv>;
using RuntimeKeyProjection = AnyKeyProjection<NoKeyProjection, ShadowKv, Think, Loki, Palu>;
using RuntimeLayerSharing = AnyLayerSharing<NoLayerSharing, MiniCache, Cla>;

struct RuntimeConfig : DefaultConfig {
  using Eviction = RuntimeEviction;
  using Merge = RuntimeMerge;
  using Quant = RuntimeQuant;
  using KeyProjection = RuntimeKeyProjection;
  using LayerSharing = RuntimeLayerSharing;
};
using RuntimeCache = KVCache<RuntimeConfig, Cpu>;

struct RuntimePolicies {
  RuntimeEviction eviction{NoEviction{}};
  RuntimeMerge merge{NoMerge{}};
  RuntimeQuant quant{NoQuant{}};
  RuntimeKeyProjection key_projection{NoKeyProjection{}};
  RuntimeLayerSharing layer_sharing{NoLayerSharing{}};
};

// Parses and validates a spec (kvc/eval/spec.hpp grammar) into the policies of each slot.
RuntimePolicies build_policies(std::string_view spec);

struct ParamInfo {
  std::string name;
  std::string default_value;
  std::string help;
};
struct PolicyInfo {
  std::string name;
  PolicyKind kind;
  std::string summary;
  std::vector<ParamInfo> params;
};
const std::vector<PolicyInfo>& policy_catalog();
std::string_view kind_name(PolicyKind kind);

}  // namespace kvc
