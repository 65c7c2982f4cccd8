// cuda/quantize.cu: quantize + pack kernels (include/kvc/ops/quantize_cuda.hpp), byte-compatible
// with the CPU stores (docs/formats.md).
//
// Bit-exactness with the CPU reference: every value is read as fp32 (bf16/f16 convert exactly),
// group minima and maxima equal the reference's sequential strict comparisons (fminf / fmaxf, and
// the sequential rule again when a zero is involved, so the sign of a zero minimum agrees),
// parameters are rounded with __float2half_rn (IEEE round to nearest even, like kvc::f16), and
// codes divide by the scale with IEEE fp32 results (a hoisted reciprocal with two FMA corrections,
// see `divide`, or `/` with nvcc's default -prec-div=true; never build this file with
// --use_fast_math), then round half to even (__float2uint_rn / __float2int_rn). The kernels are
// memory-bound only with few instructions per element: 32-bit index math, no per-element division
// instruction sequence.
//
// Channel axis: for G in {16, 32, 64} with 4-byte aligned channel pairs, one thread per (2
// channels, block of G tokens) holding its G channel pairs in registers (channel_pair_kernel);
// otherwise one block per (block of G tokens, 64 channels, head) whose [G, 64] tile goes to shared
// memory through cp.async, then one thread per channel walks its column twice. Token axis: one
// thread per (token, group) holding the group's G inputs in registers (G in {16, 32, 64, 128}, G a
// multiple of 8 and of 32/bits); other shapes take a generic kernel, one block per token. FP8: one
// thread per 16 (8, 1) elements with the hardware saturating converter (cvt.rn.satfinite), whose
// results equal kvc::fp8_e4m3 / fp8_e5m2.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_pipeline.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "check.cuh"
#include "kvc/core/dispatch.hpp"
#include "kvc/ops/quantize_cuda.hpp"
#include "launch.cuh"
#include "native_types.cuh"
#include "ptx.cuh"

