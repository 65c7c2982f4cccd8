// kvc/cache/cuda_stores.hpp: the per-layer device stores behind KVCache<Config, kvc::Cuda>: f16
// rows (NoQuant), KIVI, per-token INT8/INT4 and FP8, each holding all storage heads of one layer
// in exactly the layouts of docs/formats.md (the quantized ones as kvc/ops/quantized_attention.hpp
// reads them), filled by the CUDA quantize ops and read by the fused decode attention.
//
//   kvc::cuda_cache::Store<kvc::Kivi> store;                    // one layer, S storage heads
//   store.load(kivi, ctx, prompt_keys, prompt_values, counts);  // quantize the kept prompt rows
//   store.append(kivi, ctx, k_rows, v_rows);  store.attend(ctx, q, out);  store.after_step(kivi,
//   ctx);
//
// Every store keeps, per storage head, host copies of its row counts (the cache decides flushes
// and evictions from them, as the CPU stores do) and device copies for the kernels; the kernels
// that advance a count on the device (append_rows, the flushes) are mirrored on the host by the
// same rule. Bytes are counted exactly as the CPU stores count them, so both caches report equal
// bytes for equal contents. Internal to kv_cache_cuda.hpp; link kvc::cuda.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

#include "kvc/core/backend.hpp"
#include "kvc/core/cuda_runtime.hpp"
#include "kvc/core/dtype.hpp"
#include "kvc/core/error.hpp"
#include "kvc/core/view.hpp"
#include "kvc/ops/attention.hpp"
#include "kvc/ops/quantize.hpp"
#include "kvc/ops/quantize_cuda.hpp"
#include "kvc/ops/quantized_attention.hpp"
#include "kvc/ops/selection.hpp"
#include "kvc/policies/concepts.hpp"
#include "kvc/policies/quant/dense.hpp"
#include "kvc/policies/quant/fp8.hpp"
#include "kvc/policies/quant/int_per_token.hpp"
#include "kvc/policies/quant/kivi.hpp"

namespace kvc::cuda_cache {

namespace rt = cuda_runtime;

template <class T>
T* device_ptr(const rt::DeviceBuffer& buffer) {
  return static_cast<T*>(buffer.data());
}

// What every store call needs from the cache.
struct StoreContext {
  Cuda stream{};
  int heads = 0;     // S storage heads
  int head_dim = 0;  // D
  int group = 1;     // query heads per storage head
  ops::AttentionOptions attention{};
};

// One int32 counter per storage head: the host copy decides, the device copy feeds the kernels
// ([S, 1] views: batch entry s = storage head s, one KV head each).
class HeadCounts {
 public:
  void assign(Cuda stream, std::vector<int> values) {
    host_ = std::move(values);
    if (device_.bytes() < std::max<std::size_t>(host_.size(), 4) * sizeof(std::int32_t))
      device_ = rt::DeviceBuffer(std::max<std::size_t>(host_.size(), 4) * sizeof(std::int32_t));
    upload(stream);
  }
  void upload(Cuda stream) const {
    static_assert(sizeof(int) == sizeof(std::int32_t));
    rt::copy_host_to_device(device_.data(), host_.data(), host_.size() * sizeof(std::int32_t),
                            stream);
  }
  int operator[](std::size_t s) const { return host_[s]; }
  int& operator[](std::size_t s) { return host_[s]; }
  const std::vector<int>& host() const { return host_; }
  std::int32_t* device() const { return device_ptr<std::int32_t>(device_); }
  DeviceView<std::int32_t, 2> view() const {  // [S, 1]
    const auto s = static_cast<std::int64_t>(host_.size());
    return DeviceView<std::int32_t, 2>{device(), {s, 1}, {1, 1}};
  }
  DeviceView<const std::int32_t, 2> const_view() const { return view(); }
  int max() const { return host_.empty() ? 0 : *std::max_element(host_.begin(), host_.end()); }

 private:
  std::vector<int> host_;
  rt::DeviceBuffer device_;
};

// A [S, capacity, row_bytes] table of rows on the device (one slab per storage head), zeroed when
// allocated so that nothing stale is ever copied back.
class RowTable {
 public:
  RowTable() = default;
  RowTable(Cuda stream, int heads, std::int64_t capacity, std::int64_t row_bytes)
      : heads_(heads), capacity_(capacity), row_bytes_(row_bytes) {
    const std::size_t bytes =
        std::max<std::size_t>(static_cast<std::size_t>(heads) * capacity * row_bytes, 16);
    buffer_ = rt::DeviceBuffer(bytes);
    rt::fill_bytes(buffer_.data(), 0, bytes, stream);
  }
  std::int64_t capacity() const { return capacity_; }
  std::int64_t row_bytes() const { return row_bytes_; }
  std::byte* row(int s, std::int64_t i) const {
    return device_ptr<std::byte>(buffer_) + (s * capacity_ + i) * row_bytes_;
  }
  template <class T>
  T* at(int s, std::int64_t i) const {
    return reinterpret_cast<T*>(row(s, i));
  }
  // Elements of T between storage heads.
  template <class T>
  std::int64_t head_stride() const {
    return capacity_ * row_bytes_ / static_cast<std::int64_t>(sizeof(T));
  }
  // [S, 1, capacity, row_bytes / sizeof(T)]: the [B, H, rows, width] views of the CUDA ops.
  template <class T>
  DeviceView<T, 4> rows4() const {
    const std::int64_t width = row_bytes_ / static_cast<std::int64_t>(sizeof(T));
    return DeviceView<T, 4>{at<T>(0, 0),
                            {heads_, 1, capacity_, width},
                            {capacity_ * width, capacity_ * width, width, 1}};
  }
  // Rows [first, first + count) of head s as a [1, 1, count, width] view.
  template <class T>
  DeviceView<T, 4> head_rows(int s, std::int64_t first, std::int64_t count) const {
    const std::int64_t width = row_bytes_ / static_cast<std::int64_t>(sizeof(T));
    return DeviceView<T, 4>{
        at<T>(s, first), {1, 1, count, width}, {capacity_ * width, capacity_ * width, width, 1}};
  }
  DeviceView<std::byte, 3> bytes3() const {
    return DeviceView<std::byte, 3>{
        row(0, 0), {heads_, capacity_, row_bytes_}, {capacity_ * row_bytes_, row_bytes_, 1}};
  }

