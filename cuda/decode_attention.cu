// cuda/decode_attention.cu: batched dense decode attention (kvc::ops::decode_attention, Cuda).
//
// One block per (split of the tokens, KV head, sequence). The block's threads are cut into token
// slots of D/8 lanes; a slot reads one whole K row and one V row per token with 16-byte loads, and
// the G query heads of the GQA group reuse every load. Each slot keeps an online softmax
// (max, sum, accumulator) per query head; the slots are merged in shared memory, and the splits by
// a second kernel (flash-decoding), all with base-2 exponentials on log2(e)-scaled scores.
//
// With kScores (decode_attention_with_scores) the same kernels also produce each key's attention
// probabilities summed over the GQA group. A probability needs the head's final max M and
// normaliser L, known only after the merge, so each split stores its keys' raw scores (fp32, the
// G heads of a key side by side) in the workspace; the merge kernel gets extra blocks that rebuild
// M and L of their G heads from the splits' partials and turn the raw scores into
// exp2(s - M) / L (s <= M, so no overflow), rounded and summed over the group into the caller's
// buffer. With a single split the block does that itself at its end. K is read once.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>

#include "check.cuh"
#include "kvc/core/dispatch.hpp"
#include "kvc/ops/attention.hpp"
#include "split_merge.cuh"

namespace kvc::ops {
namespace {

constexpr int kThreads = 128;
using split_merge::SplitPlan;

template <class T>
struct DecodeParams {
  const T* q;
  const T* k;
  const T* v;
  const std::int32_t* lengths;
  T* out;
  float* workspace;  // acc [B, Hq, splits, D], then max [B, Hq, splits], then sum [B, Hq, splits]
  std::int64_t q_batch, q_head;           // strides of q [B, Hq, D]
  std::int64_t k_batch, k_head, k_token;  // strides of k [B, Hkv, Tmax, D]
  std::int64_t v_batch, v_head, v_token;  // strides of v
  std::int64_t out_batch, out_head;       // strides of out [B, Hq, D]
  int batch, q_heads, max_length, chunk, splits;
  float scale_log2;  // softmax scale * log2(e)
  // kScores only:
  float* scores;      // [B, Hkv, Tmax], strides below
  float* raw_scores;  // [B, Hkv, Tmax, G] log2-scaled scores, in the workspace after the partials
  std::int64_t scores_batch, scores_head, scores_token;
  int kv_heads;
  bool accumulate, round_f16;
};

// Tokens per score block of the merge kernel: 8 per thread.
template <int D>
constexpr int kScoreTile = 8 * D;

// The G raw scores of one key (16-byte aligned for G >= 4, see raw_scores_offset). Plain loads:
// with a single split the same block has just written them.
template <int G>
__device__ inline void load_raw(const float* src, float (&s)[G]) {
  if constexpr (G % 4 == 0) {
#pragma unroll
    for (int i = 0; i < G / 4; ++i) {
      const float4 x = reinterpret_cast<const float4*>(src)[i];
      s[4 * i] = x.x, s[4 * i + 1] = x.y, s[4 * i + 2] = x.z, s[4 * i + 3] = x.w;
    }
  } else if constexpr (G == 2) {
    const float2 x = *reinterpret_cast<const float2*>(src);
    s[0] = x.x, s[1] = x.y;
  } else {
    s[0] = *src;
  }
}

// Scores of tokens [first, last) of (b, kv_head), given the final max and 1 / normaliser of each of
// the G heads (log2 domain). Tokens at or beyond the length are left alone; an invalid length
// fills [first, last) with NaN.
template <class T, int G>
__device__ void write_scores(const DecodeParams<T>& p, int b, int kv_head, int first, int last,
                             int length, bool valid_length, const float* head_max,
                             const float* head_inv_sum, int thread, int threads) {
  float* row = p.scores + b * p.scores_batch + kv_head * p.scores_head;
  if (!valid_length) {
    for (int t = first + thread; t < last; t += threads) row[t * p.scores_token] = NAN;
    return;
  }
  const float* raw =
      p.raw_scores + (static_cast<std::int64_t>(b) * p.kv_heads + kv_head) * p.max_length * G;
  float m[G], inv[G];
#pragma unroll
  for (int h = 0; h < G; ++h) m[h] = head_max[h], inv[h] = head_inv_sum[h];
  const int end = min(last, length);
  for (int t = first + thread; t < end; t += threads) {
    float s[G];
    load_raw<G>(raw + static_cast<std::int64_t>(t) * G, s);
    float sum = 0.0f;
#pragma unroll
    for (int h = 0; h < G; ++h) {
      float probability = exp2f(s[h] - m[h]) * inv[h];
      if (p.round_f16) probability = __half2float(__float2half_rn(probability));
      sum += probability;
    }
    float* dst = row + static_cast<std::int64_t>(t) * p.scores_token;
    *dst = p.accumulate ? *dst + sum : sum;
  }
}

__device__ inline void to_floats(const uint4& raw, float (&x)[8], const __nv_bfloat16*) {
  const auto* pairs = reinterpret_cast<const __nv_bfloat162*>(&raw);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = __bfloat1622float2(pairs[i]);
    x[2 * i] = f.x;
    x[2 * i + 1] = f.y;
  }
}
__device__ inline void to_floats(const uint4& raw, float (&x)[8], const __half*) {
  const auto* pairs = reinterpret_cast<const __half2*>(&raw);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = __half22float2(pairs[i]);
    x[2 * i] = f.x;
    x[2 * i + 1] = f.y;
  }
}
__device__ inline __nv_bfloat16 from_float(float x, const __nv_bfloat16*) {
  return __float2bfloat16_rn(x);
}
__device__ inline __half from_float(float x, const __half*) { return __float2half_rn(x); }

