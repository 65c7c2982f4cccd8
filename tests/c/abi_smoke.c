/* The C ABI compiles as C and reports bad arguments as a status with a message, no GPU needed. */
#include <stdio.h>
#include <string.h>

#include "kvc/c/kvc.h"

/* ---- quantize + pack and SnapKV selection: host-side argument checks ---------------------------
 * Every call below must be rejected before any CUDA call (this runs on machines without a GPU), so
 * the "device" pointers are a host buffer that is never dereferenced. */
static _Alignas(256) unsigned char fake[1 << 16];
static int failures = 0;

static void expect_invalid(kvc_status got, const char* needle, const char* what) {
  if (got != KVC_ERROR_INVALID_ARGUMENT || strstr(kvc_last_error(), needle) == NULL) {
    fprintf(stderr,
            "%s: status %d, message \"%s\"; expected KVC_ERROR_INVALID_ARGUMENT with \"%s\"\n",
            what, (int)got, kvc_last_error(), needle);
    ++failures;
  }
}

/* x [batch, heads, tokens, head_dim], C order. */
static kvc_quantize_input input(int batch, int heads, int tokens, int head_dim) {
  kvc_quantize_input x;
  memset(&x, 0, sizeof x);
  x.x = fake;
  x.batch = batch;
  x.heads = heads;
  x.tokens = tokens;
  x.head_dim = head_dim;
  x.x_strides[3] = 1;
  x.x_strides[2] = head_dim;
  x.x_strides[1] = (int64_t)tokens * head_dim;
  x.x_strides[0] = (int64_t)heads * tokens * head_dim;
  return x;
}

static void set_strides4(int64_t* s, int64_t d1, int64_t d2, int64_t d3) {
  s[3] = 1;
  s[2] = d3;
  s[1] = d2 * d3;
  s[0] = d1 * d2 * d3;
}

