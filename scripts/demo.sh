#!/usr/bin/env bash
# Builds the kvc tool (Release) and evaluates a set of compression policies on the bundled real KV
# dump tests/data/seq0 (see tests/data/README.md).
#
#   scripts/demo.sh                  # KVC_BUILD_DIR overrides the build directory (default build)
set -euo pipefail
cd "$(dirname "$0")/.."

data=tests/data/seq0
policies=(
  'full'
  'streamingllm(sink=4,recent=124)'
  'snapkv(budget=128,window=16,kernel=7,pool=max)'
  'kivi(bits=2,group=32,residual=32)'
  'kivi(bits=4,group=32,residual=32)'
  'snapkv(budget=128,window=16,kernel=7,pool=max)+kivi(bits=2,group=32,residual=32)'
)

source scripts/setup.sh
cmake "${configure[@]}" >/dev/null
cmake --build "$build_dir" -j"$(nproc)" --target kvc

policy_args=()
for policy in "${policies[@]}"; do policy_args+=(--policy "$policy"); done
"$build_dir/kvc" eval --data "$data" "${policy_args[@]}"