template <class T>
__device__ inline uint4 load16(const T* p) {
  return __ldg(reinterpret_cast<const uint4*>(p));
}

template <class T, int D, int G, bool kScores>
__global__ void __launch_bounds__(kThreads) decode_split_kernel(DecodeParams<T> p) {
  constexpr int kLanes = D / 8;              // lanes per token slot: 8 channels each
  constexpr int kSlots = kThreads / kLanes;  // token slots per block
  constexpr int kUnroll = G >= 8 ? 2 : 4;    // tokens per slot in flight
  const int split = blockIdx.x, kv_head = blockIdx.y, b = blockIdx.z;
  const int lane = threadIdx.x % kLanes, slot = threadIdx.x / kLanes;
  const int channel = lane * 8;
  const int length = p.lengths[b];
  const bool valid_length = length >= 0 && length <= p.max_length;
  const int begin = split * p.chunk;
  const int end = valid_length ? min(length, begin + p.chunk) : begin;

  float q[G][8];
#pragma unroll
  for (int h = 0; h < G; ++h) {
    to_floats(load16(p.q + b * p.q_batch + (kv_head * G + h) * p.q_head + channel), q[h],
              static_cast<const T*>(nullptr));
#pragma unroll
    for (int c = 0; c < 8; ++c) q[h][c] *= p.scale_log2;
  }
  float running_max[G], running_sum[G], acc[G][8];
#pragma unroll
  for (int h = 0; h < G; ++h) {
    running_max[h] = -INFINITY;
    running_sum[h] = 0.0f;
#pragma unroll
    for (int c = 0; c < 8; ++c) acc[h][c] = 0.0f;
  }

  const T* k_base = p.k + b * p.k_batch + kv_head * p.k_head + channel;
  const T* v_base = p.v + b * p.v_batch + kv_head * p.v_head + channel;
  // Every thread runs the same number of iterations, so the shuffles below see whole warps.
  for (int base = begin; base < end; base += kSlots * kUnroll) {
    uint4 k_raw[kUnroll], v_raw[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int t = min(base + u * kSlots + slot, end - 1);  // masked tokens re-read a valid row
      k_raw[u] = load16(k_base + t * p.k_token);
      v_raw[u] = load16(v_base + t * p.v_token);
    }
    float score[kUnroll][G];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      float key[8];
      to_floats(k_raw[u], key, static_cast<const T*>(nullptr));
      const bool in_range = base + u * kSlots + slot < end;
#pragma unroll
      for (int h = 0; h < G; ++h) {
        float dot = 0.0f;
#pragma unroll
        for (int c = 0; c < 8; ++c) dot = fmaf(q[h][c], key[c], dot);
#pragma unroll
        for (int offset = kLanes / 2; offset > 0; offset /= 2)
          dot += __shfl_xor_sync(0xffffffffu, dot, offset);
        score[u][h] = in_range ? dot : -INFINITY;
      }
    }
    if constexpr (kScores) {
      // Lane h of the slot stores head h's score: a slot writes its key's G floats contiguously.
      float* raw =
          p.raw_scores + (static_cast<std::int64_t>(b) * p.kv_heads + kv_head) * p.max_length * G;
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int t = base + u * kSlots + slot;
        float mine = score[u][0];
#pragma unroll
        for (int h = 1; h < G; ++h) mine = lane == h ? score[u][h] : mine;
        if (lane < G && t < end) raw[static_cast<std::int64_t>(t) * G + lane] = mine;
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      float value[8];
      to_floats(v_raw[u], value, static_cast<const T*>(nullptr));
#pragma unroll
      for (int h = 0; h < G; ++h) {
        if (score[u][h] == -INFINITY) continue;
        const float new_max = fmaxf(running_max[h], score[u][h]);
        const float correction = exp2f(running_max[h] - new_max);  // 0 while the max is -inf
        const float weight = exp2f(score[u][h] - new_max);
        running_sum[h] = running_sum[h] * correction + weight;
#pragma unroll
        for (int c = 0; c < 8; ++c) acc[h][c] = fmaf(weight, value[c], acc[h][c] * correction);
        running_max[h] = new_max;
      }
    }
  }

  // Merge the slots of the block.
  __shared__ float slot_max[kSlots][G], slot_sum[kSlots][G];
  __shared__ float slot_acc[kSlots][G][D];
  __shared__ float head_max[G], head_inv_sum[G];  // kScores with one split
