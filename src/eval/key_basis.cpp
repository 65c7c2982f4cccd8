// Key bases for Loki and the Palu-style latent keys: calibration (kvc/ops/lowrank.hpp) and files.
#include "kvc/eval/key_basis.hpp"

#include <cmath>
#include <map>
#include <memory>
#include <mutex>

#include "kvc/eval/safetensors.hpp"
#include "kvc/ops/lowrank.hpp"

namespace kvc {
namespace {

constexpr const char* kFormat = "kvc-key-basis-v1";

int metadata_int(const SafetensorsFile& f, const std::filesystem::path& path, const char* key) {
  const auto it = f.metadata.find(key);
  KVC_CHECK(it != f.metadata.end(), "key basis ", path.string(), ": metadata '", key,
            "' is missing");
  return std::stoi(it->second);
}

}  // namespace

KeyBasis calibrate_loki(const KvDump& dump) {
  KVC_CHECK(dump.tokens >= 2, "calibrate loki: needs at least 2 tokens, the dump has ",
            dump.tokens);
  KeyBasis b;
  b.method = "loki";
  b.key_space = "postrope";
  b.layers = dump.layers;
  b.kv_heads = dump.kv_heads;
  b.head_dim = dump.head_dim;
  b.group_heads = 1;
  b.rank = dump.head_dim;
  const std::int64_t d = dump.head_dim;
  b.basis.resize(static_cast<std::size_t>(b.layers) * b.kv_heads * d * d);
  b.explained.resize(static_cast<std::size_t>(b.layers) * b.kv_heads * d);
  for (int l = 0; l < dump.layers; ++l)
    for (int h = 0; h < dump.kv_heads; ++h) {
      float* p = b.basis.data() + (static_cast<std::size_t>(l) * b.kv_heads + h) * d * d;
      float* e = b.explained.data() + (static_cast<std::size_t>(l) * b.kv_heads + h) * d;
      ops::principal_components(Cpu{}, dump.k(l).sub(h), make_view(p, {d, d}),
                                std::span<float>(e, static_cast<std::size_t>(d)));
    }
  return b;
}

KeyBasis calibrate_palu(const KvDump& dump, int group_heads, double ratio) {
  KVC_CHECK(group_heads >= 1 && dump.kv_heads % group_heads == 0,
            "calibrate palu: --group = ", group_heads,
            " must divide the dump's KV heads = ", dump.kv_heads);
  KVC_CHECK(ratio > 0 && ratio <= 1, "calibrate palu: --ratio = ", ratio, " must be in (0, 1]");
  KeyBasis b;
  b.method = "palu";
  b.key_space = "prerope";
  b.layers = dump.layers;
  b.kv_heads = dump.kv_heads;
  b.head_dim = dump.head_dim;
  b.group_heads = group_heads;
  const std::int64_t width = b.width(), tokens = dump.tokens;
  b.rank = std::max(1, static_cast<int>(std::lround(ratio * static_cast<double>(width))));
  KVC_CHECK(b.rank <= tokens, "calibrate palu: rank ", b.rank, " exceeds the dump's ", tokens,
            " tokens");
  const std::int64_t r = b.rank;
  b.basis.resize(static_cast<std::size_t>(b.layers) * b.groups() * width * r);
  b.explained.resize(static_cast<std::size_t>(b.layers) * b.groups() * r);
  std::vector<float> x(static_cast<std::size_t>(tokens * width));
  for (int l = 0; l < dump.layers; ++l) {
    const auto kp = dump.k_prerope(l, "calibrate palu (SVD of pre-RoPE keys)");  // [Hkv, T, D]
    for (int g = 0; g < b.groups(); ++g) {
      for (std::int64_t t = 0; t < tokens; ++t)
        for (int j = 0; j < group_heads; ++j)
          for (int c = 0; c < b.head_dim; ++c)
            x[t * width + j * b.head_dim + c] = kp(g * group_heads + j, t, c);
      const auto xv = make_view(static_cast<const float*>(x.data()), {tokens, width});
      float* p = b.basis.data() + (static_cast<std::size_t>(l) * b.groups() + g) * width * r;
      ops::right_singular_vectors(Cpu{}, xv, make_view(p, {width, r}));
      // Energy share of each kept direction: |x v_j|^2 / |x|^2.
      double total = 0;
      for (float v : x) total += double(v) * v;
      for (std::int64_t j = 0; j < r; ++j) {
        double energy = 0;
        for (std::int64_t t = 0; t < tokens; ++t) {
          double dot = 0;
          for (std::int64_t c = 0; c < width; ++c) dot += double(x[t * width + c]) * p[c * r + j];
          energy += dot * dot;
        }
        b.explained[(static_cast<std::size_t>(l) * b.groups() + g) * r + j] =
            total > 0 ? static_cast<float>(energy / total) : 0.0f;
      }
    }
  }
  return b;
}

void write_key_basis(const std::filesystem::path& path, const KeyBasis& b,
                     const std::string& source) {
  b.validate();
  write_safetensors(
      path,
      {{"basis", Array::from_float(b.basis, {b.layers, b.groups(), b.width(), b.rank}, DType::f32)},
       {"explained", Array::from_float(b.explained, {b.layers, b.groups(), b.rank}, DType::f32)}},
      {{"format", kFormat},
       {"method", b.method},
       {"key_space", b.key_space},
       {"kv_heads", std::to_string(b.kv_heads)},
       {"head_dim", std::to_string(b.head_dim)},
       {"group_heads", std::to_string(b.group_heads)},
       {"source", source}});
}

KeyBasis read_key_basis(const std::filesystem::path& path, const std::string& method) {
  const SafetensorsFile f = read_safetensors_file(path);
  const auto format = f.metadata.find("format");
  KVC_CHECK(format != f.metadata.end() && format->second == kFormat, "key basis ", path.string(),
            ": metadata 'format' must be '", kFormat, "' (written by `kvc calibrate ", method,
            "`)");
  const auto m = f.metadata.find("method");
  KVC_CHECK(m != f.metadata.end() && m->second == method, "key basis ", path.string(),
            ": written by `kvc calibrate ", m == f.metadata.end() ? "?" : m->second, "`, but ",
            method, " needs one from `kvc calibrate ", method, "`");
  KeyBasis b;
  b.method = method;
  const auto space = f.metadata.find("key_space");
  b.key_space = space == f.metadata.end() ? "" : space->second;
  b.kv_heads = metadata_int(f, path, "kv_heads");
  b.head_dim = metadata_int(f, path, "head_dim");
  b.group_heads = metadata_int(f, path, "group_heads");
  const auto basis = f.tensors.find("basis");
  const auto explained = f.tensors.find("explained");
  KVC_CHECK(basis != f.tensors.end() && basis->second.rank() == 4 && explained != f.tensors.end() &&
                explained->second.rank() == 3,
            "key basis ", path.string(),
            ": needs tensors 'basis' [L, Hkv/g, g*D, r] and 'explained' [L, Hkv/g, r]");
  b.layers = static_cast<int>(basis->second.shape[0]);
  b.rank = static_cast<int>(basis->second.shape[3]);
  KVC_CHECK(basis->second.shape[1] * b.group_heads == b.kv_heads &&
                basis->second.shape[2] == static_cast<std::int64_t>(b.group_heads) * b.head_dim,
            "key basis ", path.string(),
            ": 'basis' shape disagrees with kv_heads/head_dim/"
            "group_heads in the metadata");
  b.basis = basis->second.to_float();
  b.explained = explained->second.to_float();
  b.validate();
  return b;
}

const KeyBasis* shared_key_basis(const std::filesystem::path& path, const std::string& method) {
  static std::mutex mutex;
  static std::map<std::string, std::unique_ptr<const KeyBasis>> table;
  const std::string key =
      method + ":" + std::filesystem::absolute(path).lexically_normal().string();
  std::lock_guard lock(mutex);
  auto& slot = table[key];
  if (!slot) {
    try {
      slot = std::make_unique<const KeyBasis>(read_key_basis(path, method));
    } catch (...) {
      table.erase(key);
      throw;
    }
  }
  return slot.get();
}

}  // namespace kvc
