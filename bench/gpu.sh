#!/usr/bin/env bash
# Suite 2 (engine: HAIF's vLLM runtime vs `vllm serve`) on a GPU machine, in at most
# 8 minutes. Needs Python 3.11 with network access to PyPI (or a venv prepared with
# `pip install -e '.[vllm,bench]'`), one or more NVIDIA GPUs. Bare Ray Serve is left
# out: a third engine would not fit in the 8 minutes, nor beside the other two in the
# GPU's memory (each takes --gpu-memory-utilization 0.4).
#
#   bash bench/gpu.sh            # results: bench/results/engine.json, engine.png
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1

VENV=${VENV:-.venv-gpu}
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q -e '.[vllm,bench]'
fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader

# On a GPU: CUDA graphs on (no --enforce-eager), bfloat16 is not needed for the tiny
# model; concurrency 1/8/32 as on CPU, more requests per level for steadier numbers.
timeout 480 "$VENV/bin/python" -m bench.engine \
  --no-enforce-eager --no-bare-serve --requests-per-user 4 --max-tokens 128 --concurrency 1 8 32