  // At least `rows` rows per head, keeping rows [0, used[s]) of each head (capacity doubles).
  void reserve(Cuda stream, std::int64_t rows, std::span<const int> used) {
    if (rows <= capacity_) return;
    RowTable bigger(stream, heads_, std::max(rows, 2 * capacity_), row_bytes_);
    for (int s = 0; s < heads_; ++s)
      if (used[s] > 0)
        rt::copy_device_to_device(bigger.row(s, 0), row(s, 0),
                                  static_cast<std::size_t>(used[s]) * row_bytes_, stream);
    rt::synchronize(stream);  // the old buffer is freed below
    *this = std::move(bigger);
  }
  // Row i < counts[s] of the result = row keep[s][i] of this table (decode-time eviction).
  RowTable gathered(Cuda stream, DeviceView<const std::int32_t, 2> keep,
                    DeviceView<const std::int32_t, 1> counts, std::int64_t capacity) const {
    RowTable out(stream, heads_, capacity, row_bytes_);
    const std::int64_t kmax = keep.size(1);
    if (kmax > 0 && row_bytes_ > 0 && capacity > 0)
      ops::gather_rows(
          stream, keep, counts, bytes3(),
          DeviceView<std::byte, 3>{
              out.row(0, 0), {heads_, kmax, row_bytes_}, {capacity * row_bytes_, row_bytes_, 1}});
    return out;
  }
  // Rows [0, rows) of every head, copied to the host ([S, capacity, row_bytes], synchronizes).
  template <class T>
  std::vector<T> download(Cuda stream) const {
    std::vector<T> host(static_cast<std::size_t>(heads_ * capacity_ * row_bytes_) / sizeof(T));
    rt::copy_device_to_host(host.data(), buffer_.data(), host.size() * sizeof(T), stream);
    rt::synchronize(stream);
    return host;
  }

 private:
  int heads_ = 0;
  std::int64_t capacity_ = 0, row_bytes_ = 0;
  rt::DeviceBuffer buffer_;
};

inline rt::DeviceBuffer upload_ints(Cuda stream, const std::vector<std::int32_t>& x) {
  rt::DeviceBuffer buffer(std::max<std::size_t>(x.size() * sizeof(std::int32_t), 16));
  rt::copy_host_to_device(buffer.data(), x.data(), x.size() * sizeof(std::int32_t), stream);
  return buffer;
}
inline DeviceView<const std::int32_t, 1> counts_view(const rt::DeviceBuffer& b,
                                                     std::int64_t heads) {
  return make_device_view(device_ptr<const std::int32_t>(b), {heads});
}

// Host keep sets (ascending indices per storage head) as the device tables gather_rows and
// compact_rows take: [S, Kmax] indices and [S] counts.
struct KeepTable {
  rt::DeviceBuffer indices, counts;
  std::int64_t heads = 0, kmax = 0;
  std::vector<int> sizes;  // kept rows per head
  KeepTable(Cuda stream, const std::vector<std::vector<std::int32_t>>& keep)
      : heads(std::ssize(keep)) {
    for (const auto& k : keep) {
      kmax = std::max<std::int64_t>(kmax, std::ssize(k));
      sizes.push_back(static_cast<int>(k.size()));
    }
    std::vector<std::int32_t> table(
        static_cast<std::size_t>(heads * std::max<std::int64_t>(kmax, 1)), 0);
    for (std::int64_t s = 0; s < heads; ++s)
      std::copy(keep[s].begin(), keep[s].end(), table.begin() + s * kmax);
    indices = upload_ints(stream, table);
    counts = upload_ints(stream, std::vector<std::int32_t>(sizes.begin(), sizes.end()));
  }
  DeviceView<const std::int32_t, 2> indices_view() const {
    return make_device_view(device_ptr<const std::int32_t>(indices), {heads, kmax});
  }
  DeviceView<const std::int32_t, 1> counts_view() const {
    return cuda_cache::counts_view(counts, heads);
  }
  // The rows of `table` this keep set names, into a fresh table of the same capacity.
  RowTable gather(Cuda stream, const RowTable& table) const {
    return table.gathered(stream, indices_view(), counts_view(), table.capacity());
  }
};

// Keep sets of a store whose first quantized[s] rows are quantized and the rest an f16 window:
// one table per part, indices relative to the part.
struct SplitKeep {
  KeepTable quantized, window;
};
inline SplitKeep split_keep(Cuda stream, const std::vector<std::vector<std::int32_t>>& keep,
                            const std::vector<int>& quantized) {
  std::vector<std::vector<std::int32_t>> q(keep.size()), w(keep.size());
  for (std::size_t s = 0; s < keep.size(); ++s)
    for (const std::int32_t i : keep[s])
      (i < quantized[s] ? q[s] : w[s]).push_back(i < quantized[s] ? i : i - quantized[s]);
  return SplitKeep{KeepTable(stream, q), KeepTable(stream, w)};
}

inline DeviceView<float, 1> workspace_view(rt::DeviceBuffer& buffer, std::size_t floats) {
  if (buffer.bytes() < std::max<std::size_t>(floats, 1) * sizeof(float))
    buffer = rt::DeviceBuffer(std::max<std::size_t>(floats, 1) * sizeof(float));
  return make_device_view(device_ptr<float>(buffer),
                          {static_cast<std::int64_t>(buffer.bytes() / sizeof(float))});
}

inline DeviceView<float, 1> quantized_workspace(const StoreContext& ctx,
                                                rt::DeviceBuffer& workspace, int max_length) {
  return workspace_view(workspace,
                        ops::quantized_decode_attention_workspace_floats(
                            ctx.heads, ctx.group, 1, ctx.head_dim, std::max(max_length, 1)));
}

// The staged prompt of the layer before eviction ([1, Hkv, T, D] f16), for stores whose
// parameters cover the whole layer (FP8 scope=tensor).
struct LayerPrompt {
  DeviceView<const f16, 4> keys, values;
};

template <class Quant>
class Store;

// ---- f16 rows (NoQuant)
// ---------------------------------------------------------------------------
template <>
class Store<NoQuant> {
 public:
  // Takes the compacted prompt rows ([S, capacity, D] f16) as its storage.
  void load(const NoQuant&, const StoreContext& ctx, RowTable keys, RowTable values,
            const std::vector<int>& counts, const LayerPrompt&) {
    keys_ = std::move(keys);
    values_ = std::move(values);
    lengths_.assign(ctx.stream, counts);
  }
  // One token per storage head: rows [S, D] f16 on the device.
  void append(const NoQuant&, const StoreContext& ctx, DeviceView<const f16, 4> k,  // [S,1,1,D]
              DeviceView<const f16, 4> v) {
    const int needed = lengths_.max() + 1;
    keys_.reserve(ctx.stream, needed, lengths_.host());
    values_.reserve(ctx.stream, needed, lengths_.host());
    // append_rows advances the device counts: once for keys, then restore for values.
    ops::append_rows(ctx.stream, k, keys_.rows4<f16>(), lengths_.view());
    lengths_.upload(ctx.stream);
    ops::append_rows(ctx.stream, v, values_.rows4<f16>(), lengths_.view());
    for (std::size_t s = 0; s < lengths_.host().size(); ++s) ++lengths_[s];
  }
  void after_step(const NoQuant&, const StoreContext&) {}

