// cuda/quantized_decode_attention.cu: batched decode attention read straight from quantized caches
// (kvc/ops/quantized_attention.hpp): KIVI (keys per channel in token groups, values per token),
// per-token INT8/INT4 and FP8, plus their f16 residual rows.
//
// KIVI (namespace kivi_mma below), per-token INT8/INT4 and FP8 (namespace token_mma) run on tensor
// cores when every staged part is 16-byte aligned (and, for INT, channel groups of a multiple of
// 16, INT4 32); other caches take the CUDA-core kernel described here.
//
// One block of 4 warps per (split of the tokens, KV head, sequence); each warp takes tiles of 32
// tokens and keeps its own online softmax for the G query heads of the GQA group, which share
// every load. Codes are decoded in registers only: an unsigned b-bit field f becomes the float
// 2^23 + f by OR-ing it under the exponent of 2^23, and one subtraction leaves f (cheaper than an
// integer-to-float conversion); scale and minimum are folded out of the inner loops:
//   keys (KIVI, per channel):  q . k_t = sum_c (q_c s_c) code_tc + sum_c q_c m_c   (per group)
//   values (per token):        sum_t p_t (s_t code_tc + m_t) = sum_t (p_t s_t) code_tc + sum_t p_t
//   m_t
// so each code costs one subtraction, one OR and G fused multiply-adds. A warp issues every load of
// a whole tile (keys and values) before its arithmetic, the edge tiles (f16 residual rows, the end
// of a sequence) take a per-row path. Splits are merged by a second kernel (flash-decoding), all
// on base-2 exponentials of log2(e)-scaled scores.
#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <type_traits>

#include "check.cuh"
#include "kvc/core/dispatch.hpp"
#include "kvc/ops/quantized_attention.hpp"
#include "launch.cuh"
#include "ptx.cuh"
#include "split_merge.cuh"

namespace kvc::ops {
namespace quantized_formats {

// Formats: KIVI keys (per channel, packed along tokens), b-bit token rows (KIVI values, INT8/4),
// FP8 token rows.
template <int Bits>
struct KiviKeys {
  static constexpr bool kChannel = true, kFp8 = false;
  static constexpr int kBits = Bits;
};
template <int Bits>
struct IntRows {
  static constexpr bool kChannel = false, kFp8 = false;
  static constexpr int kBits = Bits;
};
template <int Kind>  // 0: E4M3, 1: E5M2
struct Fp8Rows {
  static constexpr bool kChannel = false, kFp8 = true;
  static constexpr int kBits = 8;
  static constexpr int kKind = Kind;
};

}  // namespace quantized_formats

namespace {

using namespace quantized_formats;

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;
constexpr int kTile = 32;  // tokens per warp step; KIVI key groups are multiples of it
using split_merge::SplitPlan;
using namespace ptx;  // cp.async and ldmatrix
constexpr unsigned kFull = 0xffffffffu;
constexpr float kTwo23 = 8388608.0f;

// A part of the cache with byte strides.
struct Part {
  const unsigned char* data = nullptr;
  std::int64_t batch = 0, head = 0;
  __device__ const unsigned char* at(int b, int h) const {
    return data == nullptr ? nullptr : data + b * batch + h * head;
  }
};
struct Counts {
  const std::int32_t* data = nullptr;
  std::int64_t batch = 0, head = 0;
  __device__ int at(int b, int h) const { return data[b * batch + h * head]; }
};

struct TensorParts {
  Part codes;           // quantized rows (or KIVI key blocks)
  Part scale, minimum;  // per-row (per-block) parameters; FP8: one float per head in `scale`
  Part residual;        // f16 rows after the quantized ones
  bool params_f32 = false;
};

struct Params {
  const unsigned char* q = nullptr;  // [B, Hq, D] bf16 or f16, byte strides below
  std::int64_t q_batch = 0, q_head = 0;
  unsigned char* out = nullptr;
  std::int64_t out_batch = 0, out_head = 0;
  bool bf16 = true;
  float* workspace = nullptr;  // acc [B, Hq, splits, D], max [B, Hq, splits], sum [B, Hq, splits]
  TensorParts k, v;
  Counts lengths, quantized_keys, quantized_values;  // quantized_* unused by FP8
  int group = 32;  // channels (token rows) or tokens (KIVI keys) per parameter
  bool symmetric = false;
  int batch = 0, q_heads = 0, max_length = 0, chunk = 0, splits = 1;
  // The splits of one (sequence, KV head) run as one thread-block cluster and merge through
  // distributed shared memory (the KIVI kernel): no partials in the workspace, no merge kernel.
  bool cluster_merge = false;
  float scale_log2 = 0.0f;
  // f16 1024 in both halves, read at run time so that ptxas keeps it in a register (code_pair).
  std::uint32_t f16_exponent_1024 = 0x64006400u;
};

__device__ inline float load_scalar(const unsigned char* base, std::int64_t index, bool f32) {
  if (f32) return __ldg(reinterpret_cast<const float*>(base) + index);
  return __half2float(__ldg(reinterpret_cast<const __half*>(base) + index));
}

__device__ inline float field_to_float(std::uint32_t field) {
  return __uint_as_float(0x4B000000u | field);  // 2^23 + field, exactly
}

// The lane's 16 channels [c0, c0 + 16) of f16 row `row`.
__device__ inline void decode_half_row(const __half* rows, int d, int row, int c0, float (&x)[16]) {
  const auto* p = reinterpret_cast<const uint4*>(rows + static_cast<std::int64_t>(row) * d + c0);
  const uint4 raw[2] = {__ldg(p), __ldg(p + 1)};
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const auto* pairs = reinterpret_cast<const __half2*>(&raw[i]);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const float2 f = __half22float2(pairs[j]);
      x[i * 8 + 2 * j] = f.x;
      x[i * 8 + 2 * j + 1] = f.y;
    }
  }
}

// The lane's 16 channels of quantized token row `row`: x = codes as floats (signed for symmetric
// formats), s and m the row's scale and minimum for these channels (FP8: 1 and 0, the per-head
// scale is applied outside).
// The raw bytes of a lane's 16 channels of one quantized token row: 16 * bits / 8 bytes.
template <int Bits>
struct RawRow {
  std::uint32_t w[Bits / 2];
};

template <class F>
__device__ inline RawRow<F::kBits> load_raw_row(const unsigned char* codes, int d, int row,
                                                int c0) {
  constexpr int kBits = F::kBits;
  const unsigned char* at =
      codes + static_cast<std::int64_t>(row) * (d * kBits / 8) + c0 * kBits / 8;
  RawRow<kBits> raw;
  if constexpr (kBits == 8) {
    const uint4 v = __ldg(reinterpret_cast<const uint4*>(at));
    raw.w[0] = v.x, raw.w[1] = v.y, raw.w[2] = v.z, raw.w[3] = v.w;
  } else if constexpr (kBits == 4) {
    const uint2 v = __ldg(reinterpret_cast<const uint2*>(at));
    raw.w[0] = v.x, raw.w[1] = v.y;
  } else {
    raw.w[0] = __ldg(reinterpret_cast<const std::uint32_t*>(at));
  }
  return raw;
}

// Row `row`'s scale and minimum for the lane's channels (FP8: 1 and 0, the per-head scales are
// applied outside).
template <class F>
__device__ inline void load_row_params(const Params& p, const TensorParts& t,
                                       const unsigned char* scale, const unsigned char* minimum,
                                       int d, int row, int c0, float& s, float& m) {
  if constexpr (F::kFp8) {
    s = 1.0f;
    m = 0.0f;
  } else {
    const std::int64_t param = static_cast<std::int64_t>(row) * (d / p.group) + c0 / p.group;
    s = load_scalar(scale, param, t.params_f32);
    m = minimum == nullptr ? 0.0f : load_scalar(minimum, param, t.params_f32);
  }
}

// Codes as floats (signed for symmetric formats).
template <class F>
__device__ inline void decode_raw_row(const RawRow<F::kBits>& raw, bool symmetric, float (&x)[16]) {
  if constexpr (F::kFp8) {
#pragma unroll
    for (int w = 0; w < 4; ++w)
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const auto pair = static_cast<__nv_fp8x2_storage_t>(raw.w[w] >> (16 * j));
        const __half2_raw h =
            __nv_cvt_fp8x2_to_halfraw2(pair, F::kKind == 0 ? __NV_E4M3 : __NV_E5M2);
        const float2 f = __half22float2(__half2(h));
        x[w * 4 + 2 * j] = f.x;
        x[w * 4 + 2 * j + 1] = f.y;
      }
  } else {
    constexpr int kBits = F::kBits, kPerWord = 32 / kBits, kWords = 16 / kPerWord;
    constexpr std::uint32_t kMask = (1u << kBits) - 1u;
    // Symmetric codes are two's complement: flipping each field's top bit gives code + 2^(b-1).
    constexpr std::uint32_t kTopBits = kBits == 8   ? 0x80808080u
                                       : kBits == 4 ? 0x88888888u
                                                    : 0xAAAAAAAAu;
    const std::uint32_t flip = symmetric ? kTopBits : 0u;
    const float offset = kTwo23 + (symmetric ? static_cast<float>(1 << (kBits - 1)) : 0.0f);
#pragma unroll
    for (int w = 0; w < kWords; ++w) {
      const std::uint32_t word = raw.w[w] ^ flip;
#pragma unroll
      for (int j = 0; j < kPerWord; ++j)
        x[w * kPerWord + j] = field_to_float((word >> (kBits * j)) & kMask) - offset;
    }
  }
}

template <class F>
__device__ inline void decode_token_row(const Params& p, const TensorParts& t,
                                        const unsigned char* codes, const unsigned char* scale,
                                        const unsigned char* minimum, int d, int row, int c0,
                                        float (&x)[16], float& s, float& m) {
  decode_raw_row<F>(load_raw_row<F>(codes, d, row, c0), p.symmetric, x);
  load_row_params<F>(p, t, scale, minimum, d, row, c0, s, m);
}

// Partial (log2-scaled) scores of one row over the lane's 16 channels: s * q.x + m * sum(q).
template <int D, int G>
__device__ inline void row_partial(const float (*q_t)[G], int c0, const float (&x)[16], float s,
                                   float m, const float (&qsum)[G], float (&part)[G]) {
  float dot[G];
#pragma unroll
  for (int h = 0; h < G; ++h) dot[h] = 0.0f;
#pragma unroll
  for (int c = 0; c < 16; ++c)
#pragma unroll
    for (int h = 0; h < G; ++h) dot[h] = fmaf(q_t[c0 + c][h], x[c], dot[h]);
#pragma unroll
  for (int h = 0; h < G; ++h) part[h] = fmaf(dot[h], s, m * qsum[h]);
}

// Output element d of (sequence b, q_head), rounded to the output type.
__device__ inline void store_output(const Params& p, int b, int q_head, int d, float o) {
  auto* dst = reinterpret_cast<std::uint16_t*>(p.out + b * p.out_batch + q_head * p.out_head);
  dst[d] =
      p.bf16 ? __bfloat16_as_ushort(__float2bfloat16_rn(o)) : __half_as_ushort(__float2half_rn(o));
}

// A block's result for output element d of (sequence b, q_head): the output itself (one split) or
// the split's partials. A NaN sum (a NaN score, e.g. kivi_mma's out-of-range key scales) stays NaN.
template <int D>
__device__ inline void write_result(const Params& p, bool valid, float total, float sum,
                                    float block_max, int b, int q_head, int split, int d) {
  if (p.splits == 1) {
    store_output(p, b, q_head, d, !valid ? NAN : (sum != 0.0f ? total / sum : 0.0f));
  } else {
    const std::int64_t row = (static_cast<std::int64_t>(b) * p.q_heads + q_head) * p.splits + split;
    p.workspace[row * D + d] = valid ? total : NAN;
    if (d == 0) {
      const std::int64_t partials = static_cast<std::int64_t>(p.batch) * p.q_heads * p.splits;
      p.workspace[partials * D + row] = block_max;
      p.workspace[partials * (D + 1) + row] = sum;
    }
  }
}

// Reduce-scatter of part[0, 2 Half) over the slice bits of the lane, highest first: lanes with the
// bit set keep the upper half of the remaining tokens. A compile-time recursion, so that every
// index of `part` is a constant and the array stays in registers (a run-time loop bound put it in
// local memory).
template <int Half, int kW, int N, int G>
__device__ inline void reduce_scatter(float (&part)[N][G], int lane) {
  constexpr int kOffset = Half * kW;
  const bool upper = (lane & kOffset) != 0;
#pragma unroll
  for (int j = 0; j < Half; ++j)
#pragma unroll
    for (int h = 0; h < G; ++h) {
      const float send = upper ? part[j][h] : part[j + Half][h];
      const float keep = upper ? part[j + Half][h] : part[j][h];
      part[j][h] = keep + __shfl_xor_sync(kFull, send, kOffset);
    }
  if constexpr (Half > 1) reduce_scatter<Half / 2, kW>(part, lane);
}

// Scores (log2-scaled) of the 32 KIVI-quantized keys [t0, t0 + 32) for the G query heads; on
// return the lane holds those of token t0 + lane. Lane (w, s), w < W words of a channel's tile,
// s < S slices, sums channels s, s + S, ... over the kPerWord tokens of its word; the slices are
// then reduced by a reduce-scatter that leaves token s of word w in the lane, and a shuffle puts
// token t0 + lane in lane `lane`.
template <int Bits, int D, int G>
__device__ inline void kivi_key_scores(const Params& p, const unsigned char* codes,
                                       const unsigned char* scale, const unsigned char* minimum,
                                       int t0, const float (*q)[D], int lane, float (&score)[G]) {
  constexpr int kPerWord = 32 / Bits, kW = kTile / kPerWord, kS = 32 / kW, kCh = D / kS;
  constexpr std::uint32_t kMask = (1u << Bits) - 1u;
  const int w = lane % kW, s = lane / kW;
  const int group = p.group, g = t0 / group, row_words = group / kPerWord;
  const auto* word_base = reinterpret_cast<const std::uint32_t*>(codes) +
                          static_cast<std::int64_t>(g) * D * row_words + (t0 % group) / kPerWord +
                          w;
  const auto* sc = reinterpret_cast<const __half*>(scale) + static_cast<std::int64_t>(g) * D;
  const auto* mn = reinterpret_cast<const __half*>(minimum) + static_cast<std::int64_t>(g) * D;
  std::uint32_t words[kCh];
  __half scale_h[kCh], min_h[kCh];
#pragma unroll
  for (int k = 0; k < kCh; ++k) {
    words[k] = __ldg(word_base + (k * kS + s) * row_words);
    scale_h[k] = __ldg(sc + k * kS + s);
    min_h[k] = __ldg(mn + k * kS + s);
  }
  float part[kPerWord][G], bias[G];
#pragma unroll
  for (int h = 0; h < G; ++h) {
    bias[h] = 0.0f;
#pragma unroll
    for (int j = 0; j < kPerWord; ++j) part[j][h] = 0.0f;
  }
#pragma unroll
  for (int k = 0; k < kCh; ++k) {
    const int c = k * kS + s;
    const float sk = __half2float(scale_h[k]), mk = __half2float(min_h[k]);
    float qs[G];
#pragma unroll
    for (int h = 0; h < G; ++h) {
      qs[h] = q[h][c] * sk;
      bias[h] = fmaf(q[h][c], mk, bias[h]);
    }
#pragma unroll
    for (int j = 0; j < kPerWord; ++j) {
      const float x = field_to_float((words[k] >> (Bits * j)) & kMask) - kTwo23;
#pragma unroll
      for (int h = 0; h < G; ++h) part[j][h] = fmaf(qs[h], x, part[j][h]);
    }
  }
  // Each slice's bias partial goes to every token: the reduction over slices then sums it.
#pragma unroll
  for (int j = 0; j < kPerWord; ++j)
#pragma unroll
    for (int h = 0; h < G; ++h) part[j][h] += bias[h];
  reduce_scatter<kPerWord / 2, kW>(part, lane);
  // Token index w * kPerWord + s sits in lane w + kW * s.
  const int source = lane / kPerWord + kW * (lane % kPerWord);
#pragma unroll
  for (int h = 0; h < G; ++h) score[h] = __shfl_sync(kFull, part[0][h], source);
}

