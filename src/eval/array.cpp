// kvc::Array: dtype conversions to and from float (see kvc/eval/array.hpp).
#include "kvc/eval/array.hpp"

#include <bit>
#include <cstring>

#include "kvc/core/error.hpp"

namespace kvc {
namespace {

static_assert(
    std::endian::native == std::endian::little,
    "kvc's file IO assumes a little-endian host (.npy and .safetensors are little-endian)");

template <class Storage>
void decode_all(const std::byte* bytes, std::size_t count, float* out) {
  for (std::size_t i = 0; i < count; ++i) {
    Storage s;
    std::memcpy(&s, bytes + i * sizeof(Storage), sizeof(Storage));
    out[i] = static_cast<float>(s);
  }
}

template <class Storage>
void encode_all(std::span<const float> values, std::byte* out) {
  for (std::size_t i = 0; i < values.size(); ++i) {
    const Storage s(values[i]);
    std::memcpy(out + i * sizeof(Storage), &s, sizeof(Storage));
  }
}

std::int64_t checked_numel(std::span<const std::int64_t> shape) {
  std::int64_t n = 1;
  for (const std::int64_t s : shape) {
    KVC_CHECK(s >= 0, "array shape ", shape_string(shape),
              " has a negative size; sizes must be >= 0");
    KVC_CHECK(s == 0 || n <= (std::int64_t{1} << 48) / s, "array shape ", shape_string(shape),
              " has more than 2^48 elements");
    n *= s;
  }
  return n;
}

}  // namespace

std::string shape_string(std::span<const std::int64_t> shape) {
  std::string out = "[";
  for (std::size_t i = 0; i < shape.size(); ++i) {
    if (i) out += ", ";
    out += std::to_string(shape[i]);
  }
  return out + "]";
}

std::int64_t Array::numel() const { return checked_numel(shape); }

std::vector<float> Array::to_float() const {
  const std::int64_t n = numel();
  KVC_CHECK(static_cast<std::int64_t>(bytes.size()) == n * dtype_size(dtype), "array of shape ",
            shape_string(shape), " and dtype ", dtype_name(dtype), " needs ", n * dtype_size(dtype),
            " bytes, holds ", bytes.size());
  std::vector<float> out(static_cast<std::size_t>(n));
  const auto count = static_cast<std::size_t>(n);
  switch (dtype) {
    case DType::f16:
      decode_all<f16>(bytes.data(), count, out.data());
      break;
    case DType::bf16:
      decode_all<bf16>(bytes.data(), count, out.data());
      break;
    case DType::fp8_e4m3:
      decode_all<fp8_e4m3>(bytes.data(), count, out.data());
      break;
    case DType::fp8_e5m2:
      decode_all<fp8_e5m2>(bytes.data(), count, out.data());
      break;
    case DType::f32:
      if (count) std::memcpy(out.data(), bytes.data(), count * sizeof(float));
      break;
    case DType::f64:
      for (std::size_t i = 0; i < count; ++i) {
        double x;
        std::memcpy(&x, bytes.data() + i * sizeof x, sizeof x);
        out[i] = static_cast<float>(x);
      }
      break;
    case DType::i32:
      for (std::size_t i = 0; i < count; ++i) {
        std::int32_t x;
        std::memcpy(&x, bytes.data() + i * sizeof x, sizeof x);
        out[i] = static_cast<float>(x);
      }
      break;
    case DType::u8:
      for (std::size_t i = 0; i < count; ++i)
        out[i] = static_cast<float>(std::to_integer<unsigned>(bytes[i]));
      break;
  }
  return out;
}

std::vector<std::int32_t> Array::to_int32() const {
  KVC_CHECK(dtype == DType::i32, "to_int32: array has dtype ", dtype_name(dtype), "; allowed: i32");
  const std::int64_t n = numel();
  KVC_CHECK(static_cast<std::int64_t>(bytes.size()) == n * 4, "array of shape ",
            shape_string(shape), " and dtype i32 needs ", n * 4, " bytes, holds ", bytes.size());
  std::vector<std::int32_t> out(static_cast<std::size_t>(n));
  if (n) std::memcpy(out.data(), bytes.data(), bytes.size());
  return out;
}

Array Array::from_float(std::span<const float> values, std::vector<std::int64_t> shape,
                        DType dtype) {
  const std::int64_t n = checked_numel(shape);
  KVC_CHECK(static_cast<std::int64_t>(values.size()) == n, "from_float: ", values.size(),
            " values for shape ", shape_string(shape), " (", n, " elements)");
  Array a;
  a.dtype = dtype;
  a.shape = std::move(shape);
  a.bytes.resize(static_cast<std::size_t>(n * dtype_size(dtype)));
  switch (dtype) {
    case DType::f16:
      encode_all<f16>(values, a.bytes.data());
      break;
    case DType::bf16:
      encode_all<bf16>(values, a.bytes.data());
      break;
    case DType::fp8_e4m3:
      encode_all<fp8_e4m3>(values, a.bytes.data());
      break;
    case DType::fp8_e5m2:
      encode_all<fp8_e5m2>(values, a.bytes.data());
      break;
    case DType::f32:
      if (n) std::memcpy(a.bytes.data(), values.data(), values.size_bytes());
      break;
    case DType::f64:
      for (std::size_t i = 0; i < values.size(); ++i) {
        const double x = values[i];
        std::memcpy(a.bytes.data() + i * sizeof x, &x, sizeof x);
      }
      break;
    case DType::i32:
    case DType::u8:
      KVC_FAIL("from_float: dtype ", dtype_name(dtype),
               " is an integer type; allowed: f16, bf16, f32, f64, fp8_e4m3, fp8_e5m2 (use "
               "from_int32 for i32)");
  }
  return a;
}

Array Array::from_int32(std::span<const std::int32_t> values, std::vector<std::int64_t> shape) {
  const std::int64_t n = checked_numel(shape);
  KVC_CHECK(static_cast<std::int64_t>(values.size()) == n, "from_int32: ", values.size(),
            " values for shape ", shape_string(shape), " (", n, " elements)");
  Array a;
  a.dtype = DType::i32;
  a.shape = std::move(shape);
  a.bytes.resize(values.size_bytes());
  if (n) std::memcpy(a.bytes.data(), values.data(), values.size_bytes());
  return a;
}

void check_shape(const Array& a, std::string_view name, std::span<const std::int64_t> expected) {
  bool ok = a.shape.size() == expected.size();
  for (std::size_t i = 0; ok && i < expected.size(); ++i)
    ok = expected[i] == -1 || expected[i] == a.shape[i];
  if (ok) return;
  std::string wanted = "[";
  for (std::size_t i = 0; i < expected.size(); ++i) {
    if (i) wanted += ", ";
    wanted += expected[i] == -1 ? std::string("*") : std::to_string(expected[i]);
  }
  wanted += "]";
  KVC_FAIL(name, ": expected shape ", wanted, ", got ", shape_string(a.shape));
}

}  // namespace kvc
