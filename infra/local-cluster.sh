#!/usr/bin/env bash
# A real Ray cluster on one machine: a head and N worker nodes, all on 127.0.0.1.
#
#   infra/local-cluster.sh start [N]   start head + N workers (default 1); prints the env file
#   infra/local-cluster.sh stop        stop exactly the processes this script started, remove its files
#   infra/local-cluster.sh status      print the env file and `ray status`
#
# State lives in $CURATE_CLUSTER_DIR (default /tmp/curate-cluster-$UID): `env` (RAY_ADDRESS=http://...,
# RAY_GCS_ADDRESS, RAY_AUTH_MODE, RAY_AUTH_TOKEN_PATH, METRICS_PORTS), the pids, the token and Ray's
# --temp-dir. Everything is private to that directory, so two clusters (or a test's embedded Ray)
# never share a session: never `ray stop`, which would kill every Ray on the machine.
#
# The job API of a `ray start --head` cluster answers only with token auth (Ray 2.60): the token is
# generated into the state dir and handed to every process through RAY_AUTH_TOKEN_PATH, never
# written to ~/.ray/auth_token. Every port is picked free by the OS (ephemeral range, 32768+), which
# keeps them outside Ray's worker port range (10002-19999). The job API, dashboard and metrics are
# used over 127.0.0.1; Ray itself maps a loopback --node-ip-address to the machine's own address for
# node-to-node traffic (services.resolve_ip_for_localhost), so node IPs show that address.
#
# Environment: PYTHON (default: the repo's .venv/bin/python, else python3), HEAD_CPUS (1),
# WORKER_CPUS (1), OBJECT_STORE_MB (256).
set -euo pipefail

HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(dirname "$HERE")"
STATE="${CURATE_CLUSTER_DIR:-/tmp/curate-cluster-$(id -u)}"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$ROOT/.venv/bin/python" ]]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi
RAY="$(dirname "$PYTHON")/ray"
[[ -x "$RAY" ]] || RAY=ray
HEAD_CPUS="${HEAD_CPUS:-1}"
WORKER_CPUS="${WORKER_CPUS:-1}"
OBJECT_STORE_MB="${OBJECT_STORE_MB:-256}"