template <class KF, class VF, int D, int G>
__global__ void __launch_bounds__(kThreads) quantized_split_kernel(Params p) {
  cuda_detail::allow_dependent_launch();  // the merge waits for this grid's end by itself
  constexpr int kVL = D / 16;             // lanes per token row, 16 channels each
  constexpr int kTP = 32 / kVL;           // token rows per warp step
  constexpr int kSteps = kTile / kTP;
  __shared__ float q_s[G][D];                 // q * scale * log2(e) (* FP8 key scale)
  __shared__ __align__(16) float q_t[D][G];   // the same, channel-major
  __shared__ float tile_s[kWarps][kTile][G];  // a warp's tile scores, then probabilities
  __shared__ float warp_max_s[kWarps][G], warp_sum_s[kWarps][G];
  __shared__ float warp_acc_s[kWarps][G][D];

  const int split = blockIdx.x, kv_head = blockIdx.y, b = blockIdx.z;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int n = p.lengths.at(b, kv_head);
  int qk = n, qv = n;
  if constexpr (!KF::kFp8) {
    qk = p.quantized_keys.at(b, kv_head);
    qv = p.quantized_values.at(b, kv_head);
  }
  bool valid = n >= 0 && n <= p.max_length && qk >= 0 && qk <= n && qv >= 0 && qv <= n;
  if constexpr (KF::kChannel) valid = valid && qk % p.group == 0;
  const int begin = split * p.chunk;
  const int end = valid ? min(n, begin + p.chunk) : begin;

  const unsigned char* k_codes = p.k.codes.at(b, kv_head);
  const unsigned char* k_scale = p.k.scale.at(b, kv_head);
  const unsigned char* k_min = p.k.minimum.at(b, kv_head);
  const auto* k_res = reinterpret_cast<const __half*>(p.k.residual.at(b, kv_head));
  const unsigned char* v_codes = p.v.codes.at(b, kv_head);
  const unsigned char* v_scale = p.v.scale.at(b, kv_head);
  const unsigned char* v_min = p.v.minimum.at(b, kv_head);
  const auto* v_res = reinterpret_cast<const __half*>(p.v.residual.at(b, kv_head));
  float q_factor = p.scale_log2, out_factor = 1.0f;
  if constexpr (KF::kFp8) {
    q_factor *= __ldg(reinterpret_cast<const float*>(k_scale));
    out_factor = __ldg(reinterpret_cast<const float*>(v_scale));
  }

  for (int i = threadIdx.x; i < G * D; i += kThreads) {
    const int h = i / D, c = i % D;
    const auto* row =
        reinterpret_cast<const std::uint16_t*>(p.q + b * p.q_batch + (kv_head * G + h) * p.q_head);
    const std::uint16_t bits = row[c];
    const float x = p.bf16 ? __uint_as_float(static_cast<std::uint32_t>(bits) << 16)
                           : __half2float(__ushort_as_half(bits));
    q_s[h][c] = x * q_factor;
    q_t[c][h] = x * q_factor;
  }
  __syncthreads();

  const int r = lane / kVL, cl = lane % kVL, c0 = cl * 16;
  float acc[G][16], vbias[G], run_max[G], run_sum[G], qsum[G];
#pragma unroll
  for (int h = 0; h < G; ++h) {
    vbias[h] = 0.0f;
    run_max[h] = -INFINITY;
    run_sum[h] = 0.0f;
    qsum[h] = 0.0f;
#pragma unroll
    for (int c = 0; c < 16; ++c) {
      acc[h][c] = 0.0f;
      qsum[h] += q_t[c0 + c][h];
    }
  }

  for (int t0 = begin + warp * kTile; t0 < end; t0 += kWarps * kTile) {
    // Whole tiles of quantized rows (all but the edges) issue every load of the tile first, keys
    // and values, so that a warp has the whole tile in flight at once.
    const bool v_fast = t0 + kTile <= min(qv, end);
    RawRow<VF::kBits> v_raw[kSteps];
    float v_s[kSteps], v_m[kSteps];
    if (v_fast) {
#pragma unroll
      for (int step = 0; step < kSteps; ++step) {
        const int t = t0 + step * kTP + r;
        v_raw[step] = load_raw_row<VF>(v_codes, D, t, c0);
        load_row_params<VF>(p, p.v, v_scale, v_min, D, t, c0, v_s[step], v_m[step]);
      }
    }

    float score[G];
    bool channel_tile = false, k_fast = false;
    if constexpr (KF::kChannel)
      channel_tile = t0 < qk;
    else
      k_fast = t0 + kTile <= min(qk, end);
    if (channel_tile) {
      if constexpr (KF::kChannel)
        kivi_key_scores<KF::kBits, D, G>(p, k_codes, k_scale, k_min, t0, q_s, lane, score);
    } else {
      // Token rows: the lane's 16 channels of kTP tokens per step, reduced over the kVL lanes of
      // a row.
      float part[kSteps][G];
      if (k_fast) {
        if constexpr (!KF::kChannel) {
          RawRow<KF::kBits> k_raw[kSteps];
          float k_s[kSteps], k_m[kSteps];
#pragma unroll
          for (int step = 0; step < kSteps; ++step) {
            const int t = t0 + step * kTP + r;
            k_raw[step] = load_raw_row<KF>(k_codes, D, t, c0);
            load_row_params<KF>(p, p.k, k_scale, k_min, D, t, c0, k_s[step], k_m[step]);
          }
#pragma unroll
          for (int step = 0; step < kSteps; ++step) {
            float x[16];
            decode_raw_row<KF>(k_raw[step], p.symmetric, x);
            row_partial<D, G>(q_t, c0, x, k_s[step], k_m[step], qsum, part[step]);
          }
        }
      } else {
#pragma unroll
        for (int step = 0; step < kSteps; ++step) {
          const int t = t0 + step * kTP + r;
#pragma unroll
          for (int h = 0; h < G; ++h) part[step][h] = -INFINITY;
          if (t < end) {
            float x[16], s = 1.0f, m = 0.0f;
            bool quantized = false;
            if constexpr (!KF::kChannel) quantized = t < qk;
            if (quantized) {
              if constexpr (!KF::kChannel)
                decode_token_row<KF>(p, p.k, k_codes, k_scale, k_min, D, t, c0, x, s, m);
            } else {
              decode_half_row(k_res, D, t - qk, c0, x);
            }
            row_partial<D, G>(q_t, c0, x, s, m, qsum, part[step]);
          }
        }
      }
#pragma unroll
      for (int step = 0; step < kSteps; ++step)
#pragma unroll
        for (int h = 0; h < G; ++h) {
#pragma unroll
          for (int o = kVL / 2; o > 0; o /= 2)
            part[step][h] += __shfl_xor_sync(kFull, part[step][h], o);
          if (cl == 0) tile_s[warp][step * kTP + r][h] = part[step][h];
        }
      __syncwarp();
#pragma unroll
      for (int h = 0; h < G; ++h) score[h] = tile_s[warp][lane][h];
      __syncwarp();
    }
    if (t0 + lane >= end) {
#pragma unroll
      for (int h = 0; h < G; ++h) score[h] = -INFINITY;
    }

    // Online softmax over the tile (token t0 is valid, so the tile maximum is finite).
#pragma unroll
    for (int h = 0; h < G; ++h) {
      const float new_max = fmaxf(run_max[h], warp_max(score[h]));
      const float correction = exp2f(run_max[h] - new_max);  // 0 while the max was -inf
      const float prob = exp2f(score[h] - new_max);
      run_sum[h] = fmaf(run_sum[h], correction, prob);
      run_max[h] = new_max;
      vbias[h] *= correction;
#pragma unroll
      for (int c = 0; c < 16; ++c) acc[h][c] *= correction;
      tile_s[warp][lane][h] = prob;
    }
    __syncwarp();

    if (v_fast) {
#pragma unroll
      for (int step = 0; step < kSteps; ++step) {
        float x[16];
        decode_raw_row<VF>(v_raw[step], p.symmetric, x);
#pragma unroll
        for (int h = 0; h < G; ++h) {
          const float prob = tile_s[warp][step * kTP + r][h];
          vbias[h] = fmaf(prob, v_m[step], vbias[h]);
          const float weight = prob * v_s[step];
#pragma unroll
          for (int c = 0; c < 16; ++c) acc[h][c] = fmaf(weight, x[c], acc[h][c]);
        }
      }
    } else {
      for (int step = 0; step < kSteps; ++step) {
        const int row = step * kTP + r, t = t0 + row;
        if (t >= end) continue;
        float x[16], s = 1.0f, m = 0.0f;
        if (t < qv)
          decode_token_row<VF>(p, p.v, v_codes, v_scale, v_min, D, t, c0, x, s, m);
        else
          decode_half_row(v_res, D, t - qv, c0, x);
#pragma unroll
        for (int h = 0; h < G; ++h) {
          const float prob = tile_s[warp][row][h];
          const float weight = prob * s;
          vbias[h] = fmaf(prob, m, vbias[h]);
#pragma unroll
          for (int c = 0; c < 16; ++c) acc[h][c] = fmaf(weight, x[c], acc[h][c]);
        }
      }
    }
    __syncwarp();
  }

  // Rows of a warp share one maximum: sum them, then merge the warps in shared memory.
#pragma unroll
  for (int h = 0; h < G; ++h) {
#pragma unroll
    for (int o = kVL; o < 32; o *= 2) {
      vbias[h] += __shfl_xor_sync(kFull, vbias[h], o);
#pragma unroll
      for (int c = 0; c < 16; ++c) acc[h][c] += __shfl_xor_sync(kFull, acc[h][c], o);
    }
    run_sum[h] = warp_sum(run_sum[h]);
    if (r == 0) {
#pragma unroll
      for (int c = 0; c < 16; ++c) warp_acc_s[warp][h][c0 + c] = acc[h][c] + vbias[h];
    }
    if (lane == 0) {
      warp_max_s[warp][h] = run_max[h];
      warp_sum_s[warp][h] = run_sum[h];
    }
  }
  __syncthreads();
  for (int i = threadIdx.x; i < G * D; i += kThreads) {
    const int h = i / D, d = i % D;
    float block_max = -INFINITY;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) block_max = fmaxf(block_max, warp_max_s[w][h]);
    float sum = 0.0f, total = 0.0f;
    if (block_max != -INFINITY) {
#pragma unroll
      for (int w = 0; w < kWarps; ++w) {
        const float weight = exp2f(warp_max_s[w][h] - block_max);
        sum = fmaf(warp_sum_s[w][h], weight, sum);
        total = fmaf(warp_acc_s[w][h][d], weight, total);
      }
    }
    total *= out_factor;
    const int q_head = kv_head * G + h;
    write_result<D>(p, valid, total, sum, block_max, b, q_head, split, d);
  }
}

// One block of D threads per (sequence, query head) merges the splits' partials.
template <int D>
__global__ void __launch_bounds__(D) quantized_merge_kernel(Params p) {
  cuda_detail::wait_for_prior_grid();  // the split kernel's partials
  const int b = blockIdx.x / p.q_heads, q_head = blockIdx.x % p.q_heads, d = threadIdx.x;
  store_output(
      p, b, q_head, d,
      split_merge::merge_split_partials<D>(p.workspace, p.batch, p.q_heads, p.splits, b, q_head));
}

// ---- Pieces shared by the tensor-core kernels (kivi_mma and token_mma below) ------------------
namespace mma_parts {

constexpr int kWarpsPerBlock = 4;

__device__ inline std::uint32_t h2u(__half2 x) { return *reinterpret_cast<std::uint32_t*>(&x); }
__device__ inline __half2 u2h(std::uint32_t x) { return *reinterpret_cast<__half2*>(&x); }

__device__ inline std::uint32_t pack_halves(__half lo, __half hi) {
  return static_cast<std::uint32_t>(__half_as_ushort(lo)) |
         (static_cast<std::uint32_t>(__half_as_ushort(hi)) << 16);
}

// x as the f16 pair hi = f16(x), lo = f16(2^11 (x - hi)): x = hi + 2^-11 lo to about 2^-22 |x|.
__device__ inline void put_hi_lo(__half* hi, __half* lo, float x) {
  const __half h = __float2half_rn(x);
  *hi = h;
  *lo = __float2half_rn((x - __half2float(h)) * 2048.0f);
}

// q of the block's G query heads into q_raw [G][D] (fp32), and per head a power of two 2^E that
// brings max|q 2^E| into [2^(top - 1), 2^top): q_scale[h] = 2^E, q_unscale[h] = 2^-E factor.
template <int D, int G, int Warps = kWarpsPerBlock>
__device__ void load_q_scaled(const Params& p, int b, int kv_head, int top, float factor,
                              float* q_raw, float* q_scale, float* q_unscale) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int i = threadIdx.x; i < G * D; i += Warps * 32) {
    const int h = i / D, c = i % D;
    const auto* row =
        reinterpret_cast<const std::uint16_t*>(p.q + b * p.q_batch + (kv_head * G + h) * p.q_head);
    const std::uint16_t bits = row[c];
    q_raw[i] = p.bf16 ? __uint_as_float(static_cast<std::uint32_t>(bits) << 16)
                      : __half2float(__ushort_as_half(bits));
  }
  __syncthreads();
  for (int h = warp; h < G; h += Warps) {
    float mx = 0.0f;
    for (int c = lane; c < D; c += 32) mx = fmaxf(mx, fabsf(q_raw[h * D + c]));
    mx = warp_max(mx);
    int e = 0;
    frexpf(mx, &e);
    int E = mx > 0.0f ? top - e : 0;
    E = max(-120, min(120, E));
    if (lane == 0) {
      q_scale[h] = ldexpf(1.0f, E);
      q_unscale[h] = ldexpf(1.0f, -E) * factor;
    }
  }
  __syncthreads();
}

// The B fragments of q for q.K, n = 2 G columns (column h: hi of head h, column G + h: its lo):
// ql[(j kKS + s) 32 + lane] holds, for column 8 j + g, the k slots 2t, 2t + 1, 2t + 8, 2t + 9 of
// k-step s, which are channels chan(s, t, 0 .. 3). qf (KIVI's q' inputs; may be null): hi of
// every column, 2^11 hi of the lo columns.
template <int D, int G, class Chan>
__device__ void build_q_fragments(const float* q_raw, const float* q_scale, uint4* qf, uint2* ql,
                                  Chan chan) {
  constexpr int kNT = (2 * G + 7) / 8, kKS = D / 16;
  for (int idx = threadIdx.x; idx < kNT * kKS * 32; idx += kWarpsPerBlock * 32) {
    const int ln = idx % 32, s = (idx / 32) % kKS, j = idx / (32 * kKS);
    const int col = 8 * j + (ln >> 2);
    __half qh[4], QH[4], QL[4];
    for (int i = 0; i < 4; ++i) qh[i] = QH[i] = QL[i] = __float2half_rn(0.0f);
    if (col < 2 * G) {
      const bool lo = col >= G;
      const int h = lo ? col - G : col;
      for (int i = 0; i < 4; ++i) {
        const float x = q_raw[h * D + chan(s, ln & 3, i)] * q_scale[h];
        const __half hi = __float2half_rn(x);
        qh[i] = hi;
        if (lo) {
          QH[i] = __float2half_rn(__half2float(hi) * 2048.0f);
          QL[i] = __float2half_rn((x - __half2float(hi)) * 2048.0f);
        } else {
          QL[i] = hi;
        }
      }
    }
    if (qf != nullptr)
      qf[idx] = make_uint4(pack_halves(qh[0], qh[1]), pack_halves(qh[2], qh[3]),
                           pack_halves(QH[0], QH[1]), pack_halves(QH[2], QH[3]));
    ql[idx] = make_uint2(pack_halves(QL[0], QL[1]), pack_halves(QL[2], QL[3]));
  }
}

// Online softmax over one tile, lane = token (live: inside the split): scores from S [32][kCols +
// 1] (hi column h plus 2^-11 lo column G + h, times q_unscale[h]); the probabilities go to prob,
// each column's correction to corr_s. Returns whether any running maximum moved.
template <int G, int kCols>
__device__ inline bool softmax_tile(const float* S, const float* q_unscale, bool live,
                                    float (&run_max)[G], float (&run_sum)[G], float (&prob)[G],
                                    float* corr_s) {
  const int lane = threadIdx.x % 32;
  bool rescale = false;
#pragma unroll
  for (int h = 0; h < G; ++h) {
    float x = (S[lane * (kCols + 1) + h] + S[lane * (kCols + 1) + G + h] * (1.0f / 2048.0f)) *
              q_unscale[h];
    if (!live) x = -INFINITY;
    const float new_max = fmaxf(run_max[h], warp_max(x));
    const float correction = exp2f(run_max[h] - new_max);
    prob[h] = exp2f(x - new_max);
    run_sum[h] = fmaf(run_sum[h], correction, prob[h]);
    run_max[h] = new_max;
    rescale = rescale || correction != 1.0f;
    if (lane == h || lane == G + h) corr_s[lane] = correction;
  }
  return rescale;
}

// The p.V accumulators (m-tiles x n-tiles) times their column's correction.
template <int kM, int kNT>
__device__ inline void rescale_acc(float (&acc)[kM][kNT][4], const float* corr_s, int t) {
#pragma unroll
  for (int j = 0; j < kNT; ++j) {
    const float c0 = corr_s[8 * j + 2 * t], c1 = corr_s[8 * j + 2 * t + 1];
#pragma unroll
    for (int i = 0; i < kM; ++i) {
      acc[i][j][0] *= c0, acc[i][j][1] *= c1;
      acc[i][j][2] *= c0, acc[i][j][3] *= c1;
    }
  }
}

// The end of a split, part 1: a warp's accumulators [2 G][D] into its own (now free) shared memory
// W (channel(i, half) = the channel of rows g (half 0) and g + 8 (half 1) of m-tile i), its maxima
// and sums into wmax / wsum [warps][G].
template <int D, int G, int kM, int kNT, class Channel>
__device__ inline void store_warp(const float (&acc)[kM][kNT][4], const float (&run_max)[G],
                                  float (&run_sum)[G], float* W, float* wmax, float* wsum,
                                  Channel channel) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, t = lane & 3;
#pragma unroll
  for (int h = 0; h < G; ++h) run_sum[h] = warp_sum(run_sum[h]);
#pragma unroll
  for (int i = 0; i < kM; ++i)
#pragma unroll
    for (int j = 0; j < kNT; ++j)
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        const int col = 8 * j + 2 * t + (r & 1);
        if (col < 2 * G) W[col * D + channel(i, r >= 2 ? 1 : 0)] = acc[i][j][r];
      }
  if (lane == 0) {
#pragma unroll
    for (int h = 0; h < G; ++h) {
      wmax[warp * G + h] = run_max[h];
      wsum[warp * G + h] = run_sum[h];
    }
  }
}

