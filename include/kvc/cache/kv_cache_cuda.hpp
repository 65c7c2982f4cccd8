// kvc/cache/kv_cache_cuda.hpp: KVCache<Config, kvc::Cuda>, the cache of kv_cache.hpp with its
// storage on the GPU, in the layouts of docs/formats.md (kvc/cache/cuda_stores.hpp).
//
//   struct Config : kvc::DefaultConfig { using Eviction = kvc::SnapKv; using Quant = kvc::Kivi; };
//   kvc::KVCache<Config, kvc::Cuda> cache{kvc::CacheShape{8, 8, 2, 64}, kvc::SnapKv{.budget = 256},
//                                         kvc::Kivi{}};
//   cache.prefill(layer, k, v, q); cache.compress(layer);  // selection, compaction, quantization
//   cache.append(layer, k_t, v_t); cache.attend(layer, q_t, out); cache.observe(layer, q_t);
//   cache.step(layer);                                     // decode-time eviction, KIVI flushes
//
// Same lifecycle and results as KVCache<Config, Cpu>: host float inputs are rounded to f16 on the
// way in (the CPU stores keep f16 rows and residuals too, and quantize the same values when the
// inputs are f16-representable, as the bundled dumps are), so bytes() is equal, kept positions are
// identical and stored codes are bit-identical for such inputs.
// Supported: Eviction = NoEviction, StreamingLlm, SnapKv (gqa mean or repeat; not
// reference_compat) or H2o (both variants; the decode variant with Quant = NoQuant only: its
// scores come from the dense attention kernel's score side output); Quant = NoQuant, Kivi (2 or 4
// bits, key bits = value bits, KIVI's axes, f16 parameters, group a multiple of 32), IntPerToken
// (groups a multiple of 16) or Fp8; no Merge / KeyProjection / LayerSharing; absolute positions;
// head_dim 64 or 128 and 1, 2, 4 or 8 query heads per storage head (the CUDA ops' limits). Other
// configurations fail to compile (static_assert naming the stages) or throw kvc::Error.
// The host code calls only public CUDA ops and the kvc::cuda_runtime helpers; link kvc::cuda.
// Where the work runs: SnapKV's scores, top-k and every compaction, quantization, flush, append
// and attention on the GPU; the keep rules of StreamingLLM and H2O on the host (from the counts,
// and for H2O from this step's group-summed probabilities, which the attention kernel emits and
// the host reads back: one small device-to-host copy per layer and step). attend() is one batched
// decode attention call per layer (batch entry s = storage head s, so ragged per-head counts need
// nothing special).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <iterator>
#include <span>
#include <string>
#include <type_traits>
#include <vector>

#include "kvc/cache/cuda_stores.hpp"
#include "kvc/cache/kv_cache.hpp"
#include "kvc/cache/staging.hpp"
#include "kvc/core/backend.hpp"
#include "kvc/core/cuda_runtime.hpp"
#include "kvc/core/dtype.hpp"
#include "kvc/core/error.hpp"
#include "kvc/core/view.hpp"
#include "kvc/ops/attention.hpp"
#include "kvc/ops/selection.hpp"
#include "kvc/policies/eviction/h2o.hpp"
#include "kvc/policies/eviction/snapkv.hpp"
#include "kvc/policies/eviction/streaming_llm.hpp"

