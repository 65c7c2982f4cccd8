"""What the bench/compare_torch*.py scripts share: CUDA-event timing and the C ABI's loader.

    from torch_support import median_ms, load_kvc, check
    lib = load_kvc("build/libkvc_c.so")
    ms = median_ms(lambda: run())
"""
import ctypes
import statistics

import torch


def median_ms(fn, warmup=5, repeats=20, batch=10):
    """Median over `repeats` of the mean time of `batch` back-to-back calls of fn (CUDA events on
    the current stream), after warm-up. Back to back, the host's per-call work (ctypes, PyTorch's
    dispatch) overlaps the GPU's instead of being timed, as in kvc_cuda_bench: timed one call at a
    time from an idle stream, a 50 us kernel also measured the host's launch path."""
    for _ in range(warmup):
        fn()
    start = torch.cuda.Event(enable_timing=True)
    stop = torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(repeats):
        start.record()
        for _ in range(batch):
            fn()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop) / batch)
    return statistics.median(times)


def load_kvc(path):
    """libkvc_c.so with kvc_last_error's return type set (argtypes are each script's business)."""
    lib = ctypes.CDLL(path)
    lib.kvc_last_error.restype = ctypes.c_char_p
    return lib


def check(lib, status):
    if status != 0:
        raise RuntimeError(f"kvc status {status}: {lib.kvc_last_error().decode()}")