// Part 2, after a __syncthreads: the block merges its warps (warp w's accumulators at warps + w *
// warp_bytes) and hands each element's accumulator times out_factor (FP8's value scale), exp-sum
// and maximum to sink(h, d, total, sum, max); merge_warps writes them as the output or its split's
// partials.
// kLoRows: each warp holds [G][D] hi accumulators then [G][D] lo ones (2^11 times finer, the
// token kernel's hi/lo B columns); without, one [G][D] block (KIVI).
template <int D, int G, bool kLoRows, int Warps, class Sink>
__device__ void merge_warps_into(const unsigned char* warps, int warp_bytes, const float* wmax,
                                 const float* wsum, float out_factor, Sink sink) {
  for (int i = threadIdx.x; i < G * D; i += Warps * 32) {
    const int h = i / D, d = i % D;
    float block_max = -INFINITY;
#pragma unroll
    for (int w = 0; w < Warps; ++w) block_max = fmaxf(block_max, wmax[w * G + h]);
    // Every maximum -inf: the sums and accumulators are 0, or NaN (NaN scores), which must stay.
    float sum = 0.0f, total = 0.0f;
#pragma unroll
    for (int w = 0; w < Warps; ++w) {
      const float weight = block_max == -INFINITY ? 1.0f : exp2f(wmax[w * G + h] - block_max);
      const auto* Ww = reinterpret_cast<const float*>(warps + w * warp_bytes);
      sum = fmaf(wsum[w * G + h], weight, sum);
      const float value =
          kLoRows ? Ww[h * D + d] + Ww[(G + h) * D + d] * (1.0f / 2048.0f) : Ww[h * D + d];
      total = fmaf(value, weight, total);
    }
    sink(h, d, total * out_factor, sum, block_max);
  }
}

template <int D, int G, bool kLoRows = true, int Warps = kWarpsPerBlock>
__device__ void merge_warps(const Params& p, const unsigned char* warps, int warp_bytes,
                            const float* wmax, const float* wsum, float out_factor, bool valid,
                            int b, int kv_head, int split) {
  merge_warps_into<D, G, kLoRows, Warps>(
      warps, warp_bytes, wmax, wsum, out_factor,
      [&](int h, int d, float total, float sum, float block_max) {
        write_result<D>(p, valid, total, sum, block_max, b, kv_head * G + h, split, d);
      });
}

// The end of a split whose (sequence, KV head) runs as one cluster of p.splits blocks: the block's
// merged [G][D] accumulators (NaN for an invalid sequence, as write_result writes them), maxima and
// sums into its shared memory (totals [G][D], maxima [G], sums [G]); after a cluster barrier each
// block merges a share of the outputs from every block's shared memory, with the arithmetic and
// order of split_merge::merge_split_partials, and a second barrier keeps every block's shared
// memory alive until the others have read it.
template <int D, int G, int Warps>
__device__ void merge_cluster(const Params& p, const unsigned char* warps, int warp_bytes,
                              const float* wmax, const float* wsum, bool valid, int b, int kv_head,
                              float* totals, float* maxima, float* sums) {
  merge_warps_into<D, G, false, Warps>(warps, warp_bytes, wmax, wsum, 1.0f,
                                       [&](int h, int d, float total, float sum, float block_max) {
                                         totals[h * D + d] = valid ? total : NAN;
                                         if (d == 0) maxima[h] = block_max, sums[h] = sum;
                                       });
  cooperative_groups::cluster_group cluster = cooperative_groups::this_cluster();
  cluster.sync();
  const int splits = p.splits, rank = static_cast<int>(cluster.block_rank());
  const int share = (G * D + splits - 1) / splits;
  const int last = min(G * D, (rank + 1) * share);
  for (int i = rank * share + static_cast<int>(threadIdx.x); i < last; i += Warps * 32) {
    const int h = i / D, d = i % D;
    float m = -INFINITY;
    for (int s = 0; s < splits; ++s) m = fmaxf(m, cluster.map_shared_rank(maxima, s)[h]);
    float total = 0.0f, total_weight = 0.0f, first_total = 0.0f;
    for (int s = 0; s < splits; ++s) {
      const float weight = split_merge::split_weight(cluster.map_shared_rank(maxima, s)[h], m);
      const float a = cluster.map_shared_rank(totals, s)[i];
      if (s == 0) first_total = a;
      total_weight += cluster.map_shared_rank(sums, s)[h] * weight;
      total += a * weight;
    }
    store_output(p, b, kv_head * G + h, d,
                 split_merge::merged_output(total, total_weight, first_total));
  }
  cluster.sync();
}

}  // namespace mma_parts

