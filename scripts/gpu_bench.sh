#!/usr/bin/env bash
# Run the GPU sweep on a machine whose Python already has torch and transformers (the lent GPU machine):
#   bash scripts/gpu_bench.sh OUT_DIR [Hydra overrides for stages/bench_gpu.py ...]
# Installs the wheels carried in .whl/ (bitsandbytes, hydra-core, ...) into /tmp/site, builds phi-2-random
# if models/ lacks it, runs the sweep, and copies records, metrics and logs to OUT_DIR. MLflow is not needed
# there: `inferlab log-records results/bench_gpu/*.jsonl` logs the records back home.
set -uo pipefail
out=${1:?OUT_DIR}; shift
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH="/tmp/site:$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, transformers, bitsandbytes; print('torch', torch.__version__, 'transformers', transformers.__version__, 'bitsandbytes', bitsandbytes.__version__)" | tee -a "$out/gpu.txt"
start=$(date +%s)
if [ ! -f models/phi-2-random/hf/config.json ]; then
  python3 stages/download.py model=phi-2-random tracking.enabled=false 2>&1 | tail -3
fi
built=$(date +%s)
# records and metrics are written straight under OUT_DIR, so a run stopped at its time limit still brings back
# every finished point (and the sweep's manifest, to resume it)
mkdir -p "$out/results/bench_gpu"
cp -n results/bench_gpu/*.jsonl results/bench_gpu/.sweep-*.json "$out/results/bench_gpu/" 2>/dev/null
timeout "${BENCH_TIMEOUT:-560}" python3 stages/bench_gpu.py model=phi-2-random tracking.enabled=false \
  paths.results="$out/results" paths.metrics="$out/metrics" "$@" 2>&1 | tee "$out/bench_gpu.log" \
  | grep -E "\] \[|bandwidth|sweep|Error|error"
end=$(date +%s)
echo "model build: $((built - start)) s; sweep (model loads included): $((end - built)) s" | tee -a "$out/gpu.txt"
ls -la "$out" "$out/results/bench_gpu"
