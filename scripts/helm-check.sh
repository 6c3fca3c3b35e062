#!/usr/bin/env bash
# Offline checks of the Helm chart (deploy/helm/marathon), deploy/docker-compose.yml
# and the Dockerfile. No cluster, no Docker, no helm binary:
#   - tools from PyPI into .venv-helm/ (helm-python-sdk = Helm's Go SDK as a library,
#     kubernetes-validate, yamllint, pyyaml), installed once;
#   - yamllint on values, ci/ and bad value files, compose and prometheus.yml;
#   - deploy/helm/tests/check_chart.py: strict lint + offline render of every ci/
#     values file, kubernetes-validate --strict against Kubernetes 1.30 (ServiceMonitor
#     and PrometheusRule are CRDs without a bundled schema: only their apiVersion is
#     checked), every tests/bad/ file rejected by the schema (and by template `fail`
#     guards), assertions on the rendered objects, every MARATHON_* name checked
#     against the server's own `marathon config print`, the probe and metrics paths
#     hit on a real `marathon serve` (127.0.0.1), compose and Dockerfile checks.
# Exits non-zero on any failure. MARATHON_BIN=path skips the cargo build.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=.venv-helm
REQS=(helm-python-sdk==0.2.2 kubernetes-validate==1.37.0 yamllint==1.38.0 pyyaml==6.0.4)
STAMP="$VENV/.helm-check-$(printf '%s ' "${REQS[@]}" | sha256sum | cut -c1-16)"

if [[ ! -f "$STAMP" ]]; then
  echo "helm-check: installing ${REQS[*]} into $VENV"
  command -v python3 >/dev/null || { echo "helm-check: python3 is required" >&2; exit 1; }
  if [[ ! -x "$VENV/bin/python" ]]; then
    python3 -m venv "$VENV" || {
      echo "helm-check: python3 -m venv failed (on Debian: apt-get install -y python3-venv)" >&2
      exit 1
    }
  fi
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check "${REQS[@]}"
  touch "$STAMP"
fi

echo "== yamllint"
"$VENV/bin/yamllint" --strict -d '{extends: default, rules: {line-length: {max: 140}, document-start: disable, truthy: {check-keys: false}}}' \
  deploy/helm/marathon/Chart.yaml deploy/helm/marathon/values.yaml deploy/helm/marathon/ci \
  deploy/helm/marathon/tests/bad deploy/docker-compose.yml deploy/prometheus.yml
echo "  ok   yamllint"

BIN=${MARATHON_BIN:-}
if [[ -z "$BIN" ]]; then
  echo "== cargo build -p marathon-server --features redis,sqs,otel (the Dockerfile's FEATURES)"
  cargo build -q -p marathon-server --features redis,sqs,otel
  BIN=target/debug/marathon
fi

echo "== alerting rules"
# The chart ships the same rules as deploy/prometheus (Helm reads files only inside the chart).
if ! cmp -s deploy/prometheus/marathon-rules.yml deploy/helm/marathon/files/marathon-rules.yml; then
  echo "helm-check: deploy/helm/marathon/files/marathon-rules.yml differs from deploy/prometheus/marathon-rules.yml; copy it" >&2
  exit 1
fi
echo "  ok   chart rules are deploy/prometheus/marathon-rules.yml"

"$VENV/bin/python" deploy/helm/tests/check_chart.py "$BIN"
