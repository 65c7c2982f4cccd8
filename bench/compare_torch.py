#!/usr/bin/env python3
"""kvc's CUDA decode attention against PyTorch's scaled_dot_product_attention, in one process.

Loads libkvc_c.so (the C ABI, include/kvc/c/kvc.h) with ctypes, allocates every tensor with
PyTorch on the GPU, checks that both outputs agree, and times both with CUDA events (median over
20 batches of 10 back-to-back calls, after warm-up) on the same tensors and the same stream.

    python3 bench/compare_torch.py --lib build/libkvc_c.so              # dense bf16
    python3 bench/compare_torch.py --lib build/libkvc_c.so --quantized  # + KIVI, INT8, FP8

SDPA runs with q as [B, Hq, 1, D], K/V as [B, Hkv, T, D] and enable_gqa=True (bf16), i.e. what an
engine without kvc would call; kvc's kernel gets the same K/V without expansion. With --quantized
the same K/V are also quantized through the C ABI's quantize entries (KIVI-2/4 with G = 32: keys
per channel, all quantized, values per token but for the newest 128 kept in f16 as KIVI does;
INT8 symmetric per token; FP8 E4M3 with per-head scales) and kvc's fused decode attention over each cache is timed in the same process, against
SDPA over the bf16 K/V and against kvc's dense kernel; its output is compared with the dense
result (the difference is the format's quantization error, printed; a sanity bound per format
catches a broken kernel).
"""
import argparse
import ctypes

import torch
import torch.nn.functional as F

from torch_support import check, load_kvc, median_ms

KVC_DTYPE_BF16 = 1
I64_3, I64_4, I64_5 = ctypes.c_int64 * 3, ctypes.c_int64 * 4, ctypes.c_int64 * 5


class DecodeArgs(ctypes.Structure):
    _fields_ = [
        ("q", ctypes.c_void_p), ("q_strides", I64_3),
        ("k", ctypes.c_void_p), ("k_strides", I64_4),
        ("v", ctypes.c_void_p), ("v_strides", I64_4),
        ("lengths", ctypes.c_void_p),
        ("out", ctypes.c_void_p), ("out_strides", I64_3),
        ("batch", ctypes.c_int), ("q_heads", ctypes.c_int), ("kv_heads", ctypes.c_int),
        ("head_dim", ctypes.c_int), ("max_length", ctypes.c_int),
        ("scale", ctypes.c_float),
        ("workspace", ctypes.c_void_p), ("workspace_floats", ctypes.c_size_t),
    ]


# ---- the quantized caches' structs of include/kvc/c/kvc.h ----------------------------------------
class CachePart(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("batch_stride", ctypes.c_int64),
                ("head_stride", ctypes.c_int64)]


class QuantizedCommon(ctypes.Structure):
    _fields_ = [
        ("q", ctypes.c_void_p), ("q_strides", I64_3),
        ("out", ctypes.c_void_p), ("out_strides", I64_3),
        ("batch", ctypes.c_int), ("q_heads", ctypes.c_int), ("kv_heads", ctypes.c_int),
        ("head_dim", ctypes.c_int), ("max_length", ctypes.c_int),
        ("scale", ctypes.c_float),
        ("lengths", ctypes.c_void_p),
        ("workspace", ctypes.c_void_p), ("workspace_floats", ctypes.c_size_t),
    ]


class KiviCache(ctypes.Structure):
    _fields_ = [("bits", ctypes.c_int), ("group", ctypes.c_int)] + [
        (name, CachePart) for name in ("key_codes", "key_scale", "key_minimum", "key_residual",
                                       "value_codes", "value_scale", "value_minimum",
                                       "value_residual")] + [
        ("quantized_keys", ctypes.c_void_p), ("quantized_values", ctypes.c_void_p)]


