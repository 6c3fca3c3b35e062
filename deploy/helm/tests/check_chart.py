#!/usr/bin/env python3
"""Offline checks of the Helm chart, docker-compose file and Dockerfile.

Run by scripts/helm-check.sh inside its venv (helm-python-sdk, kubernetes-validate,
pyyaml). Needs the `marathon` binary built with the redis and sqs features (path in
argv[1]): the server itself says which configuration keys exist, and a real process
answers the probe and metrics paths the chart uses.

Exits non-zero with one line per failure.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
import urllib.error
import urllib.request
from pathlib import Path

import helm_python as helm
import yaml

ROOT = Path(__file__).resolve().parents[3]
CHART = ROOT / "deploy/helm/marathon"
KUBE_VERSION = "1.30.0"
# CRDs of the Prometheus operator: kubernetes-validate bundles no schema for them.
CRD_KINDS = {"ServiceMonitor", "PrometheusRule"}
RELEASE, NAMESPACE = "mara", "marathon"
_m = re.search(r"shutdown_timeout:\s*Duration::from_secs\((\d+)\)",
               (ROOT / "observability/src/tracing.rs").read_text())
if not _m:
    raise SystemExit("TelemetryConfig shutdown_timeout default not found in observability/src/tracing.rs")
TELEMETRY_SHUTDOWN_MS = int(_m.group(1)) * 1000

failures: list[str] = []


def fail(msg: str) -> None:
    failures.append(msg)
    print(f"  FAIL {msg}", flush=True)


def ok(msg: str) -> None:
    print(f"  ok   {msg}", flush=True)


def load_values(path: Path) -> dict:
    return yaml.safe_load(path.read_text()) or {}


# --------------------------------------------------------------------------- server


class Server:
    """What the `marathon` binary says about its configuration."""

    def __init__(self, binary: str) -> None:
        self.binary = binary
        printed = self.print_config(
            {"MARATHON_STORE__KIND": "redis", "MARATHON_QUEUE__KIND": "sqs"}
        )
        if printed is None:
            raise SystemExit("`marathon config print` failed with redis+sqs: built without the features?")
        self.keys: set[str] = set()  # dotted leaf keys
        self.maps: set[str] = set()  # dotted sections printed empty: maps with free keys
        self._walk(printed, "")
        # Aliases, read from the server's source so that a rename breaks this check.
        src = (ROOT / "server/src/config.rs").read_text()
        block = re.search(r"const ENV_ALIASES[^=]*=\s*&\[(.*?)\];", src, re.S)
        if not block:
            raise SystemExit("ENV_ALIASES not found in server/src/config.rs")
        self.aliases = dict(re.findall(r'\("(MARATHON_[A-Z0-9_]+)",\s*"([a-z0-9_.]+)"\)', block.group(1)))
        if not self.aliases:
            raise SystemExit("no alias parsed from ENV_ALIASES")
        for name, key in self.aliases.items():
            if key not in self.keys:
                fail(f"server alias {name} -> {key}: not a key of `config print`")

    def _walk(self, table: dict, prefix: str) -> None:
        for k, v in table.items():
            path = f"{prefix}{k}"
            if isinstance(v, dict):
                if v:
                    self._walk(v, path + ".")
                else:
                    self.maps.add(path)
            else:
                self.keys.add(path)

    def print_config(self, env: dict[str, str]) -> dict | None:
        full = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **env}
        r = subprocess.run(
            [self.binary, "config", "print"], env=full, capture_output=True, text=True, timeout=30
        )
        if r.returncode != 0:
            self.last_error = r.stderr.strip() or r.stdout.strip()
            return None
        return tomllib.loads(r.stdout)

    def key_of(self, env_name: str) -> str | None:
        """The dotted key an env name sets (the server's own rule), or None."""
        if env_name in self.aliases:
            return self.aliases[env_name]
        rest = env_name.removeprefix("MARATHON_")
        if rest == env_name or "__" not in rest:
            return None
        return ".".join(p.lower() for p in rest.split("__"))

    def statically_known(self, env_name: str) -> bool:
        key = self.key_of(env_name)
        if key is None:
            return False
        return key in self.keys or any(key.startswith(m + ".") for m in self.maps)

    def check_env(self, where: str, env: dict[str, str]) -> dict | None:
        """Every MARATHON_* name is a server key and the server accepts the whole set."""
        marathon = {k: v for k, v in env.items() if k.startswith("MARATHON_")}
        printed = self.print_config(marathon)
        if printed is None:
            fail(f"{where}: the server rejects this environment: {self.last_error}")
            return None
        for name in sorted(marathon):
            key = self.key_of(name)
            if key is None:
                fail(f"{where}: {name} is ignored by the server (no `__` and not an alias)")
                continue
            if self.statically_known(name):
                continue
            # Optional keys (region, endpoint_url, retention) are printed only when set.
            if lookup(printed, key) is None:
                fail(f"{where}: {name} ({key}) is not a server configuration key")
        return printed


def lookup(table: dict, dotted: str):
    cur = table
    for part in dotted.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return None
        cur = cur[part]
    return cur


# --------------------------------------------------------------------------- chart


def render(chart, values: dict, release: str = RELEASE) -> dict[str, str]:
    return chart.render(values, name=release, namespace=NAMESPACE, is_install=True)


def docs_of(rendered: dict[str, str]) -> list[dict]:
    out = []
    for path, text in sorted(rendered.items()):
        if path.endswith("NOTES.txt"):
            continue
        for d in yaml.safe_load_all(text):
            if d:
                out.append(d)
    return out


PLACEHOLDER_SECRETS = {
    "MARATHON_STORE__URL": "redis://:secret@redis.example:6379/0",
    "MARATHON_AUTH_TOKENS": "token-1,token-2",
    "MARATHON_STORE__CLUSTER_NODES": "rediss://:secret@node-1.example:6379,rediss://:secret@node-2.example:6379",
}


def container_env(c: dict) -> dict[str, str]:
    env = {}
    for e in c.get("env", []):
        if "value" in e:
            env[e["name"]] = str(e["value"])
        elif e["valueFrom"].get("secretKeyRef", {}).get("optional"):
            # An optional key may be missing from the Secret: the server must start without it.
            continue
        elif "valueFrom" in e:
            env[e["name"]] = PLACEHOLDER_SECRETS.get(e["name"], "from-secret-or-field")
    return env


def kube_validate(files: list[Path]) -> None:
    if not files:
        return
    exe = Path(sys.executable).parent / "kubernetes-validate"
    r = subprocess.run(
        [str(exe), "--strict", "-k", KUBE_VERSION, *map(str, files)],
        capture_output=True, text=True,
    )
    bad = [line for line in r.stdout.splitlines() + r.stderr.splitlines() if line.strip() and "INFO" not in line]
    if r.returncode != 0:
        fail(f"kubernetes-validate {KUBE_VERSION}: " + " | ".join(bad[:10]))
    else:
        ok(f"kubernetes-validate --strict -k {KUBE_VERSION}: {len(files)} manifests")


def check_objects(name: str, docs: list[dict], server: Server) -> None:
    by_kind: dict[str, list[dict]] = {}
    for d in docs:
        by_kind.setdefault(d["kind"], []).append(d)
    deployments = by_kind.get("Deployment", [])
    if not deployments:
        fail(f"{name}: no Deployment rendered")
    names = [d["metadata"]["name"] for d in docs]
    for n in set(names):
        kinds = [d["kind"] for d in docs if d["metadata"]["name"] == n]
        if len(kinds) != len(set(kinds)):
            fail(f"{name}: two objects of one kind named {n}")
    hpa_targets = {h["spec"]["scaleTargetRef"]["name"] for h in by_kind.get("HorizontalPodAutoscaler", [])}
    for dep in deployments:
        where = f"{name}: Deployment {dep['metadata']['name']}"
        spec = dep["spec"]["template"]["spec"]
        (c,) = [c for c in spec["containers"] if c["name"] == "marathon"]
        env = container_env(c)
        names_set = [e["name"] for e in c.get("env", [])]
        dups = {n for n in names_set if names_set.count(n) > 1}
        if dups:
            fail(f"{where}: env set twice: {sorted(dups)}")
        # Probes.
        for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
            got = c.get(probe, {}).get("httpGet", {})
            if got.get("path") != path or got.get("port") != "http":
                fail(f"{where}: {probe} is {got}, want GET {path} on port http")
        # Cluster mode reads the seed nodes: a Secret holding only those (no `url`) must
        # still start the pod, so its url key is optional (a required missing key is
        # CreateContainerConfigError).
        refs = {e["name"]: e.get("valueFrom", {}).get("secretKeyRef", {}) for e in c.get("env", [])}
        if refs.get("MARATHON_STORE__CLUSTER_NODES") and not refs.get("MARATHON_STORE__URL", {}).get("optional"):
            fail(f"{where}: cluster mode, but the Secret's url key is required: a Secret with only the seed nodes"
                 " keeps the pod from starting")
        printed = server.check_env(where, env)
        if printed is not None:
            # Port: the container port is the server's effective listen port.
            listen = printed["server"]["listen"]
            port = int(listen.rsplit(":", 1)[1])
            ports = {p["name"]: p["containerPort"] for p in c["ports"]}
            if ports.get("http") != port:
                fail(f"{where}: containerPort http={ports.get('http')} but the server listens on {listen}")
            if not listen.startswith("0.0.0.0:"):
                fail(f"{where}: server.listen {listen} is not reachable from outside the pod")
            # Role.
            role = printed["server"]["role"]
            comp = dep["metadata"]["labels"].get("app.kubernetes.io/component")
            if role != comp:
                fail(f"{where}: server role {role} but component label {comp}")
            # Shutdown: Kubernetes must wait longer than the server's grace (HTTP and worker drain concurrently).
            grace_ms = max(printed["server"]["shutdown_grace_ms"], printed["worker"]["shutdown_grace_ms"])
            tgps = spec.get("terminationGracePeriodSeconds", 30)
            pre = 0
            cmd = c.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command")
            if cmd:
                pre = int(cmd[-1])
            # A pod serving the API closes its listener at SIGTERM: by default it first
            # waits for the endpoints to stop routing to it, or rollouts drop requests.
            if name == "default values" and role != "worker" and pre == 0:
                fail(f"{where}: no preStop sleep by default: a rollout refuses the requests routed"
                     " to the pod before its endpoint is removed")
            if not tgps * 1000 > grace_ms + pre * 1000:
                fail(f"{where}: terminationGracePeriodSeconds {tgps} <= preStop {pre}s + server grace {grace_ms} ms")
            # After the drain, `marathon serve` flushes buffered spans for up to the
            # telemetry shutdown timeout (TelemetryConfig::default, observability/src/tracing.rs).
            if env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
                flush_ms = TELEMETRY_SHUTDOWN_MS
                if not tgps * 1000 > grace_ms + pre * 1000 + flush_ms:
                    fail(f"{where}: terminationGracePeriodSeconds {tgps} <= preStop {pre}s + grace {grace_ms} ms"
                         f" + span flush {flush_ms} ms: a slow collector gets the pod SIGKILLed")
            # Traces name the version the pod runs: the image's tag, not the chart's appVersion.
            attrs = dict(a.split("=", 1) for a in env.get("OTEL_RESOURCE_ATTRIBUTES", "").split(",") if "=" in a)
            if attrs:
                tag = c["image"].rsplit("/", 1)[-1].rsplit(":", 1)[-1]
                if attrs.get("service.version") != tag:
                    fail(f"{where}: OTEL_RESOURCE_ATTRIBUTES service.version={attrs.get('service.version')}"
                         f" but the image runs tag {tag}")
        # Security.
        psc, csc = spec.get("securityContext", {}), c.get("securityContext", {})
        want = [
            (psc.get("runAsNonRoot") is True or csc.get("runAsNonRoot") is True, "runAsNonRoot"),
            (csc.get("allowPrivilegeEscalation") is False, "allowPrivilegeEscalation false"),
            (csc.get("readOnlyRootFilesystem") is True, "readOnlyRootFilesystem"),
            ("ALL" in csc.get("capabilities", {}).get("drop", []), "capabilities drop ALL"),
            ((csc.get("seccompProfile") or psc.get("seccompProfile") or {}).get("type") == "RuntimeDefault", "seccomp RuntimeDefault"),
            (isinstance(psc.get("runAsUser", csc.get("runAsUser")), int) and psc.get("runAsUser", csc.get("runAsUser")) > 0, "numeric non-root runAsUser"),
        ]
        for good, what in want:
            if not good:
                fail(f"{where}: securityContext lacks {what}")
        tmp = [m for m in c.get("volumeMounts", []) if m["mountPath"] == "/tmp"]
        vols = {v["name"]: v for v in spec.get("volumes", [])}
        if not tmp or "emptyDir" not in vols.get(tmp[0]["name"], {}):
            fail(f"{where}: no emptyDir mounted on /tmp")
        if dep["metadata"]["name"] in hpa_targets and "replicas" in dep["spec"]:
            fail(f"{where}: sets replicas although an HPA scales it")
        pod_labels = dep["spec"]["template"]["metadata"]["labels"]
        if any(pod_labels.get(k) != v for k, v in dep["spec"]["selector"]["matchLabels"].items()):
            fail(f"{where}: selector does not match the pod labels")
    dep_names = {d["metadata"]["name"] for d in deployments}
    for h in by_kind.get("HorizontalPodAutoscaler", []):
        if h["spec"]["scaleTargetRef"]["name"] not in dep_names:
            fail(f"{name}: HPA {h['metadata']['name']} targets a missing Deployment")
    all_pod_labels = [d["spec"]["template"]["metadata"]["labels"] for d in deployments]

    def selects(sel: dict) -> bool:
        return any(all(l.get(k) == v for k, v in sel.items()) for l in all_pod_labels)

    for s in by_kind.get("Service", []):
        if not selects(s["spec"]["selector"]):
            fail(f"{name}: Service {s['metadata']['name']} selects no pod")
        if any(p.get("targetPort") != "http" for p in s["spec"]["ports"]):
            fail(f"{name}: Service {s['metadata']['name']} does not target port http")
    for p in by_kind.get("PodDisruptionBudget", []):
        if not selects(p["spec"]["selector"]["matchLabels"]):
            fail(f"{name}: PDB {p['metadata']['name']} selects no pod")
    for sm in by_kind.get("ServiceMonitor", []):
        for ep in sm["spec"]["endpoints"]:
            if ep.get("path") != "/metrics" or ep.get("port") != "http":
                fail(f"{name}: ServiceMonitor endpoint {ep} is not /metrics on port http")
        sel = sm["spec"]["selector"]["matchLabels"]
        if not any(all(s["metadata"]["labels"].get(k) == v for k, v in sel.items()) for s in by_kind.get("Service", [])):
            fail(f"{name}: ServiceMonitor selects no Service")
    for ing in by_kind.get("Ingress", []):
        svc_names = {s["metadata"]["name"] for s in by_kind.get("Service", [])}
        for rule in ing["spec"]["rules"]:
            for p in rule["http"]["paths"]:
                if p["backend"]["service"]["name"] not in svc_names:
                    fail(f"{name}: Ingress backend {p['backend']['service']['name']} is no Service")
    ok(f"{name}: {len(docs)} objects, assertions done")


def check_up_rules(name: str, docs: list[dict]) -> None:
    """Every `up{...}` alert of the PrometheusRule selects the Services the chart's
    ServiceMonitor scrapes: the operator labels each target with its Service's name
    (`service`) and namespace, so without that ServiceMonitor (or with a selector that
    misses a Service) `up` has no such series and an `absent(...)` alert fires forever."""
    services = [d for d in docs if d["kind"] == "Service"]
    scraped = []
    for sm in (d for d in docs if d["kind"] == "ServiceMonitor"):
        sel = sm["spec"]["selector"]["matchLabels"]
        namespaces = sm["spec"].get("namespaceSelector", {}).get("matchNames") or [sm["metadata"]["namespace"]]
        scraped += [
            (s["metadata"]["namespace"], s["metadata"]["name"])
            for s in services
            if s["metadata"]["namespace"] in namespaces
            and all(s["metadata"]["labels"].get(k) == v for k, v in sel.items())
        ]
    for pr in (d for d in docs if d["kind"] == "PrometheusRule"):
        for g in pr["spec"]["groups"]:
            for r in g["rules"]:
                for sel in re.findall(r"\bup\{([^}]*)\}", r.get("expr", "")):
                    matchers = dict(
                        (k, (op, v)) for k, op, v in re.findall(r'(\w+)\s*(=~|!~|!=|=)\s*"([^"]*)"', sel)
                    )
                    if not scraped:
                        fail(f"{name}: {r.get('alert')} queries up{{{sel}}}, but no ServiceMonitor of the chart"
                             " scrapes a Service: there is no such series")
                        continue

                    def matches(ns: str, svc: str) -> bool:
                        labels = {"namespace": ns, "service": svc}
                        for k, (op, v) in matchers.items():
                            got = labels.get(k, "")
                            hit = re.fullmatch(v, got) is not None if op in ("=~", "!~") else got == v
                            if hit != (op in ("=", "=~")):
                                return False
                        return True

                    missed = [svc for ns, svc in scraped if not matches(ns, svc)]
                    if missed:
                        fail(f"{name}: {r.get('alert')} up{{{sel}}} misses the scraped Services {missed}")


def promtool_check(name: str, docs: list[dict], tmp: Path) -> None:
    """`promtool check rules` on the rendered PrometheusRule (its expressions are templated)."""
    for pr in (d for d in docs if d["kind"] == "PrometheusRule"):
        exe = os.environ.get("MARATHON_PROMTOOL") or shutil.which("promtool")
        if not exe:
            fail(f"{name}: no promtool to check the PrometheusRule (scripts/observability-tools.sh installs it)")
            return
        path = tmp / f"{name.replace(' ', '-').replace('/', '-')}-rules.yml"
        path.write_text(yaml.safe_dump({"groups": pr["spec"]["groups"]}))
        r = subprocess.run([exe, "check", "rules", str(path)], capture_output=True, text=True)
        if r.returncode != 0:
            fail(f"{name}: promtool check rules on the PrometheusRule: {(r.stdout + r.stderr).strip()}")


# Values beside the ci/ files, for what those do not cover: (name, release, values).
SCENARIOS = [
    ("prometheusRule without the chart's ServiceMonitor", RELEASE,
     {"metrics": {"prometheusRule": {"enabled": True}}}),
    ("split roles, release name of 50 characters", "r" * 50,
     {"store": {"kind": "redis", "redis": {"url": "redis://redis:6379"}}, "queue": {"kind": "sqs"},
      "roles": {"split": True},
      "metrics": {"serviceMonitor": {"enabled": True}, "prometheusRule": {"enabled": True}}}),
    ("Redis Cluster seed nodes from an existing Secret without a url", RELEASE,
     {"store": {"kind": "redis", "redis": {"existingSecret": "marathon-redis",
                                           "clusterNodesSecretKey": "cluster-nodes"}},
      "queue": {"kind": "sqs"}}),
    ("traces from an image tag other than appVersion", RELEASE,
     {"image": {"tag": "2026.11.28-3f1c2ab"},
      "otel": {"enabled": True, "endpoint": "http://otel-collector:4318"}}),
]


def check_chart(server: Server, tmp: Path) -> list[dict]:
    print("== chart", flush=True)
    chart = helm.Chart.load(str(CHART))
    meta = chart.metadata
    ws_version = tomllib.loads((ROOT / "Cargo.toml").read_text())["workspace"]["package"]["version"]
    if meta.get("appVersion") != ws_version:
        fail(f"Chart.yaml appVersion {meta.get('appVersion')} != workspace version {ws_version}")
    if meta.get("apiVersion") != "v2":
        fail("Chart.yaml apiVersion is not v2")
    ci_files = sorted((CHART / "ci").glob("*.yaml"))
    required = {"memory-values.yaml", "aws-values.yaml", "localstack-values.yaml", "split-values.yaml"}
    missing = required - {f.name for f in ci_files}
    if missing:
        fail(f"missing ci value files: {sorted(missing)}")
    to_validate: list[Path] = []
    memory_docs: list[dict] = []
    cases = [("default values", RELEASE, {}, None)]
    cases += [(f.name, RELEASE, load_values(f), f) for f in ci_files]
    cases += [(n, rel, v, None) for n, rel, v in SCENARIOS]
    for name, release, values, f in cases:
        report = helm.lint(str(CHART), values, strict=True, kube_version="v" + KUBE_VERSION)
        problems = [m for m in report.get("messages", []) if m["severity"] >= 2] + [
            {"error": e} for e in report.get("errors", [])
        ]
        if problems:
            fail(f"{name}: helm lint --strict: {problems}")
        else:
            ok(f"{name}: helm lint --strict (kube {KUBE_VERSION})")
        try:
            rendered = render(chart, values, release)
        except helm.HelmError as e:
            fail(f"{name}: render failed: {e}")
            continue
        docs = docs_of(rendered)
        if f and f.name == "memory-values.yaml":
            memory_docs = docs
        notes = [v for k, v in rendered.items() if k.endswith("NOTES.txt")]
        if not notes or "/metrics" not in notes[0] or not ("port-forward" in notes[0] or "://" in notes[0]):
            fail(f"{name}: NOTES.txt does not say how to reach the API and /metrics")
        for i, d in enumerate(docs):
            if d["kind"] in CRD_KINDS:
                if d.get("apiVersion") != "monitoring.coreos.com/v1":
                    fail(f"{name}: {d['kind']} apiVersion {d.get('apiVersion')}")
                if d["kind"] == "PrometheusRule":
                    shipped = yaml.safe_load((CHART / "files/marathon-rules.yml").read_text())
                    want = {r["alert"] for g in shipped["groups"] for r in g["rules"]}
                    have = {r.get("alert") for g in d["spec"]["groups"] for r in g["rules"]}
                    if not want <= have:
                        fail(f"{name}: PrometheusRule lacks {sorted(want - have)}")
                continue
            p = tmp / f"{name.replace(' ', '-')}-{i:02d}-{d['kind']}.yaml"
            p.write_text(yaml.safe_dump(d))
            to_validate.append(p)
        check_objects(name, docs, server)
        check_up_rules(name, docs)
        promtool_check(name, docs, tmp)
    kube_validate(to_validate)
    return memory_docs


def check_bad(tmp: Path) -> None:
    print("== bad value files", flush=True)
    bad = sorted((CHART / "tests/bad").glob("*.yaml"))
    if not bad:
        fail("no bad value files under tests/bad")
    chart = helm.Chart.load(str(CHART))
    # The same chart without its schema: the templates' own `fail` guards.
    noschema = tmp / "noschema"
    shutil.copytree(CHART, noschema / "marathon")
    (noschema / "marathon/values.schema.json").unlink()
    chart_noschema = helm.Chart.load(str(noschema / "marathon"))
    for f in bad:
        values = load_values(f)
        # guard-*: what JSON Schema cannot say (one value against another) is refused
        # by the templates' `fail` guards alone.
        if f.name.startswith("guard-"):
            try:
                render(chart, values)
                fail(f"{f.name}: rendered (no template `fail` guard refuses it)")
            except helm.HelmError as e:
                first = str(e).strip().splitlines()[-1].strip()
                ok(f"{f.name}: template guard refuses it ({first[:160]})")
            continue
        try:
            chart.validate_schema(chart.merge_values(values))
            fail(f"{f.name}: accepted by values.schema.json")
        except helm.HelmError as e:
            first = str(e).strip().splitlines()[-1].strip()
            ok(f"{f.name}: schema rejects it ({first})")
        try:
            render(chart, values)
            fail(f"{f.name}: rendered despite the schema")
        except helm.HelmError:
            pass
        # Types and unknown keys are the schema's job; combinations are also refused by templates.
        if f.name.startswith(("memory-", "split-", "store-", "queue-", "redis-", "auth-", "config-")):
            try:
                render(chart_noschema, values)
                fail(f"{f.name}: templates render it when the schema is absent (no `fail` guard)")
            except helm.HelmError:
                ok(f"{f.name}: template guard refuses it too")


# --------------------------------------------------------------------------- live server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_live(server: Server, docs: list[dict]) -> None:
    """Runs the binary with the memory deployment's env on 127.0.0.1 and hits the chart's paths."""
    print("== live probe paths (memory-values env, 127.0.0.1)", flush=True)
    deps = [d for d in docs if d["kind"] == "Deployment"]
    if not deps:
        fail("live: no memory Deployment to run")
        return
    dep = deps[0]
    spec = dep["spec"]["template"]["spec"]
    c = spec["containers"][0]
    env = {k: v for k, v in container_env(c).items() if k.startswith("MARATHON_")}
    port = free_port()
    env["MARATHON_LISTEN"] = f"127.0.0.1:{port}"  # only 127.0.0.1 here
    sms = [d for d in docs if d["kind"] == "ServiceMonitor"]
    metrics_path = sms[0]["spec"]["endpoints"][0]["path"] if sms else "/metrics"
    paths = [c["livenessProbe"]["httpGet"]["path"], c["readinessProbe"]["httpGet"]["path"], metrics_path]
    proc = subprocess.Popen(
        [server.binary, *c.get("args", ["serve"])],
        env={"PATH": os.environ.get("PATH", ""), **env},
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.time() + 20
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1).read()
                break
            except (urllib.error.URLError, ConnectionError, OSError):
                if proc.poll() is not None or time.time() > deadline:
                    fail(f"live: server did not answer: {proc.stderr.read() if proc.poll() is not None else 'timeout'}")
                    return
                time.sleep(0.1)
        for p in paths:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}{p}", timeout=5) as r:
                    if r.status != 200:
                        fail(f"live: GET {p} -> {r.status}")
                    elif p == metrics_path and "text/plain" not in r.headers.get("content-type", ""):
                        fail(f"live: GET {p} content-type {r.headers.get('content-type')}")
                    else:
                        ok(f"live: GET {p} -> 200")
            except urllib.error.HTTPError as e:
                fail(f"live: GET {p} -> {e.code}")
        t0 = time.time()
        proc.send_signal(signal.SIGTERM)
        tgps = spec.get("terminationGracePeriodSeconds", 30)
        try:
            rc = proc.wait(timeout=tgps)
            took = time.time() - t0
            if rc != 0:
                fail(f"live: exit code {rc} after SIGTERM")
            else:
                ok(f"live: SIGTERM -> exit 0 in {took:.1f}s (terminationGracePeriodSeconds {tgps})")
        except subprocess.TimeoutExpired:
            fail(f"live: still running {tgps}s after SIGTERM")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# --------------------------------------------------------------------------- compose & Dockerfile


