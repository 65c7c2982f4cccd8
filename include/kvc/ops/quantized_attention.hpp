// kvc/ops/quantized_attention.hpp: decode attention read directly from quantized caches (KIVI,
// per-token INT8/INT4, FP8), batched over sequences of different lengths, with GQA.
//
//   kvc::ops::KiviCache<kvc::MemorySpace::Device> cache{.bits = 2, .group = 32, ...};
//   kvc::ops::decode_attention(kvc::Cuda{stream}, q, cache, out, workspace);  // q, out [B, Hq, D]
//   kvc::ops::decode_attention(kvc::Cpu{}, q_host, cache_host, out_host);     // the oracle
//
// A cache description holds, for each part of the layout of docs/formats.md, a pointer and the
// element strides between sequences (`batch`) and KV heads (`head`); inside one (sequence, KV head)
// the part is laid out exactly as docs/formats.md says (rows contiguous, no padding), so the
// arrays of a CPU store copied head after head, or an engine's pages of the same shape, map onto
// it. Token counts live in [B, Hkv] int32 arrays (on the device for the CUDA backend): every
// (sequence, KV head) may hold a different number of tokens. No dequantized copy of the cache is
// made: the CUDA kernels decode the codes in registers.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "kvc/core/backend.hpp"
#include "kvc/core/dtype.hpp"
#include "kvc/core/view.hpp"
#include "kvc/ops/attention.hpp"
#include "kvc/ops/quantize.hpp"

