#!/usr/bin/env bash
# Every GPU benchmark in one go, so a short GPU loan is enough (issue 13, item 6). From the repository root:
#     bash bench/gpu.sh            # writes bench/gpu-results/*.log and prints each JSON line
# 1. train_speed --gpu: ours against eai-sparsify 1.3.3 in the same run, both configs (d=768 with 32,768
#    latents, k=32 at 8,192 tokens/step; d=4096 with 131,072 latents, k=64 at 4,096 tokens/step), with FVU
#    after the same steps and peak memory. Goal: >= 2x sparsify's tokens/s at equal FVU.
# 2. harvest_speed --gpu: a GPT-2-sized model, 131,072 latents. Goal: harvest <= 1.25x the bare forward.
# On a machine with no package registry, carry eai-sparsify and its pure-Python needs as wheels: here,
#     pip download --no-deps --only-binary=:all: --python-version 3.12 -d WHEELS eai-sparsify==1.3.3 natsort \
#         simple-parsing docstring-parser
# there, `pip install --no-deps --target /tmp/site WHEELS/*.whl` and PYTHONPATH=/tmp/site.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
out=${OUT:-bench/gpu-results}
mkdir -p "$out"
python - <<'PY'
import importlib.util, sys
import torch
if not torch.cuda.is_available():
    sys.exit("bench/gpu.sh: no CUDA device visible to torch")
missing = [m for m in ("sparsify", "transformers", "einops") if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"bench/gpu.sh: missing {', '.join(missing)}; pip install --no-deps eai-sparsify==1.3.3 natsort "
             "simple-parsing docstring-parser einops accelerate")
print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}")
PY
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/device.txt"
status=0
run() {  # name, command...: one benchmark; a failure is reported and the next one still runs
    local name=$1; shift
    echo "== $name: $*"
    if "$@" >"$out/$name.log" 2>&1; then tail -n 12 "$out/$name.log"; else status=1; echo "FAILED, see $out/$name.log"; tail -n 5 "$out/$name.log"; fi
}
run train_speed python bench/train_speed.py --gpu
run harvest_speed python bench/harvest_speed.py --gpu
exit $status
