#!/usr/bin/env bash
# The GPU measurement in one command, for a short GPU lease (bench/gpu_run.py says what it does):
#   bench/gpu.sh [--budget-s 480] [--out var/gpu-results.md] [...]
# On an H100 or H200 it ends within the budget (8 minutes by default), loading included, and the
# report is rewritten after every measurement, so a run cut off still leaves what it measured.
# PYTHON picks the interpreter (default .venv/bin/python, made by scripts/setup.sh; on a GPU
# machine, one whose torch is a CUDA build, e.g. the production image's).
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-.venv/bin/python}

budget_s=480
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
  if [[ ${args[i]} == --budget-s ]]; then budget_s=${args[i + 1]}; fi
done
# The run skips what would not fit; this is the backstop for a step that ran over its estimate.
deadline_s=$(("${budget_s%.*}" + 30))
export PYTHONUNBUFFERED=1
exec timeout --kill-after=10 "$deadline_s" "$python" -m bench.gpu_run "$@"
