#!/usr/bin/env bash
# A local Ray head for `ray job submit`, the Ray Dashboard and Prometheus, without touching other local clusters.
#
#   cluster/local.sh up      start the head (dashboard on 127.0.0.1), write $CONAN_RAY_DIR/cluster.env
#   cluster/local.sh env     print the exports that point `ray job submit` and `conan` at it
#   cluster/local.sh status  `ray status` of this head
#   cluster/local.sh down    stop this head's processes only (`ray stop` would stop every Ray on the machine)
#
# Settings (environment): CONAN_RAY_DIR (/tmp/conan-ray; Ray's temp dir, keep it short: socket paths < 108 bytes),
# CONAN_RAY_PORT (6379), CONAN_DASHBOARD_PORT (8265), CONAN_METRICS_PORT (8080, Prometheus scrapes
# http://127.0.0.1:$CONAN_METRICS_PORT/metrics), CONAN_CLIENT_PORT (10001), CONAN_AGENT_PORT (52365),
# CONAN_NUM_CPUS (all), RAY (the ray executable; default: the one beside this checkout's .venv python, else PATH).
set -euo pipefail

repo="$(cd "$(dirname "$0")/.." && pwd)"
dir="${CONAN_RAY_DIR:-/tmp/conan-ray}"
port="${CONAN_RAY_PORT:-6379}"
dashboard_port="${CONAN_DASHBOARD_PORT:-8265}"
metrics_port="${CONAN_METRICS_PORT:-8080}"
client_port="${CONAN_CLIENT_PORT:-10001}"
agent_port="${CONAN_AGENT_PORT:-52365}"
if [[ -z "${RAY:-}" ]]; then
  if [[ -x "$repo/.venv/bin/ray" ]]; then RAY="$repo/.venv/bin/ray"; else RAY="$(command -v ray)"; fi
fi

# The daemons of this head name its temp dir (or, the client server, its GCS port) on their command line; the
# agents, dashboard modules and workers are their children and exit with them.
head_pids() { pgrep -f -- "$dir/session_|--temp-dir=$dir( |\$)|--address=[0-9.]+:$port( |\$)" || true; }
# Those daemons and all their descendants (agents and workers rename themselves ray::…).
tree_pids() {
  local queue=($(head_pids)) all=() pid
  while ((${#queue[@]})); do
    pid="${queue[0]}"; queue=("${queue[@]:1}"); all+=("$pid")
    queue+=($(pgrep -P "$pid" || true))
  done
  echo "${all[@]}"
}

up() {
  if [[ -n "$(head_pids)" ]]; then echo "a head is already running under $dir (cluster/local.sh down first)" >&2; exit 1; fi
  mkdir -p "$dir"
  # A submitted job runs in an uploaded copy of the working dir: its relative config paths resolve against
  # CONAN_BASE_DIR (this checkout); it reads the datasets bundled in that copy unless CONAN_DATA_ROOT is set here.
  local data_env=""
  [[ -n "${CONAN_DATA_ROOT:-}" ]] && data_env=", \"CONAN_DATA_ROOT\": \"$CONAN_DATA_ROOT\""
  local cpus=()
  [[ -n "${CONAN_NUM_CPUS:-}" ]] && cpus=(--num-cpus "$CONAN_NUM_CPUS")
  # Ray 2.60's head turns token auth on and refuses to start without a token: make one on first use
  # (~/.ray/auth_token, or $RAY_AUTH_TOKEN_PATH; an existing token is kept).
  "$RAY" get-auth-token --generate >/dev/null
  # Metrics every second instead of ten; Train V2's report() blocks ~2 s at the default health-check interval.
  # The ray executable's directory leads PATH, so a job's plain `python` is the interpreter Ray runs under.
  PATH="$(dirname "$RAY"):$PATH" RAY_metrics_report_interval_ms=1000 RAY_TRAIN_HEALTH_CHECK_INTERVAL_S=0.2 \
    "$RAY" start --head --temp-dir "$dir" --port "$port" --dashboard-host 127.0.0.1 \
    --dashboard-port "$dashboard_port" --metrics-export-port "$metrics_port" --ray-client-server-port "$client_port" \
    --dashboard-agent-listen-port "$agent_port" --disable-usage-stats "${cpus[@]}" >"$dir/start.log" 2>&1 \
    || { cat "$dir/start.log" >&2; exit 1; }
  cat >"$dir/cluster.env" <<EOF
export RAY_ADDRESS=127.0.0.1:$port
export RAY_AUTH_MODE=token
export CONAN_DASHBOARD_URL=http://127.0.0.1:$dashboard_port
export CONAN_METRICS_URL=http://127.0.0.1:$metrics_port/metrics
export CONAN_RUNTIME_ENV='{"env_vars": {"CONAN_BASE_DIR": "$repo"$data_env}}'
EOF
  echo "Ray head up: GCS 127.0.0.1:$port, dashboard http://127.0.0.1:$dashboard_port," \
       "Prometheus http://127.0.0.1:$metrics_port/metrics (Ray temp dir $dir)"
  echo "Point ray job submit at it:  source $dir/cluster.env"
  echo "  then: ray job submit --working-dir . --runtime-env-json \"\$CONAN_RUNTIME_ENV\" -- python jobs/<stage>.py --config …"
}

down() {
  local pids alive
  pids="$(tree_pids)"
  if [[ -z "$pids" ]]; then echo "no head running under $dir"; return 0; fi
  # A grace of 3 s, then SIGKILL: gcs_server and raylet sit out SIGTERM while their peers go down, and a local
  # head's state is not worth waiting for.
  kill $pids 2>/dev/null || true
  for _ in $(seq 15); do
    alive="$(ps -o pid=,stat= -p "${pids// /,}" | awk '$2 !~ /^Z/ {print $1}' || true)"  # zombies are gone
    [[ -z "$alive" ]] && break
    sleep 0.2
  done
  [[ -n "$alive" ]] && kill -9 $alive 2>/dev/null || true
  rm -f "$dir/cluster.env"
  echo "Ray head under $dir stopped"
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  env) cat "$dir/cluster.env" ;;
  status) "$RAY" status --address "127.0.0.1:$port" ;;
  *) sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
