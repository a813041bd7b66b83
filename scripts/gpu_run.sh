#!/usr/bin/env bash
# Run a stage of the study on a machine whose Python already has torch and transformers (the lent GPU machine):
#   bash scripts/gpu_run.sh OUT_DIR STAGE [Hydra overrides for stages/STAGE.py ...]   (STAGE setup: no stage)
#   bash scripts/gpu_run.sh $OUT bench_gpu                                  # the default GPU grid
#   bash scripts/gpu_run.sh $OUT bench_gpu -m bench_gpu=full precision=nf4,fp4  # a part of the full grid
#   bash scripts/gpu_run.sh $OUT evaluate evaluate.cpu.enabled=false evaluate.llama_cpp.enabled=false evaluate.score=false
#   LLAMA_SRC=.whl/llama-src.tar.gz bash scripts/gpu_run.sh $OUT convert convert.quants=[q8_0,q4_k_m,q4_0]
#   bash scripts/gpu_run.sh $OUT parallel-check [overrides]   # several GPUs: the default GPU grid on every GPU at
#       once, then alone (bench_gpu.gpus=1), then `inferlab parallel-check`'s table; stopped at the call's time
#       budget (CALL_BUDGET, 560 s), the same command resumes where it stopped (rm $GPU_WORK/*.done: measure anew)
# Installs the wheels carried in .whl/ (bash scripts/gpu_wheels.sh .whl, where pip works: hydra-core, omegaconf,
# submitit and its Hydra launcher, bitsandbytes) into /tmp/site, builds llama-cpp-python with CUDA from $LLAMA_SRC
# if given (scripts/build_llama_cuda.sh, beside the model build), builds $MODEL (default phi-2-random) if it is not
# built yet, and runs the stage with models, results and metrics under $GPU_WORK (default /tmp/inferlab: /tmp is
# what stays between calls on a warm machine, so a stopped sweep resumes). At the end gpu-work/ is packed into
# OUT_DIR/gpu-work.tgz and the log and timings are in OUT_DIR. MLflow is not needed there: `inferlab log-records`
# logs the records back home.
set -uo pipefail
out=${1:?OUT_DIR}; stage=${2:?STAGE}; shift 2
cd "$(dirname "$0")/.."
start=$(date +%s)
work=${GPU_WORK:-/tmp/inferlab}
mkdir -p "$work" "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="/tmp/site:$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1  # NVLink multicast stays off
wheels=$(ls .whl/*.whl 2>/dev/null | sort)
if [ -n "$wheels" ] && [ "$wheels" != "$(cat /tmp/site/.installed 2>/dev/null)" ]; then  # installed once per set
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $wheels \
    && echo "$wheels" > /tmp/site/.installed
fi
missing=$(python3 - <<'EOF'
import importlib.util
mods = ("hydra", "omegaconf", "antlr4", "submitit", "hydra_plugins.hydra_submitit_launcher", "bitsandbytes")
print(" ".join(m for m in mods if importlib.util.find_spec(m) is None))
EOF
)
if [ -n "$missing" ]; then
  echo "missing on this machine: $missing. Where pip works: bash scripts/gpu_wheels.sh .whl, then carry .whl"
  exit 2
fi
nvidia-smi --query-gpu=index,name,memory.total,driver_version,clocks.max.sm,clocks.max.mem,pci.bus_id --format=csv \
  | tee -a "$out/gpu.txt"
nvidia-smi topo -m 2>&1 | tee -a "$out/gpu.txt" | sed -n '1,/^$/p'  # each GPU's cores and NUMA node
python3 -c "import torch, transformers, bitsandbytes; print('torch', torch.__version__, 'transformers', transformers.__version__, 'bitsandbytes', bitsandbytes.__version__)" | tee -a "$out/gpu.txt"
llama_pid=
if [ -n "${LLAMA_SRC:-}" ]; then  # llama-cpp-python with CUDA, built beside the model build (bench_gpu's llama.cpp points)
  bash scripts/build_llama_cuda.sh "$LLAMA_SRC" > "$out/llama-build.log" 2>&1 &
  llama_pid=$!
fi
if [ ! -d "$work/gpu-work/results" ]; then  # first call on this machine: start from the committed records
  # (before the model build, whose download record would otherwise make the folder first)
  mkdir -p "$work/gpu-work" && cp -r results "$work/gpu-work/results" && cp -r metrics "$work/gpu-work/metrics"
fi
model=${MODEL:-phi-2-random}
common=("model=$model" tracking.enabled=false "paths.models=$work/models" "paths.results=$work/gpu-work/results"
        "paths.metrics=$work/gpu-work/metrics")
if [ ! -f "$work/models/$model/hf/config.json" ]; then
  python3 stages/download.py "${common[@]}" 2>&1 | tail -3
fi
if [ -n "$llama_pid" ]; then
  wait "$llama_pid" || { echo "building llama-cpp-python with CUDA failed:"; tail -30 "$out/llama-build.log"; }
  tail -1 "$out/llama-build.log"
fi
built=$(date +%s)
if [ "$stage" = setup ]; then echo "set up in $((built - start)) s"; exit 0; fi  # wheels, llama.cpp, model only
pack() { tar czf "$out/gpu-work.tgz" -C "$work" gpu-work/results gpu-work/metrics; ls -la "$out"; }
progress='\[[0-9]+/[0-9]+\]|GPU [0-9]+:|sweep|page cache|bandwidth|Error|error|evaluate:'

if [ "$stage" = parallel-check ]; then
  deadline=$((start + ${CALL_BUDGET:-560}))
  tag=$(echo "$*" | md5sum | cut -c1-8)  # a run is done for these overrides only
  for run in parallel alone; do
    [ -f "$work/$run-$tag.done" ] && { echo "$run run: done in an earlier call"; continue; }
    left=$((deadline - $(date +%s)))
    if [ "$left" -lt 60 ]; then
      echo "stopped before the $run run: this call's time is spent; the same command continues"; pack; exit 3
    fi
    gpus=0; [ "$run" = alone ] && gpus=1
    t0=$(date +%s)
    timeout -k 20 "$left" python3 stages/bench_gpu.py "${common[@]}" "bench_gpu.gpus=$gpus" "$@" 2>&1 \
      | tee -a "$out/bench_gpu-$run.log" | grep -E "$progress"
    rc=${PIPESTATUS[0]}
    echo "$run run (bench_gpu.gpus=$gpus): exit $rc after $(($(date +%s) - t0)) s" | tee -a "$out/gpu.txt"
    if [ "$rc" -ne 0 ]; then
      echo "the $run run stopped; the same command resumes it where it stopped"; pack; exit 3
    fi
    touch "$work/$run-$tag.done"
  done
  python3 -m inferlab.cli parallel-check bench_gpu "${common[@]}" --max-time-ratio 0.6 2>&1 \
    | tee "$out/parallel-check.md"
  rc=${PIPESTATUS[0]}
  pack
  exit "$rc"
fi

mode=()
if [ "${1:-}" = "-m" ]; then mode=(-m); shift; fi  # Hydra wants -m before the overrides, not among them
timeout "${BENCH_TIMEOUT:-560}" python3 "stages/$stage.py" "${mode[@]}" "${common[@]}" "$@" 2>&1 \
  | tee -a "$out/$stage.log" | grep -E "$progress"
end=$(date +%s)
echo "$stage $*: model build $((built - start)) s; stage (model loads included) $((end - built)) s" | tee -a "$out/gpu.txt"
pack
