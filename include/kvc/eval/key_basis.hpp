// kvc/eval/key_basis.hpp: calibration of key bases (Loki PCA, Palu-style SVD) from a KV dump and
// their .safetensors files (docs/formats.md, "Key bases").
//
//   kvc::KeyBasis pca = kvc::calibrate_loki(kvc::load_dump("tests/data/seq1"));
//   kvc::write_key_basis("loki.safetensors", pca, "tests/data/seq1");
//   const kvc::KeyBasis* b = kvc::shared_key_basis("loki.safetensors", "loki");
//
// calibrate_loki: per layer and KV head, the principal components of the post-RoPE keys of every
// token (mean-centred covariance; Loki's PCA), all D of them, with their explained-variance shares.
// calibrate_palu: per layer and group of g KV heads, the top r right singular vectors of the
// pre-RoPE keys [T, g*D] (k_prerope; not centred), r = round(ratio * g * D) (at least 1), with each
// direction's share of the squared singular values.
#pragma once

#include <filesystem>
#include <string>

#include "kvc/eval/dump.hpp"
#include "kvc/policies/keyproj/key_basis.hpp"

namespace kvc {

KeyBasis calibrate_loki(const KvDump& dump);
KeyBasis calibrate_palu(const KvDump& dump, int group_heads, double ratio);

void write_key_basis(const std::filesystem::path& path, const KeyBasis& basis,
                     const std::string& source);
// Reads a basis and checks it was written by `kvc calibrate <method>`.
KeyBasis read_key_basis(const std::filesystem::path& path, const std::string& method);
// One immutable basis per file for the process lifetime (what the registry hands policies).
const KeyBasis* shared_key_basis(const std::filesystem::path& path, const std::string& method);

}  // namespace kvc
