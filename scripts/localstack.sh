#!/usr/bin/env bash
# LocalStack (SQS only) on the host, without Docker, for marathon-sqs tests.
#
#   scripts/localstack.sh install   create .venv-localstack/ with the pinned packages
#   scripts/localstack.sh start     install if needed, start SQS on 127.0.0.1:4566, wait until it answers
#   scripts/localstack.sh stop      stop the instance this script started
#   scripts/localstack.sh status    say whether it answers
#
# Environment: PYTHON (default python3, 3.11 works), LOCALSTACK_PORT (default 4566;
# any other port gets its own instance with state in .localstack/port-<PORT>/),
# LOCALSTACK_START_TIMEOUT seconds (default 60).
# Pins from /work/shared/SERVICES.md: newer LocalStack needs Python 3.12.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv-localstack"
PYTHON="${PYTHON:-python3}"
PORT="${LOCALSTACK_PORT:-4566}"
# One state directory (pid, log, data) per port, so a private instance on
# another port (an end-to-end test restarting "its" SQS) never touches 4566's.
if [[ "$PORT" == 4566 ]]; then STATE="$ROOT/.localstack"; else STATE="$ROOT/.localstack/port-$PORT"; fi
PIDFILE="$STATE/localstack.pid"
LOGFILE="$STATE/localstack.log"
ADDR="127.0.0.1:$PORT"
TIMEOUT="${LOCALSTACK_START_TIMEOUT:-60}"

PINS=(
  "localstack-core[runtime]==4.13.1"
  "cbor2==5.6.5"
  "cryptography==43.0.3"
  "pyopenssl==24.2.1"
  "service_identity==24.1.0"
  "joserfc<1.1"
)

log() { printf 'localstack.sh: %s\n' "$*" >&2; }

# Answers when LocalStack's health endpoint reports SQS available or running.
probe() {
  "$PYTHON" - "$ADDR" <<'PY' 2>/dev/null
import json, sys, urllib.request
try:
    with urllib.request.urlopen(f"http://{sys.argv[1]}/_localstack/health", timeout=2) as r:
        sqs = json.load(r).get("services", {}).get("sqs")
    sys.exit(0 if sqs in ("available", "running") else 1)
except Exception:
    sys.exit(1)
PY
}

running_pid() {
  [[ -f "$PIDFILE" ]] || return 1
  local pid
  pid="$(cat "$PIDFILE")"
  [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null && { echo "$pid"; return 0; }
  return 1
}

install() {
  if [[ -x "$VENV/bin/python" ]] && "$VENV/bin/python" -c 'import localstack' 2>/dev/null \
     && [[ -f "$VENV/.marathon-pins" ]] && [[ "$(cat "$VENV/.marathon-pins")" == "${PINS[*]}" ]]; then
    log "already installed in $VENV"
    return 0
  fi
  log "installing LocalStack into $VENV (1-3 minutes the first time)"
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check "${PINS[@]}"
  printf '%s' "${PINS[*]}" > "$VENV/.marathon-pins"
  log "installed"
}

start() {
  if pid="$(running_pid)"; then
    if probe; then log "already running (pid $pid) on $ADDR"; return 0; fi
  elif probe; then
    log "something already answers on $ADDR (not started by this script); using it"
    return 0
  fi
  install
  mkdir -p "$STATE"
  if ! running_pid >/dev/null; then
    log "starting SQS on $ADDR, log in $LOGFILE"
    # setsid: its own process group, so `stop` ends it and its children and nothing else.
    GATEWAY_SERVER=hypercorn SQS_ENDPOINT_STRATEGY=path LOCALSTACK_HOST="$ADDR" \
      SERVICES=sqs GATEWAY_LISTEN="$ADDR" EAGER_SERVICE_LOADING=1 \
      FILESYSTEM_ROOT="$STATE/fs" \
      setsid "$VENV/bin/python" -m localstack.runtime.main >>"$LOGFILE" 2>&1 </dev/null &
    echo $! > "$PIDFILE"
  fi
  local deadline=$(( $(date +%s) + TIMEOUT ))
  until probe; do
    if ! running_pid >/dev/null; then
      log "LocalStack exited during start; last log lines:"
      tail -n 30 "$LOGFILE" >&2 || true
      rm -f "$PIDFILE"
      return 1
    fi
    if (( $(date +%s) >= deadline )); then
      log "LocalStack did not answer on $ADDR within ${TIMEOUT}s; see $LOGFILE"
      return 1
    fi
    sleep 0.2
  done
  log "ready on http://$ADDR (pid $(cat "$PIDFILE"))"
}

stop() {
  local pid
  if ! pid="$(running_pid)"; then
    log "not running (no live pid in $PIDFILE)"
    rm -f "$PIDFILE"
    return 0
  fi
  kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
  local deadline=$(( $(date +%s) + 15 ))
  while kill -0 "$pid" 2>/dev/null; do
    if (( $(date +%s) >= deadline )); then
      log "still alive after 15s; sending KILL"
      kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
      break
    fi
    sleep 0.2
  done
  rm -f "$PIDFILE"
  log "stopped (pid $pid)"
}

status() {
  if probe; then
    if pid="$(running_pid)"; then log "running (pid $pid) on $ADDR"; else log "answering on $ADDR (not started by this script)"; fi
    return 0
  fi
  if pid="$(running_pid)"; then log "process $pid alive but $ADDR does not answer yet"; else log "not running"; fi
  return 1
}

case "${1:-}" in
  install) install ;;
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) echo "usage: $0 {install|start|stop|status}" >&2; exit 2 ;;
esac