  void attend(const StoreContext& ctx, DeviceView<const f16, 3> q,  // [S, g, D]
              DeviceView<f16, 3> out, rt::DeviceBuffer& workspace) const {
    const std::int64_t s = ctx.heads, cap = keys_.capacity(), d = ctx.head_dim;
    const auto ws = workspace_view(
        workspace, ops::decode_attention_workspace_floats(ctx.heads, ctx.group, 1, ctx.head_dim,
                                                          static_cast<int>(cap)));
    ops::decode_attention(ctx.stream, q, k4(s, cap, d), v4(s, cap, d), lengths1(), out, ws,
                          ctx.attention);
  }
  // Attention plus this step's H2O scores (each probability rounded to f16, summed over the
  // group) into scores [S, capacity] fp32; returns them per head on the host (synchronizes).
  std::vector<std::vector<float>> attend_with_scores(const StoreContext& ctx,
                                                     DeviceView<const f16, 3> q,
                                                     DeviceView<f16, 3> out,
                                                     rt::DeviceBuffer& workspace,
                                                     rt::DeviceBuffer& scores) const {
    const std::int64_t s = ctx.heads, cap = keys_.capacity(), d = ctx.head_dim;
    const auto ws = workspace_view(
        workspace, ops::decode_attention_with_scores_workspace_floats(
                       ctx.heads, ctx.group, 1, ctx.head_dim, static_cast<int>(cap)));
    if (scores.bytes() < static_cast<std::size_t>(s * cap) * sizeof(float))
      scores = rt::DeviceBuffer(static_cast<std::size_t>(s * cap) * sizeof(float));
    ops::decode_attention_with_scores(
        ctx.stream, q, k4(s, cap, d), v4(s, cap, d), lengths1(), out,
        DeviceView<float, 3>{device_ptr<float>(scores), {s, 1, cap}, {cap, cap, 1}}, ws,
        ops::ScoreOptions{ops::ScoreUpdate::overwrite, /*round_f16=*/true}, ctx.attention);
    std::vector<float> host(static_cast<std::size_t>(s * cap));
    rt::copy_device_to_host(host.data(), scores.data(), host.size() * sizeof(float), ctx.stream);
    rt::synchronize(ctx.stream);
    std::vector<std::vector<float>> per_head(s);
    for (std::int64_t h = 0; h < s; ++h)
      per_head[h].assign(host.begin() + h * cap, host.begin() + h * cap + lengths_[h]);
    return per_head;
  }

  void gather(const StoreContext& ctx, const std::vector<std::vector<std::int32_t>>& keep) {
    const KeepTable table(ctx.stream, keep);
    RowTable keys = table.gather(ctx.stream, keys_), values = table.gather(ctx.stream, values_);
    rt::synchronize(ctx.stream);  // the tables and old rows are freed below
    keys_ = std::move(keys);
    values_ = std::move(values);
    lengths_.assign(ctx.stream, table.sizes);
  }

  // Rows [n, D] of head s (host floats; the f16 values as stored).
  void contents(const StoreContext& ctx, std::vector<std::vector<float>>& keys,
                std::vector<std::vector<float>>& values) const {
    const auto k = keys_.download<f16>(ctx.stream), v = values_.download<f16>(ctx.stream);
    const std::int64_t cap = keys_.capacity(), d = ctx.head_dim;
    keys.assign(ctx.heads, {});
    values.assign(ctx.heads, {});
    for (int s = 0; s < ctx.heads; ++s)
      for (std::int64_t i = 0; i < lengths_[s] * d; ++i) {
        keys[s].push_back(static_cast<float>(k[s * cap * d + i]));
        values[s].push_back(static_cast<float>(v[s * cap * d + i]));
      }
  }
  StorageBytes bytes(const StoreContext& ctx, int s, int /*source_head*/) const {
    StorageBytes b;
    b.payload = 2 * static_cast<std::int64_t>(lengths_[s]) * ctx.head_dim * sizeof(f16);
    return b;
  }
  int size(int s) const { return lengths_[s]; }

 private:
  DeviceView<const f16, 4> k4(std::int64_t s, std::int64_t cap, std::int64_t d) const {
    return {keys_.at<const f16>(0, 0), {s, 1, cap, d}, {cap * d, cap * d, d, 1}};
  }
  DeviceView<const f16, 4> v4(std::int64_t s, std::int64_t cap, std::int64_t d) const {
    return {values_.at<const f16>(0, 0), {s, 1, cap, d}, {cap * d, cap * d, d, 1}};
  }
  DeviceView<const std::int32_t, 1> lengths1() const {
    return make_device_view(static_cast<const std::int32_t*>(lengths_.device()),
                            {static_cast<std::int64_t>(lengths_.host().size())});
  }

  RowTable keys_, values_;  // [S, capacity, D] f16
  HeadCounts lengths_;      // n per head
};

// ---- KIVI (keys per channel in blocks of G tokens, values per token; f16 residuals)
// --------------
template <>
class Store<Kivi> {
 public:
  static void check(const Kivi& q, int head_dim) {
    KVC_CHECK(q.key_bits == q.value_bits && (q.key_bits == 2 || q.key_bits == 4),
              "kivi(kbits=", q.key_bits, ", vbits=", q.value_bits,
              ") on the cuda backend: the fused attention reads 2- or 4-bit codes with equal key "
              "and value bits");
    KVC_CHECK(q.key_axis == QuantAxis::channel && q.value_axis == QuantAxis::token,
              "kivi on the cuda backend: only KIVI's own axes (keys per channel, values per "
              "token) have a fused attention kernel");
    KVC_CHECK(q.scales == ops::ParamDType::f16,
              "kivi(scales=f32) on the cuda backend: the fused attention reads f16 parameters");
    KVC_CHECK(
        q.group % 32 == 0 && head_dim % q.group == 0, "kivi(group=", q.group,
        ") on the cuda backend: group must be a multiple of 32 dividing head_dim = ", head_dim);
  }