static void check_quantize(void) {
  kvc_quant_format kivi2 = {2, 32, 0, 0};
  kvc_quantize_input x = input(1, 2, 64, 64);
  kvc_channel_blocks blocks; /* [1, 2, 2, 64, 2] */
  memset(&blocks, 0, sizeof blocks);
  blocks.codes = (uint32_t*)fake;
  blocks.codes_strides[4] = 1;
  blocks.codes_strides[3] = 2;
  blocks.codes_strides[2] = 128;
  blocks.codes_strides[1] = 256;
  blocks.codes_strides[0] = 512;
  blocks.scale.data = fake;
  blocks.minimum.data = fake;
  set_strides4(blocks.scale.strides, 2, 2, 64);
  set_strides4(blocks.minimum.strides, 2, 2, 64);
  blocks.capacity_blocks = 2;

  expect_invalid(kvc_quantize_channel_blocks(KVC_DTYPE_BF16, NULL, &kivi2, &blocks, NULL),
                 "x is null", "channel_blocks x NULL");
  expect_invalid(kvc_quantize_channel_blocks(KVC_DTYPE_BF16, &x, NULL, &blocks, NULL),
                 "format is null", "channel_blocks format NULL");
  expect_invalid(kvc_quantize_channel_blocks(KVC_DTYPE_BF16, &x, &kivi2, NULL, NULL), "out is null",
                 "channel_blocks out NULL");
  kvc_quant_format bad_bits = {3, 32, 0, 0};
  expect_invalid(kvc_quantize_channel_blocks(KVC_DTYPE_BF16, &x, &bad_bits, &blocks, NULL),
                 "bits = 3", "channel_blocks bits 3");
  expect_invalid(kvc_quantize_channel_blocks((kvc_dtype)7, &x, &kivi2, &blocks, NULL), "dtype 7",
                 "channel_blocks dtype 7");
  kvc_quantize_input ragged = input(1, 2, 33, 64);
  expect_invalid(kvc_quantize_channel_blocks(KVC_DTYPE_F16, &ragged, &kivi2, &blocks, NULL),
                 "not a multiple of group", "channel_blocks 33 tokens");
  kvc_quantize_input negative = input(1, -2, 64, 64);
  expect_invalid(kvc_quantize_channel_blocks(KVC_DTYPE_BF16, &negative, &kivi2, &blocks, NULL),
                 "non-negative", "channel_blocks heads -2");
  kvc_channel_blocks no_minimum = blocks;
  no_minimum.minimum.data = NULL;
  expect_invalid(kvc_quantize_channel_blocks(KVC_DTYPE_BF16, &x, &kivi2, &no_minimum, NULL),
                 "null codes, scale or minimum", "channel_blocks minimum NULL");
  kvc_channel_blocks small = blocks;
  small.capacity_blocks = 1;
  expect_invalid(kvc_quantize_channel_blocks(KVC_DTYPE_BF16, &x, &kivi2, &small, NULL),
                 "codes has shape", "channel_blocks capacity 1 block for 2");

  /* Token axis: INT4 symmetric, group 32 over head_dim 64; codes [1, 2, 64, 8]. */
  kvc_quant_format int4 = {4, 32, 1, 0};
  kvc_token_rows rows;
  memset(&rows, 0, sizeof rows);
  rows.codes = (uint32_t*)fake;
  set_strides4(rows.codes_strides, 2, 64, 8);
  rows.scale.data = fake;
  set_strides4(rows.scale.strides, 2, 64, 2);
  rows.capacity_rows = 64;
  expect_invalid(kvc_quantize_token_rows(KVC_DTYPE_BF16, &x, &int4, NULL, NULL, NULL),
                 "out is null", "token_rows out NULL");
  kvc_quant_format odd_group = {4, 48, 1, 0};
  expect_invalid(kvc_quantize_token_rows(KVC_DTYPE_BF16, &x, &odd_group, &rows, NULL, NULL),
                 "not a multiple of group", "token_rows group 48 for head_dim 64");
  kvc_quant_format asymmetric = {4, 32, 0, 0};
  expect_invalid(kvc_quantize_token_rows(KVC_DTYPE_BF16, &x, &asymmetric, &rows, NULL, NULL),
                 "minimum is null", "token_rows asymmetric without minimum");
  kvc_token_rows short_rows = rows;
  short_rows.capacity_rows = 8;
  expect_invalid(kvc_quantize_token_rows(KVC_DTYPE_F16, &x, &int4, &short_rows, NULL, NULL),
                 "codes has shape", "token_rows 64 tokens into 8 rows");

  /* Residuals and flushes. */
  kvc_f16_rows residual;
  memset(&residual, 0, sizeof residual);
  residual.data = fake;
  residual.batch = 1;
  residual.heads = 2;
  residual.capacity = 16;
  residual.head_dim = 64;
  set_strides4(residual.strides, 2, 16, 64);
  int32_t* counts = (int32_t*)fake;
  expect_invalid(kvc_append_rows(KVC_DTYPE_BF16, &x, &residual, NULL, NULL), "count is null",
                 "append_rows count NULL");
  expect_invalid(kvc_append_rows(KVC_DTYPE_BF16, &x, NULL, counts, NULL), "rows is null",
                 "append_rows rows NULL");
  kvc_f16_rows narrow = residual;
  narrow.head_dim = 32;
  expect_invalid(kvc_append_rows(KVC_DTYPE_BF16, &x, &narrow, counts, NULL), "rows has shape",
                 "append_rows head_dim 32 rows for 64");
  expect_invalid(kvc_flush_channel_residual(&residual, &kivi2, &blocks, counts, counts, NULL),
                 "must be a positive multiple of group", "flush_channel_residual R 16 group 32");
  expect_invalid(kvc_flush_channel_residual(&residual, &kivi2, &blocks, counts, NULL, NULL),
                 "quantized_rows is null", "flush_channel_residual quantized_rows NULL");
  expect_invalid(kvc_flush_token_window(&residual, -1, &int4, &rows, counts, counts, NULL),
                 "keep = -1", "flush_token_window keep -1");
  expect_invalid(kvc_flush_token_window(NULL, 0, &int4, &rows, counts, counts, NULL),
                 "window is null", "flush_token_window window NULL");

  /* FP8: codes [1, 2, 64, 64] bytes, scale [1, 2]. */
  kvc_fp8_quantize_args fp8;
  memset(&fp8, 0, sizeof fp8);
  fp8.scale = (float*)fake;
  fp8.scale_strides[0] = 2;
  fp8.scale_strides[1] = 1;
  fp8.codes = fake;
  set_strides4(fp8.codes_strides, 2, 64, 64);
  fp8.capacity_rows = 64;
  expect_invalid(kvc_quantize_fp8(KVC_DTYPE_BF16, &x, NULL, NULL), "args is null",
                 "quantize_fp8 args NULL");
  kvc_fp8_quantize_args bad = fp8;
  bad.kind = 5;
  expect_invalid(kvc_quantize_fp8(KVC_DTYPE_BF16, &x, &bad, NULL), "kind = 5",
                 "quantize_fp8 kind 5");
  bad = fp8;
  bad.scale_mode = 3;
  expect_invalid(kvc_quantize_fp8(KVC_DTYPE_BF16, &x, &bad, NULL), "scale_mode = 3",
                 "quantize_fp8 scale_mode 3");
  bad = fp8;
  bad.codes = NULL;
  expect_invalid(kvc_quantize_fp8(KVC_DTYPE_BF16, &x, &bad, NULL), "null scale or codes",
                 "quantize_fp8 codes NULL");
  bad = fp8;
  bad.capacity_rows = 63;
  bad.scale_mode = 1;
  expect_invalid(kvc_quantize_fp8(KVC_DTYPE_BF16, &x, &bad, NULL), "capacity_rows = 63",
                 "quantize_fp8 63 rows for 64 tokens");
  bad = fp8;
  bad.scale_mode = 1;
  bad.scale_strides[0] = bad.scale_strides[1] = 0;
  expect_invalid(kvc_quantize_fp8(KVC_DTYPE_F16, &x, &bad, NULL), "zero stride",
                 "quantize_fp8 computed scale into a broadcast scale");
}