namespace kvc {

namespace cuda_cache_detail {

template <class E>
inline constexpr bool kSupportedEviction =
    std::is_same_v<E, NoEviction> || std::is_same_v<E, StreamingLlm> || std::is_same_v<E, SnapKv> ||
    std::is_same_v<E, H2o>;
template <class Q>
inline constexpr bool kSupportedQuant = std::is_same_v<Q, NoQuant> || std::is_same_v<Q, Kivi> ||
                                        std::is_same_v<Q, IntPerToken> || std::is_same_v<Q, Fp8>;

}  // namespace cuda_cache_detail

template <class Config>
class KVCache<Config, Cuda> {
 public:
  using Eviction = typename Config::Eviction;
  using Merge = typename Config::Merge;
  using Quant = typename Config::Quant;
  using KeyProjection = typename Config::KeyProjection;
  using LayerSharing = typename Config::LayerSharing;
  using Storage = f16;  // rows, residuals and windows: what the CPU stores keep too
  static_assert(cuda_cache_detail::kSupportedEviction<Eviction>,
                "KVCache<Config, kvc::Cuda>: Config::Eviction must be NoEviction, StreamingLlm, "
                "SnapKv or H2o (other evictions have no CUDA cache path yet)");
  static_assert(cuda_cache_detail::kSupportedQuant<Quant>,
                "KVCache<Config, kvc::Cuda>: Config::Quant must be NoQuant, Kivi, IntPerToken or "
                "Fp8 (the formats with CUDA quantize and fused attention kernels)");
  static_assert(std::is_same_v<Merge, NoMerge>,
                "KVCache<Config, kvc::Cuda>: Config::Merge must be NoMerge: the CUDA cache has no "
                "merge stage after Eviction yet");
  static_assert(std::is_same_v<KeyProjection, NoKeyProjection>,
                "KVCache<Config, kvc::Cuda>: Config::KeyProjection must be NoKeyProjection: the "
                "CUDA cache stores full-rank keys only");
  static_assert(std::is_same_v<LayerSharing, NoLayerSharing>,
                "KVCache<Config, kvc::Cuda>: Config::LayerSharing must be NoLayerSharing: the CUDA "
                "cache stores every layer on its own");

  // Policies, CacheOptions and the Cuda tag (its stream) may be given in any order.
  template <class... Args>
  explicit KVCache(CacheShape shape, const Args&... args) : shape_(shape) {
    (assign(args), ...);
    shape_.validate();
    eviction_.validate();
    quant_.validate();
    KVC_CHECK(options_.positions == PositionMode::absolute, "cannot combine ",
              policy_name(eviction_),
              " with position mode reindexed on the cuda backend: the "
              "CUDA cache keeps each key's original rotation (absolute) only");
    KVC_CHECK(shape_.head_dim == 64 || shape_.head_dim == 128,
              "KVCache<cuda>: head_dim = ", shape_.head_dim,
              "; allowed 64 or 128 (the CUDA attention and selection ops)");
    const int group = repeat_mode() ? 1 : shape_.q_heads / shape_.kv_heads;
    KVC_CHECK(group == 1 || group == 2 || group == 4 || group == 8, "KVCache<cuda>: ", group,
              " query heads per storage head (", policy_name(eviction_),
              "); allowed 1, 2, 4 or 8 (the CUDA decode attention)");
    if constexpr (std::is_same_v<Eviction, SnapKv>)
      KVC_CHECK(!eviction_.reference_compat, "cannot combine ", policy_name(eviction_),
                "(reference_compat=true) with the cuda backend: the GPU selection stores "
                "survivors in ascending position only");
    KVC_CHECK(!(eviction_.evicts_on_decode() && !quant_.supports_decode_eviction()),
              "cannot combine ", policy_name(eviction_), " (evicts at decode) with ",
              policy_name(quant_),
              " (quantized groups span several tokens, so single tokens cannot be removed)");
    constexpr bool dense = std::is_same_v<Quant, NoQuant>;
    KVC_CHECK(!eviction_.observes_attention() || dense, "cannot combine ", policy_name(eviction_),
              " with ", policy_name(quant_),
              " on the cuda backend: its decode scores come from the dense attention kernel's "
              "score side output; the quantized attention kernels have none yet");
    if constexpr (!std::is_same_v<Quant, NoQuant> && !std::is_same_v<Quant, Fp8>)
      cuda_cache::Store<Quant>::check(quant_, shape_.head_dim);
    layers_.resize(shape_.layers);
  }

  const CacheShape& shape() const { return shape_; }
  const CacheOptions& options() const { return options_; }
  const Eviction& eviction() const { return eviction_; }
  const Quant& quant() const { return quant_; }
  Cuda stream() const { return stream_; }