def check_compose(server: Server) -> None:
    print("== deploy/docker-compose.yml", flush=True)
    path = ROOT / "deploy/docker-compose.yml"
    try:
        compose = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        fail(f"compose: not YAML: {e}")
        return
    services = compose.get("services", {})
    marathons = {n: s for n, s in services.items() if "MARATHON_STORE__KIND" in (s.get("environment") or {})}
    if len(marathons) < 2:
        fail(f"compose: {len(marathons)} Marathon services, want 2")
    for n, s in services.items():
        image = s.get("image", "")
        if not image or ":" not in image or image.endswith(":latest"):
            fail(f"compose: service {n} image {image!r} has no pinned tag")
        for dep in s.get("depends_on", []) or []:
            if dep not in services:
                fail(f"compose: {n} depends on unknown service {dep}")
        for v in s.get("volumes", []) or []:
            src = str(v).split(":")[0]
            if src.startswith(".") and not (path.parent / src).exists():
                fail(f"compose: {n} mounts missing file {src}")
    listen_ports = {}
    for n, s in marathons.items():
        env = {k: str(v) for k, v in s["environment"].items()}
        printed = server.check_env(f"compose {n}", env)
        if printed is None:
            continue
        if printed["store"]["kind"] != "redis" or printed["queue"]["kind"] != "sqs":
            fail(f"compose {n}: want redis store and sqs queue")
        if not printed["queue"].get("create_if_missing"):
            fail(f"compose {n}: create_if_missing is off")
        for url in (printed["store"].get("url", ""), printed["queue"].get("endpoint_url", "")):
            host = re.sub(r"^\w+://([^@/]*@)?", "", url).split(":")[0].split("/")[0]
            if host not in services:
                fail(f"compose {n}: {url} names no compose service")
        port = int(printed["server"]["listen"].rsplit(":", 1)[1])
        listen_ports[n] = port
        mapped = [str(p).rsplit(":", 1)[-1] for p in s.get("ports", [])]
        if str(port) not in mapped:
            fail(f"compose {n}: ports {s.get('ports')} do not publish the listen port {port}")
        if any(not str(p).startswith("127.0.0.1:") for p in s.get("ports", [])):
            fail(f"compose {n}: publishes a port beyond 127.0.0.1")
    prom = yaml.safe_load((ROOT / "deploy/prometheus.yml").read_text())
    targets = {t for sc in prom["scrape_configs"] for st in sc["static_configs"] for t in st["targets"]}
    paths = {sc.get("metrics_path", "/metrics") for sc in prom["scrape_configs"]}
    want = {f"{n}:{p}" for n, p in listen_ports.items()}
    if not want <= targets:
        fail(f"prometheus.yml: targets {sorted(targets)} miss {sorted(want - targets)}")
    if paths != {"/metrics"}:
        fail(f"prometheus.yml: metrics paths {paths}")
    ok(f"compose: {len(services)} services, Marathon env accepted by the server, Prometheus scrapes {sorted(want)}")