  void load(const Kivi& q, const StoreContext& ctx, RowTable keys, RowTable values,
            const std::vector<int>& counts, const LayerPrompt&) {
    check(q, ctx.head_dim);
    bits_ = q.key_bits;  // what attend() and bytes() read back
    group_ = q.group;
    const int S = ctx.heads, d = ctx.head_dim, g = q.group, r = q.residual;
    const int per_word = ops::codes_per_word(q.key_bits);
    std::vector<int> qk(S), qv(S), kres(S), vwin(S);
    int max_blocks = 0, max_rows = 0;
    for (int s = 0; s < S; ++s) {
      const int n = counts[s];
      qk[s] = n < r ? 0 : n - n % r;
      qv[s] = n <= r ? 0 : n - r;
      kres[s] = n - qk[s];
      vwin[s] = n - qv[s];
      max_blocks = std::max(max_blocks, qk[s] / g);
      max_rows = std::max(max_rows, qv[s]);
    }
    key_codes_ = RowTable(ctx.stream, S, max_blocks + r / g, std::int64_t{4} * d * (g / per_word));
    key_scale_ = RowTable(ctx.stream, S, max_blocks + r / g, std::int64_t{2} * d);
    key_minimum_ = RowTable(ctx.stream, S, max_blocks + r / g, std::int64_t{2} * d);
    key_residual_ = RowTable(ctx.stream, S, r, std::int64_t{2} * d);
    const std::int64_t row_capacity = max_rows + 64;
    value_codes_ = RowTable(ctx.stream, S, row_capacity, 4 * ops::words_for(d, q.value_bits));
    value_scale_ = RowTable(ctx.stream, S, row_capacity, std::int64_t{2} * (d / g));
    value_minimum_ = RowTable(ctx.stream, S, row_capacity, std::int64_t{2} * (d / g));
    value_window_ = RowTable(ctx.stream, S, r + 1, std::int64_t{2} * d);
    const ops::QuantSpec spec = Store::spec(q);
    for (int s = 0; s < S; ++s) {
      if (qk[s] > 0)
        ops::quantize_channel_blocks(ctx.stream, keys.head_rows<const f16>(s, 0, qk[s]), spec,
                                     head_blocks(s));
      if (kres[s] > 0)
        rt::copy_device_to_device(key_residual_.row(s, 0), keys.row(s, qk[s]),
                                  static_cast<std::size_t>(kres[s]) * key_residual_.row_bytes(),
                                  ctx.stream);
      if (qv[s] > 0)
        ops::quantize_token_rows(ctx.stream, values.head_rows<const f16>(s, 0, qv[s]), spec,
                                 head_token_rows(s));
      if (vwin[s] > 0)
        rt::copy_device_to_device(value_window_.row(s, 0), values.row(s, qv[s]),
                                  static_cast<std::size_t>(vwin[s]) * value_window_.row_bytes(),
                                  ctx.stream);
    }
    lengths_.assign(ctx.stream, counts);
    quantized_keys_.assign(ctx.stream, qk);
    quantized_values_.assign(ctx.stream, qv);
    residual_keys_.assign(ctx.stream, kres);
    window_values_.assign(ctx.stream, vwin);
  }

  void append(const Kivi&, const StoreContext& ctx, DeviceView<const f16, 4> k,
              DeviceView<const f16, 4> v) {
    // Keys: the residual holds < R rows between steps; values: the window holds <= R.
    ops::append_rows(ctx.stream, k, key_residual_.rows4<f16>(), residual_keys_.view());
    ops::append_rows(ctx.stream, v, value_window_.rows4<f16>(), window_values_.view());
    for (int s = 0; s < ctx.heads; ++s) ++residual_keys_[s], ++window_values_[s], ++lengths_[s];
    lengths_.upload(ctx.stream);
  }

  // KIVI's flushes after the step (the CPU store's after_step, same rule per head).
  void after_step(const Kivi& q, const StoreContext& ctx) {
    const ops::QuantSpec spec = Store::spec(q);
    const int r = q.residual;
    bool keys_full = false, values_over = false;
    int blocks_needed = 0, rows_needed = 0;
    for (int s = 0; s < ctx.heads; ++s) {
      keys_full |= residual_keys_[s] == r;
      values_over |= window_values_[s] > r;
      blocks_needed = std::max(blocks_needed, (quantized_keys_[s] + r) / q.group);
      rows_needed = std::max(rows_needed, quantized_values_[s] + 1);
    }
    if (keys_full) {
      std::vector<int> used_blocks(ctx.heads);
      for (int s = 0; s < ctx.heads; ++s) used_blocks[s] = quantized_keys_[s] / q.group;
      for (RowTable* t : {&key_codes_, &key_scale_, &key_minimum_})
        t->reserve(ctx.stream, blocks_needed, used_blocks);
      ops::flush_channel_residual(ctx.stream, key_residual_.rows4<const f16>(), spec, all_blocks(),
                                  residual_keys_.view(), quantized_keys_.view());
      for (int s = 0; s < ctx.heads; ++s)
        if (residual_keys_[s] == r) quantized_keys_[s] += r, residual_keys_[s] = 0;
    }
    if (values_over) {
      for (RowTable* t : {&value_codes_, &value_scale_, &value_minimum_})
        t->reserve(ctx.stream, rows_needed, quantized_values_.host());
      ops::flush_token_window(ctx.stream, value_window_.rows4<f16>(), r, spec, all_token_rows(),
                              window_values_.view(), quantized_values_.view());
      for (int s = 0; s < ctx.heads; ++s)
        if (window_values_[s] > r) ++quantized_values_[s], --window_values_[s];
    }
  }

  void attend(const StoreContext& ctx, DeviceView<const f16, 3> q, DeviceView<f16, 3> out,
              rt::DeviceBuffer& workspace) const {
    const ops::KiviCache<MemorySpace::Device> cache = description<MemorySpace::Device>(
        bits_, group_, key_codes_.at<const std::uint32_t>(0, 0), key_scale_.at<const f16>(0, 0),
        key_minimum_.at<const f16>(0, 0), key_residual_.at<const f16>(0, 0),
        value_codes_.at<const std::uint32_t>(0, 0), value_scale_.at<const f16>(0, 0),
        value_minimum_.at<const f16>(0, 0), value_window_.at<const f16>(0, 0), lengths_.device(),
        quantized_keys_.device(), quantized_values_.device(), ctx.heads);
    ops::decode_attention(ctx.stream, q, cache, out,
                          quantized_workspace(ctx, workspace, lengths_.max()), ctx.attention);
  }