#pragma unroll
  for (int h = 0; h < G; ++h) {
    if (lane == 0) {
      slot_max[slot][h] = running_max[h];
      slot_sum[slot][h] = running_sum[h];
    }
#pragma unroll
    for (int c = 0; c < 8; ++c) slot_acc[slot][h][channel + c] = acc[h][c];
  }
  __syncthreads();
  for (int i = threadIdx.x; i < G * D; i += kThreads) {
    const int h = i / D, d = i % D;
    float block_max = -INFINITY;
    for (int s = 0; s < kSlots; ++s) block_max = fmaxf(block_max, slot_max[s][h]);
    float sum = 0.0f, total = 0.0f;
    if (block_max != -INFINITY) {
      for (int s = 0; s < kSlots; ++s) {
        const float w = exp2f(slot_max[s][h] - block_max);
        sum += slot_sum[s][h] * w;
        total += slot_acc[s][h][d] * w;
      }
    }
    const int q_head = kv_head * G + h;
    if constexpr (kScores) {
      if (p.splits == 1 && d == 0) {
        head_max[h] = block_max;
        head_inv_sum[h] = sum > 0.0f ? 1.0f / sum : 0.0f;
      }
    }
    if (p.splits == 1) {
      const float o = !valid_length ? NAN : (sum > 0.0f ? total / sum : 0.0f);
      p.out[b * p.out_batch + q_head * p.out_head + d] =
          from_float(o, static_cast<const T*>(nullptr));
    } else {
      const std::int64_t row =
          (static_cast<std::int64_t>(b) * p.q_heads + q_head) * p.splits + split;
      p.workspace[row * D + d] = valid_length ? total : NAN;
      if (d == 0) {
        const std::int64_t partials = static_cast<std::int64_t>(p.batch) * p.q_heads * p.splits;
        p.workspace[partials * D + row] = block_max;
        p.workspace[partials * (D + 1) + row] = sum;
      }
    }
  }
  if constexpr (kScores) {
    if (p.splits == 1) {
      __syncthreads();  // head_max / head_inv_sum, and the raw scores the block wrote
      write_scores<T, G>(p, b, kv_head, 0, p.max_length, length, valid_length, head_max,
                         head_inv_sum, threadIdx.x, kThreads);
    }
  }
}

