// KV dump loading, validation and saving (see kvc/eval/dump.hpp and docs/formats.md).
#include "kvc/eval/dump.hpp"

#include <climits>
#include <cmath>
#include <fstream>
#include <iterator>
#include <map>

#include "kvc/core/error.hpp"
#include "kvc/eval/array.hpp"
#include "kvc/eval/npy.hpp"
#include "kvc/eval/safetensors.hpp"
#include "kvc/ops/rope.hpp"

namespace kvc {
namespace {

namespace fs = std::filesystem;

constexpr const char* kDirectoryContents =
    "required: q.npy, k.npy, v.npy; optional: k_prerope.npy, scores.npy, meta.json";

// The tensors of a dump before conversion, and how messages name each one ("k.npy" or "k").
struct RawDump {
  std::map<std::string, Array> tensors;  // q, k, v [, k_prerope] [, scores]
  bool directory = true;
  std::string label(const std::string& name) const { return directory ? name + ".npy" : name; }
};

// How messages name a dump: its path, or "(in memory)" for one built in code.
std::string describe(const fs::path& source) {
  return source.empty() ? std::string("(in memory)") : source.string();
}

bool is_safetensors_path(const fs::path& path) { return path.extension() == ".safetensors"; }

RawDump read_directory(const fs::path& dir) {
  RawDump raw;
  for (const char* name : {"q", "k", "v", "k_prerope", "scores"}) {
    const fs::path file = dir / (std::string(name) + ".npy");
    const bool required = name[0] != 's' && std::string_view(name) != "k_prerope";
    if (!fs::exists(file)) {
      KVC_CHECK(!required, "dump directory ", dir.string(), " has no ", name, ".npy (",
                kDirectoryContents, ")");
      continue;
    }
    raw.tensors.emplace(name, read_npy(file));
  }
  return raw;
}

int dimension(std::int64_t size, const fs::path& source, const std::string& what) {
  KVC_CHECK(size <= INT_MAX, "dump ", source.string(), ": ", what, " = ", size,
            " is too large (max ", INT_MAX, ")");
  return static_cast<int>(size);
}

// Shapes: rank, agreement between q, k, v, k_prerope, scores. Dimensions are filled into `dump`.
void check_raw_shapes(const RawDump& raw, const fs::path& source, KvDump& dump) {
  const std::string where = "dump " + source.string() + ": ";
  for (const auto& [name, array] : raw.tensors) {
    const bool is_scores = name == "scores";
    const int rank = is_scores ? 3 : 4;
    KVC_CHECK(array.rank() == rank, where, raw.label(name), " has rank ", array.rank(), " (shape ",
              shape_string(array.shape), "), expected rank ", rank, ": ",
              is_scores ? "[layers, kv_heads, tokens]" : "[layers, heads, tokens, head_dim]");
    KVC_CHECK(array.dtype == DType::f16 || array.dtype == DType::bf16 ||
                  array.dtype == DType::f32 || array.dtype == DType::f64,
              where, raw.label(name), " has dtype ", dtype_name(array.dtype),
              "; dump tensors must be f16, bf16, f32 or f64");
  }
  const Array& q = raw.tensors.at("q");
  const Array& k = raw.tensors.at("k");
  const auto both = [&](const std::string& a, const std::string& b) {
    return raw.label(a) + " " + shape_string(raw.tensors.at(a).shape) + " and " + raw.label(b) +
           " " + shape_string(raw.tensors.at(b).shape);
  };
  KVC_CHECK(raw.tensors.at("v").shape == k.shape, where, both("k", "v"),
            " must have the same shape [layers, kv_heads, tokens, head_dim]");
  if (raw.tensors.count("k_prerope"))
    KVC_CHECK(raw.tensors.at("k_prerope").shape == k.shape, where, both("k", "k_prerope"),
              " must have the same shape [layers, kv_heads, tokens, head_dim]");
  KVC_CHECK(q.shape[0] == k.shape[0] && q.shape[2] == k.shape[2] && q.shape[3] == k.shape[3], where,
            both("q", "k"),
            " must agree on layers, tokens and head_dim (q is [L, Hq, T, D], k is "
            "[L, Hkv, T, D])");
  dump.layers = dimension(q.shape[0], source, "layers");
  dump.q_heads = dimension(q.shape[1], source, "q_heads");
  dump.kv_heads = dimension(k.shape[1], source, "kv_heads");
  dump.tokens = dimension(q.shape[2], source, "tokens");
  dump.head_dim = dimension(q.shape[3], source, "head_dim");
  if (raw.tensors.count("scores")) {
    const std::vector<std::int64_t> expected = {k.shape[0], k.shape[1], k.shape[2]};
    KVC_CHECK(raw.tensors.at("scores").shape == expected, where, raw.label("scores"), " ",
              shape_string(raw.tensors.at("scores").shape), " must be [layers, kv_heads, tokens] ",
              "= ", shape_string(expected), " to match ", raw.label("k"), " ",
              shape_string(k.shape));
  }
}

const json::Value* typed_member(const json::Value& meta, const char* key, json::Type type,
                                const std::string& where) {
  const json::Value* v = meta.find(key);
  if (v == nullptr) return nullptr;
  KVC_CHECK(v->type() == type, where, "\"", key, "\" is a JSON ", json::type_name(v->type()),
            ", expected a ", json::type_name(type));
  return v;
}

void read_meta_json(const fs::path& dir, KvDump& dump) {
  const fs::path file = dir / "meta.json";
  if (!fs::exists(file)) return;
  std::ifstream in(file, std::ios::binary);
  KVC_CHECK(in.good(), "cannot open ", file.string(), " for reading");
  const std::string text{std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
  try {
    dump.meta = json::parse(text);
  } catch (const Error& e) {
    KVC_FAIL(file.string(), ": ", e.message());
  }
  const std::string where = file.string() + ": ";
  KVC_CHECK(dump.meta.is_object(), where, "expected a JSON object, got a ",
            json::type_name(dump.meta.type()));
  if (const auto* v = typed_member(dump.meta, "rope_theta", json::Type::number, where))
    dump.rope_theta = v->as_number();
  if (const auto* v = typed_member(dump.meta, "rope_convention", json::Type::string, where))
    dump.rope_convention = v->as_string();
  if (const auto* v = typed_member(dump.meta, "model", json::Type::string, where))
    dump.model = v->as_string();
}

void read_metadata_strings(const fs::path& file, const std::map<std::string, std::string>& metadata,
                           KvDump& dump) {
  dump.meta = json::Value::object();
  for (const auto& [key, value] : metadata) dump.meta.set(key, value);
  if (auto it = metadata.find("rope_theta"); it != metadata.end()) {
    json::Value theta;
    try {
      theta = json::parse(it->second);
    } catch (const Error&) {
    }
    KVC_CHECK(theta.is_number(), file.string(), ": metadata rope_theta = \"", it->second,
              "\" is not a number");
    dump.rope_theta = theta.as_number();
  }
  if (auto it = metadata.find("rope_convention"); it != metadata.end())
    dump.rope_convention = it->second;
  if (auto it = metadata.find("model"); it != metadata.end()) dump.model = it->second;
}

// First non-finite element of a [L, H, T, C] (or [L, H, T] when channels == 0) tensor.
void check_finite(const std::vector<float>& data, const char* name, const KvDump& dump, int heads,
                  int channels) {
  for (std::size_t i = 0; i < data.size(); ++i) {
    if (std::isfinite(data[i])) continue;
    std::size_t rest = i;
    const std::size_t c = channels > 0 ? rest % static_cast<std::size_t>(channels) : 0;
    if (channels > 0) rest /= static_cast<std::size_t>(channels);
    const std::size_t t = rest % static_cast<std::size_t>(dump.tokens);
    rest /= static_cast<std::size_t>(dump.tokens);
    const std::size_t h = rest % static_cast<std::size_t>(heads);
    const std::size_t l = rest / static_cast<std::size_t>(heads);
    if (channels > 0)
      KVC_FAIL("dump ", describe(dump.source), ": ", name, " holds ", data[i], " at layer ", l,
               ", head ", h, ", token ", t, ", channel ", c, " (values must be finite)");
    KVC_FAIL("dump ", describe(dump.source), ": ", name, " holds ", data[i], " at layer ", l,
             ", head ", h, ", token ", t, " (values must be finite)");
  }
}

std::size_t layer_size(const KvDump& d, int heads) {
  return static_cast<std::size_t>(heads) * static_cast<std::size_t>(d.tokens) *
         static_cast<std::size_t>(d.head_dim);
}

HostView<const float, 3> layer_view(const KvDump& d, const std::vector<float>& all, int heads,
                                    int layer, const char* name) {
  KVC_CHECK(layer >= 0 && layer < d.layers, "dump ", describe(d.source), ": ", name,
            "(layer = ", layer, ") out of range [0, ", d.layers, ")");
  return make_view(all.data() + static_cast<std::size_t>(layer) * layer_size(d, heads),
                   {std::int64_t{heads}, std::int64_t{d.tokens}, std::int64_t{d.head_dim}});
}

void check_sizes(const KvDump& d) {
  const std::string where = "dump " + describe(d.source) + ": ";
  KVC_CHECK(d.layers > 0 && d.q_heads > 0 && d.kv_heads > 0 && d.head_dim > 0, where,
            "layers, q_heads, kv_heads and head_dim must be > 0, got L = ", d.layers,
            ", Hq = ", d.q_heads, ", Hkv = ", d.kv_heads, ", D = ", d.head_dim);
  KVC_CHECK(d.tokens > 0, where, "T = 0 tokens; a dump needs at least one token");
  KVC_CHECK(d.q_heads % d.kv_heads == 0, where, "q_heads = ", d.q_heads,
            " is not a multiple of kv_heads = ", d.kv_heads,
            " (grouped-query attention needs Hq % Hkv == 0)");
  KVC_CHECK(d.head_dim % 2 == 0, where, "head_dim = ", d.head_dim,
            " is odd; RoPE pairs channels, so head_dim must be even");
  const std::size_t kv = static_cast<std::size_t>(d.layers) * layer_size(d, d.kv_heads);
  const auto size_check = [&](const std::vector<float>& v, std::size_t expected, const char* name,
                              bool optional) {
    KVC_CHECK(v.size() == expected || (optional && v.empty()), where, name, " holds ", v.size(),
              " values, expected ", expected, optional ? " (or none)" : "", " for L = ", d.layers,
              ", Hq = ", d.q_heads, ", Hkv = ", d.kv_heads, ", T = ", d.tokens,
              ", D = ", d.head_dim);
  };
  size_check(d.q_all, static_cast<std::size_t>(d.layers) * layer_size(d, d.q_heads), "q", false);
  size_check(d.k_all, kv, "k", false);
  size_check(d.v_all, kv, "v", false);
  size_check(d.k_prerope_all, kv, "k_prerope", true);
  size_check(d.scores_all,
             static_cast<std::size_t>(d.layers) * static_cast<std::size_t>(d.kv_heads) *
                 static_cast<std::size_t>(d.tokens),
             "scores", true);
}

}  // namespace

HostView<const float, 3> KvDump::q(int layer) const {
  return layer_view(*this, q_all, q_heads, layer, "q");
}
HostView<const float, 3> KvDump::k(int layer) const {
  return layer_view(*this, k_all, kv_heads, layer, "k");
}
HostView<const float, 3> KvDump::v(int layer) const {
  return layer_view(*this, v_all, kv_heads, layer, "v");
}
HostView<const float, 3> KvDump::k_prerope(int layer, std::string_view purpose) const {
  KVC_CHECK(has_k_prerope(), "dump ", describe(source), " has no k_prerope (needed by ", purpose,
            ")");
  return layer_view(*this, k_prerope_all, kv_heads, layer, "k_prerope");
}
HostView<const float, 2> KvDump::scores(int layer, std::string_view purpose) const {
  KVC_CHECK(has_scores(), "dump ", describe(source), " has no scores (needed by ", purpose, ")");
  KVC_CHECK(layer >= 0 && layer < layers, "dump ", describe(source), ": scores(layer = ", layer,
            ") out of range [0, ", layers, ")");
  const std::size_t per_layer =
      static_cast<std::size_t>(kv_heads) * static_cast<std::size_t>(tokens);
  return make_view(scores_all.data() + static_cast<std::size_t>(layer) * per_layer,
                   {std::int64_t{kv_heads}, std::int64_t{tokens}});
}

void check_dump(const KvDump& dump) {
  check_sizes(dump);
  const std::string where = "dump " + describe(dump.source) + ": ";
  KVC_CHECK(std::isfinite(dump.rope_theta) && dump.rope_theta > 0, where,
            "rope_theta = ", dump.rope_theta, " must be a finite number > 0");
  try {
    ops::parse_rope_convention(dump.rope_convention);
  } catch (const Error& e) {
    KVC_FAIL(where, e.message());
  }
  check_finite(dump.q_all, "q", dump, dump.q_heads, dump.head_dim);
  check_finite(dump.k_all, "k", dump, dump.kv_heads, dump.head_dim);
  check_finite(dump.v_all, "v", dump, dump.kv_heads, dump.head_dim);
  check_finite(dump.k_prerope_all, "k_prerope", dump, dump.kv_heads, dump.head_dim);
  check_finite(dump.scores_all, "scores", dump, dump.kv_heads, 0);
}

KvDump load_dump(const fs::path& path) {
  KvDump dump;
  dump.source = path;
  RawDump raw;
  if (fs::is_directory(path)) {
    raw = read_directory(path);
    read_meta_json(path, dump);
  } else {
    KVC_CHECK(fs::exists(path), "dump path ", path.string(),
              " does not exist (expected a directory with q.npy, k.npy, v.npy or a .safetensors "
              "file)");
    KVC_CHECK(is_safetensors_path(path), "dump path ", path.string(),
              " is neither a directory nor a .safetensors file");
    SafetensorsFile file = read_safetensors_file(path);
    raw.directory = false;
    for (const char* name : {"q", "k", "v", "k_prerope", "scores"}) {
      auto it = file.tensors.find(name);
      const bool required = name[0] != 's' && std::string_view(name) != "k_prerope";
      if (it == file.tensors.end()) {
        KVC_CHECK(!required, "dump ", path.string(), " has no tensor \"", name,
                  "\" (required: q, k, v; optional: k_prerope, scores)");
        continue;
      }
      raw.tensors.emplace(name, std::move(it->second));
    }
    read_metadata_strings(path, file.metadata, dump);
  }
  check_raw_shapes(raw, path, dump);
  for (const auto& [name, array] : raw.tensors) dump.stored_dtypes.emplace_back(name, array.dtype);
  dump.q_all = raw.tensors.at("q").to_float();
  dump.k_all = raw.tensors.at("k").to_float();
  dump.v_all = raw.tensors.at("v").to_float();
  if (auto it = raw.tensors.find("k_prerope"); it != raw.tensors.end())
    dump.k_prerope_all = it->second.to_float();
  if (auto it = raw.tensors.find("scores"); it != raw.tensors.end())
    dump.scores_all = it->second.to_float();
  check_dump(dump);
  return dump;
}

void save_dump(const fs::path& path, const KvDump& dump, DType dtype) {
  KVC_CHECK(dtype == DType::f16 || dtype == DType::bf16 || dtype == DType::f32, "save_dump: dtype ",
            dtype_name(dtype), " not allowed (allowed: f16, bf16, f32)");
  check_sizes(dump);

  const std::int64_t l = dump.layers, hq = dump.q_heads, hkv = dump.kv_heads, t = dump.tokens,
                     d = dump.head_dim;
  std::vector<std::pair<std::string, Array>> tensors;
  tensors.emplace_back("q", Array::from_float(dump.q_all, {l, hq, t, d}, dtype));
  tensors.emplace_back("k", Array::from_float(dump.k_all, {l, hkv, t, d}, dtype));
  tensors.emplace_back("v", Array::from_float(dump.v_all, {l, hkv, t, d}, dtype));
  if (dump.has_k_prerope())
    tensors.emplace_back("k_prerope", Array::from_float(dump.k_prerope_all, {l, hkv, t, d}, dtype));
  if (dump.has_scores())
    tensors.emplace_back("scores", Array::from_float(dump.scores_all, {l, hkv, t}, dtype));

  json::Value meta = dump.meta.is_object() ? dump.meta : json::Value::object();
  meta.set("rope_theta", dump.rope_theta);
  meta.set("rope_convention", dump.rope_convention);
  meta.set("model", dump.model);

  if (is_safetensors_path(path)) {
    std::map<std::string, std::string> metadata;
    for (const auto& [key, value] : meta.as_object())
      metadata[key] = value.is_string() ? value.as_string() : json::dump(value);
    write_safetensors(path, tensors, metadata);
    return;
  }
  KVC_CHECK(dtype != DType::bf16, "save_dump: ", path.string(),
            " is a directory of .npy files, which cannot hold bf16 (use f16 or f32, or a "
            ".safetensors path)");
  fs::create_directories(path);
  for (const auto& [name, array] : tensors) write_npy(path / (name + ".npy"), array);
  std::ofstream out(path / "meta.json", std::ios::binary | std::ios::trunc);
  KVC_CHECK(out.good(), "cannot open ", (path / "meta.json").string(), " for writing");
  out << json::dump(meta, 1) << '\n';
  out.close();
  KVC_CHECK(!out.fail(), "write error on ", (path / "meta.json").string());
}

}  // namespace kvc
