// kvc/cache/kv_cache_cuda.hpp: KVCache<Config, kvc::Cuda>, the cache of kv_cache.hpp with its
// storage on the GPU: per (layer, storage head) f16 K/V rows and int32 original positions.
//
//   struct Config : kvc::DefaultConfig { using Eviction = kvc::SnapKv; };
//   kvc::KVCache<Config, kvc::Cuda> cache{kvc::CacheShape{8, 8, 2, 64}, kvc::SnapKv{.budget =
//   256}}; cache.prefill(layer, k, v, q); cache.compress(layer);      // selection + compaction on
//   the GPU cache.append(layer, k_t, v_t); cache.attend(layer, q_t, out); cache.step(layer);
//
// Same lifecycle and results as KVCache<Config, Cpu> (host float inputs, rounded to f16 on the
// way in as the CPU cache stores them), so bytes() is equal and kept positions are identical.
// Supported for now: Eviction = NoEviction, StreamingLlm or SnapKv (gqa mean or repeat; not
// reference_compat), Quant = NoQuant, no Merge / KeyProjection / LayerSharing, absolute positions;
// head_dim 64 or 128 and 1, 2, 4 or 8 query heads per storage head (the CUDA ops' limits). Other
// configurations fail to compile (static_assert naming the stages) or throw kvc::Error.
// The host code calls only public CUDA ops (kvc/ops/attention.hpp, selection.hpp) and the
// kvc::cuda_runtime helpers; link kvc::cuda. Layout per layer: keys/values [S, capacity, D] f16,
// positions [S, capacity] int32, lengths [S] int32 on the device; storage head s holds counts[s]
// rows. attend() is one batched decode_attention call per layer (one batch entry per storage
// head, so ragged per-head counts need nothing special). Decode-time eviction (StreamingLLM)
// compacts into a fresh buffer with compact_rows.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <iterator>
#include <string>
#include <type_traits>
#include <vector>

#include "kvc/cache/kv_cache.hpp"
#include "kvc/cache/staging.hpp"
#include "kvc/core/backend.hpp"
#include "kvc/core/cuda_runtime.hpp"
#include "kvc/core/dtype.hpp"
#include "kvc/core/error.hpp"
#include "kvc/core/view.hpp"
#include "kvc/ops/attention.hpp"
#include "kvc/ops/selection.hpp"
#include "kvc/policies/eviction/snapkv.hpp"
#include "kvc/policies/eviction/streaming_llm.hpp"

namespace kvc {

namespace cuda_cache_detail {

template <class E>
inline constexpr bool kSupportedEviction =
    std::is_same_v<E, NoEviction> || std::is_same_v<E, StreamingLlm> || std::is_same_v<E, SnapKv>;

}  // namespace cuda_cache_detail

template <class Config>
class KVCache<Config, Cuda> {
 public:
  using Eviction = typename Config::Eviction;
  using Merge = typename Config::Merge;
  using Quant = typename Config::Quant;
  using KeyProjection = typename Config::KeyProjection;
  using LayerSharing = typename Config::LayerSharing;
  using Storage = f16;  // what the CPU cache stores too, so bytes() and the stored values agree
  static_assert(cuda_cache_detail::kSupportedEviction<Eviction>,
                "KVCache<Config, kvc::Cuda>: Config::Eviction must be NoEviction, StreamingLlm or "
                "SnapKv for now (other evictions have no CUDA cache path yet)");
  static_assert(
      std::is_same_v<Quant, NoQuant>,
      "KVCache<Config, kvc::Cuda>: Config::Quant must be NoQuant for now: the CUDA cache "
      "does not yet combine Eviction (NoEviction, StreamingLlm, SnapKv) with a quantizer");
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

