/* kvc/c/kvc.h: the C ABI of kvc, for engines that bring their own buffers (libkvc_c.so).
 *
 *   size_t floats = 0;
 *   kvc_decode_attention_workspace(8, 32, 8, 128, 32768, &floats);
 *   if (kvc_decode_attention(KVC_DTYPE_BF16, &args, stream) != KVC_OK) puts(kvc_last_error());
 *
 * Every function takes device pointers, shapes and strides (in elements) and a CUDA stream (a
 * cudaStream_t passed as void*; NULL = the legacy default stream), allocates nothing, and returns a
 * status; no exception crosses this boundary. kvc_last_error() returns the message of the calling
 * thread's last failure (valid until that thread's next kvc call).
 */
#ifndef KVC_C_KVC_H_
#define KVC_C_KVC_H_

#include <stddef.h>
#include <stdint.h>

#if defined(KVC_C_BUILDING)
#define KVC_C_API __attribute__((visibility("default")))
#else
#define KVC_C_API
#endif

#ifdef __cplusplus
extern "C" {
#endif

typedef enum kvc_status {
  KVC_OK = 0,
  KVC_ERROR_INVALID_ARGUMENT = 1, /* bad shape, stride, alignment, dtype or size */
  KVC_ERROR_CUDA = 2,             /* a CUDA runtime call or launch failed */
  KVC_ERROR_INTERNAL = 3          /* anything else (a bug: please report it) */
} kvc_status;

typedef enum kvc_dtype { KVC_DTYPE_F16 = 0, KVC_DTYPE_BF16 = 1 } kvc_dtype;

KVC_C_API const char* kvc_last_error(void);

/* Decode attention over dense K/V (kvc::ops::decode_attention, Cuda): one query per head for each
 * of `batch` sequences; sequence b uses lengths[b] (device int32) of the max_length cached tokens.
 * q [batch, q_heads, head_dim], k and v [batch, kv_heads, max_length, head_dim],
 * out [batch, q_heads, head_dim]; the last dimension contiguous, rows 16-byte aligned. head_dim 64
 * or 128; q_heads / kv_heads in {1, 2, 4, 8}. scale <= 0 selects 1/sqrt(head_dim). */
typedef struct kvc_decode_attention_args {
  const void* q;
  int64_t q_strides[3];
  const void* k;
  int64_t k_strides[4];
  const void* v;
  int64_t v_strides[4];
  const int32_t* lengths;
  void* out;
  int64_t out_strides[3];
  int batch, q_heads, kv_heads, head_dim, max_length;
  float scale;
  float* workspace; /* at least kvc_decode_attention_workspace(...) floats (may be 0) */
  size_t workspace_floats;
} kvc_decode_attention_args;

KVC_C_API kvc_status kvc_decode_attention_workspace(int batch, int q_heads, int kv_heads, int head_dim,
                                          int max_length, size_t* floats);
KVC_C_API kvc_status kvc_decode_attention(kvc_dtype dtype, const kvc_decode_attention_args* args,
                                void* stream);

#ifdef __cplusplus
}
#endif

#endif /* KVC_C_KVC_H_ */