namespace kvc::ops {
namespace {

constexpr int kChannelChunk = 64;  // channels per block (and threads) in the channel kernel
constexpr int kMaxChannelGroup = 256;
constexpr int kGenericThreads = 128;
constexpr int kMaxGenericDim = 2048;  // head_dim bound of the generic token kernel (shared memory)

__device__ inline float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ inline float to_float(__half v) { return __half2float(v); }

// 8 consecutive elements of a 16-byte vector.
template <class N>
__device__ inline void unpack8(uint4 raw, float (&out)[8]) {
  const N* e = reinterpret_cast<const N*>(&raw);
#pragma unroll
  for (int i = 0; i < 8; ++i) out[i] = to_float(e[i]);
}

// A [B, H] int32 array on the device.
struct Counts {
  std::int32_t* data = nullptr;
  std::int64_t sb = 0, sh = 0;
  __device__ std::int32_t& at(int b, int h) const { return data[b * sb + h * sh]; }
};

// Parameters as stored: f16 or f32, element (b, h, r, c).
struct Params {
  void* data = nullptr;
  std::int64_t s[4] = {0, 0, 0, 0};
  bool f32 = false;
  __device__ void store(int b, int h, std::int64_t r, int c, float v) const {
    const std::int64_t o = b * s[0] + h * s[1] + r * s[2] + c * s[3];
    if (f32)
      static_cast<float*>(data)[o] = v;
    else
      static_cast<__half*>(data)[o] = __float2half_rn(v);  // v is already f16-exact
  }
};

__device__ inline float round_param(float x, bool f32) {
  return f32 ? x : __half2float(__float2half_rn(x));
}

// The P5 code of x from stored parameters (the CPU's code_for / quantize_minmax).
__device__ inline std::uint32_t affine_code(float x, float scale, float minimum, float top) {
  if (scale == 0.0f) return 0u;
  return __float2uint_rn(fminf(fmaxf((x - minimum) / scale, 0.0f), top));
}
// The symmetric code as a two's complement field (the CPU's quantize_symmetric + signed_field).
__device__ inline std::uint32_t symmetric_field(float x, float scale, float qmax, int bits) {
  if (scale == 0.0f) return 0u;
  const int code = __float2int_rn(fminf(fmaxf(x / scale, -qmax), qmax));
  return static_cast<std::uint32_t>(code) & ((1u << bits) - 1u);
}

// a / b rounded to nearest even, from r = RN(1/b) (hoisted out of the per-element loops): two FMA
// corrections of a * r (Markstein). For b in [2^-100, 2^100] this equals IEEE division whenever
// the quotient is a normal number; a subnormal quotient (or one from a subnormal a) may differ in
// its last bits, which no format can see (it quantizes to 0, or to an FP8 zero of the same sign).
// The corrections turn a zero quotient's -0 into +0 (+0 + -0 = +0), so the sign comes from
// a * r, which always has the quotient's sign. A quotient that overflows comes out NaN: callers
// that can overflow (FP8) fall back to `/`. Callers check the range of b (divisor_ok) and use
// `/` outside it. (Checked against IEEE division on 3 * 10^8 host cases, tie quotients k + 1/2
// and signed zeros included.)
// a / b but for the sign of a zero quotient (the FMA corrections can turn -0 into +0).
__device__ inline float divide_unsigned_zero(float a, float b, float r) {
  const float q0 = __fmul_rn(a, r);
  const float q1 = __fmaf_rn(__fmaf_rn(-q0, b, a), r, q0);
  return __fmaf_rn(__fmaf_rn(-q1, b, a), r, q1);
}
__device__ inline float divide(float a, float b, float r) {
  return copysignf(divide_unsigned_zero(a, b, r), __fmul_rn(a, r));
}
__device__ inline bool divisor_ok(float b) { return b >= 0x1p-100f && b <= 0x1p100f; }

// Code of x: affine (kSymmetric false) or symmetric field, dividing by scale with `divide` when
// kFast (scale in range, r = RN(1/scale)) and with `/` otherwise. scale != 0.
template <bool kSymmetric, bool kFast>
__device__ inline std::uint32_t code_of(float x, float scale, float r, float minimum, float limit,
                                        int bits) {
  if constexpr (kSymmetric) {
    const float q = kFast ? divide(x, scale, r) : x / scale;
    const int code = __float2int_rn(fminf(fmaxf(q, -limit), limit));
    return static_cast<std::uint32_t>(code) & ((1u << bits) - 1u);
  } else {
    const float d = x - minimum;
    const float q = kFast ? divide(d, scale, r) : d / scale;
    return __float2uint_rn(fminf(fmaxf(q, 0.0f), limit));
  }
}

// Group minimum and maximum as the CPU takes them (sequential, strict comparisons: the first of
// equal values wins, which only shows for -0 and +0). fminf / fmaxf give the same values unless
// a zero is involved; then the sequential rule is re-run.
template <class Get>
__device__ inline void min_max(int count, Get get, float& lo, float& hi) {
  lo = hi = get(0);
  for (int i = 1; i < count; ++i) {
    const float v = get(i);
    lo = fminf(lo, v);
    hi = fmaxf(hi, v);
  }
  if (lo == 0.0f || hi == 0.0f) {
    lo = hi = get(0);
    for (int i = 1; i < count; ++i) {
      const float v = get(i);
      if (v < lo) lo = v;
      if (hi < v) hi = v;
    }
  }
}

// ---- channel axis ------------------------------------------------------------------------------

struct ChannelArgs {
  const void* x;
  std::int64_t xs[3];  // strides of b, h, token (channels contiguous)
  int heads, dim, group;
  std::uint32_t* codes;
  std::int64_t cs[5];  // b, h, block, channel, word
  Params scale, minimum;
  bool vec;  // 16-byte loads: aligned pointer and strides, D % 8 == 0
  // Flush mode (residual_rows.data != nullptr): only heads holding exactly `residual` rows, into
  // blocks quantized_rows / G + blockIdx.x, when all R / G of them fit the capacity.
  Counts residual_rows, quantized_rows;
  int residual, capacity_blocks;
  // Register kernel (channel_pair_kernel): blocks * D / 2 threads per (b, h), the token stride in
  // 32-bit words, and whether each thread's 2 * G / (32/bits) code words go out as 16- or 8-byte
  // stores (codes of a channel contiguous, channels G / (32/bits) words apart, aligned).
  int per_head, row_words;
  bool vec_store;
};

// A decode-time flush (residual_rows given) quantizes the R / G blocks of a head whose residual
// holds exactly R rows, after its quantized_rows / G blocks, when they fit the capacity: false for
// a head that does not flush; else `block` (the block within the input) becomes the output block.
__device__ inline bool flush_target(const ChannelArgs& a, int b, int h, std::int64_t& block) {
  if (a.residual_rows.data == nullptr) return true;
  const int quantized = a.quantized_rows.at(b, h);
  if (a.residual_rows.at(b, h) != a.residual || quantized < 0 ||
      quantized / a.group + a.residual / a.group > a.capacity_blocks)
    return false;
  block += quantized / a.group;
  return true;
}

template <class T, int kBits>
__global__ void __launch_bounds__(kChannelChunk) channel_kernel(ChannelArgs a) {
  using N = typename NativeOf<T>::type;
  constexpr int kPerWord = 32 / kBits;
  constexpr float kTop = static_cast<float>((1 << kBits) - 1);
  extern __shared__ __align__(16) unsigned char shared[];
  N* tile = reinterpret_cast<N*>(shared);  // [G, kChannelChunk]

  const int bh = blockIdx.z, b = bh / a.heads, h = bh % a.heads;
  std::int64_t block = blockIdx.x;
  if (!flush_target(a, b, h, block)) return;
  const int c0 = blockIdx.y * kChannelChunk;
  const int cols = min(kChannelChunk, a.dim - c0);
  const int g_size = a.group;
  const N* src = static_cast<const N*>(a.x) + b * a.xs[0] + h * a.xs[1] +
                 static_cast<std::int64_t>(blockIdx.x) * g_size * a.xs[2] + c0;
  if (a.vec) {
    const int vectors = cols / 8;  // per row; 8 unless the last chunk is narrower
    for (int e = threadIdx.x; e < g_size * vectors; e += kChannelChunk) {
      const int row = vectors == 8 ? e >> 3 : e / vectors;
      const int v = e - row * vectors;
      __pipeline_memcpy_async(tile + row * kChannelChunk + v * 8, src + row * a.xs[2] + v * 8, 16);
    }
    __pipeline_commit();
    __pipeline_wait_prior(0);
  } else {
    for (int e = threadIdx.x; e < g_size * cols; e += kChannelChunk) {
      const int row = e / cols, c = e % cols;
      tile[row * kChannelChunk + c] = src[row * a.xs[2] + c];
    }
  }
  __syncthreads();

  const int c = threadIdx.x;
  if (c >= cols) return;
  const N* column = tile + c;
  float lo, hi;
  min_max(
      g_size, [&](int t) { return to_float(column[t * kChannelChunk]); }, lo, hi);
  const bool f32 = a.scale.f32;
  const float scale = round_param((hi - lo) / kTop, f32);
  const float minimum = round_param(lo, f32);
  a.scale.store(b, h, block, c0 + c, scale);
  a.minimum.store(b, h, block, c0 + c, minimum);
  std::uint32_t* out = a.codes + b * a.cs[0] + h * a.cs[1] + block * a.cs[2] + (c0 + c) * a.cs[3];
  const int words = g_size / kPerWord;
  auto pack = [&](auto fast) {
    constexpr bool kFast = decltype(fast)::value;
    const float r = 1.0f / scale;
    for (int w = 0; w < words; ++w) {
      std::uint32_t word = 0;
#pragma unroll
      for (int j = 0; j < kPerWord; ++j)
        word |= code_of<false, kFast>(to_float(column[(w * kPerWord + j) * kChannelChunk]), scale,
                                      r, minimum, kTop, kBits)
                << (kBits * j);
      out[w * a.cs[4]] = word;
    }
  };
  if (scale == 0.0f) {
    for (int w = 0; w < words; ++w) out[w * a.cs[4]] = 0u;
  } else if (divisor_ok(scale)) {
    pack(std::true_type{});
  } else {
    pack(std::false_type{});
  }
}

// Two channels of a 32-bit word (element 0 in the low half), as fp32.
__device__ inline float pair_element(std::uint32_t w, int i, __nv_bfloat16) {
  return __uint_as_float(i ? w & 0xFFFF0000u : w << 16);
}
__device__ inline float pair_element(std::uint32_t w, int i, __half) {
  return __half2float(__ushort_as_half(static_cast<unsigned short>(i ? w >> 16 : w & 0xFFFFu)));
}
template <class N>
struct PairOf {
  using type = __nv_bfloat162;
};
template <>
struct PairOf<__half> {
  using type = __half2;
};

// The affine code from stored parameters (r = RN(1 / scale), scale in divisor_ok's range) without
// divide's sign fix-up: a zero quotient of either sign, and any negative one, gives code 0 after
// the clamp. Equal to code_of<false, true>.
__device__ inline std::uint32_t affine_code_fast(float x, float scale, float r, float minimum,
                                                 float top) {
  return __float2uint_rn(fminf(fmaxf(divide_unsigned_zero(x - minimum, scale, r), 0.0f), top));
}

// Channel axis from registers: one thread per (2 adjacent channels, block of kG tokens) of (b, h) =
// blockIdx.y. It loads its kG 32-bit channel pairs straight into registers (a warp reads 128
// contiguous bytes of a row per load, kG loads in flight per thread), takes both channels' min /
// max with packed 16-bit min / max (exact: the result is one of the inputs; around zeros the
// sequential rule is re-run, as min_max does), and packs both channels' codes in registers. The
// shared-memory tile kernel above reads every element twice from shared memory as 16-bit loads
// with per-element loop overhead: KIVI-2 / KIVI-4 keys (B 8, Hkv 8, T 32768) measured 0.76 / 0.75
// of copy with it and 0.99 / 1.00 with this kernel on an H100.
template <class T, int kBits, int kG>
__global__ void __launch_bounds__(128) channel_pair_kernel(ChannelArgs a) {
  using N = typename NativeOf<T>::type;
  using N2 = typename PairOf<N>::type;
  constexpr int kPerWord = 32 / kBits, kWords = kG / kPerWord;
  constexpr float kTop = static_cast<float>((1 << kBits) - 1);
  static_assert(kG % kPerWord == 0);
  const int j = blockIdx.x * blockDim.x + threadIdx.x;
  if (j >= a.per_head) return;
  const int pairs = a.dim >> 1;
  const int k = j / pairs, p = j - k * pairs;
  const int bh = blockIdx.y, b = bh / a.heads, h = bh % a.heads;
  std::int64_t block = k;
  if (!flush_target(a, b, h, block)) return;
  const std::uint32_t* src = reinterpret_cast<const std::uint32_t*>(
      static_cast<const N*>(a.x) + b * a.xs[0] + h * a.xs[1] +
      static_cast<std::int64_t>(k) * kG * a.xs[2] + 2 * p);
  std::uint32_t raw[kG];
#pragma unroll
  for (int t = 0; t < kG; ++t) raw[t] = __ldg(src + t * a.row_words);

  N2 lo2 = *reinterpret_cast<const N2*>(&raw[0]), hi2 = lo2;
#pragma unroll
  for (int t = 1; t < kG; ++t) {
    const N2 v = *reinterpret_cast<const N2*>(&raw[t]);
    lo2 = __hmin2(lo2, v);
    hi2 = __hmax2(hi2, v);
  }
  const std::uint32_t lo_bits = *reinterpret_cast<const std::uint32_t*>(&lo2);
  const std::uint32_t hi_bits = *reinterpret_cast<const std::uint32_t*>(&hi2);

  const bool f32 = a.scale.f32;
  std::uint32_t words[2 * kWords];  // channel i's words at i * kWords
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    auto element = [&](int t) { return pair_element(raw[t], i, N{}); };
    float lo = pair_element(lo_bits, i, N{}), hi = pair_element(hi_bits, i, N{});
    if (lo == 0.0f || hi == 0.0f) {  // the sequential rule decides the sign of a zero
      lo = hi = element(0);
#pragma unroll
      for (int t = 1; t < kG; ++t) {
        const float v = element(t);
        if (v < lo) lo = v;
        if (hi < v) hi = v;
      }
    }
    const float scale = round_param((hi - lo) / kTop, f32);
    const float minimum = round_param(lo, f32);
    a.scale.store(b, h, block, 2 * p + i, scale);
    a.minimum.store(b, h, block, 2 * p + i, minimum);
#pragma unroll
    for (int w = 0; w < kWords; ++w) words[i * kWords + w] = 0u;
    if (scale == 0.0f) continue;
    if (divisor_ok(scale)) {
      const float r = 1.0f / scale;
#pragma unroll
      for (int t = 0; t < kG; ++t)  // fields are disjoint: + is |, and one LEA per code
        words[i * kWords + t / kPerWord] += affine_code_fast(element(t), scale, r, minimum, kTop)
                                            << (kBits * (t % kPerWord));
    } else {
#pragma unroll
      for (int t = 0; t < kG; ++t)
        words[i * kWords + t / kPerWord] +=
            code_of<false, false>(element(t), scale, 0.0f, minimum, kTop, kBits)
            << (kBits * (t % kPerWord));
    }
  }
  std::uint32_t* out = a.codes + b * a.cs[0] + h * a.cs[1] + block * a.cs[2] + (2 * p) * a.cs[3];
  if (a.vec_store) {  // the pair's 2 * kWords words: contiguous, 16-byte (kWords 1: 8) aligned
    if constexpr (kWords % 2 == 0) {
#pragma unroll
      for (int o = 0; o < 2 * kWords; o += 4)
        *reinterpret_cast<uint4*>(out + o) =
            make_uint4(words[o], words[o + 1], words[o + 2], words[o + 3]);
    } else {
      static_assert(kWords == 1);
      *reinterpret_cast<uint2*>(out) = make_uint2(words[0], words[1]);
    }
    return;
  }
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int w = 0; w < kWords; ++w) out[i * a.cs[3] + w * a.cs[4]] = words[i * kWords + w];
}

