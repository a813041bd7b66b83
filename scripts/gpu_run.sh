#!/usr/bin/env bash
# Run a stage of the study on a machine whose Python already has torch and transformers (the lent GPU machine):
#   bash scripts/gpu_run.sh OUT_DIR STAGE [Hydra overrides for stages/STAGE.py ...]   (STAGE setup: no stage)
#   bash scripts/gpu_run.sh $OUT bench_gpu                                  # the default GPU grid
#   bash scripts/gpu_run.sh $OUT bench_gpu -m bench_gpu=full precision=nf4,fp4  # a part of the full grid
#   bash scripts/gpu_run.sh $OUT evaluate evaluate.cpu.enabled=false evaluate.llama_cpp.enabled=false evaluate.score=false
#   LLAMA_SRC=.whl/llama-src.tar.gz bash scripts/gpu_run.sh $OUT convert convert.quants=[q8_0,q4_k_m,q4_0]
# Installs the wheels carried in .whl/ (bitsandbytes, hydra-core, ...) into /tmp/site, builds llama-cpp-python with
# CUDA from $LLAMA_SRC if given (scripts/build_llama_cuda.sh, beside the model build), builds phi-2-random if
# models/ lacks it, and runs the stage with results and metrics in gpu-work/ (which stays between calls on the
# same machine, so a stopped sweep resumes). At the end gpu-work/ is packed into OUT_DIR/gpu-work.tgz and the
# log and timings are in OUT_DIR. MLflow is not needed there: `inferlab log-records` logs the records back home.
set -uo pipefail
out=${1:?OUT_DIR}; stage=${2:?STAGE}; shift 2
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH="/tmp/site:$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if [ -d .whl ] && [ ! -f /tmp/site/.installed ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && touch /tmp/site/.installed
fi
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem --format=csv | tee -a "$out/gpu.txt"
python3 -c "import torch, transformers, bitsandbytes; print('torch', torch.__version__, 'transformers', transformers.__version__, 'bitsandbytes', bitsandbytes.__version__)" | tee -a "$out/gpu.txt"
start=$(date +%s)
llama_pid=
if [ -n "${LLAMA_SRC:-}" ]; then  # llama-cpp-python with CUDA, built beside the model build (bench_gpu's llama.cpp points)
  bash scripts/build_llama_cuda.sh "$LLAMA_SRC" > "$out/llama-build.log" 2>&1 &
  llama_pid=$!
fi
if [ ! -f models/phi-2-random/hf/config.json ]; then
  python3 stages/download.py model=phi-2-random tracking.enabled=false 2>&1 | tail -3
fi
if [ -n "$llama_pid" ]; then
  wait "$llama_pid" || { echo "building llama-cpp-python with CUDA failed:"; tail -30 "$out/llama-build.log"; }
  tail -1 "$out/llama-build.log"
fi
built=$(date +%s)
if [ "$stage" = setup ]; then echo "set up in $((built - start)) s"; exit 0; fi  # wheels, llama.cpp, model only
if [ ! -d gpu-work/results ]; then  # first call on this machine: start from the committed records
  mkdir -p gpu-work && cp -r results gpu-work/results && cp -r metrics gpu-work/metrics
fi
mode=()
if [ "${1:-}" = "-m" ]; then mode=(-m); shift; fi  # Hydra wants -m before the overrides, not among them
timeout "${BENCH_TIMEOUT:-560}" python3 "stages/$stage.py" "${mode[@]}" model=phi-2-random tracking.enabled=false \
  paths.results="$PWD/gpu-work/results" paths.metrics="$PWD/gpu-work/metrics" "$@" 2>&1 | tee -a "$out/$stage.log" \
  | grep -E "\] \[|bandwidth|sweep|Error|error|evaluate:"
end=$(date +%s)
echo "$stage $*: model build $((built - start)) s; stage (model loads included) $((end - built)) s" | tee -a "$out/gpu.txt"
tar czf "$out/gpu-work.tgz" gpu-work/results gpu-work/metrics
ls -la "$out"