  // Stages prompt tokens of one layer on the host (several calls append, as chunked prefill).
  void prefill(int layer, HostView<const float, 3> k,  // [Hkv, T, D]
               HostView<const float, 3> v,             // [Hkv, T, D]
               HostView<const float, 3> q) {           // [Hq, Tq, D], Tq may be 0
    LayerData& data = layer_data(layer);
    KVC_CHECK(!data.compressed, "prefill(layer ", layer,
              "): the layer is already compressed; prefill comes before compress()");
    check_heads("prefill keys", k, shape_.kv_heads);
    check_heads("prefill values", v, shape_.kv_heads);
    KVC_CHECK(k.size(1) == v.size(1), "prefill(layer ", layer, "): keys have ", k.size(1),
              " tokens but values have ", v.size(1));
    if (q.size(1) > 0) check_heads("prefill queries", q, shape_.q_heads);
    for (std::int64_t h = 0; h < k.size(0); ++h)
      for (std::int64_t t = 0; t < k.size(1); ++t) {
        check_finite(layer, static_cast<int>(h), data.next_position + static_cast<int>(t), "key",
                     &k(h, t, 0), k.strides[2]);
        check_finite(layer, static_cast<int>(h), data.next_position + static_cast<int>(t), "value",
                     &v(h, t, 0), v.strides[2]);
      }
    append_heads(data.staged_keys, data.staged_tokens, k);
    append_heads(data.staged_values, data.staged_tokens, v);
    for (std::int64_t t = 0; t < k.size(1); ++t)
      data.staged_positions.push_back(data.next_position++);
    data.staged_tokens += k.size(1);
    if (q.size(1) > 0) {
      append_heads(data.staged_queries, data.staged_query_count, q);
      data.staged_query_count += q.size(1);
    }
  }

