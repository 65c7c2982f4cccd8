// cuda/selection.cu: the SnapKV prefill path (include/kvc/ops/selection.hpp): observation-window
// scores with GQA reduction and pooling, top-k per row, compaction of the survivors.
//
// Scores take two passes over K (pass 1: softmax statistics, pass 2: probabilities), each one wave
// of blocks: a block owns a run of consecutive 64-key tiles of one KV head, streams them through a
// two-stage cp.async pipeline and keeps the KV head's G * W window rows in shared memory (in
// 128-row chunks that take turns when G * W > 128). Each of the 4 warps computes the scores of 32
// window rows x 64 keys with mma.sync m16n8k16 (bf16/f16 in, fp32 accumulation, ldmatrix
// operands) and keeps them in registers. Pass 1 reduces them to each (row, tile) max and sum of
// exponentials (quad shuffles), a merge kernel combines the tiles. Pass 2 turns the fragments into
// probabilities exp(s - max) / sum (the quotient correctly rounded: Markstein's q0 = e * (1 / sum)
// plus one fma residual step, the IEEE division's result without its slow path), rounds them like
// the reference and stages them [row, key] in shared memory, packed two per word when rounded to
// 16 bits. Then the window rows are summed per key in increasing row order: when W divides 32 (W
// >= 8) each warp sums its own rows (whole query heads, lane = two keys) after a __syncwarp, and
// the group mean adds the head scores in head order; otherwise one thread per key walks the
// chunk's rows. A last kernel pools. Recomputing QK^T costs a second read of K; storing the
// [Hq, W, T] scores instead would move several times more bytes. Both passes are latency bound:
// registers allow 12 (pass 1) and 8 (pass 2) warps per SM, and ncu shows each warp issuing every
// 4.5-5.7 cycles (fixed-latency dependencies first), about 40-45% of the SM's issue slots.
//
// Top-k is a radix select on 32-bit keys ordered by descending score: the k-th key is found digit
// by digit (8-bit digits, warp-aggregated shared atomics), then a block scan writes the survivors
// in ascending position, exact ties going to the lower positions (the reference's total order,
// without a sort). Rows of up to 131072 scores go to a cluster of 8
// blocks per row (thread-block clusters, sm_90): the row is read once into registers (contiguous
// runs per thread), the blocks' digit histograms are summed through distributed shared memory and
// each block's survivors are offset by the lower-ranked blocks' counts. Longer rows take one
// block per row, re-reading the row from L2 on each digit.
#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cub/block/block_scan.cuh>
#include <limits>
#include <type_traits>

#include "check.cuh"
#include "kvc/core/dispatch.hpp"
#include "kvc/ops/selection.hpp"
#include "launch.cuh"
#include "native_types.cuh"
#include "ptx.cuh"

