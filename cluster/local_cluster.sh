#!/usr/bin/env bash
# A multi-node Ray cluster on one machine, for development: a head and N worker nodes on
# loopback, each with a custom resource naming it (local_head, worker_node_1, ...), so
# placement is visible in `ray status` and tasks can be pinned to a node.
#
#   cluster/local_cluster.sh start [N]   # head + N workers (default 2)
#   cluster/local_cluster.sh status      # `ray status` of this cluster
#   cluster/local_cluster.sh env         # exports a client needs: eval "$(... env)"
#   cluster/local_cluster.sh stop
#
# Each node is its own `ray start --block` process in its own session, and `stop` signals
# exactly those (pids in $STATE): `ray stop` would end every Ray process on the machine,
# other people's clusters and test runs included. Each node also has its own --temp-dir
# under $STATE, so nodes never share socket files and the cluster never becomes the
# address that a plain `ray.init()` elsewhere on the machine picks up from /tmp/ray.
#
# Ray 2.59+ protects clusters with a token: unless RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH
# is set, a token is generated for this cluster in $STATE/auth_token. Clients (ray CLI,
# `distill-ray submit`) need RAY_AUTH_MODE=token and that token: see `env`.
#
# Settings (environment): VENV, DISTILL_RAY_CLUSTER_DIR (state dir, default
# /tmp/distill-ray-cluster), RAY_PORT (GCS, 6379), RAY_DASHBOARD_PORT (8265),
# RAY_CLIENT_PORT (10001), NODE_IP (127.0.0.2), NODE_CPUS (1 per node),
# RAY_OBJECT_STORE_BYTES (Ray's default if unset), START_TIMEOUT_S (120 per node),
# RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S (0: `stop` does not wait for nodes to drain).
set -euo pipefail

HERE="$(cd "$(dirname "$0")" && pwd)"
VENV="${VENV:-$HERE/../.venv}"
RAY="$VENV/bin/ray"
STATE="${DISTILL_RAY_CLUSTER_DIR:-${TMPDIR:-/tmp}/distill-ray-cluster}"
PORT="${RAY_PORT:-6379}"
DASHBOARD_PORT="${RAY_DASHBOARD_PORT:-8265}"
CLIENT_PORT="${RAY_CLIENT_PORT:-10001}"
CPUS="${NODE_CPUS:-1}"
# Ray rewrites 127.0.0.1 and localhost to the machine's network address, which takes
# cluster traffic off loopback (and stalls where that address is firewalled); any other
# 127/8 address, which Linux serves on lo, is left alone.
NODE_IP="${NODE_IP:-127.0.0.2}"
START_TIMEOUT_S="${START_TIMEOUT_S:-120}"
ADDRESS="$NODE_IP:$PORT"
# Job entrypoints say `python` (as on the cluster image): on these nodes that must be
# the venv's interpreter, which has the project's dependencies.
export PATH="$VENV/bin:$PATH"
# On SIGTERM a node first drains (up to 30 s) so its work can move to other nodes. `stop`
# ends every node at once, so there is nowhere to move to: skip the wait unless asked.
export RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="${RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S:-0}"

# Keep auth on; an explicit RAY_AUTH_MODE=disabled from the caller is respected.
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"
if [[ "$RAY_AUTH_MODE" == token && -z "${RAY_AUTH_TOKEN:-}${RAY_AUTH_TOKEN_PATH:-}" ]]; then
  export RAY_AUTH_TOKEN_PATH="$STATE/auth_token"
fi

die() { echo "local_cluster: $*" >&2; exit 1; }