  void contents(const StoreContext& ctx, std::vector<std::vector<float>>& keys,
                std::vector<std::vector<float>>& values) const {
    const auto kc = key_codes_.download<std::uint32_t>(ctx.stream);
    const auto ks = key_scale_.download<f16>(ctx.stream),
               km = key_minimum_.download<f16>(ctx.stream);
    const auto kr = key_residual_.download<f16>(ctx.stream);
    const auto vc = value_codes_.download<std::uint32_t>(ctx.stream);
    const auto vs = value_scale_.download<f16>(ctx.stream);
    const auto vm = value_minimum_.download<f16>(ctx.stream);
    const auto vw = value_window_.download<f16>(ctx.stream);
    const auto lengths = as_int32(lengths_.host()), qk = as_int32(quantized_keys_.host()),
               qv = as_int32(quantized_values_.host());
    const ops::KiviCache<MemorySpace::Host> cache = description<MemorySpace::Host>(
        bits_, group_, kc.data(), ks.data(), km.data(), kr.data(), vc.data(), vs.data(), vm.data(),
        vw.data(), lengths.data(), qk.data(), qv.data(), ctx.heads);
    keys.assign(ctx.heads, {});
    values.assign(ctx.heads, {});
    for (int s = 0; s < ctx.heads; ++s)
      ops::dequantize_head(Cpu{}, cache, ctx.head_dim, s, 0, keys[s], values[s]);
  }

  // The CPU KiviTensor's count: codes + f16 residual rows as payload, scales and minimums as
  // parameters.
  StorageBytes bytes(const StoreContext& ctx, int s, int /*source_head*/) const {
    const std::int64_t d = ctx.head_dim, qk = quantized_keys_[s], qv = quantized_values_[s],
                       n = lengths_[s];
    StorageBytes b;
    b.payload = qk / group_ * key_codes_.row_bytes() + qv * value_codes_.row_bytes() +
                (2 * n - qk - qv) * d * 2;
    b.params = qk / group_ * 2 * key_scale_.row_bytes() + qv * 2 * value_scale_.row_bytes();
    return b;
  }
  int size(int s) const { return lengths_[s]; }

 private:
  static ops::QuantSpec spec(const Kivi& q) {
    return ops::QuantSpec{q.key_bits, q.group, false, ops::ParamDType::f16};
  }
  static std::vector<std::int32_t> as_int32(const std::vector<int>& x) {
    return std::vector<std::int32_t>(x.begin(), x.end());
  }
  ops::ChannelBlocks blocks(int first_head, int heads) const {
    const std::int64_t cap = key_codes_.capacity(), d = key_scale_.row_bytes() / 2;
    const std::int64_t words = key_codes_.row_bytes() / 4 / d;
    const auto params = [&](const RowTable& t) {
      return ops::device_params(DeviceView<f16, 4>{
          t.at<f16>(first_head, 0), {heads, 1, cap, d}, {cap * d, cap * d, d, 1}});
    };
    return ops::ChannelBlocks{
        DeviceView<std::uint32_t, 5>{key_codes_.at<std::uint32_t>(first_head, 0),
                                     {heads, 1, cap, d, words},
                                     {cap * d * words, cap * d * words, d * words, words, 1}},
        params(key_scale_), params(key_minimum_)};
  }
  ops::ChannelBlocks head_blocks(int s) const { return blocks(s, 1); }
  ops::ChannelBlocks all_blocks() const {
    return blocks(0, static_cast<int>(lengths_.host().size()));
  }
  ops::TokenRows token_rows(int first_head, int heads) const {
    const std::int64_t cap = value_codes_.capacity(), words = value_codes_.row_bytes() / 4;
    const std::int64_t groups = value_scale_.row_bytes() / 2;
    const auto params = [&](const RowTable& t) {
      return ops::device_params(DeviceView<f16, 4>{t.at<f16>(first_head, 0),
                                                   {heads, 1, cap, groups},
                                                   {cap * groups, cap * groups, groups, 1}});
    };
    return ops::TokenRows{
        DeviceView<std::uint32_t, 4>{value_codes_.at<std::uint32_t>(first_head, 0),
                                     {heads, 1, cap, words},
                                     {cap * words, cap * words, words, 1}},
        params(value_scale_), params(value_minimum_)};
  }
  ops::TokenRows head_token_rows(int s) const { return token_rows(s, 1); }
  ops::TokenRows all_token_rows() const {
    return token_rows(0, static_cast<int>(lengths_.host().size()));
  }

  // The layout description over all S heads (batch entry s = storage head s).
  template <MemorySpace Space>
  ops::KiviCache<Space> description(int bits, int group, const std::uint32_t* kc, const f16* ks,
                                    const f16* km, const f16* kr, const std::uint32_t* vc,
                                    const f16* vs, const f16* vm, const f16* vw,
                                    const std::int32_t* lengths, const std::int32_t* qk,
                                    const std::int32_t* qv, int heads) const {
    ops::KiviCache<Space> c;
    c.bits = bits;
    c.group = group;
    c.key_codes = {kc, key_codes_.head_stride<std::uint32_t>(), 0};
    c.key_scale = {ks, key_scale_.head_stride<f16>(), 0};
    c.key_minimum = {km, key_minimum_.head_stride<f16>(), 0};
    c.key_residual = {kr, key_residual_.head_stride<f16>(), 0};
    c.value_codes = {vc, value_codes_.head_stride<std::uint32_t>(), 0};
    c.value_scale = {vs, value_scale_.head_stride<f16>(), 0};
    c.value_minimum = {vm, value_minimum_.head_stride<f16>(), 0};
    c.value_residual = {vw, value_window_.head_stride<f16>(), 0};
    c.lengths = View<const std::int32_t, 2, Space>{lengths, {heads, 1}, {1, 1}};
    c.quantized_keys = View<const std::int32_t, 2, Space>{qk, {heads, 1}, {1, 1}};
    c.quantized_values = View<const std::int32_t, 2, Space>{qv, {heads, 1}, {1, 1}};
    c.max_length = lengths_.max();
    return c;
  }

  int bits_ = 2, group_ = 32;
  RowTable key_codes_, key_scale_, key_minimum_;  // per block: [D, G / (32/bits)] words; [D] f16
  RowTable key_residual_;                         // [R, D] f16
  RowTable value_codes_, value_scale_, value_minimum_;  // per token: words; [D / G] f16
  RowTable value_window_;                               // [R + 1, D] f16
  HeadCounts lengths_, quantized_keys_, quantized_values_, residual_keys_, window_values_;
};

// ---- per-token INT8 / INT4 (codes + parameters per token, optional f16 window)
// -------------------
template <>
class Store<IntPerToken> {
 public:
  static void check(const IntPerToken& q, int head_dim) {
    const int g = q.group == 0 ? head_dim : q.group;
    KVC_CHECK(g % 16 == 0 && head_dim % g == 0, "int_per_token(group=", q.group,
              ") on the cuda backend: the fused attention needs channel groups of a multiple of "
              "16 dividing head_dim = ",
              head_dim, " (group=0: the whole head)");
  }