static void check_selection(void) {
  size_t bytes = 0, select_bytes = 0;
  expect_invalid(kvc_snapkv_scores_workspace(8, 0, 1024, 2, &bytes), "window",
                 "snapkv_scores_workspace window 0");
  expect_invalid(kvc_snapkv_scores_workspace(8, 32, 16, 2, &bytes), "tokens >= window",
                 "snapkv_scores_workspace tokens 16 window 32");
  expect_invalid(kvc_snapkv_scores_workspace(8, 32, 1024, 2, NULL), "bytes is null",
                 "snapkv_scores_workspace bytes NULL");
  if (kvc_snapkv_scores_workspace(8, 32, 1024, 2, &bytes) != KVC_OK || bytes == 0) {
    fprintf(stderr, "snapkv_scores_workspace: %s (bytes %zu)\n", kvc_last_error(), bytes);
    ++failures;
  }
  expect_invalid(kvc_snapkv_select_workspace(8, 32, 1024, 2, 993, &select_bytes), "selected = 993",
                 "snapkv_select_workspace 993 of 992");
  if (kvc_snapkv_select_workspace(8, 32, 1024, 2, 128, &select_bytes) != KVC_OK ||
      select_bytes < bytes) {
    fprintf(stderr, "snapkv_select_workspace: %s (bytes %zu < %zu)\n", kvc_last_error(),
            select_bytes, bytes);
    ++failures;
  }

  /* q_window [8, 32, 128], k [2, 1024, 128]: fake pointers, validation only. */
  kvc_snapkv_args args;
  memset(&args, 0, sizeof args);
  args.q_window = fake;
  args.q_strides[0] = 32 * 128;
  args.q_strides[1] = 128;
  args.q_strides[2] = 1;
  args.k = fake;
  args.k_strides[0] = 1024 * 128;
  args.k_strides[1] = 128;
  args.k_strides[2] = 1;
  args.q_heads = 8;
  args.kv_heads = 2;
  args.window = 32;
  args.tokens = 1024;
  args.head_dim = 128;
  args.storage_heads = 2;
  args.kernel = 7;
  args.pool = 1;
  args.rounding = 1;
  args.workspace = fake;
  args.workspace_bytes = select_bytes;
  float* pooled = (float*)fake;
  const int64_t pooled_strides[2] = {992, 1};
  expect_invalid(kvc_snapkv_scores(KVC_DTYPE_BF16, NULL, pooled, pooled_strides, NULL),
                 "args is null", "snapkv_scores args NULL");
  expect_invalid(kvc_snapkv_scores(KVC_DTYPE_BF16, &args, NULL, pooled_strides, NULL),
                 "null tensor pointer", "snapkv_scores pooled NULL");
  kvc_snapkv_args bad = args;
  bad.k = NULL;
  expect_invalid(kvc_snapkv_scores(KVC_DTYPE_BF16, &bad, pooled, pooled_strides, NULL),
                 "null tensor pointer", "snapkv_scores k NULL");
  bad = args;
  bad.kv_heads = 3;
  expect_invalid(kvc_snapkv_scores(KVC_DTYPE_BF16, &bad, pooled, pooled_strides, NULL),
                 "positive multiple of Hkv", "snapkv_scores 8 q heads over 3 kv heads");
  bad = args;
  bad.storage_heads = 4;
  expect_invalid(kvc_snapkv_scores(KVC_DTYPE_F16, &bad, pooled, pooled_strides, NULL),
                 "pooled has shape", "snapkv_scores storage_heads 4");
  bad = args;
  bad.pool = 2;
  expect_invalid(kvc_snapkv_scores(KVC_DTYPE_BF16, &bad, pooled, pooled_strides, NULL), "pool = 2",
                 "snapkv_scores pool 2");
  bad = args;
  bad.kernel = 4;
  expect_invalid(kvc_snapkv_scores(KVC_DTYPE_BF16, &bad, pooled, pooled_strides, NULL),
                 "kernel = 4", "snapkv_scores kernel 4");
  bad = args;
  bad.workspace_bytes = 16;
  expect_invalid(kvc_snapkv_scores(KVC_DTYPE_BF16, &bad, pooled, pooled_strides, NULL),
                 "workspace has 16 bytes", "snapkv_scores workspace 16 bytes");
  bad = args;
  bad.workspace = fake + 4;
  expect_invalid(kvc_snapkv_scores(KVC_DTYPE_BF16, &bad, pooled, pooled_strides, NULL),
                 "16-byte aligned", "snapkv_scores misaligned workspace");
  expect_invalid(kvc_snapkv_scores((kvc_dtype)7, &args, pooled, pooled_strides, NULL), "dtype 7",
                 "snapkv_scores dtype 7");

  int32_t* keep = (int32_t*)fake;
  const int64_t keep_strides[2] = {160, 1};
  expect_invalid(kvc_snapkv_select(KVC_DTYPE_BF16, &args, 128, NULL, keep_strides, NULL),
                 "null tensor pointer", "snapkv_select keep NULL");
  expect_invalid(kvc_snapkv_select(KVC_DTYPE_BF16, &args, 993, keep, keep_strides, NULL),
                 "selected = 993", "snapkv_select 993 of 992");
  bad = args;
  bad.workspace_bytes = bytes - 1;
  expect_invalid(kvc_snapkv_select(KVC_DTYPE_BF16, &bad, 128, keep, keep_strides, NULL),
                 "workspace has", "snapkv_select small workspace");

  /* top-k over scores [4, 100]. */
  kvc_top_k_args top;
  memset(&top, 0, sizeof top);
  top.scores = (const float*)fake;
  top.scores_strides[0] = 100;
  top.scores_strides[1] = 1;
  top.rows = 4;
  top.n = 100;
  top.k = 101;
  top.indices = (int32_t*)fake;
  top.indices_strides[0] = 101;
  top.indices_strides[1] = 1;
  expect_invalid(kvc_top_k(NULL, NULL), "args is null", "top_k args NULL");
  expect_invalid(kvc_top_k(&top, NULL), "0 <= k <= n", "top_k k 101 of 100");
  top.k = 10;
  top.indices = NULL;
  expect_invalid(kvc_top_k(&top, NULL), "null tensor pointer", "top_k indices NULL");
  expect_invalid(kvc_top_k_workspace(4, 100, 101, &bytes), "k = 101", "top_k_workspace k 101");
  expect_invalid(kvc_top_k_workspace(-1, 100, 10, &bytes), "rows = -1", "top_k_workspace rows -1");
  if (kvc_top_k_workspace(4, 100, 10, &bytes) != KVC_OK) {
    fprintf(stderr, "top_k_workspace: %s\n", kvc_last_error());
    ++failures;
  }

  /* compaction: k, v [2, 64, 128] into [2, 16, 128]. */
  kvc_compact_args c;
  memset(&c, 0, sizeof c);
  c.keep = (const int32_t*)fake;
  c.keep_strides[0] = 16;
  c.keep_strides[1] = 1;
  c.k = fake;
  c.v = fake;
  c.k_out = fake;
  c.v_out = fake;
  c.k_strides[0] = c.v_strides[0] = 64 * 128;
  c.k_strides[1] = c.v_strides[1] = 128;
  c.k_strides[2] = c.v_strides[2] = 1;
  c.k_out_strides[0] = c.v_out_strides[0] = 16 * 128;
  c.k_out_strides[1] = c.v_out_strides[1] = 128;
  c.k_out_strides[2] = c.v_out_strides[2] = 1;
  c.heads = 2;
  c.tokens = 64;
  c.head_dim = 128;
  c.storage_heads = 2;
  c.kept = 16;
  expect_invalid(kvc_compact_rows(KVC_DTYPE_BF16, NULL, NULL), "args is null",
                 "compact_rows args NULL");
  kvc_compact_args bad_c = c;
  bad_c.v_out = NULL;
  expect_invalid(kvc_compact_rows(KVC_DTYPE_BF16, &bad_c, NULL), "null tensor pointer",
                 "compact_rows v_out NULL");
  bad_c = c;
  bad_c.storage_heads = 3;
  expect_invalid(kvc_compact_rows(KVC_DTYPE_BF16, &bad_c, NULL), "positive multiple of H",
                 "compact_rows 3 storage heads for 2");
  bad_c = c;
  bad_c.head_dim = 60;
  expect_invalid(kvc_compact_rows(KVC_DTYPE_F16, &bad_c, NULL), "multiple of 8",
                 "compact_rows head_dim 60");
  bad_c = c;
  bad_c.kept = -1;
  expect_invalid(kvc_compact_rows(KVC_DTYPE_BF16, &bad_c, NULL), "kept -1", "compact_rows kept -1");
  bad_c = c;
  bad_c.scores = (const float*)fake;
  bad_c.scores_strides[0] = 64;
  bad_c.scores_strides[1] = 1;
  bad_c.scored = 64;
  expect_invalid(kvc_compact_rows(KVC_DTYPE_BF16, &bad_c, NULL), "given together",
                 "compact_rows scores without scores_out");
  bad_c = c;
  bad_c.positions = (const int32_t*)fake;
  bad_c.positions_strides[0] = 64;
  bad_c.positions_strides[1] = 1;
  expect_invalid(kvc_compact_rows(KVC_DTYPE_BF16, &bad_c, NULL), "without positions_out",
                 "compact_rows positions without positions_out");
  expect_invalid(kvc_compact_rows((kvc_dtype)7, &c, NULL), "dtype 7", "compact_rows dtype 7");
}
/* ---- end of quantize + pack and SnapKV selection ------------------------------------------- */

