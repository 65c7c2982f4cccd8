#!/usr/bin/env python3
"""SnapKV selection at prefill (kvc) against the layer's causal prefill attention (PyTorch SDPA).

Times `F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)` for one layer
(bf16, Hq 32, Hkv 8, D 128, batch 1) at each context, and, given the JSON output of
kvc_cuda_bench's snapkv_selection benchmark from the same machine, prints kvc's selection time
(scores + pooling + top-k + compaction) as a fraction of SDPA's prefill time (target <= 2%).

    kvc_cuda_bench --benchmark_filter=snapkv --benchmark_format=json > selection.json
    python3 bench/compare_torch_selection.py --kvc-json selection.json
"""
import argparse
import json

import torch
import torch.nn.functional as F

from torch_support import median_ms


def kvc_times(path):
    """{context: (total ms, scores ms, top-k ms, compaction ms)} from Google Benchmark JSON."""
    if not path:
        return {}
    with open(path) as f:
        report = json.load(f)
    times = {}
    for b in report["benchmarks"]:
        if not b["name"].startswith("snapkv_selection/"):
            continue
        context = int(b["name"].split("T:")[1].split("/")[0])
        times[context] = (b["ms"], b["scores_ms"], b["topk_ms"], b["compact_ms"])
    return times


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kvc-json", help="kvc_cuda_bench --benchmark_format=json output")
    parser.add_argument("--contexts", default="4096,16384,32768,131072")
    args = parser.parse_args()
    kvc = kvc_times(args.kvc_json)
    print(f"device: {torch.cuda.get_device_name()}; torch {torch.__version__}")
    print("| context | SDPA causal prefill ms | kvc selection ms | scores | top-k | compaction "
          "| kvc / SDPA |")
    print("|---|---|---|---|---|---|---|")
    for context in (int(c) for c in args.contexts.split(",")):
        torch.manual_seed(0)
        q = torch.randn(1, 32, context, 128, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(1, 8, context, 128, device="cuda", dtype=torch.bfloat16)
        v = torch.randn(1, 8, context, 128, device="cuda", dtype=torch.bfloat16)
        sdpa = median_ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                                enable_gqa=True),
                         warmup=3, repeats=5, batch=2)
        del q, k, v
        if context in kvc:
            total, scores, top, compact = kvc[context]
            print(f"| {context} | {sdpa:.3f} | {total:.3f} | {scores:.3f} | {top:.3f} | "
                  f"{compact:.3f} | {100 * total / sdpa:.2f}% |")
        else:
            print(f"| {context} | {sdpa:.3f} | - | - | - | - | - |")


if __name__ == "__main__":
    main()