  void load(const IntPerToken& q, const StoreContext& ctx, RowTable keys, RowTable values,
            const std::vector<int>& counts, const LayerPrompt&) {
    check(q, ctx.head_dim);
    const int S = ctx.heads, d = ctx.head_dim, r = q.residual;
    spec_ = ops::QuantSpec{q.bits, q.group == 0 ? d : q.group, q.symmetric, q.scales};
    std::vector<int> m(S), window(S);
    int max_rows = 0;
    for (int s = 0; s < S; ++s) {
      m[s] = std::max(counts[s] - r, 0);
      window[s] = counts[s] - m[s];
      max_rows = std::max(max_rows, m[s]);
    }
    const std::int64_t cap = max_rows + 64;
    const std::int64_t code_row = 4 * ops::words_for(d, q.bits);
    const std::int64_t param_row = std::int64_t{d / spec_.group} * ops::param_bytes(q.scales);
    for (Part* part : {&keys_, &values_}) {
      part->codes = RowTable(ctx.stream, S, cap, code_row);
      part->scale = RowTable(ctx.stream, S, cap, param_row);
      part->minimum = RowTable(ctx.stream, S, q.symmetric ? 0 : cap, param_row);
      part->window = RowTable(ctx.stream, S, r + 1, std::int64_t{2} * d);
      part->psize = ops::param_bytes(q.scales);
    }
    for (int s = 0; s < S; ++s) {
      const auto fill = [&](Part& part, const RowTable& rows) {
        if (m[s] > 0)
          ops::quantize_token_rows(ctx.stream, rows.head_rows<const f16>(s, 0, m[s]), spec_,
                                   part.rows(s, 1));
        if (window[s] > 0)
          rt::copy_device_to_device(part.window.row(s, 0), rows.row(s, m[s]),
                                    static_cast<std::size_t>(window[s]) * part.window.row_bytes(),
                                    ctx.stream);
      };
      fill(keys_, keys);
      fill(values_, values);
    }
    lengths_.assign(ctx.stream, counts);
    quantized_.assign(ctx.stream, m);
    window_.assign(ctx.stream, window);
  }

  // Engines write the cache before attention: with residual = 0 the token is quantized at once;
  // otherwise it enters the f16 window and the window's oldest row beyond `residual` is quantized.
  void append(const IntPerToken& q, const StoreContext& ctx, DeviceView<const f16, 4> k,
              DeviceView<const f16, 4> v) {
    reserve(ctx, quantized_.max() + 1);
    if (q.residual == 0) {
      ops::quantize_token_rows(ctx.stream, k, spec_, keys_.rows(0, ctx.heads),
                               quantized_.const_view());
      ops::quantize_token_rows(ctx.stream, v, spec_, values_.rows(0, ctx.heads),
                               quantized_.const_view());
      for (int s = 0; s < ctx.heads; ++s) ++quantized_[s], ++lengths_[s];
      quantized_.upload(ctx.stream);
      lengths_.upload(ctx.stream);
      return;
    }
    // Keys and values share the counters: each op advances the device copy, which is re-uploaded
    // from the host in between.
    ops::append_rows(ctx.stream, k, keys_.window.rows4<f16>(), window_.view());
    window_.upload(ctx.stream);
    ops::append_rows(ctx.stream, v, values_.window.rows4<f16>(), window_.view());
    for (int s = 0; s < ctx.heads; ++s) ++window_[s], ++lengths_[s];
    lengths_.upload(ctx.stream);
    bool over = false;
    for (int s = 0; s < ctx.heads; ++s) over |= window_[s] > q.residual;
    if (!over) return;
    ops::flush_token_window(ctx.stream, keys_.window.rows4<f16>(), q.residual, spec_,
                            keys_.rows(0, ctx.heads), window_.view(), quantized_.view());
    window_.upload(ctx.stream);
    quantized_.upload(ctx.stream);
    ops::flush_token_window(ctx.stream, values_.window.rows4<f16>(), q.residual, spec_,
                            values_.rows(0, ctx.heads), window_.view(), quantized_.view());
    for (int s = 0; s < ctx.heads; ++s)
      if (window_[s] > q.residual) --window_[s], ++quantized_[s];
  }
  void after_step(const IntPerToken&, const StoreContext&) {}

  void attend(const StoreContext& ctx, DeviceView<const f16, 3> q, DeviceView<f16, 3> out,
              rt::DeviceBuffer& workspace) const {
    const ops::IntCache<MemorySpace::Device> cache = description<MemorySpace::Device>(
        keys_.pointers(), values_.pointers(), lengths_.device(), quantized_.device(), ctx.heads);
    ops::decode_attention(ctx.stream, q, cache, out,
                          quantized_workspace(ctx, workspace, lengths_.max()), ctx.attention);
  }

  void gather(const StoreContext& ctx, const std::vector<std::vector<std::int32_t>>& keep) {
    const SplitKeep split = split_keep(ctx.stream, keep, quantized_.host());
    for (Part* part : {&keys_, &values_}) {
      Part next;
      next.psize = part->psize;
      next.codes = split.quantized.gather(ctx.stream, part->codes);
      next.scale = split.quantized.gather(ctx.stream, part->scale);
      next.minimum = split.quantized.gather(ctx.stream, part->minimum);
      next.window = split.window.gather(ctx.stream, part->window);
      rt::synchronize(ctx.stream);  // the old part is freed below
      *part = std::move(next);
    }
    std::vector<int> lengths(ctx.heads);
    for (int s = 0; s < ctx.heads; ++s)
      lengths[s] = split.quantized.sizes[s] + split.window.sizes[s];
    lengths_.assign(ctx.stream, lengths);
    quantized_.assign(ctx.stream, split.quantized.sizes);
    window_.assign(ctx.stream, split.window.sizes);
  }

  void contents(const StoreContext& ctx, std::vector<std::vector<float>>& keys,
                std::vector<std::vector<float>>& values) const {
    const HostPart k = keys_.download(ctx.stream), v = values_.download(ctx.stream);
    const std::vector<std::int32_t> lengths(lengths_.host().begin(), lengths_.host().end());
    const std::vector<std::int32_t> m(quantized_.host().begin(), quantized_.host().end());
    const ops::IntCache<MemorySpace::Host> cache = description<MemorySpace::Host>(
        k.pointers(), v.pointers(), lengths.data(), m.data(), ctx.heads);
    keys.assign(ctx.heads, {});
    values.assign(ctx.heads, {});
    for (int s = 0; s < ctx.heads; ++s)
      ops::dequantize_head(Cpu{}, cache, ctx.head_dim, s, 0, keys[s], values[s]);
  }

