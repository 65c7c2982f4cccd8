// cuda/split_merge.cuh (private): the flash-decoding split plan and the merge of the splits'
// partials, shared by the dense and the quantized decode attention kernels (same workspace layout).
//
//   const SplitPlan plan = plan_splits(batch, kv_heads, max_length, /*blocks per SM*/ 16, 64);
//   const float o = merge_split_partials<D>(workspace, batch, q_heads, splits, b, q_head);
//   (split_weight and merged_output: its arithmetic, for merges that read the partials elsewhere)
//
// Workspace layout of the B * Hq * S partials (S = splits, row r = (b * Hq + q_head) * S + s):
// accumulators [rows, D], then the rows' maxima (log2 domain) [rows], then their exp-sums [rows].
// A split of an invalid sequence writes NaN accumulators, and the merge passes the NaN on.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "check.cuh"
#include "ptx.cuh"

namespace kvc::ops::split_merge {

inline constexpr int kMaxSplits = 128;  // bounds the merge's shared memory
inline constexpr int kMinChunk = 256;  // tokens per split at least: amortizes a block's final merge

struct SplitPlan {
  int chunk = 0;
  int splits = 1;
};

inline int multiprocessors() {
  int device = 0, count = 0;
  KVC_CUDA_CHECK(cudaGetDevice(&device));
  KVC_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
  return count;
}

// Enough blocks to give every SM about `blocks_per_sm`, so the last wave is short; chunks of whole
// `step`-token steps, at least kMinChunk tokens, and at most kMaxSplits splits.
inline SplitPlan plan_splits(int batch, int kv_heads, int max_length, int blocks_per_sm, int step) {
  const int target_blocks = blocks_per_sm * multiprocessors();
  const int pairs = std::max(1, batch * kv_heads);
  const int wanted = std::max(1, (target_blocks + pairs - 1) / pairs);
  int chunk = (std::max(max_length, 1) + wanted - 1) / wanted;
  chunk = std::max({chunk, kMinChunk, (max_length + kMaxSplits - 1) / kMaxSplits});
  chunk = (chunk + step - 1) / step * step;
  SplitPlan plan;
  plan.chunk = chunk;
  plan.splits = std::max(1, (max_length + chunk - 1) / chunk);
  return plan;
}

// The weight of a split with maximum `split_max` (log2 domain) under the splits' maximum m (every
// maximum -inf: every split empty, weight 0).
__device__ inline float split_weight(float split_max, float m) {
  return m == -INFINITY ? 0.0f : exp2f(split_max - m);
}

// The merged output from the weighted sums of the splits' accumulators (total) and exp-sums
// (total_weight). A split flagged invalid (a length the device found inconsistent, a refused KIVI
// key block) wrote NaN accumulators: 0 * NaN keeps it in `total` whatever that split's weight;
// first_total, split 0's accumulator, is checked as well.
__device__ inline float merged_output(float total, float total_weight, float first_total) {
  const float o = total_weight > 0.0f ? total / total_weight : 0.0f;
  return isnan(total) || isnan(total_weight) || isnan(first_total) ? NAN : o;
}

// Called by all D threads of one block for one (sequence b, query head): the merged output
// element `threadIdx.x`. The splits' maxima and exp-sums come into shared memory in one round
// trip (one split per thread), the weights are computed once per split, and each thread's
// accumulator loads go out 16 at a time (guarded, so a short last batch is still issued at once):
// batch 1 at 32K has 64 splits, where a serial thread and 8-wide batches took ~10 us.
template <int D>
__device__ float merge_split_partials(const float* workspace, int batch, int q_heads, int splits,
                                      int b, int q_head) {
  constexpr int kBatch = 16;
  __shared__ float weight[kMaxSplits], split_sum[kMaxSplits];
  __shared__ float global_max;
  const int d = threadIdx.x;
  const std::int64_t first = (static_cast<std::int64_t>(b) * q_heads + q_head) * splits;
  const std::int64_t partials = static_cast<std::int64_t>(batch) * q_heads * splits;
  const float* maxima = workspace + partials * D + first;
  const float* sums = workspace + partials * (D + 1) + first;
  for (int s = d; s < splits; s += D) weight[s] = maxima[s], split_sum[s] = sums[s];
  __syncthreads();
  if (d < 32) {
    float m = -INFINITY;
    for (int s = d; s < splits; s += 32) m = fmaxf(m, weight[s]);
    m = ptx::warp_max(m);
    if (d == 0) global_max = m;
  }
  __syncthreads();
  const float m = global_max;
  for (int s = d; s < splits; s += D) weight[s] = split_weight(weight[s], m);
  __syncthreads();
  const float* acc = workspace + first * D + d;
  float total = 0.0f, total_weight = 0.0f;
  for (int s0 = 0; s0 < splits; s0 += kBatch) {
    float a[kBatch];
#pragma unroll
    for (int j = 0; j < kBatch; ++j)
      a[j] = s0 + j < splits ? acc[static_cast<std::int64_t>(s0 + j) * D] : 0.0f;
#pragma unroll
    for (int j = 0; j < kBatch; ++j) {
      if (s0 + j >= splits) break;
      total_weight += split_sum[s0 + j] * weight[s0 + j];
      total += a[j] * weight[s0 + j];
    }
  }
  return merged_output(total, total_weight, acc[0]);
}

}  // namespace kvc::ops::split_merge
