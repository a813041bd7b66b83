#!/usr/bin/env bash
# The wheels scripts/gpu_run.sh installs on a GPU machine whose Python (3.12, x86-64) has torch and transformers
# but not the study's configuration stack, the gpus launcher (hydra/launcher=gpus runs on submitit_local) or
# bitsandbytes. Run it where pip reaches the package registry, then carry DIR (default .whl, ignored by git):
#   bash scripts/gpu_wheels.sh [DIR]
# Versions are the ones the test suite runs with; hydra-core 1.3 needs omegaconf < 2.4 and antlr4 4.9.*.
set -euo pipefail
dir=${1:-.whl}
py=${PYTHON:-python3}
mkdir -p "$dir"
names=(hydra_core omegaconf hydra_submitit_launcher submitit bitsandbytes antlr4_python3_runtime)
for n in "${names[@]}"; do rm -f "$dir/$n"-*.whl; done  # one version of each: two stop the whole install there
target=(--no-deps --only-binary=:all: --python-version 3.12 --implementation cp
        --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64
        --platform manylinux2014_x86_64 --platform any)
"$py" -m pip download -q "${target[@]}" -d "$dir" hydra-core==1.3.8 omegaconf==2.3.1 \
  hydra-submitit-launcher==1.2.0 submitit==1.5.4 bitsandbytes==0.50.2
# published as source only: the wheel built here is pure Python and runs there
"$py" -m pip wheel -q --no-deps -w "$dir" antlr4-python3-runtime==4.9.3
ls -1 "$dir"
du -sh "$dir"
