#!/usr/bin/env bash
# A real 2-node Ray cluster on this one machine, with the .venv Ray:
#   head   on 127.0.0.1: GCS :6390, dashboard + job server :8265; resources {pool_head: 4}, label pool=head
#   worker joins the head;                                         resources {pool_worker: 4}, label pool=worker
#
#   cluster/local.sh up        start both nodes (idempotent); waits until the job server answers
#   cluster/local.sh down      stop exactly these two nodes (other Ray instances are left alone)
#   cluster/local.sh status    ray status of this cluster
#   eval "$(cluster/local.sh env)"   client settings: RAY_ADDRESS (the dashboard, for `ray job submit`),
#                              MODULA_RAY_GCS_ADDRESS (for modula-ray commands run beside it) and the auth token
#
# Ray >= 2.59 turns on token authentication for local clusters, so every node and client shares
# one token file kept in the state folder. Each node runs in its own process session, recorded
# as a process-group id, which is what `down` kills. Each node's dashboard agent (which runs the
# submitted jobs) takes a free port, not Ray's fixed 52365: another Ray on this machine may hold
# that, and the job server would then answer "No available agent to submit job".
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
RAY="${RAY:-$ROOT/.venv/bin/ray}"
STATE="${MODULA_RAY_LOCAL_CLUSTER:-$ROOT/.cache/local-cluster}"
GCS_PORT="${GCS_PORT:-6390}"
DASHBOARD_PORT="${DASHBOARD_PORT:-8265}"
HEAD_CPUS="${HEAD_CPUS:-2}"
WORKER_CPUS="${WORKER_CPUS:-2}"
# One temp dir per node: two nodes sharing one would unpack job packages into the same folder and
# race each other. Kept short: Ray's unix socket paths must stay under 108 bytes.
RAY_TEMP="${RAY_TEMP:-/tmp/modula-ray-$GCS_PORT}"

export PATH="$ROOT/.venv/bin:$PATH"  # job entrypoints' `python` is the .venv one
export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH="$STATE/auth_token"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false RAY_USAGE_STATS_ENABLED=0

alive() { [ -f "$STATE/$1.pgid" ] && kill -0 -- "-$(cat "$STATE/$1.pgid")" 2>/dev/null; }

start_node() {  # name, then `ray start` arguments
  local name="$1"; shift
  setsid -w bash -c 'echo $$ > "$0"; exec "$@" >"${0%.pgid}.log" 2>&1' "$STATE/$name.pgid" "$RAY" start "$@" \
    || { echo "local.sh: $name failed to start; see $STATE/$name.log" >&2; tail -20 "$STATE/$name.log" >&2; exit 1; }
}

up() {
  if alive head && alive worker; then echo "local cluster already up (dashboard http://127.0.0.1:$DASHBOARD_PORT)"; return; fi
  down >/dev/null 2>&1 || true
  mkdir -p "$STATE"
  [ -s "$RAY_AUTH_TOKEN_PATH" ] || (umask 077; "$ROOT/.venv/bin/python" -c 'import secrets; print(secrets.token_hex(32))' >"$RAY_AUTH_TOKEN_PATH")
  start_node head --head --node-ip-address=127.0.0.1 --port="$GCS_PORT" --dashboard-host=127.0.0.1 \
    --dashboard-port="$DASHBOARD_PORT" --include-dashboard=true --num-cpus="$HEAD_CPUS" \
    --resources='{"pool_head": 4}' --labels="pool=head" --temp-dir="$RAY_TEMP" --disable-usage-stats \
    --dashboard-agent-listen-port=0
  start_node worker --address="127.0.0.1:$GCS_PORT" --node-ip-address=127.0.0.1 --num-cpus="$WORKER_CPUS" \
    --resources='{"pool_worker": 4}' --labels="pool=worker" --temp-dir="$RAY_TEMP-w" --disable-usage-stats \
    --dashboard-agent-listen-port=0
  for _ in $(seq 1 60); do  # bounded wait for the job server
    if "$ROOT/.venv/bin/python" - "$DASHBOARD_PORT" "$RAY_AUTH_TOKEN_PATH" <<'PY' 2>/dev/null; then break; fi
import sys, urllib.request
token = open(sys.argv[2]).read().strip()
request = urllib.request.Request(f"http://127.0.0.1:{sys.argv[1]}/api/version",
                                 headers={"Authorization": f"Bearer {token}"})
urllib.request.urlopen(request, timeout=2).read()
PY
    sleep 1
  done
  for _ in $(seq 1 60); do  # bounded wait until the worker node is registered
    "$RAY" status --address="127.0.0.1:$GCS_PORT" 2>/dev/null | grep -q pool_worker && break
    sleep 1
  done
  echo "local cluster up: 2 nodes, dashboard + job server http://127.0.0.1:$DASHBOARD_PORT"
  echo "client settings: eval \"\$($0 env)\""
}

# Workers exit on TERM at once; the GCS, raylets and agents of a node that no longer has its peers
# linger (measured: still up 7 s after TERM), so after 3 s what is left gets KILL, as `ray stop --force`.
down() {  # TERM both nodes at once, wait (bounded) for both, then KILL what is left
  local name pgids=()
  for name in worker head; do
    [ -f "$STATE/$name.pgid" ] && pgids+=("$(cat "$STATE/$name.pgid")")
  done
  for pgid in "${pgids[@]}"; do kill -TERM -- "-$pgid" 2>/dev/null || true; done
  for _ in $(seq 1 6); do
    local alive=0
    for pgid in "${pgids[@]}"; do kill -0 -- "-$pgid" 2>/dev/null && alive=1; done
    [ "$alive" = 0 ] && break
    sleep 0.5
  done
  for pgid in "${pgids[@]}"; do kill -KILL -- "-$pgid" 2>/dev/null || true; done
  rm -f "$STATE/worker.pgid" "$STATE/head.pgid"
  echo "local cluster down"
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  status) "$RAY" status --address="127.0.0.1:$GCS_PORT" ;;
  env) echo "export RAY_ADDRESS=http://127.0.0.1:$DASHBOARD_PORT MODULA_RAY_GCS_ADDRESS=127.0.0.1:$GCS_PORT RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=$STATE/auth_token" ;;
  *) sed -n '2,15p' "$0"; [ "${1:-}" = "-h" ] || [ "${1:-}" = "--help" ]; exit $? ;;
esac