  StorageBytes bytes(const StoreContext& ctx, int s, int /*source_head*/) const {
    const std::int64_t m = quantized_[s], window = lengths_[s] - quantized_[s];
    StorageBytes b;
    b.payload = 2 * (m * keys_.codes.row_bytes() + window * ctx.head_dim * 2);
    b.params = 2 * m * keys_.scale.row_bytes() * (spec_.symmetric ? 1 : 2);
    return b;
  }
  int size(int s) const { return lengths_[s]; }

 private:
  struct Pointers {
    const std::uint32_t* codes;
    const void *scale, *minimum;
    const f16* window;
    std::int64_t codes_head, params_head, window_head;
  };
  struct HostPart {
    std::vector<std::uint32_t> codes;
    std::vector<std::byte> scale, minimum;
    std::vector<f16> window;
    std::int64_t codes_head, params_head, window_head;
    bool symmetric;
    Pointers pointers() const {
      return {codes.data(),  scale.data(), symmetric ? nullptr : minimum.data(),
              window.data(), codes_head,   params_head,
              window_head};
    }
  };
  struct Part {
    RowTable codes, scale, minimum, window;
    ops::TokenRows rows(int first_head, int heads) const {
      const std::int64_t cap = codes.capacity(), words = codes.row_bytes() / 4;
      const std::int64_t groups = scale.row_bytes() / psize;
      const auto params = [&](const RowTable& t) {
        ops::DeviceParams p;
        p.dtype = psize == 2 ? ops::ParamDType::f16 : ops::ParamDType::f32;
        p.data = t.capacity() == 0 ? nullptr : static_cast<void*>(t.row(first_head, 0));
        p.shape = {heads, 1, cap, groups};
        p.strides = {cap * groups, cap * groups, groups, 1};
        return p;
      };
      return ops::TokenRows{DeviceView<std::uint32_t, 4>{codes.at<std::uint32_t>(first_head, 0),
                                                         {heads, 1, cap, words},
                                                         {cap * words, cap * words, words, 1}},
                            params(scale), params(minimum)};
    }
    Pointers pointers() const {
      return {codes.at<const std::uint32_t>(0, 0),
              scale.row(0, 0),
              minimum.capacity() == 0 ? nullptr : minimum.row(0, 0),
              window.at<const f16>(0, 0),
              codes.head_stride<std::uint32_t>(),
              scale.capacity() * scale.row_bytes() / psize,
              window.head_stride<f16>()};
    }
    HostPart download(Cuda stream) const {
      return {
          codes.download<std::uint32_t>(stream),
          scale.download<std::byte>(stream),
          minimum.capacity() == 0 ? std::vector<std::byte>{} : minimum.download<std::byte>(stream),
          window.download<f16>(stream),
          codes.head_stride<std::uint32_t>(),
          scale.capacity() * scale.row_bytes() / psize,
          window.head_stride<f16>(),
          minimum.capacity() == 0};
    }
    std::int64_t psize = 2;  // bytes per scale or minimum
  };

  void reserve(const StoreContext& ctx, int rows) {
    for (Part* part : {&keys_, &values_}) {
      part->codes.reserve(ctx.stream, rows, quantized_.host());
      part->scale.reserve(ctx.stream, rows, quantized_.host());
      if (part->minimum.capacity() > 0) part->minimum.reserve(ctx.stream, rows, quantized_.host());
    }
  }

  template <MemorySpace Space>
  ops::IntCache<Space> description(const Pointers& k, const Pointers& v,
                                   const std::int32_t* lengths, const std::int32_t* m,
                                   int heads) const {
    ops::IntCache<Space> c;
    c.bits = spec_.bits;
    c.group = spec_.group;
    c.symmetric = spec_.symmetric;
    c.params = spec_.params;
    c.key_codes = {k.codes, k.codes_head, 0};
    c.value_codes = {v.codes, v.codes_head, 0};
    c.key_scale = {k.scale, k.params_head, 0};
    c.value_scale = {v.scale, v.params_head, 0};
    c.key_minimum = {k.minimum, k.params_head, 0};
    c.value_minimum = {v.minimum, v.params_head, 0};
    c.key_window = {k.window, k.window_head, 0};
    c.value_window = {v.window, v.window_head, 0};
    c.lengths = View<const std::int32_t, 2, Space>{lengths, {heads, 1}, {1, 1}};
    c.quantized = View<const std::int32_t, 2, Space>{m, {heads, 1}, {1, 1}};
    c.max_length = lengths_.max();
    return c;
  }

  ops::QuantSpec spec_{};
  Part keys_, values_;
  HeadCounts lengths_, quantized_, window_;
};

// ---- FP8 (one byte per element, one fp32 scale per storage head and tensor) ---------------------
template <>
class Store<Fp8> {
 public:
  void load(const Fp8& q, const StoreContext& ctx, RowTable keys, RowTable values,
            const std::vector<int>& counts, const LayerPrompt& prompt) {
    const int S = ctx.heads, d = ctx.head_dim;
    kind_ = q.kind;
    scope_ = q.scope;
    computed_scales_ = (q.key_scale == 0) + (q.value_scale == 0);
    int max_rows = 0;
    for (int n : counts) max_rows = std::max(max_rows, n);
    key_codes_ = RowTable(ctx.stream, S, max_rows + 64, d);
    value_codes_ = RowTable(ctx.stream, S, max_rows + 64, d);
    key_scale_ = scales(q.key_scale, ctx, keys, counts, prompt.keys);
    value_scale_ = scales(q.value_scale, ctx, values, counts, prompt.values);
    for (int s = 0; s < S; ++s)
      if (counts[s] > 0) {
        ops::quantize_fp8(ctx.stream, keys.head_rows<const f16>(s, 0, counts[s]),
                          scale_view(key_scale_, s, 1), kind_,
                          key_codes_.head_rows<std::uint8_t>(s, 0, key_codes_.capacity()));
        ops::quantize_fp8(ctx.stream, values.head_rows<const f16>(s, 0, counts[s]),
                          scale_view(value_scale_, s, 1), kind_,
                          value_codes_.head_rows<std::uint8_t>(s, 0, value_codes_.capacity()));
      }
    lengths_.assign(ctx.stream, counts);
  }

