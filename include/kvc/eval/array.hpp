// kvc/eval/array.hpp: an owning, dtype-tagged, C-order n-d array: what .npy and .safetensors
// files hold, before conversion to float.
//
//   kvc::Array a = kvc::Array::from_float(values, {2, 512, 64}, kvc::DType::f16);  // [Hkv, T, D]
//   std::vector<float> back = a.to_float();          // f16 rounding kept, exact otherwise
//   kvc::check_shape(a, "k", {2, -1, 64});            // -1 matches any size
//
// Elements are stored little-endian (the host's order; kvc builds on little-endian hosts only).
#pragma once

#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "kvc/core/dtype.hpp"

namespace kvc {

struct Array {
  DType dtype = DType::f32;
  std::vector<std::int64_t> shape;  // empty: a 0-d array holding one element
  std::vector<std::byte> bytes;     // numel() * dtype_size(dtype) bytes, C order

  std::int64_t numel() const;  // product of shape (1 for 0-d); throws on a negative size
  int rank() const { return static_cast<int>(shape.size()); }
  std::int64_t byte_size() const { return numel() * dtype_size(dtype); }

  // Every element as float. Supports f16, bf16, f32, f64 (rounded to nearest float), i32 (exact up
  // to 2^24), u8, fp8_e4m3, fp8_e5m2. Throws if bytes.size() != byte_size().
  std::vector<float> to_float() const;
  // i32 arrays only (positions, token ids); throws for any other dtype.
  std::vector<std::int32_t> to_int32() const;

  // Rounds each value to `dtype` (f16, bf16: nearest even; f32: exact; f64: exact; fp8: nearest
  // even, saturating). Integer dtypes are refused: use from_int32. Throws unless values.size()
  // equals the product of shape.
  static Array from_float(std::span<const float> values, std::vector<std::int64_t> shape,
                          DType dtype = DType::f32);
  static Array from_int32(std::span<const std::int32_t> values, std::vector<std::int64_t> shape);
};

// "[8, 2, 512, 64]"; "[]" for a 0-d shape.
std::string shape_string(std::span<const std::int64_t> shape);

// Throws kvc::Error "<name>: expected shape [..], got [..]" unless `a` has `expected` shape; an
// expected size of -1 matches any size along that dimension.
void check_shape(const Array& a, std::string_view name, std::span<const std::int64_t> expected);
inline void check_shape(const Array& a, std::string_view name,
                        std::initializer_list<std::int64_t> expected) {
  check_shape(a, name, std::span<const std::int64_t>(expected.begin(), expected.size()));
}

}  // namespace kvc