// After a channel flush: the counts of the heads that flushed (the same condition as above).
__global__ void channel_flush_counts(Counts residual_rows, Counts quantized_rows, int heads,
                                     int batch, int residual, int group, int capacity_blocks) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= batch * heads) return;
  const int b = i / heads, h = i % heads;
  const int quantized = quantized_rows.at(b, h);
  if (residual_rows.at(b, h) != residual || quantized < 0 ||
      quantized / group + residual / group > capacity_blocks)
    return;
  quantized_rows.at(b, h) = (quantized / group) * group + residual;
  residual_rows.at(b, h) = 0;
}

// ---- token axis --------------------------------------------------------------------------------

struct TokenArgs {
  const void* x;
  std::int64_t xs[3];  // b, h, token
  int heads, tokens, dim, group, bits;
  std::int64_t total;  // generic kernel: B * H * n rows
  int per_head;        // fast kernel: n * (D / G) threads per (b, h)
  int groups_shift;    // fast kernel: log2(D / G) when a power of two, else -1
  std::uint32_t* codes;
  std::int64_t cs[4];  // b, h, row, word
  int capacity_rows, words_per_row;
  Params scale, minimum;
  bool symmetric;
  Counts first_row;  // data nullptr: row = token
  int store_width;   // fast kernel: words per store (1, 2 or 4)
};

// Lane-parallel min / max / absmax over the kLanes consecutive lanes of one group, in element
// order (lane l holds elements before lane l + 1's): each step keeps the lower lane's value on
// ties, so the result is the sequential rule's (the first of equal values, which shows only for
// -0 and +0), and lane 0 of the group broadcasts it.
template <int kLanes>
__device__ inline float group_reduce(float v, bool is_max) {
#pragma unroll
  for (int offset = 1; offset < kLanes; offset <<= 1) {
    const float other = __shfl_down_sync(0xffffffffu, v, offset, kLanes);
    if (is_max ? v < other : other < v) v = other;
  }
  return __shfl_sync(0xffffffffu, v, 0, kLanes);
}

// kLanes consecutive lanes per (token, group) of one (b, h) = blockIdx.y, kG / kLanes elements
// each; every lane packs and stores its own whole words. 32-bit index math; every lane reaches the
// shuffles (inactive ones with dummy values). 8-bit codes take kG / 16 lanes of 16 elements (two
// 16-byte loads): a whole group per thread would hold up to 16 loads in registers and reads one
// group per lane per instruction (measured on an H100: INT8, G = D = 128, 0.69 -> 0.86 of copy);
// 2- and 4-bit codes keep one thread per group, which measured faster for them (0.83-0.89 of
// copy against 0.60-0.75 with lanes: their per-element work is the larger share), with the
// single-thread min / max of before (fminf / fmaxf, the ordered rule only around zeros).
template <int kG, int kBits>
inline constexpr int kTokenLanes = kBits == 8 ? kG / 16 : 1;

template <class T, int kG, int kBits>
__global__ void __launch_bounds__(128) token_kernel(TokenArgs a) {
  using N = typename NativeOf<T>::type;
  constexpr int kLanes = kTokenLanes<kG, kBits>, kE = kG / kLanes;
  constexpr int kPerWord = 32 / kBits;
  constexpr int kWords = kE / kPerWord;  // per lane
  constexpr int kVectors = kE / 8;       // 16-byte loads per lane
  static_assert(kG % kLanes == 0 && kE % kPerWord == 0 && kE % 8 == 0 &&
                (kLanes & (kLanes - 1)) == 0);
  const int j = blockIdx.x * blockDim.x + threadIdx.x;
  const int instance = j / kLanes, lane = j % kLanes;
  bool active = instance < a.per_head;
  const int groups = a.dim / kG;
  const int t = !active ? 0 : a.groups_shift >= 0 ? instance >> a.groups_shift : instance / groups;
  const int g = active ? instance - t * groups : 0;
  const int bh = blockIdx.y, b = bh / a.heads, h = bh % a.heads;
  const std::int64_t row = t + (active && a.first_row.data ? a.first_row.at(b, h) : 0);
  active = active && row >= 0 && row < a.capacity_rows;

  if constexpr (kLanes == 1) {
    if (!active) return;  // a one-lane group has no shuffles to reach
  }
  uint4 raw[kVectors];
  const N* src =
      static_cast<const N*>(a.x) + b * a.xs[0] + h * a.xs[1] + t * a.xs[2] + g * kG + lane * kE;
#pragma unroll
  for (int v = 0; v < kVectors; ++v)
    raw[v] = active ? __ldg(reinterpret_cast<const uint4*>(src) + v) : make_uint4(0u, 0u, 0u, 0u);
  auto element = [&](int k) {
    const N* e = reinterpret_cast<const N*>(&raw[k / 8]);
    return to_float(e[k % 8]);
  };

  const bool f32 = a.scale.f32;
  float scale, minimum = 0.0f, limit;
  if (a.symmetric) {
    float amax = 0.0f;
#pragma unroll
    for (int k = 0; k < kE; ++k) amax = fmaxf(amax, fabsf(element(k)));
    if constexpr (kLanes > 1) amax = group_reduce<kLanes>(amax, true);
    limit = static_cast<float>((1 << (kBits - 1)) - 1);  // qmax
    scale = round_param(amax / limit, f32);
  } else {
    float lo, hi;
    if constexpr (kLanes == 1) {
      // fminf / fmaxf, and the sequential rule only when a zero is involved: min_max's rule,
      // written out unrolled here (calling min_max with a compile-time count kept raw[] in
      // registers but measured ~10% slower for the 2- and 4-bit asymmetric rows on the H100).
      lo = hi = element(0);
#pragma unroll
      for (int k = 1; k < kE; ++k) {
        lo = fminf(lo, element(k));
        hi = fmaxf(hi, element(k));
      }
      if (lo == 0.0f || hi == 0.0f) {
        lo = hi = element(0);
#pragma unroll
        for (int k = 1; k < kE; ++k) {
          if (element(k) < lo) lo = element(k);
          if (hi < element(k)) hi = element(k);
        }
      }
    } else {
      lo = hi = element(0);
#pragma unroll
      for (int k = 1; k < kE; ++k) {
        if (element(k) < lo) lo = element(k);
        if (hi < element(k)) hi = element(k);
      }
      lo = group_reduce<kLanes>(lo, false);
      hi = group_reduce<kLanes>(hi, true);
    }
    limit = static_cast<float>((1 << kBits) - 1);
    scale = round_param((hi - lo) / limit, f32);
    minimum = round_param(lo, f32);
    if (active && lane == 0) a.minimum.store(b, h, row, g, minimum);
  }
  if (!active) return;  // no shuffles below
  if (lane == 0) a.scale.store(b, h, row, g, scale);

  std::uint32_t words[kWords];
#pragma unroll
  for (int w = 0; w < kWords; ++w) words[w] = 0u;
  auto pack = [&](auto symmetric, auto fast) {
    constexpr bool kSymmetric = decltype(symmetric)::value, kFast = decltype(fast)::value;
    const float r = 1.0f / scale;
#pragma unroll
    for (int k = 0; k < kE; ++k)
      words[k / kPerWord] |= code_of<kSymmetric, kFast>(element(k), scale, r, minimum, limit, kBits)
                             << (kBits * (k % kPerWord));
  };
  if (scale != 0.0f) {
    const bool fast = divisor_ok(scale);
    if (a.symmetric) {
      if (fast)
        pack(std::true_type{}, std::true_type{});
      else
        pack(std::true_type{}, std::false_type{});
    } else {
      if (fast)
        pack(std::false_type{}, std::true_type{});
      else
        pack(std::false_type{}, std::false_type{});
    }
  }
  std::uint32_t* out =
      a.codes + b * a.cs[0] + h * a.cs[1] + row * a.cs[2] + g * (kG / kPerWord) + lane * kWords;
  if constexpr (kWords % 4 == 0) {
    if (a.store_width == 4) {
#pragma unroll
      for (int w = 0; w < kWords; w += 4)
        *reinterpret_cast<uint4*>(out + w) =
            make_uint4(words[w], words[w + 1], words[w + 2], words[w + 3]);
      return;
    }
  }
  if constexpr (kWords % 2 == 0) {
    if (a.store_width >= 2) {
#pragma unroll
      for (int w = 0; w < kWords; w += 2)
        *reinterpret_cast<uint2*>(out + w) = make_uint2(words[w], words[w + 1]);
      return;
    }
  }
#pragma unroll
  for (int w = 0; w < kWords; ++w) out[w] = words[w];
}

