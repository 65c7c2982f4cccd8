"""What the bench/compare_torch*.py scripts share: CUDA-event timing and the C ABI's loader.

    from torch_support import median_ms, load_kvc, check
    lib = load_kvc("build/libkvc_c.so")
    ms = median_ms(lambda: run(), warmup=5, calls=50)
"""
import ctypes
import statistics

import torch


def median_ms(fn, warmup=5, calls=50):
    """Median of `calls` timed calls of fn (CUDA events on the current stream) after warm-up."""
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


def load_kvc(path):
    """libkvc_c.so with kvc_last_error's return type set (argtypes are each script's business)."""
    lib = ctypes.CDLL(path)
    lib.kvc_last_error.restype = ctypes.c_char_p
    return lib


def check(lib, status):
    if status != 0:
        raise RuntimeError(f"kvc status {status}: {lib.kvc_last_error().decode()}")
