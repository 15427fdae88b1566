#!/usr/bin/env bash
# Stops the service that scripts/serve.sh runs from this checkout, as Ctrl-C in its terminal
# does: Serve deletes the application and stops its Ray instance. Waits until it has ended.
set -euo pipefail
cd "$(dirname "$0")/.."

pid_file=${FLUX_SERVE_PID_FILE:-var/serve.pid}
deadline_s=${1:-180}  # FluxWorker lets a running batch finish (graceful_shutdown_timeout_s)
if [[ ! -f $pid_file ]]; then
  echo "flux-serve is not running here ($pid_file, which scripts/serve.sh writes, is absent)" >&2
  exit 1
fi
pid=$(cat "$pid_file")
if ! ps -o command= -p "$pid" 2>/dev/null | grep -q "serve.sh"; then
  echo "flux-serve is not running here (pid $pid from $pid_file is gone); removing the file" >&2
  rm -f "$pid_file"
  exit 1
fi
# Ended once it is gone, or a zombie its parent has yet to reap.
running() {
  local state
  state=$(ps -o stat= -p "$pid" 2>/dev/null) && [[ $state != Z* ]]
}
kill -TERM "$pid"
for ((waited = 0; waited < deadline_s; waited++)); do
  if ! running; then
    echo "flux-serve stopped" >&2
    exit 0
  fi
  sleep 1
done
echo "flux-serve (pid $pid) is still shutting down after ${deadline_s} s" >&2
exit 1
