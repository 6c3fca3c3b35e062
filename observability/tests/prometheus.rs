//! A real Prometheus server scrapes a live metrics endpoint; the shipped alerting rules
//! and Grafana dashboard use only metrics the exposition has.

mod common;

use common::*;
use marathon_core::Observer;
use marathon_observability::{CONTENT_TYPE, Metrics};
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

fn repo_file(rel: &str) -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/..")).join(rel)
}

/// Serves `metrics.render()` on `/metrics`, as the server's handler does.
fn metrics_endpoint(metrics: Arc<Metrics>) -> u16 {
    serve(move |req| {
        if req.method == "GET" && req.path == "/metrics" {
            (200, CONTENT_TYPE, metrics.render().into_bytes())
        } else {
            (404, "text/plain", b"not found".to_vec())
        }
    })
}

/// Polls `GET path` on Prometheus until `ok(body)`, or fails after `timeout`.
fn poll_prometheus(
    port: u16,
    path: &str,
    timeout: Duration,
    ok: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + timeout;
    let mut last = String::new();
    loop {
        if let Ok((200, body)) = http_get(port, path) {
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&body)
                && ok(&v)
            {
                return v;
            }
            last = body;
        }
        assert!(
            Instant::now() < deadline,
            "Prometheus never answered {path} as expected; last: {last}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_prometheus_scrapes_the_metrics_endpoint() {
    let metrics = Arc::new(Metrics::new().unwrap());
    let port = metrics_endpoint(metrics.clone());
    let engine = engine(&metrics);
    let w = worker(&engine);

    let dir = temp_dir("prometheus");
    let config = dir.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             rule_files:\n  - {}\n\
             scrape_configs:\n  - job_name: marathon\n    static_configs:\n      - targets: ['127.0.0.1:{port}']\n",
            repo_file("deploy/prometheus/marathon-rules.yml").display()
        ),
    )
    .unwrap();
    let prom_port = free_port();
    let child = Command::new(prometheus())
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{prom_port}"))
        .stdout(std::fs::File::create(dir.join("prometheus.log")).unwrap())
        .stderr(std::fs::File::create(dir.join("prometheus.err")).unwrap())
        .spawn()
        .expect("prometheus starts");
    let _prom = Killed(child);

    // Workflows run while Prometheus comes up and scrapes.
    run_known_set(&engine).await;

    let wait = Duration::from_secs(60);
    tokio::task::spawn_blocking(move || {
        wait_listening(prom_port, wait);
        poll_prometheus(prom_port, "/api/v1/targets", wait, |v| {
            v["data"]["activeTargets"].as_array().is_some_and(|t| {
                t.iter()
                    .any(|t| t["health"] == "up" && t["labels"]["job"] == "marathon")
            })
        });
        let q = format!(
            "/api/v1/query?query={}",
            urlencode("marathon_workflows_started_total{workflow=\"ok\"}")
        );
        let v = poll_prometheus(prom_port, &q, wait, |v| {
            v["data"]["result"]
                .as_array()
                .is_some_and(|r| r.iter().any(|s| s["value"][1] == "3"))
        });
        assert_eq!(v["status"], "success");
        let q = format!(
            "/api/v1/query?query={}",
            urlencode("sum(marathon_workflows_closed_total)")
        );
        poll_prometheus(prom_port, &q, wait, |v| {
            v["data"]["result"]
                .as_array()
                .is_some_and(|r| r.iter().any(|s| s["value"][1] == "5"))
        });
        // Every dashboard query is PromQL Prometheus runs, and with "All" selected it
        // finds the series of a target scraped without a namespace label.
        let (_, queries) = dashboard_queries();
        for (title, expr) in &queries {
            let q = format!(
                "/api/v1/query?query={}",
                urlencode(&with_all_selected(expr))
            );
            let v = match http_get(prom_port, &q) {
                Ok((200, body)) => serde_json::from_str::<serde_json::Value>(&body).unwrap(),
                other => panic!("panel {title:?}: {expr}: {other:?}"),
            };
            assert_eq!(v["status"], "success", "panel {title:?}: {v}");
        }
        let (_, started) = queries
            .iter()
            .find(|(title, _)| title.starts_with("Workflows started"))
            .expect("a workflows-started panel");
        let q = format!(
            "/api/v1/query?query={}",
            urlencode(&with_all_selected(started))
        );
        poll_prometheus(prom_port, &q, wait, |v| {
            v["data"]["result"]
                .as_array()
                .is_some_and(|r| !r.is_empty())
        });
        // The shipped rules loaded (every one the file has) and evaluate against the
        // live series.
        let shipped = std::fs::read_to_string(repo_file("deploy/prometheus/marathon-rules.yml"))
            .expect("rules file")
            .lines()
            .filter(|l| l.trim_start().starts_with("- alert:"))
            .count();
        assert!(shipped >= 11, "{shipped} rules");
        poll_prometheus(prom_port, "/api/v1/rules", wait, |v| {
            let groups = v["data"]["groups"].as_array().cloned().unwrap_or_default();
            let rules: Vec<serde_json::Value> = groups
                .iter()
                .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
                .collect();
            rules.len() == shipped && rules.iter().all(|r| r["health"] == "ok")
        });
    })
    .await
    .unwrap();
    w.shutdown().await;
}