  void append(const Fp8&, const StoreContext& ctx, DeviceView<const f16, 4> k,
              DeviceView<const f16, 4> v) {
    const int needed = lengths_.max() + 1;
    key_codes_.reserve(ctx.stream, needed, lengths_.host());
    value_codes_.reserve(ctx.stream, needed, lengths_.host());
    ops::quantize_fp8(ctx.stream, k, scale_view(key_scale_, 0, ctx.heads), kind_,
                      key_codes_.rows4<std::uint8_t>(), lengths_.const_view());
    ops::quantize_fp8(ctx.stream, v, scale_view(value_scale_, 0, ctx.heads), kind_,
                      value_codes_.rows4<std::uint8_t>(), lengths_.const_view());
    for (int s = 0; s < ctx.heads; ++s) ++lengths_[s];
    lengths_.upload(ctx.stream);
  }
  void after_step(const Fp8&, const StoreContext&) {}

  void attend(const StoreContext& ctx, DeviceView<const f16, 3> q, DeviceView<f16, 3> out,
              rt::DeviceBuffer& workspace) const {
    const auto cache = description<MemorySpace::Device>(
        key_codes_.at<const std::uint8_t>(0, 0), value_codes_.at<const std::uint8_t>(0, 0),
        device_ptr<const float>(key_scale_), device_ptr<const float>(value_scale_),
        lengths_.device(), ctx.heads);
    ops::decode_attention(ctx.stream, q, cache, out,
                          quantized_workspace(ctx, workspace, lengths_.max()), ctx.attention);
  }

  void gather(const StoreContext& ctx, const std::vector<std::vector<std::int32_t>>& keep) {
    const KeepTable table(ctx.stream, keep);
    RowTable k = table.gather(ctx.stream, key_codes_), v = table.gather(ctx.stream, value_codes_);
    rt::synchronize(ctx.stream);
    key_codes_ = std::move(k);
    value_codes_ = std::move(v);
    lengths_.assign(ctx.stream, table.sizes);
  }

  void contents(const StoreContext& ctx, std::vector<std::vector<float>>& keys,
                std::vector<std::vector<float>>& values) const {
    const auto kc = key_codes_.download<std::uint8_t>(ctx.stream);
    const auto vc = value_codes_.download<std::uint8_t>(ctx.stream);
    std::vector<float> ks(ctx.heads), vs(ctx.heads);
    rt::copy_device_to_host(ks.data(), key_scale_.data(), ks.size() * sizeof(float), ctx.stream);
    rt::copy_device_to_host(vs.data(), value_scale_.data(), vs.size() * sizeof(float), ctx.stream);
    rt::synchronize(ctx.stream);
    const std::vector<std::int32_t> lengths(lengths_.host().begin(), lengths_.host().end());
    const auto cache = description<MemorySpace::Host>(kc.data(), vc.data(), ks.data(), vs.data(),
                                                      lengths.data(), ctx.heads);
    keys.assign(ctx.heads, {});
    values.assign(ctx.heads, {});
    for (int s = 0; s < ctx.heads; ++s)
      ops::dequantize_head(Cpu{}, cache, ctx.head_dim, s, 0, keys[s], values[s]);
  }

  // The CPU Fp8 store's count: one byte per element; a computed scale is 4 bytes, held by every
  // storage head (scope=head) or once per layer, by the storage heads reading KV head 0
  // (scope=tensor).
  StorageBytes bytes(const StoreContext& ctx, int s, int source_head) const {
    StorageBytes b;
    b.payload = 2 * static_cast<std::int64_t>(lengths_[s]) * ctx.head_dim;
    const bool holds_scales = scope_ == Fp8Scope::head || source_head <= 0;
    b.params = holds_scales ? computed_scales_ * static_cast<std::int64_t>(sizeof(float)) : 0;
    return b;
  }
  int size(int s) const { return lengths_[s]; }

 private:
  static DeviceView<const float, 2> scale_view(const rt::DeviceBuffer& b, int first, int heads) {
    return DeviceView<const float, 2>{device_ptr<const float>(b) + first, {heads, 1}, {1, 1}};
  }
  // One fp32 scale per storage head: static, or vLLM's max|x| / fp8_max over the head's kept
  // prompt rows (scope=head) or the layer's whole prompt before eviction (scope=tensor).
  rt::DeviceBuffer scales(double fixed, const StoreContext& ctx, const RowTable& rows,
                          const std::vector<int>& counts, DeviceView<const f16, 4> prompt) const {
    rt::DeviceBuffer out(std::max<std::size_t>(ctx.heads, 4) * sizeof(float));
    if (fixed > 0) {
      const std::vector<float> host(ctx.heads, static_cast<float>(fixed));
      rt::copy_host_to_device(out.data(), host.data(), host.size() * sizeof(float), ctx.stream);
    } else if (scope_ == Fp8Scope::tensor) {
      rt::DeviceBuffer layer(std::max<std::int64_t>(prompt.size(1), 4) * sizeof(float));
      ops::fp8_scales(ctx.stream, prompt, kind_, ops::Fp8ScaleScope::sequence,
                      DeviceView<float, 2>{device_ptr<float>(layer), {1, prompt.size(1)}, {0, 1}});
      for (int s = 0; s < ctx.heads; ++s)
        rt::copy_device_to_device(device_ptr<float>(out) + s, layer.data(), sizeof(float),
                                  ctx.stream);
      rt::synchronize(ctx.stream);  // `layer` is freed below
    } else {
      for (int s = 0; s < ctx.heads; ++s)
        ops::fp8_scales(ctx.stream, rows.head_rows<const f16>(s, 0, counts[s]), kind_,
                        ops::Fp8ScaleScope::head,
                        DeviceView<float, 2>{device_ptr<float>(out) + s, {1, 1}, {1, 1}});
    }
    return out;
  }
  template <MemorySpace Space>
  ops::Fp8Cache<Space> description(const std::uint8_t* kc, const std::uint8_t* vc, const float* ks,
                                   const float* vs, const std::int32_t* lengths, int heads) const {
    ops::Fp8Cache<Space> c;
    c.kind = kind_;
    c.key_codes = {kc, key_codes_.head_stride<std::uint8_t>(), 0};
    c.value_codes = {vc, value_codes_.head_stride<std::uint8_t>(), 0};
    c.key_scale = View<const float, 2, Space>{ks, {heads, 1}, {1, 1}};
    c.value_scale = View<const float, 2, Space>{vs, {heads, 1}, {1, 1}};
    c.lengths = View<const std::int32_t, 2, Space>{lengths, {heads, 1}, {1, 1}};
    c.max_length = lengths_.max();
    return c;
  }

  ops::Fp8Kind kind_ = ops::Fp8Kind::e4m3;
  Fp8Scope scope_ = Fp8Scope::head;
  int computed_scales_ = 0;
  RowTable key_codes_, value_codes_;          // [S, capacity, D] fp8 bytes
  rt::DeviceBuffer key_scale_, value_scale_;  // [S] fp32
  HeadCounts lengths_;
};

}  // namespace kvc::cuda_cache