// One token row, already in shared memory as fp32 (`row` [D]), quantized by the whole block:
// parameters per group (one thread each), then codes per word (one thread each), so that any G
// dividing D and partial last words work. `params` is shared scratch of 2 * (D / G) floats.
__device__ void quantize_row_block(const float* row, float* params, const TokenArgs& a, int b,
                                   int h, std::int64_t dst_row) {
  const int groups = a.dim / a.group, bits = a.bits;
  const float top = static_cast<float>((1 << bits) - 1);
  const float qmax = static_cast<float>((1 << (bits - 1)) - 1);
  const bool f32 = a.scale.f32;
  for (int g = threadIdx.x; g < groups; g += blockDim.x) {
    const float* x = row + g * a.group;
    float scale, minimum = 0.0f;
    if (a.symmetric) {
      float amax = 0.0f;
      for (int e = 0; e < a.group; ++e) amax = fmaxf(amax, fabsf(x[e]));
      scale = round_param(amax / qmax, f32);
    } else {
      float lo = x[0], hi = x[0];
      for (int e = 1; e < a.group; ++e) {
        if (x[e] < lo) lo = x[e];
        if (hi < x[e]) hi = x[e];
      }
      scale = round_param((hi - lo) / top, f32);
      minimum = round_param(lo, f32);
      a.minimum.store(b, h, dst_row, g, minimum);
    }
    a.scale.store(b, h, dst_row, g, scale);
    params[2 * g] = scale;
    params[2 * g + 1] = minimum;
  }
  __syncthreads();
  const int per_word = 32 / bits;
  std::uint32_t* out = a.codes + b * a.cs[0] + h * a.cs[1] + dst_row * a.cs[2];
  for (int w = threadIdx.x; w < a.words_per_row; w += blockDim.x) {
    std::uint32_t word = 0;
    for (int j = 0; j < per_word; ++j) {
      const int c = w * per_word + j;
      if (c >= a.dim) break;
      const int g = c / a.group;
      const float scale = params[2 * g], minimum = params[2 * g + 1];
      const std::uint32_t field = a.symmetric ? symmetric_field(row[c], scale, qmax, bits)
                                              : affine_code(row[c], scale, minimum, top);
      word |= field << (bits * j);
    }
    out[w * a.cs[3]] = word;
  }
}

// Generic token axis: one block per (b, h, token).
template <class T>
__global__ void __launch_bounds__(kGenericThreads) token_generic_kernel(TokenArgs a) {
  using N = typename NativeOf<T>::type;
  extern __shared__ float row_shared[];  // [D] row, then [2 * D / G] parameters
  const std::int64_t row_index = blockIdx.x;
  const int t = static_cast<int>(row_index % a.tokens);
  const int bh = static_cast<int>(row_index / a.tokens), b = bh / a.heads, h = bh % a.heads;
  const std::int64_t row = t + (a.first_row.data ? a.first_row.at(b, h) : 0);
  if (row < 0 || row >= a.capacity_rows) return;
  const N* src = static_cast<const N*>(a.x) + b * a.xs[0] + h * a.xs[1] + t * a.xs[2];
  for (int c = threadIdx.x; c < a.dim; c += blockDim.x) row_shared[c] = to_float(src[c]);
  __syncthreads();
  quantize_row_block(row_shared, row_shared + a.dim, a, b, h, row);
}

// Token-axis flush: one block per (b, h). `a.x` is the f16 window [B, H, capacity, D].
__global__ void __launch_bounds__(kGenericThreads)
    token_flush_kernel(TokenArgs a, Counts window_rows, Counts quantized_rows, int keep,
                       int window_capacity) {
  extern __shared__ float row_shared[];
  const int b = blockIdx.x / a.heads, h = blockIdx.x % a.heads;
  const int rows = window_rows.at(b, h), quantized = quantized_rows.at(b, h);
  if (rows <= keep || quantized < 0 || quantized >= a.capacity_rows) return;
  __half* window = const_cast<__half*>(static_cast<const __half*>(a.x)) + b * a.xs[0] + h * a.xs[1];
  for (int c = threadIdx.x; c < a.dim; c += blockDim.x) row_shared[c] = __half2float(window[c]);
  __syncthreads();
  quantize_row_block(row_shared, row_shared + a.dim, a, b, h, quantized);

  // Rows 1.. move up by one, in chunks: every element of a chunk is read before any of it is
  // written, and a chunk only writes over rows already read.
  const int present = min(rows, window_capacity);
  constexpr int kPerThread = 8;
  const std::int64_t total = static_cast<std::int64_t>(present - 1) * a.dim;
  for (std::int64_t start = 0; start < total; start += kPerThread * kGenericThreads) {
    __half staged[kPerThread];
#pragma unroll
    for (int u = 0; u < kPerThread; ++u) {
      const std::int64_t e = start + u * kGenericThreads + threadIdx.x;
      if (e < total) staged[u] = window[(e / a.dim + 1) * a.xs[2] + e % a.dim];
    }
    __syncthreads();
#pragma unroll
    for (int u = 0; u < kPerThread; ++u) {
      const std::int64_t e = start + u * kGenericThreads + threadIdx.x;
      if (e < total) window[(e / a.dim) * a.xs[2] + e % a.dim] = staged[u];
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    window_rows.at(b, h) = present - 1;
    quantized_rows.at(b, h) = quantized + 1;
  }
}

// ---- f16 rows ----------------------------------------------------------------------------------

template <class T>
__global__ void append_kernel(const typename NativeOf<T>::type* x, std::int64_t xb, std::int64_t xh,
                              std::int64_t xt, __half* rows, std::int64_t rb, std::int64_t rh,
                              std::int64_t rt, Counts count, int heads, int tokens, int dim,
                              int capacity, std::int64_t total) {
  const std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= total) return;
  const int c = static_cast<int>(i % dim);
  const std::int64_t r = i / dim;
  const int t = static_cast<int>(r % tokens), bh = static_cast<int>(r / tokens);
  const int b = bh / heads, h = bh % heads;
  const std::int64_t dst = count.at(b, h) + static_cast<std::int64_t>(t);
  if (dst < 0 || dst >= capacity) return;
  rows[b * rb + h * rh + dst * rt + c] = __float2half_rn(to_float(x[b * xb + h * xh + t * xt + c]));
}

__global__ void append_counts(Counts count, int batch, int heads, int tokens, int capacity) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= batch * heads) return;
  std::int32_t& n = count.at(i / heads, i % heads);
  if (n >= 0) n = static_cast<std::int32_t>(min(std::int64_t{capacity}, std::int64_t{n} + tokens));
}

// ---- FP8 ---------------------------------------------------------------------------------------

__device__ inline std::uint8_t fp8_code(float x, bool e4m3) {
  return static_cast<std::uint8_t>(
      __nv_cvt_float_to_fp8(x, __NV_SATFINITE, e4m3 ? __NV_E4M3 : __NV_E5M2));
}

struct Fp8Args {
  const void* x;
  std::int64_t xs[3];
  int heads, tokens, dim;
  int per_head;      // threads per (b, h): n * D / kPerThread
  int chunks_shift;  // log2(D / kPerThread) when a power of two, else -1
  const float* scale;
  std::int64_t ss[2];
  std::uint8_t* codes;
  std::int64_t cs[3];  // b, h, row (channels contiguous)
  int capacity_rows;
  Counts first_row;
  bool e4m3;
  bool vec;  // 16-byte loads and 8-byte stores
};

template <bool kFast>
__device__ inline std::uint8_t fp8_of(float x, float scale, float r, bool e4m3) {
  float q = kFast ? divide(x, scale, r) : x / scale;
  if (kFast && !(fabsf(q) <= 3.0e38f)) q = x / scale;  // overflowing quotients: IEEE division
  return fp8_code(q, e4m3);
}