// A score block of the merge kernel: tokens [tile * kScoreTile, ...) of one (sequence, KV head).
// Warp w rebuilds the final max and normaliser of heads w, w + D/32, ... from the split partials
// (the same sums as the output merge, in another order).
template <class T, int D, int G>
__device__ void merge_scores(const DecodeParams<T>& p, int index) {
  __shared__ float head_max[G], head_inv_sum[G];
  const int tiles = (p.max_length + kScoreTile<D> - 1) / kScoreTile<D>;
  const int tile = index % tiles, pair = index / tiles;
  const int kv_head = pair % p.kv_heads, b = pair / p.kv_heads;
  const int length = p.lengths[b];
  const bool valid_length = length >= 0 && length <= p.max_length;
  const int first = tile * kScoreTile<D>;
  const int last = min(first + kScoreTile<D>, p.max_length);
  if (valid_length && first >= length) return;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const std::int64_t partials = static_cast<std::int64_t>(p.batch) * p.q_heads * p.splits;
  for (int h = warp; h < G; h += D / 32) {
    const std::int64_t first_partial =
        (static_cast<std::int64_t>(b) * p.q_heads + kv_head * G + h) * p.splits;
    const float* maxima = p.workspace + partials * D + first_partial;
    const float* sums = p.workspace + partials * (D + 1) + first_partial;
    float m = -INFINITY;
    for (int s = lane; s < p.splits; s += 32) m = fmaxf(m, maxima[s]);
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2)
      m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, offset));
    float l = 0.0f;
    if (m != -INFINITY)
      for (int s = lane; s < p.splits; s += 32) l += sums[s] * exp2f(maxima[s] - m);
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) l += __shfl_xor_sync(0xffffffffu, l, offset);
    if (lane == 0) {
      head_max[h] = m;
      head_inv_sum[h] = l > 0.0f ? 1.0f / l : 0.0f;
    }
  }
  __syncthreads();
  write_scores<T, G>(p, b, kv_head, first, last, length, valid_length, head_max, head_inv_sum,
                     threadIdx.x, D);
}

// One block of D threads per (sequence, query head): merges the splits' partials. The splits'
// maxima and weights go through shared memory once, so the loop over splits issues only the
// coalesced accumulator loads, several in flight per thread. With kScores, the blocks after the
// B * Hq merge blocks are score blocks (merge_scores), independent of the merge blocks.
template <class T, int D, int G, bool kScores>
__global__ void __launch_bounds__(D) decode_merge_kernel(DecodeParams<T> p) {
  if constexpr (kScores) {
    const int outputs = p.batch * p.q_heads;
    if (static_cast<int>(blockIdx.x) >= outputs) {
      merge_scores<T, D, G>(p, static_cast<int>(blockIdx.x) - outputs);
      return;
    }
  }
  const int b = blockIdx.x / p.q_heads, q_head = blockIdx.x % p.q_heads, d = threadIdx.x;
  const float o =
      split_merge::merge_split_partials<D>(p.workspace, p.batch, p.q_heads, p.splits, b, q_head);
  p.out[b * p.out_batch + q_head * p.out_head + d] = from_float(o, static_cast<const T*>(nullptr));
}

// About 16 blocks per SM; chunks of whole 64-token steps.
SplitPlan plan_splits(int batch, int kv_heads, int max_length) {
  return split_merge::plan_splits(batch, kv_heads, max_length, 16, 64);
}

using HeadDims = ValueList<64, 128>;
using GroupSizes = ValueList<1, 2, 4, 8>;

std::size_t partial_floats(const SplitPlan& plan, int batch, int q_heads, int head_dim) {
  if (plan.splits == 1) return 0;
  return static_cast<std::size_t>(batch) * q_heads * plan.splits * (head_dim + 2);
}

// The raw scores start on a 16-byte boundary of the (16-byte aligned) workspace, so a key's G >= 4
// floats load as float4.
std::size_t raw_scores_offset(const SplitPlan& plan, int batch, int q_heads, int head_dim) {
  return (partial_floats(plan, batch, q_heads, head_dim) + 3) / 4 * 4;
}

// The scores side of decode_attention_with_scores; absent for the plain op.
struct ScoreOutput {
  DeviceView<float, 3> scores;  // [B, Hkv, Tmax]
  ScoreOptions options;
};

