#!/usr/bin/env bash
# Build llama-cpp-python with CUDA (all layers can then run on the GPU) and install it into /tmp/site, on a
# machine with nvcc, cmake, ninja and scikit-build-core (the lent GPU machine):
#   bash scripts/build_llama_cuda.sh SOURCE.tar.gz
# SOURCE is llama-cpp-python's source archive (pip download --no-binary=:all: llama-cpp-python); llama.cpp's
# vocabulary files, docs, tests, examples and other backends may be left out of it (README: "llama.cpp on a GPU").
# CUDA_ARCH picks the architecture (default 90a: Hopper, H100 / H200). About 3 minutes on 16 cores.
set -euo pipefail
src=${1:?SOURCE.tar.gz}
arch=${CUDA_ARCH:-90a}
if [ -f /tmp/site/.llama-cuda ]; then echo "llama-cpp-python with CUDA is already in /tmp/site"; exit 0; fi
start=$(date +%s)
rm -rf /tmp/llama-build /tmp/llama-wheel && mkdir -p /tmp/llama-build
tar xzf "$src" -C /tmp/llama-build
cd /tmp/llama-build/llama_cpp_python-*
CMAKE_ARGS="-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=$arch -DLLAVA_BUILD=OFF -DGGML_NATIVE=OFF" \
  CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) \
  python3 -m pip wheel -q --no-build-isolation --no-deps --no-cache-dir -w /tmp/llama-wheel .
python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site /tmp/llama-wheel/llama_cpp_python-*.whl
touch /tmp/site/.llama-cuda
echo "llama-cpp-python built with CUDA (arch $arch) in $(( $(date +%s) - start )) s"
