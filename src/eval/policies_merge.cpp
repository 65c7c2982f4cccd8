// Registry entries of the merge policies: kvmerger, cam, elastic (the Merge slot; a spec composes
// them after an eviction policy with '+', e.g. snapkv(...)+kvmerger(...), h2o(...)+cam(...)).
#include <string>

#include "registry_internal.hpp"

namespace kvc {

std::vector<PolicyEntry> merge_policies() {
  const KvMerger kvm{};
  const Cam cam{};
  const ElasticCache elastic{};
  return {
      {{"kvmerger",
        PolicyKind::merge,
        "KVMerger: runs of similar adjacent keys merged onto a pivot with Gaussian-kernel weights "
        "(alone, or folding what an eviction policy drops into what it keeps)",
        {{"budget", default_text(kvm.budget),
          "fraction of the prompt kept as rows when alone, window included (paper: 0.5, 0.35)"},
         {"threshold", default_text(kvm.threshold),
          "cosine threshold eps in (0, 1] linking adjacent keys; 0: eps from the budget"},
         {"window", std::to_string(kvm.window), "last prompt tokens never merged"},
         {"pivot", "attention",
          "attention (largest accumulated prompt attention) | center (middle of the set); alone"},
         {"sigma", default_text(kvm.sigma),
          "Gaussian kernel bandwidth; 0: sigma^2 = mean squared distance to the pivot in the set"},
         {"values", "kernel", "kernel (values use the key weights) | mean (plain mean)"}}},
       [](const ParamReader& params, RuntimePolicies& out) {
         KvMerger p;
         params.read_double("budget", p.budget);
         params.read_double("threshold", p.threshold);
         params.read_int("window", p.window);
         params.read_choice(
             "pivot", p.pivot,
             {{"attention", KvMergerPivot::attention}, {"center", KvMergerPivot::center}});
         params.read_double("sigma", p.sigma);
         params.read_choice("values", p.values,
                            {{"kernel", KvMergerValues::kernel}, {"mean", KvMergerValues::mean}});
         p.validate();
         out.merge.policy = p;
       }},
      {{"cam",
        PolicyKind::merge,
        "CaM: each value an eviction policy drops is added, with an attention-derived Bernoulli "
        "probability, to the next m kept values (after an eviction policy: h2o(...)+cam(...))",
        {{"merge", std::to_string(cam.merge), "m: kept tokens after the dropped one that share it"},
         {"denominator", "mean",
          "mean (p = acc_e / mean acc of the m; real-drop code) | max (released lm-eval loop)"},
         {"seed", std::to_string(cam.seed), "seed of the Bernoulli draws (reproducible)"},
         {"reference_compat", "false",
          "true: divide by m even when fewer kept tokens follow (released slicing; mass lost)"}}},
       [](const ParamReader& params, RuntimePolicies& out) {
         Cam p;
         params.read_int("merge", p.merge);
         params.read_choice("denominator", p.denominator,
                            {{"mean", CamDenominator::mean}, {"max", CamDenominator::max}});
         params.read_int("seed", p.seed);
         params.read_bool("reference_compat", p.reference_compat);
         p.validate();
         out.merge.policy = p;
       }},
      {{"elastic",
        PolicyKind::merge,
        "Elastic Cache: importance anchors, thrown tokens averaged into the nearest anchor, one "
        "fixed-point deletion per decode step (alone)",
        {{"ratio", default_text(elastic.ratio), "fraction of the prompt forgotten"},
         {"start_size", std::to_string(elastic.start_size), "sinks always kept"},
         {"distance", std::to_string(elastic.distance),
          "decode deletion index = T - forget + distance (> 0: distance itself)"},
         {"reference_compat", "false",
          "true: released argsort-as-rank selection, missing start offset, trunc forget"}}},
       [](const ParamReader& params, RuntimePolicies& out) {
         ElasticCache p;
         params.read_double("ratio", p.ratio);
         params.read_int("start_size", p.start_size);
         params.read_int("distance", p.distance);
         params.read_bool("reference_compat", p.reference_compat);
         p.validate();
         out.merge.policy = p;
       }},
  };
}

}  // namespace kvc