namespace kvc::ops {
namespace {

using namespace ptx;  // cp.async, ldmatrix and the warp reductions

constexpr std::size_t kAlign = 256;

std::size_t align_up(std::size_t bytes) { return (bytes + kAlign - 1) / kAlign * kAlign; }

// Carves 256-byte aligned regions out of a caller-owned workspace.
struct Carver {
  std::byte* base;
  std::size_t used = 0;
  template <class T>
  T* take(std::size_t count) {
    T* p = reinterpret_cast<T*>(base + used);
    used += align_up(count * sizeof(T));
    return p;
  }
};

// ---- scores ------------------------------------------------------------------------------------

template <class T>
struct ScoreParams {
  const T* q;
  const T* k;
  std::int64_t q_head, q_row;    // strides of q_window [Hq, W, D]
  std::int64_t k_head, k_token;  // strides of k [Hkv, T, D]
  float* tile_max;               // [Hq * W, tiles]: pass 1 partials
  float* tile_sum;               // [Hq * W, tiles]
  float* row_max;                // [Hq * W]: merged
  float* row_sum;                // [Hq * W]
  float* reduced;                // [S, T - W]
  int window, tokens, prefix, tiles, prefix_tiles, tiles_per_block, group;
  bool per_query_head;  // S == Hq
  bool mean_rows;       // ScoreReduction::mean
  bool warp_fold;       // W divides 32 and W >= 8: each warp's rows are whole query heads
  float scale;
};

template <class T>
__device__ inline uint4 load16(const T* p) {
  return __ldg(reinterpret_cast<const uint4*>(p));
}

constexpr int kThreads = 128;                          // 4 warps
constexpr int kWarpRows = 32;                          // window rows per warp: two m16 fragments
constexpr int kChunkRows = kWarpRows * kThreads / 32;  // rows per pass over a K tile
constexpr int kTileKeys = 64;   // keys per K tile: eight n8 fragments per warp
constexpr int kHeadSlots = 16;  // query heads per chunk whose scores the warp fold stages (W >= 8)

// Row stride of the staged probabilities, in 32-bit words: fp32 [.., 64 + 8], 16-bit [.., 32 + 4];
// both make the fragment stores and the column reads conflict-free.
__host__ __device__ constexpr int probability_words(int rounding) {
  return rounding == 0 ? kTileKeys + 8 : kTileKeys / 2 + 4;
}

template <int D, bool kSecond, int kRounding>
constexpr std::size_t window_shared_bytes() {
  std::size_t bytes = static_cast<std::size_t>(kChunkRows + 2 * kTileKeys) * (D + 8) * 2;
  if (kSecond)
    bytes += static_cast<std::size_t>(kChunkRows) * probability_words(kRounding) * 4 +
             static_cast<std::size_t>(kHeadSlots) * kTileKeys * sizeof(float);
  return bytes;
}

// S[warp's 32 rows, 64 keys] = Q K^T: acc[m][n] is the m16n8 fragment of rows 16 m.., keys 8 n..
template <class T, int D>
__device__ inline void score_fragments(const T* q_chunk, const T* k_tile, int warp, int lane,
                                       float (&acc)[2][8][4]) {
  constexpr int kLd = D + 8;
#pragma unroll
  for (int m = 0; m < 2; ++m)
#pragma unroll
    for (int n = 0; n < 8; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[m][n][e] = 0.0f;
  const T* a_base = q_chunk + (warp * kWarpRows + lane % 16) * kLd + (lane / 16) * 8;
  const T* b_base = k_tile + (lane % 8 + (lane / 16) * 8) * kLd + ((lane / 8) % 2) * 8;
#pragma unroll
  for (int kk = 0; kk < D; kk += 16) {
    std::uint32_t a[2][4];
#pragma unroll
    for (int m = 0; m < 2; ++m) ldmatrix_x4(a[m], a_base + m * 16 * kLd + kk);
#pragma unroll
    for (int np = 0; np < 4; ++np) {
      std::uint32_t b[4];
      ldmatrix_x4(b, b_base + np * 16 * kLd + kk);
#pragma unroll
      for (int m = 0; m < 2; ++m) {
        mma16816<T>(acc[m][2 * np], a[m][0], a[m][1], a[m][2], a[m][3], b[0], b[1]);
        mma16816<T>(acc[m][2 * np + 1], a[m][0], a[m][1], a[m][2], a[m][3], b[2], b[3]);
      }
    }
  }
}

// Two probabilities of a row, rounded and packed as the fold reads them back.
template <int kRounding>
__device__ inline std::uint32_t pack_rounded(float a, float b) {
  if constexpr (kRounding == 1) {
    const __half2 h = __floats2half2_rn(a, b);
    return *reinterpret_cast<const std::uint32_t*>(&h);
  } else {
    const __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
    return *reinterpret_cast<const std::uint32_t*>(&h);
  }
}
template <int kRounding>
__device__ inline float2 unpack_rounded(std::uint32_t word) {
  if constexpr (kRounding == 1) {
    const __half2 h = *reinterpret_cast<const __half2*>(&word);
    return __half22float2(h);
  } else {
    return make_float2(__uint_as_float(word << 16), __uint_as_float(word & 0xFFFF0000u));
  }
}

// Pass 1 (kSecond = false): per (window row, 64-key tile) the max and the sum of exp(score - max)
// over the visible keys of the tile. Pass 2: the rounded probabilities of the prefix keys summed
// over the window rows of each query head in row order, then reduced over the group. A block owns
// tiles_per_block consecutive tiles of one KV head; K tiles stream through a two-stage cp.async
// pipeline while the window rows (one 128-row chunk when G W <= 128) stay in shared memory.
template <class T, int D, bool kSecond, int kRounding>
__global__ void __launch_bounds__(kThreads, kSecond ? 2 : 3) window_kernel(ScoreParams<T> p) {
  constexpr int kLd = D + 8;       // padded rows: 16 bytes of skew between rows spreads the banks
  constexpr int kVectors = D / 8;  // 16-byte vectors per row
  constexpr int kWords = probability_words(kRounding);
  extern __shared__ __align__(128) unsigned char shared[];
  T* q_chunk = reinterpret_cast<T*>(shared);  // [kChunkRows, kLd]
  T* k_stages = q_chunk + kChunkRows * kLd;   // [2][kTileKeys, kLd]
  std::uint32_t* staged = reinterpret_cast<std::uint32_t*>(k_stages + 2 * kTileKeys * kLd);
  float* head_scores = reinterpret_cast<float*>(staged + kChunkRows * kWords);  // [slots, keys]

  const int kv_head = blockIdx.y;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, quad = lane % 4;  // fragment row and column pair
  const int rows = p.group * p.window;      // the KV head's window rows, query head major
  const int chunks = (rows + kChunkRows - 1) / kChunkRows;
  const int tile_begin = blockIdx.x * p.tiles_per_block;
  const int tile_end = min(kSecond ? p.prefix_tiles : p.tiles, tile_begin + p.tiles_per_block);
  if (tile_begin >= tile_end) return;
  const T* k_base = p.k + kv_head * p.k_head;

  const auto load_k = [&](int tile, int stage) {  // keys past T read as zeros (masked)
    T* dst = k_stages + stage * kTileKeys * kLd;
#pragma unroll
    for (int u = 0; u < kTileKeys * kVectors / kThreads; ++u) {
      const int e = u * kThreads + threadIdx.x;
      const int key = tile * kTileKeys + e / kVectors;
      const bool valid = key < p.tokens;
      cp_async16_or_zero(dst + (e / kVectors) * kLd + (e % kVectors) * 8,
                         valid ? k_base + key * p.k_token + (e % kVectors) * 8 : k_base, valid);
    }
  };
  const auto load_q = [&](int chunk) {  // rows past G W read as zeros
#pragma unroll 4
    for (int e = threadIdx.x; e < kChunkRows * kVectors; e += kThreads) {
      const int row = chunk * kChunkRows + e / kVectors;
      const bool valid = row < rows;
      const int q_head = kv_head * p.group + row / p.window;
      cp_async16_or_zero(
          q_chunk + (e / kVectors) * kLd + (e % kVectors) * 8,
          valid ? p.q + q_head * p.q_head + (row % p.window) * p.q_row + (e % kVectors) * 8 : p.q,
          valid);
    }
  };

  load_q(0);
  load_k(tile_begin, 0);
  cp_async_commit();
  float row_max[2][2], row_sum[2][2], row_inverse[2][2];  // pass 2: this thread's four rows
  for (int tile = tile_begin, it = 0; tile < tile_end; ++tile, ++it) {
    if (tile + 1 < tile_end) load_k(tile + 1, (it + 1) % 2);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    const T* k_tile = k_stages + (it % 2) * kTileKeys * kLd;
    const int first_key = tile * kTileKeys;
    float head_sum = 0.0f, group_sum = 0.0f;  // pass 2, threads < kTileKeys: key first_key + tid

    for (int chunk = 0; chunk < chunks; ++chunk) {
      const int chunk_row = chunk * kChunkRows;
      if (chunks > 1 && (chunk > 0 || it > 0)) {  // G W > 128: the window rows take turns
        __syncthreads();
        load_q(chunk);
        cp_async_commit();
        cp_async_wait<0>();
        __syncthreads();
      }
      if (kSecond && (chunks > 1 || it == 0)) {
#pragma unroll
        for (int m = 0; m < 2; ++m)
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const int row = chunk_row + warp * kWarpRows + m * 16 + h * 8 + g;
            const bool in = row < rows;
            row_max[m][h] = in ? p.row_max[kv_head * rows + row] : 0.0f;
            row_sum[m][h] = in ? p.row_sum[kv_head * rows + row] : 1.0f;
            row_inverse[m][h] = 1.0f / row_sum[m][h];
          }
      }
      float acc[2][8][4];
      score_fragments<T, D>(q_chunk, k_tile, warp, lane, acc);

      if constexpr (!kSecond) {
        // Keys past T - W are hidden from the earlier window rows (and keys past T from all).
        const bool masked = first_key + kTileKeys - 1 > p.tokens - p.window;
#pragma unroll
        for (int m = 0; m < 2; ++m)
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const int row = chunk_row + warp * kWarpRows + m * 16 + h * 8 + g;
            const int last = p.tokens - p.window + row % p.window;  // last visible key
            float s[16];
            float mx = -INFINITY;
#pragma unroll
            for (int n = 0; n < 8; ++n)
#pragma unroll
              for (int e = 0; e < 2; ++e) {
                const float score = __fmul_rn(acc[m][n][2 * h + e], p.scale);
                const int key = first_key + n * 8 + 2 * quad + e;
                s[2 * n + e] = masked && key > last ? -INFINITY : score;
                mx = fmaxf(mx, s[2 * n + e]);
              }
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
            float l = 0.0f;
            if (mx != -INFINITY) {
#pragma unroll
              for (int u = 0; u < 16; ++u) l += s[u] != -INFINITY ? expf(s[u] - mx) : 0.0f;
            }
            l += __shfl_xor_sync(0xffffffffu, l, 1);
            l += __shfl_xor_sync(0xffffffffu, l, 2);
            if (quad == 0 && row < rows) {
              const std::int64_t at =
                  static_cast<std::int64_t>(kv_head * rows + row) * p.tiles + tile;
              p.tile_max[at] = mx;
              p.tile_sum[at] = l;
            }
          }
      } else {
        // Probabilities exp(s - max) / sum, the division as the correctly rounded quotient
        // (Markstein: q0 = e * (1 / sum), then one fma residual step), rounded, staged [row, key].
#pragma unroll
        for (int m = 0; m < 2; ++m)
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const int local = warp * kWarpRows + m * 16 + h * 8 + g;
#pragma unroll
            for (int n = 0; n < 8; ++n) {
              float prob[2];
#pragma unroll
              for (int e = 0; e < 2; ++e) {
                const float score = __fmul_rn(acc[m][n][2 * h + e], p.scale);
                const float x = expf(score - row_max[m][h]);
                const float q0 = __fmul_rn(x, row_inverse[m][h]);
                prob[e] = fmaf(fmaf(-q0, row_sum[m][h], x), row_inverse[m][h], q0);
              }
              if constexpr (kRounding == 0) {
                *reinterpret_cast<float2*>(staged + local * kWords + n * 8 + 2 * quad) =
                    make_float2(prob[0], prob[1]);
              } else {
                staged[local * kWords + n * 4 + quad] = pack_rounded<kRounding>(prob[0], prob[1]);
              }
            }
          }
        const int chunk_rows = min(rows - chunk_row, kChunkRows);
        if (p.warp_fold) {
          // Each warp sums its own rows (whole query heads): lane = keys 2 lane, 2 lane + 1.
          __syncwarp();
          const int warp_row = warp * kWarpRows;
          if (warp_row < chunk_rows) {
            float sum0 = 0.0f, sum1 = 0.0f;
            int i = 0, slot = warp_row / p.window;
#pragma unroll
            for (int r = 0; r < kWarpRows; ++r) {
              if (warp_row + r < chunk_rows) {
                float2 v;
                if constexpr (kRounding == 0) {
                  v = *reinterpret_cast<const float2*>(staged + (warp_row + r) * kWords + 2 * lane);
                } else {
                  v = unpack_rounded<kRounding>(staged[(warp_row + r) * kWords + lane]);
                }
                sum0 += v.x;
                sum1 += v.y;
                if (++i == p.window) {
                  const float div = static_cast<float>(p.window);
                  *reinterpret_cast<float2*>(head_scores + slot * kTileKeys + 2 * lane) =
                      p.mean_rows ? make_float2(sum0 / div, sum1 / div) : make_float2(sum0, sum1);
                  sum0 = sum1 = 0.0f;
                  i = 0;
                  ++slot;
                }
              }
            }
          }
          __syncthreads();
          const int heads = chunk_rows / p.window, first_head = chunk_row / p.window;
          if (p.per_query_head) {
            for (int e = threadIdx.x; e < heads * kTileKeys; e += kThreads) {
              const int key = first_key + e % kTileKeys;
              const int q_head = kv_head * p.group + first_head + e / kTileKeys;
              if (key < p.prefix)
                p.reduced[static_cast<std::int64_t>(q_head) * p.prefix + key] = head_scores[e];
            }
          } else if (threadIdx.x < kTileKeys) {
            for (int s = 0; s < heads; ++s) group_sum += head_scores[s * kTileKeys + threadIdx.x];
          }
        } else {
          // Any W: one thread per key walks the chunk's rows in order.
          __syncthreads();
          const int key = first_key + threadIdx.x;
          if (threadIdx.x < kTileKeys && key < p.prefix) {
            int i = chunk_row % p.window, head = chunk_row / p.window;
            for (int r = 0; r < chunk_rows; ++r) {
              if constexpr (kRounding == 0) {
                head_sum += reinterpret_cast<const float*>(staged)[r * kWords + threadIdx.x];
              } else {
                const std::uint32_t word = staged[r * kWords + threadIdx.x / 2];
                const float2 v = unpack_rounded<kRounding>(word);
                head_sum += threadIdx.x % 2 ? v.y : v.x;
              }
              if (++i == p.window) {  // the query head's last window row
                const float head_score =
                    p.mean_rows ? head_sum / static_cast<float>(p.window) : head_sum;
                if (p.per_query_head) {
                  const int q_head = kv_head * p.group + head;
                  p.reduced[static_cast<std::int64_t>(q_head) * p.prefix + key] = head_score;
                } else {
                  group_sum += head_score;
                }
                head_sum = 0.0f;
                i = 0;
                ++head;
              }
            }
          }
        }
      }
    }
    if (kSecond && !p.per_query_head && threadIdx.x < kTileKeys &&
        first_key + static_cast<int>(threadIdx.x) < p.prefix)
      p.reduced[static_cast<std::int64_t>(kv_head) * p.prefix + first_key + threadIdx.x] =
          group_sum / static_cast<float>(p.group);
    __syncthreads();  // the next tile's prefetch reuses this stage; staged rows are rewritten
  }
}

