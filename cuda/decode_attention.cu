// cuda/decode_attention.cu: batched dense decode attention (kvc::ops::decode_attention, Cuda).
//
// One block per (split of the tokens, KV head, sequence), flash-decoding: a second kernel merges
// the splits (cuda/split_merge.cuh), all with base-2 exponentials on log2(e)-scaled scores. In the
// split kernel one producer thread streams the split's K and V rows into a ring of shared-memory
// stages with tensor copies (cp.async.bulk.tensor through CUtensorMaps, completion counted by
// mbarriers), so the bytes in flight do not cost registers; consumer warps take whole 32-key stages
// and do q K^T and P V on tensor cores (mma.m16n8k16, fp32 accumulation), the G query heads of the
// GQA group sharing every key and value; each consumer keeps an online softmax per head, and the
// consumers are merged in shared memory at the end of the block.
//
// With kScores (decode_attention_with_scores) the same kernels also produce each key's attention
// probabilities summed over the GQA group. A probability needs the head's final max M and
// normaliser L, known only after the merge, so each split stores its keys' raw scores (fp32, the
// G heads of a key side by side) in the workspace; the merge kernel gets extra blocks that rebuild
// M and L of their G heads from the splits' partials and turn the raw scores into
// exp2(s - M) / L (s <= M, so no overflow), rounded and summed over the group into the caller's
// buffer. With a single split the block does that itself at its end. K is read once.
#include <cuda.h>  // CUtensorMap and its enums (the driver entry point comes through the runtime)
#include <cudaTypedefs.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <type_traits>

#include "check.cuh"
#include "kvc/core/dispatch.hpp"
#include "kvc/ops/attention.hpp"
#include "launch.cuh"
#include "ptx.cuh"
#include "split_merge.cuh"

