#!/usr/bin/env bash
# A multi-node Ray cluster on one machine, for development: a head and N worker nodes,
# each with a custom resource naming it so placement is visible in `ray status`.
#   cluster/local_cluster.sh start [N]   |   cluster/local_cluster.sh stop
set -euo pipefail
VENV="${VENV:-$(dirname "$0")/../.venv}"
RAY="$VENV/bin/ray"
# Ray 2.59+ protects local clusters with a token; keep it on and let CLI clients use it.
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"
case "${1:-start}" in
  start)
    n="${2:-2}"
    "$RAY" start --head --port=6379 --dashboard-host=127.0.0.1 --num-cpus=1 --resources='{"node:head": 1}'
    for i in $(seq 1 "$n"); do
      "$RAY" start --address=127.0.0.1:6379 --num-cpus=1 --resources="{\"worker_node_$i\": 1}"
    done
    echo "dashboard: http://127.0.0.1:8265   submit: distill-ray submit --address http://127.0.0.1:8265 --follow"
    ;;
  stop) "$RAY" stop --force ;;
  *) echo "usage: $0 start [N] | stop" >&2; exit 2 ;;
esac