// One warp per window row: combines the tiles' (max, sum) into the row's softmax statistics.
__global__ void merge_rows_kernel(const float* tile_max, const float* tile_sum, float* row_max,
                                  float* row_sum, int rows, int tiles) {
  const int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
  if (row >= rows) return;
  const float* maxima = tile_max + static_cast<std::int64_t>(row) * tiles;
  const float* sums = tile_sum + static_cast<std::int64_t>(row) * tiles;
  float m = -INFINITY;
  for (int t = lane; t < tiles; t += 32) m = fmaxf(m, maxima[t]);
  m = warp_max(m);
  float l = 0.0f;
  for (int t = lane; t < tiles; t += 32)
    if (maxima[t] != -INFINITY) l += sums[t] * expf(maxima[t] - m);
  l = warp_sum(l);
  if (lane == 0) {
    row_max[row] = m;
    row_sum[row] = l;
  }
}

// Stride 1, padding kernel / 2, the reference's order of operations (P2).
__global__ void pool_kernel(const float* in, float* out, std::int64_t out_row,
                            std::int64_t out_column, int rows, int n, int kernel, bool max_pool) {
  const std::int64_t idx = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= static_cast<std::int64_t>(rows) * n) return;
  const int r = static_cast<int>(idx / n), i = static_cast<int>(idx % n);
  const int radius = kernel / 2;
  const int begin = max(i - radius, 0), end = min(i + radius + 1, n);
  const float* row = in + static_cast<std::int64_t>(r) * n;
  float result;
  if (max_pool) {
    result = -INFINITY;
    for (int j = begin; j < end; ++j) result = fmaxf(result, row[j]);
  } else {
    float sum = 0.0f;
    for (int j = begin; j < end; ++j) sum += row[j];
    result = sum / static_cast<float>(kernel);
  }
  out[r * out_row + i * out_column] = result;
}

struct ScoreLayout {
  int tiles = 0, rows = 0, prefix = 0;
  std::size_t bytes = 0;
};

ScoreLayout score_layout(int q_heads, int window, int tokens, int storage_heads) {
  ScoreLayout layout;
  layout.tiles = (tokens + kTileKeys - 1) / kTileKeys;
  layout.rows = q_heads * window;
  layout.prefix = tokens - window;
  const std::size_t partials = static_cast<std::size_t>(layout.rows) * layout.tiles;
  layout.bytes = 2 * align_up(partials * sizeof(float)) +
                 2 * align_up(static_cast<std::size_t>(layout.rows) * sizeof(float)) +
                 align_up(static_cast<std::size_t>(storage_heads) * std::max(layout.prefix, 0) *
                          sizeof(float));
  return layout;
}

using HeadDims = ValueList<64, 128>;