class IntCache(ctypes.Structure):
    _fields_ = [("bits", ctypes.c_int), ("group", ctypes.c_int), ("symmetric", ctypes.c_int),
                ("params_f32", ctypes.c_int)] + [
        (name, CachePart) for name in ("key_codes", "value_codes", "key_scale", "value_scale",
                                       "key_minimum", "value_minimum", "key_window",
                                       "value_window")] + [("quantized", ctypes.c_void_p)]


class Fp8Cache(ctypes.Structure):
    _fields_ = [("kind", ctypes.c_int), ("key_codes", CachePart), ("value_codes", CachePart),
                ("key_scale", ctypes.c_void_p), ("value_scale", ctypes.c_void_p)]


class QuantizeInput(ctypes.Structure):
    _fields_ = [("x", ctypes.c_void_p), ("x_strides", I64_4), ("batch", ctypes.c_int),
                ("heads", ctypes.c_int), ("tokens", ctypes.c_int), ("head_dim", ctypes.c_int)]


class QuantFormat(ctypes.Structure):
    _fields_ = [("bits", ctypes.c_int), ("group", ctypes.c_int), ("symmetric", ctypes.c_int),
                ("params_f32", ctypes.c_int)]


class QuantParams(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("strides", I64_4)]


class ChannelBlocks(ctypes.Structure):
    _fields_ = [("codes", ctypes.c_void_p), ("codes_strides", I64_5), ("scale", QuantParams),
                ("minimum", QuantParams), ("capacity_blocks", ctypes.c_int)]


class TokenRows(ctypes.Structure):
    _fields_ = [("codes", ctypes.c_void_p), ("codes_strides", I64_4), ("scale", QuantParams),
                ("minimum", QuantParams), ("capacity_rows", ctypes.c_int)]


class Fp8QuantizeArgs(ctypes.Structure):
    _fields_ = [("kind", ctypes.c_int), ("scale_mode", ctypes.c_int), ("scale", ctypes.c_void_p),
                ("scale_strides", ctypes.c_int64 * 2), ("codes", ctypes.c_void_p),
                ("codes_strides", I64_4), ("capacity_rows", ctypes.c_int),
                ("first_row", ctypes.c_void_p)]


def load(path):
    lib = load_kvc(path)
    lib.kvc_decode_attention_workspace.argtypes = [ctypes.c_int] * 5 + [ctypes.POINTER(ctypes.c_size_t)]
    lib.kvc_decode_attention.argtypes = [ctypes.c_int, ctypes.POINTER(DecodeArgs), ctypes.c_void_p]
    lib.kvc_quantized_decode_attention_workspace.argtypes = (
        [ctypes.c_int] * 5 + [ctypes.POINTER(ctypes.c_size_t)])
    for name, cache in (("kivi", KiviCache), ("int", IntCache), ("fp8", Fp8Cache)):
        getattr(lib, f"kvc_decode_attention_{name}").argtypes = [
            ctypes.c_int, ctypes.POINTER(QuantizedCommon), ctypes.POINTER(cache), ctypes.c_void_p]
    lib.kvc_quantize_channel_blocks.argtypes = [
        ctypes.c_int, ctypes.POINTER(QuantizeInput), ctypes.POINTER(QuantFormat),
        ctypes.POINTER(ChannelBlocks), ctypes.c_void_p]
    lib.kvc_quantize_token_rows.argtypes = [
        ctypes.c_int, ctypes.POINTER(QuantizeInput), ctypes.POINTER(QuantFormat),
        ctypes.POINTER(TokenRows), ctypes.c_void_p, ctypes.c_void_p]
    lib.kvc_quantize_fp8.argtypes = [ctypes.c_int, ctypes.POINTER(QuantizeInput),
                                     ctypes.POINTER(Fp8QuantizeArgs), ctypes.c_void_p]
    return lib


def part(t):
    """A [B, H, ...] tensor as a kvc_cache_part (strides in elements of its type)."""
    return CachePart(t.data_ptr(), t.stride(0), t.stride(1))