def check_dockerfile(server: Server) -> None:
    print("== Dockerfile", flush=True)
    text = (ROOT / "Dockerfile").read_text()
    if re.search(r"^\s*HEALTHCHECK", text, re.M):
        fail("Dockerfile: has a HEALTHCHECK")
    user = re.findall(r"^USER\s+(\S+)", text, re.M)
    if not user or not re.fullmatch(r"[1-9]\d*(:\d+)?", user[-1]):
        fail(f"Dockerfile: final USER {user[-1:] or None} is not a numeric non-root user")
    feats = re.search(r"^ARG FEATURES=(\S+)", text, re.M)
    known = tomllib.loads((ROOT / "server/Cargo.toml").read_text()).get("features", {})
    if not feats:
        fail("Dockerfile: no ARG FEATURES")
    else:
        for f in feats.group(1).split(","):
            if f not in known:
                fail(f"Dockerfile: feature {f} is not a marathon-server feature ({sorted(known)})")
    cmd = re.findall(r"^CMD\s+(\[.*\])", text, re.M)
    if not cmd or yaml.safe_load(cmd[-1]) != ["serve", "--listen", "0.0.0.0:8080"]:
        fail(f"Dockerfile: CMD {cmd[-1:] or None} is not serve --listen 0.0.0.0:8080")
    r = subprocess.run([server.binary, "serve", "--help"], capture_output=True, text=True)
    if "--listen" not in r.stdout:
        fail("Dockerfile: `marathon serve` has no --listen flag")
    ok("Dockerfile: numeric USER, no HEALTHCHECK, features exist, CMD serve --listen 0.0.0.0:8080")


def main() -> int:
    if len(sys.argv) != 2:
        print("usage: check_chart.py PATH_TO_MARATHON_BINARY", file=sys.stderr)
        return 2
    server = Server(sys.argv[1])
    print(f"server: {len(server.keys)} keys, maps {sorted(server.maps)}, aliases {sorted(server.aliases)}")
    with tempfile.TemporaryDirectory(prefix="helm-check-") as d:
        tmp = Path(d)
        memory_docs = check_chart(server, tmp)
        check_bad(tmp)
        check_live(server, memory_docs)
    check_compose(server)
    check_dockerfile(server)
    if failures:
        print(f"\nhelm-check: {len(failures)} failure(s):", file=sys.stderr)
        for f in failures:
            print(f"  - {f}", file=sys.stderr)
        return 1
    print("\nhelm-check: all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