template <class Storage>
void run_scores(Cuda stream, DeviceView<const Storage, 3> q, DeviceView<const Storage, 3> k,
                int kernel, Pool pool, DeviceView<float, 2> pooled,
                DeviceView<std::byte, 1> workspace, const WindowScoreOptions& options) {
  using Native = typename NativeOf<Storage>::type;
  const std::int64_t hq = q.size(0), w = q.size(1), d = q.size(2);
  const std::int64_t hkv = k.size(0), t = k.size(1);
  KVC_CHECK(hkv >= 1 && hq >= 1 && hq % hkv == 0, "snapkv_scores(cuda): Hq = ", hq,
            " must be a positive multiple of Hkv = ", hkv);
  KVC_CHECK(k.size(2) == d, "snapkv_scores(cuda): k has D = ", k.size(2),
            " but q_window has D = ", d, "; D must be equal");
  KVC_CHECK(w >= 1 && w <= t, "snapkv_scores(cuda): window W = ", w, " with T = ", t,
            " tokens; need 1 <= W <= T");
  KVC_CHECK(t <= std::numeric_limits<std::int32_t>::max() / 2, "snapkv_scores(cuda): T = ", t,
            " tokens; allowed up to ", std::numeric_limits<std::int32_t>::max() / 2);
  const std::int64_t s = pooled.size(0), prefix = t - w;
  KVC_CHECK((s == hkv || s == hq) && pooled.size(1) == prefix,
            "snapkv_scores(cuda): pooled has shape [", s, ", ", pooled.size(1),
            "]; expected [S, T - W] with S = Hkv = ", hkv, " (group mean) or Hq = ", hq,
            " (per query head) and T - W = ", prefix);
  KVC_CHECK(kernel >= 1 && kernel % 2 == 1, "snapkv_scores(cuda): kernel = ", kernel,
            " is not allowed; the kernel must be odd and >= 1 (1, 3, 5, ...)");
  KVC_CHECK(pool == Pool::avg || pool == Pool::max,
            "snapkv_scores(cuda): pool = ", static_cast<int>(pool),
            " is not a Pool; allowed: avg, max");
  KVC_CHECK(options.reduction == ScoreReduction::sum || options.reduction == ScoreReduction::mean,
            "snapkv_scores(cuda): reduction = ", static_cast<int>(options.reduction),
            " is not a ScoreReduction; allowed: sum, mean");
  KVC_CHECK(options.rounding == ProbabilityRounding::none ||
                options.rounding == ProbabilityRounding::f16 ||
                options.rounding == ProbabilityRounding::bf16,
            "snapkv_scores(cuda): rounding = ", static_cast<int>(options.rounding),
            " is not a ProbabilityRounding; allowed: none, f16, bf16");
  KVC_CHECK(std::isfinite(options.scale) && options.scale >= 0.0f,
            "snapkv_scores(cuda): scale = ", options.scale,
            " is not allowed; use a finite scale > 0, or 0 for 1/sqrt(D)");
  KVC_CHECK(q.strides[2] == 1 && k.strides[2] == 1,
            "snapkv_scores(cuda): the head_dim axis must be contiguous (stride 1)");
  KVC_CHECK(cuda_detail::rows_aligned16(q.data, {q.strides[0], q.strides[1]}) &&
                cuda_detail::rows_aligned16(k.data, {k.strides[0], k.strides[1]}),
            "snapkv_scores(cuda): q_window and k rows must start on 16-byte boundaries (pointers "
            "aligned to 16 bytes, strides multiples of 8 elements)");
  const ScoreLayout layout = score_layout(static_cast<int>(hq), static_cast<int>(w),
                                          static_cast<int>(t), static_cast<int>(s));
  KVC_CHECK(static_cast<std::size_t>(workspace.size(0)) >= layout.bytes,
            "snapkv_scores(cuda): workspace has ", workspace.size(0), " bytes, needs ",
            layout.bytes, " (snapkv_scores_workspace_bytes)");
  dispatch<HeadDims>(static_cast<int>(d), "snapkv_scores(cuda): head_dim", [](auto) {});
  if (prefix == 0) return;

  Carver carve{workspace.data};
  const std::size_t partials = static_cast<std::size_t>(layout.rows) * layout.tiles;
  ScoreParams<Native> p;
  p.q = reinterpret_cast<const Native*>(q.data);
  p.k = reinterpret_cast<const Native*>(k.data);
  p.q_head = q.strides[0], p.q_row = q.strides[1];
  p.k_head = k.strides[0], p.k_token = k.strides[1];
  p.tile_max = carve.take<float>(partials);
  p.tile_sum = carve.take<float>(partials);
  p.row_max = carve.take<float>(layout.rows);
  p.row_sum = carve.take<float>(layout.rows);
  p.reduced = carve.take<float>(static_cast<std::size_t>(s) * prefix);
  p.window = static_cast<int>(w);
  p.tokens = static_cast<int>(t);
  p.prefix = static_cast<int>(prefix);
  p.tiles = layout.tiles;
  p.group = static_cast<int>(hq / hkv);
  p.per_query_head = s == hq;
  p.mean_rows = options.reduction == ScoreReduction::mean;
  p.warp_fold = w >= 8 && 32 % w == 0;
  p.scale = options.scale == 0.0f ? 1.0f / std::sqrt(static_cast<float>(d)) : options.scale;
  p.prefix_tiles = (p.prefix + kTileKeys - 1) / kTileKeys;
  const int rounding = options.rounding == ProbabilityRounding::f16    ? 1
                       : options.rounding == ProbabilityRounding::bf16 ? 2
                                                                       : 0;

  // Tiles per block: one wave of resident blocks (3 per SM in pass 1, 2 in pass 2) over all heads.
  int device = 0, sms = 0;
  KVC_CUDA_CHECK(cudaGetDevice(&device));
  KVC_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  const auto tiles_per_block = [&](int tiles, int per_sm) {
    const std::int64_t slots = std::max<std::int64_t>(1, std::int64_t{sms} * per_sm);
    return static_cast<int>(std::max<std::int64_t>(1, (tiles * hkv + slots - 1) / slots));
  };
  cudaStream_t native_stream = stream.stream;
  dispatch<HeadDims>(static_cast<int>(d), "snapkv_scores(cuda): head_dim", [&](auto head_dim) {
    constexpr int kD = decltype(head_dim)::value;
    auto* first = window_kernel<Native, kD, false, 0>;
    constexpr std::size_t kFirstShared = window_shared_bytes<kD, false, 0>();
    cuda_detail::allow_dynamic_shared_memory(first, static_cast<int>(kFirstShared));
    p.tiles_per_block = tiles_per_block(layout.tiles, 3);
    const int first_blocks = (layout.tiles + p.tiles_per_block - 1) / p.tiles_per_block;
    first<<<dim3(first_blocks, static_cast<unsigned>(hkv)), kThreads, kFirstShared,
            native_stream>>>(p);
    KVC_CUDA_CHECK_LAUNCH(native_stream);
    merge_rows_kernel<<<(layout.rows + 7) / 8, 256, 0, native_stream>>>(
        p.tile_max, p.tile_sum, p.row_max, p.row_sum, layout.rows, layout.tiles);
    KVC_CUDA_CHECK_LAUNCH(native_stream);
    p.tiles_per_block = tiles_per_block(p.prefix_tiles, 2);
    const int second_blocks = (p.prefix_tiles + p.tiles_per_block - 1) / p.tiles_per_block;
    dispatch<ValueList<0, 1, 2>>(rounding, "snapkv_scores(cuda): rounding", [&](auto mode) {
      constexpr int kRounding = decltype(mode)::value;
      auto* second = window_kernel<Native, kD, true, kRounding>;
      constexpr std::size_t kShared = window_shared_bytes<kD, true, kRounding>();
      cuda_detail::allow_dynamic_shared_memory(second, static_cast<int>(kShared));
      second<<<dim3(second_blocks, static_cast<unsigned>(hkv)), kThreads, kShared, native_stream>>>(
          p);
      KVC_CUDA_CHECK_LAUNCH(native_stream);
    });
  });
  const std::int64_t total = s * prefix;
  pool_kernel<<<static_cast<unsigned>((total + 255) / 256), 256, 0, native_stream>>>(
      p.reduced, pooled.data, pooled.strides[0], pooled.strides[1], static_cast<int>(s), p.prefix,
      kernel, pool == Pool::max);
  KVC_CUDA_CHECK_LAUNCH(native_stream);
}

// ---- top-k -------------------------------------------------------------------------------------

// Ascending order of the result = descending score; -0 is +0, NaN ranks last.
__device__ inline std::uint32_t descending_bits(float x) {
  if (isnan(x)) return 0xFFFFFFFFu;
  if (x == 0.0f) return 0x7FFFFFFFu;  // +0 and -0 alike
  const std::uint32_t u = __float_as_uint(x);
  const std::uint32_t ascending = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
  return ~ascending;
}

constexpr int kSelectThreads = 512;