// ---- KIVI on tensor cores ----------------------------------------------------------------------
// One block of 16 warps (12 for G = 8) per (split, KV head, sequence) and one block per SM, each
// warp taking 32-token tiles as above; the splits of a (sequence, KV head) form one thread-block
// cluster when there are 2 to 8 of them and merge through distributed shared memory at the end
// (merge_cluster), otherwise through the workspace and the merge kernel. Both products run as
// mma.sync.m16n8k16 (f16 operands, fp32 accumulation), n = 8 columns, column j holding query
// head j % G (G <= 8: heads repeat across the 8 columns for G < 8):
//   q.K: A = the tile's key codes (16 tokens x 16 channels per mma), B = q' = q s per channel of
//        the key block, plus A = the block's minimums (the same row for every token) against
//        B = q, which adds sum_c q_c m_c to every score;
//   p.V: A = value codes (16 channels x 16 tokens), B = p' = p s per token and 32-channel slot of
//        the value groups; sum_t p_t m_t (the value minimums, one number per head and group) is
//        summed in fp32 by each thread over its own tokens and added once at the end.
// Codes are exact in f16: the fields of one byte of each of two words (two channels of one token
// for keys, two tokens of one channel for values: the packing runs along the other axis) sit in
// bytes 0 and 2 of one register, each row's field is masked under the exponent of 1024
// (x = 1024 + f * 2^k, exactly) with one LOP3, and one HFMA2 by 2^-k, -1024 2^-k leaves f.
// 2-bit: one PRMT brings byte g / 2 of two words together, and a thread uses one nibble of it (two
// rows). 4-bit: ldmatrix.trans reads 8 x 8 matrices of 16-bit half-words (a key channel's 32
// tokens, a token's 32 value channels per 16-byte row), so thread (g, t) receives half-word g of
// rows 2t and 2t + 1 in one register: its byte 2g holds rows g, g + 8 of one m-tile, byte 2g + 1
// (one shift) those of the next. That is a quarter of the shared-memory wavefronts of per-thread
// loads, where eight lanes read the same 16 bytes, and no PRMT.
// (Skipping the OR and the HFMA2, i.e. feeding the field as the f16 subnormal f 2^(s - 24) and
// rescaling the fp32 rows, is 1-4 % faster but not exact: the H100's mma with subnormal A inputs
// was measured off by up to 7.6e-5 of sum |a b|.) The k order of an mma only has to agree between
// A and B, so each thread's k slots are chosen to match what it loads.
// The softmax runs on the q.K accumulators as they lie (thread (g, t): tokens of rows g, g + 8 of
// both m-tiles, columns 2t, 2t + 1; maxima across the 8 row groups by three shuffles), and the
// thread that holds a column's scores also holds that column's p.V accumulators, so corrections
// stay in registers; p' goes through a per-warp tile of token rows read back with ldmatrix.trans.
// Accuracy: B operands are single f16 values (q' = f16(f16(q 2^E) s), p' = f16(p s) from fp32):
// q is first scaled per head by a power of two 2^E with max|q 2^E| in [4, 8), which keeps q' clear
// of f16 subnormals and, for key scales below 1024, of overflow; a block with a key scale at or
// above 1024 gives NaN scores for its tiles (key_scale_out_of_range), so the (sequence, KV head)
// gets NaN outputs, loudly, instead of silently wrong ones. The f16 rounding errors of q' and p'
// are independent per channel and token, so they add up like a random walk (the tests' tolerances,
// derived for fp32 products, are unchanged and hold). Tiles are staged in shared memory with
// cp.async, double buffered per warp (4-bit value rows and the p' tile XOR-swizzled so that
// ldmatrix rows hit distinct banks); the edges (residual rows, a tile crossing qv or the end) read
// global memory directly.
namespace kivi_mma {

using namespace mma_parts;

constexpr int kQTop = 3;  // max|q 2^E| in [2^2, 2^3)

// Warps per block, and one block per SM: as many warps as 128 registers (G = 8: 168) allow (18 or
// 20 warps got 96 registers and 128 bytes of stack; five 4-warp blocks at 96 registers measured
// slower on the H100, 2-bit 0.142 against 0.131 ms at batch 8, 32K). The warp schedulers favour
// older blocks, so four 4-warp blocks on one SM ended in a staircase about 6 us apart at batch 8 /
// 32K, the last one alone on the SM; the 16 warps of one block start together and share the
// schedulers to the end (H100, 2-bit at batch 8, 32K: 0.0990 -> 0.0949 ms).
template <int G>
constexpr int kivi_warps() {
  return G >= 8 ? 12 : 16;
}

template <int Bits, int D, int G>
struct Layout {
  static constexpr int kWarps = kivi_warps<G>();
  static_assert(G <= 8, "one n-tile of 8 columns holds the GQA group");
  static constexpr int kKS = D / 16;  // k-steps (keys) = m-tiles (values)
  static constexpr int kVS = D / 32;  // value slots of 32 channels (value groups are >= 32)
  static constexpr int kPairs = G >= 2 ? G / 2 : 1;  // column pairs 2t, 2t + 1 of distinct heads
  static constexpr int kTwins = 4 / kPairs;          // threads t holding the same heads
  static constexpr int kSlotsPerLane = (kVS + kTwins - 1) / kTwins;
  // Stage: one 32-token tile.
  static constexpr int kKeyBytes = D * Bits * 4;  // per channel Bits words of 32 / Bits tokens
  static constexpr int kValRowWords = D * Bits / 32;
  static constexpr int kValBytes = 32 * kValRowWords * 4;
  // Key minimums and scales interleaved per channel pair: word 2i = minimums of channels 2i, 2i +
  // 1, word 2i + 1 = their scales, so that one 16-byte load gives a thread both the A quad of the
  // minimum mma (rows g + 8 unused) and the scales of its four channels.
  static constexpr int kKPar = kKeyBytes;
  static constexpr int kVal = kKPar + 4 * D;
  static constexpr int kVScale = kVal + kValBytes;
  static constexpr int kVMin = kVScale + 64 * kVS;
  static constexpr int kStageBytes = kVMin + 64 * kVS;
  // Per warp after its two stages: p' as [slot][k-step][16 k rows][8 columns] f16 (ldmatrix.trans
  // rows of 16 bytes), then the value-minimum sums [slot][8 columns] f32 of the end.
  static constexpr int kBv = 2 * kStageBytes;
  static constexpr int kMvs = kBv + kVS * 512;
  static constexpr int kWarpUsed = kMvs + kVS * 8 * 4;
  static constexpr int kAccBytes = G * D * 4;  // the end: the warp's [G][D] accumulators
  static_assert(kAccBytes <= kMvs, "the accumulators must not cover the minimum sums");
  static constexpr int kWarpBytes = (kWarpUsed + 15) / 16 * 16;
  // Block part: q fragments, q, per-head factors, warp maxima and sums.
  static constexpr int kQh = 0;                      // [kKS][32] uint2
  static constexpr int kQRaw = kQh + kKS * 32 * 8;   // [G][D] f32
  static constexpr int kQScale = kQRaw + G * D * 4;  // [G] 2^E
  static constexpr int kQUnscale = kQScale + 32;     // [G] 2^-E log2(e) scale
  static constexpr int kWMax = kQUnscale + 32;       // [warps][G]
  static constexpr int kWSum = kWMax + kWarps * G * 4;
  static constexpr int kBlockBytes = (kWSum + kWarps * G * 4 + 127) / 128 * 128;
  static constexpr int kSmemBytes = kBlockBytes + kWarps * kWarpBytes;
};

// 2-bit codes, thread (g, t): the PRMT selector that brings byte g / 2 of word x into byte 0 and
// of word y into byte 2; its nibble g & 1 holds fields 2g (bits 0-1, row g) and 2g + 1 (bits 2-3,
// row g + 8), each masked under the exponent of 1024 and scaled back by an HFMA2 as in code_pair.
// (Decoding a whole byte per PRMT with four fixed fields, as 4-bit does, was measured 13 % slower
// on the H100: 73 against 59 M instructions.)
struct NibbleDecoder {
  std::uint32_t sel, mask0, mask1;
  __half2 mul0, add0, mul1, add1;
  __device__ explicit NibbleDecoder(int g) {
    sel = static_cast<std::uint32_t>((g >> 1) | ((4 + (g >> 1)) << 8));
    const int shift = 4 * (g & 1);
    const float m = (g & 1) ? 1.0f / 16.0f : 1.0f;
    mask0 = 0x00030003u << shift;
    mask1 = 0x000C000Cu << shift;
    mul0 = __float2half2_rn(m);
    add0 = __float2half2_rn(-1024.0f * m);
    mul1 = __float2half2_rn(m / 4.0f);
    add1 = __float2half2_rn(-1024.0f * m / 4.0f);
  }
  __device__ inline std::uint32_t row0(std::uint32_t x) const {
    return h2u(__hfma2(u2h((x & mask0) | 0x64006400u), mul0, add0));
  }
  __device__ inline std::uint32_t row1(std::uint32_t x) const {
    return h2u(__hfma2(u2h((x & mask1) | 0x64006400u), mul1, add1));
  }
  __device__ inline std::uint32_t pair(std::uint32_t x, std::uint32_t y) const {
    return __byte_perm(x, y, sel);
  }
  // The same fields without the exponent of 1024 and the HFMA2: the f16 pair is subnormal,
  // f 2^(shift - 24) (row0) and f 2^(shift + 2 - 24) (row1), still exact (f 2^shift < 2^10).
  // Products with it are those with f times a power of two, which row_factor undoes exactly on
  // the fp32 results (tensor cores take f16 subnormals as they are).
  __device__ inline std::uint32_t row0_subnormal(std::uint32_t x) const { return x & mask0; }
  __device__ inline std::uint32_t row1_subnormal(std::uint32_t x) const { return x & mask1; }
};

// Field k (Bits wide, at bit Bits k of byte 0 and of byte 2 of x) as an exact f16 pair: one LOP3
// puts it under the exponent of 1024 (x = 1024 + f 2^(Bits k), exact: the field stays inside the
// mantissa), one HFMA2 by 2^-(Bits k), -1024 2^-(Bits k) leaves f. exp1024 is 0x64006400 held in a
// register (Params::f16_exponent_1024): with the mask and it both immediates, ptxas emits two
// LOP3s (a LOP3 takes one immediate), 128 extra instructions per 4-bit tile.
template <int Bits, int k>
__device__ inline std::uint32_t code_pair(std::uint32_t x, std::uint32_t exp1024) {
  constexpr std::uint32_t kField = ((1u << Bits) - 1u) << (Bits * k);
  constexpr std::uint32_t kMul = (15u - Bits * k) << 10;              // f16 2^-(Bits k)
  constexpr std::uint32_t kAdd = 0x8000u | ((25u - Bits * k) << 10);  // f16 -1024 2^-(Bits k)
  return h2u(__hfma2(u2h((x & (kField | kField << 16)) | exp1024), u2h(kMul | kMul << 16),
                     u2h(kAdd | kAdd << 16)));
}

// Field k as a subnormal f16 pair, f 2^(Bits k - 24): code_pair without its HFMA2 (see
// NibbleDecoder::row0_subnormal).
template <int Bits, int k>
__device__ inline std::uint32_t code_pair_subnormal(std::uint32_t x) {
  constexpr std::uint32_t kField = ((1u << Bits) - 1u) << (Bits * k);
  return x & (kField | kField << 16);
}

// The factors that undo the subnormal decode on fp32 results of rows g (r = 0) and g + 8 (r = 1)
// of a key or value m-tile: 2-bit rows come from NibbleDecoder::row0 / row1 (fields at 4 (g & 1)
// and 4 (g & 1) + 2), 4-bit rows from fields 0 and 1 of code_pair.
template <int Bits>
__device__ inline float subnormal_row_factor(int g, int r) {
  const int shift = Bits == 2 ? 4 * (g & 1) + 2 * r : 4 * r;
  return __int_as_float((127 + 24 - shift) << 23);  // 2^(24 - shift)
}

// 4-bit value rows of kChunks (2 or 4) 16-byte chunks: chunk v of token row r is stored at chunk
// v ^ chunk_swizzle(r), which makes (kChunks r + (v ^ chunk_swizzle(r))) mod 8, the bank group,
// distinct over any eight consecutive rows (the rows of an ldmatrix matrix).
template <int kChunks>
__device__ constexpr int chunk_swizzle(int r) {
  static_assert(kChunks == 2 || kChunks == 4, "4-bit value rows of D = 64 or 128 channels");
  return (r / (8 / kChunks)) % kChunks;
}

// Key scales at or above 1024 (a 2-bit key group spanning more than ~3000, a 4-bit one more than
// ~15000) are outside the exact range the kernel was specified for (q' = q s must stay a finite
// f16 with room to spare): such a block makes its tiles' scores NaN, so the (sequence, KV head)
// gets NaN outputs instead of silently inexact ones. Per f16 pair, (x & 0x7fff) + 0x1c00 reaches
// bit 15 exactly when |x| >= 1024 (or x is inf / NaN); OR-ed over the block's D scales.
template <int D>
__device__ inline bool key_scale_out_of_range(const std::uint32_t* params) {
  std::uint32_t wide = 0;
#pragma unroll
  for (int j = 0; j < D / 64; ++j)
    wide |= (params[2 * (threadIdx.x % 32 + 32 * j) + 1] & 0x7fff7fffu) + 0x1c001c00u;
  return __any_sync(kFull, (wide & 0x80008000u) != 0u);
}

// A KIVI tile loop's mode (kivi_mma_kernel): any tile, or only whole quantized tiles (any group /
// groups of 32).
constexpr int kGeneral = 0, kWhole = 1, kWhole32 = 2;
template <int M>
using Mode = std::integral_constant<int, M>;
// Field k of a code pair (rows g / g + 8 of an m-tile) where a lambda takes it.
template <int K>
using Field = std::integral_constant<int, K>;

// An int known at compile time where a lambda also takes run-time ints (immediate offsets).
template <int N>
struct FixedInt {
  __device__ constexpr operator int() const { return N; }
};

__device__ inline float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

template <int Bits, int D, int G>
__global__ void __launch_bounds__(kivi_warps<G>() * 32, 1) kivi_mma_kernel(Params p) {
  cuda_detail::allow_dependent_launch();  // the merge waits for this grid's end by itself
  using L = Layout<Bits, D, G>;
  constexpr int kW = L::kWarps;
  constexpr int kKS = L::kKS, kVS = L::kVS, kTwins = L::kTwins, kSPL = L::kSlotsPerLane;
  constexpr int kRW = L::kValRowWords;
  extern __shared__ __align__(16) unsigned char smem[];
  auto* qh = reinterpret_cast<uint2*>(smem + L::kQh);
  auto* q_raw = reinterpret_cast<float*>(smem + L::kQRaw);
  auto* q_scale = reinterpret_cast<float*>(smem + L::kQScale);
  auto* q_unscale = reinterpret_cast<float*>(smem + L::kQUnscale);
  auto* wmax = reinterpret_cast<float*>(smem + L::kWMax);
  auto* wsum = reinterpret_cast<float*>(smem + L::kWSum);

  const int split = blockIdx.x, kv_head = blockIdx.y, b = blockIdx.z;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane >> 2, t = lane & 3;
  unsigned char* wbase = smem + L::kBlockBytes + warp * L::kWarpBytes;
  unsigned char* Bv = wbase + L::kBv;
  auto* mvs = reinterpret_cast<float*>(wbase + L::kMvs);

  const int n = p.lengths.at(b, kv_head);
  const int qk = p.quantized_keys.at(b, kv_head);
  const int qv = p.quantized_values.at(b, kv_head);
  const bool valid =
      n >= 0 && n <= p.max_length && qk >= 0 && qk <= n && qv >= 0 && qv <= n && qk % p.group == 0;
  const int begin = split * p.chunk;
  const int end = valid ? min(n, begin + p.chunk) : begin;
  const int vq_end = min(qv, end);
  const int value_groups = D / p.group;

  const unsigned char* k_codes = p.k.codes.at(b, kv_head);
  const unsigned char* k_scale = p.k.scale.at(b, kv_head);
  const unsigned char* k_min = p.k.minimum.at(b, kv_head);
  const auto* k_res = reinterpret_cast<const __half*>(p.k.residual.at(b, kv_head));
  const unsigned char* v_codes = p.v.codes.at(b, kv_head);
  const unsigned char* v_scale = p.v.scale.at(b, kv_head);
  const unsigned char* v_min = p.v.minimum.at(b, kv_head);
  const auto* v_res = reinterpret_cast<const __half*>(p.v.residual.at(b, kv_head));

  // Channel of k slot 2t + (i & 1) + 8 (i >> 1) of key k-step s for thread t: 2-bit, channels
  // 16 s + 4 t .. 4 t + 3 (its word loads give four adjacent channels); 4-bit, the ldmatrix order
  // 16 s + 2 t + {0, 1, 8, 9}.
  const auto key_channel = [](int s, int tq, int i) {
    return Bits == 2 ? 16 * s + 4 * tq + i : 16 * s + 2 * tq + (i & 1) + 8 * (i >> 1);
  };

  const NibbleDecoder dec(g);                         // 2-bit
  const std::uint32_t exp1024 = p.f16_exponent_1024;  // 4-bit
  // Rows g and g + 8 of a key or value m-tile decoded as subnormals (whole tiles).
  const float row_factor[2] = {subnormal_row_factor<Bits>(g, 0), subnormal_row_factor<Bits>(g, 1)};
  // Tile token of row g (r = 0) / g + 8 (r = 1) of key m-tile mt: 2-bit, the fields of nibble g
  // of word mt; 4-bit, the nibbles of byte 2g (m-tile 0) and 2g + 1 (m-tile 1) of the channel's
  // 16 bytes (ldmatrix.trans half-word g: tokens 4g .. 4g + 3).
  const auto key_token = [&](int mt, int r) {
    return Bits == 2 ? 16 * mt + 2 * g + r : 4 * g + 2 * mt + r;
  };
  // Channel of row g (r = 0) / g + 8 (r = 1) of value m-tile i (inside value slot i / 2): 2-bit,
  // the fields of nibble g of word i; 4-bit, the nibbles of byte 2g + (i & 1) of the token's 16
  // bytes of slot i / 2 (ldmatrix.trans half-word g: channels 32 (i / 2) + 4g .. 4g + 3).
  const auto value_channel = [&](int i, int r) {
    return Bits == 2 ? 16 * i + 2 * g + r : 32 * (i >> 1) + 4 * g + 2 * (i & 1) + r;
  };
  // p' columns this thread writes (2 pair, 2 pair + 1: the same heads) and the value slots it
  // takes (twin kSPL + k; twins split the slots between them).
  const int pair = t % L::kPairs, twin = t / L::kPairs;
  // The k order of the p.V mma: 2-bit, thread t's slots 2t, 2t + 1, 2t + 8, 2t + 9 hold tokens t,
  // t + 4, t + 8, t + 12 of the k-step (what its value-code loads give), so token r sits in k row
  // krow(r); 4-bit, the ldmatrix order (tokens 2t, 2t + 1, 2t + 8, 2t + 9), k row = token.
  const auto krow = [](int r) {
    return Bits == 2 ? 8 * (r >> 3) + 2 * (r & 3) + ((r >> 2) & 1) : r;
  };
  // Where p' row r (16 bytes) of a slot lies. 4-bit: XOR-swizzled by its bits 3-4, so that the
  // eight rows a p' write touches (rows g = 0 .. 7 of one m-tile: tokens 4g + const) and the eight
  // rows of one ldmatrix.trans matrix both fall into eight distinct bank groups. (2-bit rows,
  // 2g + const through krow, collide only in pairs; swizzling them measured no faster.)
  const auto p_row = [](int r) { return Bits == 2 ? r : r ^ ((r >> 3) & 3); };
  // Thread t's first token of the k-step and the step to its second (k slots 2t, 2t + 1).
  constexpr int kPairStep = Bits == 2 ? 4 : 1;
  const int k_first = Bits == 2 ? t : 2 * t;

  float acc[kKS][4];  // p.V: m-tile i (channels value_channel(i, 0 / 1)), columns 2t, 2t + 1
#pragma unroll
  for (int i = 0; i < kKS; ++i)
#pragma unroll
    for (int r = 0; r < 4; ++r) acc[i][r] = 0.0f;
  float run_max[2] = {-INFINITY, -INFINITY}, run_sum[2] = {0.0f, 0.0f};
  float mv[kSPL][2];  // sum_t p_t m_t of this thread's tokens per slot and column
#pragma unroll
  for (int k = 0; k < kSPL; ++k) mv[k][0] = mv[k][1] = 0.0f;

  auto stage_ptr = [&](int st) { return wbase + st * L::kStageBytes; };
  // (KIVI groups are 32, 64 or 128 tokens / channels: powers of two.)
  const int group_log2 = __ffs(p.group) - 1, row_words = p.group * Bits / 32;
  const int slot_shift = group_log2 - 5;  // value slot (32 channels) -> value group
  // The copies' addresses are formed as one 64-bit pointer per part and tile plus constant
  // offsets (this lane's, then per j), so that the j copies take immediate offsets: written as
  // base + int index per copy, the address arithmetic was ~100 of the ~850 instructions per
  // 2-bit tile.
  // Tile modes: kGeneral takes any tile (residual rows, a sequence's end, any group); kWhole and
  // kWhole32 (groups of 32) only tiles of 32 quantized keys and values, t0 + 32 <= whole_end, so
  // that the steady-state loop holds none of the edge paths' branches or live ranges.
  // Whether key blocks and value groups are 32 wide: known in kWhole32 and kWhole, tested in
  // kGeneral.
  const auto groups_of_32 = [&](auto mode) {
    constexpr int kMode = decltype(mode)::value;
    return kMode == kWhole32 || (kMode == kGeneral && p.group == 32);
  };
  auto issue = [&](int t0, unsigned char* st, auto mode) {
    constexpr int kMode = decltype(mode)::value;
    if constexpr (kMode == kGeneral) {
      // The step reads this tile's f16 residual rows straight from global memory: bring them into
      // L2 a step ahead (one row per lane, 128-byte lines).
      const int row = t0 + lane;
      const auto prefetch_row = [&](const __half* rows, int first) {
        if (row < first || row >= end) return;
        const auto* src = reinterpret_cast<const unsigned char*>(rows + (row - first) * D);
#pragma unroll
        for (int j = 0; j < D * 2 / 128; ++j) prefetch_l2(src + 128 * j);
      };
      prefetch_row(k_res, qk);
      prefetch_row(v_res, qv);
    }
    if (kMode != kGeneral || t0 < qk) {
      const int blk = t0 >> (kMode == kWhole32 ? 5 : group_log2);
      // rw: words per channel row of a key block (Bits for groups of 32: a compile-time constant
      // there, so that the j copies take immediate offsets).
      auto copy_codes = [&](const unsigned char* tile, auto rw) {
        constexpr int kRowBytes = Bits == 2 ? 8 : 16;  // staged: [channel][kRowBytes]
        const unsigned char* src = tile + lane * rw * 4;
        // (Opaque to the optimizer: otherwise it folds lane and j into one 64-bit offset per
        // copy and repeats the 64-bit address arithmetic D / 32 times.)
        asm("" : "+l"(src));
        unsigned char* dst = st + lane * kRowBytes;
#pragma unroll
        for (int j = 0; j < D / 32; ++j) {
          if constexpr (Bits == 2)
            cp_async8(dst + 32 * kRowBytes * j, src + 32 * 4 * j * rw);
          else
            cp_async16(dst + 32 * kRowBytes * j, src + 32 * 4 * j * rw);  // ldmatrix rows
        }
      };
      if (groups_of_32(mode))  // row_words == Bits
        copy_codes(k_codes + static_cast<std::int64_t>(t0) * (D * Bits / 8), FixedInt<Bits>{});
      else
        copy_codes(k_codes + static_cast<std::int64_t>(blk) * D * row_words * 4 +
                       (((t0 & (p.group - 1)) * Bits) >> 5) * 4,
                   row_words);
      const std::int64_t par = static_cast<std::int64_t>(blk) * D * 2 + 4 * lane;
      const unsigned char* km = k_min + par;
      const unsigned char* ks = k_scale + par;
      unsigned char* dst = st + L::kKPar + 8 * lane;
#pragma unroll
      for (int j = 0; j < D / 64; ++j) {
        cp_async4(dst + 256 * j, km + 128 * j);
        cp_async4(dst + 256 * j + 4, ks + 128 * j);
      }
    }
    if (kMode != kGeneral || t0 + 32 <= vq_end) {
      const unsigned char* src = v_codes + static_cast<std::int64_t>(t0) * kRW * 4 + 16 * lane;
      // 2-bit: copied as is. 4-bit: 16-byte chunk v (value slot v) of token row tok at chunk
      // v ^ swizzle(tok), so that the eight token rows of an ldmatrix.trans matrix hit eight
      // distinct bank groups; element e = lane + 32 j lies at tok = e / kChunks, v = e % kChunks,
      // and swizzle(tok) does not depend on j (32 j / kChunks rows further on: a multiple of its
      // period), so every j shares this lane's destination offset.
      unsigned char* dst = st + L::kVal + 16 * lane;
      if constexpr (Bits == 4) {
        constexpr int kChunks = kRW / 4;
        const int tok = lane / kChunks, v = lane % kChunks;
        dst = st + L::kVal + 16 * (tok * kChunks + (v ^ chunk_swizzle<kChunks>(tok)));
      }
#pragma unroll
      for (int j = 0; j < L::kValBytes / (16 * 32); ++j) cp_async16(dst + 512 * j, src + 512 * j);
      const std::int64_t off = static_cast<std::int64_t>(t0) * value_groups * 2 + 16 * lane;
      if (lane < 4 * value_groups) {
        cp_async16(st + L::kVScale + 16 * lane, v_scale + off);
        cp_async16(st + L::kVMin + 16 * lane, v_min + off);
      }
    }
  };

  int stage = 0;
  int t0 = begin + warp * 32;
  // Tiles [t0, t0 + 32) with t0 + 32 <= whole_end hold quantized keys and values only (t0 and qk
  // are multiples of 32, so t0 < qk already means a whole tile of quantized keys).
  const int whole_end = min(min(qk, vq_end), end);
  if (t0 < end) issue(t0, stage_ptr(0), Mode<kGeneral>{});
  cp_async_commit();

  // With the first tile on its way (its DRAM latency overlaps this set-up): q, its per-head
  // power-of-two scale, and the B fragments of q: thread (g, t) of k-step s holds column g (head
  // g % G), channels key_channel(s, t, 0 .. 3) (k slots 2t, 2t + 1, 2t + 8, 2t + 9).
  load_q_scaled<D, G, kW>(p, b, kv_head, kQTop, p.scale_log2, q_raw, q_scale, q_unscale);
  for (int idx = threadIdx.x; idx < kKS * 32; idx += kW * 32) {
    const int ln = idx % 32, s = idx / 32, h = (ln >> 2) % G;
    const float* qr = q_raw + h * D;
    const float f = q_scale[h];
    const auto at = [&](int i) { return qr[key_channel(s, ln & 3, i)] * f; };
    qh[idx] =
        make_uint2(h2u(__floats2half2_rn(at(0), at(1))), h2u(__floats2half2_rn(at(2), at(3))));
  }
  // The warp's p' tile starts at zero: columns no thread writes (2 kPairs and up) stay zero.
  for (int i = lane; i < kVS * 512 / 16; i += 32)
    reinterpret_cast<uint4*>(Bv)[i] = make_uint4(0u, 0u, 0u, 0u);
  __syncthreads();
  // This thread's score / output columns 2t + c, c = 0, 1: heads (2t + c) % G.
  const float unscale[2] = {q_unscale[(2 * t) % G], q_unscale[(2 * t + 1) % G]};
  // One tile: copy the warp's next one, then this one's scores, softmax and p.V.
  auto step = [&](auto mode) {
    constexpr int kMode = decltype(mode)::value;
    // Whole tiles decode codes to subnormal f16 (no HFMA2): their scores are rescaled per row
    // here, their p.V accumulators once after the whole-tile loop.
    constexpr bool kSubnormal = kMode != kGeneral;
    // Field k (rows g / g + 8 of an m-tile) of the codes in x as an f16 pair: 2-bit through
    // NibbleDecoder (x from its pair()), 4-bit through code_pair; subnormal on whole tiles.
    const auto decode = [&](std::uint32_t x, auto field) {
      constexpr int kField = decltype(field)::value;
      if constexpr (Bits == 2 && kSubnormal)
        return kField == 0 ? dec.row0_subnormal(x) : dec.row1_subnormal(x);
      else if constexpr (Bits == 2)
        return kField == 0 ? dec.row0(x) : dec.row1(x);
      else if constexpr (kSubnormal)
        return code_pair_subnormal<4, kField>(x);
      else
        return code_pair<4, kField>(x, exp1024);
    };
    const int next = t0 + kW * 32;
    if (kMode != kGeneral && next + 32 <= whole_end)
      issue(next, stage_ptr(stage ^ 1), mode);
    else if (next < end)
      issue(next, stage_ptr(stage ^ 1), Mode<kGeneral>{});
    cp_async_commit();
    cp_async_wait<1>();
    __syncwarp();
    const unsigned char* st = stage_ptr(stage);

    // ---- scores of the 32 tokens: two m-tiles of 16 tokens
    float sc[2][4];
#pragma unroll
    for (int mt = 0; mt < 2; ++mt)
#pragma unroll
      for (int r = 0; r < 4; ++r) sc[mt][r] = 0.0f;
    const bool key_quantized = kMode != kGeneral || t0 < qk;
    // Score of column c = (sc + bias[c]) u[c]; u NaN: a key block out of range.
    float bias[2] = {0.0f, 0.0f}, u[2] = {unscale[0], unscale[1]};
    if (key_quantized) {
      // sum_c q_c m_c: the same for every token, one accumulator for both m-tiles.
      float kbias[4] = {0.0f, 0.0f, 0.0f, 0.0f};
      // (kw: 2-bit only, lm: 4-bit only.)
      [[maybe_unused]] const auto* kw = reinterpret_cast<const std::uint32_t*>(st);
      const auto* kpar = reinterpret_cast<const std::uint32_t*>(st + L::kKPar);
      const bool out_of_range = key_scale_out_of_range<D>(kpar);
      [[maybe_unused]] std::uint32_t lm[4];  // 4-bit: one ldmatrix.trans per two k-steps
#pragma unroll
      for (int s = 0; s < kKS; ++s) {
        const uint2 q2 = qh[s * 32 + lane];
        std::uint32_t par[4];  // (m, s) of the channels of k slots 2t, 2t + 1, then 2t + 8, 2t + 9
        std::uint32_t a[2][4];
        if constexpr (Bits == 2) {
          const int c0 = 16 * s + 4 * t;  // this thread's channels c0 .. c0 + 3
          const uint4 ms = *reinterpret_cast<const uint4*>(kpar + c0);
          par[0] = ms.x, par[1] = ms.y, par[2] = ms.z, par[3] = ms.w;
          // [channel][2 words]: word m-tile mt of channels c0 .. c0 + 3.
          const uint4 w01 = *reinterpret_cast<const uint4*>(kw + c0 * 2);
          const uint4 w23 = *reinterpret_cast<const uint4*>(kw + c0 * 2 + 4);
          const std::uint32_t x01[2] = {dec.pair(w01.x, w01.z), dec.pair(w01.y, w01.w)};
          const std::uint32_t x23[2] = {dec.pair(w23.x, w23.z), dec.pair(w23.y, w23.w)};
#pragma unroll
          for (int mt = 0; mt < 2; ++mt) {
            a[mt][0] = decode(x01[mt], Field<0>{});
            a[mt][1] = decode(x01[mt], Field<1>{});
            a[mt][2] = decode(x23[mt], Field<0>{});
            a[mt][3] = decode(x23[mt], Field<1>{});
          }
        } else {
          // [channel][16 bytes]: lane 8m + r addresses channel row 32 (s / 2) + 8m + r; thread
          // (g, t) gets half-word g (tokens 4g .. 4g + 3) of channels 16 s + 2t, 2t + 1 (matrix
          // 2 (s % 2)) and 16 s + 8 + 2t, 2t + 1 (the next), as f16 lanes of one register.
          if (s % 2 == 0) ldmatrix_x4_trans(lm, st + (32 * (s / 2) + lane) * 16);
          const uint2 p0 = *reinterpret_cast<const uint2*>(kpar + 2 * (8 * s + t));
          const uint2 p1 = *reinterpret_cast<const uint2*>(kpar + 2 * (8 * s + 4 + t));
          par[0] = p0.x, par[1] = p0.y, par[2] = p1.x, par[3] = p1.y;
          const std::uint32_t x01 = lm[2 * (s % 2)], x23 = lm[2 * (s % 2) + 1];
          // m-tile 0: byte 2g of each half-word (tokens 4g, 4g + 1 = rows g, g + 8); m-tile 1:
          // byte 2g + 1, moved down by a shift.
          a[0][0] = decode(x01, Field<0>{}), a[0][1] = decode(x01, Field<1>{});
          a[0][2] = decode(x23, Field<0>{}), a[0][3] = decode(x23, Field<1>{});
          a[1][0] = decode(x01 >> 8, Field<0>{}), a[1][1] = decode(x01 >> 8, Field<1>{});
          a[1][2] = decode(x23 >> 8, Field<0>{}), a[1][3] = decode(x23 >> 8, Field<1>{});
        }
        const std::uint32_t b0 = h2u(__hmul2(u2h(q2.x), u2h(par[1])));
        const std::uint32_t b1 = h2u(__hmul2(u2h(q2.y), u2h(par[3])));
        // Rows g only (rows g + 8 get scales in their A slots and are not used).
        mma16816<__half>(kbias, par[0], par[1], par[2], par[3], q2.x, q2.y);
#pragma unroll
        for (int mt = 0; mt < 2; ++mt)
          mma16816<__half>(sc[mt], a[mt][0], a[mt][1], a[mt][2], a[mt][3], b0, b1);
      }
      if constexpr (kSubnormal) {
#pragma unroll
        for (int mt = 0; mt < 2; ++mt)
#pragma unroll
          for (int r = 0; r < 4; ++r) sc[mt][r] *= row_factor[r >> 1];
      }
      bias[0] = kbias[0], bias[1] = kbias[1];
      if (out_of_range) u[0] = u[1] = __int_as_float(0x7fc00000);
    } else {
      // f16 residual rows (tokens >= qk), rows g and g + 8 of each m-tile; none past the end.
#pragma unroll
      for (int mt = 0; mt < 2; ++mt) {
        const int r0 = t0 + 16 * mt + g, r1 = r0 + 8;
        const __half* row0 = k_res + static_cast<std::int64_t>(r0 - qk) * D;
        const __half* row1 = k_res + static_cast<std::int64_t>(r1 - qk) * D;
        // All of the m-tile's loads first, then its mmas: one wait for memory instead of one per
        // k-step. (Residual tiles come last in a warp's loop, where nothing else hides a wait:
        // loaded per k-step, they made the last split's blocks ~10 us slower at B 8 / 32K.)
        std::uint32_t a[kKS][4];
#pragma unroll
        for (int s = 0; s < kKS; ++s) {
          // Channels key_channel(s, t, 0 / 1) and (2 / 3): two adjacent pairs.
          const auto at = [&](const __half* row, bool live, int i) {
            return live ? __ldg(reinterpret_cast<const unsigned*>(row + key_channel(s, t, i))) : 0u;
          };
          a[s][0] = at(row0, r0 < end, 0), a[s][1] = at(row1, r1 < end, 0);
          a[s][2] = at(row0, r0 < end, 2), a[s][3] = at(row1, r1 < end, 2);
        }
#pragma unroll
        for (int s = 0; s < kKS; ++s) {
          const uint2 q2 = qh[s * 32 + lane];
          mma16816<__half>(sc[mt], a[s][0], a[s][1], a[s][2], a[s][3], q2.x, q2.y);
        }
      }
    }
    // Token (within the tile) of row g (r = 0) / g + 8 (r = 1) of m-tile mt.
    const auto tok = [&](int mt, int r) {
      return key_quantized ? key_token(mt, r) : 16 * mt + g + 8 * r;
    };
    if (kMode == kGeneral && t0 + 32 > end) {
#pragma unroll
      for (int mt = 0; mt < 2; ++mt) {
        if (t0 + tok(mt, 0) >= end) sc[mt][0] = sc[mt][1] = -INFINITY;
        if (t0 + tok(mt, 1) >= end) sc[mt][2] = sc[mt][3] = -INFINITY;
      }
    }

    // ---- online softmax on the accumulators: column c = entries c, c + 2 of both m-tiles
    // A running maximum moves in a few tiles of a split only. When no score of the warp's tile
    // exceeds it (u > 0 keeps the order of the raw maxima), the warp's maximum and the correction
    // are skipped: new_max would be run_max and corr 1, so the results are the same bit for bit.
    float mx[2];
    bool above = false;
#pragma unroll
    for (int c = 0; c < 2; ++c) {
      mx[c] = fmaxf(fmaxf(sc[0][c], sc[0][c + 2]), fmaxf(sc[1][c], sc[1][c + 2]));
      above = above || (mx[c] + bias[c]) * u[c] > run_max[c];
    }
    const bool moves = __any_sync(kFull, above);
    float corr[2] = {1.0f, 1.0f};
#pragma unroll
    for (int c = 0; c < 2; ++c) {
      float new_max = run_max[c];
      if (moves) {
        float m = mx[c];
        m = fmaxf(m, __shfl_xor_sync(kFull, m, 4));
        m = fmaxf(m, __shfl_xor_sync(kFull, m, 8));
        m = fmaxf(m, __shfl_xor_sync(kFull, m, 16));
        // (NaN u: NaN probabilities and sums, as NaN scores would give.)
        new_max = fmaxf(run_max[c], (m + bias[c]) * u[c]);
        corr[c] = fast_exp2(run_max[c] - new_max);
      }
      const float off = fmaf(bias[c], u[c], -new_max);
      float sum = 0.0f;
#pragma unroll
      for (int mt = 0; mt < 2; ++mt)
#pragma unroll
        for (int r = c; r < 4; r += 2) {
          sc[mt][r] = fast_exp2(fmaf(sc[mt][r], u[c], off));
          sum += sc[mt][r];
        }
      run_sum[c] = fmaf(run_sum[c], corr[c], sum);
      run_max[c] = new_max;
    }
    if (moves && __any_sync(kFull, corr[0] != 1.0f || corr[1] != 1.0f)) {
#pragma unroll
      for (int i = 0; i < kKS; ++i) {
        acc[i][0] *= corr[0], acc[i][1] *= corr[1];
        acc[i][2] *= corr[0], acc[i][3] *= corr[1];
      }
#pragma unroll
      for (int k = 0; k < kSPL; ++k) mv[k][0] *= corr[0], mv[k][1] *= corr[1];
    }

    // ---- p' = p s of this thread's 4 tokens and 2 columns into the p' tile, p m into mv
    const bool values_fast = kMode != kGeneral || t0 + 32 <= vq_end;
    // params(tk, s, m): scales and minimums of tile token tk for this thread's value slots
    // (twin kSPL + k, those below kVS).
    auto write_p = [&](auto&& params) {
#pragma unroll
      for (int mt = 0; mt < 2; ++mt)
#pragma unroll
        for (int row = 0; row < 2; ++row) {
          const int tk = tok(mt, row);
          const float p0 = sc[mt][2 * row], p1 = sc[mt][2 * row + 1];
          unsigned char* dst = Bv + p_row(16 * (tk >> 4) + krow(tk & 15)) * 16 + 4 * pair;
          float s[kSPL], m[kSPL];
          params(tk, s, m);
#pragma unroll
          for (int k = 0; k < kSPL; ++k) {
            const int vs = twin * kSPL + k;
            if (kSPL * kTwins == kVS || vs < kVS) {
              *reinterpret_cast<std::uint32_t*>(dst + vs * 512) =
                  h2u(__floats2half2_rn(p0 * s[k], p1 * s[k]));
              mv[k][0] = fmaf(p0, m[k], mv[k][0]);
              mv[k][1] = fmaf(p1, m[k], mv[k][1]);
            }
          }
        }
    };
    if (values_fast) {
      const auto* vsc = reinterpret_cast<const __half*>(st + L::kVScale);
      const auto* vmn = reinterpret_cast<const __half*>(st + L::kVMin);
      constexpr bool kPaired = kSPL % 2 == 0 && kSPL * kTwins == kVS;
      if (kPaired && groups_of_32(mode)) {  // slot_shift == 0
        // Groups of 32 channels: the scales (minimums) of slots 2k, 2k + 1 are adjacent.
        write_p([&](int tk, float(&s)[kSPL], float(&m)[kSPL]) {
          const int at = tk * value_groups + twin * kSPL;
#pragma unroll
          for (int k = 0; k < kSPL; k += 2) {
            const float2 s2 = __half22float2(*reinterpret_cast<const __half2*>(vsc + at + k));
            const float2 m2 = __half22float2(*reinterpret_cast<const __half2*>(vmn + at + k));
            s[k] = s2.x, s[k + 1] = s2.y, m[k] = m2.x, m[k + 1] = m2.y;
          }
        });
      } else {
        write_p([&](int tk, float(&s)[kSPL], float(&m)[kSPL]) {
#pragma unroll
          for (int k = 0; k < kSPL; ++k) {
            const int vg = min(twin * kSPL + k, kVS - 1) >> slot_shift;
            s[k] = __half2float(vsc[tk * value_groups + vg]);
            m[k] = __half2float(vmn[tk * value_groups + vg]);
          }
        });
      }
    } else {
      write_p([&](int tk, float(&s)[kSPL], float(&m)[kSPL]) {
        const int tok = t0 + tk;
#pragma unroll
        for (int k = 0; k < kSPL; ++k) {
          const int vg = min(twin * kSPL + k, kVS - 1) >> slot_shift;
          s[k] = 0.0f, m[k] = 0.0f;
          if (tok < qv) {
            const std::int64_t at = static_cast<std::int64_t>(tok) * value_groups + vg;
            s[k] = __half2float(reinterpret_cast<const __half*>(v_scale)[at]);
            m[k] = __half2float(reinterpret_cast<const __half*>(v_min)[at]);
          } else if (tok < end) {
            s[k] = 1.0f;
          }
        }
      });
    }
    __syncwarp();

    // ---- p.V: per k-step of 16 tokens, m-tiles of 16 channels (m-tile i: value slot i / 2)
#pragma unroll
    for (int ks = 0; ks < 2; ++ks) {
      std::uint32_t bv[kVS][2];
#pragma unroll
      for (int v2 = 0; v2 < kVS; v2 += 2) {
        // Lanes 8m .. 8m + 7 address matrix m: slot v2 + m / 2, k rows 8 (m & 1) + 0 .. 7.
        const int m = lane >> 3;
        std::uint32_t r[4];
        ldmatrix_x4_trans(
            r, Bv + (v2 + (m >> 1)) * 512 + p_row(16 * ks + 8 * (m & 1) + (lane & 7)) * 16);
        bv[v2][0] = r[0], bv[v2][1] = r[1], bv[v2 + 1][0] = r[2], bv[v2 + 1][1] = r[3];
      }
      if (values_fast) {
        const unsigned char* vst = st + L::kVal;
        if constexpr (Bits == 2) {
          const auto* vw = reinterpret_cast<const std::uint32_t*>(vst);
          const std::uint32_t* rows[4];
#pragma unroll
          for (int e = 0; e < 4; ++e) rows[e] = vw + (16 * ks + t + 4 * e) * kRW;
#pragma unroll
          for (int c4 = 0; c4 < kRW / 4; ++c4) {
            uint4 r[4];
#pragma unroll
            for (int e = 0; e < 4; ++e) r[e] = *reinterpret_cast<const uint4*>(rows[e] + 4 * c4);
            const std::uint32_t w[4][4] = {{r[0].x, r[0].y, r[0].z, r[0].w},
                                           {r[1].x, r[1].y, r[1].z, r[1].w},
                                           {r[2].x, r[2].y, r[2].z, r[2].w},
                                           {r[3].x, r[3].y, r[3].z, r[3].w}};
#pragma unroll
            for (int q = 0; q < 4; ++q) {  // word q of the chunk = m-tile 4 c4 + q
              const int i = 4 * c4 + q;
              const std::uint32_t x01 = dec.pair(w[0][q], w[1][q]);
              const std::uint32_t x23 = dec.pair(w[2][q], w[3][q]);
              mma16816<__half>(acc[i], decode(x01, Field<0>{}), decode(x01, Field<1>{}),
                               decode(x23, Field<0>{}), decode(x23, Field<1>{}), bv[i / 2][0],
                               bv[i / 2][1]);
            }
          }
        } else {
          // Per two slots one ldmatrix.trans: matrix m = slot v2 + m / 2, tokens 8 (m & 1) + 0 .. 7
          // of the k-step; thread (g, t) gets half-word g (channels 32 v + 4g .. 4g + 3) of tokens
          // 2t, 2t + 1 (and 2t + 8, 2t + 9 from the next matrix). m-tile 2v: the nibbles of byte
          // 2g (rows g, g + 8), m-tile 2v + 1: those of byte 2g + 1.
#pragma unroll
          for (int v2 = 0; v2 < kVS; v2 += 2) {
            const int m = lane >> 3, v = v2 + (m >> 1), tok = 16 * ks + 8 * (m & 1) + (lane & 7);
            std::uint32_t r[4];
            ldmatrix_x4_trans(r, vst + 16 * (tok * (kRW / 4) + (v ^ chunk_swizzle<kRW / 4>(tok))));
#pragma unroll
            for (int e = 0; e < 2; ++e) {
#pragma unroll
              for (int e2 = 0; e2 < 2; ++e2) {
                const std::uint32_t x01 = r[2 * e] >> (8 * e2), x23 = r[2 * e + 1] >> (8 * e2);
                mma16816<__half>(acc[2 * (v2 + e) + e2], decode(x01, Field<0>{}),
                                 decode(x01, Field<1>{}), decode(x23, Field<0>{}),
                                 decode(x23, Field<1>{}), bv[v2 + e][0], bv[v2 + e][1]);
              }
            }
          }
        }
      } else if (t0 >= qv) {
        // Residual values only (zeros past the end). Channels value_channel(i, 0 / 1) are
        // adjacent, so one word holds both rows of a token; all loads of the k-step go out first.
        const int tk0 = t0 + 16 * ks + k_first, tk1 = tk0 + kPairStep;
        const int tokens[4] = {tk0, tk1, tk0 + 8, tk1 + 8};
        std::uint32_t w[kKS][4];
#pragma unroll
        for (int i = 0; i < kKS; ++i) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const __half* row = v_res + static_cast<std::int64_t>(tokens[e] - qv) * D;
            w[i][e] = tokens[e] < end
                          ? __ldg(reinterpret_cast<const unsigned*>(row + value_channel(i, 0)))
                          : 0u;
          }
        }
        // A: 0x5410 pairs the two tokens' low halves (row g), 0x7632 their high halves (g + 8).
#pragma unroll
        for (int i = 0; i < kKS; ++i)
          mma16816<__half>(acc[i], __byte_perm(w[i][0], w[i][1], 0x5410),
                           __byte_perm(w[i][0], w[i][1], 0x7632),
                           __byte_perm(w[i][2], w[i][3], 0x5410),
                           __byte_perm(w[i][2], w[i][3], 0x7632), bv[i / 2][0], bv[i / 2][1]);
      } else {
        // Edge tile: each element from the codes (t < qv), the f16 residual (t < end) or 0.
        constexpr int kPerWord = 32 / Bits;
        constexpr std::uint32_t kMask = (1u << Bits) - 1u;
        const auto* vw = reinterpret_cast<const std::uint32_t*>(v_codes);
        auto element = [&](int tk, int ch) -> __half {
          if (tk < qv) {
            const std::uint32_t word =
                __ldg(vw + static_cast<std::int64_t>(tk) * kRW + ch / kPerWord);
            return __uint2half_rn((word >> (Bits * (ch % kPerWord))) & kMask);
          }
          if (tk < end) return v_res[static_cast<std::int64_t>(tk - qv) * D + ch];
          return __float2half_rn(0.0f);
        };
        const int tk0 = t0 + 16 * ks + k_first, tk1 = tk0 + kPairStep;
#pragma unroll
        for (int i = 0; i < kKS; ++i) {
          const int ch0 = value_channel(i, 0), ch1 = value_channel(i, 1);
          mma16816<__half>(acc[i], pack_halves(element(tk0, ch0), element(tk1, ch0)),
                           pack_halves(element(tk0, ch1), element(tk1, ch1)),
                           pack_halves(element(tk0 + 8, ch0), element(tk1 + 8, ch0)),
                           pack_halves(element(tk0 + 8, ch1), element(tk1 + 8, ch1)), bv[i / 2][0],
                           bv[i / 2][1]);
        }
      }
    }
    __syncwarp();
    stage ^= 1;
    t0 = next;
  };
  if (p.group == 32) {
    while (t0 + 32 <= whole_end) step(Mode<kWhole32>{});
  } else {
    while (t0 + 32 <= whole_end) step(Mode<kWhole>{});
  }
  // The whole tiles' p.V rows came from subnormal codes: back to the scale the edge tiles use.
