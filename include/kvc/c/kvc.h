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
 * out [batch, q_heads, head_dim]; the last dimension contiguous, rows 16-byte aligned, k's and v's
 * other strides positive (any stride on a dimension of size 1). head_dim 64 or 128;
 * q_heads / kv_heads in {1, 2, 4, 8}. scale <= 0 selects 1/sqrt(head_dim). */
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

KVC_C_API kvc_status kvc_decode_attention_workspace(int batch, int q_heads, int kv_heads,
                                                    int head_dim, int max_length, size_t* floats);
KVC_C_API kvc_status kvc_decode_attention(kvc_dtype dtype, const kvc_decode_attention_args* args,
                                          void* stream);

/* Decode attention that also returns importance (kvc::ops::decode_attention_with_scores): the
 * dense attention above plus each key's attention probabilities summed over its GQA group into
 * scores [batch, kv_heads, max_length] (fp32, strides in elements), added (accumulate = 1: H2O) or
 * written (accumulate = 0: TOVA); round_f16 = 1 rounds every probability to f16 before the sum
 * (H2O). Only the first lengths[b] entries of a row are touched. args->workspace (16-byte aligned)
 * needs kvc_decode_attention_with_scores_workspace(...) floats. */
typedef struct kvc_attention_scores_args {
  float* scores;
  int64_t scores_strides[3];
  int accumulate, round_f16;
} kvc_attention_scores_args;

KVC_C_API kvc_status kvc_decode_attention_with_scores_workspace(int batch, int q_heads,
                                                                int kv_heads, int head_dim,
                                                                int max_length, size_t* floats);
KVC_C_API kvc_status kvc_decode_attention_with_scores(kvc_dtype dtype,
                                                      const kvc_decode_attention_args* args,
                                                      const kvc_attention_scores_args* scores,
                                                      void* stream);

/* ---- Decode attention over quantized caches (kvc/ops/quantized_attention.hpp) -------------------
 * The layouts are those of docs/formats.md per (sequence, KV head); each part is a pointer plus the
 * strides, in elements of the part's type, between sequences and between KV heads. Token counts
 * are device int32 arrays [batch, kv_heads], C order. q and out as for kvc_decode_attention (dtype
 * bf16 or f16, the same for both); the workspace size comes from
 * kvc_quantized_decode_attention_workspace. */
typedef struct kvc_cache_part {
  const void* data;
  int64_t batch_stride, head_stride;
} kvc_cache_part;

typedef struct kvc_quantized_common {
  const void* q;
  int64_t q_strides[3];
  void* out;
  int64_t out_strides[3];
  int batch, q_heads, kv_heads, head_dim, max_length;
  float scale; /* <= 0: 1/sqrt(head_dim) */
  const int32_t* lengths;
  float* workspace;
  size_t workspace_floats;
} kvc_quantized_common;

/* KIVI (keys per channel in token groups, values per token), f16 parameters: bits 2 or 4, group a
 * multiple of 32 dividing head_dim. Parts: key_codes (uint32), key_scale, key_minimum,
 * key_residual (f16), value_codes (uint32), value_scale, value_minimum, value_residual (f16). */
typedef struct kvc_kivi_cache {
  int bits, group;
  kvc_cache_part key_codes, key_scale, key_minimum, key_residual;
  kvc_cache_part value_codes, value_scale, value_minimum, value_residual;
  const int32_t* quantized_keys;   /* [batch, kv_heads], multiples of group */
  const int32_t* quantized_values; /* [batch, kv_heads] */
} kvc_kivi_cache;

/* Per-token INT8 / INT4: bits 8 or 4, group 0 (head_dim) or a multiple of 16, symmetric 1/0,
 * params_f32 1 (f32 scales/minimums) or 0 (f16). Minimums only when not symmetric. */
typedef struct kvc_int_cache {
  int bits, group, symmetric, params_f32;
  kvc_cache_part key_codes, value_codes, key_scale, value_scale, key_minimum, value_minimum;
  kvc_cache_part key_window, value_window; /* f16 */
  const int32_t* quantized;                /* [batch, kv_heads] */
} kvc_int_cache;

