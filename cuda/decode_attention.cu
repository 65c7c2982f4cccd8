// cuda/decode_attention.cu: batched dense decode attention (kvc::ops::decode_attention, Cuda).
//
// One block per (split of the tokens, KV head, sequence). The block's threads are cut into token
// slots of D/8 lanes; a slot reads one whole K row and one V row per token with 16-byte loads, and
// the G query heads of the GQA group reuse every load. Each slot keeps an online softmax
// (max, sum, accumulator) per query head; the slots are merged in shared memory, and the splits by
// a second kernel (flash-decoding), all with base-2 exponentials on log2(e)-scaled scores.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "check.cuh"
#include "kvc/core/dispatch.hpp"
#include "kvc/ops/attention.hpp"

namespace kvc::ops {
namespace {

constexpr int kThreads = 128;
constexpr int kMinChunk = 256;  // tokens per split at least: amortizes the block's final merge
constexpr int kMaxSplits = 128;  // bounds the merge kernel's serial loop and its shared memory

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
};

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

template <class T, int D, int G>
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
}

// One block of D threads per (sequence, query head): merges the splits' partials. The splits'
// maxima and weights go through shared memory once, so the loop over splits issues only the
// coalesced accumulator loads, several in flight per thread.
template <class T, int D>
__global__ void __launch_bounds__(D) decode_merge_kernel(DecodeParams<T> p) {
  __shared__ float weight[kMaxSplits];
  __shared__ float total_weight;
  const int b = blockIdx.x / p.q_heads, q_head = blockIdx.x % p.q_heads, d = threadIdx.x;
  const std::int64_t first = (static_cast<std::int64_t>(b) * p.q_heads + q_head) * p.splits;
  const std::int64_t partials = static_cast<std::int64_t>(p.batch) * p.q_heads * p.splits;
  const float* maxima = p.workspace + partials * D + first;
  const float* sums = p.workspace + partials * (D + 1) + first;
  for (int s = d; s < p.splits; s += D) weight[s] = maxima[s];
  __syncthreads();
  if (d == 0) {
    float global_max = -INFINITY;
    for (int s = 0; s < p.splits; ++s) global_max = fmaxf(global_max, weight[s]);
    float sum = 0.0f;
    for (int s = 0; s < p.splits; ++s) {
      weight[s] = global_max == -INFINITY ? 0.0f : exp2f(weight[s] - global_max);
      sum += sums[s] * weight[s];
    }
    total_weight = sum;
  }
  __syncthreads();
  float total = 0.0f;
  const float* acc = p.workspace + first * D + d;
#pragma unroll 8
  for (int s = 0; s < p.splits; ++s) total += acc[static_cast<std::int64_t>(s) * D] * weight[s];
  float o = total_weight > 0.0f ? total / total_weight : 0.0f;
  if (isnan(acc[0])) o = NAN;  // invalid length, flagged by the split kernel
  p.out[b * p.out_batch + q_head * p.out_head + d] = from_float(o, static_cast<const T*>(nullptr));
}

int multiprocessors() {
  int device = 0, count = 0;
  KVC_CUDA_CHECK(cudaGetDevice(&device));
  KVC_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
  return count;
}

struct SplitPlan {
  int chunk = 0;
  int splits = 1;
};

// Enough blocks to give every SM about 16, so the last wave is short; chunks of whole 64-token
// steps, at least kMinChunk tokens.
SplitPlan plan_splits(int batch, int kv_heads, int max_length) {
  SplitPlan plan;
  const int target_blocks = 16 * multiprocessors();
  const int pairs = std::max(1, batch * kv_heads);
  const int wanted = std::max(1, (target_blocks + pairs - 1) / pairs);
  int chunk = (std::max(max_length, 1) + wanted - 1) / wanted;
  chunk = std::max(kMinChunk, (chunk + 63) / 64 * 64);
  chunk = std::max(chunk, (max_length + kMaxSplits - 1) / kMaxSplits);
  chunk = (chunk + 63) / 64 * 64;
  plan.chunk = chunk;
  plan.splits = std::max(1, (max_length + chunk - 1) / chunk);
  return plan;
}

using HeadDims = ValueList<64, 128>;
using GroupSizes = ValueList<1, 2, 4, 8>;