/// Metric names (with `_bucket`, `_sum`, `_count` for histograms) in an exposition.
fn exposed_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split_whitespace();
            let (Some(name), Some(kind)) = (parts.next(), parts.next()) else {
                continue;
            };
            names.insert(name.to_string());
            if kind == "histogram" {
                for suffix in ["_bucket", "_sum", "_count"] {
                    names.insert(format!("{name}{suffix}"));
                }
            }
        }
    }
    names
}

/// The label names of each metric in an exposition, parsed by `prometheus-parse`; a
/// histogram's `_bucket` series have `le` besides.
fn exposed_labels(text: &str) -> BTreeMap<String, BTreeSet<String>> {
    let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string())))
        .expect("exposition parses");
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for sample in &scrape.samples {
        let names: BTreeSet<String> = sample.labels.keys().cloned().collect();
        if let prometheus_parse::Value::Histogram(_) = sample.value {
            let mut with_le = names.clone();
            with_le.insert("le".into());
            out.entry(format!("{}_bucket", sample.metric))
                .or_default()
                .extend(with_le);
        }
        out.entry(sample.metric.clone()).or_default().extend(names);
    }
    out
}

/// Labels the scrape adds to every series rather than the exposition: the rules
/// aggregate by `namespace` (which a Prometheus operator ServiceMonitor sets) and `job`
/// (the Service's name then; the scrape job's otherwise), and the dashboard filters by
/// them.
const TARGET_LABELS: &[&str] = &["namespace", "job"];

/// Label names that `text` (PromQL, or YAML holding it) uses on a `marathon_*` metric
/// that lacks them (target labels aside): in selectors (`metric{label="value"}`) and in
/// `by (label, ...)` clauses, checked against the first metric after the clause.
fn unknown_labels(text: &str, labels: &BTreeMap<String, BTreeSet<String>>) -> Vec<String> {
    let metric_at = |at: &str| -> Option<(String, usize)> {
        let i = at.find("marathon_")?;
        let tail = &at[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        Some((tail[..end].to_string(), i + end))
    };
    let mut wrong = Vec::new();
    let mut check = |metric: &str, label: &str, context: &str| {
        let known =
            TARGET_LABELS.contains(&label) || labels.get(metric).is_some_and(|l| l.contains(label));
        if !known {
            wrong.push(format!("{metric} has no label {label:?} ({context})"));
        }
    };
    // Selectors.
    let mut rest = text;
    while let Some((metric, end)) = metric_at(rest) {
        rest = &rest[end..];
        if let Some(inner) = rest.strip_prefix('{').and_then(|r| r.split_once('}')) {
            for matcher in inner.0.split(',').filter(|m| !m.trim().is_empty()) {
                let name = matcher
                    .split(['=', '!', '~'])
                    .next()
                    .unwrap_or_default()
                    .trim();
                check(&metric, name, matcher.trim());
            }
        }
    }
    // Aggregations.
    let mut rest = text;
    while let Some(i) = rest.find("by (") {
        rest = &rest[i + 4..];
        let Some((list, after)) = rest.split_once(')') else {
            break;
        };
        let Some((metric, _)) = metric_at(after) else {
            break;
        };
        for name in list.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            check(&metric, name, &format!("by ({list})"));
        }
    }
    wrong
}

#[test]
fn label_checks_catch_a_misspelt_label() {
    let mut labels = BTreeMap::new();
    labels.insert(
        "marathon_x_total".to_string(),
        BTreeSet::from(["workflow".to_string(), "status".to_string()]),
    );
    let good = r#"sum by (workflow) (rate(marathon_x_total{status="failed", workflow=~"$w"}[5m]))"#;
    assert_eq!(unknown_labels(good, &labels), Vec::<String>::new());
    let bad = r#"sum by (workflow, queue) (rate(marathon_x_total{stat="failed"}[5m]))"#;
    assert_eq!(
        unknown_labels(bad, &labels).len(),
        2,
        "{:?}",
        unknown_labels(bad, &labels)
    );
}

