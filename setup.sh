#!/usr/bin/env bash
# Set up inferlab on a fresh machine: a virtual environment in .venv with everything the study needs.
#   bash setup.sh
# torch: if the environment has none, the CPU build torch==2.13.0 is installed (INFERLAB_TORCH overrides the
# requirement, e.g. INFERLAB_TORCH="torch --index-url https://download.pytorch.org/whl/cu128" on a GPU box).
# llama-cpp-python ships only as source: it is built once into a wheel cache (about 3 minutes on 2 cores) and
# installed from there afterwards (INFERLAB_WHEELHOUSE, default ~/.cache/inferlab/wheels). It is built for this
# machine's processor (-march=native: AVX-512 where there is one); for a wheel that runs on other processors set
# CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF".
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
WHEELHOUSE=${INFERLAB_WHEELHOUSE:-$HOME/.cache/inferlab/wheels}
LLAMA_REQ="llama-cpp-python>=0.3.16,<0.4"

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip wheel
if ! python -c "import torch" 2>/dev/null; then
  echo "installing torch (${INFERLAB_TORCH:-torch==2.13.0})"
  # shellcheck disable=SC2086
  python -m pip install -q ${INFERLAB_TORCH:-torch==2.13.0}
fi
mkdir -p "$WHEELHOUSE"
if ! ls "$WHEELHOUSE"/llama_cpp_python-*.whl >/dev/null 2>&1; then
  echo "building llama-cpp-python once into $WHEELHOUSE (about 3 minutes on 2 cores)"
  CMAKE_ARGS="${CMAKE_ARGS:--DLLAVA_BUILD=OFF}" \
    python -m pip wheel -q --no-deps --no-cache-dir -w "$WHEELHOUSE" "$LLAMA_REQ"  # no cached build made with other flags
fi
python -m pip install -q --find-links "$WHEELHOUSE" -e ".[gpu,eval,report,serve,dev]"
echo "inferlab is set up in .venv ($(python -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'))"
