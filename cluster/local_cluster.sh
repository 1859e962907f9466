#!/usr/bin/env bash
# A multi-node Ray cluster on this one machine: a head node plus N-1 worker nodes, each its own raylet
# (the same thing ray.cluster_utils.Cluster does in the tests, but with `ray start`, so it outlives this
# shell and behaves like a real cluster for `ray job submit`, `ray status` and the dashboard).
#
#   cluster/local_cluster.sh start [--nodes N] [--cpus-per-node C] [--gpus-per-node G]
#                                  [--object-store-mb MB] [--port P] [--dashboard-port P] [--no-dashboard]
#   cluster/local_cluster.sh status
#   cluster/local_cluster.sh stop
#
# Every port is picked free (or given), and everything lives under one temp dir (GROUNDUP_LOCAL_RAY_DIR,
# default /tmp/groundup-ray), so the cluster never collides with another Ray on the same machine.
# `stop` ends only the processes of this cluster (those whose command line names its temp dir), by pid;
# it never runs `ray stop`, which would end every Ray on the machine.
set -euo pipefail

STATE_DIR="${GROUNDUP_LOCAL_RAY_DIR:-/tmp/groundup-ray}"   # keep it short: Ray's unix sockets live under it
ENV_FILE="$STATE_DIR/env.sh"

usage() {
  sed -n '6,9p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
}

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# Ports of one raylet: node manager, object manager, metrics, dashboard agent (http, grpc), runtime-env agent.
node_port_args() {
  echo "--node-manager-port=$(free_port) --object-manager-port=$(free_port)" \
       "--metrics-export-port=$(free_port) --dashboard-agent-listen-port=$(free_port)" \
       "--dashboard-agent-grpc-port=$(free_port) --runtime-env-agent-port=$(free_port)"
}