// The codes of kPerThread (8 or 16) elements held as kPerThread / 8 16-byte vectors, as
// kPerThread / 4 words. r = 1 / scale.
template <class N, int kPerThread>
__device__ inline void fp8_encode(const uint4 (&raw)[kPerThread / 8], float scale, float r,
                                  bool e4m3, std::uint32_t (&words)[kPerThread / 4]) {
  constexpr int kVectors = kPerThread / 8;
  float x[kVectors][8];
#pragma unroll
  for (int v = 0; v < kVectors; ++v) unpack8<N>(raw[v], x[v]);
#pragma unroll
  for (int w = 0; w < kPerThread / 4; ++w) words[w] = 0u;
  auto encode = [&](auto fast) {
    constexpr bool kFast = decltype(fast)::value;
#pragma unroll
    for (int e = 0; e < kPerThread; ++e)
      words[e / 4] |= std::uint32_t{fp8_of<kFast>(x[e / 8][e % 8], scale, r, e4m3)}
                      << (8 * (e % 4));
  };
  if (divisor_ok(scale))
    encode(std::true_type{});
  else
    encode(std::false_type{});
}

// One thread per kPerThread elements of one (b, h) = blockIdx.y.
template <class T, int kPerThread>
__global__ void __launch_bounds__(256) fp8_kernel(Fp8Args a) {
  using N = typename NativeOf<T>::type;
  const int j = blockIdx.x * blockDim.x + threadIdx.x;
  if (j >= a.per_head) return;
  const int chunks = a.dim / kPerThread;
  const int t = a.chunks_shift >= 0 ? j >> a.chunks_shift : j / chunks;
  const int c = (j - t * chunks) * kPerThread;
  const int bh = blockIdx.y, b = bh / a.heads, h = bh % a.heads;
  const std::int64_t row = t + (a.first_row.data ? a.first_row.at(b, h) : 0);
  if (row < 0 || row >= a.capacity_rows) return;
  const float scale = a.scale[b * a.ss[0] + h * a.ss[1]];
  const float r = 1.0f / scale;
  const N* src = static_cast<const N*>(a.x) + b * a.xs[0] + h * a.xs[1] + t * a.xs[2] + c;
  std::uint8_t* out = a.codes + b * a.cs[0] + h * a.cs[1] + row * a.cs[2] + c;
  if constexpr (kPerThread >= 8) {
    // kPerThread / 8 16-byte loads in flight, then one 8- or 16-byte store of the codes.
    uint4 raw[kPerThread / 8];
#pragma unroll
    for (int v = 0; v < kPerThread / 8; ++v)
      raw[v] = __ldg(reinterpret_cast<const uint4*>(src) + v);
    std::uint32_t words[kPerThread / 4];
    fp8_encode<N, kPerThread>(raw, scale, r, a.e4m3, words);
    if constexpr (kPerThread == 16)
      *reinterpret_cast<uint4*>(out) = make_uint4(words[0], words[1], words[2], words[3]);
    else
      *reinterpret_cast<uint2*>(out) = make_uint2(words[0], words[1]);
  } else {
    out[0] = fp8_code(to_float(src[0]) / scale, a.e4m3);
  }
}

// max|x| per (b, h) into the scale array's bits (non-negative floats order like their bits).
template <class T>
__global__ void __launch_bounds__(256) amax_kernel(Fp8Args a, std::int64_t per_block) {
  using N = typename NativeOf<T>::type;
  const int bh = blockIdx.y, b = bh / a.heads, h = bh % a.heads;
  const std::int64_t elements = static_cast<std::int64_t>(a.tokens) * a.dim;
  const std::int64_t first = blockIdx.x * per_block;
  const std::int64_t last = min(elements, first + per_block);
  const N* base = static_cast<const N*>(a.x) + b * a.xs[0] + h * a.xs[1];
  float m = 0.0f;
  if (a.vec) {
    for (std::int64_t e = first + threadIdx.x * 8; e < last; e += 256 * 8) {
      float x[8];
      unpack8<N>(__ldg(reinterpret_cast<const uint4*>(base + (e / a.dim) * a.xs[2] + e % a.dim)),
                 x);
#pragma unroll
      for (int k = 0; k < 8; ++k) m = fmaxf(m, fabsf(x[k]));
    }
  } else {
    for (std::int64_t e = first + threadIdx.x; e < last; e += 256)
      m = fmaxf(m, fabsf(to_float(base[(e / a.dim) * a.xs[2] + e % a.dim])));
  }
  m = ptx::warp_max(m);
  __shared__ float warp_maxima[8];
  if (threadIdx.x % 32 == 0) warp_maxima[threadIdx.x / 32] = m;
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < 8; ++w) m = fmaxf(m, warp_maxima[w]);
    float* slot = const_cast<float*>(a.scale) + b * a.ss[0] + h * a.ss[1];
    atomicMax(reinterpret_cast<unsigned int*>(slot), __float_as_uint(m));
  }
}

__global__ void scale_init(float* scale, std::int64_t sb, std::int64_t sh, int batch, int heads) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < batch * heads) scale[(i / heads) * sb + (i % heads) * sh] = 0.0f;
}

// amax -> scale; `sequence` takes the maximum over the heads of each sequence first.
__global__ void scale_finish(float* scale, std::int64_t sb, std::int64_t sh, int batch, int heads,
                             bool sequence, float fp8_max) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (sequence) {
    if (i >= batch) return;
    float m = 0.0f;
    for (int h = 0; h < heads; ++h) m = fmaxf(m, scale[i * sb + h * sh]);
    const float s = m > 0.0f ? m / fp8_max : 1.0f;
    for (int h = 0; h < heads; ++h) scale[i * sb + h * sh] = s;
  } else if (i < batch * heads) {
    float& m = scale[(i / heads) * sb + (i % heads) * sh];
    m = m > 0.0f ? m / fp8_max : 1.0f;
  }
}

// ---- host side ---------------------------------------------------------------------------------

using ChannelBits = ValueList<2, 4, 8>;
using TokenGroups = ValueList<16, 32, 64, 128>;

unsigned blocks_for(std::int64_t n, int threads) {
  return static_cast<unsigned>((n + threads - 1) / threads);
}

template <class V>
bool aligned(const V& v, std::size_t bytes) {
  return reinterpret_cast<std::uintptr_t>(v.data) % bytes == 0;
}

// Vector loads of 8 elements: 16-byte aligned rows, D % 8 == 0.
template <class T>
bool rows_vectorizable(const DeviceView<const T, 4>& x) {
  return aligned(x, 16) && x.strides[0] % 8 == 0 && x.strides[1] % 8 == 0 &&
         x.strides[2] % 8 == 0 && x.size(3) % 8 == 0;
}

template <class T>
void check_input(const char* op, const DeviceView<const T, 4>& x) {
  KVC_CHECK(x.data != nullptr || x.numel() == 0, op, ": x has no data");
  KVC_CHECK(x.size(3) >= 1, op, ": head dim D = ", x.size(3), "; need D >= 1");
  KVC_CHECK(x.strides[3] == 1 || x.size(3) == 1, op, ": x's channel stride is ", x.strides[3],
            "; channels must be contiguous (stride 1)");
  KVC_CHECK(x.size(0) * x.size(1) <= 65535, op, ": B * H = ", x.size(0) * x.size(1),
            " is too large; allowed: <= 65535");
  KVC_CHECK(x.size(2) <= (std::int64_t{1} << 30), op, ": n = ", x.size(2),
            " tokens is too large; allowed: <= 2^30");
}

Counts counts_of(DeviceView<const std::int32_t, 2> v) {
  return {const_cast<std::int32_t*>(v.data), v.strides[0], v.strides[1]};
}

void check_counts(const char* op, const char* name, const DeviceView<const std::int32_t, 2>& v,
                  std::int64_t batch, std::int64_t heads, bool optional) {
  if (optional && v.data == nullptr) return;
  KVC_CHECK(v.data != nullptr, op, ": ", name, " has no data");
  KVC_CHECK(v.size(0) == batch && v.size(1) == heads, op, ": ", name, " has shape [", v.size(0),
            ", ", v.size(1), "]; expected [", batch, ", ", heads, "]");
}

Params params_of(const DeviceParams& p) {
  Params out;
  out.data = p.data;
  for (int d = 0; d < 4; ++d) out.s[d] = p.strides[d];
  out.f32 = p.dtype == ParamDType::f32;
  return out;
}