#pragma unroll
  for (int i = 0; i < kKS; ++i)
#pragma unroll
    for (int r = 0; r < 4; ++r) acc[i][r] *= row_factor[r >> 1];
  while (t0 < end) step(Mode<kGeneral>{});
  cp_async_wait<0>();
  __syncwarp();

  // ---- the warp's sums over its row groups, its accumulators [G][D] (plus the value minimums'
  // sums of their slot) into its (now free) shared memory, then the block merge
#pragma unroll
  for (int c = 0; c < 2; ++c) {
#pragma unroll
    for (int x = 4; x < 32; x *= 2) {
      run_sum[c] += __shfl_xor_sync(kFull, run_sum[c], x);
#pragma unroll
      for (int k = 0; k < kSPL; ++k) mv[k][c] += __shfl_xor_sync(kFull, mv[k][c], x);
    }
  }
  if (g == 0) {
#pragma unroll
    for (int k = 0; k < kSPL; ++k) {
      const int vs = twin * kSPL + k;
      if (kSPL * kTwins == kVS || vs < kVS)
        mvs[vs * 8 + 2 * pair] = mv[k][0], mvs[vs * 8 + 2 * pair + 1] = mv[k][1];
    }
    if (t < L::kPairs) {
#pragma unroll
      for (int c = 0; c < 2; ++c)
        if (2 * t + c < G)
          wmax[warp * G + 2 * t + c] = run_max[c], wsum[warp * G + 2 * t + c] = run_sum[c];
    }
  }
  __syncwarp();
  auto* W = reinterpret_cast<float*>(wbase);