pids() { cat "$STATE"/*.pid 2>/dev/null || true; }

free_port() {
  "$VENV/bin/python" -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])'
}

launch() {  # launch NAME ARGS...: a detached `ray start --block`, pid in $STATE/NAME.pid
  local name="$1"; shift
  # The agents' ports are chosen here, not left to Ray: the dashboard agent's HTTP port
  # defaults to a fixed 52365 on every node, so two nodes on one machine (or any other
  # Ray running here) would collide.
  setsid "$RAY" start --block --node-ip-address="$NODE_IP" --temp-dir="$STATE/$name" \
    --num-cpus="$CPUS" ${RAY_OBJECT_STORE_BYTES:+--object-store-memory="$RAY_OBJECT_STORE_BYTES"} \
    --dashboard-agent-listen-port="$(free_port)" --dashboard-agent-grpc-port="$(free_port)" \
    --runtime-env-agent-port="$(free_port)" --metrics-export-port="$(free_port)" \
    --disable-usage-stats \
    "$@" >>"$STATE/$name.log" 2>&1 </dev/null &
  echo $! >"$STATE/$name.pid"
}

started() {  # started NAME: 0 once the node has joined, 1 if it died, 2 while starting
  # `ray start` prints this only after GCS has registered the node's raylet.
  grep -q "Ray runtime started" "$STATE/$1.log" 2>/dev/null && return 0
  kill -0 "$(cat "$STATE/$1.pid")" 2>/dev/null && return 2
  return 1
}

start_node() {  # start_node NAME ARGS...: launch a node and wait until it has joined
  local name="$1" attempt rc deadline; shift
  # The raylet gives its Python agents a fixed ~15 s to report their ports and aborts
  # otherwise; on a busy machine a cold agent start can take longer. A second attempt
  # finds the imports in the page cache, so a node that died at start gets two more.
  for attempt in 1 2 3; do
    launch "$name" "$@"
    deadline=$((SECONDS + START_TIMEOUT_S))
    while started "$name"; rc=$?; (( rc == 2 && SECONDS < deadline )); do sleep 1; done
    (( rc == 0 )) && return 0
    (( rc == 2 )) && break  # still hanging at the deadline: retrying would not help
    kill -KILL -- "-$(cat "$STATE/$name.pid")" 2>/dev/null || true  # what it left behind
    echo "local_cluster: $name exited during start (attempt $attempt of 3)" >&2
  done
  tail -n 20 "$STATE/$name.log" >&2
  stop
  die "$name did not start; logs: $STATE/$name.log and $STATE/$name/session_latest/logs/"
}

wait_visible() {  # wait_visible N: until `ray status` lists N active nodes
  # A node that has joined reaches the autoscaler's view (what `ray status` and the
  # autoscaler act on) only at its next update, a few seconds later.
  local want="$1" seen=0 deadline=$((SECONDS + START_TIMEOUT_S))
  while (( SECONDS < deadline )); do
    seen=$("$RAY" status --address="$ADDRESS" 2>/dev/null | grep -cE '^\s*1 node_[0-9a-f]+$' || true)
    (( seen >= want )) && return 0
    sleep 2
  done
  stop
  die "only $seen of $want nodes visible in \`ray status\` after ${START_TIMEOUT_S}s; logs: $STATE/*.log"
}

start() {
  local n="${1:-2}"
  [[ -x "$RAY" ]] || die "no ray at $RAY (run \`make install\` or set VENV)"
  [[ -z "$(pids)" ]] || die "a cluster is already recorded in $STATE; run \`$0 stop\` first"
  mkdir -p "$STATE"
  if [[ "${RAY_AUTH_TOKEN_PATH:-}" == "$STATE/auth_token" && ! -s "$STATE/auth_token" ]]; then
    (umask 077; "$VENV/bin/python" -c 'import secrets; print(secrets.token_hex(32), end="")' \
      >"$STATE/auth_token")
  fi
  start_node head --head --port="$PORT" --dashboard-host=127.0.0.1 --dashboard-port="$DASHBOARD_PORT" \
    --ray-client-server-port="$CLIENT_PORT" --resources='{"local_head": 1}'
  # One node at a time: a node starts ~10 Python processes, and starting them all at
  # once on a small machine pushes each past Ray's start-up deadlines.
  for i in $(seq 1 "$n"); do
    start_node "worker$i" --address="$ADDRESS" --resources="{\"worker_node_$i\": 1}"
  done
  wait_visible $((n + 1))
  echo "cluster up: head + $n workers at $ADDRESS; dashboard http://127.0.0.1:$DASHBOARD_PORT"
  echo "clients:   eval \"\$($0 env)\""
  echo "submit:    distill-ray submit --address http://127.0.0.1:$DASHBOARD_PORT --follow"
}

stop() {
  local pid
  for pid in $(pids); do kill -TERM "$pid" 2>/dev/null || true; done
  # SIGTERM makes each `ray start --block` end its node's processes; give it time, then
  # end what is left of each node's process group (setsid made the pid its group id).
  for _ in $(seq 1 30); do
    local left=0
    for pid in $(pids); do if kill -0 "$pid" 2>/dev/null; then left=1; fi; done
    (( left )) || break
    sleep 1
  done
  for pid in $(pids); do kill -KILL -- "-$pid" 2>/dev/null || true; done
  rm -f "$STATE"/*.pid
}

case "${1:-}" in
  start) start "${2:-2}" ;;
  status)
    [[ -n "$(pids)" ]] || die "no cluster recorded in $STATE"
    "$RAY" status --address="$ADDRESS" ;;
  env)
    echo "export RAY_ADDRESS=$ADDRESS RAY_AUTH_MODE=$RAY_AUTH_MODE"
    [[ -n "${RAY_AUTH_TOKEN_PATH:-}" ]] && echo "export RAY_AUTH_TOKEN_PATH=$RAY_AUTH_TOKEN_PATH"
    true ;;
  stop) stop ;;
  *) echo "usage: $0 start [N] | status | env | stop" >&2; exit 2 ;;
esac