void check_params(const char* op, const char* name, const DeviceParams& p, const QuantSpec& spec,
                  std::int64_t batch, std::int64_t heads, std::int64_t rows, std::int64_t cols) {
  KVC_CHECK(p.data != nullptr, op, ": ", name, " has no data");
  KVC_CHECK(p.dtype == spec.params, op, ": ", name, " is stored as ",
            p.dtype == ParamDType::f16 ? "f16" : "f32", " but the spec asks for ",
            spec.params == ParamDType::f16 ? "f16" : "f32");
  KVC_CHECK(p.shape[0] == batch && p.shape[1] == heads && p.shape[2] >= rows && p.shape[3] == cols,
            op, ": ", name, " has shape [", p.shape[0], ", ", p.shape[1], ", ", p.shape[2], ", ",
            p.shape[3], "]; expected [", batch, ", ", heads, ", >= ", rows, ", ", cols, "]");
}

void check_spec(const char* op, const QuantSpec& spec, bool channel) {
  KVC_CHECK(ChannelBits::contains(spec.bits), op, ": bits = ", spec.bits,
            " is not supported; allowed: ", ChannelBits::describe());
  KVC_CHECK(!(channel && spec.symmetric), op,
            ": the channel axis is asymmetric only (KIVI); symmetric = true is not allowed");
  KVC_CHECK(spec.group >= 1, op, ": group = ", spec.group, "; need group >= 1");
  if (channel)
    KVC_CHECK(spec.group % (32 / spec.bits) == 0 && spec.group <= kMaxChannelGroup, op,
              ": group = ", spec.group, " is not allowed at ", spec.bits,
              " bits; need a multiple of ", 32 / spec.bits,
              " (codes per word) and <= ", kMaxChannelGroup);
}

// Validates `out` for blocks [0, blocks) of a [B, H, *, D] input; returns the kernel arguments.
ChannelArgs channel_args(const char* op, const QuantSpec& spec, const ChannelBlocks& out,
                         std::int64_t batch, std::int64_t heads, std::int64_t dim,
                         std::int64_t blocks) {
  check_spec(op, spec, true);
  const std::int64_t words = spec.group / (32 / spec.bits);
  const auto& c = out.codes;
  KVC_CHECK(c.data != nullptr, op, ": codes has no data");
  KVC_CHECK(c.size(0) == batch && c.size(1) == heads && c.size(2) >= blocks && c.size(3) == dim &&
                c.size(4) == words,
            op, ": codes has shape [", c.size(0), ", ", c.size(1), ", ", c.size(2), ", ", c.size(3),
            ", ", c.size(4), "]; expected [", batch, ", ", heads, ", >= ", blocks, ", ", dim, ", ",
            words, "]");
  check_params(op, "scale", out.scale, spec, batch, heads, blocks, dim);
  check_params(op, "minimum", out.minimum, spec, batch, heads, blocks, dim);
  ChannelArgs a{};
  a.heads = static_cast<int>(heads);
  a.dim = static_cast<int>(dim);
  a.group = spec.group;
  a.codes = c.data;
  for (int d = 0; d < 5; ++d) a.cs[d] = c.strides[d];
  a.scale = params_of(out.scale);
  a.minimum = params_of(out.minimum);
  a.capacity_blocks = static_cast<int>(c.size(2));
  return a;
}

using PairGroups = ValueList<16, 32, 64>;  // G of the register kernel (G loads per thread)

template <class T>
void launch_channel(Cuda cuda, ChannelArgs a, int bits, std::int64_t blocks, std::int64_t bh) {
  if (blocks == 0 || bh == 0) return;
  // The register kernel: 32-bit channel pairs (4-byte aligned, even strides and D), G in
  // PairGroups, 32-bit offsets.
  const bool pairs = PairGroups::contains(a.group) && a.dim % 2 == 0 &&
                     reinterpret_cast<std::uintptr_t>(a.x) % 4 == 0 && a.xs[0] % 2 == 0 &&
                     a.xs[1] % 2 == 0 && a.xs[2] % 2 == 0 && a.xs[2] >= 0 &&
                     a.xs[2] / 2 * a.group < INT32_MAX && blocks * (a.dim / 2) <= INT32_MAX - 128;
  if (pairs) {
    const int words = a.group / (32 / bits), width = words % 2 == 0 ? 4 : 2;
    a.per_head = static_cast<int>(blocks * (a.dim / 2));
    a.row_words = static_cast<int>(a.xs[2] / 2);
    a.vec_store = a.cs[4] == 1 && a.cs[3] == words &&
                  reinterpret_cast<std::uintptr_t>(a.codes) % (4 * width) == 0 &&
                  a.cs[0] % width == 0 && a.cs[1] % width == 0 && a.cs[2] % width == 0;
    const dim3 grid(blocks_for(a.per_head, 128), static_cast<unsigned>(bh));
    dispatch<PairGroups>(a.group, "group", [&](auto g) {
      constexpr int kG = decltype(g)::value;
      dispatch<ChannelBits>(bits, "bits", [&](auto b) {
        constexpr int kBits = decltype(b)::value;
        if constexpr (kG % (32 / kBits) == 0)
          channel_pair_kernel<T, kBits, kG><<<grid, 128, 0, cuda.stream>>>(a);
      });
    });
    KVC_CUDA_CHECK_LAUNCH(cuda.stream);
    return;
  }
  const dim3 grid(static_cast<unsigned>(blocks),
                  static_cast<unsigned>((a.dim + kChannelChunk - 1) / kChannelChunk),
                  static_cast<unsigned>(bh));
  const std::size_t shared = static_cast<std::size_t>(a.group) * kChannelChunk * 2;
  dispatch<ChannelBits>(bits, "bits", [&](auto b) {
    constexpr int kBits = decltype(b)::value;
    auto kernel = channel_kernel<T, kBits>;
    if (shared > 48 * 1024)
      cuda_detail::allow_dynamic_shared_memory(kernel, static_cast<int>(shared));
    kernel<<<grid, kChannelChunk, shared, cuda.stream>>>(a);
  });
  KVC_CUDA_CHECK_LAUNCH(cuda.stream);
}

template <class T>
void quantize_channel_impl(Cuda cuda, DeviceView<const T, 4> x, const QuantSpec& spec,
                           const ChannelBlocks& out) {
  constexpr const char* kOp = "quantize_channel_blocks";
  check_input(kOp, x);
  const std::int64_t batch = x.size(0), heads = x.size(1), n = x.size(2), dim = x.size(3);
  check_spec(kOp, spec, true);
  KVC_CHECK(n % spec.group == 0, kOp, ": n = ", n,
            " tokens is not a multiple of group = ", spec.group);
  ChannelArgs a = channel_args(kOp, spec, out, batch, heads, dim, n / spec.group);
  a.x = x.data;
  for (int d = 0; d < 3; ++d) a.xs[d] = x.strides[d];
  a.vec = rows_vectorizable(x);
  launch_channel<T>(cuda, a, spec.bits, n / spec.group, batch * heads);
}

TokenArgs token_args(const char* op, const QuantSpec& spec, const TokenRows& out,
                     std::int64_t batch, std::int64_t heads, std::int64_t dim, std::int64_t rows) {
  check_spec(op, spec, false);
  KVC_CHECK(dim % spec.group == 0, op, ": head dim D = ", dim,
            " is not a multiple of group = ", spec.group);
  const std::int64_t words = words_for(dim, spec.bits);
  const auto& c = out.codes;
  KVC_CHECK(c.data != nullptr, op, ": codes has no data");
  KVC_CHECK(c.size(0) == batch && c.size(1) == heads && c.size(2) >= rows && c.size(3) == words, op,
            ": codes has shape [", c.size(0), ", ", c.size(1), ", ", c.size(2), ", ", c.size(3),
            "]; expected [", batch, ", ", heads, ", >= ", rows, ", ", words, "]");
  check_params(op, "scale", out.scale, spec, batch, heads, rows, dim / spec.group);
  if (spec.symmetric)
    KVC_CHECK(out.minimum.data == nullptr, op,
              ": a symmetric format has no minimum; pass an empty minimum");
  else
    check_params(op, "minimum", out.minimum, spec, batch, heads, rows, dim / spec.group);
  TokenArgs a{};
  a.heads = static_cast<int>(heads);
  a.dim = static_cast<int>(dim);
  a.group = spec.group;
  a.bits = spec.bits;
  a.codes = c.data;
  for (int d = 0; d < 4; ++d) a.cs[d] = c.strides[d];
  a.capacity_rows = static_cast<int>(std::min<std::int64_t>(c.size(2), INT32_MAX));
  a.words_per_row = static_cast<int>(words);
  a.scale = params_of(out.scale);
  a.minimum = params_of(out.minimum);
  a.symmetric = spec.symmetric;
  return a;
}

