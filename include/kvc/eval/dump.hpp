// kvc/eval/dump.hpp: a KV dump (queries, keys, values of every layer of one sequence) loaded into
// float, validated, with per-layer views.
//
//   kvc::KvDump dump = kvc::load_dump("tests/data/seq0");   // or "dump.safetensors"
//   kvc::HostView<const float, 3> k = dump.k(0);             // [Hkv, T, D] of layer 0
//   auto kp = dump.k_prerope(0, "reindexed positions");      // throws if the dump has none
//
// Two on-disk forms (docs/formats.md, "KV dump formats", is the full description):
//   directory: q.npy k.npy v.npy [k_prerope.npy] [scores.npy] [meta.json]
//   file:      one .safetensors with tensors q, k, v [, k_prerope] [, scores] and string metadata
// q is [L, Hq, T, D]; k, v, k_prerope are [L, Hkv, T, D]; scores is [L, Hkv, T]. Float dtypes only
// (f16, bf16, f32, f64). Metadata: rope_theta (default 10000), rope_convention (default
// "rotate_half"), model (default ""). load_dump() and check_dump() reject inconsistent shapes,
// Hq % Hkv != 0, T == 0, odd D and any NaN/Inf (naming tensor, layer, head, token, channel).
#pragma once

#include <filesystem>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "kvc/core/dtype.hpp"
#include "kvc/core/view.hpp"
#include "kvc/eval/json.hpp"

namespace kvc {

struct KvDump {
  int layers = 0;    // L
  int q_heads = 0;   // Hq
  int kv_heads = 0;  // Hkv; query head h uses KV head h / (Hq / Hkv)
  int tokens = 0;    // T
  int head_dim = 0;  // D

  std::vector<float> q_all;          // [L, Hq, T, D], post-RoPE
  std::vector<float> k_all;          // [L, Hkv, T, D], post-RoPE
  std::vector<float> v_all;          // [L, Hkv, T, D]
  std::vector<float> k_prerope_all;  // [L, Hkv, T, D], or empty when the dump has none
  std::vector<float> scores_all;     // [L, Hkv, T], or empty when the dump has none

  double rope_theta = 10000.0;
  std::string rope_convention = "rotate_half";  // "rotate_half" | "interleaved"
  std::string model;
  std::filesystem::path source;              // the directory or .safetensors file it came from
  json::Value meta = json::Value::object();  // meta.json, or the safetensors metadata (strings)
  std::vector<std::pair<std::string, DType>> stored_dtypes;  // each tensor's dtype on disk

  int group_size() const { return kv_heads > 0 ? q_heads / kv_heads : 0; }  // Hq / Hkv
  bool has_k_prerope() const { return !k_prerope_all.empty(); }
  bool has_scores() const { return !scores_all.empty(); }

  HostView<const float, 3> q(int layer) const;  // [Hq, T, D]
  HostView<const float, 3> k(int layer) const;  // [Hkv, T, D]
  HostView<const float, 3> v(int layer) const;  // [Hkv, T, D]
  // [Hkv, T, D]; throws "dump <source> has no k_prerope (needed by <purpose>)" when absent.
  HostView<const float, 3> k_prerope(int layer, std::string_view purpose) const;
  // [Hkv, T]; throws "dump <source> has no scores (needed by <purpose>)" when absent.
  HostView<const float, 2> scores(int layer, std::string_view purpose) const;
};

// Loads a dump directory or .safetensors file and runs check_dump() on it.
KvDump load_dump(const std::filesystem::path& path);

// Throws kvc::Error unless the sizes agree with the dimensions (Hq % Hkv == 0, T > 0, D even,
// every dimension > 0), rope_theta > 0, rope_convention is known, and every value is finite.
void check_dump(const KvDump& dump);

// Writes `dump` as a directory (any path not ending in .safetensors; created if missing) or as one
// .safetensors file, tensors stored in `dtype` (f16, bf16 or f32; bf16 only in .safetensors).
// rope_theta, rope_convention and model are written into meta.json / the metadata, on top of the
// other members of dump.meta. Checks sizes, not finiteness (tests write broken dumps with it).
void save_dump(const std::filesystem::path& path, const KvDump& dump, DType dtype = DType::f16);

}  // namespace kvc