namespace kvc::ops {
namespace {

using namespace ptx;  // ldmatrix, mma.sync

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

__device__ inline __nv_bfloat16 from_float(float x, const __nv_bfloat16*) {
  return __float2bfloat16_rn(x);
}
__device__ inline __half from_float(float x, const __half*) { return __float2half_rn(x); }

// ---- The split kernel: K/V tiles by TMA into a shared-memory ring, math on tensor cores.
//
// One elected thread of warp kConsumers is the producer: it copies a stage's 32 keys and 32 values
// with cp.async.bulk.tensor through the K and V tensor maps (CUtensorMap, encoded on the host over
// the [B, Hkv, Tmax, D] views, so any row stride works), the stage's mbarrier counting the bytes.
// The copies are made by the tensor memory accelerator, not by a thread: compute-sanitizer's
// racecheck does not attribute their shared-memory writes to the issuing thread (it did for raw
// cp.async.bulk, reporting hazards against the consumers' reads that the mbarriers order).
// Consumer warp w takes stages w, w + kConsumers, ...: for its 32 keys
//   S = q K^T  as mma.m16n8k16, m = the G heads (rows >= G are zero), n = 8 keys, k = 16 channels;
//   online softmax on S (thread (g, t) holds head g and 8 of the keys);
//   O^T += V^T P^T  as mma.m16n8k16, m = 16 channels, n = heads, k = 16 keys: S's accumulator
//   layout is P^T's operand layout, so the probabilities never leave the registers.
// q and K are exact in the storage type and their products exact in fp32; P is sent as three terms
// hi + mid + lo of the storage type (8 + 8 + 8 bits for bf16), i.e. p to about 2^-24, and every
// mma accumulates in fp32.
constexpr int kStageTokens = 32;  // one consumer warp per stage

// A stage holds K then V, each as D / 64 boxes of 64 channels (128 bytes) x 32 rows, written by
// the tensor copies with the 128-byte swizzle: the 16-byte chunk c of row r lies at chunk
// c ^ (r % 8) of the row (within each 1024-byte atom of 8 rows; the boxes start on 1024-byte
// boundaries). Every ldmatrix reads 8 consecutive rows at one logical chunk, i.e. 8 distinct
// physical chunks: no bank conflicts. Keys keep their order: row r of a stage is key first + r.
constexpr int kBoxChannels = 64;
constexpr int kRowBytes = kBoxChannels * 2;          // one swizzle row
constexpr int kBoxBytes = kStageTokens * kRowBytes;  // 4 KB
constexpr int kRingAlign = 1024;                     // the swizzle atom
template <int D>
constexpr int kStageBytes = 2 * (D / kBoxChannels) * kBoxBytes;  // K boxes, then V boxes
constexpr int kBarrierBytes = 128;  // after the ring: full and empty barriers, up to 8 stages

// The dynamic shared memory: the ring from the first 1024-byte boundary (slack for the rounding
// up), then the barriers.
template <int D, int kStages>
constexpr int split_smem_bytes() {
  return kRingAlign + kStages * kStageBytes<D> + kBarrierBytes;
}

// The K and V tensor maps of one call, a kernel parameter (__grid_constant__: the copies name the
// maps by their parameter address). CUtensorMap carries its own alignment (128 bytes in CUDA 13,
// above the 64 the copies need).
struct KvMaps {
  CUtensorMap k;
  CUtensorMap v;
};

__device__ inline void mbarrier_init(std::uint64_t* bar, unsigned count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(shared_address(bar)), "r"(count)
               : "memory");
}
__device__ inline void mbarrier_arrive_expect_tx(std::uint64_t* bar, unsigned bytes) {
  asm volatile(
      "mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(shared_address(bar)),
      "r"(bytes)
      : "memory");
}
__device__ inline void mbarrier_arrive(std::uint64_t* bar) {
  asm volatile("{\n .reg .b64 state;\n mbarrier.arrive.shared::cta.b64 state, [%0];\n}\n" ::"r"(
                   shared_address(bar))
               : "memory");
}
__device__ inline void mbarrier_wait(std::uint64_t* bar, unsigned parity) {
  unsigned done = 0;
  do {
    asm volatile(
        "{\n .reg .pred ready;\n mbarrier.try_wait.parity.shared::cta.b64 ready, [%1], %2;\n"
        " selp.u32 %0, 1, 0, ready;\n}\n"
        : "=r"(done)
        : "r"(shared_address(bar)), "r"(parity)
        : "memory");
  } while (!done);
}
__device__ inline void prefetch_tensor_map(const CUtensorMap* map) {
  asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<std::uint64_t>(map)) : "memory");
}
// The box of `map` at element coordinates (channel, token, head, sequence) into shared memory;
// rows past the view's Tmax arrive as zeros. The barrier's transaction count drops by the box's
// bytes when they have landed.
__device__ inline void tensor_load(void* smem_dst, const CUtensorMap* map, int channel, int token,
                                   int head, int sequence, std::uint64_t* bar) {
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.tile.mbarrier::complete_tx::bytes"
      " [%0], [%1, {%2, %3, %4, %5}], [%6];\n" ::"r"(shared_address(smem_dst)),
      "l"(reinterpret_cast<std::uint64_t>(map)), "r"(channel), "r"(token), "r"(head), "r"(sequence),
      "r"(shared_address(bar))
      : "memory");
}
// (x0, x1) rounded to a storage-type pair (x0 in the low half, the mma's lower index), and back.
__device__ inline std::uint32_t pack2(float x0, float x1, const __nv_bfloat16*) {
  const __nv_bfloat162 h = __floats2bfloat162_rn(x0, x1);
  return *reinterpret_cast<const std::uint32_t*>(&h);
}
__device__ inline std::uint32_t pack2(float x0, float x1, const __half*) {
  const __half2 h = __floats2half2_rn(x0, x1);
  return *reinterpret_cast<const std::uint32_t*>(&h);
}
__device__ inline float2 unpack2(std::uint32_t u, const __nv_bfloat16*) {
  return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&u));
}
__device__ inline float2 unpack2(std::uint32_t u, const __half*) {
  return __half22float2(*reinterpret_cast<const __half2*>(&u));
}

