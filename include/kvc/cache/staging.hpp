// kvc/cache/staging.hpp: host-side helpers both KVCache backends use while a layer's prompt is
// staged before compress(): shape checks of [H, T, D] inputs and growing a staged [H, T, D]
// buffer along T.
//
//   kvc::check_head_shape("prefill keys", k, shape.kv_heads, shape.head_dim);
//   kvc::append_heads(staged_keys, staged_tokens, k);  // [H, T_old, D] -> [H, T_old + T, D]
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "kvc/core/error.hpp"
#include "kvc/core/view.hpp"

namespace kvc {

// Requires x to be [heads, T, head_dim] (any T), naming `what` and both shapes otherwise.
template <class T>
void check_head_shape(const char* what, HostView<const T, 3> x, int heads, int head_dim) {
  KVC_CHECK(x.size(0) == heads && x.size(2) == head_dim, what, " must be [", heads, ", T, ",
            head_dim, "], got [", x.size(0), ", ", x.size(1), ", ", x.size(2), "]");
}

// Requires 0 <= layer < layers.
inline void check_layer_index(int layer, int layers) {
  KVC_CHECK(layer >= 0 && layer < layers, "layer ", layer, " out of range [0, ", layers, ")");
}

// Layer `layer` of a cache (either backend) for a decode operation named `what`: a layer that was
// never compressed is compressed now when it holds no staged prompt (an empty cache decodes
// from nothing); one with a staged prompt is an error, since only the caller knows when the
// prompt is complete. `compress(layer)` is the cache's own.
template <class LayerData, class Compress>
LayerData& ready_decode_layer(std::vector<LayerData>& layers, int layer, const char* what,
                              Compress&& compress) {
  check_layer_index(layer, static_cast<int>(layers.size()));
  LayerData& data = layers[static_cast<std::size_t>(layer)];
  if (!data.compressed) {
    KVC_CHECK(data.staged_tokens == 0, what, "(layer ", layer,
              "): the layer has prefilled tokens that were not compressed; call compress() first");
    compress(layer);
  }
  return data;
}

// The read-only form: the layer must already be compressed.
template <class LayerData>
const LayerData& ready_decode_layer(const std::vector<LayerData>& layers, int layer,
                                    const char* what) {
  check_layer_index(layer, static_cast<int>(layers.size()));
  const LayerData& data = layers[static_cast<std::size_t>(layer)];
  KVC_CHECK(data.compressed, what, "(layer ", layer, "): the layer holds no compressed tokens yet");
  return data;
}

// Appends x [H, T, D] to a staged [H, T_old, D] buffer, giving [H, T_old + T, D].
inline void append_heads(std::vector<float>& buffer, std::int64_t old_tokens,
                         HostView<const float, 3> x) {
  const std::int64_t heads = x.size(0), tokens = x.size(1), d = x.size(2);
  std::vector<float> merged(static_cast<std::size_t>(heads * (old_tokens + tokens) * d));
  for (std::int64_t h = 0; h < heads; ++h) {
    for (std::int64_t t = 0; t < old_tokens; ++t)
      for (std::int64_t c = 0; c < d; ++c)
        merged[(h * (old_tokens + tokens) + t) * d + c] = buffer[(h * old_tokens + t) * d + c];
    for (std::int64_t t = 0; t < tokens; ++t)
      for (std::int64_t c = 0; c < d; ++c)
        merged[(h * (old_tokens + tokens) + old_tokens + t) * d + c] = x(h, t, c);
  }
  buffer.swap(merged);
}

}  // namespace kvc
