// Registry entries of the eviction policies driven by attention or key scores: h2o, tova, knorm,
// pyramidkv, adakv, windowkv.
#include <string>

#include "registry_internal.hpp"

namespace kvc {
namespace {

const char* pool_name(ops::Pool p) { return p == ops::Pool::avg ? "avg" : "max"; }

void read_pool(const ParamReader& params, ops::Pool& pool) {
  params.read_choice("pool", pool, {{"avg", ops::Pool::avg}, {"max", ops::Pool::max}});
}

}  // namespace

std::vector<PolicyEntry> scored_eviction_policies() {
  const H2o h2o{};
  const Tova tova{};
  const Knorm knorm{};
  const PyramidKv pyramid{};
  const AdaKv ada{};
  const WindowKv wkv{};
  return {
      {{"h2o",
        PolicyKind::eviction,
        "H2O: accumulated attention per KV head, heavy hitters + recent, one eviction per step",
        {{"variant", "decode",
          "decode (real-drop: prompt and every step scored, evicts to heavy+recent) | prefill "
          "(KVCache-Factory: top budget-window by prompt column sums + window, once)"},
         {"heavy", std::to_string(h2o.heavy), "heavy-hitter tokens kept (variant=decode)"},
         {"recent", std::to_string(h2o.recent), "most recent tokens kept (variant=decode)"},
         {"budget", std::to_string(h2o.budget),
          "tokens kept per head, window included (variant=prefill)"},
         {"window", std::to_string(h2o.window), "last prompt tokens kept (variant=prefill)"},
         {"normalize", "none",
          "none (H2O sums) | observed (divide by the number of queries that saw the token)"}}},
       [](const ParamReader& params, RuntimePolicies& out) {
         H2o p;
         params.read_choice("variant", p.variant,
                            {{"decode", H2oVariant::decode}, {"prefill", H2oVariant::prefill}});
         params.read_int("heavy", p.heavy);
         params.read_int("recent", p.recent);
         params.read_int("budget", p.budget);
         params.read_int("window", p.window);
         params.read_choice(
             "normalize", p.normalize,
             {{"none", ScoreNormalize::none}, {"observed", ScoreNormalize::observed}});
         p.validate();
         out.eviction.policy = p;
       }},
      {{"tova",
        PolicyKind::eviction,
        "TOVA: keep the tokens the current query attends to most, one eviction per step",
        {{"budget", std::to_string(tova.budget), "tokens kept per head"}}},
       [](const ParamReader& params, RuntimePolicies& out) {
         Tova p;
         params.read_int("budget", p.budget);
         p.validate();
         out.eviction.policy = p;
       }},
      {{"knorm",
        PolicyKind::eviction,
        "Knorm / L2Norm: keep the keys with the smallest L2 norm at prefill",
        {{"budget", std::to_string(knorm.budget), "tokens kept per head, window included"},
         {"window", std::to_string(knorm.window), "last prompt tokens always kept (0: none)"},
         {"skip_layers", std::to_string(knorm.skip_layers),
          "first layers left uncompressed (KVCache-Factory: 2)"}}},
       [](const ParamReader& params, RuntimePolicies& out) {
         Knorm p;
         params.read_int("budget", p.budget);
         params.read_int("window", p.window);
         params.read_int("skip_layers", p.skip_layers);
         p.validate();
         out.eviction.policy = p;
       }},
      {{"pyramidkv",
        PolicyKind::eviction,
        "PyramidKV: SnapKV selection with per-layer budgets shrinking from the first layer",
        {{"budget", std::to_string(pyramid.budget),
          "average tokens per layer and head, window included"},
         {"window", std::to_string(pyramid.window), "observation window W (last prompt queries)"},
         {"kernel", std::to_string(pyramid.kernel), "pooling kernel (odd)"},
         {"pool", pool_name(pyramid.pool), "avg | max"},
         {"beta", std::to_string(pyramid.beta), "last layer gets (budget-window)/beta"},
         {"gqa", "mean", "mean (one selection per KV head) | repeat (per query head)"},
         {"schedule", "paper",
          "paper (exact total L*(budget-window)) | integer (released code, floor overshoot) | "
          "kvpress (real-valued, rounded)"},
         {"reference_compat", "false",
          "true: the released integer schedule (= schedule=integer)"}}},
       [](const ParamReader& params, RuntimePolicies& out) {
         PyramidKv p;
         params.read_int("budget", p.budget);
         params.read_int("window", p.window);
         params.read_int("kernel", p.kernel);
         read_pool(params, p.pool);
         params.read_int("beta", p.beta);
         params.read_choice("gqa", p.gqa, {{"mean", GqaMode::mean}, {"repeat", GqaMode::repeat}});
         params.read_choice("schedule", p.schedule,
                            {{"paper", PyramidSchedule::paper},
                             {"integer", PyramidSchedule::integer},
                             {"kvpress", PyramidSchedule::kvpress}});
         params.read_bool("reference_compat", p.reference_compat);
         p.validate();
         out.eviction.policy = p;
       }},
      {{"adakv",
        PolicyKind::eviction,
        "AdaKV: one layer budget shared by the KV heads by their pooled window scores",
        {{"budget", std::to_string(ada.budget),
          "average tokens per KV head, window included (layer: budget x Hkv)"},
         {"window", std::to_string(ada.window), "observation window W, kept in every head"},
         {"kernel", std::to_string(ada.kernel), "pooling kernel (odd)"},
         {"pool", pool_name(ada.pool), "avg | max"}}},
       [](const ParamReader& params, RuntimePolicies& out) {
         AdaKv p;
         params.read_int("budget", p.budget);
         params.read_int("window", p.window);
         params.read_int("kernel", p.kernel);
         read_pool(params, p.pool);
         p.validate();
         out.eviction.policy = p;
       }},
      {{"windowkv",
        PolicyKind::eviction,
        "WindowKV: whole token windows by suffix attention, group budgets, group-shared indices",
        {{"budget", std::to_string(wkv.budget), "average prefix tokens per layer (suffix on top)"},
         {"task", "other",
          "qa (window score max, suffix suffix_max) | other (average, suffix suffix_avg)"},
         {"shared", std::to_string(wkv.shared), "layers per group (share budget and indices)"},
         {"beta", std::to_string(wkv.beta), "last group gets budget*shared/beta"},
         {"review_window", std::to_string(wkv.review_window), "window size w in tokens"},
         {"suffix_max", std::to_string(wkv.suffix_max), "suffix W for task=qa"},
         {"suffix_avg", std::to_string(wkv.suffix_avg), "suffix W for task=other"},
         {"reference_compat", "false",
          "true: drop ceil((len-budget)/w) windows as released; false: count real lengths"}}},
       [](const ParamReader& params, RuntimePolicies& out) {
         WindowKv p;
         params.read_int("budget", p.budget);
         params.read_choice("task", p.task,
                            {{"qa", WindowKvTask::qa}, {"other", WindowKvTask::other}});
         params.read_int("shared", p.shared);
         params.read_int("beta", p.beta);
         params.read_int("review_window", p.review_window);
         params.read_int("suffix_max", p.suffix_max);
         params.read_int("suffix_avg", p.suffix_avg);
         params.read_bool("reference_compat", p.reference_compat);
         p.validate();
         out.eviction.policy = p;
       }},
  };
}

}  // namespace kvc