#pragma unroll
  for (int i = 0; i < kKS; ++i)
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      const int col = 2 * t + (r & 1);
      const int ch = value_channel(i, r < 2 ? 0 : 1);
      if (col < G) W[col * D + ch] = acc[i][r] + mvs[(i / 2) * 8 + col];
    }
  __syncthreads();
  if (p.cluster_merge)  // q_raw, q_scale and q_unscale are free by now
    merge_cluster<D, G, kW>(p, smem + L::kBlockBytes, L::kWarpBytes, wmax, wsum, valid, b, kv_head,
                            q_raw, q_scale, q_unscale);
  else
    merge_warps<D, G, false, kW>(p, smem + L::kBlockBytes, L::kWarpBytes, wmax, wsum, 1.0f, valid,
                                 b, kv_head, split);
}

}  // namespace kivi_mma

// ---- Per-token INT8 / INT4 and FP8 on tensor cores ---------------------------------------------
// The frame of kivi_mma (4 warps of 32-token tiles, cp.async double buffering per warp, the same
// softmax, hi / lo B operands and merge) for formats whose parameters are per token (INT: scale
// [and minimum] per token and channel group; FP8: one scale per (sequence, KV head) and tensor):
//   q.K: A = the tile's raw codes (16 tokens x 16 channels), B = q; the accumulator of a channel
//        group is scaled per token row after the group's last k-step and the asymmetric minimum
//        enters in fp32: score_t = sum_g s_tg (q . code_t)_g + m_tg sum_{c in g} q_c (FP8: the
//        key scale joins the softmax factor, the value scale the output);
//   p.V: A = value codes (16 channels x 16 tokens), B = p'_t = p_t s_tg per channel group; the
//        asymmetric minimums as one more mma, A = 1 against B = p_t m_tg.
// Tiles are staged as token rows (D b / 8 bytes, 16-byte chunks XOR-swizzled per row so that
// ldmatrix hits distinct banks) and read with ldmatrix for keys (a word = 4 / 8 channels of one
// token) and ldmatrix.trans for values (a word = the same channels of two tokens). Codes become
// exact f16 without conversions: INT8 bytes 0, 2 and 1, 3 of a word with one LOP3 each under the
// exponent of 1024 (the symmetric sign flip folded into the same LOP3) and one HADD2; INT4
// nibbles i and i + 4 likewise (odd nibbles sit 16x higher, taken out by an HFMA2); FP8 pairs with
// one cvt.rn.f16x2.e4m3x2 / e5m2x2 each after a PRMT. The k order inside an mma and the channel
// order of the m-tile rows are chosen to match these pairs (key_channel, value_channel).
// Accuracy: q (bf16 or f16) times a power of two 2^E with max|q 2^E| in [2^7, 2^8) is exact in
// f16 down to 2^-22 max|q| (the lo column catches what falls below f16's normal range); p' is an
// fp32 product sent as hi + 2^-11 lo; every mma accumulates in fp32 and scales apply in fp32, so
// the arithmetic matches the CUDA-core kernel's to fp32 rounding. Channel groups must be a
// multiple of 16 (INT8) or 32 (INT4: one ldmatrix row spans 32 channels) and every staged part
// 16-byte aligned; other INT caches take the CUDA-core kernel.
namespace token_mma {

using namespace mma_parts;

template <class F, int D>
struct Shape {
  static constexpr int kRow = D * F::kBits / 8;  // bytes per token row
  static constexpr int kChunks = kRow / 16;      // 16-byte chunks per row: 2, 4 or 8
  static constexpr int kTileBytes = 32 * kRow;
};

constexpr int kBPitch = 40;  // halves per B column of 32 tokens: 8-byte reads hit each bank twice
constexpr std::uint32_t kOnes = 0x3c003c00u;  // f16 (1, 1)

// Byte offsets; the parameter parts depend on the call (channel groups, f16 / f32, minimums).
struct Layout {
  int params = 0;   // one parameter array of a tile: 32 tokens x groups x (2 or 4) bytes
  int stage = 0;    // key rows, value rows, key scale, value scale [, key min, value min]
  int b_tiles = 0;  // per warp after its two stages: Bv [groups][kCols][kBPitch] f16 [, Bm the
                    // same]; the tile scores S [32][kCols + 1] f32 share the space
  int corr = 0;     // [kCols] f32
  int warp = 0;     // bytes per warp
  int q_scale = 0, q_unscale = 0, wmax = 0, wsum = 0, qsum = 0;  // block part (ql at 0)
  int block = 0, total = 0;
};

template <class F, int D, int G>
__host__ __device__ inline Layout make_layout(int groups, int param_bytes, bool asymmetric) {
  constexpr int kNT = (2 * G + 7) / 8, kCols = 8 * kNT;
  Layout l;
  l.params = F::kFp8 ? 0 : 32 * groups * param_bytes;
  l.stage = 2 * Shape<F, D>::kTileBytes + (asymmetric ? 4 : 2) * l.params;
  l.b_tiles = 2 * l.stage;
  const int b_bytes = groups * kCols * kBPitch * 2 * (asymmetric ? 2 : 1);
  const int s_bytes = 32 * (kCols + 1) * 4;
  l.corr = l.b_tiles + ((b_bytes > s_bytes ? b_bytes : s_bytes) + 15) / 16 * 16;
  const int used = l.corr + kCols * 4, acc = 2 * G * D * 4;
  l.warp = ((used > acc ? used : acc) + 15) / 16 * 16;
  l.q_scale = kNT * (D / 16) * 32 * 8;
  l.q_unscale = l.q_scale + 4 * G;
  l.wmax = l.q_unscale + 4 * G;
  l.wsum = l.wmax + 4 * kWarpsPerBlock * G;
  l.qsum = l.wsum + 4 * kWarpsPerBlock * G;
  l.block = (l.qsum + 4 * groups * kCols + 127) / 128 * 128;
  l.total = l.block + kWarpsPerBlock * l.warp;
  return l;
}

// Byte offset of chunk c of row r in a staged tile [32][kRow].
template <int kChunks>
__device__ inline int swizzled(int r, int c) {
  return r * kChunks * 16 + 16 * (c ^ ((r / (8 / kChunks)) % kChunks));
}

// Channel of k slot i (2t, 2t + 1, 2t + 8, 2t + 9) of key k-step s, and of row g (half 0) or
// g + 8 (half 1) of value m-tile i: what decode8 / decode4 hand each thread.
template <class F>
__device__ inline int key_channel(int s, int t, int i) {
  if constexpr (F::kBits == 8) return 16 * s + 4 * t + ((i & 1) << 1 | (i >> 1));
  return 32 * (s >> 1) + 8 * t + 2 * (s & 1) + ((i & 1) << 2 | (i >> 1));
}
template <class F>
__device__ inline int value_channel(int i, int half, int g) {
  if constexpr (F::kBits == 8) return 16 * i + 2 * g + half;
  return 32 * (i >> 1) + 4 * g + 2 * (i & 1) + half;
}

// Bytes 0, 2 (x) and 1, 3 (y) of a word as f16 pairs of the codes.
template <class F>
__device__ inline uint2 decode8(std::uint32_t w, std::uint32_t magic, __half2 bias) {
  if constexpr (F::kFp8) {
    const std::uint32_t x = __byte_perm(w, 0, 0x3120);
    std::uint32_t lo, hi;
    if constexpr (F::kKind == 0)
      asm("{.reg .b16 l, h;\n mov.b32 {l, h}, %2;\n cvt.rn.f16x2.e4m3x2 %0, l;\n"
          " cvt.rn.f16x2.e4m3x2 %1, h;\n}"
          : "=r"(lo), "=r"(hi)
          : "r"(x));
    else
      asm("{.reg .b16 l, h;\n mov.b32 {l, h}, %2;\n cvt.rn.f16x2.e5m2x2 %0, l;\n"
          " cvt.rn.f16x2.e5m2x2 %1, h;\n}"
          : "=r"(lo), "=r"(hi)
          : "r"(x));
    return make_uint2(lo, hi);
  } else {
    // 1024 + u under the exponent (symmetric: the sign bit flipped, u = code + 128), minus bias.
    const std::uint32_t a = (w & 0x00ff00ffu) ^ magic, c = ((w >> 8) & 0x00ff00ffu) ^ magic;
    return make_uint2(h2u(__hadd2(u2h(a), bias)), h2u(__hadd2(u2h(c), bias)));
  }
}

// Nibbles i (low half) and i + 4 (high half) of a word for i = 0 .. 3 (x, y, z, w) as f16 pairs.
struct Int4Decode {
  std::uint32_t magic_even, magic_odd;
  __half2 bias_even, scale_odd, bias_odd;
  __device__ inline uint4 operator()(std::uint32_t w) const {
    const std::uint32_t v = w >> 8;
    return make_uint4(h2u(__hadd2(u2h((w & 0x000f000fu) ^ magic_even), bias_even)),
                      h2u(__hfma2(u2h((w & 0x00f000f0u) ^ magic_odd), scale_odd, bias_odd)),
                      h2u(__hadd2(u2h((v & 0x000f000fu) ^ magic_even), bias_even)),
                      h2u(__hfma2(u2h((v & 0x00f000f0u) ^ magic_odd), scale_odd, bias_odd)));
  }
};

// One code or window element as f16 bits: token tok, channel ch (0 beyond the split's end).
template <class F, int D>
__device__ inline std::uint32_t element(const unsigned char* codes, const __half* window, int m,
                                        int end, bool symmetric, int tok, int ch) {
  if (tok >= end) return 0u;
  if (tok < m) {
    const unsigned char* row = codes + static_cast<std::int64_t>(tok) * Shape<F, D>::kRow;
    if constexpr (F::kFp8) {
      return __nv_cvt_fp8_to_halfraw(row[ch], F::kKind == 0 ? __NV_E4M3 : __NV_E5M2).x;
    } else {
      int v;
      if constexpr (F::kBits == 8) {
        v = row[ch];
        if (symmetric) v = static_cast<signed char>(v);
      } else {
        v = (row[ch >> 1] >> (4 * (ch & 1))) & 15;
        if (symmetric) v = (v ^ 8) - 8;
      }
      return __half_as_ushort(__int2half_rn(v));
    }
  }
  return __half_as_ushort(window[static_cast<std::int64_t>(tok - m) * D + ch]);
}

template <class F, int D, int G>
__global__ void __launch_bounds__(kWarpsPerBlock * 32, G >= 8 ? 2 : 3) token_mma_kernel(Params p) {
  cuda_detail::allow_dependent_launch();  // the merge waits for this grid's end by itself
  using Sh = Shape<F, D>;
  constexpr int kNT = (2 * G + 7) / 8, kCols = 8 * kNT, kKS = D / 16;
  constexpr int kRow = Sh::kRow, kChunks = Sh::kChunks, kTileBytes = Sh::kTileBytes;
  constexpr bool kScaled = !F::kFp8;
  extern __shared__ __align__(16) unsigned char smem[];

  const int group = kScaled ? p.group : D;
  const int lg = 31 - __clz(group / 16);  // groups are 16 2^lg channels: k-steps / m-tiles >> lg
  const int groups = D / group;
  const int pb = p.k.params_f32 ? 4 : 2;
  const bool asym = kScaled && !p.symmetric;
  const Layout l = make_layout<F, D, G>(groups, pb, asym);
  auto* ql = reinterpret_cast<uint2*>(smem);
  auto* q_scale = reinterpret_cast<float*>(smem + l.q_scale);
  auto* q_unscale = reinterpret_cast<float*>(smem + l.q_unscale);
  auto* wmax = reinterpret_cast<float*>(smem + l.wmax);
  auto* wsum = reinterpret_cast<float*>(smem + l.wsum);
  auto* qsum = reinterpret_cast<float*>(smem + l.qsum);  // [groups][kCols]: sum of q per group

  const int split = blockIdx.x, kv_head = blockIdx.y, b = blockIdx.z;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane >> 2, t = lane & 3;
  unsigned char* wbase = smem + l.block + warp * l.warp;
  auto* Bv = reinterpret_cast<__half*>(wbase + l.b_tiles);
  __half* Bm = Bv + groups * kCols * kBPitch;
  auto* S = reinterpret_cast<float*>(wbase + l.b_tiles);  // shares the space of Bv
  auto* corr_s = reinterpret_cast<float*>(wbase + l.corr);

  const int n = p.lengths.at(b, kv_head);
  const int m = kScaled ? p.quantized_keys.at(b, kv_head) : n;
  const bool valid = n >= 0 && n <= p.max_length && m >= 0 && m <= n;
  const int begin = split * p.chunk;
  const int end = valid ? min(n, begin + p.chunk) : begin;
  const int qend = min(m, end);

  const unsigned char* k_codes = p.k.codes.at(b, kv_head);
  const unsigned char* v_codes = p.v.codes.at(b, kv_head);
  const unsigned char* k_scale = p.k.scale.at(b, kv_head);
  const unsigned char* v_scale = p.v.scale.at(b, kv_head);
  const unsigned char* k_min = p.k.minimum.at(b, kv_head);
  const unsigned char* v_min = p.v.minimum.at(b, kv_head);
  const auto* k_win = reinterpret_cast<const __half*>(p.k.residual.at(b, kv_head));
  const auto* v_win = reinterpret_cast<const __half*>(p.v.residual.at(b, kv_head));
  float q_factor = p.scale_log2, out_factor = 1.0f;
  if constexpr (F::kFp8) {
    q_factor *= __ldg(reinterpret_cast<const float*>(k_scale));
    out_factor = __ldg(reinterpret_cast<const float*>(v_scale));
  }

  // q (its fp32 copy in warp 0's space until the stages start), scales, B fragments, group sums.
  auto* q_raw = reinterpret_cast<float*>(smem + l.block);
  load_q_scaled<D, G>(p, b, kv_head, 8, q_factor, q_raw, q_scale, q_unscale);
  build_q_fragments<D, G>(q_raw, q_scale, nullptr, ql,
                          [](int s, int tt, int i) { return key_channel<F>(s, tt, i); });
  if (asym) {
    for (int i = threadIdx.x; i < groups * kCols; i += kWarpsPerBlock * 32) {
      const int gi = i / kCols, col = i % kCols;
      float sum = 0.0f;
      if (col < G)
        for (int c = gi * group; c < (gi + 1) * group; ++c) sum += q_raw[col * D + c];
      qsum[i] = col < G ? sum * q_scale[col] : 0.0f;
    }
  }
  __syncthreads();
  if (lane < kCols) corr_s[lane] = 1.0f;

  // Parameters of tile row r, group gi: staged (fast tiles), else from global memory (quantized
  // rows), 1 and 0 (window rows) or 0 (past the end).
  const auto load_param = [&](const unsigned char* base, std::int64_t index) {
    return pb == 4 ? reinterpret_cast<const float*>(base)[index]
                   : __half2float(reinterpret_cast<const __half*>(base)[index]);
  };
  const int ks_off = 2 * kTileBytes, vs_off = ks_off + l.params, km_off = vs_off + l.params,
            vm_off = km_off + l.params;
  const auto row_params = [&](bool fast, const unsigned char* st, int staged_scale, int staged_min,
                              const unsigned char* scale, const unsigned char* minimum, int tok,
                              int r, int gi, float& s, float& mn) {
    s = 0.0f, mn = 0.0f;
    if (fast) {
      s = load_param(st + staged_scale, r * groups + gi);
      if (asym) mn = load_param(st + staged_min, r * groups + gi);
    } else if (tok < qend) {
      const std::int64_t at = static_cast<std::int64_t>(tok) * groups + gi;
      s = load_param(scale, at);
      if (asym) mn = load_param(minimum, at);
    } else if (tok < end) {
      s = 1.0f;
    }
  };

  const std::uint32_t magic8 = p.symmetric ? 0x64806480u : 0x64006400u;
  const __half2 bias8 = __float2half2_rn(p.symmetric ? -1152.0f : -1024.0f);
  const Int4Decode decode4{
      p.symmetric ? 0x64086408u : 0x64006400u, p.symmetric ? 0x64806480u : 0x64006400u,
      __float2half2_rn(p.symmetric ? -1032.0f : -1024.0f), __float2half2_rn(1.0f / 16.0f),
      __float2half2_rn(p.symmetric ? -72.0f : -64.0f)};
  // The lane's token in the k order of the p.V mma (natural: slot k = token k), stored so that
  // slots 2t, 2t + 1, 2t + 8, 2t + 9 of a k-step sit side by side: b0, b1 are one 8-byte load.
  const int pos = 16 * (lane >> 4) + 4 * ((lane & 7) >> 1) + 2 * ((lane >> 3) & 1) + (lane & 1);

  float acc[kKS][kNT][4];
#pragma unroll
  for (int i = 0; i < kKS; ++i)
#pragma unroll
    for (int j = 0; j < kNT; ++j)
#pragma unroll
      for (int r = 0; r < 4; ++r) acc[i][j][r] = 0.0f;
  float run_max[G], run_sum[G];
#pragma unroll
  for (int h = 0; h < G; ++h) run_max[h] = -INFINITY, run_sum[h] = 0.0f;

  auto stage_ptr = [&](int st) { return wbase + st * l.stage; };
  // Copy i = lane + 32 j of a tile: row r = i / kChunks, chunk c = i % kChunks, source byte 16 i
  // (kRow = 16 kChunks), destination swizzled(r, c) = 512 j + this lane's offset, whose chunk
  // bits are XOR-ed with (4 j) % kChunks (nonzero only for kChunks = 8, odd j). Formed as one
  // pointer per part and tile plus constants, so that the copies take immediate offsets (as per
  // copy base + int index, the 64-bit address arithmetic cost ~3 instructions per copy).
  const int lane_dst = swizzled<kChunks>(lane / kChunks, lane % kChunks);
  // Parameter chunks of a tile: 32 tokens x groups x (2 or 4) bytes / 16 = 2 groups pb <= 64
  // (groups <= D / 16, pb <= 4).
  constexpr int kParamSteps = (2 * (D / 16) * 4 + 31) / 32;
  auto issue = [&](int t0, unsigned char* st) {
    if (t0 + 32 > qend) return;  // edge tiles read global memory directly
    const unsigned char* ksrc = k_codes + static_cast<std::int64_t>(t0) * kRow + 16 * lane;
    const unsigned char* vsrc = v_codes + static_cast<std::int64_t>(t0) * kRow + 16 * lane;
#pragma unroll
    for (int j = 0; j < kChunks; ++j) {
      const int off = (lane_dst ^ (16 * ((4 * j) % kChunks))) + 512 * j;
      cp_async16(st + off, ksrc + 512 * j);
      cp_async16(st + kTileBytes + off, vsrc + 512 * j);
    }
    if constexpr (kScaled) {
      const int chunks = l.params / 16;
      const std::int64_t at = static_cast<std::int64_t>(t0) * groups * pb + 16 * lane;
#pragma unroll
      for (int j = 0; j < kParamSteps; ++j) {
        if (lane + 32 * j < chunks) {
          const int off = 16 * lane + 512 * j;
          cp_async16(st + ks_off + off, k_scale + at + 512 * j);
          cp_async16(st + vs_off + off, v_scale + at + 512 * j);
          if (asym) {
            cp_async16(st + km_off + off, k_min + at + 512 * j);
            cp_async16(st + vm_off + off, v_min + at + 512 * j);
          }
        }
      }
    }
  };

  int stage = 0;
  int t0 = begin + warp * 32;
  if (t0 < end) issue(t0, stage_ptr(0));
  cp_async_commit();
  for (; t0 < end; t0 += kWarpsPerBlock * 32) {
    if (t0 + kWarpsPerBlock * 32 < end) issue(t0 + kWarpsPerBlock * 32, stage_ptr(stage ^ 1));
    cp_async_commit();
    cp_async_wait<1>();
    __syncwarp();
    const unsigned char* st = stage_ptr(stage);
    const bool fast = t0 + 32 <= qend;

    // ---- scores of the 32 tokens: two m-tiles of 16 tokens, per channel group then scaled
    float sc[2][kNT][4], part[2][kNT][4];
#pragma unroll
    for (int mt = 0; mt < 2; ++mt)
#pragma unroll
      for (int j = 0; j < kNT; ++j)
#pragma unroll
        for (int r = 0; r < 4; ++r) sc[mt][j][r] = part[mt][j][r] = 0.0f;
    auto key_step = [&](int s, const std::uint32_t(&a)[2][4]) {
#pragma unroll
      for (int j = 0; j < kNT; ++j) {
        const uint2 bq = ql[(j * kKS + s) * 32 + lane];
#pragma unroll
        for (int mt = 0; mt < 2; ++mt)
          mma16816<__half>(kScaled ? part[mt][j] : sc[mt][j], a[mt][0], a[mt][1], a[mt][2],
                           a[mt][3], bq.x, bq.y);
      }
      if constexpr (kScaled) {
        if (((s + 1) & ((1 << lg) - 1)) != 0) return;  // the group goes on
        const int gi = s >> lg;
#pragma unroll
        for (int mt = 0; mt < 2; ++mt) {
          float s0, m0, s1, m1;
          const int r0 = 16 * mt + g;
          row_params(fast, st, ks_off, km_off, k_scale, k_min, t0 + r0, r0, gi, s0, m0);
          row_params(fast, st, ks_off, km_off, k_scale, k_min, t0 + r0 + 8, r0 + 8, gi, s1, m1);
#pragma unroll
          for (int j = 0; j < kNT; ++j) {
            const float qs0 = asym ? qsum[gi * kCols + 8 * j + 2 * t] : 0.0f;
            const float qs1 = asym ? qsum[gi * kCols + 8 * j + 2 * t + 1] : 0.0f;
            sc[mt][j][0] += fmaf(part[mt][j][0], s0, m0 * qs0);
            sc[mt][j][1] += fmaf(part[mt][j][1], s0, m0 * qs1);
            sc[mt][j][2] += fmaf(part[mt][j][2], s1, m1 * qs0);
            sc[mt][j][3] += fmaf(part[mt][j][3], s1, m1 * qs1);
#pragma unroll
            for (int r = 0; r < 4; ++r) part[mt][j][r] = 0.0f;
          }
        }
      }
    };
    if (fast) {
#pragma unroll
      for (int x = 0; x < kChunks; x += 2) {
        // Matrices: rows 0-7 / 8-15 of m-tile mt, chunks x and x + 1.
        std::uint32_t w[2][4];
#pragma unroll
        for (int mt = 0; mt < 2; ++mt)
          ldmatrix_x4(w[mt], st + swizzled<kChunks>(16 * mt + 8 * ((lane >> 3) & 1) + (lane & 7),
                                                    x + (lane >> 4)));
#pragma unroll
        for (int cc = 0; cc < 2; ++cc) {
          if constexpr (F::kBits == 8) {
            std::uint32_t a[2][4];
#pragma unroll
            for (int mt = 0; mt < 2; ++mt) {
              const uint2 r0 = decode8<F>(w[mt][2 * cc], magic8, bias8);
              const uint2 r1 = decode8<F>(w[mt][2 * cc + 1], magic8, bias8);
              a[mt][0] = r0.x, a[mt][1] = r1.x, a[mt][2] = r0.y, a[mt][3] = r1.y;
            }
            key_step(x + cc, a);
          } else {
            std::uint32_t a0[2][4], a1[2][4];
#pragma unroll
            for (int mt = 0; mt < 2; ++mt) {
              const uint4 r0 = decode4(w[mt][2 * cc]), r1 = decode4(w[mt][2 * cc + 1]);
              a0[mt][0] = r0.x, a0[mt][1] = r1.x, a0[mt][2] = r0.y, a0[mt][3] = r1.y;
              a1[mt][0] = r0.z, a1[mt][1] = r1.z, a1[mt][2] = r0.w, a1[mt][3] = r1.w;
            }
            key_step(2 * (x + cc), a0);
            key_step(2 * (x + cc) + 1, a1);
          }
        }
      }
    } else {
      const auto el = [&](int tok, int ch) {
        return element<F, D>(k_codes, k_win, m, end, p.symmetric, tok, ch);
      };
#pragma unroll
      for (int s = 0; s < kKS; ++s) {
        int ch[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) ch[i] = key_channel<F>(s, t, i);
        std::uint32_t a[2][4];
#pragma unroll
        for (int mt = 0; mt < 2; ++mt) {
          const int r0 = t0 + 16 * mt + g, r1 = r0 + 8;
          a[mt][0] = el(r0, ch[0]) | el(r0, ch[1]) << 16;
          a[mt][1] = el(r1, ch[0]) | el(r1, ch[1]) << 16;
          a[mt][2] = el(r0, ch[2]) | el(r0, ch[3]) << 16;
          a[mt][3] = el(r1, ch[2]) | el(r1, ch[3]) << 16;
        }
        key_step(s, a);
      }
    }
#pragma unroll
    for (int mt = 0; mt < 2; ++mt)
#pragma unroll
      for (int j = 0; j < kNT; ++j) {
        float* s0 = S + (16 * mt + g) * (kCols + 1) + 8 * j + 2 * t;
        float* s1 = s0 + 8 * (kCols + 1);
        s0[0] = sc[mt][j][0], s0[1] = sc[mt][j][1];
        s1[0] = sc[mt][j][2], s1[1] = sc[mt][j][3];
      }
    __syncwarp();

    // ---- online softmax (lane = token t0 + lane), then p' = p s (hi, lo) per value group and,
    // asymmetric, p m (hi, lo) into the B tiles (over S: every lane has read its scores first)
    float prob[G];
    const bool rescale =
        softmax_tile<G, kCols>(S, q_unscale, t0 + lane < end, run_max, run_sum, prob, corr_s);
    __syncwarp();
    for (int vg = 0; vg < groups; ++vg) {
      float s = 1.0f, mn = 0.0f;
      if constexpr (kScaled)
        row_params(fast, st, vs_off, vm_off, v_scale, v_min, t0 + lane, lane, vg, s, mn);
#pragma unroll
      for (int h = 0; h < G; ++h) {
        const int at = (vg * kCols + h) * kBPitch + pos, lo = G * kBPitch;
        put_hi_lo(&Bv[at], &Bv[at + lo], prob[h] * s);
        if (asym) put_hi_lo(&Bm[at], &Bm[at + lo], prob[h] * mn);
      }
    }
    __syncwarp();
    if (rescale) {
      rescale_acc(acc, corr_s, t);
    }

    // ---- p.V: per k-step of 16 tokens, m-tiles of 16 channels
#pragma unroll
    for (int ks = 0; ks < 2; ++ks) {
      const int kb = 16 * ks + 4 * t;
      auto value_tile = [&](int i, std::uint32_t a0, std::uint32_t a1, std::uint32_t a2,
                            std::uint32_t a3) {
        const int vg = i >> lg;
#pragma unroll
        for (int j = 0; j < kNT; ++j) {
          const int at = (vg * kCols + 8 * j + g) * kBPitch + kb;
          const uint2 bv = *reinterpret_cast<const uint2*>(Bv + at);
          mma16816<__half>(acc[i][j], a0, a1, a2, a3, bv.x, bv.y);
          if (asym) {
            const uint2 bm = *reinterpret_cast<const uint2*>(Bm + at);
            mma16816<__half>(acc[i][j], kOnes, kOnes, kOnes, kOnes, bm.x, bm.y);
          }
        }
      };
      if (fast) {
#pragma unroll
        for (int x = 0; x < kChunks; x += 2) {
          // Matrices: tokens 16 ks + 0-7 / 8-15, chunks x and x + 1, transposed.
          std::uint32_t w[4];
          ldmatrix_x4_trans(w, st + kTileBytes +
                                   swizzled<kChunks>(16 * ks + 8 * ((lane >> 3) & 1) + (lane & 7),
                                                     x + (lane >> 4)));
#pragma unroll
          for (int cc = 0; cc < 2; ++cc) {
            if constexpr (F::kBits == 8) {
              const uint2 r0 = decode8<F>(w[2 * cc], magic8, bias8);
              const uint2 r1 = decode8<F>(w[2 * cc + 1], magic8, bias8);
              value_tile(x + cc, r0.x, r0.y, r1.x, r1.y);
            } else {
              const uint4 r0 = decode4(w[2 * cc]), r1 = decode4(w[2 * cc + 1]);
              value_tile(2 * (x + cc), r0.x, r0.y, r1.x, r1.y);
              value_tile(2 * (x + cc) + 1, r0.z, r0.w, r1.z, r1.w);
            }
          }
        }
      } else {
        const auto el = [&](int tok, int ch) {
          return element<F, D>(v_codes, v_win, m, end, p.symmetric, tok, ch);
        };
        const int tk = t0 + 16 * ks + 2 * t;
#pragma unroll
        for (int i = 0; i < kKS; ++i) {
          const int c0 = value_channel<F>(i, 0, g), c1 = value_channel<F>(i, 1, g);
          value_tile(i, el(tk, c0) | el(tk + 1, c0) << 16, el(tk, c1) | el(tk + 1, c1) << 16,
                     el(tk + 8, c0) | el(tk + 9, c0) << 16, el(tk + 8, c1) | el(tk + 9, c1) << 16);
        }
      }
    }
    __syncwarp();
    stage ^= 1;
  }
  cp_async_wait<0>();
  __syncwarp();

  store_warp<D, G>(acc, run_max, run_sum, reinterpret_cast<float*>(wbase), wmax, wsum,
                   [=](int i, int half) { return value_channel<F>(i, half, g); });
  __syncthreads();
  merge_warps<D, G>(p, smem + l.block, l.warp, wmax, wsum, out_factor, valid, b, kv_head, split);
}

}  // namespace token_mma