struct SelectParams {
  const float* scores;
  std::int64_t row_stride, column_stride;
  std::int32_t* indices;
  std::int64_t index_row, index_column;
  int n, k, tail_first, tail;
};

// Warp 0's step of the radix select: `bins` (shared memory) counts each digit among the keys still
// matching `prefix`; lane l takes digits 8l .. 8l + 7. Finds the digit holding the remaining-th
// smallest key and stores the prefix extended by it and the rank left within it (exactly one lane
// stores).
__device__ inline void choose_digit(const unsigned* bins, int lane, unsigned prefix, int shift,
                                    unsigned remaining, unsigned& chosen_prefix,
                                    unsigned& chosen_remaining) {
  unsigned counts[8], local = 0;
#pragma unroll
  for (int b = 0; b < 8; ++b) {
    counts[b] = bins[lane * 8 + b];
    local += counts[b];
  }
  unsigned inclusive = local;
#pragma unroll
  for (int offset = 1; offset < 32; offset *= 2) {
    const unsigned other = __shfl_up_sync(0xffffffffu, inclusive, offset);
    if (lane >= offset) inclusive += other;
  }
  unsigned before = inclusive - local;
  if (before < remaining && remaining <= inclusive) {
    for (int b = 0; b < 8; ++b) {
      if (before + counts[b] >= remaining) {
        chosen_prefix = prefix | (static_cast<unsigned>(lane * 8 + b) << shift);
        chosen_remaining = remaining - before;
        return;
      }
      before += counts[b];
    }
  }
}

// One block per row: a radix select on the 32-bit descending keys (four 8-bit digits, most
// significant first) finds the k-th key; then each thread takes a contiguous run of positions and
// one block scan of (better, equal) counts places the survivors in ascending position, the equal
// keys going to the lowest positions. Keys are recomputed from the scores on every pass: the row
// stays in L1/L2, and nothing else needs memory.
__global__ void __launch_bounds__(kSelectThreads) radix_select_kernel(SelectParams p) {
  using Scan = cub::BlockScan<unsigned long long, kSelectThreads>;
  __shared__ typename Scan::TempStorage scan_storage;
  __shared__ unsigned histogram[256];
  __shared__ unsigned chosen_prefix, chosen_remaining;
  const int r = blockIdx.x, lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const float* row = p.scores + r * p.row_stride;
  std::int32_t* out = p.indices + r * p.index_row;
  for (int t = threadIdx.x; t < p.tail; t += kSelectThreads)
    out[static_cast<std::int64_t>(p.k + t) * p.index_column] = p.tail_first + t;
  if (p.k == 0) return;

  unsigned prefix = 0, mask = 0, remaining = static_cast<unsigned>(p.k);
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int b = threadIdx.x; b < 256; b += kSelectThreads) histogram[b] = 0;
    __syncthreads();
    for (int j = threadIdx.x; j < p.n; j += kSelectThreads) {
      const unsigned key = descending_bits(row[j * p.column_stride]);
      if ((key & mask) == prefix) {
        const unsigned digit = (key >> shift) & 0xFFu;
        // Scores cluster in a few digits: one atomic per distinct digit of the warp.
        const unsigned peers = __match_any_sync(__activemask(), digit);
        if (lane == __ffs(peers) - 1) atomicAdd(&histogram[digit], __popc(peers));
      }
    }
    __syncthreads();
    if (warp == 0)  // the digit holding the remaining-th smallest key
      choose_digit(histogram, lane, prefix, shift, remaining, chosen_prefix, chosen_remaining);
    __syncthreads();
    prefix = chosen_prefix;
    remaining = chosen_remaining;
    mask |= 0xFFu << shift;
  }
  // prefix is now the k-th smallest key; take every smaller key and the first `remaining` equal.
  const int per_thread = (p.n + kSelectThreads - 1) / kSelectThreads;
  const int begin = min(p.n, static_cast<int>(threadIdx.x) * per_thread);
  const int end = min(p.n, begin + per_thread);
  unsigned better = 0, equal = 0;
  for (int j = begin; j < end; ++j) {
    const unsigned key = descending_bits(row[j * p.column_stride]);
    better += key < prefix;
    equal += key == prefix;
  }
  unsigned long long before = 0;
  Scan(scan_storage).ExclusiveSum((static_cast<unsigned long long>(better) << 32) | equal, before);
  unsigned equal_before = static_cast<unsigned>(before & 0xFFFFFFFFu);
  std::int64_t slot = static_cast<std::int64_t>(before >> 32) + min(equal_before, remaining);
  for (int j = begin; j < end; ++j) {
    const unsigned key = descending_bits(row[j * p.column_stride]);
    bool take = key < prefix;
    if (key == prefix) take = equal_before++ < remaining;
    if (take) out[slot++ * p.index_column] = j;
  }
}

// Rows of up to kClusterBlocks * kClusterThreads * kClusterItems scores: the same select spread
// over a thread-block cluster of 8 blocks per row. Each thread holds a contiguous run of positions
// in registers (read once); each block builds the digit histogram of its segment, every block sums
// the 8 histograms through distributed shared memory and picks the digit itself (double-buffered
// histograms: one cluster barrier per digit), and the survivors' slots add the counts of the
// lower-ranked blocks to the block scan.
constexpr int kClusterBlocks = 8;
constexpr int kClusterThreads = 512;
static_assert(kClusterThreads >= 256, "one thread per histogram bin");
constexpr int kClusterItems = 32;