/* FP8: kind 0 = E4M3, 1 = E5M2; codes [n, head_dim] bytes; fp32 scales [batch, kv_heads]. */
typedef struct kvc_fp8_cache {
  int kind;
  kvc_cache_part key_codes, value_codes;
  const float* key_scale;
  const float* value_scale;
} kvc_fp8_cache;

KVC_C_API kvc_status kvc_quantized_decode_attention_workspace(int batch, int q_heads, int kv_heads,
                                                              int head_dim, int max_length,
                                                              size_t* floats);
KVC_C_API kvc_status kvc_decode_attention_kivi(kvc_dtype dtype, const kvc_quantized_common* common,
                                               const kvc_kivi_cache* cache, void* stream);
KVC_C_API kvc_status kvc_decode_attention_int(kvc_dtype dtype, const kvc_quantized_common* common,
                                              const kvc_int_cache* cache, void* stream);
KVC_C_API kvc_status kvc_decode_attention_fp8(kvc_dtype dtype, const kvc_quantized_common* common,
                                              const kvc_fp8_cache* cache, void* stream);
/* ---- end of quantized caches ---------------------------------------------------------------- */

/* ---- Quantize + pack (kvc/ops/quantize_cuda.hpp) ------------------------------------------------
 * Writes exactly the byte layouts of docs/formats.md, so what these entries fill is what the decode
 * attention entries above read (and what the CPU stores hold). x is [batch, heads, tokens,
 * head_dim] (dtype bf16 or f16, channels contiguous): a batch of sequences, or one sequence's KV
 * heads (batch = 1). Outputs are the parts of a preallocated cache, written in place; every count
 * array ([batch, heads] int32, C order, device) is read or advanced on the device. Strides are in
 * elements of each part's type. */
typedef struct kvc_quantize_input {
  const void* x;
  int64_t x_strides[4];
  int batch, heads, tokens, head_dim;
} kvc_quantize_input;

/* bits-bit codes in groups of `group` elements sharing their parameters. symmetric = 1: absmax,
 * no minimum (token axis only); 0: min-max with a minimum. params_f32 = 1: f32 scales/minimums,
 * 0: f16 (KIVI). */
typedef struct kvc_quant_format {
  int bits, group, symmetric, params_f32;
} kvc_quant_format;

/* Scales or minimums [batch, heads, capacity, columns], f16 or f32 as the format says; data NULL
 * only for the (absent) minimum of a symmetric format. */
typedef struct kvc_quant_params {
  void* data;
  int64_t strides[4];
} kvc_quant_params;

/* Channel axis (KIVI keys): block i holds `group` consecutive tokens. codes (uint32)
 * [batch, heads, capacity_blocks, head_dim, group / (32 / bits)]; scale and minimum
 * [batch, heads, capacity_blocks, head_dim]. */
typedef struct kvc_channel_blocks {
  uint32_t* codes;
  int64_t codes_strides[5];
  kvc_quant_params scale, minimum;
  int capacity_blocks;
} kvc_channel_blocks;

/* Token axis (KIVI values, per-token INT8/INT4): codes (uint32)
 * [batch, heads, capacity_rows, ceil(head_dim / (32 / bits))]; scale and minimum
 * [batch, heads, capacity_rows, head_dim / group]. */
typedef struct kvc_token_rows {
  uint32_t* codes;
  int64_t codes_strides[4];
  kvc_quant_params scale, minimum;
  int capacity_rows;
} kvc_token_rows;

/* f16 rows [batch, heads, capacity, head_dim] (KIVI residuals, INT windows), channels contiguous.
 */
typedef struct kvc_f16_rows {
  void* data;
  int64_t strides[4];
  int batch, heads, capacity, head_dim;
} kvc_f16_rows;

/* KIVI keys at prefill: x's tokens (a multiple of group) become blocks [0, tokens / group) of out.
 * bits 2, 4 or 8; group a multiple of 32 / bits, at most 256; asymmetric only. */
KVC_C_API kvc_status kvc_quantize_channel_blocks(kvc_dtype dtype, const kvc_quantize_input* x,
                                                 const kvc_quant_format* format,
                                                 const kvc_channel_blocks* out, void* stream);
