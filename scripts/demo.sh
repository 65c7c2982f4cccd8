#!/usr/bin/env bash
# Builds the kvc tool (Release) and evaluates every compression policy on the bundled real KV dump
# tests/data/seq0 (see tests/data/README.md): one table per family. Methods that need offline
# inputs are calibrated first, on the other bundled document (tests/data/seq1) where the method
# allows it.
#
#   scripts/demo.sh                  # KVC_BUILD_DIR overrides the build directory (default build)
set -euo pipefail
cd "$(dirname "$0")/.."

data=tests/data/seq0
calibration=tests/data/seq1

source scripts/setup.sh
cmake "${configure[@]}" >/dev/null
cmake --build "$build_dir" -j"$(nproc)" --target kvc
kvc="$build_dir/kvc"

# Offline inputs, written under the build directory.
work="$build_dir/demo"
rm -rf "$work"
mkdir -p "$work/seq0"
echo "== calibration"
"$kvc" calibrate prefixkv --data "$calibration" --ratio 0.5 --out "$work/prefixkv_ratios.json"
"$kvc" calibrate cq --data "$calibration" --channels 4 --bits 4 --out "$work/cq_4c4b.safetensors"
"$kvc" calibrate cq --data "$calibration" --channels 2 --bits 4 --out "$work/cq_2c4b.safetensors"
# Locret's scores belong to the evaluated sequence (a trained head scores each token); the proxy
# derives them from seq0's prompt attention only and is labelled as a proxy. The eval reads them
# from the dump directory, so seq0 is linked next to its scores.
for file in "$data"/*.npy "$data"/meta.json; do ln -s "$PWD/$file" "$work/seq0/"; done
"$kvc" calibrate locret-proxy --data "$data" --out "$work/seq0/scores.npy"
"$kvc" calibrate loki --data "$calibration" --out "$work/loki_basis.safetensors"
"$kvc" calibrate palu --data "$calibration" --group 2 --ratio 0.5 --out "$work/palu_basis.safetensors"

run() {
  local title=$1
  shift
  local args=()
  for policy in "$@"; do args+=(--policy "$policy"); done
  echo
  echo "== $title"
  "$kvc" eval --data "$work/seq0" "${args[@]}"
}

run "eviction (budget about 128 of the 384 prompt tokens)" \
  'full' \
  'streamingllm(sink=4,recent=124)' \
  'snapkv(budget=128,window=16,kernel=7,pool=max)' \
  'pyramidkv(budget=128,window=16,kernel=7,pool=max)' \
  'adakv(budget=128,window=16,kernel=7,pool=max)' \
  'h2o(heavy=64,recent=64)' \
  'h2o(variant=prefill,budget=128,window=16)' \
  'tova(budget=128)' \
  'knorm(budget=128)' \
  'windowkv(budget=128)' \
  'duoattention(sink=16,recent=112)' \
  'locret(budget=128,local_len=16,chunk_size=128,stabilizers=32)' \
  "prefixkv(ratios=$work/prefixkv_ratios.json)" \
  'moa(sink=4,a=64,b=0.125)'

run "quantization" \
  'kivi(bits=2,group=32,residual=32)' \
  'kivi(bits=4,group=32,residual=32)' \
  'kivi(bits=8,group=32,residual=32)' \
  'int8' \
  'int4' \
  'int4(sym=false,group=32)' \
  'fp8(kind=e4m3)' \
  'fp8(kind=e5m2)' \
  "cq(codebook=$work/cq_4c4b.safetensors)" \
  "cq(codebook=$work/cq_2c4b.safetensors)" \
  'vidkv'

run "compositions" \
  'snapkv(budget=128,window=16,kernel=7,pool=max)+kivi(bits=2,group=32,residual=32)' \
  'snapkv(budget=128,window=16,kernel=7,pool=max)+mikv(hi=8,lo=2)' \
  'h2o(heavy=64,recent=64)+mikv(hi=8,lo=2)'

# ShadowKV's defaults act only past 4096 prompt tokens; on a 384-token prompt it runs at a small
# scale (rank 32, 4 outlier chunks, 64 selected tokens per step).
run "merging, low-rank keys, layer sharing" \
  'kvmerger(budget=0.5)' \
  'kvmerger(budget=0.35)' \
  'snapkv(budget=192,window=8,kernel=7,pool=max)+kvmerger(window=8)' \
  'h2o(heavy=96,recent=96)+cam' \
  'elastic(ratio=0.5)' \
  'shadowkv(budget=64,rank=32,outliers=4,threshold=0)' \
  'shadowkv(budget=64,rank=32,outliers=4,threshold=0)+kivi(bits=2,group=32,residual=32)' \
  'think(ratio=0.5)' \
  "loki(basis=$work/loki_basis.safetensors)" \
  "palu(basis=$work/palu_basis.safetensors)" \
  "palu(basis=$work/palu_basis.safetensors,bits=4)" \
  'minicache' \
  'minicache+kivi(bits=4,group=32,residual=32)' \
  'cla(share=2)'

# On a GPU machine (a build with CUDA), the policies that have a CUDA cache run once more with
# their caches on the device: same protocol, same bytes and kept tokens, GPU kernels throughout.
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  echo
  echo "== the same on the GPU (kvc eval --device cuda)"
  "$kvc" eval --device cuda --data "$work/seq0" \
    --policy 'full' \
    --policy 'streamingllm(sink=4,recent=124)' \
    --policy 'snapkv(budget=128,window=16,kernel=7,pool=max)' \
    --policy 'h2o(heavy=64,recent=64)' \
    --policy 'kivi(bits=2,group=32,residual=32)' \
    --policy 'int8' \
    --policy 'fp8(kind=e4m3)' \
    --policy 'snapkv(budget=128,window=16,kernel=7,pool=max)+kivi(bits=2,group=32,residual=32)'
fi