int main(void) {
  if (kvc_decode_attention(KVC_DTYPE_BF16, NULL, NULL) != KVC_ERROR_INVALID_ARGUMENT) return 1;
  if (strstr(kvc_last_error(), "args is null") == NULL) return 2;
  kvc_decode_attention_args args;
  memset(&args, 0, sizeof args);
  if (kvc_decode_attention((kvc_dtype)7, &args, NULL) != KVC_ERROR_INVALID_ARGUMENT) return 3;
  if (strstr(kvc_last_error(), "null tensor pointer") == NULL &&
      strstr(kvc_last_error(), "dtype 7") == NULL)
    return 4;
  /* Quantized caches: a null description is an invalid argument, not a crash. */
  kvc_kivi_cache kivi;
  memset(&kivi, 0, sizeof kivi);
  if (kvc_decode_attention_kivi(KVC_DTYPE_BF16, NULL, &kivi, NULL) != KVC_ERROR_INVALID_ARGUMENT)
    return 5;
  if (strstr(kvc_last_error(), "common is null") == NULL) return 6;
  if (kvc_decode_attention_fp8(KVC_DTYPE_BF16, NULL, NULL, NULL) != KVC_ERROR_INVALID_ARGUMENT)
    return 7;
  check_quantize();
  check_selection();
  if (failures != 0) {
    fprintf(stderr, "c abi smoke: %d failed checks\n", failures);
    return 8;
  }
  puts("c abi smoke: ok");
  return 0;
}
