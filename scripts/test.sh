#!/usr/bin/env bash
# Runs Marathon's whole test suite, starting the services it needs:
# Redis on 127.0.0.1:6379 (started if nothing answers there), LocalStack's
# SQS on 127.0.0.1:4566 (installed into .venv-localstack and started by
# scripts/localstack.sh), and the observability tools (promtool, prometheus,
# rotel; scripts/observability-tools.sh). Extra arguments go to `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."

redis_answers() {
  local port=$1 reply=""
  exec 3<>"/dev/tcp/127.0.0.1/$port" 2>/dev/null || return 1
  printf 'PING\r\n' >&3
  read -r -t 2 reply <&3 || true
  exec 3<&- 3>&-
  [[ "$reply" == +PONG* ]]
}

ensure_redis() {
  if redis_answers 6379; then
    echo "redis: answering on 127.0.0.1:6379"
    return
  fi
  if ! command -v redis-server >/dev/null; then
    echo "redis: installing redis-server"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
  fi
  echo "redis: starting on 127.0.0.1:6379"
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save '' --appendonly no \
    --logfile "$PWD/target/redis-ci.log"
  for _ in $(seq 1 100); do
    redis_answers 6379 && return
    sleep 0.1
  done
  echo "redis: did not answer on 127.0.0.1:6379 within 10 s" >&2
  exit 1
}

mkdir -p target
ensure_redis
scripts/localstack.sh start
# promtool, prometheus and rotel for the observability tests.
scripts/observability-tools.sh
# The SDK must never probe an instance-metadata address from tests.
export AWS_EC2_METADATA_DISABLED=true
# redis-server is needed on PATH by the Redis restart test even when Redis already runs.
command -v redis-server >/dev/null || {
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
}
cargo test --workspace --all-features "$@"
# The Helm chart: lint, render, schema validation, assertions against the server's
# real configuration keys (reuses the binary the tests just built).
MARATHON_BIN="$PWD/target/debug/marathon" scripts/helm-check.sh