// x0, x1 as hi + mid + lo pairs of T: each term rounds the exact fp32 remainder of the ones before,
// so the sum equals x to about 2^-24 relative for bf16 (below 2^-25 absolute for f16, whose small
// terms go subnormal).
template <class T>
__device__ inline void split3(float x0, float x1, std::uint32_t& hi, std::uint32_t& mid,
                              std::uint32_t& lo) {
  const T* tag = nullptr;
  hi = pack2(x0, x1, tag);
  float2 f = unpack2(hi, tag);
  x0 -= f.x, x1 -= f.y;
  mid = pack2(x0, x1, tag);
  f = unpack2(mid, tag);
  lo = pack2(x0 - f.x, x1 - f.y, tag);
}

template <class T, int D, int G, bool kScores, int kStages, int kConsumers>
__global__ void __launch_bounds__(32 * (kConsumers + 1))
    decode_split_kernel(DecodeParams<T> p, const __grid_constant__ KvMaps maps) {
  cuda_detail::allow_dependent_launch();  // the merge waits for this grid's end by itself
  constexpr int kThreads = 32 * (kConsumers + 1);
  constexpr int kBoxes = D / kBoxChannels;  // per stage, of K and of V
  constexpr int kSteps = D / 16;            // k-steps of q K^T, m-tiles of V^T P^T
  static_assert(2 * kStages * 8 <= kBarrierBytes, "the ring's barriers");
  // Consumer w takes the stages s = w (mod kConsumers) and waits on full[s % kStages] by phase
  // parity, which only tells the current phase from the one before: every use of a slot must come
  // from the same warp, in order, so that no warp waits two phases ahead.
  static_assert(kStages % kConsumers == 0, "each slot has one consumer warp");
  static_assert(kConsumers * G * (D + 2) * 4 <= kStages * kStageBytes<D>,
                "the consumers' partials reuse the ring");
  const T* tag = nullptr;
  extern __shared__ __align__(1024) unsigned char smem[];
  unsigned char* ring = smem + (kRingAlign - shared_address(smem) % kRingAlign) % kRingAlign;
  auto* full = reinterpret_cast<std::uint64_t*>(ring + kStages * kStageBytes<D>);  // landed
  auto* empty = full + kStages;  // a stage's consumer is done with it

  const int split = blockIdx.x, kv_head = blockIdx.y, b = blockIdx.z;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, t = lane % 4;  // mma fragment coordinates
  const int length = p.lengths[b];
  const bool valid_length = length >= 0 && length <= p.max_length;
  const int begin = split * p.chunk;
  const int end = valid_length ? min(length, begin + p.chunk) : begin;
  const int stages = end > begin ? (end - begin + kStageTokens - 1) / kStageTokens : 0;

  if (threadIdx.x == 0) {
    for (int i = 0; i < kStages; ++i) {
      mbarrier_init(&full[i], 1);
      mbarrier_init(&empty[i], 1);
    }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  __syncthreads();

  float row_max = -INFINITY, row_sum = 0.0f;  // head g, over this thread's keys
  float acc[kSteps][4];                       // O^T: channels 16 j + g (+ 8) x heads 2t, 2t + 1
#pragma unroll
  for (int j = 0; j < kSteps; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.0f;

  if (warp == kConsumers) {
    if (lane == 0) {
      prefetch_tensor_map(&maps.k);
      prefetch_tensor_map(&maps.v);
      for (int s = 0; s < stages; ++s) {
        const int slot = s % kStages;
        if (s >= kStages) mbarrier_wait(&empty[slot], (s / kStages - 1) & 1);
        // Whole boxes count, rows past Tmax (zero-filled) included.
        mbarrier_arrive_expect_tx(&full[slot], kStageBytes<D>);
        const int first = begin + s * kStageTokens;
        unsigned char* k_dst = ring + slot * kStageBytes<D>;
        unsigned char* v_dst = k_dst + kBoxes * kBoxBytes;
#pragma unroll
        for (int box = 0; box < kBoxes; ++box) {
          tensor_load(k_dst + box * kBoxBytes, &maps.k, box * kBoxChannels, first, kv_head, b,
                      &full[slot]);
          tensor_load(v_dst + box * kBoxBytes, &maps.v, box * kBoxChannels, first, kv_head, b,
                      &full[slot]);
        }
      }
    }
    __syncwarp();
  } else {
    // q as the A operand of q K^T (row g = head g, rows >= G and g + 8 zero), unscaled: exact.
    std::uint32_t qa[kSteps][2];
#pragma unroll
    for (int j = 0; j < kSteps; ++j) qa[j][0] = qa[j][1] = 0u;
    if (g < G) {
      const T* q_row = p.q + b * p.q_batch + (kv_head * G + g) * p.q_head;
#pragma unroll
      for (int j = 0; j < kSteps; ++j) {
        qa[j][0] = *reinterpret_cast<const std::uint32_t*>(q_row + 16 * j + 2 * t);
        qa[j][1] = *reinterpret_cast<const std::uint32_t*>(q_row + 16 * j + 8 + 2 * t);
      }
    }
    float* raw = nullptr;
    if constexpr (kScores)
      raw = p.raw_scores + (static_cast<std::int64_t>(b) * p.kv_heads + kv_head) * p.max_length * G;
    // ldmatrix: lane 8 m4 + r8 gives row r8 of matrix m4. Its offsets within a stage's K / V, for
    // logical chunk m4 (K) or m4 % 2 (V) of row r8 (+ 8 (m4 / 2) for V); the loops below add
    // whole rows and boxes and flip the upper chunk bits (XOR: the swizzle is a XOR).
    const int r8 = lane % 8, m4 = lane / 8;
    const unsigned k_lane = r8 * kRowBytes + ((m4 ^ r8) << 4);
    const unsigned v_lane = (8 * (m4 / 2) + r8) * kRowBytes + (((m4 % 2) ^ r8) << 4);
    for (int s = warp; s < stages; s += kConsumers) {
      const int slot = s % kStages;
      mbarrier_wait(&full[slot], (s / kStages) & 1);
      unsigned char* stage = ring + slot * kStageBytes<D>;
      const unsigned k_tile = shared_address(stage), v_tile = k_tile + kBoxes * kBoxBytes;
      const int first = begin + s * kStageTokens;
      if (first + kStageTokens > end) {
        // V rows past the end hold whatever follows the sequence in the cache (NaN and Inf
        // included): zero them, so that their zero probabilities give exact zeros. Only the
        // split's last stage gets here, and no copy lands in its slot afterwards. K needs no
        // such care: a key's garbage reaches only its own score, masked below.
        const int valid = end - first;
        for (int i = valid * (kRowBytes / 16) + lane; i < kStageTokens * (kRowBytes / 16); i += 32)
#pragma unroll
          for (int box = 0; box < kBoxes; ++box)
            *reinterpret_cast<uint4*>(stage + (kBoxes + box) * kBoxBytes + 16 * i) =
                make_uint4(0u, 0u, 0u, 0u);
        __syncwarp();
      }

      // S = q K^T, 4 n-tiles of 8 keys (n-tile n: keys 8 n .. 8 n + 7 of the stage, rows of the
      // box); ldmatrix matrix m4 = channels 32 kk + 8 m4, logical chunk 4 (kk % 2) + m4 of box
      // kk / 2.
      float sc[4][4];
#pragma unroll
      for (int n = 0; n < 4; ++n) {
        sc[n][0] = sc[n][1] = sc[n][2] = sc[n][3] = 0.0f;
#pragma unroll
        for (int kk = 0; kk < kSteps / 2; ++kk) {
          std::uint32_t kb[4];
          ldmatrix_x4(
              kb, ((k_tile + k_lane) ^ (64 * (kk % 2))) + (kk / 2) * kBoxBytes + 8 * n * kRowBytes);
          mma16816<T>(sc[n], qa[2 * kk][0], 0u, qa[2 * kk][1], 0u, kb[0], kb[1]);
          mma16816<T>(sc[n], qa[2 * kk + 1][0], 0u, qa[2 * kk + 1][1], 0u, kb[2], kb[3]);
        }
      }
      // Thread (g, t): head g, key 8 n + 2 t + e of the stage -> x[2 n + e] (log2 domain).
      float x[8];
#pragma unroll
      for (int n = 0; n < 4; ++n) {
        x[2 * n] = sc[n][0] * p.scale_log2;
        x[2 * n + 1] = sc[n][1] * p.scale_log2;
      }
      if (first + kStageTokens > end) {
#pragma unroll
        for (int i = 0; i < 8; ++i)
          if (first + 8 * (i / 2) + 2 * t + i % 2 >= end) x[i] = -INFINITY;
      }
      if constexpr (kScores) {
        if (g < G) {
#pragma unroll
          for (int i = 0; i < 8; ++i) {
            const int token = first + 8 * (i / 2) + 2 * t + i % 2;
            if (token < end) raw[static_cast<std::int64_t>(token) * G + g] = x[i];
          }
        }
      }
      float stage_max = x[0];
#pragma unroll
      for (int i = 1; i < 8; ++i) stage_max = fmaxf(stage_max, x[i]);
      stage_max = fmaxf(stage_max, __shfl_xor_sync(0xffffffffu, stage_max, 1));
      stage_max = fmaxf(stage_max, __shfl_xor_sync(0xffffffffu, stage_max, 2));
      const float new_max = fmaxf(row_max, stage_max);    // finite: the stage's first key is valid
      const float correction = exp2f(row_max - new_max);  // 0 while the max is -inf
      row_max = new_max;
      float stage_sum = 0.0f;
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        x[i] = exp2f(x[i] - new_max);
        stage_sum += x[i];
      }
      row_sum = row_sum * correction + stage_sum;
      // The accumulator columns are heads 2t, 2t + 1: their corrections live in lanes 8t, 8t + 4.
      const float correction0 = __shfl_sync(0xffffffffu, correction, 8 * t);
      const float correction1 = __shfl_sync(0xffffffffu, correction, 8 * t + 4);
#pragma unroll
      for (int j = 0; j < kSteps; ++j) {
        acc[j][0] *= correction0, acc[j][1] *= correction1;
        acc[j][2] *= correction0, acc[j][3] *= correction1;
      }
      // O^T += V^T P^T, 2 k-steps of 16 keys, k-step ks = keys 16 ks + k. P^T's operand, column
      // g = head g: b0 = x of n-tile 2 ks (k = 2t + e), b1 = x of n-tile 2 ks + 1 (k = 8 + 2t + e).
      // V^T by ldmatrix.trans, matrix m4: keys 16 ks + 8 (m4 / 2) + r8 (the rows), channels
      // 16 j + 8 (m4 % 2), i.e. logical chunk 2 (j % 4) + m4 % 2 of box j / 4.
#pragma unroll
      for (int ks = 0; ks < 2; ++ks) {
        std::uint32_t hi[2], mid[2], lo[2];
        split3<T>(x[4 * ks], x[4 * ks + 1], hi[0], mid[0], lo[0]);
        split3<T>(x[4 * ks + 2], x[4 * ks + 3], hi[1], mid[1], lo[1]);
#pragma unroll
        for (int j = 0; j < kSteps; ++j) {
          std::uint32_t va[4];
          ldmatrix_x4_trans(
              va, ((v_tile + v_lane) ^ (32 * (j % 4))) + (j / 4) * kBoxBytes + 16 * ks * kRowBytes);
          mma16816<T>(acc[j], va[0], va[1], va[2], va[3], lo[0], lo[1]);
          mma16816<T>(acc[j], va[0], va[1], va[2], va[3], mid[0], mid[1]);
          mma16816<T>(acc[j], va[0], va[1], va[2], va[3], hi[0], hi[1]);
        }
      }
      __syncwarp();
      if (lane == 0) mbarrier_arrive(&empty[slot]);
    }
    row_sum += __shfl_xor_sync(0xffffffffu, row_sum, 1);
    row_sum += __shfl_xor_sync(0xffffffffu, row_sum, 2);
  }

  // Merge the consumers' partials of the block, in the ring (every stage has been consumed).
  __syncthreads();
  auto* slot_acc = reinterpret_cast<float*>(ring);  // [kConsumers][G][D]
  float* slot_max = slot_acc + kConsumers * G * D;  // [kConsumers][G]
  float* slot_sum = slot_max + kConsumers * G;      // [kConsumers][G]
  __shared__ float head_max[G], head_inv_sum[G];    // kScores with one split
  if (warp < kConsumers) {
    if (t == 0 && g < G) {
      slot_max[warp * G + g] = row_max;
      slot_sum[warp * G + g] = row_sum;
    }
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const int h = 2 * t + e;
      if (h < G) {
        float* dst = slot_acc + (warp * G + h) * D + g;
#pragma unroll
        for (int j = 0; j < kSteps; ++j) {
          dst[16 * j] = acc[j][e];
          dst[16 * j + 8] = acc[j][2 + e];
        }
      }
    }
  }
  __syncthreads();
  for (int i = threadIdx.x; i < G * D; i += kThreads) {
    const int h = i / D, d = i % D;
    float block_max = -INFINITY;
    for (int s = 0; s < kConsumers; ++s) block_max = fmaxf(block_max, slot_max[s * G + h]);
    float sum = 0.0f, total = 0.0f;
    if (block_max != -INFINITY) {
      for (int s = 0; s < kConsumers; ++s) {
        const float w = exp2f(slot_max[s * G + h] - block_max);
        sum += slot_sum[s * G + h] * w;
        total += slot_acc[(s * G + h) * D + d] * w;
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
      p.out[b * p.out_batch + q_head * p.out_head + d] = from_float(o, tag);
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
    m = warp_max(m);
    float l = 0.0f;
    if (m != -INFINITY)
      for (int s = lane; s < p.splits; s += 32) l += sums[s] * exp2f(maxima[s] - m);
    l = warp_sum(l);
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
  cuda_detail::wait_for_prior_grid();  // the split kernel's partials and raw scores
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

// About 16 blocks per SM (4 resident), chunks of whole 512-token steps: shorter blocks spend
// relatively more on filling the ring and merging their consumers (batch 1 at 32K: 0.070 ms with
// 512-token chunks, 0.077 with 256, H100).
SplitPlan plan_splits(int batch, int kv_heads, int max_length) {
  return split_merge::plan_splits(batch, kv_heads, max_length, 16, 512);
}

// The split kernel with its ring (dynamic shared memory beyond 48 KB must be allowed per kernel).
// 3 stages, 3 consumers: 4 blocks (51 KB each at D 128) per SM. Measured on the H100 at B 8 /
// 32K: 0.377 ms (0.96 of copy; the raw bulk copies of 4-row bands before the tensor maps: 0.395 in
// the same run). With those bulk copies, 4 stages and 4 consumers (3 blocks per SM) were 0.395 ms
// against 0.392 for 3 and 3, 8 stages and 4 consumers (one block per SM) 0.431.
template <class T, int D, int G, bool kScores>
void launch_split(const DecodeParams<T>& p, const KvMaps& maps, dim3 grid, cudaStream_t stream) {
  constexpr int kStages = 3, kConsumers = 3;
  const auto kernel = decode_split_kernel<T, D, G, kScores, kStages, kConsumers>;
  constexpr int bytes = split_smem_bytes<D, kStages>();
  cuda_detail::allow_dynamic_shared_memory(kernel, bytes);
  kernel<<<grid, 32 * (kConsumers + 1), bytes, stream>>>(p, maps);
  KVC_CUDA_CHECK_LAUNCH(stream);
}

// cuTensorMapEncodeTiled from the driver, through the runtime (no link against libcuda).
PFN_cuTensorMapEncodeTiled_v12000 tensor_map_encoder(const char* op) {
  static const PFN_cuTensorMapEncodeTiled_v12000 encode = [op] {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult status = cudaDriverEntryPointSymbolNotFound;
    KVC_CUDA_CHECK(cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000,
                                                    cudaEnableDefault, &status));
    KVC_CHECK(status == cudaDriverEntryPointSuccess && fn != nullptr, op,
              ": the driver has no cuTensorMapEncodeTiled (query status ", static_cast<int>(status),
              "); allowed: a driver of CUDA 12.0 or later");
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(fn);
  }();
  return encode;
}

// The tensor map of a [B, Hkv, Tmax, D] K or V view: dims (D, Tmax, Hkv, B) innermost first, the
// view's strides in bytes, boxes of 64 channels x 32 rows with the 128-byte swizzle, rows past
// Tmax read as zeros.
template <class Native, class Storage>
CUtensorMap kv_tensor_map(const char* op, const char* name, DeviceView<const Storage, 4> view) {
  static_assert(sizeof(Native) == 2, "16-bit storage");
  const cuuint64_t dims[4] = {
      static_cast<cuuint64_t>(view.size(3)), static_cast<cuuint64_t>(view.size(2)),
      static_cast<cuuint64_t>(view.size(1)), static_cast<cuuint64_t>(view.size(0))};
  // A dimension of size 1 is never stepped over: any legal stride does (a caller may pass 0).
  auto stride_bytes = [&](int axis) {
    return view.size(axis) == 1 ? cuuint64_t{16}
                                : static_cast<cuuint64_t>(view.strides[axis]) * sizeof(Native);
  };
  const cuuint64_t strides[3] = {stride_bytes(2), stride_bytes(1), stride_bytes(0)};
  const cuuint32_t box[4] = {kBoxChannels, kStageTokens, 1, 1};
  const cuuint32_t element_strides[4] = {1, 1, 1, 1};
  constexpr CUtensorMapDataType type = std::is_same_v<Native, __half>
                                           ? CU_TENSOR_MAP_DATA_TYPE_FLOAT16
                                           : CU_TENSOR_MAP_DATA_TYPE_BFLOAT16;
  CUtensorMap map;
  const CUresult result = tensor_map_encoder(op)(
      &map, type, 4, const_cast<Storage*>(view.data), dims, strides, box, element_strides,
      CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
      CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  KVC_CHECK(result == CUDA_SUCCESS, op, ": the tensor memory accelerator cannot read ", name, " [",
            view.size(0), ", ", view.size(1), ", ", view.size(2), ", ", view.size(3),
            "] with strides [", view.strides[0], ", ", view.strides[1], ", ", view.strides[2], ", ",
            view.strides[3], "] (elements; cuTensorMapEncodeTiled error ", static_cast<int>(result),
            "); allowed: a 16-byte aligned pointer, strides of the dimensions of size > 1 positive "
            "multiples of 8 elements below 2^39, Tmax, Hkv and B at most 2^32");
  return map;
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
      // With Tmax = 0 every length is 0 or invalid: no copy is issued (and no map can be encoded).
      KvMaps maps{};
      if (max_length > 0) {
        maps.k = kv_tensor_map<Native>(op, "k", k);
        maps.v = kv_tensor_map<Native>(op, "v", v);
      }
      launch_split<Native, kD, kG, kScores>(p, maps, grid, native_stream);
      if (plan.splits > 1) {
        // The plain merge does not depend on G: one instantiation serves every group size.
        constexpr int kMergeG = kScores ? kG : 1;
        std::int64_t blocks = batch * q_heads;
        if constexpr (kScores)
          blocks += batch * kv_heads * ((max_length + kScoreTile<kD> - 1) / kScoreTile<kD>);
        cuda_detail::launch_dependent(decode_merge_kernel<Native, kD, kMergeG, kScores>,
                                      static_cast<unsigned>(blocks), kD, native_stream, p);
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