  // Selects the kept prompt tokens (SnapKV on the GPU: window scores, pooling, top-k; the others
  // by their host rule), compacts them on the GPU and hands them to the layer's store (which
  // quantizes them there).
  void compress(int layer) {
    LayerData& data = layer_data(layer);
    KVC_CHECK(!data.compressed, "compress(layer ", layer, "): already compressed");
    const std::int64_t tokens = data.staged_tokens;
    const std::int64_t d = shape_.head_dim, hkv = shape_.kv_heads, hq = shape_.q_heads;
    namespace rt = cuda_runtime;

    // Staged K/V on the device.
    rt::DeviceBuffer k_dev = upload_f16(data.staged_keys);
    rt::DeviceBuffer v_dev = upload_f16(data.staged_values);

    int storage_heads = 0;
    std::int64_t kmax = 0;
    std::vector<int> counts;
    std::vector<std::vector<std::int32_t>> keep;  // host copy of the kept indices
    rt::DeviceBuffer keep_dev, select_workspace, q_window_dev;
    bool device_selection = false;
    if constexpr (std::is_same_v<Eviction, SnapKv>) device_selection = tokens >= eviction_.budget;
    if (device_selection) {
      if constexpr (std::is_same_v<Eviction, SnapKv>) {
        const int w = eviction_.window;
        KVC_CHECK(data.staged_query_count >= w, "snapkv: needs the last window = ", w,
                  " prompt queries, the prefill gave ", data.staged_query_count);
        const int selected = eviction_.budget - w;
        storage_heads = static_cast<int>(repeat_mode() ? hq : hkv);
        kmax = eviction_.budget;
        counts.assign(storage_heads, eviction_.budget);
        // The last W queries of every query head: [Hq, W, D].
        std::vector<float> window(static_cast<std::size_t>(hq * w * d));
        const std::int64_t tq = data.staged_query_count;
        for (std::int64_t h = 0; h < hq; ++h)
          for (std::int64_t i = 0; i < w; ++i)
            for (std::int64_t c = 0; c < d; ++c)
              window[(h * w + i) * d + c] = data.staged_queries[(h * tq + tq - w + i) * d + c];
        q_window_dev = upload_f16(window);
        keep_dev =
            rt::DeviceBuffer(static_cast<std::size_t>(storage_heads) * kmax * sizeof(std::int32_t));
        select_workspace = rt::DeviceBuffer(std::max<std::size_t>(
            ops::snapkv_select_workspace_bytes(static_cast<int>(hq), w, static_cast<int>(tokens),
                                               storage_heads, selected),
            1));
        ops::snapkv_select(
            stream_,
            make_device_view(device_ptr<const Storage>(q_window_dev), {hq, std::int64_t{w}, d}),
            make_device_view(device_ptr<const Storage>(k_dev), {hkv, tokens, d}), selected,
            eviction_.kernel, eviction_.pool,
            make_device_view(device_ptr<std::int32_t>(keep_dev),
                             {std::int64_t{storage_heads}, kmax}),
            make_device_view(device_ptr<std::byte>(select_workspace),
                             {static_cast<std::int64_t>(select_workspace.bytes())}));
        std::vector<std::int32_t> table(static_cast<std::size_t>(storage_heads * kmax));
        rt::copy_device_to_host(table.data(), keep_dev.data(), table.size() * sizeof(std::int32_t),
                                stream_);
        rt::synchronize(stream_);
        for (int s = 0; s < storage_heads; ++s)
          keep.emplace_back(table.begin() + s * kmax, table.begin() + (s + 1) * kmax);
        data.source_head.resize(storage_heads);
        for (int s = 0; s < storage_heads; ++s)
          data.source_head[s] = static_cast<int>(s * hkv / storage_heads);
      }
    } else {
      // The policy's own rule on the host (from the shapes, or H2O's prompt attention).
      PrefillInput in;
      in.layer = layer;
      in.num_layers = shape_.layers;
      in.keys = make_view(static_cast<const float*>(data.staged_keys.data()), {hkv, tokens, d});
      in.values = make_view(static_cast<const float*>(data.staged_values.data()), {hkv, tokens, d});
      in.queries = make_view(static_cast<const float*>(data.staged_queries.data()),
                             {hq, data.staged_query_count, d});
      in.positions = data.staged_positions;
      const Selection selection = eviction_.prefill(eviction_state_, in);
      storage_heads = static_cast<int>(selection.keep.size());
      KVC_CHECK(storage_heads >= 1 && storage_heads % hkv == 0 &&
                    shape_.q_heads % storage_heads == 0 &&
                    selection.source_head.size() == selection.keep.size(),
                policy_name(eviction_), " (layer ", layer, ") returned ", storage_heads,
                " storage heads; the cuda cache needs a multiple of kv_heads = ", hkv,
                " dividing q_heads = ", shape_.q_heads);
      for (int s = 0; s < storage_heads; ++s) {
        KVC_CHECK(selection.source_head[s] == s * hkv / storage_heads, policy_name(eviction_),
                  ": storage head ", s, " reads KV head ", selection.source_head[s],
                  "; the cuda cache maps it to KV head ", s * hkv / storage_heads);
        kmax = std::max<std::int64_t>(kmax, static_cast<std::int64_t>(selection.keep[s].size()));
        check_keep(selection.keep[s], tokens, layer, s);
      }
      keep = selection.keep;
      for (const auto& row : keep) counts.push_back(static_cast<int>(row.size()));
      data.source_head = selection.source_head;
    }

    data.storage_heads = storage_heads;
    data.positions.assign(storage_heads, {});
    for (int s = 0; s < storage_heads; ++s)
      for (const std::int32_t i : keep[s]) data.positions[s].push_back(data.staged_positions[i]);
    // The kept rows, compacted on the device: the f16 store keeps them as its storage, the
    // quantized stores quantize them.
    const std::int64_t cap = std::max<std::int64_t>(kmax, kMinCapacity);
    cuda_cache::RowTable kept_keys(stream_, storage_heads, cap, d * std::int64_t{sizeof(Storage)});
    cuda_cache::RowTable kept_values(stream_, storage_heads, cap,
                                     d * std::int64_t{sizeof(Storage)});
    if (kmax > 0 && tokens > 0) {
      // The host keep sets again as device tables (SnapKV's were computed there; re-uploading
      // its few hundred indices keeps one path for every eviction).
      const cuda_cache::KeepTable table(stream_, keep);
      const auto rows = [&](const cuda_cache::RowTable& t) {
        return DeviceView<Storage, 3>{
            t.at<Storage>(0, 0), {std::int64_t{storage_heads}, kmax, d}, {cap * d, d, 1}};
      };
      ops::compact_rows(stream_, table.indices_view(), table.counts_view(),
                        make_device_view(device_ptr<const Storage>(k_dev), {hkv, tokens, d}),
                        make_device_view(device_ptr<const Storage>(v_dev), {hkv, tokens, d}),
                        rows(kept_keys), rows(kept_values));
      rt::synchronize(stream_);  // the tables are freed here
    }
    const cuda_cache::LayerPrompt prompt{
        make_device_view(device_ptr<const Storage>(k_dev), {1, hkv, tokens, d}),
        make_device_view(device_ptr<const Storage>(v_dev), {1, hkv, tokens, d})};
    data.store.load(quant_, context(data), std::move(kept_keys), std::move(kept_values), counts,
                    prompt);
    // The staging buffers above die at the end of this scope: let the stream finish with them.
    rt::synchronize(stream_);
    data.staged_keys.clear();
    data.staged_values.clear();
    data.staged_queries.clear();
    data.staged_positions.clear();
    data.staged_tokens = data.staged_query_count = 0;
    data.compressed = true;
  }