template <class Storage, class Native>
void run_decode(Cuda stream, DeviceView<const Storage, 3> q, DeviceView<const Storage, 4> k,
                DeviceView<const Storage, 4> v, DeviceView<const std::int32_t, 1> lengths,
                DeviceView<Storage, 3> out, DeviceView<float, 1> workspace,
                const AttentionOptions& options) {
  const std::int64_t batch = q.size(0), q_heads = q.size(1), d = q.size(2);
  const std::int64_t kv_heads = k.size(1), max_length = k.size(2);
  KVC_CHECK(
      k.size(0) == batch && v.size(0) == batch && out.size(0) == batch && lengths.size(0) == batch,
      "decode_attention(cuda): batch sizes differ: q ", batch, ", k ", k.size(0), ", v ", v.size(0),
      ", out ", out.size(0), ", lengths ", lengths.size(0));
  KVC_CHECK(
      v.size(1) == kv_heads && v.size(2) == max_length && k.size(3) == d && v.size(3) == d &&
          out.size(1) == q_heads && out.size(2) == d,
      "decode_attention(cuda): shapes must be q [B, Hq, D], k and v [B, Hkv, Tmax, D], out [B, "
      "Hq, D]; got k [",
      k.size(0), ", ", k.size(1), ", ", k.size(2), ", ", k.size(3), "], v [", v.size(0), ", ",
      v.size(1), ", ", v.size(2), ", ", v.size(3), "]");
  KVC_CHECK(kv_heads >= 1 && q_heads % kv_heads == 0, "decode_attention(cuda): Hq = ", q_heads,
            " must be a multiple of Hkv = ", kv_heads);
  KVC_CHECK(q.strides[2] == 1 && k.strides[3] == 1 && v.strides[3] == 1 && out.strides[2] == 1,
            "decode_attention(cuda): the head_dim axis must be contiguous (stride 1)");
  auto aligned = [](const void* ptr, std::initializer_list<std::int64_t> strides) {
    bool ok = reinterpret_cast<std::uintptr_t>(ptr) % 16 == 0;
    for (auto s : strides) ok = ok && s % 8 == 0;
    return ok;
  };
  KVC_CHECK(aligned(q.data, {q.strides[0], q.strides[1]}) &&
                aligned(k.data, {k.strides[0], k.strides[1], k.strides[2]}) &&
                aligned(v.data, {v.strides[0], v.strides[1], v.strides[2]}),
            "decode_attention(cuda): q, k and v rows must start on 16-byte boundaries (pointers "
            "aligned to 16 bytes, strides multiples of 8 elements)");
  const SplitPlan plan = plan_splits(static_cast<int>(batch), static_cast<int>(kv_heads),
                                     static_cast<int>(max_length));
  const std::size_t needed = decode_attention_workspace_floats(
      static_cast<int>(batch), static_cast<int>(q_heads), static_cast<int>(kv_heads),
      static_cast<int>(d), static_cast<int>(max_length));
  KVC_CHECK(static_cast<std::size_t>(workspace.size(0)) >= needed,
            "decode_attention(cuda): workspace has ", workspace.size(0), " floats, needs ", needed);
  if (batch == 0 || q_heads == 0) return;

  DecodeParams<Native> p;
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

  cudaStream_t native_stream = stream.stream;
  dispatch<HeadDims>(static_cast<int>(d), "decode_attention(cuda): head_dim", [&](auto head_dim) {
    constexpr int kD = decltype(head_dim)::value;
    dispatch<GroupSizes>(
        static_cast<int>(q_heads / kv_heads), "decode_attention(cuda): Hq / Hkv", [&](auto group) {
          constexpr int kG = decltype(group)::value;
          const dim3 grid(plan.splits, static_cast<unsigned>(kv_heads),
                          static_cast<unsigned>(batch));
          decode_split_kernel<Native, kD, kG><<<grid, kThreads, 0, native_stream>>>(p);
          KVC_CUDA_CHECK_LAUNCH(native_stream);
        });
    if (plan.splits > 1) {
      decode_merge_kernel<Native, kD>
          <<<static_cast<unsigned>(batch * q_heads), kD, 0, native_stream>>>(p);
      KVC_CUDA_CHECK_LAUNCH(native_stream);
    }
  });
}

}  // namespace

std::size_t decode_attention_workspace_floats(int batch, int q_heads, int kv_heads, int head_dim,
                                              int max_length) {
  const SplitPlan plan = plan_splits(batch, kv_heads, max_length);
  if (plan.splits == 1) return 0;
  return static_cast<std::size_t>(batch) * q_heads * plan.splits * (head_dim + 2);
}

void decode_attention(Cuda stream, DeviceView<const bf16, 3> q, DeviceView<const bf16, 4> k,
                      DeviceView<const bf16, 4> v, DeviceView<const std::int32_t, 1> lengths,
                      DeviceView<bf16, 3> out, DeviceView<float, 1> workspace,
                      const AttentionOptions& options) {
  run_decode<bf16, __nv_bfloat16>(stream, q, k, v, lengths, out, workspace, options);
}

void decode_attention(Cuda stream, DeviceView<const f16, 3> q, DeviceView<const f16, 4> k,
                      DeviceView<const f16, 4> v, DeviceView<const std::int32_t, 1> lengths,
                      DeviceView<f16, 3> out, DeviceView<float, 1> workspace,
                      const AttentionOptions& options) {
  run_decode<f16, __half>(stream, q, k, v, lengths, out, workspace, options);
}

}  // namespace kvc::ops
