// cuda/quantized_decode_attention.cu: batched decode attention read straight from quantized caches
// (kvc/ops/quantized_attention.hpp): KIVI (keys per channel in token groups, values per token),
// per-token INT8/INT4 and FP8, plus their f16 residual rows.
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
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>

#include "check.cuh"
#include "kvc/core/dispatch.hpp"
#include "kvc/ops/quantized_attention.hpp"
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
  float scale_log2 = 0.0f;
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

__device__ inline float warp_max(float x) {
#pragma unroll
  for (int o = 16; o > 0; o /= 2) x = fmaxf(x, __shfl_xor_sync(kFull, x, o));
  return x;
}
__device__ inline float warp_sum(float x) {
#pragma unroll
  for (int o = 16; o > 0; o /= 2) x += __shfl_xor_sync(kFull, x, o);
  return x;
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
  constexpr int kVL = D / 16;    // lanes per token row, 16 channels each
  constexpr int kTP = 32 / kVL;  // token rows per warp step
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
    if (p.splits == 1) {
      const float o = !valid ? NAN : (sum > 0.0f ? total / sum : 0.0f);
      auto* dst = reinterpret_cast<std::uint16_t*>(p.out + b * p.out_batch + q_head * p.out_head);
      dst[d] = p.bf16 ? __bfloat16_as_ushort(__float2bfloat16_rn(o))
                      : __half_as_ushort(__float2half_rn(o));
    } else {
      const std::int64_t row =
          (static_cast<std::int64_t>(b) * p.q_heads + q_head) * p.splits + split;
      p.workspace[row * D + d] = valid ? total : NAN;
      if (d == 0) {
        const std::int64_t partials = static_cast<std::int64_t>(p.batch) * p.q_heads * p.splits;
        p.workspace[partials * D + row] = block_max;
        p.workspace[partials * (D + 1) + row] = sum;
      }
    }
  }
}

// One block of D threads per (sequence, query head) merges the splits' partials.
template <int D>
__global__ void __launch_bounds__(D) quantized_merge_kernel(Params p) {
  const int b = blockIdx.x / p.q_heads, q_head = blockIdx.x % p.q_heads, d = threadIdx.x;
  const float o =
      split_merge::merge_split_partials<D>(p.workspace, p.batch, p.q_heads, p.splits, b, q_head);
  auto* dst = reinterpret_cast<std::uint16_t*>(p.out + b * p.out_batch + q_head * p.out_head);
  dst[d] =
      p.bf16 ? __bfloat16_as_ushort(__float2bfloat16_rn(o)) : __half_as_ushort(__float2half_rn(o));
}

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
    if (p.splits > 1) {
      quantized_merge_kernel<kD><<<static_cast<unsigned>(c.batch * c.q_heads), kD, 0, native>>>(p);
      KVC_CUDA_CHECK_LAUNCH(native);
    }
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
  if (cache.bits == 2)
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
  if (cache.bits == 8)
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
  if (cache.kind == Fp8Kind::e4m3)
    launch<Fp8Rows<0>, Fp8Rows<0>>(p, c, stream);
  else
    launch<Fp8Rows<1>, Fp8Rows<1>>(p, c, stream);
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