  // Appends one decode token (its key and value per KV head) at the next absolute position.
  void append(int layer, HostView<const float, 2> k,  // [Hkv, D]
              HostView<const float, 2> v) {           // [Hkv, D]
    LayerData& data = ready_layer(layer, "append");
    KVC_CHECK(k.size(0) == shape_.kv_heads && k.size(1) == shape_.head_dim &&
                  v.size(0) == shape_.kv_heads && v.size(1) == shape_.head_dim,
              "append(layer ", layer, "): keys/values must be [", shape_.kv_heads, ", ",
              shape_.head_dim, "], got [", k.size(0), ", ", k.size(1), "] and [", v.size(0), ", ",
              v.size(1), "]");
    const std::int32_t position = data.next_position++;
    for (std::int64_t h = 0; h < k.size(0); ++h) {
      check_finite(layer, static_cast<int>(h), position, "key", &k(h, 0), k.strides[1]);
      check_finite(layer, static_cast<int>(h), position, "value", &v(h, 0), v.strides[1]);
    }
    const std::int64_t s_heads = data.storage_heads, d = shape_.head_dim;
    // One row per storage head (its source KV head's), [S, D] f16.
    std::vector<Storage> rows(static_cast<std::size_t>(2 * s_heads * d));
    for (std::int64_t s = 0; s < s_heads; ++s)
      for (std::int64_t c = 0; c < d; ++c) {
        rows[s * d + c] = Storage(k(data.source_head[s], c));
        rows[(s_heads + s) * d + c] = Storage(v(data.source_head[s], c));
      }
    ensure(token_rows_, rows.size() * sizeof(Storage));
    cuda_runtime::copy_host_to_device(token_rows_.data(), rows.data(),
                                      rows.size() * sizeof(Storage), stream_);
    const auto* key_rows = device_ptr<const Storage>(token_rows_);
    data.store.append(quant_, context(data), make_device_view(key_rows, {s_heads, 1, 1, d}),
                      make_device_view(key_rows + s_heads * d, {s_heads, 1, 1, d}));
    for (auto& p : data.positions) p.push_back(position);
  }

  // Attention of one query per head over the stored tokens; host in and out (q rounded to f16,
  // the output is the kernel's f16 result widened).
  void attend(int layer, HostView<const float, 2> q,  // [Hq, D]
              HostView<float, 2> out) const {         // [Hq, D]
    check_query("attend", layer, q);
    KVC_CHECK(out.size(0) == shape_.q_heads && out.size(1) == shape_.head_dim, "attend(layer ",
              layer, "): out must be [", shape_.q_heads, ", ", shape_.head_dim, "]");
    stage_query(q);
    attend(layer,
           make_device_view(device_ptr<const Storage>(query_), {shape_.q_heads, shape_.head_dim}),
           make_device_view(device_ptr<Storage>(output_), {shape_.q_heads, shape_.head_dim}));
    read_output(out);
  }

