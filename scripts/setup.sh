# Sourced by scripts/demo.sh and scripts/test.sh: installs the Debian packages kvc builds with when
# they are missing, and configures the build directory ($KVC_BUILD_DIR, default build) for Release,
# with CUDA (arch 90a) when the toolkit is installed.
packages=(cmake g++ libeigen3-dev libfmt-dev catch2 libbenchmark-dev)
missing=()
for package in "${packages[@]}"; do
  dpkg -s "$package" >/dev/null 2>&1 || missing+=("$package")
done
if ((${#missing[@]} > 0)); then
  echo "installing missing packages: ${missing[*]}"
  sudo=()
  if [[ $(id -u) -ne 0 ]]; then sudo=(sudo); fi
  "${sudo[@]}" apt-get update
  DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y "${missing[@]}"
fi

build_dir=${KVC_BUILD_DIR:-build}
configure=(-S . -B "$build_dir" -DCMAKE_BUILD_TYPE=Release)
nvcc=/usr/local/cuda/bin/nvcc
if [[ -x $nvcc ]]; then
  configure+=(-DCMAKE_CUDA_COMPILER="$nvcc" -DCMAKE_CUDA_ARCHITECTURES=90a)
fi
