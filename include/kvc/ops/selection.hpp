// kvc/ops/selection.hpp: the SnapKV prefill path on the GPU (ALGORITHMS.md P1-P4, section 4):
// observation-window scores with GQA reduction and pooling, top-k per row, and compaction of the
// survivors' K/V rows (positions and scores optional) into a new buffer, for ragged per-head
// counts.
//
//   kvc::ops::snapkv_select(kvc::Cuda{s}, q_window, k, selected, 7, kvc::ops::Pool::max, keep, ws);
//   kvc::ops::compact_rows(kvc::Cuda{s}, keep, {}, k, v, k_out, v_out);  // keep [S, selected + W]
//
// Same results as the CPU reference ops (window_scores, pool1d, top_k, compact_rows) on the same
// inputs: scores within rounding, index sets equal, compaction bit-exact. Every op is asynchronous
// on the stream, allocates nothing and takes a caller-owned workspace sized by its *_bytes helper.
#pragma once

#include <cstddef>
#include <cstdint>

#include "kvc/core/backend.hpp"
#include "kvc/core/dtype.hpp"
#include "kvc/core/view.hpp"
#include "kvc/ops/scores.hpp"

namespace kvc::ops {

// ---- scores: P1 + P4 + P2 ----------------------------------------------------------------------
// Per query head h (KV head h / (Hq / Hkv)) the window rows' softmax over the visible keys (row i,
// absolute token T - W + i, sees keys j <= T - W + i), each probability computed in fp32, rounded
// as options.rounding says and summed over the W rows (or averaged: options.reduction), for the
// T - W prefix keys. The storage-head count S = pooled.size(0) picks the GQA behaviour:
//   S == Hkv: the g = Hq / Hkv query heads of a KV head are averaged (reduce before pool);
//   S == Hq:  one row per query head (repeat mode; with Hq == Hkv both are the same).
// Then pool1d along the tokens (odd kernel, stride 1, padding kernel / 2; avg divides by kernel,
// max pads with -inf). head_dim 64 or 128; rows of q_window and k 16-byte aligned (pointers
// aligned, strides multiples of 8 elements, last axis contiguous). NaN/Inf inputs are not
// detected on the device: they give NaN scores.
std::size_t snapkv_scores_workspace_bytes(int q_heads, int window, int tokens, int storage_heads);
void snapkv_scores(Cuda, DeviceView<const bf16, 3> q_window,  // [Hq, W, D], the last W queries
                   DeviceView<const bf16, 3> k,               // [Hkv, T, D]
                   int kernel, Pool pool, DeviceView<float, 2> pooled,  // [S, T - W]
                   DeviceView<std::byte, 1> workspace,  // snapkv_scores_workspace_bytes
                   const WindowScoreOptions& options = {});
void snapkv_scores(Cuda, DeviceView<const f16, 3> q_window, DeviceView<const f16, 3> k, int kernel,
                   Pool pool, DeviceView<float, 2> pooled, DeviceView<std::byte, 1> workspace,
                   const WindowScoreOptions& options = {});

// ---- top-k: P3
// ----------------------------------------------------------------------------------- Per row the k
// highest scores (ties: lower position), written in ascending position. Exactly the CPU top_k's
// set. -0 equals +0; NaN (rejected by the CPU op, unseen on the host here) ranks below -inf. The
// workspace is currently unused (top_k_workspace_bytes returns 0); it stays in the signature so
// that a multi-block select for very long rows can use it.
std::size_t top_k_workspace_bytes(int rows, int n, int k);
void top_k(Cuda, DeviceView<const float, 2> scores,  // [rows, n]
           int k,                                    // 0 <= k <= n
           DeviceView<std::int32_t, 2> indices,      // [rows, k], ascending within a row
           DeviceView<std::byte, 1> workspace);      // top_k_workspace_bytes(rows, n, k)

// ---- SnapKV selection: scores + top-k + the window ---------------------------------------------
// keep[s] = the `selected` prefix tokens with the highest pooled scores (ascending), then the W
// window tokens T - W ... T - 1: the keep table compact_rows takes (snapkv_select on the CPU).
std::size_t snapkv_select_workspace_bytes(int q_heads, int window, int tokens, int storage_heads,
                                          int selected);
void snapkv_select(Cuda, DeviceView<const bf16, 3> q_window,  // [Hq, W, D]
                   DeviceView<const bf16, 3> k,               // [Hkv, T, D]
                   int selected, int kernel, Pool pool,
                   DeviceView<std::int32_t, 2> keep,    // [S, selected + W]
                   DeviceView<std::byte, 1> workspace,  // snapkv_select_workspace_bytes
                   const WindowScoreOptions& options = {});
void snapkv_select(Cuda, DeviceView<const f16, 3> q_window, DeviceView<const f16, 3> k,
                   int selected, int kernel, Pool pool, DeviceView<std::int32_t, 2> keep,
                   DeviceView<std::byte, 1> workspace, const WindowScoreOptions& options = {});

// ---- compaction
// ---------------------------------------------------------------------------------- Row i <
// counts[s] of output head s is the source row keep[s, i] of head s * H / S (S = keep rows, H =
// k.size(0): S == H plain, S a multiple of H for repeat-mode GQA). Rows at or past counts[s] are
// left untouched. An empty `counts` view (data == nullptr) means every head keeps Kmax rows; counts
// are clamped to [0, Kmax]. Optional side arrays move with the rows: positions [H, T] (int32, e.g.
// RoPE positions after earlier evictions; without them the output gets keep[s, i]) and scores [S,
// n] (a keep index >= n, e.g. SnapKV's window, gets +inf). A keep index outside [0, T) cannot be
// checked on the host: its K/V row is filled with NaN and its position with -1. k/v rows 16-byte
// aligned. Bit-exact copies.
struct CompactSide {
  DeviceView<const std::int32_t, 2> positions{};  // [H, T] or empty
  DeviceView<std::int32_t, 2> positions_out{};    // [S, Kmax] or empty
  DeviceView<const float, 2> scores{};            // [S, n] or empty
  DeviceView<float, 2> scores_out{};              // [S, Kmax] or empty
};
void compact_rows(Cuda, DeviceView<const std::int32_t, 2> keep,  // [S, Kmax]
                  DeviceView<const std::int32_t, 1> counts,      // [S] or empty
                  DeviceView<const bf16, 3> k,                   // [H, T, D]
                  DeviceView<const bf16, 3> v,                   // [H, T, D]
                  DeviceView<bf16, 3> k_out,                     // [S, Kmax, D]
                  DeviceView<bf16, 3> v_out,                     // [S, Kmax, D]
                  const CompactSide& side = {});
void compact_rows(Cuda, DeviceView<const std::int32_t, 2> keep,
                  DeviceView<const std::int32_t, 1> counts, DeviceView<const f16, 3> k,
                  DeviceView<const f16, 3> v, DeviceView<f16, 3> k_out, DeviceView<f16, 3> v_out,
                  const CompactSide& side = {});

// ---- gather of byte rows ------------------------------------------------------------------------
// dst(s, i, :) = src(s, keep[s, i], :) for i < counts[s] (an empty `counts`: every i < Kmax; rows
// at or past the count are left untouched), rows of any byte size: the codes, scale rows and f16
// windows of a quantized store whose tokens a decode-time eviction drops (the per-head CPU
// equivalent is compact_rows(Cpu, keep, rows, width) of kvc/ops/select.hpp). A keep index outside
// [0, T) fills its row with 0xFF bytes (NaN for f16 rows). Bit-exact; dst must not overlap src.
void gather_rows(Cuda, DeviceView<const std::int32_t, 2> keep,  // [S, Kmax]
                 DeviceView<const std::int32_t, 1> counts,      // [S] or empty
                 DeviceView<const std::byte, 3> src,            // [S, T, row bytes]
                 DeviceView<std::byte, 3> dst);                 // [S, Kmax, row bytes]

}  // namespace kvc::ops