  // The same on device buffers (asynchronous on the cache's stream): one batched decode attention
  // call, batch entry s = storage head s with its own length.
  void attend(int layer, DeviceView<const Storage, 2> q,  // [Hq, D]
              DeviceView<Storage, 2> out) const {         // [Hq, D]
    const LayerData& data = ready_layer(layer, "attend");
    KVC_CHECK(q.size(0) == shape_.q_heads && q.size(1) == shape_.head_dim &&
                  out.size(0) == shape_.q_heads && out.size(1) == shape_.head_dim,
              "attend(layer ", layer, "): q and out must be [", shape_.q_heads, ", ",
              shape_.head_dim, "]");
    for (int s = 0; s < data.storage_heads; ++s)
      KVC_CHECK(data.store.size(s) > 0, "attend(layer ", layer, "): storage head ", s, " is empty");
    const auto ctx = context(data);
    data.store.attend(ctx, grouped(q, ctx), grouped(out, ctx), workspace_);
  }

  // Hands this step's query to decode-time policies that score by attention (H2O's decode
  // variant): the dense kernel's score side output, each probability rounded to f16 and summed
  // over the group on the device, read back for the policy.
  void observe(int layer, HostView<const float, 2> q) {  // [Hq, D]
    LayerData& data = ready_layer(layer, "observe");
    check_query("observe", layer, q);
    if (!eviction_.observes_attention()) return;
    if constexpr (std::is_same_v<Quant, NoQuant>) {
      stage_query(q);
      const auto ctx = context(data);
      const DeviceView<const Storage, 2> q_dev =
          make_device_view(device_ptr<const Storage>(query_), {shape_.q_heads, shape_.head_dim});
      const DeviceView<Storage, 2> out_dev =
          make_device_view(device_ptr<Storage>(output_), {shape_.q_heads, shape_.head_dim});
      data.observed = data.store.attend_with_scores(ctx, grouped(q_dev, ctx), grouped(out_dev, ctx),
                                                    workspace_, scores_);
      data.has_observation = true;
    }
  }

  // The decode-time part of the pipeline, after the step's forward: eviction (keep sets decided
  // on the host, rows gathered on the device), then the quantizer's flushes.
  void step(int layer) {
    LayerData& data = ready_layer(layer, "step");
    std::vector<int> sizes(data.storage_heads);
    for (int s = 0; s < data.storage_heads; ++s) sizes[s] = data.store.size(s);
    DecodeInput in;
    in.layer = layer;
    in.num_layers = shape_.layers;
    in.head_sizes = sizes;
    in.group_scores = data.has_observation ? &data.observed : nullptr;
    const DecodeKeep keep = eviction_.decode(eviction_state_, in);
    data.observed.clear();
    data.has_observation = false;
    if (keep) {
      KVC_CHECK(keep->size() == static_cast<std::size_t>(data.storage_heads),
                policy_name(eviction_), " returned ", keep->size(), " keep sets for ",
                data.storage_heads, " storage heads");
      for (int s = 0; s < data.storage_heads; ++s) check_keep((*keep)[s], sizes[s], layer, s);
      if constexpr (requires { data.store.gather(context(data), *keep); }) {
        data.store.gather(context(data), *keep);
      } else {
        KVC_FAIL(policy_name(quant_), ": tokens cannot be evicted from this store");
      }
      for (int s = 0; s < data.storage_heads; ++s) {
        std::vector<std::int32_t> kept;
        for (const std::int32_t i : (*keep)[s]) kept.push_back(data.positions[s][i]);
        data.positions[s].swap(kept);
      }
    }
    data.store.after_step(quant_, context(data));
  }

  // Dense (dequantized) contents of every storage head of a layer, copied to the host
  // (synchronizes).
  std::vector<HeadContents> materialize(int layer) const {
    const LayerData& data = ready_layer(layer, "materialize");
    std::vector<std::vector<float>> keys, values;
    data.store.contents(context(data), keys, values);
    std::vector<HeadContents> heads(data.storage_heads);
    for (int s = 0; s < data.storage_heads; ++s) {
      heads[s].source_head = data.source_head[s];
      heads[s].positions = data.positions[s];
      heads[s].keys = std::move(keys[s]);
      heads[s].values = std::move(values[s]);
    }
    return heads;
  }

  int storage_heads(int layer) const { return layer_data(layer).storage_heads; }
  int tokens(int layer, int storage_head) const {
    return static_cast<int>(layer_data(layer).positions.at(storage_head).size());
  }
  std::span<const std::int32_t> positions(int layer, int storage_head) const {
    return layer_data(layer).positions.at(storage_head);
  }

