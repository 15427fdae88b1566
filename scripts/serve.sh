#!/usr/bin/env bash
# Sets up .venv, then serves config/serve.yaml on http://127.0.0.1:8000 (Ctrl-C stops it), with
# the Redis that the jobs queue on (127.0.0.1:6380, data in var/redis; it keeps running, so
# queued jobs wait there across restarts of the service, and is reused when found running).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh

export RAY_USAGE_STATS_ENABLED=0
# Build the embedded tiny models once before the replicas start (they would build them too).
.venv/bin/flux-serve build-tiny-models >/dev/null
.venv/bin/python -m deployments.local_redis config/serve.yaml --dir var/redis
# The webhook signing secret of this machine, made once (receivers verify with it).
secret_file=var/webhook-secret
if [[ ! -s $secret_file ]]; then
  mkdir -p var
  (umask 077 && printf 'whsec_%s\n' "$(head -c 32 /dev/urandom | base64)" > "$secret_file")
fi
FLUX_SERVE_WEBHOOK_SECRET=${FLUX_SERVE_WEBHOOK_SECRET:-$(cat "$secret_file")}
export FLUX_SERVE_WEBHOOK_SECRET
# "local" starts a fresh Ray instance instead of joining one left behind by an unclean stop.
exec .venv/bin/serve run --address local config/serve.yaml
