// The C ABI (include/kvc/c/kvc.h): argument marshalling onto the C++ ops; every exception becomes a
// status code plus a thread-local message.
#include <exception>
#include <string>

#include "kvc/c/kvc.h"
#include "kvc/core/error.hpp"
#include "kvc/ops/attention.hpp"

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

}  // extern "C"