  // Exact bytes held, counted as the CPU stores count them: payload (codes, f16 rows, residuals,
  // windows), quantization parameters, int32 positions as index bytes.
  StorageBytes bytes(int layer) const {
    const LayerData& data = layer_data(layer);
    StorageBytes total;
    if (!data.compressed) return total;
    const auto ctx = context(data);
    for (int s = 0; s < data.storage_heads; ++s) {
      StorageBytes head = data.store.bytes(ctx, s, data.source_head[s]);
      head.index = static_cast<std::int64_t>(data.positions[s].size() * sizeof(std::int32_t));
      total += head;
    }
    return total;
  }
  StorageBytes bytes() const {
    StorageBytes total;
    for (int l = 0; l < shape_.layers; ++l) total += bytes(l);
    return total;
  }

 private:
  static constexpr std::int64_t kMinCapacity = 16;

  struct LayerData {
    // Host staging of the prompt, as the CPU cache stages it.
    std::vector<float> staged_keys;              // [Hkv, T, D]
    std::vector<float> staged_values;            // [Hkv, T, D]
    std::vector<float> staged_queries;           // [Hq, Tq, D]
    std::vector<std::int32_t> staged_positions;  // [T]
    std::int64_t staged_tokens = 0;
    std::int64_t staged_query_count = 0;
    std::int32_t next_position = 0;
    bool compressed = false;
    // Storage.
    int storage_heads = 0;
    std::vector<int> source_head;                      // [S]
    std::vector<std::vector<std::int32_t>> positions;  // [S][n_s] original positions (host)
    cuda_cache::Store<Quant> store;                    // the device rows or codes
    std::vector<std::vector<float>> observed;          // [S][n_s] this step's H2O scores
    bool has_observation = false;
  };

  bool repeat_mode() const {
    if constexpr (std::is_same_v<Eviction, SnapKv>)
      return eviction_.gqa == GqaMode::repeat;
    else
      return false;
  }

  cuda_cache::StoreContext context(const LayerData& data) const {
    return {stream_, data.storage_heads, shape_.head_dim,
            data.storage_heads > 0 ? shape_.q_heads / data.storage_heads : 1, options_.attention};
  }
  // [Hq, D] as [S, g, D]: the query heads of storage head s are rows s*g .. s*g + g - 1.
  template <class T>
  static DeviceView<T, 3> grouped(DeviceView<T, 2> x, const cuda_cache::StoreContext& ctx) {
    const std::int64_t g = ctx.group;
    return DeviceView<T, 3>{
        x.data, {ctx.heads, g, x.size(1)}, {g * x.strides[0], x.strides[0], x.strides[1]}};
  }

  template <class T>
  static T* device_ptr(const cuda_runtime::DeviceBuffer& buffer) {
    return static_cast<T*>(buffer.data());
  }

  template <class Arg>
  void assign(const Arg& arg) {
    if constexpr (std::is_same_v<Arg, Eviction>)
      eviction_ = arg;
    else if constexpr (std::is_same_v<Arg, Quant>)
      quant_ = arg;
    else if constexpr (std::is_same_v<Arg, CacheOptions>)
      options_ = arg;
    else if constexpr (std::is_same_v<Arg, Cuda>)
      stream_ = arg;
    else
      static_assert(sizeof(Arg) == 0, "KVCache<cuda>: argument matches no slot of the Config");
  }

  LayerData& layer_data(int layer) {
    check_layer_index(layer, shape_.layers);
    return layers_[layer];
  }
  const LayerData& layer_data(int layer) const {
    check_layer_index(layer, shape_.layers);
    return layers_[layer];
  }
  LayerData& ready_layer(int layer, const char* what) {
    return ready_decode_layer(layers_, layer, what, [this](int l) { compress(l); });
  }
  const LayerData& ready_layer(int layer, const char* what) const {
    return ready_decode_layer(layers_, layer, what);
  }

