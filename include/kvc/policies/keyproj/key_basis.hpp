// kvc/policies/keyproj/key_basis.hpp: a per-layer, per-head-group linear basis of key space,
// learned offline from calibration keys, shared by Loki (PCA directions) and the Palu-style latent
// keys (right singular vectors). Files: kvc/eval/key_basis.hpp (`kvc calibrate loki|palu`).
//
//   const kvc::KeyBasis* b = kvc::shared_key_basis("loki.safetensors", "loki");
//   const float* p = b->at(layer, group);   // [width, rank], column j = direction j
//
// Ownership as for CQ codebooks: policies are trivially copyable and hold a raw pointer to an
// immutable KeyBasis that outlives every cache using it (the registry keeps one per file for the
// process lifetime).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "kvc/core/error.hpp"

namespace kvc {

struct KeyBasis {
  std::string method;     // "loki" | "palu": which calibration wrote it
  std::string key_space;  // "postrope" (loki: what decode scores) | "prerope" (palu)
  int layers = 0;
  int kv_heads = 0;
  int head_dim = 0;
  int group_heads = 1;       // KV heads per group (loki 1; palu g); width = group_heads * head_dim
  int rank = 0;              // columns stored per group
  std::vector<float> basis;  // [L, Hkv / g, width, rank]
  std::vector<float> explained;  // [L, Hkv / g, rank] share of variance (loki) / energy (palu)

  int groups() const { return kv_heads / group_heads; }
  int width() const { return group_heads * head_dim; }
  const float* at(int layer, int group) const {
    return basis.data() + (static_cast<std::size_t>(layer) * groups() + group) * width() *
                              static_cast<std::size_t>(rank);
  }
  const float* explained_at(int layer, int group) const {
    return explained.data() + (static_cast<std::size_t>(layer) * groups() + group) * rank;
  }
  void validate() const {
    KVC_CHECK(layers >= 1 && kv_heads >= 1 && head_dim >= 1 && group_heads >= 1 &&
                  kv_heads % group_heads == 0 && rank >= 1 && rank <= width(),
              "key basis: layers = ", layers, ", kv_heads = ", kv_heads, ", head_dim = ", head_dim,
              ", group_heads = ", group_heads, ", rank = ", rank,
              " must be positive with kv_heads a multiple of group_heads and rank <= group_heads * "
              "head_dim");
    const std::size_t n = static_cast<std::size_t>(layers) * groups();
    KVC_CHECK(basis.size() == n * width() * rank && explained.size() == n * rank,
              "key basis: holds ", basis.size(), " + ", explained.size(),
              " floats; expected L*(Hkv/g)*width*rank = ", n * width() * rank, " + ", n * rank);
  }
  // Checks that the basis fits a cache of this shape.
  void check_shape(const char* who, int cache_layers, int cache_kv_heads,
                   int cache_head_dim) const {
    KVC_CHECK(layers == cache_layers && kv_heads == cache_kv_heads && head_dim == cache_head_dim,
              who, ": the basis was calibrated for ", layers, " layers x ", kv_heads,
              " KV heads x head_dim ", head_dim, "; this cache has ", cache_layers, " x ",
              cache_kv_heads, " x ", cache_head_dim);
  }
};

}  // namespace kvc