free_port() {
  "$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

descendants() {  # every live descendant pid of $1, deepest first
  local kids
  kids="$(cat /proc/"$1"/task/*/children 2>/dev/null || true)"
  for k in $kids; do
    descendants "$k"
    echo "$k"
  done
}

wait_for() {  # wait_for SECONDS CMD...: retry CMD until it succeeds
  local deadline=$((SECONDS + $1)); shift
  until "$@" >/dev/null 2>&1; do
    if ((SECONDS > deadline)); then return 1; fi
    sleep 0.5
  done
}

start_node() {  # start_node NAME ARGS...: one `ray start --block`, in its own session, pid recorded
  local name="$1"; shift
  setsid "$RAY" start --block --disable-usage-stats --node-ip-address=127.0.0.1 \
    --temp-dir="$TMPD" --object-store-memory=$((OBJECT_STORE_MB * 1024 * 1024)) \
    --dashboard-agent-listen-port="$(free_port)" --dashboard-agent-grpc-port="$(free_port)" \
    --runtime-env-agent-port="$(free_port)" --node-manager-port="$(free_port)" \
    --object-manager-port="$(free_port)" --min-worker-port=10002 --max-worker-port=19999 \
    "$@" >"$STATE/$name.log" 2>&1 < /dev/null &
  echo "$!" >>"$STATE/pids"
}

alive_nodes_are() {  # the job API's state endpoint counts exactly $1 live nodes (no driver needed)
  "$PYTHON" -c "
import json, sys, urllib.request
req = urllib.request.Request('$RAY_ADDRESS_HTTP/api/v0/nodes?limit=1000',
                             headers={'Authorization': 'Bearer ' + open('$RAY_AUTH_TOKEN_PATH').read()})
nodes = json.load(urllib.request.urlopen(req, timeout=5))['data']['result']['result']
sys.exit(0 if sum(n['state'] == 'ALIVE' for n in nodes) == $1 else 1)"
}

cmd_start() {
  local workers="${1:-1}"
  if [[ -f "$STATE/pids" ]]; then
    echo "a cluster is already recorded in $STATE; run '$0 stop' first" >&2
    exit 1
  fi
  mkdir -p "$STATE"
  # Ray's session directory holds unix sockets, whose paths must stay short: keep --temp-dir short.
  TMPD="$(mktemp -d /tmp/crc.XXXXXX)"
  echo "$TMPD" >"$STATE/tempdir"
  export RAY_AUTH_MODE=token
  # Ray's default 30 s for a raylet to register is too short on a loaded 2-core machine.
  export RAY_raylet_start_wait_time_s="${RAY_raylet_start_wait_time_s:-120}"
  # Job entrypoints (`curate ...`) resolve through the PATH of the processes `ray start` spawns.
  PATH="$(dirname "$PYTHON"):$PATH"
  export PATH
  export RAY_AUTH_TOKEN_PATH="$STATE/auth_token"
  ( umask 077; "$PYTHON" -c 'import secrets; print(secrets.token_hex(32), end="")' >"$RAY_AUTH_TOKEN_PATH" )

  local gcs dash client metrics
  gcs="$(free_port)"; dash="$(free_port)"; client="$(free_port)"; metrics="$(free_port)"
  start_node head --head --port="$gcs" --num-cpus="$HEAD_CPUS" --num-gpus=0 \
    --include-dashboard=true --dashboard-host=127.0.0.1 --dashboard-port="$dash" \
    --ray-client-server-port="$client" --metrics-export-port="$metrics"
  local all_metrics="$metrics"
  RAY_ADDRESS_HTTP="http://127.0.0.1:$dash"

  cat >"$STATE/env" <<EOF
RAY_ADDRESS=http://127.0.0.1:$dash
RAY_GCS_ADDRESS=127.0.0.1:$gcs
RAY_AUTH_MODE=token
RAY_AUTH_TOKEN_PATH=$RAY_AUTH_TOKEN_PATH
RAY_TEMP_DIR=$TMPD
EOF
  # The dashboard is up when its job API answers an authenticated request.
  if ! wait_for 150 "$PYTHON" -c "
import urllib.request
req = urllib.request.Request('http://127.0.0.1:$dash/api/version',
                             headers={'Authorization': 'Bearer ' + open('$RAY_AUTH_TOKEN_PATH').read()})
urllib.request.urlopen(req, timeout=2)"; then
    echo "head did not come up; log: $STATE/head.log" >&2
    tail -20 "$STATE/head.log" >&2
    cmd_stop
    exit 1
  fi
  # Workers one at a time, each waited for: on a small, busy machine several raylets registering at
  # once overrun the GCS's start-up wait.
  for i in $(seq 1 "$workers"); do
    metrics="$(free_port)"
    all_metrics="$all_metrics,$metrics"
    start_node "worker$i" --address="127.0.0.1:$gcs" --num-cpus="$WORKER_CPUS" --num-gpus=0 \
      --metrics-export-port="$metrics"
    if ! wait_for 150 alive_nodes_are $((i + 1)); then
      echo "worker $i did not join; log: $STATE/worker$i.log" >&2
      tail -5 "$STATE/worker$i.log" >&2
      cmd_stop
      exit 1
    fi
  done
  echo "METRICS_PORTS=$all_metrics" >>"$STATE/env"
  cat "$STATE/env"
}

cmd_stop() {
  [[ -d "$STATE" ]] || return 0
  if [[ -f "$STATE/pids" ]]; then
    local victims=()
    # Workers first, head last; collect each tree before signalling (children reparent on death).
    for pid in $(tac "$STATE/pids"); do
      if kill -0 "$pid" 2>/dev/null; then
        victims+=($(descendants "$pid") "$pid")
      fi
    done
    for pid in $(tac "$STATE/pids"); do kill -TERM "$pid" 2>/dev/null || true; done
    local deadline=$((SECONDS + 15))
    for pid in "${victims[@]}"; do
      while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.2; done
    done
    for pid in "${victims[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
  fi
  if [[ -f "$STATE/tempdir" ]]; then
    local tmpd
    tmpd="$(cat "$STATE/tempdir")"
    [[ "$tmpd" == /tmp/crc.* ]] && rm -rf "$tmpd"
  fi
  rm -rf "$STATE"
}

cmd_status() {
  cat "$STATE/env"
  # shellcheck disable=SC1091
  set -a; source "$STATE/env"; set +a
  RAY_ADDRESS="$RAY_GCS_ADDRESS" "$RAY" status --address="$RAY_GCS_ADDRESS"
}

case "${1:-}" in
  start) shift; cmd_start "$@" ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  *) echo "usage: $0 start [N_WORKERS] | stop | status" >&2; exit 2 ;;
esac