  template <class T>
  void check_heads(const char* what, HostView<const T, 3> x, int heads) const {
    check_head_shape(what, x, heads, shape_.head_dim);
  }
  void check_query(const char* what, int layer, HostView<const float, 2> q) const {
    KVC_CHECK(q.size(0) == shape_.q_heads && q.size(1) == shape_.head_dim, what, "(layer ", layer,
              "): q must be [", shape_.q_heads, ", ", shape_.head_dim, "], got [", q.size(0), ", ",
              q.size(1), "]");
  }
  // Keep indices ascending in [0, n): what the compaction kernels cannot check.
  void check_keep(std::span<const std::int32_t> keep, std::int64_t n, int layer, int s) const {
    std::int64_t previous = -1;
    for (const std::int32_t index : keep) {
      KVC_CHECK(index > previous && index < n, policy_name(eviction_), " (layer ", layer, ", head ",
                s, "): kept indices must be ascending in [0, ", n, "), got ", index);
      previous = index;
    }
  }
  // The quantized stores reject NaN/Inf rows, as the CPU stores do (the device kernels would
  // encode them silently).
  void check_finite(int layer, int kv_head, std::int32_t position, const char* what,
                    const float* row, std::int64_t stride) const {
    if constexpr (!std::is_same_v<Quant, NoQuant>) {
      for (int c = 0; c < shape_.head_dim; ++c)
        KVC_CHECK(std::isfinite(row[c * stride]), policy_name(quant_), ": ", what, " (layer ",
                  layer, ", KV head ", kv_head, ", position ", position, ", channel ", c, ") is ",
                  row[c * stride], "; quantized stores take finite values only");
    }
  }

  // A device copy of floats rounded to f16 (at least 16 bytes, so that empty inputs still give a
  // valid pointer).
  cuda_runtime::DeviceBuffer upload_f16(const std::vector<float>& x) const {
    std::vector<Storage> rounded(x.size());
    for (std::size_t i = 0; i < x.size(); ++i) rounded[i] = Storage(x[i]);
    cuda_runtime::DeviceBuffer buffer(std::max<std::size_t>(rounded.size() * sizeof(Storage), 16));
    cuda_runtime::copy_host_to_device(buffer.data(), rounded.data(),
                                      rounded.size() * sizeof(Storage), stream_);
    return buffer;
  }
  void stage_query(HostView<const float, 2> q) const {
    const std::int64_t hq = shape_.q_heads, d = shape_.head_dim;
    std::vector<Storage> host(static_cast<std::size_t>(hq * d));
    for (std::int64_t h = 0; h < hq; ++h)
      for (std::int64_t c = 0; c < d; ++c) host[h * d + c] = Storage(q(h, c));
    ensure(query_, host.size() * sizeof(Storage));
    ensure(output_, host.size() * sizeof(Storage));
    cuda_runtime::copy_host_to_device(query_.data(), host.data(), host.size() * sizeof(Storage),
                                      stream_);
  }
  void read_output(HostView<float, 2> out) const {
    const std::int64_t hq = shape_.q_heads, d = shape_.head_dim;
    std::vector<Storage> host(static_cast<std::size_t>(hq * d));
    cuda_runtime::copy_device_to_host(host.data(), output_.data(), host.size() * sizeof(Storage),
                                      stream_);
    cuda_runtime::synchronize(stream_);
    for (std::int64_t h = 0; h < hq; ++h)
      for (std::int64_t c = 0; c < d; ++c) out(h, c) = static_cast<float>(host[h * d + c]);
  }

  // A grow-only scratch buffer (attention workspace, query and output staging).
  static void ensure(cuda_runtime::DeviceBuffer& buffer, std::size_t bytes) {
    if (buffer.bytes() < bytes) buffer = cuda_runtime::DeviceBuffer(bytes);
  }

  CacheShape shape_;
  CacheOptions options_{};
  Eviction eviction_{};
  Quant quant_{};
  typename Eviction::State eviction_state_{};
  Cuda stream_{};
  std::vector<LayerData> layers_;
  mutable cuda_runtime::DeviceBuffer workspace_;  // attention partials
  mutable cuda_runtime::DeviceBuffer query_;      // [Hq, D] f16
  mutable cuda_runtime::DeviceBuffer output_;     // [Hq, D] f16
  cuda_runtime::DeviceBuffer token_rows_;         // append(): [2, S, D] f16
  cuda_runtime::DeviceBuffer scores_;             // observe(): [S, capacity] fp32
};

}  // namespace kvc