// About 8 blocks per SM (the kernel holds many registers, so fewer are resident than for the
// dense kernel); chunks of whole 128-token block steps (4 warps x 32 tokens).
SplitPlan plan_splits(int batch, int kv_heads, int max_length) {
  return split_merge::plan_splits(batch, kv_heads, max_length, 8, kWarps * kTile);
}

using HeadDims = ValueList<64, 128>;
using GroupSizes = ValueList<1, 2, 4, 8>;

template <class T>
Part part(const CachePart<T>& c, std::size_t element_bytes) {
  Part out;
  out.data = static_cast<const unsigned char*>(static_cast<const void*>(c.data));
  out.batch = c.batch * static_cast<std::int64_t>(element_bytes);
  out.head = c.head * static_cast<std::int64_t>(element_bytes);
  return out;
}
Counts counts(const DeviceView<const std::int32_t, 2>& v) {
  return {v.data, v.strides[0], v.strides[1]};
}

// Checks that a part's base and strides keep every access of `align` bytes aligned.
void check_part(const char* op, const char* name, const Part& part, int align, bool required) {
  if (part.data == nullptr) {
    KVC_CHECK(!required, op, ": ", name, " is null");
    return;
  }
  KVC_CHECK(reinterpret_cast<std::uintptr_t>(part.data) % align == 0 && part.batch % align == 0 &&
                part.head % align == 0,
            op, ": ", name, " must start on a ", align,
            "-byte boundary with batch and head strides multiples of ", align, " bytes");
}

struct Common {
  const char* op;
  std::int64_t batch, q_heads, kv_heads, d;
};

template <class Storage>
Common check_common(const char* op, const DeviceView<const Storage, 3>& q,
                    const DeviceView<Storage, 3>& out,
                    const DeviceView<const std::int32_t, 2>& lengths, int max_length,
                    std::size_t workspace_floats_given) {
  Common c{op, q.size(0), q.size(1), lengths.size(1), q.size(2)};
  KVC_CHECK(out.size(0) == c.batch && out.size(1) == c.q_heads && out.size(2) == c.d, op, ": out [",
            out.size(0), ", ", out.size(1), ", ", out.size(2), "] must equal q's [", c.batch, ", ",
            c.q_heads, ", ", c.d, "]");
  KVC_CHECK(lengths.size(0) == c.batch, op, ": lengths has ", lengths.size(0), " sequences, q has ",
            c.batch);
  KVC_CHECK(c.kv_heads >= 1 && c.q_heads % c.kv_heads == 0, op, ": Hq = ", c.q_heads,
            " must be a multiple of Hkv = ", c.kv_heads);
  KVC_CHECK(q.strides[2] == 1 && out.strides[2] == 1, op,
            ": the head_dim axis of q and out must be contiguous (stride 1)");
  KVC_CHECK(max_length >= 0, op, ": max_length = ", max_length, " must be >= 0");
  const std::size_t needed = quantized_decode_attention_workspace_floats(
      static_cast<int>(c.batch), static_cast<int>(c.q_heads), static_cast<int>(c.kv_heads),
      static_cast<int>(c.d), max_length);
  KVC_CHECK(workspace_floats_given >= needed, op, ": workspace has ", workspace_floats_given,
            " floats, needs ", needed);
  return c;
}

template <class Storage>
void fill_common(Params& p, const Common& c, const DeviceView<const Storage, 3>& q,
                 const DeviceView<Storage, 3>& out, const DeviceView<float, 1>& workspace,
                 int max_length, const AttentionOptions& options, bool bf16) {
  p.q = reinterpret_cast<const unsigned char*>(q.data);
  p.q_batch = q.strides[0] * 2, p.q_head = q.strides[1] * 2;
  p.out = reinterpret_cast<unsigned char*>(out.data);
  p.out_batch = out.strides[0] * 2, p.out_head = out.strides[1] * 2;
  p.bf16 = bf16;
  p.workspace = workspace.data;
  p.batch = static_cast<int>(c.batch);
  p.q_heads = static_cast<int>(c.q_heads);
  p.max_length = max_length;
  const SplitPlan plan = plan_splits(p.batch, static_cast<int>(c.kv_heads), max_length);
  p.chunk = plan.chunk;
  p.splits = plan.splits;
  const float scale =
      options.scale > 0.0f ? options.scale : 1.0f / std::sqrt(static_cast<float>(c.d));
  p.scale_log2 = scale * 1.4426950408889634f;
}

// After a split kernel: the merge of its partials (none with one split), overlapping its end.
template <int D>
void launch_merge(const Params& p, const Common& c, cudaStream_t native) {
  if (p.splits > 1)
    cuda_detail::launch_dependent(quantized_merge_kernel<D>,
                                  static_cast<unsigned>(c.batch * c.q_heads), D, native, p);
}

