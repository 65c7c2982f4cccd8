// The C ABI (include/kvc/c/kvc.h): argument marshalling onto the C++ ops; every exception becomes a
// status code plus a thread-local message.
#include <cstddef>
#include <cstdint>
#include <exception>
#include <string>

#include "kvc/c/kvc.h"
#include "kvc/core/error.hpp"
#include "kvc/ops/attention.hpp"
#include "kvc/ops/quantize_cuda.hpp"
#include "kvc/ops/quantized_attention.hpp"
#include "kvc/ops/selection.hpp"

namespace {

thread_local std::string last_error;

template <class F>
kvc_status guarded(F&& f) {
  try {
    last_error.clear();
    f();
    return KVC_OK;
  } catch (const kvc::CudaError& e) {
    last_error = e.what();
    return KVC_ERROR_CUDA;
  } catch (const kvc::Error& e) {
    last_error = e.what();
    return KVC_ERROR_INVALID_ARGUMENT;
  } catch (const std::exception& e) {
    last_error = e.what();
    return KVC_ERROR_INTERNAL;
  } catch (...) {
    last_error = "unknown exception";
    return KVC_ERROR_INTERNAL;
  }
}

template <class T, int Rank>
kvc::DeviceView<T, Rank> device_view(T* data, const std::int64_t (&shape)[Rank],
                                     const std::int64_t* strides) {
  kvc::DeviceView<T, Rank> view;
  view.data = data;
  for (int d = 0; d < Rank; ++d) {
    view.shape[d] = shape[d];
    view.strides[d] = strides[d];
  }
  return view;
}

template <class Storage>
void decode(const kvc_decode_attention_args& a, CUstream_st* stream) {
  KVC_CHECK(a.q && a.k && a.v && a.lengths && a.out, "kvc_decode_attention: null tensor pointer");
  const std::int64_t b = a.batch, hq = a.q_heads, hkv = a.kv_heads, d = a.head_dim,
                     t = a.max_length;
  KVC_CHECK(b >= 0 && hq >= 1 && hkv >= 1 && d >= 1 && t >= 0,
            "kvc_decode_attention: sizes must be non-negative (batch ", b, ", q_heads ", hq,
            ", kv_heads ", hkv, ", head_dim ", d, ", max_length ", t, ")");
  const std::int64_t one_stride[1] = {1};
  kvc::ops::AttentionOptions options;
  options.scale = a.scale > 0.0f ? a.scale : 0.0f;
  kvc::ops::decode_attention(
      kvc::Cuda{stream}, device_view(static_cast<const Storage*>(a.q), {b, hq, d}, a.q_strides),
      device_view(static_cast<const Storage*>(a.k), {b, hkv, t, d}, a.k_strides),
      device_view(static_cast<const Storage*>(a.v), {b, hkv, t, d}, a.v_strides),
      device_view(a.lengths, {b}, one_stride),
      device_view(static_cast<Storage*>(a.out), {b, hq, d}, a.out_strides),
      device_view(a.workspace, {static_cast<std::int64_t>(a.workspace_floats)}, one_stride),
      options);
}

// ---- decode attention with scores (H2O / TOVA) -------------------------------------------------
template <class Storage>
void decode_with_scores(const kvc_decode_attention_args& a, const kvc_attention_scores_args& s,
                        CUstream_st* stream) {
  KVC_CHECK(a.q && a.k && a.v && a.lengths && a.out && s.scores,
            "kvc_decode_attention_with_scores: null tensor pointer");
  const std::int64_t b = a.batch, hq = a.q_heads, hkv = a.kv_heads, d = a.head_dim,
                     t = a.max_length;
  KVC_CHECK(b >= 0 && hq >= 1 && hkv >= 1 && d >= 1 && t >= 0,
            "kvc_decode_attention_with_scores: sizes must be non-negative (batch ", b, ", q_heads ",
            hq, ", kv_heads ", hkv, ", head_dim ", d, ", max_length ", t, ")");
  const std::int64_t one_stride[1] = {1};
  kvc::ops::AttentionOptions options;
  options.scale = a.scale > 0.0f ? a.scale : 0.0f;
  const kvc::ops::ScoreOptions score_options{
      s.accumulate ? kvc::ops::ScoreUpdate::accumulate : kvc::ops::ScoreUpdate::overwrite,
      s.round_f16 != 0};
  kvc::ops::decode_attention_with_scores(
      kvc::Cuda{stream}, device_view(static_cast<const Storage*>(a.q), {b, hq, d}, a.q_strides),
      device_view(static_cast<const Storage*>(a.k), {b, hkv, t, d}, a.k_strides),
      device_view(static_cast<const Storage*>(a.v), {b, hkv, t, d}, a.v_strides),
      device_view(a.lengths, {b}, one_stride),
      device_view(static_cast<Storage*>(a.out), {b, hq, d}, a.out_strides),
      device_view(s.scores, {b, hkv, t}, s.scores_strides),
      device_view(a.workspace, {static_cast<std::int64_t>(a.workspace_floats)}, one_stride),
      score_options, options);
}
// ---- end of decode attention with scores ------------------------------------------------------

// ---- quantized caches -------------------------------------------------------------------------
template <class T>
kvc::ops::CachePart<const T> cache_part(const kvc_cache_part& p) {
  return {static_cast<const T*>(p.data), p.batch_stride, p.head_stride};
}

kvc::DeviceView<const std::int32_t, 2> counts_view(const std::int32_t* data, int batch, int heads,
                                                   const char* name) {
  KVC_CHECK(data != nullptr, "kvc_decode_attention_*: ", name, " is null");
  return kvc::make_device_view(data, {batch, heads});
}

// Calls f(q, out, workspace, options) with views of the dtype's storage type.
template <class F>
void with_common(kvc_dtype dtype, const kvc_quantized_common* c, F&& f) {
  KVC_CHECK(c != nullptr, "kvc_decode_attention_*: common is null");
  KVC_CHECK(c->q && c->out, "kvc_decode_attention_*: null q or out");
  const std::int64_t b = c->batch, hq = c->q_heads, d = c->head_dim;
  KVC_CHECK(b >= 0 && hq >= 1 && c->kv_heads >= 1 && d >= 1 && c->max_length >= 0,
            "kvc_decode_attention_*: sizes must be non-negative (batch ", b, ", q_heads ", hq,
            ", kv_heads ", c->kv_heads, ", head_dim ", d, ", max_length ", c->max_length, ")");
  const std::int64_t one_stride[1] = {1};
  kvc::ops::AttentionOptions options;
  options.scale = c->scale > 0.0f ? c->scale : 0.0f;
  const auto workspace =
      device_view(c->workspace, {static_cast<std::int64_t>(c->workspace_floats)}, one_stride);
  auto run = [&](auto tag) {
    using Storage = decltype(tag);
    f(device_view(static_cast<const Storage*>(c->q), {b, hq, d}, c->q_strides),
      device_view(static_cast<Storage*>(c->out), {b, hq, d}, c->out_strides), workspace, options);
  };
  if (dtype == KVC_DTYPE_BF16)
    run(kvc::bf16{});
  else if (dtype == KVC_DTYPE_F16)
    run(kvc::f16{});
  else
    KVC_FAIL("kvc_decode_attention_*: dtype ", static_cast<int>(dtype),
             " is not supported; allowed: KVC_DTYPE_F16 (0), KVC_DTYPE_BF16 (1)");
}
// ---- end of quantized caches ------------------------------------------------------------------

// ---- quantize + pack and SnapKV selection: shared helpers ------------------------------------
// Calls f(tag) with a value of the dtype's storage type.
template <class F>
void with_dtype(kvc_dtype dtype, const char* op, F&& f) {
  if (dtype == KVC_DTYPE_BF16)
    f(kvc::bf16{});
  else if (dtype == KVC_DTYPE_F16)
    f(kvc::f16{});
  else
    KVC_FAIL(op, ": dtype ", static_cast<int>(dtype),
             " is not supported; allowed: KVC_DTYPE_F16 (0), KVC_DTYPE_BF16 (1)");
}

kvc::DeviceView<std::int32_t, 2> counts_of(std::int32_t* data, std::int64_t batch,
                                           std::int64_t heads, const char* op, const char* name) {
  KVC_CHECK(data != nullptr, op, ": ", name, " is null");
  return kvc::make_device_view(data, {batch, heads});
}

// The workspace as bytes; the kernels carve fp32 arrays out of it, so the base must be aligned.
kvc::DeviceView<std::byte, 1> workspace_bytes(void* data, size_t bytes, const char* op) {
  KVC_CHECK(bytes == 0 || data != nullptr, op, ": workspace is null but workspace_bytes = ", bytes);
  KVC_CHECK(reinterpret_cast<std::uintptr_t>(data) % 16 == 0, op,
            ": workspace must be 16-byte aligned (as cudaMalloc returns)");
  const std::int64_t one_stride[1] = {1};
  return device_view(static_cast<std::byte*>(data), {static_cast<std::int64_t>(bytes)}, one_stride);
}

// ---- quantize + pack --------------------------------------------------------------------------
kvc::ops::QuantSpec quant_spec(const kvc_quant_format* f, const char* op) {
  KVC_CHECK(f != nullptr, op, ": format is null");
  // Checked here because the packed shapes below divide by 32 / bits and by group.
  KVC_CHECK(f->bits == 2 || f->bits == 4 || f->bits == 8, op, ": bits = ", f->bits,
            " is not supported; allowed: 2, 4, 8");
  KVC_CHECK(f->group >= 1, op, ": group = ", f->group, "; need group >= 1");
  kvc::ops::QuantSpec spec;
  spec.bits = f->bits;
  spec.group = f->group;
  spec.symmetric = f->symmetric != 0;
  spec.params = f->params_f32 ? kvc::ops::ParamDType::f32 : kvc::ops::ParamDType::f16;
  return spec;
}

kvc::ops::DeviceParams params_of(const kvc_quant_params& p, const kvc::ops::QuantSpec& spec,
                                 std::int64_t batch, std::int64_t heads, std::int64_t rows,
                                 std::int64_t columns) {
  kvc::ops::DeviceParams out;
  out.dtype = spec.params;
  out.data = p.data;
  out.shape = {batch, heads, rows, columns};
  for (int d = 0; d < 4; ++d) out.strides[d] = p.strides[d];
  return out;
}

kvc::ops::ChannelBlocks channel_blocks(const kvc_channel_blocks* out,
                                       const kvc::ops::QuantSpec& spec, std::int64_t batch,
                                       std::int64_t heads, std::int64_t dim, const char* op) {
  KVC_CHECK(out != nullptr, op, ": out is null");
  KVC_CHECK(out->codes && out->scale.data && out->minimum.data, op,
            ": null codes, scale or minimum");
  KVC_CHECK(out->capacity_blocks >= 0, op, ": capacity_blocks = ", out->capacity_blocks,
            "; need >= 0");
  const std::int64_t blocks = out->capacity_blocks, words = spec.group / (32 / spec.bits);
  kvc::ops::ChannelBlocks c;
  c.codes = device_view(out->codes, {batch, heads, blocks, dim, words}, out->codes_strides);
  c.scale = params_of(out->scale, spec, batch, heads, blocks, dim);
  c.minimum = params_of(out->minimum, spec, batch, heads, blocks, dim);
  return c;
}

kvc::ops::TokenRows token_rows(const kvc_token_rows* out, const kvc::ops::QuantSpec& spec,
                               std::int64_t batch, std::int64_t heads, std::int64_t dim,
                               const char* op) {
  KVC_CHECK(out != nullptr, op, ": out is null");
  KVC_CHECK(out->codes && out->scale.data, op, ": null codes or scale");
  KVC_CHECK(spec.symmetric || out->minimum.data, op,
            ": minimum is null (the format is asymmetric)");
  KVC_CHECK(out->capacity_rows >= 0, op, ": capacity_rows = ", out->capacity_rows, "; need >= 0");
  const std::int64_t rows = out->capacity_rows, per_word = 32 / spec.bits;
  kvc::ops::TokenRows t;
  t.codes = device_view(out->codes, {batch, heads, rows, (dim + per_word - 1) / per_word},
                        out->codes_strides);
  t.scale = params_of(out->scale, spec, batch, heads, rows, dim / spec.group);
  // A symmetric format passes no minimum; the op rejects one that is given.
  t.minimum = params_of(out->minimum, spec, batch, heads, rows, dim / spec.group);
  return t;
}

void check_sizes(const char* op, std::int64_t batch, std::int64_t heads, std::int64_t rows,
                 std::int64_t dim, const char* rows_name) {
  KVC_CHECK(batch >= 0 && heads >= 0 && rows >= 0 && dim >= 1, op,
            ": sizes must be non-negative and head_dim >= 1 (batch ", batch, ", heads ", heads,
            ", ", rows_name, " ", rows, ", head_dim ", dim, ")");
}

// Calls f(x) with x as a [batch, heads, tokens, head_dim] view of the dtype's storage type.
template <class F>
void with_input(kvc_dtype dtype, const kvc_quantize_input* x, const char* op, F&& f) {
  KVC_CHECK(x != nullptr, op, ": x is null");
  KVC_CHECK(x->x != nullptr, op, ": null tensor pointer x->x");
  check_sizes(op, x->batch, x->heads, x->tokens, x->head_dim, "tokens");
  const std::int64_t b = x->batch, h = x->heads, n = x->tokens, d = x->head_dim;
  with_dtype(dtype, op, [&](auto tag) {
    using Storage = decltype(tag);
    f(device_view(static_cast<const Storage*>(x->x), {b, h, n, d}, x->x_strides));
  });
}

kvc::DeviceView<kvc::f16, 4> f16_rows(const kvc_f16_rows* r, const char* op, const char* name) {
  KVC_CHECK(r != nullptr, op, ": ", name, " is null");
  KVC_CHECK(r->data != nullptr, op, ": null tensor pointer ", name, "->data");
  check_sizes(op, r->batch, r->heads, r->capacity, r->head_dim, "capacity");
  return device_view(static_cast<kvc::f16*>(r->data),
                     {r->batch, r->heads, r->capacity, r->head_dim}, r->strides);
}
// ---- end of quantize + pack -------------------------------------------------------------------

// ---- SnapKV selection -------------------------------------------------------------------------
void check_snapkv_sizes(const char* op, int q_heads, int window, int tokens, int storage_heads) {
  KVC_CHECK(q_heads >= 1 && window >= 1 && storage_heads >= 1 && tokens >= window, op,
            ": need q_heads, window, storage_heads >= 1 and tokens >= window (q_heads ", q_heads,
            ", window ", window, ", tokens ", tokens, ", storage_heads ", storage_heads, ")");
  // The workspace layout counts window rows in int.
  KVC_CHECK(static_cast<std::int64_t>(q_heads) * window <= INT32_MAX, op,
            ": q_heads * window = ", static_cast<std::int64_t>(q_heads) * window,
            " is too large; allowed: < 2^31");
}

// Calls f(q_window, k, pool, options, workspace) with views of the dtype's storage type.
template <class F>
void with_snapkv(kvc_dtype dtype, const kvc_snapkv_args* a, const char* op, F&& f) {
  KVC_CHECK(a != nullptr, op, ": args is null");
  KVC_CHECK(a->q_window && a->k, op, ": null tensor pointer (q_window or k)");
  check_snapkv_sizes(op, a->q_heads, a->window, a->tokens, a->storage_heads);
  KVC_CHECK(a->kv_heads >= 1 && a->head_dim >= 1, op, ": kv_heads = ", a->kv_heads,
            ", head_dim = ", a->head_dim, "; need both >= 1");
  KVC_CHECK(a->pool == 0 || a->pool == 1, op, ": pool = ", a->pool,
            " is not supported; allowed: 0 (avg), 1 (max)");
  KVC_CHECK(a->reduction == 0 || a->reduction == 1, op, ": reduction = ", a->reduction,
            " is not supported; allowed: 0 (sum), 1 (mean)");
  KVC_CHECK(a->rounding >= 0 && a->rounding <= 2, op, ": rounding = ", a->rounding,
            " is not supported; allowed: 0 (none), 1 (f16), 2 (bf16)");
  kvc::ops::WindowScoreOptions options;
  options.reduction = a->reduction ? kvc::ops::ScoreReduction::mean : kvc::ops::ScoreReduction::sum;
  options.rounding = a->rounding == 0   ? kvc::ops::ProbabilityRounding::none
                     : a->rounding == 1 ? kvc::ops::ProbabilityRounding::f16
                                        : kvc::ops::ProbabilityRounding::bf16;
  options.scale = a->scale > 0.0f ? a->scale : 0.0f;
  const auto pool = a->pool ? kvc::ops::Pool::max : kvc::ops::Pool::avg;
  const auto workspace = workspace_bytes(a->workspace, a->workspace_bytes, op);
  const std::int64_t hq = a->q_heads, hkv = a->kv_heads, w = a->window, t = a->tokens,
                     d = a->head_dim;
  with_dtype(dtype, op, [&](auto tag) {
    using Storage = decltype(tag);
    f(device_view(static_cast<const Storage*>(a->q_window), {hq, w, d}, a->q_strides),
      device_view(static_cast<const Storage*>(a->k), {hkv, t, d}, a->k_strides), pool, options,
      workspace);
  });
}
// ---- end of SnapKV selection ------------------------------------------------------------------

}  // namespace

