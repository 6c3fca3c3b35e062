#!/usr/bin/env bash
# Installs the external tools the marathon-observability tests need; idempotent.
#
#   scripts/observability-tools.sh          install what is missing, then print the paths
#   scripts/observability-tools.sh env      print `export ...` lines for the test environment
#
# - promtool and prometheus (Debian package `prometheus`, 2.42): `apt-get install`.
# - rotel-agent (an OTLP collector from PyPI) in `.venv-rotel/` at the repository root.
#
# The tests find them via MARATHON_PROMTOOL, MARATHON_PROMETHEUS and MARATHON_ROTEL
# (defaults: `promtool`, `prometheus` on PATH and `.venv-rotel/bin/rotel-agent`), and
# fail, never skip, when one is missing.
# Environment: PYTHON (default python3).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv-rotel"
PYTHON="${PYTHON:-python3}"

log() { printf 'observability-tools.sh: %s\n' "$*" >&2; }

install_prometheus() {
  if command -v promtool >/dev/null && command -v prometheus >/dev/null; then
    return
  fi
  log "installing prometheus and promtool (apt)"
  if [[ $(id -u) -ne 0 ]]; then SUDO=sudo; else SUDO=; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends prometheus >/dev/null
}

install_rotel() {
  if [[ -x "$VENV/bin/rotel-agent" ]]; then
    return
  fi
  log "installing rotel into $VENV (pip)"
  [[ -x "$VENV/bin/pip" ]] || "$PYTHON" -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check rotel
  # The wheel ships the binary inside the package, not in bin/: link it there.
  local agent
  agent="$("$VENV/bin/python" -c 'import os, rotel; print(os.path.join(os.path.dirname(rotel.__file__), "rotel-agent"))')"
  [[ -x "$agent" ]] || { log "rotel installed no rotel-agent (looked at $agent)"; exit 1; }
  ln -sf "$agent" "$VENV/bin/rotel-agent"
}

case "${1:-install}" in
  install)
    install_prometheus
    install_rotel
    log "promtool: $(command -v promtool)"
    log "prometheus: $(command -v prometheus)"
    log "rotel-agent: $VENV/bin/rotel-agent"
    ;;
  env)
    echo "export MARATHON_PROMTOOL=$(command -v promtool)"
    echo "export MARATHON_PROMETHEUS=$(command -v prometheus)"
    echo "export MARATHON_ROTEL=$VENV/bin/rotel-agent"
    ;;
  *)
    echo "usage: $0 [install|env]" >&2
    exit 2
    ;;
esac
