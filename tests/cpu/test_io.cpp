// File IO: kvc::Array conversions, .npy, .safetensors and KV dump loading/saving.
#include <array>
#include <catch2/catch.hpp>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "kvc/core/error.hpp"
#include "kvc/eval/array.hpp"
#include "kvc/eval/dump.hpp"
#include "kvc/eval/json.hpp"
#include "kvc/eval/npy.hpp"
#include "kvc/eval/safetensors.hpp"

#ifndef KVC_TEST_DATA_DIR
#define KVC_TEST_DATA_DIR "tests/data"  // set by tests/CMakeLists.txt
#endif

namespace fs = std::filesystem;
using Catch::Matchers::Contains;

namespace {

// A fresh directory under the system temp dir, removed with everything in it at scope exit.
struct TempDir {
  fs::path path;
  TempDir() {
    std::random_device rd;
    path = fs::temp_directory_path() /
           ("kvc_test_io_" + std::to_string(rd()) + "_" + std::to_string(rd()));
    fs::create_directories(path);
  }
  ~TempDir() {
    std::error_code ignored;
    fs::remove_all(path, ignored);
  }
  fs::path operator/(const std::string& name) const { return path / name; }
};

std::string read_bytes(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

void write_bytes(const fs::path& p, const std::string& bytes) {
  std::ofstream out(p, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

// A hand-made .npy: magic, version, header length in 2 (v1) or 4 (v2, v3) bytes, header, data.
std::string npy_bytes(int major, const std::string& header, const std::string& data) {
  std::string out("\x93NUMPY", 6);
  out += static_cast<char>(major);
  out += '\0';
  const std::size_t n = header.size();
  out += static_cast<char>(n & 0xff);
  out += static_cast<char>((n >> 8) & 0xff);
  if (major >= 2) {
    out += static_cast<char>((n >> 16) & 0xff);
    out += static_cast<char>((n >> 24) & 0xff);
  }
  return out + header + data;
}

std::string little_endian_floats(std::initializer_list<float> values) {
  std::string out;
  for (float f : values) out.append(reinterpret_cast<const char*>(&f), sizeof f);
  return out;
}

// An f16 decoder written from the IEEE 754 definition, independent of kvc::f16.
double decode_half(std::uint16_t h) {
  const int sign = h >> 15, exponent = (h >> 10) & 0x1f, mantissa = h & 0x3ff;
  double magnitude;
  if (exponent == 0) {
    magnitude = std::ldexp(mantissa, -24);
  } else if (exponent == 31) {
    magnitude = mantissa ? NAN : INFINITY;
  } else {
    magnitude = std::ldexp(1024 + mantissa, exponent - 25);
  }
  return sign ? -magnitude : magnitude;
}

// Element `index` of an f16 .npy file, read straight from its bytes (version 1 header).
double npy_f16_element(const fs::path& p, std::int64_t index) {
  const std::string bytes = read_bytes(p);
  REQUIRE(bytes.substr(0, 8) == std::string("\x93NUMPY\x01\x00", 8));
  const std::size_t header_length = static_cast<unsigned char>(bytes[8]) |
                                    static_cast<std::size_t>(static_cast<unsigned char>(bytes[9]))
                                        << 8;
  REQUIRE(bytes.find("'descr': '<f2'") < 10 + header_length);
  const std::size_t at = 10 + header_length + 2 * static_cast<std::size_t>(index);
  REQUIRE(at + 2 <= bytes.size());
  const auto lo = static_cast<unsigned char>(bytes[at]);
  const auto hi = static_cast<unsigned char>(bytes[at + 1]);
  return decode_half(static_cast<std::uint16_t>(lo | hi << 8));
}

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const kvc::Error& e) {
    return e.message();
  }
  return "";
}

// Values exactly representable in f16 (multiples of 1/16 in [-3, 3]).
float exact_value(std::size_t i) {
  return static_cast<float>(static_cast<int>((i * 7919) % 97) - 48) / 16.0f;
}

kvc::KvDump synthetic_dump(int layers, int q_heads, int kv_heads, int tokens, int head_dim) {
  kvc::KvDump d;
  d.layers = layers, d.q_heads = q_heads, d.kv_heads = kv_heads, d.tokens = tokens;
  d.head_dim = head_dim;
  const auto fill = [](std::vector<float>& v, std::size_t n, std::size_t salt) {
    v.resize(n);
    for (std::size_t i = 0; i < n; ++i) v[i] = exact_value(i + salt);
  };
  const auto n = [&](int heads) {
    return static_cast<std::size_t>(layers) * heads * tokens * head_dim;
  };
  fill(d.q_all, n(q_heads), 1);
  fill(d.k_all, n(kv_heads), 2);
  fill(d.v_all, n(kv_heads), 3);
  fill(d.k_prerope_all, n(kv_heads), 4);
  d.rope_theta = 500000.0;
  d.rope_convention = "interleaved";
  d.model = "synthetic";
  return d;
}

// Writes q, k, v .npy files (f32) of the given shapes into dir, values all 0.25.
void write_qkv(const fs::path& dir, std::vector<std::int64_t> q, std::vector<std::int64_t> k,
               std::vector<std::int64_t> v) {
  fs::create_directories(dir);
  for (const auto& [name, shape] : {std::pair{"q", q}, std::pair{"k", k}, std::pair{"v", v}}) {
    std::int64_t n = 1;
    for (auto s : shape) n *= s;
    const std::vector<float> values(static_cast<std::size_t>(n), 0.25f);
    kvc::write_npy(dir / (std::string(name) + ".npy"),
                   kvc::Array::from_float(values, shape, kvc::DType::f32));
  }
}

}  // namespace

// --- Array
// -----------------------------------------------------------------------------------------

TEST_CASE("Array from_float rounds to f16 and bf16 to nearest even", "[io]") {
  const std::vector<float> in = {0.1f, 1.0f + 0x1p-8f, 1.0f + 3 * 0x1p-8f, 65520.0f, -2.5f};
  const auto h = kvc::Array::from_float(in, {5}, kvc::DType::f16).to_float();
  CHECK(h[0] == 0.0999755859375f);  // f16 0x2e66
  CHECK(h[1] == 1.00390625f);       // exact in f16 (10 mantissa bits)
  CHECK(std::isinf(h[3]));          // 65520 rounds up past the f16 maximum 65504
  CHECK(h[4] == -2.5f);
  const auto b = kvc::Array::from_float(in, {5}, kvc::DType::bf16).to_float();
  CHECK(b[1] == 1.0f);            // halfway, rounds to the even mantissa 0
  CHECK(b[2] == 1.0f + 0x1p-6f);  // halfway, rounds to the even mantissa 2
  CHECK(b[4] == -2.5f);
  const auto f = kvc::Array::from_float(in, {5}, kvc::DType::f32);
  CHECK(f.bytes.size() == 20);
  CHECK(f.to_float() == in);
  CHECK(kvc::Array::from_float(in, {5}, kvc::DType::f64).to_float() == in);
  CHECK(kvc::Array::from_int32(std::vector<std::int32_t>{-7, 0, 1 << 20}, {3}).to_float() ==
        std::vector<float>{-7.0f, 0.0f, 1048576.0f});
  CHECK_THROWS_WITH(kvc::Array::from_float(in, {2, 3}, kvc::DType::f32),
                    Contains("5 values for shape [2, 3]"));
  CHECK_THROWS_WITH(kvc::Array::from_float(in, {5}, kvc::DType::i32), Contains("from_int32"));
}

TEST_CASE("check_shape names the tensor, the expected and the actual shape", "[io]") {
  const std::vector<float> values(24, 0.0f);
  const kvc::Array a = kvc::Array::from_float(values, {2, 3, 4});
  CHECK_NOTHROW(kvc::check_shape(a, "k", {2, 3, 4}));
  CHECK_NOTHROW(kvc::check_shape(a, "k", {2, -1, 4}));
  CHECK_THROWS_WITH(kvc::check_shape(a, "keys", {2, 4, -1}),
                    Contains("keys: expected shape [2, 4, *], got [2, 3, 4]"));
  CHECK_THROWS_WITH(kvc::check_shape(a, "keys", {24}), Contains("got [2, 3, 4]"));
  kvc::Array broken = a;
  broken.bytes.resize(10);
  CHECK_THROWS_WITH(broken.to_float(), Contains("needs 96 bytes, holds 10"));
}

// --- .npy
// ------------------------------------------------------------------------------------------

TEST_CASE("npy round trip for every dtype, 0-d, 1-d and 3-d", "[io]") {
  TempDir dir;
  const std::vector<std::vector<std::int64_t>> shapes = {{}, {1}, {7}, {2, 3, 5}, {0, 4}};
  for (const auto dtype :
       {kvc::DType::f16, kvc::DType::f32, kvc::DType::f64, kvc::DType::i32, kvc::DType::u8}) {
    for (const auto& shape : shapes) {
      std::int64_t n = 1;
      for (auto s : shape) n *= s;
      kvc::Array a;
      a.dtype = dtype;
      a.shape = shape;
      a.bytes.resize(static_cast<std::size_t>(n * kvc::dtype_size(dtype)));
      for (std::size_t i = 0; i < a.bytes.size(); ++i)
        a.bytes[i] = static_cast<std::byte>((i * 37 + 11) & 0xff);
      const fs::path p = dir / "a.npy";
      kvc::write_npy(p, a);
      const std::string raw = read_bytes(p);
      INFO("dtype " << kvc::dtype_name(dtype) << " shape " << kvc::shape_string(shape));
      REQUIRE(raw.substr(0, 8) == std::string("\x93NUMPY\x01\x00", 8));
      const std::size_t header_length =
          static_cast<unsigned char>(raw[8]) | static_cast<unsigned char>(raw[9]) << 8;
      CHECK((10 + header_length) % 64 == 0);
      CHECK(raw[10 + header_length - 1] == '\n');
      CHECK(raw.size() == 10 + header_length + a.bytes.size());
      const kvc::Array b = kvc::read_npy(p);
      CHECK(b.dtype == dtype);
      CHECK(b.shape == shape);
      CHECK(b.bytes == a.bytes);
    }
  }
}

TEST_CASE("npy writer emits numpy's header text", "[io]") {
  TempDir dir;
  const std::vector<float> three = {1, 2, 3};
  kvc::write_npy(dir / "v.npy", kvc::Array::from_float(three, {3}, kvc::DType::f32));
  CHECK(read_bytes(dir / "v.npy").substr(10, 58) ==
        "{'descr': '<f4', 'fortran_order': False, 'shape': (3,), } ");
  kvc::write_npy(dir / "s.npy", kvc::Array::from_float(std::vector<float>{4}, {}, kvc::DType::f16));
  CHECK(read_bytes(dir / "s.npy").substr(10, 56) ==
        "{'descr': '<f2', 'fortran_order': False, 'shape': (), } ");
  kvc::write_npy(dir / "m.npy", kvc::Array::from_int32(std::vector<std::int32_t>(6, 1), {2, 3}));
  CHECK(read_bytes(dir / "m.npy").substr(10, 60) ==
        "{'descr': '<i4', 'fortran_order': False, 'shape': (2, 3), } ");
  const std::vector<float> values(2, 0.5f);
  CHECK_THROWS_WITH(
      kvc::write_npy(dir / "b.npy", kvc::Array::from_float(values, {2}, kvc::DType::bf16)),
      Contains("no dtype for bf16"));
}

TEST_CASE("npy reads hand-written version 1, 2 and 3 headers", "[io]") {
  TempDir dir;
  const std::string data = little_endian_floats({1.5f, -2.0f, 0.25f, 8.0f});
  // Unpadded, double-quoted, no trailing comma, extra spaces: all legal Python literals.
  write_bytes(
      dir / "v1.npy",
      npy_bytes(1, "{\"shape\": (2,2), \"fortran_order\": False, \"descr\": \"<f4\"}\n", data));
  write_bytes(
      dir / "v2.npy",
      npy_bytes(2, "{'descr': '<f4', 'fortran_order': False, 'shape': (4,), }      \n", data));
  write_bytes(dir / "v3.npy",
              npy_bytes(3, "{'descr': '<f4', 'fortran_order': False, 'shape': (1, 4), }\n", data));
  const kvc::Array a1 = kvc::read_npy(dir / "v1.npy");
  const kvc::Array a2 = kvc::read_npy(dir / "v2.npy");
  const kvc::Array a3 = kvc::read_npy(dir / "v3.npy");
  CHECK(a1.shape == std::vector<std::int64_t>{2, 2});
  CHECK(a2.shape == std::vector<std::int64_t>{4});
  CHECK(a3.shape == std::vector<std::int64_t>{1, 4});
  const std::vector<float> expected = {1.5f, -2.0f, 0.25f, 8.0f};
  CHECK(a1.to_float() == expected);
  CHECK(a2.to_float() == expected);
  CHECK(a3.to_float() == expected);
  // '|u1' and '<u1' are both uint8.
  write_bytes(dir / "u.npy",
              npy_bytes(1, "{'descr': '<u1', 'fortran_order': False, 'shape': (3,), }\n",
                        std::string("\x00\x7f\xff", 3)));
  CHECK(kvc::read_npy(dir / "u.npy").to_float() == std::vector<float>{0.0f, 127.0f, 255.0f});
}

TEST_CASE("npy rejects what it cannot read, with a clear message", "[io]") {
  TempDir dir;
  const std::string four = little_endian_floats({1, 2, 3, 4});
  const auto error_for = [&](const std::string& bytes) {
    write_bytes(dir / "bad.npy", bytes);
    return error_of([&] { kvc::read_npy(dir / "bad.npy"); });
  };
  const std::string file = (dir / "bad.npy").string();

  CHECK_THAT(
      error_for(npy_bytes(1, "{'descr': '<f4', 'fortran_order': True, 'shape': (4,), }\n", four)),
      Contains(file) && Contains("Fortran-order"));
  CHECK_THAT(
      error_for(npy_bytes(1, "{'descr': '>f4', 'fortran_order': False, 'shape': (4,), }\n", four)),
      Contains(file) && Contains("big-endian dtype '>f4'"));
  CHECK_THAT(
      error_for(npy_bytes(1, "{'descr': '<i8', 'fortran_order': False, 'shape': (2,), }\n", four)),
      Contains("unsupported .npy dtype '<i8'") && Contains("<f2, <f4"));
  CHECK_THAT(
      error_for(npy_bytes(1, "{'descr': '<f4', 'fortran_order': False, 'shape': (5,), }\n", four)),
      Contains(file) && Contains("truncated") && Contains("needs 20 bytes") && Contains("has 16"));
  CHECK_THAT(
      error_for(npy_bytes(1, "{'descr': '<f4', 'fortran_order': False, 'shape': (3,), }\n", four)),
      Contains("4 bytes of trailing garbage"));
  CHECK_THAT(error_for("GARBAGE!\x01\x00" + four), Contains(file) && Contains("not a .npy file"));
  CHECK_THAT(error_for("\x93NUM"), Contains("not a .npy file"));
  CHECK_THAT(error_for(npy_bytes(4, "{}", "")), Contains("unsupported .npy format version 4.0"));
  CHECK_THAT(error_for(npy_bytes(1, "{'descr': '<f4', 'shape': (4,), }\n", four)),
             Contains("lacks 'fortran_order'"));
  CHECK_THAT(error_for(npy_bytes(1,
                                 "{'descr': '<f4', 'fortran_order': False, 'shape': (4,), "
                                 "'extra': 1}\n",
                                 four)),
             Contains("unexpected key 'extra'"));
  CHECK_THAT(
      error_for(npy_bytes(1, "{'descr': '<f4', 'fortran_order': False, 'shape': (4,)", four)),
      Contains("malformed .npy header"));
  CHECK_THAT(
      error_for(npy_bytes(1, "{'descr': '<f4', 'fortran_order': Nope, 'shape': (4,)}", four)),
      Contains("expected True or False"));
  CHECK_THAT(
      error_for(npy_bytes(1, "{'descr': '<f4', 'fortran_order': False, 'shape': (-4,)}", four)),
      Contains("non-negative integer"));
  CHECK_THAT(error_for(npy_bytes(1,
                                 "{'descr': [('a', '<f4')], 'fortran_order': False, "
                                 "'shape': (4,)}",
                                 four)),
             Contains("structured dtypes are not supported"));
  // Header length pointing past the end of the file.
  std::string cut = npy_bytes(1, "{'descr': '<f4', 'fortran_order': False, 'shape': (4,), }\n", "");
  cut[8] = static_cast<char>(0xff);
  CHECK_THAT(error_for(cut), Contains("truncated .npy header"));
  CHECK_THAT(error_of([&] { kvc::read_npy(dir / "absent.npy"); }),
             Contains("cannot open") && Contains("absent.npy"));
}

TEST_CASE("npy truncated file: the message names the file and both byte counts", "[io]") {
  TempDir dir;
  const std::vector<float> values(6, 1.0f);
  const fs::path p = dir / "t.npy";
  kvc::write_npy(p, kvc::Array::from_float(values, {2, 3}, kvc::DType::f32));
  const std::string full = read_bytes(p);
  write_bytes(p, full.substr(0, full.size() - 3));
  CHECK_THAT(error_of([&] { kvc::read_npy(p); }),
             Contains(p.string()) && Contains("needs 24 bytes") && Contains("the file has 21"));
}

// --- .safetensors
// ----------------------------------------------------------------------------------

TEST_CASE("safetensors round trip of F16, BF16, F32, I32 with metadata", "[io]") {
  TempDir dir;
  std::vector<float> values(2 * 3 * 4);
  for (std::size_t i = 0; i < values.size(); ++i) values[i] = exact_value(i) * 1.001f;
  std::vector<std::pair<std::string, kvc::Array>> tensors = {
      {"half", kvc::Array::from_float(values, {2, 3, 4}, kvc::DType::f16)},
      {"brain", kvc::Array::from_float(values, {4, 6}, kvc::DType::bf16)},
      {"single", kvc::Array::from_float(values, {24}, kvc::DType::f32)},
      {"ints", kvc::Array::from_int32(std::vector<std::int32_t>{1, -2, 3}, {3})},
      {"empty", kvc::Array::from_float(std::vector<float>{}, {0, 5}, kvc::DType::f32)},
      {"scalar", kvc::Array::from_float(std::vector<float>{7}, {}, kvc::DType::f32)}};
  const std::map<std::string, std::string> metadata = {{"rope_theta", "10000"},
                                                       {"note", "a \"quoted\" value"}};
  const fs::path p = dir / "t.safetensors";
  kvc::write_safetensors(p, tensors, metadata);

  // The raw layout: 8-byte little-endian size, a JSON header padded to 8 bytes, the data.
  const std::string raw = read_bytes(p);
  std::uint64_t header_size = 0;
  for (int i = 7; i >= 0; --i) header_size = header_size << 8 | static_cast<unsigned char>(raw[i]);
  CHECK(header_size % 8 == 0);
  const kvc::json::Value header = kvc::json::parse(raw.substr(8, header_size));
  CHECK(header.at("half").at("dtype").as_string() == "F16");
  CHECK(header.at("brain").at("dtype").as_string() == "BF16");
  CHECK(header.at("ints").at("dtype").as_string() == "I32");
  CHECK(kvc::json::dump(header.at("half").at("data_offsets")) == "[0,48]");
  CHECK(kvc::json::dump(header.at("brain").at("data_offsets")) == "[48,96]");
  CHECK(kvc::json::dump(header.at("single").at("data_offsets")) == "[96,192]");
  CHECK(header.at("__metadata__").at("rope_theta").as_string() == "10000");
  CHECK(raw.size() == 8 + header_size + 48 + 48 + 96 + 12 + 0 + 4);

  const kvc::SafetensorsFile f = kvc::read_safetensors_file(p);
  CHECK(f.metadata == metadata);
  REQUIRE(f.tensors.size() == tensors.size());
  for (const auto& [name, array] : tensors) {
    INFO("tensor " << name);
    const kvc::Array& back = f.tensors.at(name);
    CHECK(back.dtype == array.dtype);
    CHECK(back.shape == array.shape);
    CHECK(back.bytes == array.bytes);
  }
  CHECK(kvc::read_safetensors(p).at("ints").to_int32() == std::vector<std::int32_t>{1, -2, 3});

  CHECK_THROWS_WITH(kvc::write_safetensors(dir / "d.safetensors", {tensors[0], tensors[0]}),
                    Contains("\"half\" given twice"));
  CHECK_THROWS_WITH(
      kvc::write_safetensors(dir / "d.safetensors", {{"__metadata__", tensors[0].second}}),
      Contains("reserved"));
}

TEST_CASE("safetensors: corrupted headers and offsets are reported", "[io]") {
  TempDir dir;
  const fs::path p = dir / "bad.safetensors";
  const auto file_with = [&](const std::string& header, std::size_t data_bytes) {
    std::string out(8, '\0');
    std::uint64_t n = header.size();
    for (int i = 0; i < 8; ++i, n >>= 8) out[i] = static_cast<char>(n & 0xff);
    write_bytes(p, out + header + std::string(data_bytes, '\x01'));
    return error_of([&] { kvc::read_safetensors(p); });
  };
  const std::string tensor = R"("t": {"dtype": "F32", "shape": [2, 2], "data_offsets": )";

  CHECK(file_with("{" + tensor + "[0, 16]}}", 16).empty());  // the well-formed baseline
  CHECK_THAT(file_with("{" + tensor + "[0, 16]}}", 12), Contains(p.string()) && Contains("\"t\"") &&
                                                            Contains("out of range") &&
                                                            Contains("truncated"));
  CHECK_THAT(file_with("{" + tensor + "[0, 12]}}", 16),
             Contains("span 12 bytes") && Contains("needs 16"));
  CHECK_THAT(file_with("{" + tensor + "[8, 4]}}", 16), Contains("out of range"));
  CHECK_THAT(file_with("{" + tensor + "[0, 16]}, " +
                           R"("u": {"dtype": "F16", "shape": [4], "data_offsets": [8, 16]}})",
                       16),
             Contains("overlap") && Contains("\"t\" [0, 16)") && Contains("\"u\" [8, 16)"));
  CHECK_THAT(file_with(R"({"t": {"dtype": "I64", "shape": [2], "data_offsets": [0, 16]}})", 16),
             Contains("unsupported dtype \"I64\"") && Contains("F16, BF16"));
  CHECK_THAT(file_with(R"({"t": {"dtype": "F32", "shape": [2]}})", 8),
             Contains("lacks \"data_offsets\""));
  CHECK_THAT(file_with(R"({"t": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}})", 8),
             Contains("non-negative integer"));
  CHECK_THAT(file_with(R"({"t": {"dtype": "F32", "shape": [2], "data_offsets": [0]}})", 8),
             Contains("[begin, end]"));
  CHECK_THAT(file_with(R"({"__metadata__": {"a": 1}})", 0), Contains("metadata \"a\""));
  CHECK_THAT(file_with(R"({"t": )", 0),
             Contains("corrupted safetensors header") && Contains("JSON parse error at byte 6"));
  CHECK_THAT(file_with("[1]", 0), Contains("does not start with '{'"));

  // A header size beyond the file.
  std::string huge(8, '\0');
  huge[0] = static_cast<char>(0x40);
  write_bytes(p, huge + "{}");
  CHECK_THAT(error_of([&] { kvc::read_safetensors(p); }),
             Contains("header size 64 exceeds the file (2 bytes"));
  write_bytes(p, std::string("\xff\xff\xff\xff\xff\xff\xff\xff{}", 10));
  CHECK_THAT(error_of([&] { kvc::read_safetensors(p); }), Contains("100 MB"));
  write_bytes(p, "abc");
  CHECK_THAT(error_of([&] { kvc::read_safetensors(p); }), Contains("shorter than the 8-byte"));
}

// --- KV dumps
// --------------------------------------------------------------------------------------

TEST_CASE("dump: the bundled tests/data/seq0 loads with the documented layout", "[io]") {
  const fs::path dir = fs::path(KVC_TEST_DATA_DIR) / "seq0";
  if (!fs::exists(dir / "k.npy")) {
    WARN("skipped: " << dir << " not present");
    return;
  }
  const kvc::KvDump d = kvc::load_dump(dir);
  CHECK(d.layers == 8);
  CHECK(d.q_heads == 8);
  CHECK(d.kv_heads == 2);
  CHECK(d.tokens == 512);
  CHECK(d.head_dim == 64);
  CHECK(d.group_size() == 4);
  CHECK(d.q_all.size() == 8u * 8 * 512 * 64);
  CHECK(d.k_all.size() == 8u * 2 * 512 * 64);
  CHECK(d.v_all.size() == d.k_all.size());
  CHECK(d.has_k_prerope());
  CHECK(d.k_prerope_all.size() == d.k_all.size());
  CHECK_FALSE(d.has_scores());
  CHECK(d.rope_theta == 10000.0);
  CHECK(d.rope_convention == "rotate_half");
  CHECK_THAT(d.model, Contains("kvc-realmodel"));
  CHECK(d.meta.at("tokens").as_number() == 512);
  CHECK(d.source == dir);

  // Elements checked against an independent decode of the .npy bytes.
  CHECK(static_cast<double>(d.k(0)(0, 0, 0)) == npy_f16_element(dir / "k.npy", 0));
  const std::int64_t last_k = ((7 * 2 + 1) * 512 + 511) * 64 + 63;
  CHECK(static_cast<double>(d.k(7)(1, 511, 63)) == npy_f16_element(dir / "k.npy", last_k));
  const std::int64_t some_q = ((3 * 8 + 5) * 512 + 100) * 64 + 7;
  CHECK(static_cast<double>(d.q(3)(5, 100, 7)) == npy_f16_element(dir / "q.npy", some_q));
  const std::int64_t some_v = ((6 * 2 + 0) * 512 + 42) * 64 + 33;
  CHECK(static_cast<double>(d.v(6)(0, 42, 33)) == npy_f16_element(dir / "v.npy", some_v));
  CHECK(static_cast<double>(d.k_prerope(2, "test")(1, 7, 9)) ==
        npy_f16_element(dir / "k_prerope.npy", ((2 * 2 + 1) * 512 + 7) * 64 + 9));
  CHECK(d.k(0)(0, 0, 0) != 0.0f);  // a real value, not zero fill

  const auto view = d.k(5);
  CHECK(view.shape == std::array<std::int64_t, 3>{2, 512, 64});
  CHECK(view.contiguous());
  CHECK_THROWS_WITH(d.k(8), Contains("k(layer = 8) out of range [0, 8)"));
  CHECK_THROWS_WITH(d.q(-1), Contains("out of range"));
}

TEST_CASE("dump: the safetensors form loads equal to the directory form", "[io]") {
  TempDir tmp;
  const fs::path seq0 = fs::path(KVC_TEST_DATA_DIR) / "seq0";
  kvc::KvDump source =
      fs::exists(seq0 / "k.npy") ? kvc::load_dump(seq0) : synthetic_dump(2, 4, 2, 16, 8);
  if (!fs::exists(seq0 / "k.npy")) kvc::save_dump(tmp / "dir", source);
  const fs::path dir = fs::exists(seq0 / "k.npy") ? seq0 : tmp / "dir";

  kvc::save_dump(tmp / "d.safetensors", source, kvc::DType::f16);
  const kvc::KvDump a = kvc::load_dump(dir);
  const kvc::KvDump b = kvc::load_dump(tmp / "d.safetensors");
  CHECK(b.source == tmp / "d.safetensors");
  CHECK(a.layers == b.layers);
  CHECK(a.q_heads == b.q_heads);
  CHECK(a.kv_heads == b.kv_heads);
  CHECK(a.tokens == b.tokens);
  CHECK(a.head_dim == b.head_dim);
  CHECK(a.q_all == b.q_all);
  CHECK(a.k_all == b.k_all);
  CHECK(a.v_all == b.v_all);
  CHECK(a.k_prerope_all == b.k_prerope_all);
  CHECK(a.rope_theta == b.rope_theta);
  CHECK(a.rope_convention == b.rope_convention);
  CHECK(a.model == b.model);
  // Safetensors metadata holds strings; non-string meta.json members arrive as JSON text.
  CHECK(b.meta.at("rope_theta").as_string() == kvc::json::dump(source.rope_theta));
  CHECK(kvc::read_safetensors_file(tmp / "d.safetensors").tensors.at("q").dtype == kvc::DType::f16);
}

TEST_CASE("dump: save_dump and load_dump round trip, with scores and metadata", "[io]") {
  TempDir tmp;
  kvc::KvDump d = synthetic_dump(2, 6, 3, 5, 4);
  d.scores_all.resize(2 * 3 * 5);
  for (std::size_t i = 0; i < d.scores_all.size(); ++i) d.scores_all[i] = exact_value(i + 9);
  d.meta.set("extra", 7);
  for (const char* name : {"dir", "f.safetensors"}) {
    INFO(name);
    kvc::save_dump(tmp / name, d, kvc::DType::f32);
    const kvc::KvDump back = kvc::load_dump(tmp / name);
    CHECK(back.q_all == d.q_all);
    CHECK(back.k_all == d.k_all);
    CHECK(back.v_all == d.v_all);
    CHECK(back.k_prerope_all == d.k_prerope_all);
    CHECK(back.scores_all == d.scores_all);
    CHECK(back.rope_theta == 500000.0);
    CHECK(back.rope_convention == "interleaved");
    CHECK(back.model == "synthetic");
    REQUIRE(back.has_scores());
    CHECK(back.scores(1, "test")(2, 4) == d.scores_all[(1 * 3 + 2) * 5 + 4]);
    CHECK(back.q(1)(5, 4, 3) == d.q_all[((1 * 6 + 5) * 5 + 4) * 4 + 3]);
  }
  CHECK(kvc::load_dump(tmp / "dir").meta.at("extra").as_number() == 7);
  CHECK(kvc::read_npy(tmp / "dir" / "scores.npy").shape == std::vector<std::int64_t>{2, 3, 5});
  CHECK_THROWS_WITH(kvc::save_dump(tmp / "bf", d, kvc::DType::bf16), Contains("cannot hold bf16"));
  kvc::save_dump(tmp / "bf.safetensors", d, kvc::DType::bf16);
  CHECK(kvc::load_dump(tmp / "bf.safetensors").k_all == d.k_all);  // multiples of 1/16: exact

  // Defaults when the dump carries no metadata.
  write_qkv(tmp / "plain", {1, 2, 3, 4}, {1, 1, 3, 4}, {1, 1, 3, 4});
  const kvc::KvDump plain = kvc::load_dump(tmp / "plain");
  CHECK(plain.rope_theta == 10000.0);
  CHECK(plain.rope_convention == "rotate_half");
  CHECK(plain.model.empty());
  CHECK_FALSE(plain.has_k_prerope());
  CHECK_THROWS_WITH(plain.k_prerope(0, "reindexed positions"),
                    Contains("dump " + (tmp / "plain").string() +
                             " has no k_prerope (needed by reindexed positions)"));
  CHECK_THROWS_WITH(plain.scores(0, "locret"), Contains("has no scores (needed by locret)"));
}

TEST_CASE("dump: inconsistent shapes are rejected naming both shapes", "[io]") {
  TempDir tmp;
  const auto error_for = [&](const std::string& name, std::vector<std::int64_t> q,
                             std::vector<std::int64_t> k, std::vector<std::int64_t> v) {
    write_qkv(tmp / name, q, k, v);
    return error_of([&] { kvc::load_dump(tmp / name); });
  };
  CHECK_THAT(error_for("kv", {2, 4, 8, 4}, {2, 2, 8, 4}, {2, 2, 6, 4}),
             Contains("k.npy [2, 2, 8, 4] and v.npy [2, 2, 6, 4]"));
  CHECK_THAT(error_for("qk", {2, 4, 8, 4}, {2, 2, 7, 4}, {2, 2, 7, 4}),
             Contains("q.npy [2, 4, 8, 4] and k.npy [2, 2, 7, 4]"));
  CHECK_THAT(error_for("rank", {2, 4, 8}, {2, 2, 8, 4}, {2, 2, 8, 4}),
             Contains("q.npy has rank 3 (shape [2, 4, 8])"));
  CHECK_THAT(error_for("gqa", {1, 3, 4, 2}, {1, 2, 4, 2}, {1, 2, 4, 2}),
             Contains("q_heads = 3 is not a multiple of kv_heads = 2"));
  CHECK_THAT(error_for("empty", {1, 2, 0, 2}, {1, 2, 0, 2}, {1, 2, 0, 2}), Contains("T = 0"));
  CHECK_THAT(error_for("odd", {1, 2, 4, 3}, {1, 2, 4, 3}, {1, 2, 4, 3}),
             Contains("head_dim = 3 is odd"));

  write_qkv(tmp / "kp", {1, 2, 4, 2}, {1, 2, 4, 2}, {1, 2, 4, 2});
  kvc::write_npy(tmp / "kp" / "k_prerope.npy",
                 kvc::Array::from_float(std::vector<float>(8, 1.0f), {1, 1, 4, 2}));
  CHECK_THAT(error_of([&] { kvc::load_dump(tmp / "kp"); }),
             Contains("k.npy [1, 2, 4, 2] and k_prerope.npy [1, 1, 4, 2]"));
  fs::remove(tmp / "kp" / "k_prerope.npy");
  kvc::write_npy(tmp / "kp" / "scores.npy",
                 kvc::Array::from_float(std::vector<float>(8, 1.0f), {1, 2, 4, 1}));
  CHECK_THAT(error_of([&] { kvc::load_dump(tmp / "kp"); }), Contains("scores.npy has rank 4"));
  fs::remove(tmp / "kp" / "scores.npy");
  kvc::write_npy(tmp / "kp" / "v.npy",
                 kvc::Array::from_int32(std::vector<std::int32_t>(16, 1), {1, 2, 4, 2}));
  CHECK_THAT(error_of([&] { kvc::load_dump(tmp / "kp"); }),
             Contains("v.npy has dtype i32; dump tensors must be f16, bf16, f32 or f64"));
}

TEST_CASE("dump: missing files, bad paths and bad metadata", "[io]") {
  TempDir tmp;
  write_qkv(tmp / "d", {1, 2, 4, 2}, {1, 2, 4, 2}, {1, 2, 4, 2});
  fs::remove(tmp / "d" / "v.npy");
  CHECK_THAT(error_of([&] { kvc::load_dump(tmp / "d"); }),
             Contains("has no v.npy") && Contains("required: q.npy, k.npy, v.npy"));
  CHECK_THAT(error_of([&] { kvc::load_dump(tmp / "nowhere"); }), Contains("does not exist"));
  write_bytes(tmp / "x.bin", "abc");
  CHECK_THAT(error_of([&] { kvc::load_dump(tmp / "x.bin"); }),
             Contains("neither a directory nor a .safetensors file"));
  kvc::write_safetensors(
      tmp / "s.safetensors",
      {{"q", kvc::Array::from_float(std::vector<float>(8, 1.0f), {1, 2, 2, 2})},
       {"k", kvc::Array::from_float(std::vector<float>(8, 1.0f), {1, 2, 2, 2})}});
  CHECK_THAT(error_of([&] { kvc::load_dump(tmp / "s.safetensors"); }),
             Contains("has no tensor \"v\""));

  write_qkv(tmp / "m", {1, 2, 4, 2}, {1, 2, 4, 2}, {1, 2, 4, 2});
  write_bytes(tmp / "m" / "meta.json", R"({"rope_theta": "ten thousand"})");
  CHECK_THAT(
      error_of([&] { kvc::load_dump(tmp / "m"); }),
      Contains("meta.json") && Contains("\"rope_theta\" is a JSON string, expected a number"));
  write_bytes(tmp / "m" / "meta.json", R"({"rope_convention": "sideways"})");
  CHECK_THAT(error_of([&] { kvc::load_dump(tmp / "m"); }),
             Contains("unknown rope convention \"sideways\""));
  write_bytes(tmp / "m" / "meta.json", R"({"rope_theta": -1})");
  CHECK_THAT(error_of([&] { kvc::load_dump(tmp / "m"); }), Contains("rope_theta = -1"));
  write_bytes(tmp / "m" / "meta.json", R"({"rope_theta": 1,})");
  CHECK_THAT(error_of([&] { kvc::load_dump(tmp / "m"); }),
             Contains("meta.json") && Contains("JSON parse error at byte 17"));
  write_bytes(tmp / "m" / "meta.json", R"({"rope_theta": 1e6, "model": "m"})");
  CHECK(kvc::load_dump(tmp / "m").rope_theta == 1e6);

  const std::vector<float> ones(8, 1.0f);
  const auto one = kvc::Array::from_float(ones, {1, 2, 2, 2});
  kvc::write_safetensors(tmp / "t.safetensors", {{"q", one}, {"k", one}, {"v", one}},
                         {{"rope_theta", "abc"}});
  CHECK_THAT(error_of([&] { kvc::load_dump(tmp / "t.safetensors"); }),
             Contains("metadata rope_theta = \"abc\" is not a number"));
}

TEST_CASE("dump: NaN and Inf are reported with tensor, layer, head, token and channel", "[io]") {
  TempDir tmp;
  kvc::KvDump d = synthetic_dump(2, 4, 2, 6, 4);
  // k [L=2, Hkv=2, T=6, D=4]: layer 1, head 1, token 5, channel 2.
  d.k_all[((1 * 2 + 1) * 6 + 5) * 4 + 2] = NAN;
  kvc::save_dump(tmp / "nan", d);  // f16 keeps NaN
  CHECK_THAT(error_of([&] { kvc::load_dump(tmp / "nan"); }),
             Contains("k holds") && Contains("at layer 1, head 1, token 5, channel 2"));

  d = synthetic_dump(2, 4, 2, 6, 4);
  // q [2, 4, 6, 4]: layer 0, head 3, token 2, channel 1; a second, later Inf is not the one named.
  d.q_all[((0 * 4 + 3) * 6 + 2) * 4 + 1] = -INFINITY;
  d.q_all[((1 * 4 + 0) * 6 + 0) * 4 + 0] = INFINITY;
  kvc::save_dump(tmp / "inf.safetensors", d, kvc::DType::f32);
  CHECK_THAT(error_of([&] { kvc::load_dump(tmp / "inf.safetensors"); }),
             Contains("q holds -inf at layer 0, head 3, token 2, channel 1"));

  d = synthetic_dump(1, 2, 2, 3, 2);
  d.scores_all.assign(1 * 2 * 3, 0.5f);
  d.scores_all[1 * 3 + 2] = NAN;
  CHECK_THAT(error_of([&] { kvc::check_dump(d); }),
             Contains("scores holds") && Contains("at layer 0, head 1, token 2 ("));

  d = synthetic_dump(1, 2, 2, 3, 2);
  d.v_all.pop_back();
  CHECK_THAT(error_of([&] { kvc::check_dump(d); }), Contains("v holds 11 values, expected 12"));
}
