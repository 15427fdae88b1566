#!/usr/bin/env bash
# Sets up .venv, then runs the linters, the type checker and the whole test suite.
# Extra arguments go to pytest (e.g. scripts/test.sh -m "not ray" for the tests without a cluster).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/system-deps.sh

.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy

export RAY_USAGE_STATS_ENABLED=0 RAY_AUTH_MODE=disabled
# The wheels a GPU host with only PyTorch needs for bench/gpu.sh (tests/test_gpu_sh.py installs
# them): gathered here, where the package index answers; again, only what changed downloads.
.venv/bin/python -m bench.wheelhouse var/test-wheelhouse >/dev/null
export FLUX_SERVE_TEST_WHEELHOUSE=$PWD/var/test-wheelhouse
pytest=(.venv/bin/python -m pytest "$@")
# Ray binds a non-loopback node address; a private network namespace with only loopback keeps
# every test's traffic on 127.0.0.1. It needs root and iproute2; elsewhere the tests run as they are.
if [[ $(id -u) == 0 ]] && command -v ip >/dev/null; then
  namespace="flux-serve-test-$$"
  ip netns add "$namespace"
  trap 'ip netns delete "$namespace"' EXIT
  ip netns exec "$namespace" ip link set lo up
  ip netns exec "$namespace" "${pytest[@]}"
else
  echo "not root: running the tests outside a private network namespace" >&2
  "${pytest[@]}"
fi