cluster_pids() {
  # This cluster's processes: Ray's own (raylet, gcs_server, dashboard, monitors), which name its temp dir
  # on their command line, plus their descendants (workers and agents rename themselves ray::IDLE,
  # ray::DashboardAgent, ... and no longer name it). Other Rays on the machine are left alone.
  local pid cmdline child queue=() seen=" "
  for pid in $(pgrep -f -- "$STATE_DIR/" || true); do
    cmdline="$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null || true)"
    [[ "$cmdline" == *local_cluster.sh* || "$cmdline" != */ray/* ]] && continue
    queue+=("$pid")
  done
  while [[ ${#queue[@]} -gt 0 ]]; do
    pid="${queue[0]}"; queue=("${queue[@]:1}")
    [[ "$seen" == *" $pid "* || "$pid" == "$$" ]] && continue
    seen+="$pid "
    echo "$pid"
    for child in $(pgrep -P "$pid" || true); do queue+=("$child"); done
  done
}

cmd_start() {
  local nodes=2 cpus=2 gpus=0 object_store_mb="" port="" dash_port="" dashboard=1
  while [[ $# -gt 0 ]]; do
    case "$1" in
      --nodes) nodes="${2:?}"; shift 2 ;;
      --cpus-per-node) cpus="${2:?}"; shift 2 ;;
      --gpus-per-node) gpus="${2:?}"; shift 2 ;;
      --object-store-mb) object_store_mb="${2:?}"; shift 2 ;;
      --port) port="${2:?}"; shift 2 ;;
      --dashboard-port) dash_port="${2:?}"; shift 2 ;;
      --no-dashboard) dashboard=0; shift ;;
      *) echo "local_cluster.sh: unknown option $1" >&2; usage ;;
    esac
  done
  [[ "$nodes" =~ ^[1-9][0-9]*$ && "$cpus" =~ ^[0-9]+$ && "$gpus" =~ ^[0-9]+$ ]] || {
    echo "local_cluster.sh: --nodes must be >= 1, --cpus-per-node and --gpus-per-node >= 0" >&2; exit 2; }
  if [[ -n "$(cluster_pids)" ]]; then
    echo "local_cluster.sh: a cluster is already running under $STATE_DIR (run 'stop' first)" >&2
    [[ -f "$ENV_FILE" ]] && cat "$ENV_FILE" >&2
    exit 1
  fi
  command -v ray >/dev/null || { echo "local_cluster.sh: 'ray' not found (pip install -e . first)" >&2; exit 1; }

  rm -rf "$STATE_DIR" && mkdir -p "$STATE_DIR"
  port="${port:-$(free_port)}"
  dash_port="${dash_port:-$(free_port)}"
  local common=(--temp-dir="$STATE_DIR" --num-cpus="$cpus" --num-gpus="$gpus" --disable-usage-stats)
  [[ -n "$object_store_mb" ]] && common+=(--object-store-memory="$((object_store_mb * 1024 * 1024))")
  local dash_args=(--include-dashboard=false)
  [[ "$dashboard" == 1 ]] && dash_args=(--include-dashboard=true --dashboard-host=127.0.0.1 --dashboard-port="$dash_port")

  export RAY_USAGE_STATS_ENABLED=0
  # Ray 2.60 turns token authentication on for a head node when a token exists (~/.ray/auth_token,
  # RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH), but a joining node only uses it when RAY_AUTH_MODE says so:
  # decide once and give every node and client the same mode.
  if [[ -z "${RAY_AUTH_MODE:-}" ]]; then
    if [[ -n "${RAY_AUTH_TOKEN:-}" || -s "${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}" ]]; then
      export RAY_AUTH_MODE=token
    else
      export RAY_AUTH_MODE=disabled
    fi
  fi
  echo "starting head node (port $port, auth mode $RAY_AUTH_MODE) ..."
  # shellcheck disable=SC2046
  ray start --head --port="$port" --ray-client-server-port="$(free_port)" \
    "${dash_args[@]}" "${common[@]}" --resources='{"head": 1}' $(node_port_args) \
    >"$STATE_DIR/start-head.log" 2>&1 || { cat "$STATE_DIR/start-head.log" >&2; cmd_stop >&2; exit 1; }
  local address
  address="$(cat "$STATE_DIR/ray_current_cluster" 2>/dev/null || echo "127.0.0.1:$port")"  # head's node IP:port
  local i
  for ((i = 1; i < nodes; i++)); do
    echo "starting worker node $i ..."
    # shellcheck disable=SC2046
    ray start --address="$address" "${common[@]}" \
      --resources='{"worker_node": 1}' $(node_port_args) \
      >"$STATE_DIR/start-worker-$i.log" 2>&1 || { cat "$STATE_DIR/start-worker-$i.log" >&2; cmd_stop >&2; exit 1; }
  done

  {
    echo "export RAY_ADDRESS=$address"
    echo "export RAY_AUTH_MODE=$RAY_AUTH_MODE"
    [[ "$dashboard" == 1 ]] && echo "# dashboard and job server: http://127.0.0.1:$dash_port"
  } >"$ENV_FILE"
  echo "local Ray cluster up: $nodes node(s) x $cpus CPU(s), temp dir $STATE_DIR"
  echo "to use it (ray status, groundup <stage>, cluster/submit.sh):"
  echo
  cat "$ENV_FILE"
  echo
  echo "(or: source $ENV_FILE)"
}

cmd_status() {
  [[ -f "$ENV_FILE" && -n "$(cluster_pids)" ]] || { echo "no local cluster under $STATE_DIR"; exit 1; }
  cat "$ENV_FILE"
  # shellcheck disable=SC1090
  source "$ENV_FILE"
  ray status --address="$RAY_ADDRESS"
}

cmd_stop() {
  local pids
  pids="$(cluster_pids)"
  if [[ -z "$pids" ]]; then
    echo "no local cluster processes under $STATE_DIR"
  else
    echo "stopping $(echo "$pids" | wc -l) process(es) of the cluster under $STATE_DIR"
    local pid
    for pid in $pids; do kill -TERM "$pid" 2>/dev/null || true; done
    for _ in $(seq 1 20); do
      [[ -z "$(cluster_pids)" ]] && break
      sleep 0.5
    done
    for pid in $(cluster_pids); do kill -KILL "$pid" 2>/dev/null || true; done
  fi
  rm -f "$ENV_FILE"
  echo "stopped"
}

case "${1:-}" in
  start) shift; cmd_start "$@" ;;
  stop) shift; cmd_stop ;;
  status) shift; cmd_status ;;
  -h|--help|help) sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
  *) usage ;;
esac