/* KIVI values and per-token INT8/INT4: token t of (b, h) becomes row first_row[b, h] + t of out
 * (first_row NULL: row t, and capacity_rows >= tokens); with first_row, rows at or past
 * capacity_rows are skipped. group divides head_dim. The caller advances its row counts by
 * x->tokens. */
KVC_C_API kvc_status kvc_quantize_token_rows(kvc_dtype dtype, const kvc_quantize_input* x,
                                             const kvc_quant_format* format,
                                             const kvc_token_rows* out, const int32_t* first_row,
                                             void* stream);
/* Appends x's tokens, rounded to f16, at rows count[b, h] ... of rows and advances count by
 * x->tokens (rows past the capacity are dropped, count stops there). rows' batch, heads and
 * head_dim are x's. */
KVC_C_API kvc_status kvc_append_rows(kvc_dtype dtype, const kvc_quantize_input* x,
                                     const kvc_f16_rows* rows, int32_t* count, void* stream);
/* KIVI key flush after a decode step: where residual_rows[b, h] == R = residual->capacity (a
 * multiple of group), the R residual rows become blocks quantized_rows[b, h] / group ... of out,
 * quantized_rows grows by R and residual_rows becomes 0; other heads are left as they are. */
KVC_C_API kvc_status kvc_flush_channel_residual(const kvc_f16_rows* residual,
                                                const kvc_quant_format* format,
                                                const kvc_channel_blocks* out,
                                                int32_t* residual_rows, int32_t* quantized_rows,
                                                void* stream);
/* Token-axis flush (KIVI values; INT with a window): where window_rows[b, h] > keep, the window's
 * row 0 becomes row quantized_rows[b, h] of out, the window moves up one row, window_rows shrinks
 * by 1 and quantized_rows grows by 1. */
KVC_C_API kvc_status kvc_flush_token_window(const kvc_f16_rows* window, int keep,
                                            const kvc_quant_format* format,
                                            const kvc_token_rows* out, int32_t* window_rows,
                                            int32_t* quantized_rows, void* stream);

/* FP8: codes[b, h, first_row[b, h] + t, c] = fp8(x[b, h, t, c] / scale[b, h]) (round to nearest
 * even, saturating). scale_mode 0: the scale is given (finite, > 0; strides {0, 0} broadcast one
 * static scale); 1: computed first per (b, h) as max|x| / fp8_max (1 where the maximum is 0), and
 * written to scale; 2: computed per sequence (every head of b gets the same value). */
typedef struct kvc_fp8_quantize_args {
  int kind;       /* 0 = E4M3, 1 = E5M2 */
  int scale_mode; /* 0 given, 1 computed per head, 2 computed per sequence */
  float* scale;   /* [batch, heads] fp32 */
  int64_t scale_strides[2];
  uint8_t* codes; /* [batch, heads, capacity_rows, head_dim], channels contiguous */
  int64_t codes_strides[4];
  int capacity_rows;
  const int32_t* first_row; /* [batch, heads] C order (rows past capacity_rows skipped), or NULL:
                               row t, and capacity_rows >= tokens */
} kvc_fp8_quantize_args;

KVC_C_API kvc_status kvc_quantize_fp8(kvc_dtype dtype, const kvc_quantize_input* x,
                                      const kvc_fp8_quantize_args* args, void* stream);
/* ---- end of quantize + pack ------------------------------------------------------------------ */

/* ---- SnapKV selection: scores, top-k, compaction (kvc/ops/selection.hpp)
 * ------------------------- One layer of one sequence. q_window [q_heads, window, head_dim] holds
 * the last `window` queries, k [kv_heads, tokens, head_dim] the keys (dtype bf16 or f16); head_dim
 * 64 or 128, head_dim contiguous, rows 16-byte aligned (pointers 16-byte aligned, strides multiples
 * of 8 elements). storage_heads is kv_heads (the query heads of a group averaged) or q_heads (one
 * row per query head). kernel: odd pooling width >= 1; pool 0 = avg, 1 = max; reduction over the
 * window rows 0 = sum, 1 = mean; rounding of each probability 0 = none, 1 = f16, 2 = bf16; scale <=
 * 0 selects 1/sqrt(head_dim). workspace: device memory, 16-byte aligned, of at least the bytes the
 * matching
 * *_workspace entry returns. */
