// kvc/eval/cq_codebook.hpp: Coupled Quantization codebooks: k-means calibration on a KV dump, the
// .safetensors file they live in, and the process-lifetime table `kvc eval` loads them into.
//
//   kvc::CqCalibration cal = kvc::calibrate_cq(kvc::load_dump("seq1"), {.channels = 8, .bits = 8});
//   kvc::write_cq_codebook("cq.safetensors", cal.codebook, cal.options, "seq1");
//   const kvc::CqCodebook* book = kvc::shared_cq_codebook("cq.safetensors");  // never freed
//
// Calibration (plain k-means only: squared Euclidean distance, every sample weight 1; the paper's
// Fisher-guided variant needs gradients of the loss w.r.t. K/V, which KV dumps do not carry): for
// every (layer, KV head, channel group, K or V) the samples are the c-channel sub-vectors of all T
// tokens of the dump (keys pre-RoPE from k_prerope unless key_space = postrope), seeded by
// k-means++ and refined by Lloyd iterations. File layout: docs/formats.md, "Coupled Quantization".
#pragma once

#include <cstdint>
#include <filesystem>
#include <span>
#include <string>
#include <vector>

#include "kvc/eval/dump.hpp"
#include "kvc/policies/quant/coupled.hpp"

namespace kvc {

struct KmeansResult {
  std::vector<float> centroids;   // [k, c]
  std::vector<double> objective;  // [1 + iterations run]: after seeding, then after each iteration
};

// k-means of n points [n, c] into k centroids. Seeding: k-means++ with a SplitMix64 stream seeded
// by `seed` (the first centroid is point floor(u * n); each next one is drawn with probability
// proportional to the squared distance to the nearest chosen centroid; when every distance is 0 a
// uniformly drawn point is duplicated). Lloyd iterations: assign each point to its nearest centroid
// (cq_nearest: ties to the lower index), then move each centroid to the mean of its points (double
// accumulation, rounded to float); an empty cluster, or a mean whose rounding would raise the
// cluster's cost, keeps the old centroid, so the objective (sum of squared distances, in double)
// never increases. Stops after `iterations` or when no assignment changes. Deterministic: same
// inputs and seed give the same bits on every platform (no std distributions).
KmeansResult kmeans(std::span<const float> points, int n, int c, int k, int iterations,
                    std::uint64_t seed);

struct CqCalibrateOptions {
  int channels = 8;  // c
  int bits = 8;      // b
  int iterations = 25;
  std::uint64_t seed = 0;
  CqKeySpace key_space = CqKeySpace::prerope;
};

struct CqCalibration {
  CqCodebook codebook;
  CqCalibrateOptions options;
  // Per (layer, head, group, K then V): the k-means objective before and after refinement.
  std::vector<double> initial_objective, final_objective;
};

// Each (layer, head, group, tensor) table uses the seed seed + 1 + its flat index
// ((((layer * Hkv + head) * groups + group) * 2 + (0 for K, 1 for V)).
CqCalibration calibrate_cq(const KvDump& dump, const CqCalibrateOptions& options);

void write_cq_codebook(const std::filesystem::path& path, const CqCodebook& book,
                       const CqCalibrateOptions& options, const std::string& source);
CqCodebook read_cq_codebook(const std::filesystem::path& path);

// The codebook of a file, loaded on first use into a table that lives until the process ends and
// is never modified (policies hold raw pointers into it). Thread-safe.
const CqCodebook* shared_cq_codebook(const std::filesystem::path& path);

}  // namespace kvc