extern "C" {

const char* kvc_last_error(void) { return last_error.c_str(); }

kvc_status kvc_decode_attention_workspace(int batch, int q_heads, int kv_heads, int head_dim,
                                          int max_length, size_t* floats) {
  return guarded([&] {
    KVC_CHECK(floats != nullptr, "kvc_decode_attention_workspace: floats is null");
    *floats =
        kvc::ops::decode_attention_workspace_floats(batch, q_heads, kv_heads, head_dim, max_length);
  });
}

kvc_status kvc_decode_attention(kvc_dtype dtype, const kvc_decode_attention_args* args,
                                void* stream) {
  return guarded([&] {
    KVC_CHECK(args != nullptr, "kvc_decode_attention: args is null");
    auto* native = static_cast<CUstream_st*>(stream);
    if (dtype == KVC_DTYPE_BF16)
      decode<kvc::bf16>(*args, native);
    else if (dtype == KVC_DTYPE_F16)
      decode<kvc::f16>(*args, native);
    else
      KVC_FAIL("kvc_decode_attention: dtype ", static_cast<int>(dtype),
               " is not supported; allowed: KVC_DTYPE_F16 (0), KVC_DTYPE_BF16 (1)");
  });
}

// ---- decode attention with scores (H2O / TOVA) -------------------------------------------------
kvc_status kvc_decode_attention_with_scores_workspace(int batch, int q_heads, int kv_heads,
                                                      int head_dim, int max_length,
                                                      size_t* floats) {
  return guarded([&] {
    KVC_CHECK(floats != nullptr, "kvc_decode_attention_with_scores_workspace: floats is null");
    *floats = kvc::ops::decode_attention_with_scores_workspace_floats(batch, q_heads, kv_heads,
                                                                      head_dim, max_length);
  });
}

kvc_status kvc_decode_attention_with_scores(kvc_dtype dtype, const kvc_decode_attention_args* args,
                                            const kvc_attention_scores_args* scores, void* stream) {
  return guarded([&] {
    KVC_CHECK(args != nullptr && scores != nullptr,
              "kvc_decode_attention_with_scores: args or scores is null");
    auto* native = static_cast<CUstream_st*>(stream);
    if (dtype == KVC_DTYPE_BF16)
      decode_with_scores<kvc::bf16>(*args, *scores, native);
    else if (dtype == KVC_DTYPE_F16)
      decode_with_scores<kvc::f16>(*args, *scores, native);
    else
      KVC_FAIL("kvc_decode_attention_with_scores: dtype ", static_cast<int>(dtype),
               " is not supported; allowed: KVC_DTYPE_F16 (0), KVC_DTYPE_BF16 (1)");
  });
}
// ---- end of decode attention with scores ------------------------------------------------------

// ---- quantized caches -------------------------------------------------------------------------
kvc_status kvc_quantized_decode_attention_workspace(int batch, int q_heads, int kv_heads,
                                                    int head_dim, int max_length, size_t* floats) {
  return guarded([&] {
    KVC_CHECK(floats != nullptr, "kvc_quantized_decode_attention_workspace: floats is null");
    *floats = kvc::ops::quantized_decode_attention_workspace_floats(batch, q_heads, kv_heads,
                                                                    head_dim, max_length);
  });
}

kvc_status kvc_decode_attention_kivi(kvc_dtype dtype, const kvc_quantized_common* common,
                                     const kvc_kivi_cache* cache, void* stream) {
  return guarded([&] {
    KVC_CHECK(cache != nullptr, "kvc_decode_attention_kivi: cache is null");
    with_common(dtype, common, [&](auto q, auto out, auto workspace, const auto& options) {
      kvc::ops::KiviCache<kvc::MemorySpace::Device> c;
      c.bits = cache->bits;
      c.group = cache->group;
      c.key_codes = cache_part<std::uint32_t>(cache->key_codes);
      c.key_scale = cache_part<kvc::f16>(cache->key_scale);
      c.key_minimum = cache_part<kvc::f16>(cache->key_minimum);
      c.key_residual = cache_part<kvc::f16>(cache->key_residual);
      c.value_codes = cache_part<std::uint32_t>(cache->value_codes);
      c.value_scale = cache_part<kvc::f16>(cache->value_scale);
      c.value_minimum = cache_part<kvc::f16>(cache->value_minimum);
      c.value_residual = cache_part<kvc::f16>(cache->value_residual);
      c.lengths = counts_view(common->lengths, common->batch, common->kv_heads, "lengths");
      c.quantized_keys =
          counts_view(cache->quantized_keys, common->batch, common->kv_heads, "quantized_keys");
      c.quantized_values =
          counts_view(cache->quantized_values, common->batch, common->kv_heads, "quantized_values");
      c.max_length = common->max_length;
      kvc::ops::decode_attention(kvc::Cuda{static_cast<CUstream_st*>(stream)}, q, c, out, workspace,
                                 options);
    });
  });
}

kvc_status kvc_decode_attention_int(kvc_dtype dtype, const kvc_quantized_common* common,
                                    const kvc_int_cache* cache, void* stream) {
  return guarded([&] {
    KVC_CHECK(cache != nullptr, "kvc_decode_attention_int: cache is null");
    with_common(dtype, common, [&](auto q, auto out, auto workspace, const auto& options) {
      kvc::ops::IntCache<kvc::MemorySpace::Device> c;
      c.bits = cache->bits;
      c.group = cache->group;
      c.symmetric = cache->symmetric != 0;
      c.params = cache->params_f32 ? kvc::ops::ParamDType::f32 : kvc::ops::ParamDType::f16;
      c.key_codes = cache_part<std::uint32_t>(cache->key_codes);
      c.value_codes = cache_part<std::uint32_t>(cache->value_codes);
      c.key_scale = cache_part<void>(cache->key_scale);
      c.value_scale = cache_part<void>(cache->value_scale);
      c.key_minimum = cache_part<void>(cache->key_minimum);
      c.value_minimum = cache_part<void>(cache->value_minimum);
      c.key_window = cache_part<kvc::f16>(cache->key_window);
      c.value_window = cache_part<kvc::f16>(cache->value_window);
      c.lengths = counts_view(common->lengths, common->batch, common->kv_heads, "lengths");
      c.quantized = counts_view(cache->quantized, common->batch, common->kv_heads, "quantized");
      c.max_length = common->max_length;
      kvc::ops::decode_attention(kvc::Cuda{static_cast<CUstream_st*>(stream)}, q, c, out, workspace,
                                 options);
    });
  });
}

kvc_status kvc_decode_attention_fp8(kvc_dtype dtype, const kvc_quantized_common* common,
                                    const kvc_fp8_cache* cache, void* stream) {
  return guarded([&] {
    KVC_CHECK(cache != nullptr, "kvc_decode_attention_fp8: cache is null");
    KVC_CHECK(cache->kind == 0 || cache->kind == 1,
              "kvc_decode_attention_fp8: kind = ", cache->kind,
              " is not supported; allowed: 0 (E4M3), 1 (E5M2)");
    with_common(dtype, common, [&](auto q, auto out, auto workspace, const auto& options) {
      kvc::ops::Fp8Cache<kvc::MemorySpace::Device> c;
      c.kind = cache->kind == 0 ? kvc::ops::Fp8Kind::e4m3 : kvc::ops::Fp8Kind::e5m2;
      c.key_codes = cache_part<std::uint8_t>(cache->key_codes);
      c.value_codes = cache_part<std::uint8_t>(cache->value_codes);
      KVC_CHECK(cache->key_scale && cache->value_scale, "kvc_decode_attention_fp8: null scale");
      c.key_scale = kvc::make_device_view(cache->key_scale, {common->batch, common->kv_heads});
      c.value_scale = kvc::make_device_view(cache->value_scale, {common->batch, common->kv_heads});
      c.lengths = counts_view(common->lengths, common->batch, common->kv_heads, "lengths");
      c.max_length = common->max_length;
      kvc::ops::decode_attention(kvc::Cuda{static_cast<CUstream_st*>(stream)}, q, c, out, workspace,
                                 options);
    });
  });
}
// ---- end of quantized caches ------------------------------------------------------------------

// ---- quantize + pack --------------------------------------------------------------------------
kvc_status kvc_quantize_channel_blocks(kvc_dtype dtype, const kvc_quantize_input* x,
                                       const kvc_quant_format* format,
                                       const kvc_channel_blocks* out, void* stream) {
  return guarded([&] {
    constexpr const char* kOp = "kvc_quantize_channel_blocks";
    const auto spec = quant_spec(format, kOp);
    with_input(dtype, x, kOp, [&](auto input) {
      const auto blocks = channel_blocks(out, spec, x->batch, x->heads, x->head_dim, kOp);
      kvc::ops::quantize_channel_blocks(kvc::Cuda{static_cast<CUstream_st*>(stream)}, input, spec,
                                        blocks);
    });
  });
}

kvc_status kvc_quantize_token_rows(kvc_dtype dtype, const kvc_quantize_input* x,
                                   const kvc_quant_format* format, const kvc_token_rows* out,
                                   const int32_t* first_row, void* stream) {
  return guarded([&] {
    constexpr const char* kOp = "kvc_quantize_token_rows";
    const auto spec = quant_spec(format, kOp);
    with_input(dtype, x, kOp, [&](auto input) {
      const auto rows = token_rows(out, spec, x->batch, x->heads, x->head_dim, kOp);
      kvc::DeviceView<const std::int32_t, 2> first{};  // empty: row t
      if (first_row != nullptr) first = kvc::make_device_view(first_row, {x->batch, x->heads});
      kvc::ops::quantize_token_rows(kvc::Cuda{static_cast<CUstream_st*>(stream)}, input, spec, rows,
                                    first);
    });
  });
}

kvc_status kvc_append_rows(kvc_dtype dtype, const kvc_quantize_input* x, const kvc_f16_rows* rows,
                           int32_t* count, void* stream) {
  return guarded([&] {
    constexpr const char* kOp = "kvc_append_rows";
    with_input(dtype, x, kOp, [&](auto input) {
      const auto out = f16_rows(rows, kOp, "rows");
      kvc::ops::append_rows(kvc::Cuda{static_cast<CUstream_st*>(stream)}, input, out,
                            counts_of(count, x->batch, x->heads, kOp, "count"));
    });
  });
}

kvc_status kvc_flush_channel_residual(const kvc_f16_rows* residual, const kvc_quant_format* format,
                                      const kvc_channel_blocks* out, int32_t* residual_rows,
                                      int32_t* quantized_rows, void* stream) {
  return guarded([&] {
    constexpr const char* kOp = "kvc_flush_channel_residual";
    const auto spec = quant_spec(format, kOp);
    const kvc::DeviceView<const kvc::f16, 4> input = f16_rows(residual, kOp, "residual");
    const auto b = input.size(0), h = input.size(1);
    const auto blocks = channel_blocks(out, spec, b, h, input.size(3), kOp);
    kvc::ops::flush_channel_residual(kvc::Cuda{static_cast<CUstream_st*>(stream)}, input, spec,
                                     blocks, counts_of(residual_rows, b, h, kOp, "residual_rows"),
                                     counts_of(quantized_rows, b, h, kOp, "quantized_rows"));
  });
}

kvc_status kvc_flush_token_window(const kvc_f16_rows* window, int keep,
                                  const kvc_quant_format* format, const kvc_token_rows* out,
                                  int32_t* window_rows, int32_t* quantized_rows, void* stream) {
  return guarded([&] {
    constexpr const char* kOp = "kvc_flush_token_window";
    const auto spec = quant_spec(format, kOp);
    const auto rows = f16_rows(window, kOp, "window");
    const auto b = rows.size(0), h = rows.size(1);
    const auto packed = token_rows(out, spec, b, h, rows.size(3), kOp);
    kvc::ops::flush_token_window(kvc::Cuda{static_cast<CUstream_st*>(stream)}, rows, keep, spec,
                                 packed, counts_of(window_rows, b, h, kOp, "window_rows"),
                                 counts_of(quantized_rows, b, h, kOp, "quantized_rows"));
  });
}

kvc_status kvc_quantize_fp8(kvc_dtype dtype, const kvc_quantize_input* x,
                            const kvc_fp8_quantize_args* args, void* stream) {
  return guarded([&] {
    constexpr const char* kOp = "kvc_quantize_fp8";
    KVC_CHECK(args != nullptr, kOp, ": args is null");
    KVC_CHECK(args->kind == 0 || args->kind == 1, kOp, ": kind = ", args->kind,
              " is not supported; allowed: 0 (E4M3), 1 (E5M2)");
    KVC_CHECK(args->scale_mode >= 0 && args->scale_mode <= 2, kOp,
              ": scale_mode = ", args->scale_mode,
              " is not supported; allowed: 0 (given), 1 (computed per head), 2 (computed per "
              "sequence)");
    KVC_CHECK(args->scale && args->codes, kOp, ": null scale or codes");
    KVC_CHECK(args->capacity_rows >= 0, kOp, ": capacity_rows = ", args->capacity_rows,
              "; need >= 0");
    with_input(dtype, x, kOp, [&](auto input) {
      const std::int64_t b = x->batch, h = x->heads;
      // Checked before the scales are computed, so that a bad output launches nothing.
      KVC_CHECK(args->first_row != nullptr || args->capacity_rows >= x->tokens, kOp,
                ": capacity_rows = ", args->capacity_rows, " is less than tokens = ", x->tokens,
                " (first_row is NULL: rows [0, tokens) are written)");
      KVC_CHECK(args->codes_strides[3] == 1 || x->head_dim == 1, kOp, ": codes' channel stride is ",
                args->codes_strides[3], "; channels must be contiguous");
      const auto codes =
          device_view(args->codes, {b, h, std::int64_t{args->capacity_rows}, input.size(3)},
                      args->codes_strides);
      const auto scale = device_view(args->scale, {b, h}, args->scale_strides);
      const auto kind = args->kind == 0 ? kvc::ops::Fp8Kind::e4m3 : kvc::ops::Fp8Kind::e5m2;
      const kvc::Cuda cuda{static_cast<CUstream_st*>(stream)};
      if (args->scale_mode != 0)
        kvc::ops::fp8_scales(cuda, input, kind,
                             args->scale_mode == 1 ? kvc::ops::Fp8ScaleScope::head
                                                   : kvc::ops::Fp8ScaleScope::sequence,
                             scale);
      kvc::DeviceView<const std::int32_t, 2> first{};  // empty: row t
      if (args->first_row != nullptr) first = kvc::make_device_view(args->first_row, {b, h});
      kvc::ops::quantize_fp8(cuda, input, scale, kind, codes, first);
    });
  });
}
// ---- end of quantize + pack -------------------------------------------------------------------

// ---- SnapKV selection -------------------------------------------------------------------------
kvc_status kvc_snapkv_scores_workspace(int q_heads, int window, int tokens, int storage_heads,
                                       size_t* bytes) {
  return guarded([&] {
    constexpr const char* kOp = "kvc_snapkv_scores_workspace";
    KVC_CHECK(bytes != nullptr, kOp, ": bytes is null");
    check_snapkv_sizes(kOp, q_heads, window, tokens, storage_heads);
    *bytes = kvc::ops::snapkv_scores_workspace_bytes(q_heads, window, tokens, storage_heads);
  });
}

kvc_status kvc_snapkv_scores(kvc_dtype dtype, const kvc_snapkv_args* args, float* pooled,
                             const int64_t pooled_strides[2], void* stream) {
  return guarded([&] {
    constexpr const char* kOp = "kvc_snapkv_scores";
    KVC_CHECK(pooled != nullptr && pooled_strides != nullptr, kOp,
              ": null tensor pointer (pooled or pooled_strides)");
    with_snapkv(dtype, args, kOp, [&](auto q, auto k, auto pool, const auto& options, auto ws) {
      const std::int64_t s = args->storage_heads, prefix = args->tokens - args->window;
      kvc::ops::snapkv_scores(kvc::Cuda{static_cast<CUstream_st*>(stream)}, q, k, args->kernel,
                              pool, device_view(pooled, {s, prefix}, pooled_strides), ws, options);
    });
  });
}

kvc_status kvc_snapkv_select_workspace(int q_heads, int window, int tokens, int storage_heads,
                                       int selected, size_t* bytes) {
  return guarded([&] {
    constexpr const char* kOp = "kvc_snapkv_select_workspace";
    KVC_CHECK(bytes != nullptr, kOp, ": bytes is null");
    check_snapkv_sizes(kOp, q_heads, window, tokens, storage_heads);
    KVC_CHECK(selected >= 0 && selected <= tokens - window, kOp, ": selected = ", selected,
              " is out of range; allowed: [0, tokens - window = ", tokens - window, "]");
    *bytes =
        kvc::ops::snapkv_select_workspace_bytes(q_heads, window, tokens, storage_heads, selected);
  });
}

kvc_status kvc_snapkv_select(kvc_dtype dtype, const kvc_snapkv_args* args, int selected,
                             int32_t* keep, const int64_t keep_strides[2], void* stream) {
  return guarded([&] {
    constexpr const char* kOp = "kvc_snapkv_select";
    KVC_CHECK(keep != nullptr && keep_strides != nullptr, kOp,
              ": null tensor pointer (keep or keep_strides)");
    with_snapkv(dtype, args, kOp, [&](auto q, auto k, auto pool, const auto& options, auto ws) {
      KVC_CHECK(
          selected >= 0 && selected <= args->tokens - args->window, kOp, ": selected = ", selected,
          " is out of range; allowed: [0, tokens - window = ", args->tokens - args->window, "]");
      const std::int64_t s = args->storage_heads, columns = std::int64_t{selected} + args->window;
      kvc::ops::snapkv_select(kvc::Cuda{static_cast<CUstream_st*>(stream)}, q, k, selected,
                              args->kernel, pool, device_view(keep, {s, columns}, keep_strides), ws,
                              options);
    });
  });
}

kvc_status kvc_top_k_workspace(int rows, int n, int k, size_t* bytes) {
  return guarded([&] {
    KVC_CHECK(bytes != nullptr, "kvc_top_k_workspace: bytes is null");
    KVC_CHECK(rows >= 0 && n >= 0, "kvc_top_k_workspace: rows = ", rows, ", n = ", n,
              "; need both >= 0");
    *bytes = kvc::ops::top_k_workspace_bytes(rows, n, k);
  });
}

kvc_status kvc_top_k(const kvc_top_k_args* args, void* stream) {
  return guarded([&] {
    constexpr const char* kOp = "kvc_top_k";
    KVC_CHECK(args != nullptr, kOp, ": args is null");
    KVC_CHECK(args->scores && args->indices, kOp, ": null tensor pointer (scores or indices)");
    KVC_CHECK(args->rows >= 0 && args->n >= 0 && args->k >= 0 && args->k <= args->n, kOp,
              ": rows = ", args->rows, ", n = ", args->n, ", k = ", args->k,
              "; need rows, n >= 0 and 0 <= k <= n");
    const std::int64_t rows = args->rows, n = args->n, k = args->k;
    kvc::ops::top_k(kvc::Cuda{static_cast<CUstream_st*>(stream)},
                    device_view(args->scores, {rows, n}, args->scores_strides), args->k,
                    device_view(args->indices, {rows, k}, args->indices_strides),
                    workspace_bytes(args->workspace, args->workspace_bytes, kOp));
  });
}

kvc_status kvc_compact_rows(kvc_dtype dtype, const kvc_compact_args* args, void* stream) {
  return guarded([&] {
    constexpr const char* kOp = "kvc_compact_rows";
    KVC_CHECK(args != nullptr, kOp, ": args is null");
    const kvc_compact_args& a = *args;
    KVC_CHECK(a.keep && a.k && a.v && a.k_out && a.v_out, kOp,
              ": null tensor pointer (keep, k, v, k_out or v_out)");
    KVC_CHECK(a.heads >= 1 && a.storage_heads >= 1 && a.tokens >= 0 && a.head_dim >= 1 &&
                  a.kept >= 0 && a.scored >= 0,
              kOp,
              ": need heads, storage_heads, head_dim >= 1 and tokens, kept, scored >= 0 (heads ",
              a.heads, ", storage_heads ", a.storage_heads, ", tokens ", a.tokens, ", head_dim ",
              a.head_dim, ", kept ", a.kept, ", scored ", a.scored, ")");
    const std::int64_t h = a.heads, s = a.storage_heads, t = a.tokens, d = a.head_dim,
                       kept = a.kept;
    const auto keep = device_view(a.keep, {s, kept}, a.keep_strides);
    kvc::DeviceView<const std::int32_t, 1> counts{};  // empty: every head keeps `kept` rows
    if (a.counts != nullptr) counts = kvc::make_device_view(a.counts, {s});
    kvc::ops::CompactSide side;
    if (a.positions != nullptr)
      side.positions = device_view(a.positions, {h, t}, a.positions_strides);
    if (a.positions_out != nullptr)
      side.positions_out = device_view(a.positions_out, {s, kept}, a.positions_out_strides);
    if (a.scores != nullptr)
      side.scores = device_view(a.scores, {s, std::int64_t{a.scored}}, a.scores_strides);
    if (a.scores_out != nullptr)
      side.scores_out = device_view(a.scores_out, {s, kept}, a.scores_out_strides);
    with_dtype(dtype, kOp, [&](auto tag) {
      using Storage = decltype(tag);
      kvc::ops::compact_rows(
          kvc::Cuda{static_cast<CUstream_st*>(stream)}, keep, counts,
          device_view(static_cast<const Storage*>(a.k), {h, t, d}, a.k_strides),
          device_view(static_cast<const Storage*>(a.v), {h, t, d}, a.v_strides),
          device_view(static_cast<Storage*>(a.k_out), {s, kept, d}, a.k_out_strides),
          device_view(static_cast<Storage*>(a.v_out), {s, kept, d}, a.v_out_strides), side);
    });
  });
}
// ---- end of SnapKV selection ------------------------------------------------------------------

}  // extern "C"
