#!/usr/bin/env bash
# Runs the throughput benchmark: bench/run.sh --preset small [--markdown PATH] [...]
# or the LoRA one: bench/run.sh loras --preset small [...]
# or the jobs one: bench/run.sh jobs [--jobs 4] [--images 16] [...]
#
# As root it runs inside a private network namespace that has only loopback, so that the Ray
# instance the benchmark starts keeps all its traffic on 127.0.0.1 (Ray otherwise picks a
# non-loopback address and binds some ports on all interfaces). Otherwise it runs directly.
set -euo pipefail
cd "$(dirname "$0")/.."
python=.venv/bin/python
benchmark=bench.throughput
if [[ ${1:-} == loras || ${1:-} == jobs ]]; then
    benchmark=bench.$1
    shift
fi

if [[ $(id -u) -ne 0 ]]; then
    exec "$python" -m "$benchmark" "$@"
fi

namespace="flux-bench-$$"
ip netns add "$namespace"
trap 'ip netns delete "$namespace"' EXIT
ip netns exec "$namespace" ip link set lo up
ip netns exec "$namespace" "$python" -m "$benchmark" "$@"
