// kvc/eval/safetensors.hpp: .safetensors files (Hugging Face's format) to and from kvc::Array.
//
//   kvc::SafetensorsFile f = kvc::read_safetensors_file("dump.safetensors");
//   const kvc::Array& k = f.tensors.at("k");                  // [L, Hkv, T, D]
//   kvc::write_safetensors("out.safetensors", {{"k", k}}, {{"rope_theta", "10000"}});
//
// Layout: an 8-byte little-endian header size N, N bytes of JSON
//   {"<name>": {"dtype": "F16", "shape": [..], "data_offsets": [begin, end]}, ...,
//    "__metadata__": {"<key>": "<string>", ...}}
// then the data buffer; offsets are relative to the buffer. dtypes: F16, BF16, F32, F64, I32, U8,
// F8_E4M3, F8_E5M2 (read and written). Reading validates the header (valid JSON, at most 100 MB),
// every offset pair (begin <= end <= buffer size, end - begin = numel * itemsize) and that no two
// tensors overlap; each failure is a kvc::Error naming the file and the tensor.
#pragma once

#include <filesystem>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "kvc/eval/array.hpp"

namespace kvc {

struct SafetensorsFile {
  std::map<std::string, Array> tensors;
  std::map<std::string, std::string> metadata;  // the "__metadata__" object (string values only)
};

SafetensorsFile read_safetensors_file(const std::filesystem::path& path);
std::map<std::string, Array> read_safetensors(const std::filesystem::path& path);  // tensors only

// Writes the tensors in the given order, back to back, after a header padded with spaces to a
// multiple of 8 bytes. Names must be unique, non-empty and not "__metadata__".
void write_safetensors(const std::filesystem::path& path,
                       const std::vector<std::pair<std::string, Array>>& tensors,
                       const std::map<std::string, std::string>& metadata = {});

}  // namespace kvc
