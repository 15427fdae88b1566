#!/usr/bin/env bash
# The GPU measurement in one command, for a short GPU lease (bench/gpu_run.py says what it does):
#   bench/gpu.sh [--budget-s 480] [--out var/gpu-results.md] [--wheelhouse DIR] [...]
# On an H100 or H200 it ends within the budget (8 minutes by default), loading included, and the
# report is rewritten after every measurement, so a run cut off still leaves what it measured.
# PYTHON picks the interpreter (default .venv/bin/python, made by scripts/setup.sh, else python3;
# on a GPU machine, one whose torch is a CUDA build, e.g. the production image's). On a host
# that has PyTorch but nothing else of ours and no package index, --wheelhouse DIR installs the
# wheels bench/wheelhouse.py gathered into a folder of the run's own first (nothing else changes).
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-.venv/bin/python}
[[ -n ${PYTHON:-} || -x $python ]] || python=python3

budget_s=480
wheelhouse=
args=()
while (($#)); do
  case $1 in
    --wheelhouse) wheelhouse=$2; shift 2; continue ;;
    --budget-s) budget_s=$2 ;;
  esac
  args+=("$1")
  shift
done

if [[ -n $wheelhouse ]]; then
  site=$(mktemp -d -t flux-gpu-site-XXXXXX)
  trap 'rm -rf "$site"' EXIT
  "$python" -m pip install --quiet --no-index --no-deps --no-compile --target "$site" \
    "$wheelhouse"/*.whl
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
# The run skips what would not fit; this is the backstop for a step that ran over its estimate.
deadline_s=$(("${budget_s%.*}" + 30))
export PYTHONUNBUFFERED=1
timeout --kill-after=10 "$deadline_s" "$python" -m bench.gpu_run "${args[@]}"
