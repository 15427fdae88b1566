#!/usr/bin/env bash
# Sets up .venv, then serves config/serve.yaml on http://127.0.0.1:8000 until Ctrl-C or
# scripts/stop.sh, either of which shuts Serve and its Ray instance down cleanly. The Redis that
# the jobs queue on (127.0.0.1:6380, data in var/redis) keeps running, so that queued jobs wait
# there across restarts of the service; it is reused when found running.
#
#   scripts/serve.sh --private [--port N]
#       As root: Ray, the service and its Redis (data in var/redis-private; it stops with the
#       service) run in a network namespace of their own that has only loopback, so none of
#       their ports can be reached from other machines; a relay on this machine's 127.0.0.1:N
#       (8000) is the one way in.
set -euo pipefail
cd "$(dirname "$0")/.."

private=false
port=8000
while (($#)); do
  case $1 in
    --private) private=true ;;
    --port)
      port=${2:?--port needs a port number}
      shift
      ;;
    -h | --help)
      sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
      exit 0
      ;;
    *)
      echo "unknown option: $1 (scripts/serve.sh --help lists the options)" >&2
      exit 2
      ;;
  esac
  shift
done
if [[ $port != 8000 ]] && ! $private; then
  echo "--port goes with --private; otherwise config/serve.yaml's http_options.port is used" >&2
  exit 2
fi

pid_file=${FLUX_SERVE_PID_FILE:-var/serve.pid}
if [[ -f $pid_file ]] && kill -0 "$(cat "$pid_file")" 2>/dev/null; then
  echo "flux-serve already runs here (pid $(cat "$pid_file")); scripts/stop.sh stops it" >&2
  exit 1
fi
if $private; then
  if [[ $(id -u) != 0 ]] || ! command -v ip >/dev/null; then
    echo "--private needs root and iproute2 (ip netns) to make a network namespace" >&2
    exit 1
  fi
  command -v socat >/dev/null || scripts/system-deps.sh socat
  if ! command -v socat >/dev/null; then
    echo "--private needs socat, for its relay" >&2
    exit 1
  fi
fi

scripts/setup.sh
export RAY_USAGE_STATS_ENABLED=0
# Build the embedded tiny models once before the replicas start (they would build them too).
.venv/bin/flux-serve build-tiny-models >/dev/null
# The webhook signing secret of this machine, made once (receivers verify with it).
secret_file=var/webhook-secret
if [[ ! -s $secret_file ]]; then
  mkdir -p var
  (umask 077 && printf 'whsec_%s\n' "$(head -c 32 /dev/urandom | base64)" > "$secret_file")
fi
FLUX_SERVE_WEBHOOK_SECRET=${FLUX_SERVE_WEBHOOK_SECRET:-$(cat "$secret_file")}
export FLUX_SERVE_WEBHOOK_SECRET

# serve run shuts down cleanly on SIGINT (it deletes the application, then stops the Ray instance
# it started); on SIGTERM Ray's crash handler prints stack frames and aborts. So serve run runs
# in the background, in a process group of its own (set -m), and this script turns its own INT
# and TERM into one SIGINT for it. Python restores SIGINT's default first: a background job of a
# non-interactive shell starts with SIGINT ignored, and would never see it.
with_sigint=(.venv/bin/python -c
  'import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); os.execv(sys.argv[1], sys.argv[1:])')
# "local" starts a fresh Ray instance instead of joining one left behind by an unclean stop.
serve=("${with_sigint[@]}" .venv/bin/serve run --address local config/serve.yaml)
mkdir -p "$(dirname "$pid_file")"
set -m
if $private; then
  namespace=flux-serve-$$
  relay_dir=$(mktemp -d)  # only root may open the relay's socket
  relays=()
  close_namespace() {
    for relay in "${relays[@]}"; do kill -- "-$relay" 2>/dev/null || true; done
    # Whatever is still in the namespace is this service's (its Redis, at least): nothing else
    # can be in it. Redis ends cleanly on SIGTERM; what is left after 5 s is killed.
    ip netns pids "$namespace" 2>/dev/null | xargs -r kill -TERM 2>/dev/null || true
    for ((waited = 0; waited < 10; waited++)); do
      [[ -z $(ip netns pids "$namespace" 2>/dev/null) ]] && break
      sleep 0.5
    done
    ip netns pids "$namespace" 2>/dev/null | xargs -r kill -KILL 2>/dev/null || true
    ip netns delete "$namespace" 2>/dev/null || true
    rm -rf "$relay_dir" "$pid_file"
  }
  trap close_namespace EXIT
  ip netns add "$namespace"
  ip netns exec "$namespace" ip link set lo up
  # Inside, the service keeps config/serve.yaml's port 8000; a Unix socket, which no network
  # namespace hides, carries each connection from this machine's loopback to it.
  ip netns exec "$namespace" \
    socat UNIX-LISTEN:"$relay_dir/http.sock",fork TCP:127.0.0.1:8000 &
  relays+=($!)
  socat TCP-LISTEN:"$port",bind=127.0.0.1,reuseaddr,fork UNIX-CONNECT:"$relay_dir/http.sock" &
  relays+=($!)
  ip netns exec "$namespace" \
    .venv/bin/python -m deployments.local_redis config/serve.yaml --dir var/redis-private
  ip netns exec "$namespace" "${serve[@]}" &
  echo "serving privately in network namespace $namespace: http://127.0.0.1:$port" >&2
else
  trap 'rm -f "$pid_file"' EXIT
  .venv/bin/python -m deployments.local_redis config/serve.yaml --dir var/redis
  "${serve[@]}" &
fi
server=$!
echo $$ >"$pid_file"
trap 'kill -INT "$server" 2>/dev/null || true' INT TERM
# wait returns early when a signal is trapped: wait again until serve run has shut down.
while true; do
  wait "$server" && status=0 || status=$?
  kill -0 "$server" 2>/dev/null || break
done
exit "$status"