__global__ void __cluster_dims__(kClusterBlocks, 1, 1) __launch_bounds__(kClusterThreads)
    radix_select_cluster_kernel(SelectParams p) {
  namespace cg = cooperative_groups;
  cg::cluster_group cluster = cg::this_cluster();
  using Scan = cub::BlockScan<unsigned long long, kClusterThreads>;
  __shared__ typename Scan::TempStorage scan_storage;
  __shared__ unsigned histogram[2][256];
  __shared__ unsigned summed[256];            // this digit's histogram over the whole cluster
  __shared__ unsigned long long block_total;  // (better << 32) | equal of this block's segment
  __shared__ unsigned chosen_prefix, chosen_remaining;
  const int rank = static_cast<int>(cluster.block_rank());
  const int r = blockIdx.y, lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const float* row = p.scores + r * p.row_stride;
  std::int32_t* out = p.indices + r * p.index_row;
  for (int t = rank * kClusterThreads + threadIdx.x; t < p.tail;
       t += kClusterBlocks * kClusterThreads)
    out[static_cast<std::int64_t>(p.k + t) * p.index_column] = p.tail_first + t;
  if (p.k == 0) return;  // the whole cluster returns

  const int segment = (p.n + kClusterBlocks - 1) / kClusterBlocks;    // positions per block
  const int per = (segment + kClusterThreads - 1) / kClusterThreads;  // <= kClusterItems
  const int segment_end = min(p.n, (rank + 1) * segment);
  const int begin = rank * segment + static_cast<int>(threadIdx.x) * per;
  const int count = max(0, min(per, segment_end - begin));  // this thread's positions
  unsigned keys[kClusterItems];
#pragma unroll
  for (int u = 0; u < kClusterItems; ++u)
    keys[u] = u < count ? descending_bits(row[(begin + u) * p.column_stride]) : 0xFFFFFFFFu;

  unsigned prefix = 0, mask = 0, remaining = static_cast<unsigned>(p.k);
  int parity = 0;
  for (int shift = 24; shift >= 0; shift -= 8, parity ^= 1) {
    unsigned* local = histogram[parity];
    for (int b = threadIdx.x; b < 256; b += kClusterThreads) local[b] = 0;
    __syncthreads();
#pragma unroll
    for (int u = 0; u < kClusterItems; ++u) {
      if (u < count && (keys[u] & mask) == prefix) {
        const unsigned digit = (keys[u] >> shift) & 0xFFu;
        const unsigned peers = __match_any_sync(__activemask(), digit);
        if (lane == __ffs(peers) - 1) atomicAdd(&local[digit], __popc(peers));
      }
    }
    cluster.sync();  // every block's histogram of this digit is complete
    // Bin b summed over the cluster by thread b: its 8 remote loads are in flight together (warp
    // 0 alone reading all 8 x 256 bins kept the other warps waiting at the barrier).
    if (threadIdx.x < 256) {
      unsigned total = 0;
#pragma unroll
      for (int q = 0; q < kClusterBlocks; ++q)
        total += cluster.map_shared_rank(local, q)[threadIdx.x];
      summed[threadIdx.x] = total;
    }
    __syncthreads();
    if (warp == 0)  // the digit holding the remaining-th smallest key, over the whole row
      choose_digit(summed, lane, prefix, shift, remaining, chosen_prefix, chosen_remaining);
    __syncthreads();
    prefix = chosen_prefix;
    remaining = chosen_remaining;
    mask |= 0xFFu << shift;
    // The other parity's histograms are cleared next digit; they were last read before this
    // digit's cluster barrier, so one barrier per digit suffices.
  }
  unsigned better = 0, equal = 0;
#pragma unroll
  for (int u = 0; u < kClusterItems; ++u) {
    better += u < count && keys[u] < prefix;
    equal += u < count && keys[u] == prefix;
  }
  unsigned long long before = 0, total = 0;
  Scan(scan_storage)
      .ExclusiveSum((static_cast<unsigned long long>(better) << 32) | equal, before, total);
  if (threadIdx.x == 0) block_total = total;
  cluster.sync();
  for (int q = 0; q < rank; ++q) before += *cluster.map_shared_rank(&block_total, q);
  unsigned equal_before = static_cast<unsigned>(before & 0xFFFFFFFFu);
  std::int64_t slot = static_cast<std::int64_t>(before >> 32) + min(equal_before, remaining);
#pragma unroll
  for (int u = 0; u < kClusterItems; ++u) {
    if (u < count) {
      bool take = keys[u] < prefix;
      if (keys[u] == prefix) take = equal_before++ < remaining;
      if (take) out[slot++ * p.index_column] = begin + u;
    }
  }
  cluster.sync();  // the other blocks may still read block_total
}

void check_top_k_shape(std::int64_t rows, std::int64_t n, int k, const char* who) {
  KVC_CHECK(k >= 0 && k <= n, who, ": k = ", k, " is out of range; need 0 <= k <= n = ", n);
  KVC_CHECK(n <= std::numeric_limits<std::int32_t>::max() && rows <= 0x7FFFFFFF, who,
            ": rows = ", rows, ", n = ", n, "; allowed up to ",
            std::numeric_limits<std::int32_t>::max());
}

// top_k with an optional tail of consecutive indices after the k survivors of each row.
void run_top_k(Cuda stream, DeviceView<const float, 2> scores, int k,
               DeviceView<std::int32_t, 2> indices, int tail_first, int tail, const char* who) {
  const std::int64_t rows = scores.size(0), n = scores.size(1);
  check_top_k_shape(rows, n, k, who);
  KVC_CHECK(indices.size(0) == rows && indices.size(1) == k + tail, who, ": indices has shape [",
            indices.size(0), ", ", indices.size(1), "]; expected [rows, k] = [", rows, ", ",
            k + tail, "]");
  if (rows == 0 || k + tail == 0) return;
  SelectParams p{scores.data,         scores.strides[0],
                 scores.strides[1],   indices.data,
                 indices.strides[0],  indices.strides[1],
                 static_cast<int>(n), k,
                 tail_first,          tail};
  if (n <= std::int64_t{kClusterBlocks} * kClusterThreads * kClusterItems && rows <= 65535)
    radix_select_cluster_kernel<<<dim3(kClusterBlocks, static_cast<unsigned>(rows)),
                                  kClusterThreads, 0, stream.stream>>>(p);
  else
    radix_select_kernel<<<static_cast<unsigned>(rows), kSelectThreads, 0, stream.stream>>>(p);
  KVC_CUDA_CHECK_LAUNCH(stream.stream);
}

template <class Storage>
void run_select(Cuda stream, DeviceView<const Storage, 3> q, DeviceView<const Storage, 3> k,
                int selected, int kernel, Pool pool, DeviceView<std::int32_t, 2> keep,
                DeviceView<std::byte, 1> workspace, const WindowScoreOptions& options) {
  const std::int64_t hq = q.size(0), w = q.size(1), t = k.size(1), s = keep.size(0);
  KVC_CHECK(w >= 1 && w <= t, "snapkv_select(cuda): window W = ", w, " with T = ", t,
            " tokens; need 1 <= W <= T");
  KVC_CHECK(selected >= 0 && selected <= t - w, "snapkv_select(cuda): selects ", selected,
            " prefix tokens, allowed range [0, T - W = ", t - w, "]");
  KVC_CHECK(keep.size(1) == selected + w, "snapkv_select(cuda): keep has ", keep.size(1),
            " columns; expected selected + W = ", selected + w);
  const std::size_t needed =
      snapkv_select_workspace_bytes(static_cast<int>(hq), static_cast<int>(w), static_cast<int>(t),
                                    static_cast<int>(s), selected);
  KVC_CHECK(static_cast<std::size_t>(workspace.size(0)) >= needed,
            "snapkv_select(cuda): workspace has ", workspace.size(0), " bytes, needs ", needed,
            " (snapkv_select_workspace_bytes)");
  Carver carve{workspace.data};
  const std::int64_t prefix = t - w;
  float* pooled = carve.take<float>(static_cast<std::size_t>(s * prefix));
  const ScoreLayout score = score_layout(static_cast<int>(hq), static_cast<int>(w),
                                         static_cast<int>(t), static_cast<int>(s));
  std::byte* score_workspace = carve.take<std::byte>(score.bytes);
  const auto pooled_view = make_device_view(pooled, {s, prefix});
  run_scores<Storage>(stream, q, k, kernel, pool, pooled_view,
                      make_device_view(score_workspace, {static_cast<std::int64_t>(score.bytes)}),
                      options);
  run_top_k(stream, pooled_view, selected, keep, static_cast<int>(prefix), static_cast<int>(w),
            "snapkv_select(cuda)");
}

// ---- compaction --------------------------------------------------------------------------------

template <class T>
struct CompactParams {
  const std::int32_t* keep;
  const std::int32_t* counts;
  const T* k;
  const T* v;
  T* k_out;
  T* v_out;
  const std::int32_t* positions;
  std::int32_t* positions_out;
  const float* scores;
  float* scores_out;
  std::int64_t keep_row, keep_column;
  std::int64_t k_head, k_token, v_head, v_token;
  std::int64_t k_out_head, k_out_token, v_out_head, v_out_token;
  std::int64_t positions_head, positions_token, positions_out_head, positions_out_token;
  std::int64_t scores_head, scores_token, scores_out_head, scores_out_token;
  int heads, storage_heads, tokens, kept, vectors, scored;
};