def params(t):
    return QuantParams(t.data_ptr(), I64_4(*t.stride()))


def quantize_input(x):
    b, h, n, d = x.shape
    return QuantizeInput(x.data_ptr(), I64_4(*x.stride()), b, h, n, d)


def token_rows(lib, x, bits, group, symmetric, stream):
    """Every token of x [B, H, T, D] quantized per token: (codes, scale, minimum or None)."""
    b, h, n, d = x.shape
    codes = torch.empty(b, h, n, d * bits // 32, device=x.device, dtype=torch.int32)
    scale = torch.empty(b, h, n, d // group, device=x.device, dtype=torch.float16)
    minimum = None if symmetric else torch.empty_like(scale)
    rows = TokenRows(codes.data_ptr(), I64_4(*codes.stride()), params(scale),
                     params(minimum) if minimum is not None else QuantParams(None, I64_4(0, 0, 0, 0)),
                     n)
    fmt = QuantFormat(bits, group, 1 if symmetric else 0, 0)
    check(lib, lib.kvc_quantize_token_rows(KVC_DTYPE_BF16, ctypes.byref(quantize_input(x)),
                                           ctypes.byref(fmt), ctypes.byref(rows), None, stream))
    return codes, scale, minimum


def quantized_caches(lib, k, v, lengths, stream):
    """{name: (decode entry, cache struct, tensors kept alive, K+V bytes)} for the formats."""
    b, h, n, d = k.shape
    dev = k.device
    counts = torch.full((b, h), n, device=dev, dtype=torch.int32)
    caches = {}
    for bits in (2, 4):
        g = 32
        key_codes = torch.empty(b, h, n // g, d, g * bits // 32, device=dev, dtype=torch.int32)
        key_scale = torch.empty(b, h, n // g, d, device=dev, dtype=torch.float16)
        key_minimum = torch.empty_like(key_scale)
        blocks = ChannelBlocks(key_codes.data_ptr(), I64_5(*key_codes.stride()), params(key_scale),
                               params(key_minimum), n // g)
        check(lib, lib.kvc_quantize_channel_blocks(
            KVC_DTYPE_BF16, ctypes.byref(quantize_input(k)), ctypes.byref(QuantFormat(bits, g, 0, 0)),
            ctypes.byref(blocks), stream))
        # KIVI's layout at a multiple of R = 128 tokens: keys all quantized (their residual is
        # empty), values quantized but for the newest R tokens, which stay f16.
        r = 128
        value_codes, value_scale, value_minimum = token_rows(lib, v[:, :, :n - r], bits, g, False,
                                                             stream)
        key_residual = torch.zeros(b, h, 8, d, device=dev, dtype=torch.float16)  # empty
        value_residual = v[:, :, n - r:].to(torch.float16).contiguous()
        quantized_values = torch.full((b, h), n - r, device=dev, dtype=torch.int32)
        cache = KiviCache(bits, g, part(key_codes), part(key_scale), part(key_minimum),
                          part(key_residual), part(value_codes), part(value_scale),
                          part(value_minimum), part(value_residual), counts.data_ptr(),
                          quantized_values.data_ptr())
        # Everything the struct points at stays referenced here (a freed count array would be
        # reused by PyTorch's allocator: inconsistent counts give NaN outputs, by contract).
        tensors = [key_codes, key_scale, key_minimum, value_codes, value_scale, value_minimum,
                   value_residual, key_residual, quantized_values, counts]
        nbytes = sum(t.numel() * t.element_size() for t in tensors[:7])
        caches[f"kivi-{bits}"] = (lib.kvc_decode_attention_kivi, cache, tensors, nbytes)
    key = token_rows(lib, k, 8, d, True, stream)
    value = token_rows(lib, v, 8, d, True, stream)
    window = torch.zeros(b, h, 8, d, device=dev, dtype=torch.float16)  # empty windows
    none = CachePart(None, 0, 0)
    cache = IntCache(8, 0, 1, 0, part(key[0]), part(value[0]), part(key[1]), part(value[1]),
                     none, none, part(window), part(window), counts.data_ptr())
    tensors = [key[0], key[1], value[0], value[1], window, counts]
    caches["int8"] = (lib.kvc_decode_attention_int, cache, tensors,
                      sum(t.numel() * t.element_size() for t in tensors[:4]))
    fp8 = []
    for x in (k, v):
        codes = torch.empty(b, h, n, d, device=dev, dtype=torch.uint8)
        scale = torch.empty(b, h, device=dev, dtype=torch.float32)
        args = Fp8QuantizeArgs(0, 1, scale.data_ptr(), (ctypes.c_int64 * 2)(*scale.stride()),
                               codes.data_ptr(), I64_4(*codes.stride()), n, None)
        check(lib, lib.kvc_quantize_fp8(KVC_DTYPE_BF16, ctypes.byref(quantize_input(x)),
                                        ctypes.byref(args), stream))
        fp8 += [codes, scale]
    cache = Fp8Cache(0, part(fp8[0]), part(fp8[2]), fp8[1].data_ptr(), fp8[3].data_ptr())
    caches["fp8-e4m3"] = (lib.kvc_decode_attention_fp8, cache, fp8,
                          sum(t.numel() * t.element_size() for t in fp8))
    return caches


class Dense:
    """Gaussian bf16 q [B, Hq, D] and K/V [B, Hkv, T, D] on the GPU, kvc's dense decode attention
    over them through the C ABI (run_kvc, into out) and SDPA over the same tensors (run_sdpa)."""

    def __init__(self, lib, batch, q_heads, kv_heads, head_dim, context):
        torch.manual_seed(0)
        dev = "cuda"
        self.q = torch.randn(batch, q_heads, head_dim, device=dev, dtype=torch.bfloat16)
        self.k = torch.randn(batch, kv_heads, context, head_dim, device=dev, dtype=torch.bfloat16)
        self.v = torch.randn(batch, kv_heads, context, head_dim, device=dev, dtype=torch.bfloat16)
        self.lengths = torch.full((batch,), context, device=dev, dtype=torch.int32)
        self.out = torch.empty_like(self.q)
        floats = ctypes.c_size_t()
        check(lib, lib.kvc_decode_attention_workspace(batch, q_heads, kv_heads, head_dim, context,
                                                      ctypes.byref(floats)))
        self.workspace = torch.empty(max(floats.value, 1), device=dev, dtype=torch.float32)
        q, k, v, out = self.q, self.k, self.v, self.out
        self.args = DecodeArgs(q.data_ptr(), I64_3(*q.stride()), k.data_ptr(), I64_4(*k.stride()),
                               v.data_ptr(), I64_4(*v.stride()), self.lengths.data_ptr(),
                               out.data_ptr(), I64_3(*out.stride()), batch, q_heads, kv_heads,
                               head_dim, context, 0.0, self.workspace.data_ptr(), floats.value)
        self.stream = torch.cuda.current_stream().cuda_stream
        self.lib = lib

    def run_kvc(self):
        check(self.lib, self.lib.kvc_decode_attention(KVC_DTYPE_BF16, ctypes.byref(self.args),
                                                      self.stream))

    def run_sdpa(self):
        return F.scaled_dot_product_attention(self.q[:, :, None, :], self.k, self.v,
                                              enable_gqa=True)


# A broken kernel gives garbage; each format's own error on Gaussian K/V stays far below these
# (relative to the dense output; measured values are printed next to them).
SANITY = {"kivi-2": 0.8, "kivi-4": 0.3, "int8": 0.05, "fp8-e4m3": 0.15}


def compare_quantized(lib, batch, q_heads, kv_heads, head_dim, context):
    """Rows (format, kvc ms, dense kvc ms, sdpa ms, bytes ratio, rel. difference to dense)."""
    dense = Dense(lib, batch, q_heads, kv_heads, head_dim, context)
    q, k, v, dense_out, stream = dense.q, dense.k, dense.v, dense.out, dense.stream
    lengths = torch.full((batch, kv_heads), context, device="cuda", dtype=torch.int32)
    dense.run_kvc()
    dense_ms = median_ms(dense.run_kvc)
    sdpa_ms = median_ms(dense.run_sdpa)
    dense_bytes = 2 * k.numel() * k.element_size()
    floats = ctypes.c_size_t()
    check(lib, lib.kvc_quantized_decode_attention_workspace(batch, q_heads, kv_heads, head_dim,
                                                            context, ctypes.byref(floats)))
    ws = torch.empty(max(floats.value, 1), device="cuda", dtype=torch.float32)
    out = torch.empty_like(q)
    common = QuantizedCommon(q.data_ptr(), I64_3(*q.stride()), out.data_ptr(),
                             I64_3(*out.stride()), batch, q_heads, kv_heads, head_dim, context,
                             0.0, lengths.data_ptr(), ws.data_ptr(), floats.value)
    rows = []
    caches = quantized_caches(lib, k, v, lengths, stream)
    for name, (entry, cache, tensors, nbytes) in caches.items():
        run = lambda: check(lib, entry(KVC_DTYPE_BF16, ctypes.byref(common), ctypes.byref(cache), stream))
        out.fill_(float("nan"))
        run()
        difference = ((out.double() - dense_out.double()).norm() / dense_out.double().norm()).item()
        assert difference < SANITY[name], f"{name}: output {difference:.3f} away from dense"
        rows.append((name, median_ms(run), dense_ms, sdpa_ms, nbytes / dense_bytes, difference))
    del caches
    return rows


def compare(lib, batch, q_heads, kv_heads, head_dim, context):
    dense = Dense(lib, batch, q_heads, kv_heads, head_dim, context)
    q, k, v, out = dense.q, dense.k, dense.v, dense.out
    dense.run_kvc()
    reference = dense.run_sdpa()[:, :, 0, :]
    # The exact result in fp64 for the first two sequences (fp64 SDPA expands K/V per query head).
    n = min(batch, 2)
    exact = F.scaled_dot_product_attention(q[:n, :, None, :].double(), k[:n].double(),
                                           v[:n].double(), enable_gqa=True)[:, :, 0, :]
    kvc_error = ((out[:n].double() - exact).norm() / exact.norm()).item()
    sdpa_error = ((reference[:n].double() - exact).norm() / exact.norm()).item()
    del exact
    kvc_ms = median_ms(dense.run_kvc)
    sdpa_ms = median_ms(dense.run_sdpa)
    return kvc_ms, sdpa_ms, kvc_error, sdpa_error


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lib", default="build/libkvc_c.so")
    parser.add_argument("--quantized", action="store_true",
                        help="also time kvc's fused attention over KIVI-2/4, INT8 and FP8 caches")
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
    if not options.quantized:
        return
    print()
    print(f"{'format':>9} {'B':>3} {'context':>8} {'kvc ms':>8} {'dense ms':>8} {'sdpa ms':>8} "
          f"{'/dense':>7} {'/sdpa':>7} {'bytes':>6} {'diff vs dense':>13}")
    shapes = [(8, 32, 8, 128, c) for c in (4096, 32768, 131072)]
    shapes += [(1, 32, 8, 128, 32768), (32, 32, 8, 128, 32768)]
    for shape in shapes:
        b, hq, hkv, d, t = shape
        for name, ms, dense_ms, sdpa_ms, byte_ratio, difference in compare_quantized(lib, *shape):
            print(f"{name:>9} {b:>3} {t:>8} {ms:>8.3f} {dense_ms:>8.3f} {sdpa_ms:>8.3f} "
                  f"{ms / dense_ms:>7.2f} {ms / sdpa_ms:>7.2f} {byte_ratio:>6.3f} "
                  f"{difference:>13.2e}")
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