/// Every `marathon_*` identifier in `text`.
fn used_names(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("marathon_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        // Skip words that merely contain the prefix (e.g. `xmarathon_`).
        let before = rest[..i].chars().last();
        if !before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
            out.insert(tail[..end].to_string());
        }
        rest = &tail[end..];
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_and_dashboard_use_only_exposed_metrics() {
    let metrics = Arc::new(Metrics::new().unwrap());
    let engine = engine(&metrics);
    let w = worker(&engine);
    run_known_set(&engine).await;
    w.shutdown().await;
    // Series that only appear when something goes wrong or an LLM is called.
    metrics.dead_lettered("default", 1);
    metrics.overdue("workflow_task");
    metrics.record_llm_tokens("openai", "m", "input", 1);
    let text = metrics.render();
    let exposed = exposed_names(&text);
    let labels = exposed_labels(&text);

    let rules_path = repo_file("deploy/prometheus/marathon-rules.yml");
    let rules = std::fs::read_to_string(&rules_path).unwrap();
    let (dashboard, queries) = dashboard_queries();
    let mut exprs = String::new();
    for (title, expr) in &queries {
        // Every series a panel selects is filtered by the dashboard's namespace and
        // job variables, so that releases can be told apart.
        let selectors = expr.matches("marathon_").count();
        let filtered = expr.matches(NAMESPACE_FILTER).count();
        assert_eq!(
            filtered, selectors,
            "panel {title:?} selects series without {NAMESPACE_FILTER}: {expr}"
        );
        exprs.push_str(expr);
        exprs.push('\n');
    }
    exprs.push_str(&dashboard["templating"].to_string());

    for (what, text) in [("rules", &rules), ("dashboard", &exprs)] {
        let used = used_names(text);
        assert!(used.len() >= 8, "{what} uses {used:?}");
        let missing: Vec<_> = used.difference(&exposed).collect();
        assert!(
            missing.is_empty(),
            "{what} uses metrics the exposition lacks: {missing:?}"
        );
        let wrong = unknown_labels(text, &labels);
        assert!(
            wrong.is_empty(),
            "{what} uses labels its metrics lack: {wrong:#?}"
        );
    }

    promtool_passes("check", &rules_path);
}

/// The selector every dashboard query puts first on each `marathon_*` series.
const NAMESPACE_FILTER: &str = r#"{namespace=~"$namespace",job=~"$job""#;

/// The shipped Grafana dashboard, and each panel query with its panel's title.
fn dashboard_queries() -> (serde_json::Value, Vec<(String, String)>) {
    let text =
        std::fs::read_to_string(repo_file("deploy/grafana/marathon-dashboard.json")).unwrap();
    let dashboard: serde_json::Value = serde_json::from_str(&text).expect("dashboard is JSON");
    let panels = dashboard["panels"].as_array().expect("panels");
    assert!(panels.len() >= 10);
    let mut queries = Vec::new();
    for p in panels {
        let targets = p["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "panel {} has no query", p["title"]);
        for t in targets {
            let title = p["title"].as_str().unwrap_or_default().to_string();
            queries.push((title, t["expr"].as_str().expect("expr").to_string()));
        }
    }
    (dashboard, queries)
}

/// A dashboard query as Grafana sends it with every variable at "All".
fn with_all_selected(expr: &str) -> String {
    expr.replace("$namespace", ".*")
        .replace("$job", ".*")
        .replace("$workflow", ".*")
        .replace("$__rate_interval", "1m")
}

/// Runs `promtool <command> rules <file>` and fails the test with its output unless it passes.
fn promtool_passes(command: &str, file: &std::path::Path) {
    let out = Command::new(promtool())
        .args([command, "rules"])
        .arg(file)
        .output()
        .expect("promtool runs");
    assert!(
        out.status.success(),
        "promtool {command} rules: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The alerting rules fire, and stay quiet, on the series their unit tests feed them
/// (`deploy/prometheus/marathon-rules.test.yml`): among them a deployment where no
/// workflow has ever closed, so that the closed counter has no series at all.
#[test]
fn alerting_rules_pass_their_unit_tests() {
    promtool_passes(
        "test",
        &repo_file("deploy/prometheus/marathon-rules.test.yml"),
    );
}