  // Selects the kept prompt tokens (SnapKV on the GPU: window scores, pooling, top-k; others by
  // their host rule, which reads only the token count) and compacts them into the layer's storage.
  void compress(int layer) {
    LayerData& data = layer_data(layer);
    KVC_CHECK(!data.compressed, "compress(layer ", layer, "): already compressed");
    const std::int64_t tokens = data.staged_tokens;
    const std::int64_t d = shape_.head_dim, hkv = shape_.kv_heads, hq = shape_.q_heads;
    namespace rt = cuda_runtime;

    // Staged K/V (and positions, per source head) on the device.
    rt::DeviceBuffer k_dev = upload_f16(data.staged_keys);
    rt::DeviceBuffer v_dev = upload_f16(data.staged_values);
    std::vector<std::int32_t> staged_positions;  // [Hkv, T]
    for (std::int64_t h = 0; h < hkv; ++h)
      staged_positions.insert(staged_positions.end(), data.staged_positions.begin(),
                              data.staged_positions.end());
    rt::DeviceBuffer positions_dev = upload(staged_positions);

    int storage_heads = 0;
    std::int64_t kmax = 0;
    std::vector<int> counts;
    rt::DeviceBuffer keep_dev, counts_dev, select_workspace, q_window_dev;
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
        data.source_head.resize(storage_heads);
        for (int s = 0; s < storage_heads; ++s)
          data.source_head[s] = static_cast<int>(s * hkv / storage_heads);
      }
    } else {
      // The policy's own rule on the host (it reads only the shapes for these policies).
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
      }
      std::vector<std::int32_t> keep(static_cast<std::size_t>(storage_heads * kmax), 0);
      for (int s = 0; s < storage_heads; ++s) {
        counts.push_back(static_cast<int>(selection.keep[s].size()));
        std::int64_t previous = -1;
        for (std::size_t i = 0; i < selection.keep[s].size(); ++i) {
          const std::int32_t index = selection.keep[s][i];
          KVC_CHECK(index > previous && index < tokens, policy_name(eviction_), " (layer ", layer,
                    ", head ", s, "): kept indices must be ascending in [0, ", tokens, "), got ",
                    index);
          previous = index;
          keep[s * kmax + static_cast<std::int64_t>(i)] = index;
        }
      }
      keep_dev = upload(keep);
      counts_dev = upload(counts);
      data.source_head = selection.source_head;
    }

    data.storage_heads = storage_heads;
    data.counts = counts;
    allocate_storage(data, std::max<std::int64_t>(kmax, kMinCapacity));
    if (kmax > 0 && tokens > 0) {
      const std::int64_t cap = data.capacity;
      ops::CompactSide side;
      side.positions =
          make_device_view(device_ptr<const std::int32_t>(positions_dev), {hkv, tokens});
      side.positions_out = DeviceView<std::int32_t, 2>{
          device_ptr<std::int32_t>(data.positions), {std::int64_t{storage_heads}, kmax}, {cap, 1}};
      ops::compact_rows(stream_,
                        make_device_view(device_ptr<const std::int32_t>(keep_dev),
                                         {std::int64_t{storage_heads}, kmax}),
                        counts_view(counts_dev, device_selection ? 0 : storage_heads),
                        make_device_view(device_ptr<const Storage>(k_dev), {hkv, tokens, d}),
                        make_device_view(device_ptr<const Storage>(v_dev), {hkv, tokens, d}),
                        rows_view(data.keys, storage_heads, kmax, cap),
                        rows_view(data.values, storage_heads, kmax, cap), side);
    }
    upload_lengths(data);
    // The staging buffers above die at the end of this scope: let the stream finish with them.
    cuda_runtime::synchronize(stream_);
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
    const int d = shape_.head_dim;
    for (int s = 0; s < data.storage_heads; ++s)
      if (data.counts[s] == data.capacity) grow(data);
    // Pageable host memory: each copy returns once its source is staged, so the rows may be reused.
    std::vector<Storage> key(d), value(d);
    for (int s = 0; s < data.storage_heads; ++s) {
      for (int c = 0; c < d; ++c) {
        key[c] = Storage(k(data.source_head[s], c));
        value[c] = Storage(v(data.source_head[s], c));
      }
      const std::size_t row = static_cast<std::size_t>(s) * data.capacity + data.counts[s];
      cuda_runtime::copy_host_to_device(device_ptr<Storage>(data.keys) + row * d, key.data(),
                                        d * sizeof(Storage), stream_);
      cuda_runtime::copy_host_to_device(device_ptr<Storage>(data.values) + row * d, value.data(),
                                        d * sizeof(Storage), stream_);
      cuda_runtime::copy_host_to_device(device_ptr<std::int32_t>(data.positions) + row, &position,
                                        sizeof(std::int32_t), stream_);
      ++data.counts[s];
    }
    upload_lengths(data);
  }

  // Attention of one query per head over the stored tokens; host in and out (q rounded to f16,
  // the output is the kernel's f16 result widened).
  void attend(int layer, HostView<const float, 2> q,  // [Hq, D]
              HostView<float, 2> out) const {         // [Hq, D]
    KVC_CHECK(q.size(0) == shape_.q_heads && q.size(1) == shape_.head_dim &&
                  out.size(0) == shape_.q_heads && out.size(1) == shape_.head_dim,
              "attend(layer ", layer, "): q and out must be [", shape_.q_heads, ", ",
              shape_.head_dim, "]");
    const std::int64_t hq = shape_.q_heads, d = shape_.head_dim;
    std::vector<Storage> host(static_cast<std::size_t>(hq * d));
    for (std::int64_t h = 0; h < hq; ++h)
      for (std::int64_t c = 0; c < d; ++c) host[h * d + c] = Storage(q(h, c));
    ensure(query_, host.size() * sizeof(Storage));
    ensure(output_, host.size() * sizeof(Storage));
    cuda_runtime::copy_host_to_device(query_.data(), host.data(), host.size() * sizeof(Storage),
                                      stream_);
    attend(layer, make_device_view(device_ptr<const Storage>(query_), {hq, d}),
           make_device_view(device_ptr<Storage>(output_), {hq, d}));
    cuda_runtime::copy_device_to_host(host.data(), output_.data(), host.size() * sizeof(Storage),
                                      stream_);
    cuda_runtime::synchronize(stream_);
    for (std::int64_t h = 0; h < hq; ++h)
      for (std::int64_t c = 0; c < d; ++c) out(h, c) = static_cast<float>(host[h * d + c]);
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
    const std::int64_t s_heads = data.storage_heads, d = shape_.head_dim, cap = data.capacity;
    const std::int64_t group = shape_.q_heads / s_heads;
    for (int s = 0; s < data.storage_heads; ++s)
      KVC_CHECK(data.counts[s] > 0, "attend(layer ", layer, "): storage head ", s, " is empty");
    const std::size_t floats =
        ops::decode_attention_workspace_floats(static_cast<int>(s_heads), static_cast<int>(group),
                                               1, static_cast<int>(d), static_cast<int>(cap));
    ensure(workspace_, std::max<std::size_t>(floats, 1) * sizeof(float));
    const DeviceView<const Storage, 3> q3{
        q.data, {s_heads, group, d}, {group * q.strides[0], q.strides[0], 1}};
    const DeviceView<Storage, 3> out3{
        out.data, {s_heads, group, d}, {group * out.strides[0], out.strides[0], 1}};
    const DeviceView<const Storage, 4> k4{
        device_ptr<const Storage>(data.keys), {s_heads, 1, cap, d}, {cap * d, cap * d, d, 1}};
    const DeviceView<const Storage, 4> v4{
        device_ptr<const Storage>(data.values), {s_heads, 1, cap, d}, {cap * d, cap * d, d, 1}};
    ops::decode_attention(
        stream_, q3, k4, v4,
        make_device_view(device_ptr<const std::int32_t>(data.lengths), {s_heads}), out3,
        make_device_view(device_ptr<float>(workspace_),
                         {static_cast<std::int64_t>(workspace_.bytes() / sizeof(float))}),
        options_.attention);
  }

  // Hands this step's query to decode-time policies that score by attention: none of the
  // supported evictions does, so this only checks the layer.
  void observe(int layer, HostView<const float, 2> q) {  // [Hq, D]
    ready_layer(layer, "observe");
    KVC_CHECK(q.size(0) == shape_.q_heads && q.size(1) == shape_.head_dim, "observe(layer ", layer,
              "): q must be [", shape_.q_heads, ", ", shape_.head_dim, "]");
  }

  // The decode-time part: the eviction's keep sets (decided on the host from the counts),
  // compacted on the device into a fresh buffer.
  void step(int layer) {
    LayerData& data = ready_layer(layer, "step");
    DecodeInput in;
    in.layer = layer;
    in.num_layers = shape_.layers;
    in.head_sizes = data.counts;
    const DecodeKeep keep = eviction_.decode(eviction_state_, in);
    if (!keep) return;
    KVC_CHECK(keep->size() == static_cast<std::size_t>(data.storage_heads), policy_name(eviction_),
              " returned ", keep->size(), " keep sets for ", data.storage_heads, " storage heads");
    std::int64_t kmax = 0;
    for (const auto& row : *keep) kmax = std::max<std::int64_t>(kmax, std::ssize(row));
    const std::int64_t s_heads = data.storage_heads, d = shape_.head_dim, cap = data.capacity;
    std::vector<std::int32_t> table(static_cast<std::size_t>(s_heads * kmax), 0);
    std::vector<int> counts(s_heads);
    for (int s = 0; s < s_heads; ++s) {
      counts[s] = static_cast<int>((*keep)[s].size());
      std::int64_t previous = -1;
      for (std::size_t i = 0; i < (*keep)[s].size(); ++i) {
        const std::int32_t index = (*keep)[s][i];
        KVC_CHECK(index > previous && index < data.counts[s], policy_name(eviction_), " (layer ",
                  layer, ", head ", s, "): kept indices must be ascending in [0, ", data.counts[s],
                  "), got ", index);
        previous = index;
        table[s * kmax + static_cast<std::int64_t>(i)] = index;
      }
    }
    namespace rt = cuda_runtime;
    rt::DeviceBuffer keep_dev = upload(table), counts_dev = upload(counts);
    LayerData next;
    next.storage_heads = data.storage_heads;
    allocate_storage(next, cap);
    if (kmax > 0) {
      ops::CompactSide side;
      side.positions =
          make_device_view(device_ptr<const std::int32_t>(data.positions), {s_heads, cap});
      side.positions_out = DeviceView<std::int32_t, 2>{
          device_ptr<std::int32_t>(next.positions), {s_heads, kmax}, {cap, 1}};
      ops::compact_rows(stream_,
                        make_device_view(device_ptr<const std::int32_t>(keep_dev), {s_heads, kmax}),
                        counts_view(counts_dev, s_heads),
                        make_device_view(device_ptr<const Storage>(data.keys), {s_heads, cap, d}),
                        make_device_view(device_ptr<const Storage>(data.values), {s_heads, cap, d}),
                        rows_view(next.keys, s_heads, kmax, cap),
                        rows_view(next.values, s_heads, kmax, cap), side);
    }
    cuda_runtime::synchronize(stream_);  // the old buffers and the tables are freed below
    data.keys = std::move(next.keys);
    data.values = std::move(next.values);
    data.positions = std::move(next.positions);
    data.counts = counts;
    upload_lengths(data);
    cuda_runtime::synchronize(stream_);
  }

  // Dense contents of every storage head of a layer, copied to the host (synchronizes).
  std::vector<HeadContents> materialize(int layer) const {
    const LayerData& data = ready_layer(layer, "materialize");
    const std::int64_t d = shape_.head_dim, cap = data.capacity;
    const std::size_t rows = static_cast<std::size_t>(data.storage_heads * cap);
    std::vector<Storage> keys(rows * d), values(rows * d);
    std::vector<std::int32_t> positions(rows);
    cuda_runtime::copy_device_to_host(keys.data(), data.keys.data(), keys.size() * sizeof(Storage),
                                      stream_);
    cuda_runtime::copy_device_to_host(values.data(), data.values.data(),
                                      values.size() * sizeof(Storage), stream_);
    cuda_runtime::copy_device_to_host(positions.data(), data.positions.data(),
                                      positions.size() * sizeof(std::int32_t), stream_);
    cuda_runtime::synchronize(stream_);
    std::vector<HeadContents> heads(data.storage_heads);
    for (int s = 0; s < data.storage_heads; ++s) {
      const std::int64_t n = data.counts[s];
      heads[s].source_head = data.source_head[s];
      heads[s].positions.assign(positions.begin() + s * cap, positions.begin() + s * cap + n);
      for (std::int64_t i = 0; i < n * d; ++i) {
        heads[s].keys.push_back(static_cast<float>(keys[s * cap * d + i]));
        heads[s].values.push_back(static_cast<float>(values[s * cap * d + i]));
      }
    }
    return heads;
  }

  int storage_heads(int layer) const { return layer_data(layer).storage_heads; }
  int tokens(int layer, int storage_head) const {
    return layer_data(layer).counts.at(storage_head);
  }

  // Exact bytes held: f16 K and V rows as payload, int32 positions as index bytes (the CPU
  // NoQuant store's count).
  StorageBytes bytes(int layer) const {
    StorageBytes total;
    for (int n : layer_data(layer).counts) {
      total.payload += 2 * static_cast<std::int64_t>(n) * shape_.head_dim * sizeof(Storage);
      total.index += static_cast<std::int64_t>(n) * sizeof(std::int32_t);
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
    // Device storage.
    int storage_heads = 0;
    std::vector<int> source_head;          // [S]
    std::vector<int> counts;               // [S] host copy of the lengths
    std::int64_t capacity = 0;             // rows per storage head
    cuda_runtime::DeviceBuffer keys;       // [S, capacity, D] f16
    cuda_runtime::DeviceBuffer values;     // [S, capacity, D] f16
    cuda_runtime::DeviceBuffer positions;  // [S, capacity] int32
    cuda_runtime::DeviceBuffer lengths;    // [S] int32
  };

  bool repeat_mode() const {
    if constexpr (std::is_same_v<Eviction, SnapKv>)
      return eviction_.gqa == GqaMode::repeat;
    else
      return false;
  }

  // The typed pointer of a device buffer (DeviceBuffer::as, callable without `template` here).
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
    LayerData& data = layer_data(layer);
    if (!data.compressed) {
      KVC_CHECK(
          data.staged_tokens == 0, what, "(layer ", layer,
          "): the layer has prefilled tokens that were not compressed; call compress() first");
      compress(layer);
    }
    return data;
  }
  const LayerData& ready_layer(int layer, const char* what) const {
    const LayerData& data = layer_data(layer);
    KVC_CHECK(data.compressed, what, "(layer ", layer,
              "): the layer holds no compressed tokens yet");
    return data;
  }

  template <class T>
  void check_heads(const char* what, HostView<const T, 3> x, int heads) const {
    check_head_shape(what, x, heads, shape_.head_dim);
  }

  // A device copy (at least one byte, so that empty inputs still give a valid pointer).
  template <class T>
  cuda_runtime::DeviceBuffer upload(const std::vector<T>& x) const {
    cuda_runtime::DeviceBuffer buffer(std::max<std::size_t>(x.size() * sizeof(T), 16));
    cuda_runtime::copy_host_to_device(buffer.data(), x.data(), x.size() * sizeof(T), stream_);
    return buffer;
  }
  cuda_runtime::DeviceBuffer upload_f16(const std::vector<float>& x) const {
    std::vector<Storage> rounded(x.size());
    for (std::size_t i = 0; i < x.size(); ++i) rounded[i] = Storage(x[i]);
    return upload(rounded);
  }
  static DeviceView<const std::int32_t, 1> counts_view(const cuda_runtime::DeviceBuffer& buffer,
                                                       std::int64_t heads) {
    if (heads == 0) return {};  // every head keeps Kmax rows
    return make_device_view(device_ptr<const std::int32_t>(buffer), {heads});
  }
  // The first `rows` rows of each head of a [S, capacity, D] buffer, as compact_rows' output.
  DeviceView<Storage, 3> rows_view(const cuda_runtime::DeviceBuffer& buffer, std::int64_t heads,
                                   std::int64_t rows, std::int64_t capacity) const {
    const std::int64_t d = shape_.head_dim;
    return DeviceView<Storage, 3>{
        device_ptr<Storage>(buffer), {heads, rows, d}, {capacity * d, d, 1}};
  }

  void allocate_storage(LayerData& data, std::int64_t capacity) const {
    const std::size_t rows = static_cast<std::size_t>(data.storage_heads) * capacity;
    data.capacity = capacity;
    data.keys = cuda_runtime::DeviceBuffer(std::max<std::size_t>(rows * shape_.head_dim, 8) *
                                           sizeof(Storage));
    data.values = cuda_runtime::DeviceBuffer(std::max<std::size_t>(rows * shape_.head_dim, 8) *
                                             sizeof(Storage));
    data.positions =
        cuda_runtime::DeviceBuffer(std::max<std::size_t>(rows, 4) * sizeof(std::int32_t));
    // Rows past a head's count are never read (lengths bound the attention); zero them so that
    // a materialized buffer holds no stale device memory.
    cuda_runtime::fill_bytes(data.keys.data(), 0, data.keys.bytes(), stream_);
    cuda_runtime::fill_bytes(data.values.data(), 0, data.values.bytes(), stream_);
    cuda_runtime::fill_bytes(data.positions.data(), 0, data.positions.bytes(), stream_);
  }

  // Doubles a layer's capacity, copying each head's rows.
  void grow(LayerData& data) const {
    LayerData bigger;
    bigger.storage_heads = data.storage_heads;
    allocate_storage(bigger, data.capacity * 2);
    const std::size_t d = shape_.head_dim;
    for (int s = 0; s < data.storage_heads; ++s) {
      const std::size_t n = data.counts[s];
      const std::size_t from = static_cast<std::size_t>(s) * data.capacity;
      const std::size_t to = static_cast<std::size_t>(s) * bigger.capacity;
      cuda_runtime::copy_device_to_device(device_ptr<Storage>(bigger.keys) + to * d,
                                          device_ptr<const Storage>(data.keys) + from * d,
                                          n * d * sizeof(Storage), stream_);
      cuda_runtime::copy_device_to_device(device_ptr<Storage>(bigger.values) + to * d,
                                          device_ptr<const Storage>(data.values) + from * d,
                                          n * d * sizeof(Storage), stream_);
      cuda_runtime::copy_device_to_device(device_ptr<std::int32_t>(bigger.positions) + to,
                                          device_ptr<const std::int32_t>(data.positions) + from,
                                          n * sizeof(std::int32_t), stream_);
    }
    cuda_runtime::synchronize(stream_);  // the old buffers are freed below
    data.keys = std::move(bigger.keys);
    data.values = std::move(bigger.values);
    data.positions = std::move(bigger.positions);
    data.capacity = bigger.capacity;
  }

  void upload_lengths(LayerData& data) const {
    if (data.lengths.bytes() < data.counts.size() * sizeof(std::int32_t) || !data.lengths.data())
      data.lengths = cuda_runtime::DeviceBuffer(std::max<std::size_t>(data.counts.size(), 4) *
                                                sizeof(std::int32_t));
    std::vector<std::int32_t> lengths(data.counts.begin(), data.counts.end());
    cuda_runtime::copy_host_to_device(data.lengths.data(), lengths.data(),
                                      lengths.size() * sizeof(std::int32_t), stream_);
  }

  // A grow-only scratch buffer (attention workspace, query and output staging).
  static void ensure(cuda_runtime::DeviceBuffer& buffer, std::size_t bytes) {
    if (buffer.bytes() < bytes) {
      buffer = cuda_runtime::DeviceBuffer(bytes);
    }
  }

  CacheShape shape_;
  CacheOptions options_{};
  Eviction eviction_{};
  Quant quant_{};
  typename Eviction::State eviction_state_{};
  Cuda stream_{};
  std::vector<LayerData> layers_;
  mutable cuda_runtime::DeviceBuffer workspace_;  // attend(): decode attention partials
  mutable cuda_runtime::DeviceBuffer query_;      // attend() on host views: [Hq, D] f16
  mutable cuda_runtime::DeviceBuffer output_;     // [Hq, D] f16
};

}  // namespace kvc