typedef struct kvc_snapkv_args {
  const void* q_window;
  int64_t q_strides[3];
  const void* k;
  int64_t k_strides[3];
  int q_heads, kv_heads, window, tokens, head_dim, storage_heads;
  int kernel, pool, reduction, rounding;
  float scale;
  void* workspace;
  size_t workspace_bytes;
} kvc_snapkv_args;

/* Pooled scores of the tokens - window prefix keys: pooled [storage_heads, tokens - window] fp32.
 */
KVC_C_API kvc_status kvc_snapkv_scores_workspace(int q_heads, int window, int tokens,
                                                 int storage_heads, size_t* bytes);
KVC_C_API kvc_status kvc_snapkv_scores(kvc_dtype dtype, const kvc_snapkv_args* args, float* pooled,
                                       const int64_t pooled_strides[2], void* stream);

/* keep [storage_heads, selected + window] (int32): per row the `selected` prefix tokens with the
 * highest pooled scores in ascending position (ties: lower position), then the window tokens
 * tokens - window ... tokens - 1: the keep table of kvc_compact_rows. */
KVC_C_API kvc_status kvc_snapkv_select_workspace(int q_heads, int window, int tokens,
                                                 int storage_heads, int selected, size_t* bytes);
KVC_C_API kvc_status kvc_snapkv_select(kvc_dtype dtype, const kvc_snapkv_args* args, int selected,
                                       int32_t* keep, const int64_t keep_strides[2], void* stream);

/* Per row of scores [rows, n] (fp32) the k highest (ties: lower position; NaN ranks lowest), as
 * indices [rows, k] (int32) in ascending position. 0 <= k <= n. */
typedef struct kvc_top_k_args {
  const float* scores;
  int64_t scores_strides[2];
  int rows, n, k;
  int32_t* indices;
  int64_t indices_strides[2];
  void* workspace;
  size_t workspace_bytes;
} kvc_top_k_args;

KVC_C_API kvc_status kvc_top_k_workspace(int rows, int n, int k, size_t* bytes);
KVC_C_API kvc_status kvc_top_k(const kvc_top_k_args* args, void* stream);

/* Compaction: row i < counts[s] of output head s is row keep[s, i] of source head
 * s * heads / storage_heads (storage_heads a multiple of heads); rows at or past counts[s] are left
 * untouched; counts NULL = every head keeps `kept` rows. k, v [heads, tokens, head_dim] and
 * k_out, v_out [storage_heads, kept, head_dim] (dtype bf16 or f16): head_dim a multiple of 8,
 * contiguous, rows 16-byte aligned. Optional side arrays (NULL = absent) move with the rows:
 * positions [heads, tokens] -> positions_out [storage_heads, kept] (int32; positions NULL with
 * positions_out given writes keep[s, i]), and scores [storage_heads, scored] -> scores_out
 * [storage_heads, kept] (fp32, given together; an index >= scored gets +inf). A keep index outside
 * [0, tokens) gives NaN rows and position -1. Bit-exact copies. */
typedef struct kvc_compact_args {
  const int32_t* keep;
  int64_t keep_strides[2];
  const int32_t* counts; /* [storage_heads], contiguous, or NULL */
  const void* k;
  int64_t k_strides[3];
  const void* v;
  int64_t v_strides[3];
  void* k_out;
  int64_t k_out_strides[3];
  void* v_out;
  int64_t v_out_strides[3];
  const int32_t* positions;
  int64_t positions_strides[2];
  int32_t* positions_out;
  int64_t positions_out_strides[2];
  const float* scores;
  int64_t scores_strides[2];
  float* scores_out;
  int64_t scores_out_strides[2];
  int heads, tokens, head_dim, storage_heads, kept, scored;
} kvc_compact_args;

KVC_C_API kvc_status kvc_compact_rows(kvc_dtype dtype, const kvc_compact_args* args, void* stream);
/* ---- end of SnapKV selection ----------------------------------------------------------------- */

#ifdef __cplusplus
}
#endif

#endif /* KVC_C_KVC_H_ */
