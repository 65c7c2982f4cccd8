// kvc/eval/npy.hpp: NumPy .npy files (format versions 1.0, 2.0 and 3.0) to and from kvc::Array.
//
//   kvc::Array k = kvc::read_npy("tests/data/seq0/k.npy");       // f16 [L, Hkv, T, D]
//   kvc::write_npy("/tmp/k32.npy", kvc::Array::from_float(k.to_float(), k.shape, kvc::DType::f32));
//
// Read: little-endian '<f2' '<f4' '<f8' '<i4', and '|u1' / '<u1'; C order only; any rank (0-d
// included). The data must fill the file exactly: a short file or trailing bytes are errors naming
// the file and both byte counts. Write: version 1.0 (2.0 when the header exceeds 65535 bytes), the
// header padded with spaces and a final '\n' so that the data starts at a multiple of 64 bytes.
// bf16 and fp8 arrays cannot be written (.npy has no such dtypes).
#pragma once

#include <filesystem>

#include "kvc/eval/array.hpp"

namespace kvc {

Array read_npy(const std::filesystem::path& path);
void write_npy(const std::filesystem::path& path, const Array& array);

}  // namespace kvc