template <class T>
void quantize_token_impl(Cuda cuda, DeviceView<const T, 4> x, const QuantSpec& spec,
                         const TokenRows& out, DeviceView<const std::int32_t, 2> first_row) {
  constexpr const char* kOp = "quantize_token_rows";
  check_input(kOp, x);
  const std::int64_t batch = x.size(0), heads = x.size(1), n = x.size(2), dim = x.size(3);
  check_counts(kOp, "first_row", first_row, batch, heads, true);
  // With first_row the destination rows are only known on the device: capacity is checked there.
  TokenArgs a = token_args(kOp, spec, out, batch, heads, dim, first_row.data ? 0 : n);
  a.x = x.data;
  for (int d = 0; d < 3; ++d) a.xs[d] = x.strides[d];
  a.tokens = static_cast<int>(n);
  a.first_row = counts_of(first_row);
  if (n == 0 || batch * heads == 0) return;
  const int per_word = 32 / spec.bits;
  const bool fast = TokenGroups::contains(spec.group) && spec.group % per_word == 0 &&
                    rows_vectorizable(x) && out.codes.strides[3] == 1;
  if (fast) {
    const int words = spec.group / per_word;
    const auto& c = out.codes;
    a.store_width = 1;
    for (int width : {4, 2})
      if (words % width == 0 && aligned(c, 4 * width) && c.strides[0] % width == 0 &&
          c.strides[1] % width == 0 && c.strides[2] % width == 0) {
        a.store_width = width;
        break;
      }
    const std::int64_t groups = dim / spec.group, per_head = n * groups;
    const std::int64_t lanes = spec.bits == 8 ? spec.group / 16 : 1;  // kTokenLanes
    KVC_CHECK(per_head * lanes <= INT32_MAX - 128, kOp, ": n * D / G = ", per_head,
              " is too large; allowed: < (2^31 - 128) / ", lanes);
    a.per_head = static_cast<int>(per_head);
    a.groups_shift = -1;
    for (int shift = 0; shift < 31; ++shift)
      if ((std::int64_t{1} << shift) == groups) a.groups_shift = shift;
    const dim3 grid(blocks_for(per_head * lanes, 128), static_cast<unsigned>(batch * heads));
    dispatch<TokenGroups>(spec.group, "group", [&](auto g) {
      constexpr int kG = decltype(g)::value;
      dispatch<ChannelBits>(spec.bits, "bits", [&](auto b) {
        constexpr int kBits = decltype(b)::value;
        if constexpr (kG % (32 / kBits) == 0)
          token_kernel<T, kG, kBits><<<grid, 128, 0, cuda.stream>>>(a);
      });
    });
  } else {
    KVC_CHECK(dim <= kMaxGenericDim, kOp, ": head dim D = ", dim, " with group = ", spec.group,
              " is too large for the generic kernel; allowed: D <= ", kMaxGenericDim);
    a.total = batch * heads * n;
    KVC_CHECK(a.total <= INT32_MAX, kOp, ": B * H * n = ", a.total,
              " rows is too many for the generic kernel; allowed: <= 2^31 - 1");
    const std::size_t shared = static_cast<std::size_t>(dim + 2 * (dim / spec.group)) * 4;
    token_generic_kernel<T>
        <<<static_cast<unsigned>(a.total), kGenericThreads, shared, cuda.stream>>>(a);
  }
  KVC_CUDA_CHECK_LAUNCH(cuda.stream);
}

template <class T>
void append_impl(Cuda cuda, DeviceView<const T, 4> x, DeviceView<f16, 4> rows,
                 DeviceView<std::int32_t, 2> count) {
  constexpr const char* kOp = "append_rows";
  check_input(kOp, x);
  const std::int64_t batch = x.size(0), heads = x.size(1), n = x.size(2), dim = x.size(3);
  KVC_CHECK(rows.data != nullptr && rows.size(0) == batch && rows.size(1) == heads &&
                rows.size(3) == dim && rows.strides[3] == 1,
            kOp, ": rows has shape [", rows.size(0), ", ", rows.size(1), ", ", rows.size(2), ", ",
            rows.size(3), "] (channel stride ", rows.strides[3], "); expected [", batch, ", ",
            heads, ", capacity, ", dim, "] with contiguous channels");
  check_counts(kOp, "count", count, batch, heads, false);
  if (batch * heads == 0 || n == 0) return;
  const std::int64_t total = batch * heads * n * dim;
  append_kernel<T><<<blocks_for(total, 256), 256, 0, cuda.stream>>>(
      reinterpret_cast<const typename NativeOf<T>::type*>(x.data), x.strides[0], x.strides[1],
      x.strides[2], reinterpret_cast<__half*>(rows.data), rows.strides[0], rows.strides[1],
      rows.strides[2], counts_of(count), static_cast<int>(heads), static_cast<int>(n),
      static_cast<int>(dim), static_cast<int>(std::min<std::int64_t>(rows.size(2), INT32_MAX)),
      total);
  KVC_CUDA_CHECK_LAUNCH(cuda.stream);
  append_counts<<<blocks_for(batch * heads, 128), 128, 0, cuda.stream>>>(
      counts_of(count), static_cast<int>(batch), static_cast<int>(heads), static_cast<int>(n),
      static_cast<int>(std::min<std::int64_t>(rows.size(2), INT32_MAX)));
  KVC_CUDA_CHECK_LAUNCH(cuda.stream);
}

template <class T>
Fp8Args fp8_args(const char* op, DeviceView<const T, 4> x, Fp8Kind kind) {
  check_input(op, x);
  Fp8Args a{};
  a.x = x.data;
  for (int d = 0; d < 3; ++d) a.xs[d] = x.strides[d];
  a.heads = static_cast<int>(x.size(1));
  a.tokens = static_cast<int>(x.size(2));
  a.dim = static_cast<int>(x.size(3));
  a.e4m3 = kind == Fp8Kind::e4m3;
  a.vec = rows_vectorizable(x);
  return a;
}

template <class T>
void fp8_scales_impl(Cuda cuda, DeviceView<const T, 4> x, Fp8Kind kind, Fp8ScaleScope scope,
                     DeviceView<float, 2> scale) {
  constexpr const char* kOp = "fp8_scales";
  Fp8Args a = fp8_args(kOp, x, kind);
  const std::int64_t batch = x.size(0), heads = x.size(1);
  KVC_CHECK(scale.data != nullptr && scale.size(0) == batch && scale.size(1) == heads, kOp,
            ": scale has shape [", scale.size(0), ", ", scale.size(1), "]; expected [", batch, ", ",
            heads, "]");
  KVC_CHECK((scale.strides[0] != 0 || batch == 1) && (scale.strides[1] != 0 || heads == 1), kOp,
            ": scale has a zero stride; computed scales need one element per (b, h)");
  if (batch * heads == 0) return;
  a.scale = scale.data;
  a.ss[0] = scale.strides[0];
  a.ss[1] = scale.strides[1];
  const int bh = static_cast<int>(batch * heads);
  scale_init<<<blocks_for(bh, 128), 128, 0, cuda.stream>>>(scale.data, a.ss[0], a.ss[1],
                                                           static_cast<int>(batch), a.heads);
  KVC_CUDA_CHECK_LAUNCH(cuda.stream);
  const std::int64_t elements = x.size(2) * x.size(3);
  if (elements > 0) {
    constexpr std::int64_t kPerBlock = 256 * 8 * 16;
    const std::int64_t chunks = (elements + kPerBlock - 1) / kPerBlock;
    amax_kernel<T>
        <<<dim3(static_cast<unsigned>(chunks), static_cast<unsigned>(bh)), 256, 0, cuda.stream>>>(
            a, kPerBlock);
    KVC_CUDA_CHECK_LAUNCH(cuda.stream);
  }
  scale_finish<<<blocks_for(bh, 128), 128, 0, cuda.stream>>>(
      scale.data, a.ss[0], a.ss[1], static_cast<int>(batch), a.heads,
      scope == Fp8ScaleScope::sequence, fp8_max(kind));
  KVC_CUDA_CHECK_LAUNCH(cuda.stream);
}