// One thread per 16-byte vector of a kept row, K and V together.
template <class T>
__global__ void compact_kernel(CompactParams<T> p) {
  const std::int64_t idx = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int s = blockIdx.y;
  const int i = static_cast<int>(idx / p.vectors), vector = static_cast<int>(idx % p.vectors);
  if (i >= p.kept) return;
  const int count = p.counts == nullptr ? p.kept : min(max(p.counts[s], 0), p.kept);
  if (i >= count) return;
  const int source = p.keep[s * p.keep_row + i * p.keep_column];
  const int head = static_cast<int>(static_cast<std::int64_t>(s) * p.heads / p.storage_heads);
  const bool valid = source >= 0 && source < p.tokens;
  const uint4 nan_bits = make_uint4(0xFFFFFFFFu, 0xFFFFFFFFu, 0xFFFFFFFFu, 0xFFFFFFFFu);
  const uint4 key =
      valid ? load16(p.k + head * p.k_head + source * p.k_token + vector * 8) : nan_bits;
  const uint4 value =
      valid ? load16(p.v + head * p.v_head + source * p.v_token + vector * 8) : nan_bits;
  *reinterpret_cast<uint4*>(p.k_out + s * p.k_out_head + i * p.k_out_token + vector * 8) = key;
  *reinterpret_cast<uint4*>(p.v_out + s * p.v_out_head + i * p.v_out_token + vector * 8) = value;
  if (vector == 0) {
    if (p.positions_out != nullptr) {
      p.positions_out[s * p.positions_out_head + i * p.positions_out_token] =
          !valid ? -1
          : p.positions != nullptr
              ? p.positions[head * p.positions_head + source * p.positions_token]
              : source;
    }
    if (p.scores_out != nullptr)
      p.scores_out[s * p.scores_out_head + i * p.scores_out_token] =
          valid && source < p.scored ? p.scores[s * p.scores_head + source * p.scores_token]
                                     : INFINITY;
  }
}

template <class Storage>
void run_compact(Cuda stream, DeviceView<const std::int32_t, 2> keep,
                 DeviceView<const std::int32_t, 1> counts, DeviceView<const Storage, 3> k,
                 DeviceView<const Storage, 3> v, DeviceView<Storage, 3> k_out,
                 DeviceView<Storage, 3> v_out, const CompactSide& side) {
  using Native = typename NativeOf<Storage>::type;
  const std::int64_t s = keep.size(0), kept = keep.size(1);
  const std::int64_t h = k.size(0), t = k.size(1), d = k.size(2);
  KVC_CHECK(v.size(0) == h && v.size(1) == t && v.size(2) == d, "compact_rows(cuda): v has shape [",
            v.size(0), ", ", v.size(1), ", ", v.size(2), "]; expected k's [", h, ", ", t, ", ", d,
            "]");
  KVC_CHECK(h >= 1 && s >= 1 && s % h == 0, "compact_rows(cuda): keep has S = ", s,
            " rows for H = ", h, " heads; S must be a positive multiple of H");
  for (const auto& out : {k_out, v_out})
    KVC_CHECK(out.size(0) == s && out.size(1) == kept && out.size(2) == d,
              "compact_rows(cuda): outputs have shape [", out.size(0), ", ", out.size(1), ", ",
              out.size(2), "]; expected [S, Kmax, D] = [", s, ", ", kept, ", ", d, "]");
  KVC_CHECK(counts.data == nullptr || counts.size(0) == s, "compact_rows(cuda): counts has ",
            counts.size(0), " entries; expected S = ", s, " (or an empty view)");
  KVC_CHECK(d % 8 == 0 && k.strides[2] == 1 && v.strides[2] == 1 && k_out.strides[2] == 1 &&
                v_out.strides[2] == 1,
            "compact_rows(cuda): D = ", d,
            " must be a multiple of 8 with the head_dim axis contiguous (stride 1)");
  KVC_CHECK(cuda_detail::rows_aligned16(k.data, {k.strides[0], k.strides[1]}) &&
                cuda_detail::rows_aligned16(v.data, {v.strides[0], v.strides[1]}) &&
                cuda_detail::rows_aligned16(k_out.data, {k_out.strides[0], k_out.strides[1]}) &&
                cuda_detail::rows_aligned16(v_out.data, {v_out.strides[0], v_out.strides[1]}),
            "compact_rows(cuda): K/V rows must start on 16-byte boundaries (pointers aligned to 16 "
            "bytes, strides multiples of 8 elements)");
  KVC_CHECK(t <= std::numeric_limits<std::int32_t>::max(), "compact_rows(cuda): T = ", t,
            " tokens; allowed up to ", std::numeric_limits<std::int32_t>::max());
  const bool positions_out = side.positions_out.data != nullptr;
  KVC_CHECK(side.positions.data == nullptr || positions_out,
            "compact_rows(cuda): positions given without positions_out");
  if (positions_out)
    KVC_CHECK(side.positions_out.size(0) == s && side.positions_out.size(1) == kept,
              "compact_rows(cuda): positions_out has shape [", side.positions_out.size(0), ", ",
              side.positions_out.size(1), "]; expected [S, Kmax] = [", s, ", ", kept, "]");
  if (side.positions.data != nullptr)
    KVC_CHECK(side.positions.size(0) == h && side.positions.size(1) == t,
              "compact_rows(cuda): positions has shape [", side.positions.size(0), ", ",
              side.positions.size(1), "]; expected [H, T] = [", h, ", ", t, "]");
  const bool scores_out = side.scores_out.data != nullptr;
  KVC_CHECK((side.scores.data == nullptr) == !scores_out,
            "compact_rows(cuda): scores and scores_out must be given together");
  if (scores_out)
    KVC_CHECK(
        side.scores.size(0) == s && side.scores_out.size(0) == s && side.scores_out.size(1) == kept,
        "compact_rows(cuda): scores must be [S, n] and scores_out [S, Kmax] with S = ", s,
        ", Kmax = ", kept);
  if (kept == 0) return;

  CompactParams<Native> p{};
  p.keep = keep.data;
  p.counts = counts.data;
  p.k = reinterpret_cast<const Native*>(k.data);
  p.v = reinterpret_cast<const Native*>(v.data);
  p.k_out = reinterpret_cast<Native*>(k_out.data);
  p.v_out = reinterpret_cast<Native*>(v_out.data);
  p.positions = side.positions.data;
  p.positions_out = side.positions_out.data;
  p.scores = side.scores.data;
  p.scores_out = side.scores_out.data;
  p.keep_row = keep.strides[0], p.keep_column = keep.strides[1];
  p.k_head = k.strides[0], p.k_token = k.strides[1];
  p.v_head = v.strides[0], p.v_token = v.strides[1];
  p.k_out_head = k_out.strides[0], p.k_out_token = k_out.strides[1];
  p.v_out_head = v_out.strides[0], p.v_out_token = v_out.strides[1];
  p.positions_head = side.positions.strides[0], p.positions_token = side.positions.strides[1];
  p.positions_out_head = side.positions_out.strides[0];
  p.positions_out_token = side.positions_out.strides[1];
  p.scores_head = side.scores.strides[0], p.scores_token = side.scores.strides[1];
  p.scores_out_head = side.scores_out.strides[0], p.scores_out_token = side.scores_out.strides[1];
  p.heads = static_cast<int>(h);
  p.storage_heads = static_cast<int>(s);
  p.tokens = static_cast<int>(t);
  p.kept = static_cast<int>(kept);
  p.vectors = static_cast<int>(d / 8);
  p.scored = scores_out ? static_cast<int>(side.scores.size(1)) : 0;
  const std::int64_t per_head = kept * p.vectors;
  const dim3 grid(static_cast<unsigned>((per_head + 255) / 256), static_cast<unsigned>(s));
  compact_kernel<Native><<<grid, 256, 0, stream.stream>>>(p);
  KVC_CUDA_CHECK_LAUNCH(stream.stream);
}

// ---- gather of byte rows -----------------------------------------------------------------------