template <class KF, class VF>
void launch(const Params& p, const Common& c, Cuda stream) {
  if (c.batch == 0) return;
  cudaStream_t native = stream.stream;
  const dim3 grid(p.splits, static_cast<unsigned>(c.kv_heads), static_cast<unsigned>(c.batch));
  const std::string head_dim_name = std::string(c.op) + ": head_dim";
  const std::string group_name = std::string(c.op) + ": Hq / Hkv";
  dispatch<HeadDims>(static_cast<int>(c.d), head_dim_name.c_str(), [&](auto head_dim) {
    constexpr int kD = decltype(head_dim)::value;
    dispatch<GroupSizes>(static_cast<int>(c.q_heads / c.kv_heads), group_name.c_str(),
                         [&](auto group) {
                           quantized_split_kernel<KF, VF, kD, decltype(group)::value>
                               <<<grid, kThreads, 0, native>>>(p);
                           KVC_CUDA_CHECK_LAUNCH(native);
                         });
    launch_merge<kD>(p, c, native);
  });
}

// True when a part's base and strides keep 16-byte accesses aligned (the cp.async staging of the
// tensor-core KIVI kernel); otherwise the CUDA-core kernel above takes the call.
bool aligned16(const Part& part) {
  return reinterpret_cast<std::uintptr_t>(part.data) % 16 == 0 && part.batch % 16 == 0 &&
         part.head % 16 == 0;
}

// A tensor-core kernel, the dynamic shared memory of this call, and the most any call asks of it.
struct MmaKernel {
  void (*kernel)(Params) = nullptr;
  int bytes = 0, most = 0;
  int threads = mma_parts::kWarpsPerBlock * 32;
};

// Launches pick(head_dim, group) -> MmaKernel over the dispatch of D and Hq / Hkv, then the merge.
template <class Pick>
void launch_mma(const Params& p, const Common& c, Cuda stream, Pick pick) {
  if (c.batch == 0) return;
  cudaStream_t native = stream.stream;
  const dim3 grid(p.splits, static_cast<unsigned>(c.kv_heads), static_cast<unsigned>(c.batch));
  const std::string head_dim_name = std::string(c.op) + ": head_dim";
  const std::string group_name = std::string(c.op) + ": Hq / Hkv";
  dispatch<HeadDims>(static_cast<int>(c.d), head_dim_name.c_str(), [&](auto head_dim) {
    constexpr int kD = decltype(head_dim)::value;
    dispatch<GroupSizes>(
        static_cast<int>(c.q_heads / c.kv_heads), group_name.c_str(), [&](auto group) {
          const MmaKernel k = pick(head_dim, group);
          cuda_detail::allow_dynamic_shared_memory(k.kernel, k.most);
          if (p.cluster_merge) {
            cuda_detail::launch_clustered(k.kernel, grid, k.threads, k.bytes, native, p.splits, p);
          } else {
            k.kernel<<<grid, k.threads, k.bytes, native>>>(p);
            KVC_CUDA_CHECK_LAUNCH(native);
          }
        });
    if (!p.cluster_merge) launch_merge<kD>(p, c, native);
  });
}

// The KIVI kernel runs one block per SM: of the split counts up to the common plan's (which sized
// the workspace), take the one whose blocks fill their last wave best (a last wave 6 % full costs
// nearly a whole block time), and of those about as good the fewest (longer splits spread each
// block's q setup and final merge over more tiles; measured on the H100, batch 8 at 32K: 8 splits
// in one wave beat 16 in two by 4 %, with four 4-warp blocks per SM).
Params kivi_splits(const Params& p, int kv_heads, int warps) {
  Params q = p;
  const double slots = split_merge::multiprocessors();
  const int pairs = std::max(1, p.batch * kv_heads), step = warps * kTile;
  const int length = std::max(p.max_length, 1);
  // fill(s): how full the last wave of s splits is (0 where s splits are not a plan of their own).
  auto fill = [&](int s, int* chunk_out) {
    int chunk = std::max((length + s - 1) / s, split_merge::kMinChunk);
    chunk = (chunk + step - 1) / step * step;
    if ((length + chunk - 1) / chunk != s) return 0.0;
    const double waves = pairs * static_cast<double>(s) / slots;
    *chunk_out = chunk;
    return waves / std::ceil(waves);
  };
  double top = 0.0;
  int chunk = 0;
  for (int s = 1; s <= p.splits; ++s) top = std::max(top, fill(s, &chunk));
  for (int s = 1; s <= p.splits; ++s)
    if (fill(s, &chunk) >= top - 0.02) {
      q.chunk = chunk, q.splits = s;
      break;
    }
  return q;
}

template <int Bits>
void launch_kivi_mma(const Params& p0, const Common& c, Cuda stream) {
  const auto pick = [](auto head_dim, auto group) {
    constexpr int kD = decltype(head_dim)::value, kG = decltype(group)::value;
    constexpr int kW = kivi_mma::kivi_warps<kG>();
    constexpr int kBytes = kivi_mma::Layout<Bits, kD, kG>::kSmemBytes;
    return MmaKernel{&kivi_mma::kivi_mma_kernel<Bits, kD, kG>, kBytes, kBytes, kW * 32};
  };
  MmaKernel kernel;
  const std::string head_dim_name = std::string(c.op) + ": head_dim";
  const std::string group_name = std::string(c.op) + ": Hq / Hkv";
  dispatch<HeadDims>(static_cast<int>(c.d), head_dim_name.c_str(), [&](auto head_dim) {
    dispatch<GroupSizes>(static_cast<int>(c.q_heads / c.kv_heads), group_name.c_str(),
                         [&](auto group) { kernel = pick(head_dim, group); });
  });
  Params p = kivi_splits(p0, static_cast<int>(c.kv_heads), kernel.threads / 32);
  cuda_detail::allow_dynamic_shared_memory(kernel.kernel, kernel.most);
  // The splits of a (sequence, KV head) merge inside their cluster where one can hold them all (8
  // blocks: the portable cluster size); more splits go through the workspace and the merge kernel.
  p.cluster_merge = p.splits >= 2 && p.splits <= 8 &&
                    cuda_detail::clusters_fit(kernel.kernel, kernel.threads, kernel.bytes,
                                              static_cast<unsigned>(p.splits));
  launch_mma(p, c, stream, pick);
}

template <class F>
void launch_token_mma(const Params& p, const Common& c, Cuda stream) {
  launch_mma(p, c, stream, [&](auto head_dim, auto group) {
    constexpr int kD = decltype(head_dim)::value, kG = decltype(group)::value;
    const int groups = F::kFp8 ? 1 : kD / p.group;
    const token_mma::Layout now =
        token_mma::make_layout<F, kD, kG>(groups, p.k.params_f32 ? 4 : 2, !F::kFp8 && !p.symmetric);
    // The largest layout: groups of 16 channels, f32 parameters, minimums.
    const token_mma::Layout most = token_mma::make_layout<F, kD, kG>(kD / 16, 4, true);
    return MmaKernel{&token_mma::token_mma_kernel<F, kD, kG>, now.total, most.total};
  });
}

template <class Storage>
void run_kivi(Cuda stream, DeviceView<const Storage, 3> q,
              const KiviCache<MemorySpace::Device>& cache, DeviceView<Storage, 3> out,
              DeviceView<float, 1> workspace, const AttentionOptions& options, bool bf16) {
  constexpr const char* kOp = "decode_attention(kivi, cuda)";
  const Common c = check_common(kOp, q, out, cache.lengths, cache.max_length,
                                static_cast<std::size_t>(workspace.size(0)));
  KVC_CHECK(cache.bits == 2 || cache.bits == 4, kOp, ": bits = ", cache.bits,
            " is not supported; allowed: {2, 4}");
  KVC_CHECK(cache.group >= 32 && cache.group % 32 == 0 && c.d % cache.group == 0, kOp,
            ": group = ", cache.group, " must be a multiple of 32 that divides head_dim ", c.d);
  for (const auto* v : {&cache.quantized_keys, &cache.quantized_values})
    KVC_CHECK(v->size(0) == c.batch && v->size(1) == c.kv_heads, kOp,
              ": quantized counts must be [B, Hkv] = [", c.batch, ", ", c.kv_heads, "]");
  Params p;
  fill_common(p, c, q, out, workspace, cache.max_length, options, bf16);
  p.k.codes = part(cache.key_codes, 4);
  p.k.scale = part(cache.key_scale, 2);
  p.k.minimum = part(cache.key_minimum, 2);
  p.k.residual = part(cache.key_residual, 2);
  p.v.codes = part(cache.value_codes, 4);
  p.v.scale = part(cache.value_scale, 2);
  p.v.minimum = part(cache.value_minimum, 2);
  p.v.residual = part(cache.value_residual, 2);
  const int row_align = cache.bits == 4 ? 8 : 4;  // a lane's 16 value channels
  check_part(kOp, "key_codes", p.k.codes, 4, true);
  check_part(kOp, "value_codes", p.v.codes, row_align, true);
  check_part(kOp, "key_scale", p.k.scale, 2, true);
  check_part(kOp, "key_minimum", p.k.minimum, 2, true);
  check_part(kOp, "value_scale", p.v.scale, 2, true);
  check_part(kOp, "value_minimum", p.v.minimum, 2, true);
  check_part(kOp, "key_residual", p.k.residual, 16, true);
  check_part(kOp, "value_residual", p.v.residual, 16, true);
  p.lengths = counts(cache.lengths);
  p.quantized_keys = counts(cache.quantized_keys);
  p.quantized_values = counts(cache.quantized_values);
  p.group = cache.group;
  p.symmetric = false;
  const bool staged = aligned16(p.k.codes) && aligned16(p.k.scale) && aligned16(p.k.minimum) &&
                      aligned16(p.v.codes) && aligned16(p.v.scale) && aligned16(p.v.minimum);
  if (staged && cache.bits == 2)
    launch_kivi_mma<2>(p, c, stream);
  else if (staged)
    launch_kivi_mma<4>(p, c, stream);
  else if (cache.bits == 2)
    launch<KiviKeys<2>, IntRows<2>>(p, c, stream);
  else
    launch<KiviKeys<4>, IntRows<4>>(p, c, stream);
}

template <class Storage>
void run_int(Cuda stream, DeviceView<const Storage, 3> q,
             const IntCache<MemorySpace::Device>& cache, DeviceView<Storage, 3> out,
             DeviceView<float, 1> workspace, const AttentionOptions& options, bool bf16) {
  constexpr const char* kOp = "decode_attention(int, cuda)";
  const Common c = check_common(kOp, q, out, cache.lengths, cache.max_length,
                                static_cast<std::size_t>(workspace.size(0)));
  KVC_CHECK(cache.bits == 4 || cache.bits == 8, kOp, ": bits = ", cache.bits,
            " is not supported; allowed: {4, 8}");
  const std::int64_t group = cache.group == 0 ? c.d : cache.group;
  KVC_CHECK(group >= 16 && group % 16 == 0 && c.d % group == 0, kOp, ": group = ", cache.group,
            " must be 0 (head_dim) or a multiple of 16 that divides head_dim ", c.d);
  KVC_CHECK(cache.quantized.size(0) == c.batch && cache.quantized.size(1) == c.kv_heads, kOp,
            ": quantized counts must be [B, Hkv] = [", c.batch, ", ", c.kv_heads, "]");
  Params p;
  fill_common(p, c, q, out, workspace, cache.max_length, options, bf16);
  const std::size_t pb = static_cast<std::size_t>(param_bytes(cache.params));
  p.k.codes = part(cache.key_codes, 4);
  p.v.codes = part(cache.value_codes, 4);
  p.k.scale = part(cache.key_scale, pb);
  p.v.scale = part(cache.value_scale, pb);
  p.k.minimum = cache.symmetric ? Part{} : part(cache.key_minimum, pb);
  p.v.minimum = cache.symmetric ? Part{} : part(cache.value_minimum, pb);
  p.k.residual = part(cache.key_window, 2);
  p.v.residual = part(cache.value_window, 2);
  p.k.params_f32 = p.v.params_f32 = cache.params == ParamDType::f32;
  const int row_align = cache.bits == 8 ? 16 : 8;
  check_part(kOp, "key_codes", p.k.codes, row_align, true);
  check_part(kOp, "value_codes", p.v.codes, row_align, true);
  check_part(kOp, "key_scale", p.k.scale, static_cast<int>(pb), true);
  check_part(kOp, "value_scale", p.v.scale, static_cast<int>(pb), true);
  check_part(kOp, "key_minimum", p.k.minimum, static_cast<int>(pb), !cache.symmetric);
  check_part(kOp, "value_minimum", p.v.minimum, static_cast<int>(pb), !cache.symmetric);
  check_part(kOp, "key_window", p.k.residual, 16, true);
  check_part(kOp, "value_window", p.v.residual, 16, true);
  p.lengths = counts(cache.lengths);
  p.quantized_keys = p.quantized_values = counts(cache.quantized);
  p.group = static_cast<int>(group);
  p.symmetric = cache.symmetric;
  // Tensor cores when every staged part is 16-byte aligned and an mma's channels share one group
  // (INT4: an ldmatrix row spans 32 channels); otherwise the CUDA-core kernel.
  const bool staged = aligned16(p.k.codes) && aligned16(p.v.codes) && aligned16(p.k.scale) &&
                      aligned16(p.v.scale) &&
                      (cache.symmetric || (aligned16(p.k.minimum) && aligned16(p.v.minimum))) &&
                      group % (cache.bits == 8 ? 16 : 32) == 0;
  if (staged && cache.bits == 8)
    launch_token_mma<IntRows<8>>(p, c, stream);
  else if (staged)
    launch_token_mma<IntRows<4>>(p, c, stream);
  else if (cache.bits == 8)
    launch<IntRows<8>, IntRows<8>>(p, c, stream);
  else
    launch<IntRows<4>, IntRows<4>>(p, c, stream);
}

template <class Storage>
void run_fp8(Cuda stream, DeviceView<const Storage, 3> q,
             const Fp8Cache<MemorySpace::Device>& cache, DeviceView<Storage, 3> out,
             DeviceView<float, 1> workspace, const AttentionOptions& options, bool bf16) {
  constexpr const char* kOp = "decode_attention(fp8, cuda)";
  const Common c = check_common(kOp, q, out, cache.lengths, cache.max_length,
                                static_cast<std::size_t>(workspace.size(0)));
  for (const auto* v : {&cache.key_scale, &cache.value_scale})
    KVC_CHECK(v->data != nullptr && v->size(0) == c.batch && v->size(1) == c.kv_heads, kOp,
              ": key_scale and value_scale must be [B, Hkv] = [", c.batch, ", ", c.kv_heads, "]");
  Params p;
  fill_common(p, c, q, out, workspace, cache.max_length, options, bf16);
  p.k.codes = part(cache.key_codes, 1);
  p.v.codes = part(cache.value_codes, 1);
  p.k.scale = {reinterpret_cast<const unsigned char*>(cache.key_scale.data),
               cache.key_scale.strides[0] * 4, cache.key_scale.strides[1] * 4};
  p.v.scale = {reinterpret_cast<const unsigned char*>(cache.value_scale.data),
               cache.value_scale.strides[0] * 4, cache.value_scale.strides[1] * 4};
  check_part(kOp, "key_codes", p.k.codes, 16, true);
  check_part(kOp, "value_codes", p.v.codes, 16, true);
  p.lengths = counts(cache.lengths);
  p.group = static_cast<int>(c.d);
  // Codes are 16-byte aligned (checked above): always the tensor-core kernel.
  if (cache.kind == Fp8Kind::e4m3)
    launch_token_mma<Fp8Rows<0>>(p, c, stream);
  else
    launch_token_mma<Fp8Rows<1>>(p, c, stream);
}

}  // namespace

std::size_t quantized_decode_attention_workspace_floats(int batch, int q_heads, int kv_heads,
                                                        int head_dim, int max_length) {
  const SplitPlan plan = plan_splits(batch, kv_heads, max_length);
  if (plan.splits == 1) return 0;
  return static_cast<std::size_t>(batch) * q_heads * plan.splits * (head_dim + 2);
}

void decode_attention(Cuda stream, DeviceView<const bf16, 3> q,
                      const KiviCache<MemorySpace::Device>& cache, DeviceView<bf16, 3> out,
                      DeviceView<float, 1> workspace, const AttentionOptions& options) {
  run_kivi(stream, q, cache, out, workspace, options, true);
}
void decode_attention(Cuda stream, DeviceView<const f16, 3> q,
                      const KiviCache<MemorySpace::Device>& cache, DeviceView<f16, 3> out,
                      DeviceView<float, 1> workspace, const AttentionOptions& options) {
  run_kivi(stream, q, cache, out, workspace, options, false);
}
void decode_attention(Cuda stream, DeviceView<const bf16, 3> q,
                      const IntCache<MemorySpace::Device>& cache, DeviceView<bf16, 3> out,
                      DeviceView<float, 1> workspace, const AttentionOptions& options) {
  run_int(stream, q, cache, out, workspace, options, true);
}
void decode_attention(Cuda stream, DeviceView<const f16, 3> q,
                      const IntCache<MemorySpace::Device>& cache, DeviceView<f16, 3> out,
                      DeviceView<float, 1> workspace, const AttentionOptions& options) {
  run_int(stream, q, cache, out, workspace, options, false);
}
void decode_attention(Cuda stream, DeviceView<const bf16, 3> q,
                      const Fp8Cache<MemorySpace::Device>& cache, DeviceView<bf16, 3> out,
                      DeviceView<float, 1> workspace, const AttentionOptions& options) {
  run_fp8(stream, q, cache, out, workspace, options, true);
}
void decode_attention(Cuda stream, DeviceView<const f16, 3> q,
                      const Fp8Cache<MemorySpace::Device>& cache, DeviceView<f16, 3> out,
                      DeviceView<float, 1> workspace, const AttentionOptions& options) {
  run_fp8(stream, q, cache, out, workspace, options, false);
}

}  // namespace kvc::ops
