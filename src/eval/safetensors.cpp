// .safetensors reader and writer (see kvc/eval/safetensors.hpp). Format reference:
// https://github.com/huggingface/safetensors (README, "Format").
#include "kvc/eval/safetensors.hpp"

#include <algorithm>
#include <cstring>
#include <fstream>
#include <set>
#include <string_view>

#include "kvc/core/error.hpp"
#include "kvc/eval/json.hpp"

namespace kvc {
namespace {

constexpr std::uint64_t kMaxHeaderBytes = 100'000'000;  // the reference implementation's limit
constexpr std::string_view kMetadataKey = "__metadata__";

struct DtypeName {
  std::string_view name;
  DType dtype;
};
constexpr DtypeName kDtypes[] = {{"F16", DType::f16},          {"BF16", DType::bf16},
                                 {"F32", DType::f32},          {"F64", DType::f64},
                                 {"I32", DType::i32},          {"U8", DType::u8},
                                 {"F8_E4M3", DType::fp8_e4m3}, {"F8_E5M2", DType::fp8_e5m2}};
constexpr std::string_view kDtypeList = "F16, BF16, F32, F64, I32, U8, F8_E4M3, F8_E5M2";

std::string_view safetensors_dtype_name(DType dtype) {
  for (const auto& entry : kDtypes)
    if (entry.dtype == dtype) return entry.name;
  KVC_FAIL("dtype ", dtype_name(dtype), " has no safetensors name");
}

struct Entry {
  std::string name;
  Array array;  // bytes filled after validation
  std::uint64_t begin = 0, end = 0;
};

// Reads one tensor entry of the header; `buffer_size` is the size of the data section.
Entry parse_entry(const std::filesystem::path& path, const std::string& name,
                  const json::Value& info, std::uint64_t buffer_size) {
  const std::string where = path.string() + ": tensor \"" + name + "\"";
  KVC_CHECK(info.is_object(), where, ": header entry is a JSON ", json::type_name(info.type()),
            ", expected an object with dtype, shape, data_offsets");
  Entry e;
  e.name = name;
  const json::Value* dtype = info.find("dtype");
  const json::Value* shape = info.find("shape");
  const json::Value* offsets = info.find("data_offsets");
  KVC_CHECK(dtype && shape && offsets, where, ": header entry lacks ",
            !dtype   ? "\"dtype\""
            : !shape ? "\"shape\""
                     : "\"data_offsets\"",
            " (needs dtype, shape, data_offsets)");
  KVC_CHECK(dtype->is_string(), where, ": dtype is a JSON ", json::type_name(dtype->type()),
            ", expected a string (one of ", kDtypeList, ")");
  bool known = false;
  for (const auto& entry : kDtypes)
    if (dtype->as_string() == entry.name) e.array.dtype = entry.dtype, known = true;
  KVC_CHECK(known, where, ": unsupported dtype \"", dtype->as_string(), "\" (allowed: ", kDtypeList,
            ")");

  const auto non_negative_integer = [&](const json::Value& v, const char* what) {
    KVC_CHECK(v.is_number(), where, ": ", what, " holds a JSON ", json::type_name(v.type()),
              ", expected a non-negative integer");
    const double x = v.as_number();
    KVC_CHECK(x >= 0 && x == static_cast<double>(static_cast<std::uint64_t>(x)) && x <= 0x1p53,
              where, ": ", what, " holds ", x, ", expected a non-negative integer below 2^53");
    return static_cast<std::uint64_t>(x);
  };
  KVC_CHECK(shape->is_array(), where, ": shape is a JSON ", json::type_name(shape->type()),
            ", expected an array of non-negative integers");
  for (const json::Value& s : shape->as_array())
    e.array.shape.push_back(static_cast<std::int64_t>(non_negative_integer(s, "shape")));
  KVC_CHECK(offsets->is_array() && offsets->size() == 2, where,
            ": data_offsets must be an array [begin, end], got ", json::dump(*offsets));
  e.begin = non_negative_integer(offsets->at(std::size_t{0}), "data_offsets");
  e.end = non_negative_integer(offsets->at(std::size_t{1}), "data_offsets");
  KVC_CHECK(e.begin <= e.end && e.end <= buffer_size, where, ": data_offsets [", e.begin, ", ",
            e.end, "] out of range: need begin <= end <= ", buffer_size,
            " (the data section's size; the file may be truncated)");
  std::int64_t expected = 0;
  try {
    expected = e.array.byte_size();
  } catch (const Error& error) {
    KVC_FAIL(where, ": ", error.message());
  }
  KVC_CHECK(e.end - e.begin == static_cast<std::uint64_t>(expected), where, ": data_offsets [",
            e.begin, ", ", e.end, "] span ", e.end - e.begin, " bytes, but shape ",
            shape_string(e.array.shape), " of ", dtype->as_string(), " needs ", expected);
  return e;
}

}  // namespace

SafetensorsFile read_safetensors_file(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  KVC_CHECK(in.good(), "cannot open ", path.string(), " for reading");
  in.seekg(0, std::ios::end);
  const std::streamoff file_size_signed = in.tellg();
  KVC_CHECK(file_size_signed >= 0, "cannot determine the size of ", path.string());
  const auto file_size = static_cast<std::uint64_t>(file_size_signed);
  in.seekg(0, std::ios::beg);
  KVC_CHECK(file_size >= 8, path.string(), ": not a safetensors file: ", file_size,
            " bytes, shorter than the 8-byte header size");
  unsigned char size_bytes[8];
  in.read(reinterpret_cast<char*>(size_bytes), 8);
  std::uint64_t header_size = 0;
  for (int i = 7; i >= 0; --i) header_size = header_size << 8 | size_bytes[i];
  KVC_CHECK(header_size <= kMaxHeaderBytes && header_size <= file_size - 8, path.string(),
            ": corrupted safetensors file: header size ", header_size, " exceeds ",
            header_size > kMaxHeaderBytes ? "the 100 MB limit" : "the file (",
            header_size > kMaxHeaderBytes
                ? std::string()
                : std::to_string(file_size - 8) + " bytes after the size field)");
  std::string header_text(static_cast<std::size_t>(header_size), '\0');
  in.read(header_text.data(), static_cast<std::streamsize>(header_size));
  KVC_CHECK(in.good(), "read error on ", path.string());
  KVC_CHECK(!header_text.empty() && header_text[0] == '{', path.string(),
            ": corrupted safetensors file: the header does not start with '{'");
  json::Value header;
  try {
    header = json::parse(header_text);
  } catch (const Error& e) {
    KVC_FAIL(path.string(), ": corrupted safetensors header: ", e.message());
  }
  KVC_CHECK(header.is_object(), path.string(), ": safetensors header is not a JSON object");

  const std::uint64_t buffer_size = file_size - 8 - header_size;
  SafetensorsFile out;
  std::vector<Entry> entries;
  for (const auto& [name, info] : header.as_object()) {
    if (name == kMetadataKey) {
      KVC_CHECK(info.is_object(), path.string(), ": \"__metadata__\" is a JSON ",
                json::type_name(info.type()), ", expected an object of strings");
      for (const auto& [key, value] : info.as_object()) {
        KVC_CHECK(value.is_string(), path.string(), ": metadata \"", key, "\" is a JSON ",
                  json::type_name(value.type()), "; safetensors metadata values are strings");
        out.metadata[key] = value.as_string();
      }
      continue;
    }
    entries.push_back(parse_entry(path, name, info, buffer_size));
  }

  // Overlap check on the sorted intervals (empty tensors occupy no bytes).
  std::vector<const Entry*> by_begin;
  for (const Entry& e : entries)
    if (e.end > e.begin) by_begin.push_back(&e);
  std::sort(by_begin.begin(), by_begin.end(),
            [](const Entry* a, const Entry* b) { return a->begin < b->begin; });
  for (std::size_t i = 1; i < by_begin.size(); ++i) {
    const Entry& a = *by_begin[i - 1];
    const Entry& b = *by_begin[i];
    KVC_CHECK(a.end <= b.begin, path.string(), ": corrupted safetensors file: tensors \"", a.name,
              "\" [", a.begin, ", ", a.end, ") and \"", b.name, "\" [", b.begin, ", ", b.end,
              ") overlap");
  }

  const std::uint64_t data_start = 8 + header_size;
  for (Entry& e : entries) {
    e.array.bytes.resize(static_cast<std::size_t>(e.end - e.begin));
    if (!e.array.bytes.empty()) {
      in.seekg(static_cast<std::streamoff>(data_start + e.begin));
      in.read(reinterpret_cast<char*>(e.array.bytes.data()),
              static_cast<std::streamsize>(e.array.bytes.size()));
      KVC_CHECK(in.good(), "read error on ", path.string(), " (tensor \"", e.name, "\")");
    }
    out.tensors.emplace(e.name, std::move(e.array));
  }
  return out;
}

std::map<std::string, Array> read_safetensors(const std::filesystem::path& path) {
  return read_safetensors_file(path).tensors;
}

void write_safetensors(const std::filesystem::path& path,
                       const std::vector<std::pair<std::string, Array>>& tensors,
                       const std::map<std::string, std::string>& metadata) {
  json::Value header = json::Value::object();
  if (!metadata.empty()) {
    json::Value& meta = header.set(kMetadataKey, json::Value::object());
    for (const auto& [key, value] : metadata) meta.set(key, value);
  }
  std::uint64_t offset = 0;
  std::set<std::string_view> names;
  for (const auto& [name, array] : tensors) {
    KVC_CHECK(!name.empty() && name != kMetadataKey, "cannot write ", path.string(),
              ": tensor name \"", name, "\" is reserved or empty");
    KVC_CHECK(names.insert(name).second, "cannot write ", path.string(), ": tensor name \"", name,
              "\" given twice");
    KVC_CHECK(static_cast<std::int64_t>(array.bytes.size()) == array.byte_size(), "cannot write ",
              path.string(), ": tensor \"", name, "\" of shape ", shape_string(array.shape),
              " and dtype ", dtype_name(array.dtype), " needs ", array.byte_size(),
              " bytes, holds ", array.bytes.size());
    json::Value info = json::Value::object();
    info.set("dtype", safetensors_dtype_name(array.dtype));
    json::Value& shape = info.set("shape", json::Value::array());
    for (const std::int64_t s : array.shape) shape.push_back(s);
    const std::uint64_t end = offset + array.bytes.size();
    info.set("data_offsets", json::Array{json::Value(offset), json::Value(end)});
    header.set(name, std::move(info));
    offset = end;
  }
  std::string text = json::dump(header);
  text.append((8 - text.size() % 8) % 8, ' ');  // keeps the data section 8-byte aligned

  std::ofstream file(path, std::ios::binary | std::ios::trunc);
  KVC_CHECK(file.good(), "cannot open ", path.string(), " for writing");
  char size_bytes[8];
  std::uint64_t size = text.size();
  for (char& b : size_bytes) {
    b = static_cast<char>(size & 0xff);
    size >>= 8;
  }
  file.write(size_bytes, 8);
  file.write(text.data(), static_cast<std::streamsize>(text.size()));
  for (const auto& [name, array] : tensors)
    file.write(reinterpret_cast<const char*>(array.bytes.data()),
               static_cast<std::streamsize>(array.bytes.size()));
  file.close();
  KVC_CHECK(!file.fail(), "write error on ", path.string());
}

}  // namespace kvc