template <bool kScores, class Storage, class Native>
void run_decode(Cuda stream, DeviceView<const Storage, 3> q, DeviceView<const Storage, 4> k,
                DeviceView<const Storage, 4> v, DeviceView<const std::int32_t, 1> lengths,
                DeviceView<Storage, 3> out, const ScoreOutput* score_output,
                DeviceView<float, 1> workspace, const AttentionOptions& options) {
  const char* op = kScores ? "decode_attention_with_scores(cuda)" : "decode_attention(cuda)";
  const std::int64_t batch = q.size(0), q_heads = q.size(1), d = q.size(2);
  const std::int64_t kv_heads = k.size(1), max_length = k.size(2);
  KVC_CHECK(
      k.size(0) == batch && v.size(0) == batch && out.size(0) == batch && lengths.size(0) == batch,
      op, ": batch sizes differ: q ", batch, ", k ", k.size(0), ", v ", v.size(0), ", out ",
      out.size(0), ", lengths ", lengths.size(0));
  KVC_CHECK(v.size(1) == kv_heads && v.size(2) == max_length && k.size(3) == d && v.size(3) == d &&
                out.size(1) == q_heads && out.size(2) == d,
            op, ": shapes must be q [B, Hq, D], k and v [B, Hkv, Tmax, D], out [B, Hq, D]; got k [",
            k.size(0), ", ", k.size(1), ", ", k.size(2), ", ", k.size(3), "], v [", v.size(0), ", ",
            v.size(1), ", ", v.size(2), ", ", v.size(3), "]");
  KVC_CHECK(kv_heads >= 1 && q_heads % kv_heads == 0, op, ": Hq = ", q_heads,
            " must be a multiple of Hkv = ", kv_heads);
  KVC_CHECK(q.strides[2] == 1 && k.strides[3] == 1 && v.strides[3] == 1 && out.strides[2] == 1, op,
            ": the head_dim axis must be contiguous (stride 1)");
  using cuda_detail::rows_aligned16;
  KVC_CHECK(rows_aligned16(q.data, {q.strides[0], q.strides[1]}) &&
                rows_aligned16(k.data, {k.strides[0], k.strides[1], k.strides[2]}) &&
                rows_aligned16(v.data, {v.strides[0], v.strides[1], v.strides[2]}),
            op,
            ": q, k and v rows must start on 16-byte boundaries (pointers aligned to 16 bytes, "
            "strides multiples of 8 elements)");
  if constexpr (kScores) {
    const auto& scores = score_output->scores;
    KVC_CHECK(scores.size(0) == batch && scores.size(1) == kv_heads && scores.size(2) == max_length,
              op, ": scores has shape [", scores.size(0), ", ", scores.size(1), ", ",
              scores.size(2), "]; expected [B, Hkv, Tmax] = [", batch, ", ", kv_heads, ", ",
              max_length, "]");
    KVC_CHECK(reinterpret_cast<std::uintptr_t>(workspace.data) % 16 == 0, op,
              ": the workspace must be 16-byte aligned");
  }
  const SplitPlan plan = plan_splits(static_cast<int>(batch), static_cast<int>(kv_heads),
                                     static_cast<int>(max_length));
  const auto workspace_floats =
      kScores ? decode_attention_with_scores_workspace_floats : decode_attention_workspace_floats;
  const std::size_t needed = workspace_floats(static_cast<int>(batch), static_cast<int>(q_heads),
                                              static_cast<int>(kv_heads), static_cast<int>(d),
                                              static_cast<int>(max_length));
  KVC_CHECK(static_cast<std::size_t>(workspace.size(0)) >= needed, op, ": workspace has ",
            workspace.size(0), " floats, needs ", needed);
  if (batch == 0 || q_heads == 0) return;

  DecodeParams<Native> p{};
  p.q = reinterpret_cast<const Native*>(q.data);
  p.k = reinterpret_cast<const Native*>(k.data);
  p.v = reinterpret_cast<const Native*>(v.data);
  p.lengths = lengths.data;
  p.out = reinterpret_cast<Native*>(out.data);
  p.workspace = workspace.data;
  p.q_batch = q.strides[0], p.q_head = q.strides[1];
  p.k_batch = k.strides[0], p.k_head = k.strides[1], p.k_token = k.strides[2];
  p.v_batch = v.strides[0], p.v_head = v.strides[1], p.v_token = v.strides[2];
  p.out_batch = out.strides[0], p.out_head = out.strides[1];
  p.batch = static_cast<int>(batch);
  p.q_heads = static_cast<int>(q_heads);
  p.max_length = static_cast<int>(max_length);
  p.chunk = plan.chunk;
  p.splits = plan.splits;
  const float scale =
      options.scale > 0.0f ? options.scale : 1.0f / std::sqrt(static_cast<float>(d));
  p.scale_log2 = scale * 1.4426950408889634f;
  p.kv_heads = static_cast<int>(kv_heads);
  if constexpr (kScores) {
    const auto& scores = score_output->scores;
    p.scores = scores.data;
    p.scores_batch = scores.strides[0], p.scores_head = scores.strides[1];
    p.scores_token = scores.strides[2];
    p.raw_scores =
        workspace.data + raw_scores_offset(plan, p.batch, p.q_heads, static_cast<int>(d));
    p.accumulate = score_output->options.update == ScoreUpdate::accumulate;
    p.round_f16 = score_output->options.round_f16;
  }

  cudaStream_t native_stream = stream.stream;
  const std::string head_dim_name = std::string(op) + ": head_dim";
  const std::string group_name = std::string(op) + ": Hq / Hkv";
  dispatch<HeadDims>(static_cast<int>(d), head_dim_name.c_str(), [&](auto head_dim) {
    constexpr int kD = decltype(head_dim)::value;
    dispatch<GroupSizes>(static_cast<int>(q_heads / kv_heads), group_name.c_str(), [&](auto group) {
      constexpr int kG = decltype(group)::value;
      const dim3 grid(plan.splits, static_cast<unsigned>(kv_heads), static_cast<unsigned>(batch));
      decode_split_kernel<Native, kD, kG, kScores><<<grid, kThreads, 0, native_stream>>>(p);
      KVC_CUDA_CHECK_LAUNCH(native_stream);
      if (plan.splits > 1) {
        // The plain merge does not depend on G: one instantiation serves every group size.
        constexpr int kMergeG = kScores ? kG : 1;
        std::int64_t blocks = batch * q_heads;
        if constexpr (kScores)
          blocks += batch * kv_heads * ((max_length + kScoreTile<kD> - 1) / kScoreTile<kD>);
        decode_merge_kernel<Native, kD, kMergeG, kScores>
            <<<static_cast<unsigned>(blocks), kD, 0, native_stream>>>(p);
        KVC_CUDA_CHECK_LAUNCH(native_stream);
      }
    });
  });
}

}  // namespace

