// src/eval/protocol.hpp: the `kvc eval` protocol over any cache type (KVCache<RuntimeConfig, Cpu>
// for --device cpu, a KVCache<Config, Cuda> for --device cuda), so that both devices run exactly
// the same steps and metrics (definitions in kvc/eval/evaluate.hpp). Internal to src/eval*.
//
//   kvc::RuntimeCache cache{shape, ...};
//   kvc::PolicyResult r = kvc::eval_detail::run_protocol(cache, dump, policies, spec, options, 0);
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

#include "kvc/eval/array.hpp"
#include "kvc/eval/dump.hpp"
#include "kvc/eval/evaluate.hpp"
#include "kvc/eval/npy.hpp"
#include "kvc/eval/registry.hpp"
#include "kvc/ops/attention.hpp"

namespace kvc::eval_detail {

// Token t of a [H, T, D] tensor as an [H, D] view.
inline HostView<const float, 2> token_of(HostView<const float, 3> x, std::int64_t t) {
  HostView<const float, 2> out;
  out.data = x.data + t * x.strides[1];
  out.shape = {x.shape[0], x.shape[2]};
  out.strides = {x.strides[0], x.strides[2]};
  return out;
}

inline CacheShape shape_of(const KvDump& dump) {
  return CacheShape{dump.layers, dump.q_heads, dump.kv_heads, dump.head_dim};
}

// Writes the per-layer state right after prefill compression (`--dump`).
inline void write_layer_dump(const std::filesystem::path& dir,
                             const std::vector<HeadContents>& heads, int head_dim) {
  std::filesystem::create_directories(dir);
  std::int64_t n_max = 0;
  for (const auto& h : heads) n_max = std::max<std::int64_t>(n_max, h.positions.size());
  const auto storage_heads = static_cast<std::int64_t>(heads.size());
  std::vector<std::int32_t> positions(static_cast<std::size_t>(storage_heads * n_max), -1);
  std::vector<float> keys(static_cast<std::size_t>(storage_heads * n_max * head_dim), 0.0f);
  std::vector<float> values(keys.size(), 0.0f);
  for (std::int64_t s = 0; s < storage_heads; ++s) {
    const auto& h = heads[s];
    for (std::size_t i = 0; i < h.positions.size(); ++i) {
      positions[s * n_max + i] = h.positions[i];
      for (int c = 0; c < head_dim; ++c) {
        keys[(s * n_max + i) * head_dim + c] = h.keys[i * head_dim + c];
        values[(s * n_max + i) * head_dim + c] = h.values[i * head_dim + c];
      }
    }
  }
  write_npy(dir / "positions.npy", Array::from_int32(positions, {storage_heads, n_max}));
  write_npy(dir / "keys.npy",
            Array::from_float(keys, {storage_heads, n_max, head_dim}, DType::f32));
  write_npy(dir / "values.npy",
            Array::from_float(values, {storage_heads, n_max, head_dim}, DType::f32));
}

// The prefix of an evaluation (-1: the default), checked against the dump.
inline int checked_prefix(const KvDump& dump, const EvalOptions& options) {
  const int tokens = dump.tokens;
  const int prefix = options.prefix < 0 ? default_prefix(tokens) : options.prefix;
  KVC_CHECK(prefix >= 1 && prefix < tokens, "prefix = ", prefix, " out of range: must be in [1, ",
            tokens - 1, "] (T = ", tokens, " tokens, at least one decode step)");
  return prefix;
}

inline CacheOptions cache_options_of(const KvDump& dump, const EvalOptions& options) {
  CacheOptions cache_options;
  cache_options.positions = options.positions;
  cache_options.rope = ops::Rope{dump.rope_theta, ops::parse_rope_convention(dump.rope_convention)};
  return cache_options;
}

// Runs one spec through `cache` (freshly built from `policies`); when options.dump_dir is set,
// writes the state after prefill compression to options.dump_dir / <policy_index> / layer_<l>.
template <class Cache>
PolicyResult run_protocol(Cache& cache, const KvDump& dump, const RuntimePolicies& policies,
                          const std::string& spec, const EvalOptions& options, int policy_index) {
  const int tokens = dump.tokens;
  const int prefix = checked_prefix(dump, options);
  const int d = dump.head_dim, hq = dump.q_heads;
  PolicyResult result;
  result.spec = spec;
  result.full_bytes = static_cast<std::int64_t>(dump.layers) * dump.kv_heads * prefix * d * 2 *
                      static_cast<std::int64_t>(sizeof(f16));
  double total_error = 0, total_norm = 0, total_recall = 0;
  std::int64_t total_samples = 0;
  std::vector<float> out(static_cast<std::size_t>(hq) * d), full(out.size());
  std::vector<float> probabilities;
  // Layer sharing needs adjacent layers at once: every layer is prefilled and compressed first
  // (a merged pair is formed when its upper layer compresses; cla(share=...) picks its map from
  // every layer's prompt keys), bytes are read once all are compressed, and the decode steps run
  // token by token across layers, as an engine runs them (a reading layer attends to its source
  // layer, which must hold exactly the tokens up to this step). Without layer sharing each layer
  // is prefilled, compressed and decoded in turn.
  const bool cross_layer = policies.layer_sharing.name() != "none";
  std::vector<StorageBytes> layer_bytes(dump.layers);
  std::vector<double> error(dump.layers, 0.0), norm(dump.layers, 0.0), recall(dump.layers, 0.0);
  std::vector<std::int64_t> samples(dump.layers, 0);
  const auto prefill_layer = [&](int l) {
    const auto q = dump.q(l), k = dump.k(l), v = dump.v(l);
    constexpr bool takes_scores = requires {
      cache.prefill(l, k.slice(1, 0, prefix), v.slice(1, 0, prefix), q.slice(1, 0, prefix),
                    dump.scores(l, "").slice(1, 0, prefix));
    };
    if constexpr (takes_scores) {
      if (dump.has_scores()) {
        cache.prefill(l, k.slice(1, 0, prefix), v.slice(1, 0, prefix), q.slice(1, 0, prefix),
                      dump.scores(l, "external token scores").slice(1, 0, prefix));
        return;
      }
    }
    cache.prefill(l, k.slice(1, 0, prefix), v.slice(1, 0, prefix), q.slice(1, 0, prefix));
    // Key projections that decompose pre-RoPE keys (ShadowKV) get them; a dump without them
    // fails here naming the policy.
    if constexpr (requires { cache.prefill_prerope(l, k); }) {
      if (policies.key_projection.needs_prerope())
        cache.prefill_prerope(
            l, dump.k_prerope(l, policies.key_projection.name()).slice(1, 0, prefix));
    }
  };
  const auto record_layer = [&](int l) {
    layer_bytes[l] = cache.bytes(l);
    result.bytes += layer_bytes[l].stored();
    result.index_bytes += layer_bytes[l].index;
    result.host_bytes += layer_bytes[l].host;
    if (!options.dump_dir.empty())
      write_layer_dump(
          options.dump_dir / std::to_string(policy_index) / ("layer_" + std::to_string(l)),
          cache.materialize(l), d);
  };
  const auto decode_token = [&](int l, int t) {
    const auto q = dump.q(l), k = dump.k(l), v = dump.v(l);
    const auto q_t = token_of(q, t);
    cache.append(l, token_of(k, t), token_of(v, t));
    cache.attend(l, q_t, make_view(out.data(), {hq, d}));
    probabilities.resize(static_cast<std::size_t>(hq) * (t + 1));
    ops::decode_attention(Cpu{}, q_t, k.slice(1, 0, t + 1), v.slice(1, 0, t + 1),
                          make_view(full.data(), {hq, d}),
                          make_view(probabilities.data(), {hq, t + 1}));
    for (std::size_t i = 0; i < out.size(); ++i) {
      const double diff = static_cast<double>(out[i]) - full[i];
      error[l] += diff * diff;
      norm[l] += static_cast<double>(full[i]) * full[i];
    }
    const int storage_heads = cache.storage_heads(l);
    for (int h = 0; h < hq; ++h) {
      const int s = h / (hq / storage_heads);
      double mass = 0;
      for (const std::int32_t p : cache.positions(l, s))
        mass += probabilities[static_cast<std::size_t>(h) * (t + 1) + p];
      recall[l] += mass;
      ++samples[l];
    }
    cache.observe(l, q_t);
    cache.step(l);
  };
  if (cross_layer) {
    for (int l = 0; l < dump.layers; ++l) prefill_layer(l);
    for (int l = 0; l < dump.layers; ++l) cache.compress(l);
    for (int l = 0; l < dump.layers; ++l) record_layer(l);
    for (int t = prefix; t < tokens; ++t)
      for (int l = 0; l < dump.layers; ++l) decode_token(l, t);
  } else {
    for (int l = 0; l < dump.layers; ++l) {
      prefill_layer(l);
      cache.compress(l);
      record_layer(l);
      for (int t = prefix; t < tokens; ++t) decode_token(l, t);
    }
  }
  for (int l = 0; l < dump.layers; ++l) {
    LayerResult layer;
    layer.layer = l;
    layer.rel_error = norm[l] > 0 ? std::sqrt(error[l]) / std::sqrt(norm[l]) : 0.0;
    layer.attn_recall = samples[l] > 0 ? recall[l] / static_cast<double>(samples[l]) : 1.0;
    layer.bytes = layer_bytes[l].stored();
    result.layers.push_back(layer);
    total_error += error[l];
    total_norm += norm[l];
    total_recall += recall[l];
    total_samples += samples[l];
  }
  result.rel_error = total_norm > 0 ? std::sqrt(total_error) / std::sqrt(total_norm) : 0.0;
  result.attn_recall = total_samples > 0 ? total_recall / static_cast<double>(total_samples) : 1.0;
  result.compression_ratio =
      result.bytes > 0 ? static_cast<double>(result.full_bytes) / static_cast<double>(result.bytes)
                       : 0.0;
  // full_bytes / 2 bytes per f16 element = the number of K/V elements of the prefix.
  result.bits_per_value =
      8.0 * static_cast<double>(result.bytes) / (static_cast<double>(result.full_bytes) / 2.0);
  return result;
}

// The header of a result and every spec's row, `evaluate_one` running one spec (specs are all
// parsed first so that a typo in the last one fails before minutes of work).
template <class EvaluateOne>
EvalResult evaluate_all(const KvDump& dump, const std::vector<std::string>& specs,
                        const EvalOptions& options, std::string device, EvaluateOne evaluate_one) {
  KVC_CHECK(!specs.empty(), "eval needs at least one --policy");
  EvalResult result;
  result.data = dump.source;
  result.device = std::move(device);
  result.tokens = dump.tokens;
  result.prefix = options.prefix < 0 ? default_prefix(dump.tokens) : options.prefix;
  for (const auto& spec : specs) build_policies(spec);
  for (std::size_t i = 0; i < specs.size(); ++i)
    result.policies.push_back(evaluate_one(dump, specs[i], options, static_cast<int>(i)));
  return result;
}

}  // namespace kvc::eval_detail