// One thread per unit (4 bytes when rows, strides and pointers allow, else 1 byte) of a kept row.
template <class Unit>
__global__ void gather_rows_kernel(const std::int32_t* keep, std::int64_t keep_row,
                                   std::int64_t keep_column, const std::int32_t* counts,
                                   const Unit* src, std::int64_t src_head, std::int64_t src_row,
                                   Unit* dst, std::int64_t dst_head, std::int64_t dst_row,
                                   int tokens, int kept, int units) {
  const std::int64_t idx = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int s = blockIdx.y;
  const int i = static_cast<int>(idx / units), unit = static_cast<int>(idx % units);
  if (i >= kept) return;
  const int count = counts == nullptr ? kept : min(max(counts[s], 0), kept);
  if (i >= count) return;
  const int source = keep[s * keep_row + i * keep_column];
  const bool valid = source >= 0 && source < tokens;
  dst[s * dst_head + i * dst_row + unit] =
      valid ? src[s * src_head + source * src_row + unit] : static_cast<Unit>(~Unit{0});
}

}  // namespace

std::size_t snapkv_scores_workspace_bytes(int q_heads, int window, int tokens, int storage_heads) {
  return score_layout(q_heads, window, tokens, storage_heads).bytes;
}

void snapkv_scores(Cuda stream, DeviceView<const bf16, 3> q_window, DeviceView<const bf16, 3> k,
                   int kernel, Pool pool, DeviceView<float, 2> pooled,
                   DeviceView<std::byte, 1> workspace, const WindowScoreOptions& options) {
  run_scores<bf16>(stream, q_window, k, kernel, pool, pooled, workspace, options);
}
void snapkv_scores(Cuda stream, DeviceView<const f16, 3> q_window, DeviceView<const f16, 3> k,
                   int kernel, Pool pool, DeviceView<float, 2> pooled,
                   DeviceView<std::byte, 1> workspace, const WindowScoreOptions& options) {
  run_scores<f16>(stream, q_window, k, kernel, pool, pooled, workspace, options);
}

std::size_t top_k_workspace_bytes(int rows, int n, int k) {
  check_top_k_shape(rows, n, k, "top_k_workspace_bytes");
  return 0;  // the radix select keeps everything in shared memory
}

void top_k(Cuda stream, DeviceView<const float, 2> scores, int k,
           DeviceView<std::int32_t, 2> indices, DeviceView<std::byte, 1> /*workspace*/) {
  run_top_k(stream, scores, k, indices, 0, 0, "top_k(cuda)");
}

std::size_t snapkv_select_workspace_bytes(int q_heads, int window, int tokens, int storage_heads,
                                          int selected) {
  const int prefix = std::max(tokens - window, 0);
  return align_up(static_cast<std::size_t>(storage_heads) * prefix * sizeof(float)) +
         align_up(score_layout(q_heads, window, tokens, storage_heads).bytes) +
         top_k_workspace_bytes(storage_heads, prefix, selected);
}

void snapkv_select(Cuda stream, DeviceView<const bf16, 3> q_window, DeviceView<const bf16, 3> k,
                   int selected, int kernel, Pool pool, DeviceView<std::int32_t, 2> keep,
                   DeviceView<std::byte, 1> workspace, const WindowScoreOptions& options) {
  run_select<bf16>(stream, q_window, k, selected, kernel, pool, keep, workspace, options);
}
void snapkv_select(Cuda stream, DeviceView<const f16, 3> q_window, DeviceView<const f16, 3> k,
                   int selected, int kernel, Pool pool, DeviceView<std::int32_t, 2> keep,
                   DeviceView<std::byte, 1> workspace, const WindowScoreOptions& options) {
  run_select<f16>(stream, q_window, k, selected, kernel, pool, keep, workspace, options);
}

void compact_rows(Cuda stream, DeviceView<const std::int32_t, 2> keep,
                  DeviceView<const std::int32_t, 1> counts, DeviceView<const bf16, 3> k,
                  DeviceView<const bf16, 3> v, DeviceView<bf16, 3> k_out, DeviceView<bf16, 3> v_out,
                  const CompactSide& side) {
  run_compact<bf16>(stream, keep, counts, k, v, k_out, v_out, side);
}
void compact_rows(Cuda stream, DeviceView<const std::int32_t, 2> keep,
                  DeviceView<const std::int32_t, 1> counts, DeviceView<const f16, 3> k,
                  DeviceView<const f16, 3> v, DeviceView<f16, 3> k_out, DeviceView<f16, 3> v_out,
                  const CompactSide& side) {
  run_compact<f16>(stream, keep, counts, k, v, k_out, v_out, side);
}

void gather_rows(Cuda stream, DeviceView<const std::int32_t, 2> keep,
                 DeviceView<const std::int32_t, 1> counts, DeviceView<const std::byte, 3> src,
                 DeviceView<std::byte, 3> dst) {
  const std::int64_t s = keep.size(0), kept = keep.size(1), t = src.size(1), bytes = src.size(2);
  KVC_CHECK(src.size(0) == s && dst.size(0) == s && dst.size(1) == kept && dst.size(2) == bytes,
            "gather_rows(cuda): src [", src.size(0), ", ", t, ", ", bytes, "] and dst [",
            dst.size(0), ", ", dst.size(1), ", ", dst.size(2),
            "] must be [S, T, B] and [S, Kmax, B]"
            " with S = ",
            s, ", Kmax = ", kept);
  KVC_CHECK(src.strides[2] == 1 && dst.strides[2] == 1,
            "gather_rows(cuda): the bytes of a row must be contiguous (stride 1)");
  KVC_CHECK(counts.data == nullptr || counts.size(0) == s, "gather_rows(cuda): counts has ",
            counts.size(0), " entries; expected S = ", s, " (or an empty view)");
  KVC_CHECK(t <= std::numeric_limits<std::int32_t>::max(), "gather_rows(cuda): T = ", t,
            " rows; allowed up to ", std::numeric_limits<std::int32_t>::max());
  if (kept == 0 || bytes == 0 || s == 0) return;
  const auto aligned4 = [](const void* p, std::initializer_list<std::int64_t> v) {
    if (reinterpret_cast<std::uintptr_t>(p) % 4 != 0) return false;
    for (std::int64_t x : v)
      if (x % 4 != 0) return false;
    return true;
  };
  const bool words = aligned4(src.data, {src.strides[0], src.strides[1], bytes}) &&
                     aligned4(dst.data, {dst.strides[0], dst.strides[1]});
  const int unit = words ? 4 : 1;
  const std::int64_t units = bytes / unit, per_head = kept * units;
  const dim3 grid(static_cast<unsigned>((per_head + 255) / 256), static_cast<unsigned>(s));
  if (words)
    gather_rows_kernel<std::uint32_t><<<grid, 256, 0, stream.stream>>>(
        keep.data, keep.strides[0], keep.strides[1], counts.data,
        reinterpret_cast<const std::uint32_t*>(src.data), src.strides[0] / 4, src.strides[1] / 4,
        reinterpret_cast<std::uint32_t*>(dst.data), dst.strides[0] / 4, dst.strides[1] / 4,
        static_cast<int>(t), static_cast<int>(kept), static_cast<int>(units));
  else
    gather_rows_kernel<std::uint8_t><<<grid, 256, 0, stream.stream>>>(
        keep.data, keep.strides[0], keep.strides[1], counts.data,
        reinterpret_cast<const std::uint8_t*>(src.data), src.strides[0], src.strides[1],
        reinterpret_cast<std::uint8_t*>(dst.data), dst.strides[0], dst.strides[1],
        static_cast<int>(t), static_cast<int>(kept), static_cast<int>(units));
  KVC_CUDA_CHECK_LAUNCH(stream.stream);
}

}  // namespace kvc::ops
