#!/usr/bin/env bash
# Sets up .venv, then serves config/serve.yaml on http://127.0.0.1:8000 (Ctrl-C stops it).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh

export RAY_USAGE_STATS_ENABLED=0
# Build the embedded tiny models once before the replicas start (they would build them too).
.venv/bin/flux-serve build-tiny-models >/dev/null
# "local" starts a fresh Ray instance instead of joining one left behind by an unclean stop.
exec .venv/bin/serve run --address local config/serve.yaml