namespace kvc::ops {

// One part of a cache: element (b, h) starts at data + b * batch + h * head.
template <class T>
struct CachePart {
  T* data = nullptr;
  std::int64_t batch = 0;  // elements between sequences
  std::int64_t head = 0;   // elements between KV heads
};

// KIVI with its default axes (keys per channel in groups of `group` tokens, values per token in
// groups of `group` channels) and f16 parameters. Per (sequence, KV head), with n = lengths(b, h),
// qk = quantized_keys(b, h) (a multiple of group) and qv = quantized_values(b, h):
//   key_codes [qk / G, D, G / (32/bits)] uint32, key_scale, key_minimum [qk / G, D] f16,
//   key_residual [n - qk, D] f16 (tokens qk..n-1),
//   value_codes [qv, D / (32/bits)] uint32, value_scale, value_minimum [qv, D / G] f16,
//   value_residual [n - qv, D] f16 (tokens qv..n-1).
template <MemorySpace Space>
struct KiviCache {
  int bits = 2;    // key and value bits: 2 or 4 (CUDA); the CPU reference also takes 8
  int group = 32;  // G: a multiple of 32 that divides D
  CachePart<const std::uint32_t> key_codes;
  CachePart<const f16> key_scale, key_minimum;
  CachePart<const f16> key_residual;
  CachePart<const std::uint32_t> value_codes;
  CachePart<const f16> value_scale, value_minimum;
  CachePart<const f16> value_residual;
  View<const std::int32_t, 2, Space> lengths;           // [B, Hkv] tokens n
  View<const std::int32_t, 2, Space> quantized_keys;    // [B, Hkv] qk
  View<const std::int32_t, 2, Space> quantized_values;  // [B, Hkv] qv
  int max_length = 0;                                   // an upper bound of every n
};

// Per-token INT8 / INT4 (docs/formats.md "Per-token INT8 / INT4"), keys and values alike. Per
// (sequence, KV head) with n = lengths(b, h) and m = quantized(b, h):
//   codes [m, D / (32/bits)] uint32; scale [m, D / G] (f16 or f32 as `params`, given as raw
//   bytes: CachePart<const void> with strides in elements of that dtype); minimum likewise when
//   asymmetric (symmetric = true: no minimum); window [n - m, D] f16 (tokens m..n-1).
template <MemorySpace Space>
struct IntCache {
  int bits = 8;   // 8 or 4
  int group = 0;  // channels per parameter, 0 = D; the CUDA kernels need a multiple of 16
  bool symmetric = true;
  ParamDType params = ParamDType::f16;
  CachePart<const std::uint32_t> key_codes, value_codes;
  CachePart<const void> key_scale, key_minimum, value_scale, value_minimum;
  CachePart<const f16> key_window, value_window;
  View<const std::int32_t, 2, Space> lengths;    // [B, Hkv] n
  View<const std::int32_t, 2, Space> quantized;  // [B, Hkv] m
  int max_length = 0;
};

// FP8 (docs/formats.md "FP8"): key and value codes [n, D] bytes per (sequence, KV head), one fp32
// scale per (sequence, KV head) and tensor (a per-layer or static scale is the same value
// repeated, or strides of 0).
template <MemorySpace Space>
struct Fp8Cache {
  Fp8Kind kind = Fp8Kind::e4m3;
  CachePart<const std::uint8_t> key_codes, value_codes;
  View<const float, 2, Space> key_scale, value_scale;  // [B, Hkv]
  View<const std::int32_t, 2, Space> lengths;          // [B, Hkv] n
  int max_length = 0;
};

// ---- CPU reference (the oracle) --------------------------------------------------------------
// Dequantizes each (sequence, KV head) from the layout above with the formulas of
// docs/formats.md, then runs decode_attention (Cpu) on it; q [B, Hq, D], out [B, Hq, D]. A
// (sequence, KV head) with n = 0 gives zeros.
void decode_attention(Cpu, HostView<const float, 3> q, const KiviCache<MemorySpace::Host>& cache,
                      HostView<float, 3> out, const AttentionOptions& options = {});
void decode_attention(Cpu, HostView<const float, 3> q, const IntCache<MemorySpace::Host>& cache,
                      HostView<float, 3> out, const AttentionOptions& options = {});
void decode_attention(Cpu, HostView<const float, 3> q, const Fp8Cache<MemorySpace::Host>& cache,
                      HostView<float, 3> out, const AttentionOptions& options = {});

// The dequantized keys and values [n, D] (row-major, n = lengths(b, h)) of sequence b, KV head h:
// the CPU reference's reading of the layout, which decode_attention(Cpu) attends over. For
// engines' and tests' inspection of a quantized cache (KVCache<Config, Cuda>::materialize).
void dequantize_head(Cpu, const KiviCache<MemorySpace::Host>& cache, std::int64_t head_dim,
                     std::int64_t b, std::int64_t h, std::vector<float>& keys,
                     std::vector<float>& values);
void dequantize_head(Cpu, const IntCache<MemorySpace::Host>& cache, std::int64_t head_dim,
                     std::int64_t b, std::int64_t h, std::vector<float>& keys,
                     std::vector<float>& values);
void dequantize_head(Cpu, const Fp8Cache<MemorySpace::Host>& cache, std::int64_t head_dim,
                     std::int64_t b, std::int64_t h, std::vector<float>& keys,
                     std::vector<float>& values);

// ---- CUDA (kvc::cuda, cuda/quantized_decode_attention.cu) ---------------------------------------
// One query token per sequence; fp32 accumulation; flash-decoding split along the tokens merged
// with a max-subtracted log-sum-exp (workspace: at least
// quantized_decode_attention_workspace_floats(...) floats, owned by the caller). head_dim 64 or
// 128; Hq / Hkv in {1, 2, 4, 8}; q and out bf16 or f16 (the same dtype). Pointers 16-byte
// aligned, every stride and row a multiple of 16 bytes (8 bytes for INT4 and 2-bit rows). Counts
// that the device finds inconsistent (n outside [0, max_length], qk not a multiple of G or > n,
// qv or m > n) make that sequence's outputs NaN. Both products run on tensor cores (codes decoded
// to exact f16, scales folded into f16 operands carried as hi + lo pairs: about fp32 accuracy)
// when every part is 16-byte aligned: KIVI always, FP8 always, INT8/INT4 with channel groups of
// at least 32 (INT4) or 16 (INT8); other INT caches take a CUDA-core kernel. On the KIVI path a
// key scale >= 1024 (a 2-bit key group spanning more than ~3000) is outside the exact range and
// makes that (sequence, KV head)'s outputs NaN, never a silently wrong value.
std::size_t quantized_decode_attention_workspace_floats(int batch, int q_heads, int kv_heads,
                                                        int head_dim, int max_length);
void decode_attention(Cuda, DeviceView<const bf16, 3> q,  // [B, Hq, D]
                      const KiviCache<MemorySpace::Device>& cache,
                      DeviceView<bf16, 3> out,  // [B, Hq, D]
                      DeviceView<float, 1> workspace, const AttentionOptions& options = {});
void decode_attention(Cuda, DeviceView<const f16, 3> q, const KiviCache<MemorySpace::Device>& cache,
                      DeviceView<f16, 3> out, DeviceView<float, 1> workspace,
                      const AttentionOptions& options = {});
void decode_attention(Cuda, DeviceView<const bf16, 3> q, const IntCache<MemorySpace::Device>& cache,
                      DeviceView<bf16, 3> out, DeviceView<float, 1> workspace,
                      const AttentionOptions& options = {});
void decode_attention(Cuda, DeviceView<const f16, 3> q, const IntCache<MemorySpace::Device>& cache,
                      DeviceView<f16, 3> out, DeviceView<float, 1> workspace,
                      const AttentionOptions& options = {});
void decode_attention(Cuda, DeviceView<const bf16, 3> q, const Fp8Cache<MemorySpace::Device>& cache,
                      DeviceView<bf16, 3> out, DeviceView<float, 1> workspace,
                      const AttentionOptions& options = {});
void decode_attention(Cuda, DeviceView<const f16, 3> q, const Fp8Cache<MemorySpace::Device>& cache,
                      DeviceView<f16, 3> out, DeviceView<float, 1> workspace,
                      const AttentionOptions& options = {});

}  // namespace kvc::ops