std::size_t decode_attention_workspace_floats(int batch, int q_heads, int kv_heads, int head_dim,
                                              int max_length) {
  return partial_floats(plan_splits(batch, kv_heads, max_length), batch, q_heads, head_dim);
}

std::size_t decode_attention_with_scores_workspace_floats(int batch, int q_heads, int kv_heads,
                                                          int head_dim, int max_length) {
  const SplitPlan plan = plan_splits(batch, kv_heads, max_length);
  return raw_scores_offset(plan, batch, q_heads, head_dim) +
         static_cast<std::size_t>(batch) * q_heads * std::max(max_length, 0);
}

void decode_attention(Cuda stream, DeviceView<const bf16, 3> q, DeviceView<const bf16, 4> k,
                      DeviceView<const bf16, 4> v, DeviceView<const std::int32_t, 1> lengths,
                      DeviceView<bf16, 3> out, DeviceView<float, 1> workspace,
                      const AttentionOptions& options) {
  run_decode<false, bf16, __nv_bfloat16>(stream, q, k, v, lengths, out, nullptr, workspace,
                                         options);
}

void decode_attention(Cuda stream, DeviceView<const f16, 3> q, DeviceView<const f16, 4> k,
                      DeviceView<const f16, 4> v, DeviceView<const std::int32_t, 1> lengths,
                      DeviceView<f16, 3> out, DeviceView<float, 1> workspace,
                      const AttentionOptions& options) {
  run_decode<false, f16, __half>(stream, q, k, v, lengths, out, nullptr, workspace, options);
}

void decode_attention_with_scores(Cuda stream, DeviceView<const bf16, 3> q,
                                  DeviceView<const bf16, 4> k, DeviceView<const bf16, 4> v,
                                  DeviceView<const std::int32_t, 1> lengths,
                                  DeviceView<bf16, 3> out, DeviceView<float, 3> scores,
                                  DeviceView<float, 1> workspace, const ScoreOptions& score_options,
                                  const AttentionOptions& options) {
  const ScoreOutput score_output{scores, score_options};
  run_decode<true, bf16, __nv_bfloat16>(stream, q, k, v, lengths, out, &score_output, workspace,
                                        options);
}

void decode_attention_with_scores(Cuda stream, DeviceView<const f16, 3> q,
                                  DeviceView<const f16, 4> k, DeviceView<const f16, 4> v,
                                  DeviceView<const std::int32_t, 1> lengths, DeviceView<f16, 3> out,
                                  DeviceView<float, 3> scores, DeviceView<float, 1> workspace,
                                  const ScoreOptions& score_options,
                                  const AttentionOptions& options) {
  const ScoreOutput score_output{scores, score_options};
  run_decode<true, f16, __half>(stream, q, k, v, lengths, out, &score_output, workspace, options);
}

}  // namespace kvc::ops
