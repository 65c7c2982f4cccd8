#!/usr/bin/env python3
"""kvc's CUDA decode attention against PyTorch's scaled_dot_product_attention, in one process.

Loads libkvc_c.so (the C ABI, include/kvc/c/kvc.h) with ctypes, allocates every tensor with
PyTorch on the GPU, checks that both outputs agree, and times both with CUDA events (median of the
timed calls after warm-up) on the same tensors and the same stream.

    python3 bench/compare_torch.py --lib build/libkvc_c.so

SDPA runs with q as [B, Hq, 1, D], K/V as [B, Hkv, T, D] and enable_gqa=True (bf16), i.e. what an
engine without kvc would call; kvc's kernel gets the same K/V without expansion.
"""
import argparse
import ctypes
import statistics

import torch
import torch.nn.functional as F

KVC_DTYPE_BF16 = 1


class DecodeArgs(ctypes.Structure):
    _fields_ = [
        ("q", ctypes.c_void_p), ("q_strides", ctypes.c_int64 * 3),
        ("k", ctypes.c_void_p), ("k_strides", ctypes.c_int64 * 4),
        ("v", ctypes.c_void_p), ("v_strides", ctypes.c_int64 * 4),
        ("lengths", ctypes.c_void_p),
        ("out", ctypes.c_void_p), ("out_strides", ctypes.c_int64 * 3),
        ("batch", ctypes.c_int), ("q_heads", ctypes.c_int), ("kv_heads", ctypes.c_int),
        ("head_dim", ctypes.c_int), ("max_length", ctypes.c_int),
        ("scale", ctypes.c_float),
        ("workspace", ctypes.c_void_p), ("workspace_floats", ctypes.c_size_t),
    ]


def load(path):
    lib = ctypes.CDLL(path)
    lib.kvc_last_error.restype = ctypes.c_char_p
    lib.kvc_decode_attention_workspace.argtypes = [ctypes.c_int] * 5 + [ctypes.POINTER(ctypes.c_size_t)]
    lib.kvc_decode_attention.argtypes = [ctypes.c_int, ctypes.POINTER(DecodeArgs), ctypes.c_void_p]
    return lib


def check(lib, status):
    if status != 0:
        raise RuntimeError(f"kvc status {status}: {lib.kvc_last_error().decode()}")


def median_ms(fn, warmup=5, calls=50):
    for _ in range(warmup):
        fn()
    start = torch.cuda.Event(enable_timing=True)
    stop = torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(calls):
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop))
    return statistics.median(times)


def compare(lib, batch, q_heads, kv_heads, head_dim, context):
    torch.manual_seed(0)
    dev = "cuda"
    q = torch.randn(batch, q_heads, head_dim, device=dev, dtype=torch.bfloat16)
    k = torch.randn(batch, kv_heads, context, head_dim, device=dev, dtype=torch.bfloat16)
    v = torch.randn(batch, kv_heads, context, head_dim, device=dev, dtype=torch.bfloat16)
    lengths = torch.full((batch,), context, device=dev, dtype=torch.int32)
    out = torch.empty_like(q)
    floats = ctypes.c_size_t()
    check(lib, lib.kvc_decode_attention_workspace(batch, q_heads, kv_heads, head_dim, context,
                                                  ctypes.byref(floats)))
    workspace = torch.empty(max(floats.value, 1), device=dev, dtype=torch.float32)
    args = DecodeArgs(
        q.data_ptr(), (ctypes.c_int64 * 3)(*q.stride()),
        k.data_ptr(), (ctypes.c_int64 * 4)(*k.stride()),
        v.data_ptr(), (ctypes.c_int64 * 4)(*v.stride()),
        lengths.data_ptr(),
        out.data_ptr(), (ctypes.c_int64 * 3)(*out.stride()),
        batch, q_heads, kv_heads, head_dim, context, 0.0,
        workspace.data_ptr(), floats.value)
    stream = torch.cuda.current_stream().cuda_stream

    def run_kvc():
        check(lib, lib.kvc_decode_attention(KVC_DTYPE_BF16, ctypes.byref(args), stream))

    def run_sdpa():
        return F.scaled_dot_product_attention(q[:, :, None, :], k, v, enable_gqa=True)

    run_kvc()
    reference = run_sdpa()[:, :, 0, :]
    # The exact result in fp64 for the first two sequences (fp64 SDPA expands K/V per query head).
    n = min(batch, 2)
    exact = F.scaled_dot_product_attention(q[:n, :, None, :].double(), k[:n].double(),
                                           v[:n].double(), enable_gqa=True)[:, :, 0, :]
    kvc_error = ((out[:n].double() - exact).norm() / exact.norm()).item()
    sdpa_error = ((reference[:n].double() - exact).norm() / exact.norm()).item()
    del exact
    kvc_ms = median_ms(run_kvc)
    sdpa_ms = median_ms(run_sdpa)
    return kvc_ms, sdpa_ms, kvc_error, sdpa_error


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lib", default="build/libkvc_c.so")
    options = parser.parse_args()
    lib = load(options.lib)
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}")
    print(f"{'B':>3} {'Hq':>3} {'Hkv':>3} {'D':>4} {'context':>8} {'kvc ms':>8} {'sdpa ms':>8} "
          f"{'kvc/sdpa':>8} {'kvc rel err':>11} {'sdpa rel err':>12}")
    shapes = [(8, 32, 8, 128, c) for c in (4096, 16384, 32768, 131072)]
    shapes += [(1, 32, 8, 128, 32768), (32, 32, 8, 128, 32768), (1, 32, 8, 128, 131072)]
    for shape in shapes:
        kvc_ms, sdpa_ms, kvc_error, sdpa_error = compare(lib, *shape)
        b, hq, hkv, d, t = shape
        print(f"{b:>3} {hq:>3} {hkv:>3} {d:>4} {t:>8} {kvc_ms:>8.3f} {sdpa_ms:>8.3f} "
              f"{kvc_ms / sdpa_ms:>8.2f} {kvc_error:>11.2e} {sdpa_error:>12.2e}")
        # Both are bf16-output computations of the same function: each must be close to the exact
        # fp64 result (bf16 rounding of the output is ~2^-9 relative).
        assert kvc_error < 1e-2, f"kvc output disagrees with the exact result: {kvc_error}"
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