template <class T>
void quantize_fp8_impl(Cuda cuda, DeviceView<const T, 4> x, DeviceView<const float, 2> scale,
                       Fp8Kind kind, DeviceView<std::uint8_t, 4> codes,
                       DeviceView<const std::int32_t, 2> first_row) {
  constexpr const char* kOp = "quantize_fp8";
  Fp8Args a = fp8_args(kOp, x, kind);
  const std::int64_t batch = x.size(0), heads = x.size(1), n = x.size(2), dim = x.size(3);
  KVC_CHECK(scale.data != nullptr && scale.size(0) == batch && scale.size(1) == heads, kOp,
            ": scale has shape [", scale.size(0), ", ", scale.size(1), "]; expected [", batch, ", ",
            heads, "]");
  check_counts(kOp, "first_row", first_row, batch, heads, true);
  const std::int64_t rows = first_row.data ? 0 : n;
  KVC_CHECK(codes.data != nullptr && codes.size(0) == batch && codes.size(1) == heads &&
                codes.size(2) >= rows && codes.size(3) == dim && codes.strides[3] == 1,
            kOp, ": codes has shape [", codes.size(0), ", ", codes.size(1), ", ", codes.size(2),
            ", ", codes.size(3), "] (channel stride ", codes.strides[3], "); expected [", batch,
            ", ", heads, ", >= ", rows, ", ", dim, "] with contiguous channels");
  if (batch * heads == 0 || n == 0) return;
  a.scale = scale.data;
  a.ss[0] = scale.strides[0];
  a.ss[1] = scale.strides[1];
  a.codes = codes.data;
  for (int d = 0; d < 3; ++d) a.cs[d] = codes.strides[d];
  a.capacity_rows = static_cast<int>(std::min<std::int64_t>(codes.size(2), INT32_MAX));
  a.first_row = counts_of(first_row);
  const bool vec = a.vec && aligned(codes, 8) && codes.strides[0] % 8 == 0 &&
                   codes.strides[1] % 8 == 0 && codes.strides[2] % 8 == 0;
  // 16 elements per thread (two loads in flight, one 16-byte store) where rows allow it.
  const bool vec16 = vec && dim % 16 == 0 && aligned(codes, 16) && codes.strides[0] % 16 == 0 &&
                     codes.strides[1] % 16 == 0 && codes.strides[2] % 16 == 0;
  const int per_thread = vec16 ? 16 : vec ? 8 : 1;
  const std::int64_t chunks = dim / per_thread, per_head = n * chunks;
  KVC_CHECK(per_head <= INT32_MAX - 256, kOp, ": n * D = ", n * dim,
            " is too large; allowed: < 2^31 - 256 codes per thread row");
  a.per_head = static_cast<int>(per_head);
  a.chunks_shift = -1;
  for (int shift = 0; shift < 31; ++shift)
    if ((std::int64_t{1} << shift) == chunks) a.chunks_shift = shift;
  const dim3 grid(blocks_for(per_head, 256), static_cast<unsigned>(batch * heads));
  if (vec16)
    fp8_kernel<T, 16><<<grid, 256, 0, cuda.stream>>>(a);
  else if (vec)
    fp8_kernel<T, 8><<<grid, 256, 0, cuda.stream>>>(a);
  else
    fp8_kernel<T, 1><<<grid, 256, 0, cuda.stream>>>(a);
  KVC_CUDA_CHECK_LAUNCH(cuda.stream);
}

}  // namespace

void quantize_channel_blocks(Cuda cuda, DeviceView<const bf16, 4> x, const QuantSpec& spec,
                             const ChannelBlocks& out) {
  quantize_channel_impl<bf16>(cuda, x, spec, out);
}
void quantize_channel_blocks(Cuda cuda, DeviceView<const f16, 4> x, const QuantSpec& spec,
                             const ChannelBlocks& out) {
  quantize_channel_impl<f16>(cuda, x, spec, out);
}

void quantize_token_rows(Cuda cuda, DeviceView<const bf16, 4> x, const QuantSpec& spec,
                         const TokenRows& out, DeviceView<const std::int32_t, 2> first_row) {
  quantize_token_impl<bf16>(cuda, x, spec, out, first_row);
}
void quantize_token_rows(Cuda cuda, DeviceView<const f16, 4> x, const QuantSpec& spec,
                         const TokenRows& out, DeviceView<const std::int32_t, 2> first_row) {
  quantize_token_impl<f16>(cuda, x, spec, out, first_row);
}

void append_rows(Cuda cuda, DeviceView<const bf16, 4> x, DeviceView<f16, 4> rows,
                 DeviceView<std::int32_t, 2> count) {
  append_impl<bf16>(cuda, x, rows, count);
}
void append_rows(Cuda cuda, DeviceView<const f16, 4> x, DeviceView<f16, 4> rows,
                 DeviceView<std::int32_t, 2> count) {
  append_impl<f16>(cuda, x, rows, count);
}

void flush_channel_residual(Cuda cuda, DeviceView<const f16, 4> residual, const QuantSpec& spec,
                            const ChannelBlocks& out, DeviceView<std::int32_t, 2> residual_rows,
                            DeviceView<std::int32_t, 2> quantized_rows) {
  constexpr const char* kOp = "flush_channel_residual";
  check_input(kOp, residual);
  const std::int64_t batch = residual.size(0), heads = residual.size(1), r = residual.size(2),
                     dim = residual.size(3);
  check_spec(kOp, spec, true);
  KVC_CHECK(r >= 1 && r % spec.group == 0, kOp, ": residual length R = ", r,
            " must be a positive multiple of group = ", spec.group);
  check_counts(kOp, "residual_rows", residual_rows, batch, heads, false);
  check_counts(kOp, "quantized_rows", quantized_rows, batch, heads, false);
  // Blocks land at device-side offsets: the capacity is checked per head on the device.
  ChannelArgs a = channel_args(kOp, spec, out, batch, heads, dim, 0);
  a.x = residual.data;
  for (int d = 0; d < 3; ++d) a.xs[d] = residual.strides[d];
  a.vec = rows_vectorizable(residual);
  a.residual_rows = counts_of(residual_rows);
  a.quantized_rows = counts_of(quantized_rows);
  a.residual = static_cast<int>(r);
  launch_channel<f16>(cuda, a, spec.bits, r / spec.group, batch * heads);
  if (batch * heads == 0) return;
  channel_flush_counts<<<blocks_for(batch * heads, 128), 128, 0, cuda.stream>>>(
      a.residual_rows, a.quantized_rows, a.heads, static_cast<int>(batch), a.residual, a.group,
      a.capacity_blocks);
  KVC_CUDA_CHECK_LAUNCH(cuda.stream);
}

void flush_token_window(Cuda cuda, DeviceView<f16, 4> window, int keep, const QuantSpec& spec,
                        const TokenRows& out, DeviceView<std::int32_t, 2> window_rows,
                        DeviceView<std::int32_t, 2> quantized_rows) {
  constexpr const char* kOp = "flush_token_window";
  const DeviceView<const f16, 4> input = window;
  check_input(kOp, input);
  const std::int64_t batch = window.size(0), heads = window.size(1), dim = window.size(3);
  KVC_CHECK(keep >= 0, kOp, ": keep = ", keep, "; need keep >= 0");
  KVC_CHECK(dim <= kMaxGenericDim, kOp, ": head dim D = ", dim,
            " is too large; allowed: <= ", kMaxGenericDim);
  check_counts(kOp, "window_rows", window_rows, batch, heads, false);
  check_counts(kOp, "quantized_rows", quantized_rows, batch, heads, false);
  TokenArgs a = token_args(kOp, spec, out, batch, heads, dim, 0);
  a.x = window.data;
  for (int d = 0; d < 3; ++d) a.xs[d] = window.strides[d];
  a.tokens = 1;
  if (batch * heads == 0) return;
  const std::size_t shared = static_cast<std::size_t>(dim + 2 * (dim / spec.group)) * 4;
  token_flush_kernel<<<static_cast<unsigned>(batch * heads), kGenericThreads, shared,
                       cuda.stream>>>(
      a, counts_of(window_rows), counts_of(quantized_rows), keep,
      static_cast<int>(std::min<std::int64_t>(window.size(2), INT32_MAX)));
  KVC_CUDA_CHECK_LAUNCH(cuda.stream);
}

void fp8_scales(Cuda cuda, DeviceView<const bf16, 4> x, Fp8Kind kind, Fp8ScaleScope scope,
                DeviceView<float, 2> scale) {
  fp8_scales_impl<bf16>(cuda, x, kind, scope, scale);
}
void fp8_scales(Cuda cuda, DeviceView<const f16, 4> x, Fp8Kind kind, Fp8ScaleScope scope,
                DeviceView<float, 2> scale) {
  fp8_scales_impl<f16>(cuda, x, kind, scope, scale);
}

void quantize_fp8(Cuda cuda, DeviceView<const bf16, 4> x, DeviceView<const float, 2> scale,
                  Fp8Kind kind, DeviceView<std::uint8_t, 4> codes,
                  DeviceView<const std::int32_t, 2> first_row) {
  quantize_fp8_impl<bf16>(cuda, x, scale, kind, codes, first_row);
}
void quantize_fp8(Cuda cuda, DeviceView<const f16, 4> x, DeviceView<const float, 2> scale,
                  Fp8Kind kind, DeviceView<std::uint8_t, 4> codes,
                  DeviceView<const std::int32_t, 2> first_row) {
  quantize_fp8_impl<f16>(cuda, x, scale, kind, codes, first_row);
}

}  // namespace kvc::ops
