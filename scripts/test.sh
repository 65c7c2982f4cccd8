#!/usr/bin/env bash
# Configures, builds and tests kvc (Release), installing missing Debian packages first.
#
#   scripts/test.sh                     # build/ ; ctest's exit code is this script's
#   KVC_BUILD_DIR=/tmp/kvc scripts/test.sh
set -euo pipefail
cd "$(dirname "$0")/.."

source scripts/setup.sh
cmake "${configure[@]}"
cmake --build "$build_dir" -j"$(nproc)"

status=0
ctest --test-dir "$build_dir" --output-on-failure -j2 || status=$?
exit "$status"
