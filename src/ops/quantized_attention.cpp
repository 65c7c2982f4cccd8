// CPU reference of decode attention over quantized caches (kvc/ops/quantized_attention.hpp): each
// (sequence, KV head) is dequantized from the bytes of its layout with the formulas of
// docs/formats.md, written out here on purpose (no helper shared with the kernels beyond the
// field extraction), and the exact fp64-accumulated decode attention runs on the result.
#include "kvc/ops/quantized_attention.hpp"

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "kvc/core/error.hpp"

namespace kvc::ops {
namespace {

void check_shapes(const char* op, HostView<const float, 3> q, HostView<float, 3> out,
                  HostView<const std::int32_t, 2> lengths, int max_length) {
  KVC_CHECK(out.size(0) == q.size(0) && out.size(1) == q.size(1) && out.size(2) == q.size(2), op,
            ": out [", out.size(0), ", ", out.size(1), ", ", out.size(2),
            "] must equal q's shape [", q.size(0), ", ", q.size(1), ", ", q.size(2), "]");
  KVC_CHECK(
      lengths.size(0) == q.size(0) && lengths.size(1) >= 1 && q.size(1) % lengths.size(1) == 0, op,
      ": lengths [", lengths.size(0), ", ", lengths.size(1),
      "] must be [B, Hkv] with Hq = ", q.size(1), " a multiple of Hkv");
  for (std::int64_t b = 0; b < lengths.size(0); ++b)
    for (std::int64_t h = 0; h < lengths.size(1); ++h)
      KVC_CHECK(lengths(b, h) >= 0 && lengths(b, h) <= max_length, op, ": lengths(", b, ", ", h,
                ") = ", lengths(b, h), " is outside [0, max_length = ", max_length, "]");
}

// Attention of the Hq/Hkv query heads of KV head h of sequence b over dequantized [n, D] rows.
void attend_head(HostView<const float, 3> q, std::int64_t b, std::int64_t h, std::int64_t group,
                 const std::vector<float>& keys, const std::vector<float>& values, std::int64_t n,
                 HostView<float, 3> out, const AttentionOptions& options) {
  const std::int64_t d = q.size(2);
  HostView<const float, 2> qh{&q(b, h * group, 0), {group, d}, {q.strides[1], q.strides[2]}};
  HostView<float, 2> oh{&out(b, h * group, 0), {group, d}, {out.strides[1], out.strides[2]}};
  if (n == 0) {
    for (std::int64_t i = 0; i < group; ++i)
      for (std::int64_t c = 0; c < d; ++c) oh(i, c) = 0.0f;
    return;
  }
  AttentionOptions exact = options;
  exact.accumulate_fp64 = true;
  decode_attention(Cpu{}, qh, make_view(keys.data(), {1, n, d}),
                   make_view(values.data(), {1, n, d}), oh, exact);
}

float load_param(const void* base, std::int64_t index, ParamDType dtype) {
  if (dtype == ParamDType::f16) return static_cast<float>(static_cast<const f16*>(base)[index]);
  return static_cast<const float*>(base)[index];
}

// Rows [first, first + count) of `out` [n, D] from f16 rows.
void copy_half_rows(const f16* rows, std::int64_t count, std::int64_t d, std::int64_t first,
                    std::vector<float>& out) {
  for (std::int64_t t = 0; t < count; ++t)
    for (std::int64_t c = 0; c < d; ++c)
      out[(first + t) * d + c] = static_cast<float>(rows[t * d + c]);
}

// Per-token rows: codes [m, ceil(D / (32/bits))] words, parameters [m, D / G].
void dequantize_token_rows(const std::uint32_t* codes, const void* scale, const void* minimum,
                           ParamDType dtype, bool symmetric, int bits, std::int64_t group,
                           std::int64_t m, std::int64_t d, std::vector<float>& out) {
  const int per_word = codes_per_word(bits);
  const std::int64_t words = words_for(d, bits), params = d / group;
  for (std::int64_t t = 0; t < m; ++t)
    for (std::int64_t c = 0; c < d; ++c) {
      const std::uint32_t field =
          unpack_field(codes[t * words + c / per_word], static_cast<int>(c % per_word), bits);
      const std::int64_t p = t * params + c / group;
      const float s = load_param(scale, p, dtype);
      out[t * d + c] = symmetric ? static_cast<float>(field_signed(field, bits)) * s
                                 : static_cast<float>(field) * s + load_param(minimum, p, dtype);
    }
}

// decode_attention(Cpu) over any of the layouts: each (sequence, KV head) dequantized by
// dequantize_head, then the exact attention over it.
template <class Cache>
void attend_dequantized(const char* op, HostView<const float, 3> q, const Cache& cache,
                        HostView<float, 3> out, const AttentionOptions& options) {
  check_shapes(op, q, out, cache.lengths, cache.max_length);
  const std::int64_t kv_heads = cache.lengths.size(1), group = q.size(1) / kv_heads;
  std::vector<float> keys, values;
  for (std::int64_t b = 0; b < q.size(0); ++b)
    for (std::int64_t h = 0; h < kv_heads; ++h) {
      dequantize_head(Cpu{}, cache, q.size(2), b, h, keys, values);
      attend_head(q, b, h, group, keys, values, cache.lengths(b, h), out, options);
    }
}

}  // namespace

void dequantize_head(Cpu, const KiviCache<MemorySpace::Host>& cache, std::int64_t head_dim,
                     std::int64_t b, std::int64_t h, std::vector<float>& keys,
                     std::vector<float>& values) {
  constexpr const char* kOp = "dequantize_head(kivi, cpu)";
  const int bits = cache.bits;
  const std::int64_t g_size = cache.group, d = head_dim;
  KVC_CHECK(bits == 2 || bits == 4 || bits == 8, kOp, ": bits = ", bits,
            " is not supported; allowed: {2, 4, 8}");
  KVC_CHECK(g_size > 0 && g_size % codes_per_word(bits) == 0 && d % g_size == 0, kOp,
            ": group = ", g_size, " must be a positive multiple of ", codes_per_word(bits),
            " dividing D = ", d);
  const int per_word = codes_per_word(bits);
  const std::int64_t n = cache.lengths(b, h), qk = cache.quantized_keys(b, h),
                     qv = cache.quantized_values(b, h);
  KVC_CHECK(qk >= 0 && qk <= n && qk % g_size == 0 && qv >= 0 && qv <= n, kOp, ": (sequence ", b,
            ", KV head ", h, "): quantized keys ", qk, " and values ", qv,
            " must lie in [0, n = ", n, "], keys a multiple of group = ", g_size);
  keys.assign(static_cast<std::size_t>(n * d), 0.0f);
  values.assign(keys.size(), 0.0f);
  // Keys: block g, channel c, token i of the block -> field i % per_word of word
  // (g * D + c) * (G / per_word) + i / per_word.
  const std::uint32_t* kc =
      cache.key_codes.data + b * cache.key_codes.batch + h * cache.key_codes.head;
  const f16* ks = cache.key_scale.data + b * cache.key_scale.batch + h * cache.key_scale.head;
  const f16* km = cache.key_minimum.data + b * cache.key_minimum.batch + h * cache.key_minimum.head;
  const std::int64_t row_words = g_size / per_word;
  for (std::int64_t t = 0; t < qk; ++t)
    for (std::int64_t c = 0; c < d; ++c) {
      const std::int64_t g = t / g_size, i = t % g_size;
      const std::uint32_t code = unpack_field(kc[(g * d + c) * row_words + i / per_word],
                                              static_cast<int>(i % per_word), bits);
      keys[t * d + c] = static_cast<float>(code) * static_cast<float>(ks[g * d + c]) +
                        static_cast<float>(km[g * d + c]);
    }
  copy_half_rows(
      cache.key_residual.data + b * cache.key_residual.batch + h * cache.key_residual.head, n - qk,
      d, qk, keys);
  // Values: per token, groups of G channels, packed along channels; f16 parameters.
  dequantize_token_rows(
      cache.value_codes.data + b * cache.value_codes.batch + h * cache.value_codes.head,
      cache.value_scale.data + b * cache.value_scale.batch + h * cache.value_scale.head,
      cache.value_minimum.data + b * cache.value_minimum.batch + h * cache.value_minimum.head,
      ParamDType::f16, /*symmetric=*/false, bits, g_size, qv, d, values);
  copy_half_rows(
      cache.value_residual.data + b * cache.value_residual.batch + h * cache.value_residual.head,
      n - qv, d, qv, values);
}

void decode_attention(Cpu, HostView<const float, 3> q, const KiviCache<MemorySpace::Host>& cache,
                      HostView<float, 3> out, const AttentionOptions& options) {
  attend_dequantized("decode_attention(kivi, cpu)", q, cache, out, options);
}

void dequantize_head(Cpu, const IntCache<MemorySpace::Host>& cache, std::int64_t head_dim,
                     std::int64_t b, std::int64_t h, std::vector<float>& keys,
                     std::vector<float>& values) {
  constexpr const char* kOp = "dequantize_head(int, cpu)";
  const std::int64_t d = head_dim, g_size = cache.group == 0 ? d : cache.group;
  KVC_CHECK(cache.bits == 4 || cache.bits == 8, kOp, ": bits = ", cache.bits,
            " is not supported; allowed: {4, 8}");
  KVC_CHECK(g_size > 0 && d % g_size == 0, kOp, ": group = ", cache.group,
            " must be 0 or divide D = ", d);
  const int psize = param_bytes(cache.params);
  auto at = [&](const CachePart<const void>& part) -> const void* {
    if (part.data == nullptr) return nullptr;
    return static_cast<const unsigned char*>(part.data) + (b * part.batch + h * part.head) * psize;
  };
  const std::int64_t n = cache.lengths(b, h), m = cache.quantized(b, h);
  KVC_CHECK(m >= 0 && m <= n, kOp, ": (sequence ", b, ", KV head ", h, "): quantized ", m,
            " must lie in [0, n = ", n, "]");
  keys.assign(static_cast<std::size_t>(n * d), 0.0f);
  values.assign(keys.size(), 0.0f);
  dequantize_token_rows(cache.key_codes.data + b * cache.key_codes.batch + h * cache.key_codes.head,
                        at(cache.key_scale), at(cache.key_minimum), cache.params, cache.symmetric,
                        cache.bits, g_size, m, d, keys);
  dequantize_token_rows(
      cache.value_codes.data + b * cache.value_codes.batch + h * cache.value_codes.head,
      at(cache.value_scale), at(cache.value_minimum), cache.params, cache.symmetric, cache.bits,
      g_size, m, d, values);
  copy_half_rows(cache.key_window.data + b * cache.key_window.batch + h * cache.key_window.head,
                 n - m, d, m, keys);
  copy_half_rows(
      cache.value_window.data + b * cache.value_window.batch + h * cache.value_window.head, n - m,
      d, m, values);
}

void decode_attention(Cpu, HostView<const float, 3> q, const IntCache<MemorySpace::Host>& cache,
                      HostView<float, 3> out, const AttentionOptions& options) {
  attend_dequantized("decode_attention(int, cpu)", q, cache, out, options);
}

void dequantize_head(Cpu, const Fp8Cache<MemorySpace::Host>& cache, std::int64_t head_dim,
                     std::int64_t b, std::int64_t h, std::vector<float>& keys,
                     std::vector<float>& values) {
  const std::int64_t n = cache.lengths(b, h), d = head_dim;
  keys.assign(static_cast<std::size_t>(n * d), 0.0f);
  values.assign(keys.size(), 0.0f);
  const std::uint8_t* kc =
      cache.key_codes.data + b * cache.key_codes.batch + h * cache.key_codes.head;
  const std::uint8_t* vc =
      cache.value_codes.data + b * cache.value_codes.batch + h * cache.value_codes.head;
  const float ks = cache.key_scale(b, h), vs = cache.value_scale(b, h);
  for (std::int64_t i = 0; i < n * d; ++i) {
    keys[i] = fp8_decode(cache.kind, kc[i]) * ks;
    values[i] = fp8_decode(cache.kind, vc[i]) * vs;
  }
}

void decode_attention(Cpu, HostView<const float, 3> q, const Fp8Cache<MemorySpace::Host>& cache,
                      HostView<float, 3> out, const AttentionOptions& options) {
  attend_dequantized("decode_attention(fp8, cpu)", q, cache, out, options);
}

}  // namespace kvc::ops
