//! Tests of the built `marathon` binary: serving, graceful shutdown, config layering and errors.

use serde_json::{Value, json};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_marathon");

/// The observability tests' helpers: free ports, a tiny HTTP server, URL encoding and
/// the external tools.
#[path = "../../observability/tests/common/mod.rs"]
mod common;
use common::{dechunk, free_port, urlencode};

/// The binary with a clean environment (no inherited `MARATHON_*`).
fn marathon(args: &[&str], env: &[(&str, &str)]) -> Command {
    let mut c = Command::new(BIN);
    c.env_clear().args(args);
    for (k, v) in env {
        c.env(k, v);
    }
    c
}

fn run(args: &[&str], env: &[(&str, &str)]) -> Output {
    marathon(args, env).output().expect("marathon runs")
}

/// A minimal HTTP/1.1 client: one request per connection.
fn http(
    port: u16,
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> std::io::Result<(u16, String)> {
    http_with(port, method, path, body, &[])
}

/// [`http`] with extra request headers.
fn http_with(
    port: u16,
    method: &str,
    path: &str,
    body: Option<&Value>,
    headers: &[(&str, &str)],
) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    let body = body.map(Value::to_string).unwrap_or_default();
    let extra: String = headers
        .iter()
        .map(|(k, v)| format!("{k}: {v}\r\n"))
        .collect();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n{extra}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    Ok(response(&raw))
}

/// The status and (de-chunked) body of a raw HTTP/1.1 response.
fn response(raw: &[u8]) -> (u16, String) {
    let text = String::from_utf8_lossy(raw).into_owned();
    let (head, rest) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(rest)
    } else {
        rest.to_string()
    };
    (status, body)
}

struct Running {
    child: Child,
    port: u16,
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn serve(extra: &[&str]) -> Running {
    serve_with(extra, &[])
}

/// [`serve`] with extra environment variables. The server picks its own port
/// (`--listen 127.0.0.1:0`) and the test reads it from the start-up line: a port
/// picked free by the test and bound later by the server can be taken meanwhile (by
/// another test's server, whose `/healthz` would then answer for this one).
fn serve_with(extra: &[&str], env: &[(&str, &str)]) -> Running {
    let mut args = vec!["serve", "--listen", "127.0.0.1:0"];
    args.extend_from_slice(extra);
    let mut vars = vec![("MARATHON_LOG", "info")];
    vars.extend_from_slice(env);
    let mut child = marathon(&args, &vars)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("marathon starts");
    let stdout = child.stdout.take().expect("piped stdout");
    let (port_tx, port_rx) = std::sync::mpsc::channel();
    // Reads the log to its end, so that the server never blocks on a full pipe.
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { return };
            if line.contains("marathon serving")
                && let Some(port) = line
                    .split_once("addr=127.0.0.1:")
                    .and_then(|(_, rest)| rest.split_whitespace().next())
                    .and_then(|p| p.parse::<u16>().ok())
            {
                let _ = port_tx.send(port);
            }
        }
    });
    let mut r = Running { child, port: 0 };
    r.port = port_rx
        .recv_timeout(Duration::from_secs(60))
        .expect("marathon logs the address it serves on");
    let port = r.port;
    wait_until(Duration::from_secs(30), "marathon answers /healthz", || {
        matches!(http(port, "GET", "/healthz", None), Ok((200, _)))
    });
    r
}

/// Polls `done` every 50 ms until it holds; fails naming `what` after `within`.
fn wait_until(within: Duration, what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn wait_exit(child: &mut Child, within: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

#[test]
fn serves_workflows_and_stops_on_sigterm_within_the_grace() {
    let mut m = serve(&[
        "--set",
        "server.shutdown_grace_ms=3000",
        "--set",
        "worker.shutdown_grace_ms=3000",
    ]);
    let (status, body) = http(
        m.port,
        "POST",
        "/v1/workflows",
        Some(&json!({"name": "echo", "id": "p-echo", "input": "hi"})),
    )
    .expect("start");
    assert_eq!(status, 202, "{body}");
    let (status, body) =
        http(m.port, "GET", "/v1/workflows/p-echo/result?wait=10s", None).expect("result");
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).expect("json");
    assert_eq!(v["output"], "hi");

    let (status, body) = http(
        m.port,
        "POST",
        "/v1/workflows",
        Some(&json!({"name": "sleep-then-echo", "id": "p-sleep", "input": {"ms": 600000}})),
    )
    .expect("start");
    assert_eq!(status, 202, "{body}");
    let (status, _) = http(m.port, "GET", "/readyz", None).expect("readyz");
    assert_eq!(status, 200);

    // An SSE stream open at shutdown ends with it. SIGTERM goes once the stream has
    // sent its first event (a fixed 300 ms wait could send it before the stream was
    // open on a loaded machine).
    let port = m.port;
    let (opened, is_open) = std::sync::mpsc::channel();
    let sse = std::thread::spawn(move || -> std::io::Result<(u16, String)> {
        let mut s = TcpStream::connect(("127.0.0.1", port))?;
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        write!(
            s,
            "GET /v1/workflows/p-sleep/events/stream HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
        )?;
        let mut raw = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            let n = s.read(&mut buf)?;
            if n == 0 {
                return Ok(response(&raw));
            }
            raw.extend_from_slice(&buf[..n]);
            if String::from_utf8_lossy(&raw).contains("event: workflow_started") {
                let _ = opened.send(());
            }
        }
    });
    is_open
        .recv_timeout(Duration::from_secs(30))
        .expect("the stream sends its first event");

    let pid = m.child.id().to_string();
    let killed = Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill runs");
    assert!(killed.success());
    let started = Instant::now();
    // The 3 s grace, with room for a loaded machine (the sleeping run would hold it
    // for 10 minutes).
    let status = wait_exit(&mut m.child, Duration::from_secs(10)).expect("exits within the grace");
    assert_eq!(status.code(), Some(0), "exit status {status:?}");
    assert!(started.elapsed() < Duration::from_secs(10));
    let (status, body) = sse.join().expect("sse thread").expect("sse response");
    assert_eq!(status, 200);
    assert!(body.contains("event: workflow_started"), "{body}");
}

/// A second SIGTERM (or Ctrl-C) during the drain exits at once, with code 130: an
/// operator need not wait out a long grace. Before, the second signal was ignored
/// and the process waited for the whole drain (60 s here, with a running activity).
#[test]
fn a_second_signal_exits_without_waiting_for_the_drain() {
    let mut m = serve(&[
        "--set",
        "server.shutdown_grace_ms=60000",
        "--set",
        "worker.shutdown_grace_ms=60000",
    ]);
    let (status, body) = http(
        m.port,
        "POST",
        "/v1/workflows",
        Some(
            &json!({"name": "pipeline", "id": "p-drain", "input": {"pipeline": {"steps": [
                {"type": "activity", "name": "nap", "activity": "sleep", "input": 600000,
                 "options": {"start_to_close_ms": 3600000}}
            ]}}}),
        ),
    )
    .expect("start");
    assert_eq!(status, 202, "{body}");
    // The sleep activity runs (and would hold the drain) once its call is scheduled.
    wait_until(Duration::from_secs(30), "the sleep is scheduled", || {
        http(m.port, "GET", "/v1/workflows/p-drain/events", None)
            .is_ok_and(|(_, body)| body.contains("activity_scheduled"))
    });
    std::thread::sleep(Duration::from_millis(500));
    let pid = m.child.id().to_string();
    let term = || {
        let killed = Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("kill runs");
        assert!(killed.success());
    };
    term();
    // Draining: still running a second later.
    assert!(
        wait_exit(&mut m.child, Duration::from_secs(1)).is_none(),
        "exited before the drain"
    );
    term();
    let status = wait_exit(&mut m.child, Duration::from_secs(10))
        .expect("exits soon after the second signal");
    assert_eq!(status.code(), Some(130), "exit status {status:?}");
}

/// A client that never finishes its request's headers is disconnected after
/// `server.header_read_timeout_ms`, and so is an idle keep-alive connection; a
/// request whose answer takes longer than that (a long poll) is not cut.
#[test]
fn stalled_clients_are_disconnected_but_long_polls_are_not() {
    let m = serve(&["--set", "server.header_read_timeout_ms=500"]);
    let closed_within = |mut s: TcpStream, what: &str| {
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let started = Instant::now();
        let mut buf = Vec::new();
        match s.read_to_end(&mut buf) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            Err(e) => panic!("{what}: still open after {:?}: {e}", started.elapsed()),
        }
        buf
    };
    let mut stalled = TcpStream::connect(("127.0.0.1", m.port)).unwrap();
    write!(stalled, "GET /healthz HTTP/1.1\r\nHost: localhost\r\n").unwrap();
    closed_within(stalled, "half-sent headers");
    let mut idle = TcpStream::connect(("127.0.0.1", m.port)).unwrap();
    write!(idle, "GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n").unwrap();
    let answered = String::from_utf8_lossy(&closed_within(idle, "idle keep-alive")).to_string();
    assert!(answered.starts_with("HTTP/1.1 200"), "{answered}");

    let (status, body) = http(
        m.port,
        "POST",
        "/v1/workflows",
        Some(&json!({"name": "sleep-then-echo", "id": "p-slow", "input": {"ms": 1500}})),
    )
    .expect("start");
    assert_eq!(status, 202, "{body}");
    let (status, body) =
        http(m.port, "GET", "/v1/workflows/p-slow/result?wait=20s", None).expect("result");
    assert_eq!(status, 200, "{body}");
}

#[test]
fn config_layers_file_env_flags_and_print_masks_secrets() {
    let dir = std::env::temp_dir().join(format!("marathon-test-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let file = dir.join("marathon.toml");
    std::fs::write(
        &file,
        "[server]\nlisten = \"127.0.0.1:1111\"\nbody_limit = 10\nauth_tokens = [\"file-secret\"]\n[engine]\ncache_capacity = 7\n[log]\nformat = \"json\"\n",
    )
    .expect("write config");
    let file = file.to_string_lossy().into_owned();
    let out = run(
        &[
            "config",
            "print",
            "--config",
            &file,
            "--listen",
            "127.0.0.1:3333",
        ],
        &[
            ("MARATHON_LISTEN", "127.0.0.1:2222"),
            ("MARATHON_SERVER__BODY_LIMIT", "20"),
            ("MARATHON_AUTH_TOKENS", "env-secret-1,env-secret-2"),
        ],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cfg: toml::Table = toml::from_str(&text).expect("print is TOML");
    assert_eq!(
        cfg["server"]["listen"].as_str(),
        Some("127.0.0.1:3333"),
        "{text}"
    );
    assert_eq!(cfg["server"]["body_limit"].as_integer(), Some(20), "{text}");
    assert_eq!(
        cfg["engine"]["cache_capacity"].as_integer(),
        Some(7),
        "{text}"
    );
    assert_eq!(cfg["log"]["format"].as_str(), Some("json"), "{text}");
    assert!(!text.contains("secret"), "{text}");
    assert_eq!(
        cfg["server"]["auth_tokens"].as_array().map(Vec::len),
        Some(2),
        "{text}"
    );
    assert!(text.contains("***"), "{text}");

    // MARATHON_CONFIG names the file too.
    let out = run(&["config", "print"], &[("MARATHON_CONFIG", &file)]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("127.0.0.1:1111"), "{text}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A variable that is not UTF-8 in the environment (another program's, a file name
/// in a legacy encoding) does not crash the binary; one of Marathon's is named.
#[cfg(unix)]
#[test]
fn a_variable_that_is_not_utf8_is_ignored_unless_it_is_marathons() {
    use std::os::unix::ffi::OsStrExt;
    let junk = std::ffi::OsStr::from_bytes(b"caf\xe9");
    let out = marathon(&["config", "print"], &[])
        .env("SOME_OTHER_TOOL", junk)
        .output()
        .expect("marathon runs");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("[server]"),
        "{err}"
    );
    let out = marathon(&["config", "print"], &[])
        .env("MARATHON_LOG", junk)
        .output()
        .expect("marathon runs");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("MARATHON_LOG"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

/// Arguments, environment, and a part of the expected message.
type Case<'a> = (&'a [&'a str], &'a [(&'a str, &'a str)], &'a str);

#[test]
fn bad_configuration_exits_2_with_a_clear_message() {
    let cases: &[Case<'_>] = &[
        (
            &["serve"],
            &[("MARATHON_SERVER__BODY_LIMIT", "lots")],
            "MARATHON_SERVER__BODY_LIMIT",
        ),
        (&["serve", "--listen", "nowhere"], &[], "server.listen"),
        (&["serve", "--role", "api"], &[], "memory"),
        (&["serve", "--set", "server.colour=blue"], &[], "colour"),
        (&["serve", "--set", "nonsense"], &[], "KEY=VALUE"),
        (
            &["config", "print", "--config", "/nonexistent/marathon.toml"],
            &[],
            "cannot read",
        ),
        #[cfg(not(feature = "redis"))]
        (&["serve", "--store", "redis"], &[], "`redis` feature"),
        #[cfg(not(feature = "sqs"))]
        (&["serve", "--queue", "sqs"], &[], "`sqs` feature"),
        #[cfg(feature = "otel")]
        (
            &["serve"],
            &[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318"),
                ("OTEL_BSP_MAX_QUEUE_SIZE", "64k"),
            ],
            "OTEL_BSP_MAX_QUEUE_SIZE",
        ),
    ];
    for (args, env, expected) in cases {
        let out = run(args, env);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(expected), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
}

/// A SIGTERM while the server is still starting (here, connecting to a store that
/// accepts the connection and never answers) stops it, with code 0. Before, the
/// second-signal watcher, installed before start-up, took that first signal, and the
/// drain's own watcher, installed only once serving, never saw it: the process went
/// on starting (and, had the store answered, served on) as if no signal had come.
#[cfg(feature = "redis")]
#[test]
fn a_signal_during_start_up_stops_the_server() {
    let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("binds");
    let url = format!(
        "store.url=redis://127.0.0.1:{}",
        silent.local_addr().expect("address").port()
    );
    let child = marathon(
        &[
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--store",
            "redis",
            "--set",
            &url,
            "--set",
            "store.connect_timeout=600000",
            "--set",
            "store.response_timeout=600000",
        ],
        &[],
    )
    .stdout(Stdio::null())
    .stderr(Stdio::null())
    .spawn()
    .expect("marathon starts");
    let mut m = Running { child, port: 0 };
    // The store's connection: the process is starting, its signal handlers installed.
    let (accepted, connected) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = accepted.send(silent.accept().map(|(conn, _)| conn));
    });
    let _conn = connected
        .recv_timeout(Duration::from_secs(30))
        .expect("marathon connects to the store")
        .expect("accepts");
    let killed = Command::new("kill")
        .args(["-TERM", &m.child.id().to_string()])
        .status()
        .expect("kill runs");
    assert!(killed.success());
    let status = wait_exit(&mut m.child, Duration::from_secs(20))
        .expect("a SIGTERM during start-up stops the process");
    assert_eq!(status.code(), Some(0), "exit status {status:?}");
}

/// Runs the binary for at most `within` (killing it then): its exit code, if it
/// exited, and what it printed on stderr.
#[cfg(any(feature = "redis", feature = "sqs"))]
fn run_within(args: &[&str], env: &[(&str, &str)], within: Duration) -> (Option<i32>, String) {
    let mut child = marathon(args, env)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("marathon starts");
    let status = wait_exit(&mut child, within);
    if status.is_none() {
        let _ = child.kill();
    }
    let out = child.wait_with_output().expect("marathon's output");
    (
        status.and_then(|s| s.code()),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Redis settings the store would refuse when connecting are configuration errors
/// (exit 2, naming the key), not backends that cannot connect (exit 1).
#[cfg(feature = "redis")]
#[test]
fn bad_redis_settings_exit_2_naming_the_key() {
    let cases: &[Case<'_>] = &[
        (
            &["serve"],
            &[
                ("MARATHON_STORE__KIND", "redis"),
                ("MARATHON_STORE__URL", "notaurl"),
            ],
            "store.url",
        ),
        (
            &[
                "serve",
                "--store",
                "redis",
                "--set",
                "store.url=http://127.0.0.1:6379",
            ],
            &[],
            "store.url",
        ),
        (
            &["serve", "--store", "redis", "--set", "store.shards=0"],
            &[],
            "store.shards",
        ),
        (
            &[
                "serve",
                "--store",
                "redis",
                "--set",
                "store.key_prefix=re{vD",
            ],
            &[],
            "store.key_prefix",
        ),
        (
            &[
                "serve",
                "--store",
                "redis",
                "--set",
                "store.tls_ca_file=/nonexistent/ca.pem",
            ],
            &[],
            "store.tls_ca_file",
        ),
    ];
    for (args, env, expected) in cases {
        let (code, err) = run_within(args, env, Duration::from_secs(20));
        assert_eq!(code, Some(2), "{args:?} {env:?}: {err}");
        assert!(err.contains(expected), "{args:?} {env:?}: {err}");
    }
}

/// Extra environment variables, and parts of the expected message.
#[cfg(feature = "sqs")]
type SqsCase<'a> = (&'a [(&'a str, &'a str)], &'a [&'a str]);

/// SQS settings that would leave a server retrying forever stop start-up (exit 2)
/// naming the key: an endpoint that is no URL, no region anywhere, a queue that
/// does not exist while `create_if_missing` is off, and a queue URL (`queue_urls`)
/// that is no URL or names no queue.
#[cfg(feature = "sqs")]
#[test]
fn sqs_settings_that_never_work_stop_start_up() {
    let endpoint = marathon_sqs::testkit::endpoint();
    let prefix = marathon_sqs::testkit::prefix();
    let missing = format!("{prefix}default");
    let missing_url = format!("{endpoint}/000000000000/{prefix}by-url");
    let base: &[(&str, &str)] = &[
        ("MARATHON_QUEUE__KIND", "sqs"),
        ("MARATHON_QUEUE__QUEUE_PREFIX", &prefix),
        ("AWS_ACCESS_KEY_ID", "test"),
        ("AWS_SECRET_ACCESS_KEY", "test"),
        ("AWS_EC2_METADATA_DISABLED", "true"),
        ("AWS_CONFIG_FILE", "/nonexistent/aws-config"),
        (
            "AWS_SHARED_CREDENTIALS_FILE",
            "/nonexistent/aws-credentials",
        ),
    ];
    let cases: &[SqsCase<'_>] = &[
        (
            &[
                ("MARATHON_QUEUE__ENDPOINT_URL", "notaurl"),
                ("MARATHON_QUEUE__REGION", "us-east-1"),
            ],
            &["queue.endpoint_url"],
        ),
        (
            &[("MARATHON_QUEUE__ENDPOINT_URL", &endpoint)],
            &["queue.region"],
        ),
        (
            &[
                ("MARATHON_QUEUE__ENDPOINT_URL", &endpoint),
                ("MARATHON_QUEUE__REGION", ""),
            ],
            &["queue.region"],
        ),
        (
            &[
                ("MARATHON_QUEUE__ENDPOINT_URL", &endpoint),
                ("MARATHON_QUEUE__REGION", "us-east-1"),
            ],
            &[&missing, "queue.create_if_missing"],
        ),
        (
            &[
                ("MARATHON_QUEUE__ENDPOINT_URL", &endpoint),
                ("MARATHON_QUEUE__REGION", "us-east-1"),
                ("MARATHON_QUEUE__QUEUE_URLS__DEFAULT", &missing_url),
            ],
            &["queue.queue_urls.default", &missing_url],
        ),
        (
            &[
                ("MARATHON_QUEUE__ENDPOINT_URL", &endpoint),
                ("MARATHON_QUEUE__REGION", "us-east-1"),
                ("MARATHON_QUEUE__QUEUE_URLS__DEFAULT", "marathon-default"),
            ],
            &["queue.queue_urls.default", "http(s) URL"],
        ),
    ];
    for (extra, expected) in cases {
        let mut env = base.to_vec();
        env.extend_from_slice(extra);
        let (code, err) = run_within(
            &["serve", "--listen", "127.0.0.1:0"],
            &env,
            Duration::from_secs(20),
        );
        assert_eq!(code, Some(2), "{extra:?}: {err}");
        for e in *expected {
            assert!(err.contains(e), "{extra:?}: expected {e:?} in {err}");
        }
    }
}

/// The start-up line shows the address as it is, not as a Rust `Option`.
#[test]
fn the_start_up_line_shows_the_address_plainly() {
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let child = marathon(&["serve", "--listen", &listen], &[("MARATHON_LOG", "info")])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("marathon starts");
    let mut r = Running { child, port };
    wait_until(Duration::from_secs(30), "marathon answers /healthz", || {
        matches!(http(r.port, "GET", "/healthz", None), Ok((200, _)))
    });
    let _ = r.child.kill();
    let _ = r.child.wait();
    let mut out = String::new();
    for pipe in [
        r.child.stdout.take().map(|mut p| {
            let mut s = String::new();
            let _ = p.read_to_string(&mut s);
            s
        }),
        r.child.stderr.take().map(|mut p| {
            let mut s = String::new();
            let _ = p.read_to_string(&mut s);
            s
        }),
    ]
    .into_iter()
    .flatten()
    {
        out.push_str(&pipe);
    }
    let line = out
        .lines()
        .find(|l| l.contains("marathon serving"))
        .unwrap_or_else(|| panic!("no start-up line in {out}"));
    assert!(line.contains(&format!("addr={listen}")), "{line}");
    assert!(!line.contains("Some("), "{line}");
}

/// The value of the one sample of `name` whose labels include every `labels` pair.
fn sample(scrape: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    common::sample_value(scrape, name, labels, false)
}

/// Starts workflow `id` and waits for it to close; returns its status.
fn run_to_end(port: u16, body: &Value, cancel: bool) -> String {
    let id = body["id"].as_str().expect("id");
    let (status, text) = http(port, "POST", "/v1/workflows", Some(body)).expect("start");
    assert_eq!(status, 202, "{text}");
    if cancel {
        let path = format!("/v1/workflows/{id}/cancel");
        let (status, text) = http(port, "POST", &path, Some(&json!({}))).expect("cancel");
        assert_eq!(status, 202, "{text}");
    }
    let path = format!("/v1/workflows/{id}/result?wait=20s");
    let (status, text) = http(port, "GET", &path, None).expect("result");
    assert_eq!(status, 200, "{text}");
    let v: Value = serde_json::from_str(&text).expect("JSON");
    v["status"].as_str().expect("status").to_string()
}

/// Runs the known set on the server at `port`: three `echo` completed, one `pipeline`
/// failed, one `sleep-then-echo` canceled (ids `{tag}-…`).
fn run_known_set(port: u16, tag: &str) {
    for i in 0..3 {
        let body = json!({"name": "echo", "id": format!("{tag}-echo-{i}"), "input": i});
        assert_eq!(run_to_end(port, &body, false), "completed");
    }
    // A pipeline whose one step gives `sleep` an input it cannot read: failed.
    let failing = json!({"name": "pipeline", "id": format!("{tag}-fail"), "input": {
        "pipeline": {"steps": [{"type": "activity", "name": "s", "activity": "sleep", "input": "abc"}]},
        "input": null,
    }});
    assert_eq!(run_to_end(port, &failing, false), "failed");
    let sleeper = json!({"name": "sleep-then-echo", "id": format!("{tag}-cancel"),
        "input": {"ms": 60000, "value": 1}});
    assert_eq!(run_to_end(port, &sleeper, true), "canceled");
}

/// `/metrics` of the server at `port`, parsed with a real exposition parser; the text too.
fn scrape(port: u16) -> (prometheus_parse::Scrape, String) {
    let (status, text) = http(port, "GET", "/metrics", None).expect("metrics");
    assert_eq!(status, 200, "{text}");
    (common::parse(&text), text)
}

/// Asserts `name{labels}` is exactly `want` in `scrape` (`text` is shown on failure).
fn exact(
    (scrape, text): &(prometheus_parse::Scrape, String),
    name: &str,
    labels: &[(&str, &str)],
    want: f64,
) {
    assert_eq!(
        sample(scrape, name, labels),
        Some(want),
        "{name}{labels:?}\n{text}"
    );
}

/// `/metrics` of the server at `port` once the last counts of [`run_known_set`] are in:
/// a close and an attempt's outcome are counted just after the store records them, so
/// a client that has seen the status may scrape a moment before (under load it did).
fn scrape_known_set(port: u16) -> (prometheus_parse::Scrape, String) {
    wait_until(Duration::from_secs(10), "the known set is counted", || {
        let (s, _) = scrape(port);
        let canceled = [("workflow", "sleep-then-echo"), ("status", "canceled")];
        let failed = [("activity", "sleep"), ("outcome", "failed")];
        sample(&s, "marathon_workflows_closed_total", &canceled).is_some()
            && sample(&s, "marathon_activity_attempts_total", &failed).is_some()
    });
    scrape(port)
}

/// The exact counts [`run_known_set`] leaves, on a server whose store is `store`.
fn assert_known_set_counted(s: &(prometheus_parse::Scrape, String), store: &str) {
    for (workflow, status, n) in [
        ("echo", "completed", 3.0),
        ("pipeline", "failed", 1.0),
        ("sleep-then-echo", "canceled", 1.0),
    ] {
        exact(
            s,
            "marathon_workflows_started_total",
            &[("workflow", workflow)],
            n,
        );
        let closed = [("workflow", workflow), ("status", status)];
        exact(s, "marathon_workflows_closed_total", &closed, n);
        // One duration observation per closed workflow: the `+Inf` bucket and `_count`.
        exact(s, "marathon_workflow_duration_seconds", &closed, n);
        exact(s, "marathon_workflow_duration_seconds_count", &closed, n);
    }
    let echo = [("activity", "echo"), ("outcome", "completed")];
    let failed = [("activity", "sleep"), ("outcome", "failed")];
    exact(s, "marathon_activity_attempts_total", &echo, 3.0);
    exact(s, "marathon_activity_attempt_seconds_count", &echo, 3.0);
    exact(s, "marathon_activity_attempt_seconds_count", &failed, 1.0);
    exact(s, "marathon_activity_attempts_total", &failed, 1.0);
    // Every start is one store `create`.
    let creates = [
        ("operation", "create"),
        ("backend", store),
        ("outcome", "ok"),
    ];
    exact(s, "marathon_store_operation_seconds_count", &creates, 5.0);
    exact(
        s,
        "marathon_activities_in_flight",
        &[("activity", "echo")],
        0.0,
    );
}

/// `/metrics` of the running binary, parsed with a real exposition parser, after a known
/// set of workflows: three completed, one failed, one canceled.
#[test]
fn metrics_count_what_the_server_ran() {
    let m = serve(&[]);
    run_known_set(m.port, "m");
    assert_known_set_counted(&scrape_known_set(m.port), "memory");
}

/// A real Prometheus scrapes the running binary, and `promtool` accepts its exposition.
#[test]
fn a_real_prometheus_scrapes_a_running_marathon() {
    let m = serve(&[]);
    for i in 0..2 {
        let id = format!("prom-{i}");
        let (status, body) = http(
            m.port,
            "POST",
            "/v1/workflows",
            Some(&json!({"name": "echo", "id": id, "input": i})),
        )
        .expect("start");
        assert_eq!(status, 202, "{body}");
        let (status, _) = http(
            m.port,
            "GET",
            &format!("/v1/workflows/{id}/result?wait=10s"),
            None,
        )
        .expect("result");
        assert_eq!(status, 200);
    }
    let (_, exposition) = http(m.port, "GET", "/metrics", None).expect("metrics");
    let mut check = Command::new(common::promtool())
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool on the PATH (scripts/observability-tools.sh installs it)");
    check
        .stdin
        .take()
        .expect("stdin")
        .write_all(exposition.as_bytes())
        .expect("write");
    let out = check.wait_with_output().expect("promtool runs");
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    let dir = std::env::temp_dir().join(format!("marathon-prom-{}", m.port));
    std::fs::create_dir_all(&dir).expect("temp dir");
    std::fs::write(
        dir.join("prometheus.yml"),
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: marathon\n    static_configs:\n      - targets: ['127.0.0.1:{}']\n",
            m.port
        ),
    )
    .expect("config");
    let prom_port = free_port();
    let mut prom = Command::new(common::prometheus())
        .arg(format!(
            "--config.file={}",
            dir.join("prometheus.yml").display()
        ))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{prom_port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("prometheus on the PATH (scripts/observability-tools.sh installs it)");
    let query = format!(
        "/api/v1/query?query={}",
        urlencode("marathon_workflows_started_total{workflow=\"echo\",job=\"marathon\"}")
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last = String::new();
    let found = loop {
        if let Ok((200, body)) = http(prom_port, "GET", &query, None) {
            let v: Value = serde_json::from_str(&body).unwrap_or_default();
            if v["data"]["result"]
                .as_array()
                .is_some_and(|r| r.iter().any(|s| s["value"][1] == "2"))
            {
                break true;
            }
            last = body;
        }
        if Instant::now() > deadline {
            break false;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let _ = prom.kill();
    let _ = prom.wait();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        found,
        "Prometheus never saw 2 started echo workflows; last answer: {last}"
    );
}

/// Starts `echo` as `id` with a caller's `traceparent` in trace `trace`, waits for its
/// result and its spans, and asserts they are one unbroken tree under the caller's span:
/// the request span, and under it every workflow task and the activity, which follows
/// the workflow task that scheduled it across the queue hop.
#[cfg(feature = "otel")]
fn traced_echo(
    port: u16,
    spans: &std::sync::Mutex<Vec<common::Span>>,
    id: &str,
    trace: &str,
) -> Vec<common::Span> {
    let caller = "00f067aa0ba902b7";
    let (status, body) = http_with(
        port,
        "POST",
        "/v1/workflows",
        Some(&json!({"name": "echo", "id": id, "input": "hi"})),
        &[("traceparent", &format!("00-{trace}-{caller}-01"))],
    )
    .expect("start");
    assert_eq!(status, 202, "{body}");
    let path = format!("/v1/workflows/{id}/result?wait=20s");
    let (status, body) = http(port, "GET", &path, None).expect("result");
    assert_eq!(status, 200, "{body}");
    // The run's summary names its trace.
    let (status, body) = http(port, "GET", &format!("/v1/workflows/{id}"), None).expect("get");
    assert_eq!(status, 200, "{body}");
    let summary: Value = serde_json::from_str(&body).expect("JSON");
    let tc = summary["trace_context"].as_str().unwrap_or_default();
    assert!(tc.starts_with(&format!("00-{trace}-")), "{summary}");
    let (trace, caller) = (common::hex_bytes(trace), common::hex_bytes(caller));
    // The parent each span's chain must end at: the request's is the caller's span.
    let rooted = |ours: &[common::Span], s: &common::Span| {
        let mut at = s;
        for _ in 0..ours.len() {
            if at.parent == caller {
                return at.name == "http.request";
            }
            match ours.iter().find(|p| p.span_id == at.parent) {
                Some(p) => at = p,
                None => return false,
            }
        }
        false
    };
    // The batch processor sends every 100 ms here; the last workflow task ends after
    // the result is stored.
    let deadline = Instant::now() + Duration::from_secs(20);
    let ours = loop {
        let ours: Vec<common::Span> = spans
            .lock()
            .expect("not poisoned")
            .iter()
            .filter(|s| s.trace_id == trace)
            .cloned()
            .collect();
        let tasks = ours
            .iter()
            .filter(|s| s.name == "marathon.workflow_task")
            .count();
        if tasks >= 2
            && ours.iter().any(|s| s.name == "marathon.activity")
            && ours.iter().all(|s| rooted(&ours, s))
        {
            break ours;
        }
        assert!(
            Instant::now() < deadline,
            "spans of the caller's trace: {ours:#?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let requests: Vec<_> = ours.iter().filter(|s| s.name == "http.request").collect();
    assert_eq!(requests.len(), 1, "one request span, the start: {ours:#?}");
    // A server span (OTLP kind 2), as OpenTelemetry's HTTP conventions have it.
    assert_eq!(requests[0].kind, 2, "{:#?}", requests[0]);
    // From the activity up through its parents: a workflow task (the queue hop) and
    // then the request span.
    let activity = ours
        .iter()
        .find(|s| s.name == "marathon.activity")
        .expect("the activity's span");
    let mut chain = vec![activity.name.clone()];
    let mut at = activity;
    while let Some(parent) = ours.iter().find(|s| s.span_id == at.parent) {
        chain.push(parent.name.clone());
        at = parent;
    }
    assert_eq!(
        chain,
        [
            "marathon.activity",
            "marathon.workflow_task",
            "http.request"
        ],
        "{ours:#?}"
    );
    ours
}

/// The `marathon` binary with tracing on: a request carrying a caller's `traceparent`
/// continues that trace, through the workflow's tasks and a queue hop, to the activity.
#[cfg(feature = "otel")]
#[test]
fn a_callers_trace_runs_through_the_server_to_the_activity() {
    let (otlp, spans) = common::receiver();
    let endpoint = format!("http://127.0.0.1:{otlp}");
    let m = serve_with(
        &[],
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
        ],
    );
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    traced_echo(m.port, &spans, "traced-echo", trace);
    // Scrapes and health probes make no spans; other requests (the result and the
    // summary read by `traced_echo`, the registry below) each make a trace of their own.
    for path in ["/metrics", "/healthz", "/readyz", "/metrics"] {
        let (status, body) = http(m.port, "GET", path, None).expect(path);
        assert_eq!(status, 200, "{path}: {body}");
    }
    let (status, body) = http(m.port, "GET", "/v1/registry", None).expect("registry");
    assert_eq!(status, 200, "{body}");
    let others = || {
        spans
            .lock()
            .expect("not poisoned")
            .iter()
            .filter(|s| s.name == "http.request" && s.trace_id != common::hex_bytes(trace))
            .count()
    };
    wait_until(Duration::from_secs(20), "three other request spans", || {
        others() >= 3
    });
    // Give a probe's span, had there been one, time to follow.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        others(),
        3,
        "only the result, summary and registry requests are traced"
    );
}

/// The run's own namespaces on the shared Redis and LocalStack, deleted when dropped
/// (after the server, declared later, is killed), whatever the test's outcome.
#[cfg(all(feature = "redis", feature = "sqs"))]
struct Namespaces {
    redis_url: String,
    key_prefix: String,
    queue_prefix: String,
}

#[cfg(all(feature = "redis", feature = "sqs"))]
impl Namespaces {
    fn new() -> Self {
        Self {
            redis_url: marathon_redis::testkit::url(),
            key_prefix: format!("marathon-test:{}:", uuid::Uuid::new_v4()),
            queue_prefix: marathon_sqs::testkit::prefix(),
        }
    }

    /// The environment that puts a `marathon` process on these namespaces: the Redis
    /// store and the SQS queue on LocalStack.
    fn env(&self) -> Vec<(&'static str, String)> {
        [
            ("MARATHON_STORE__KIND", "redis"),
            ("MARATHON_STORE__URL", &self.redis_url),
            ("MARATHON_STORE__KEY_PREFIX", &self.key_prefix),
            ("MARATHON_QUEUE__KIND", "sqs"),
            ("MARATHON_QUEUE__QUEUE_PREFIX", &self.queue_prefix),
            (
                "MARATHON_QUEUE__ENDPOINT_URL",
                &marathon_sqs::testkit::endpoint(),
            ),
            ("MARATHON_QUEUE__REGION", "us-east-1"),
            ("MARATHON_QUEUE__CREATE_IF_MISSING", "true"),
            ("MARATHON_QUEUE__WAIT_TIME_MS", "1000"),
            ("AWS_ACCESS_KEY_ID", "test"),
            ("AWS_SECRET_ACCESS_KEY", "test"),
            ("AWS_EC2_METADATA_DISABLED", "true"),
        ]
        .into_iter()
        .map(|(k, v)| (k, v.to_string()))
        .collect()
    }
}

/// `vars` as [`serve_with`] takes them.
#[cfg(all(feature = "redis", feature = "sqs"))]
fn borrowed<'a>(vars: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
    vars.iter().map(|(k, v)| (*k, v.as_str())).collect()
}

#[cfg(all(feature = "redis", feature = "sqs"))]
impl Drop for Namespaces {
    fn drop(&mut self) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let client = marathon_sqs::testkit::client().await;
            marathon_sqs::testkit::delete_queues(&client, &self.queue_prefix).await;
            marathon_redis::testkit::delete_prefix(&self.redis_url, &self.key_prefix)
                .await
                .expect("delete the run's keys");
        });
    }
}

/// The binary on the production backends, the Redis store and the SQS queue (on
/// LocalStack), with tracing on: the known set is counted exactly as in memory, store
/// and queue operations carry their backend, queue depth and receive latency come
/// from SQS, and a workflow's trace crosses the SQS hops unbroken (the `traceparent`
/// travels in the messages' attributes).
#[cfg(all(feature = "redis", feature = "sqs", feature = "otel"))]
#[test]
fn on_redis_and_sqs_metrics_count_and_a_trace_crosses_the_queue() {
    let ns = Namespaces::new();
    let (otlp, spans) = common::receiver();
    let otlp = format!("http://127.0.0.1:{otlp}");
    let mut env = ns.env();
    env.extend([
        (
            "MARATHON_WORKER__DEAD_LETTER_INTERVAL_MS",
            "200".to_string(),
        ),
        ("OTEL_EXPORTER_OTLP_ENDPOINT", otlp),
        ("OTEL_BSP_SCHEDULE_DELAY", "100".to_string()),
    ]);
    let m = serve_with(&[], &borrowed(&env));
    run_known_set(m.port, "prod");
    assert_known_set_counted(&scrape_known_set(m.port), "redis");
    let ours = traced_echo(
        m.port,
        &spans,
        "prod-traced",
        "0af7651916cd43dd8448eb211c80319c",
    );
    // Every task of the run went through SQS: each workflow task after the first was
    // sent by the activity attempt that completed before it, and is its child.
    let activity = ours
        .iter()
        .find(|s| s.name == "marathon.activity")
        .expect("the activity's span");
    assert!(
        ours.iter()
            .any(|s| s.name == "marathon.workflow_task" && s.parent == activity.span_id),
        "the workflow task after the activity continues from it: {ours:#?}"
    );

    // The known set plus the traced echo: four `echo` runs.
    let (s, text) = scrape(m.port);
    let started = sample(
        &s,
        "marathon_workflows_started_total",
        &[("workflow", "echo")],
    );
    assert_eq!(started, Some(4.0), "{text}");
    let ok = |op| [("operation", op), ("backend", "sqs"), ("outcome", "ok")];
    let sent = sample(&s, "marathon_queue_operation_seconds_count", &ok("enqueue"));
    // At least one send per `echo` task: its start, its activity, the task after it.
    assert!(sent.is_some_and(|n| n >= 12.0), "enqueues {sent:?}\n{text}");
    for op in ["receive", "ack", "depth"] {
        let n = sample(&s, "marathon_queue_operation_seconds_count", &ok(op));
        assert!(n.is_some_and(|n| n >= 1.0), "{op}: {n:?}\n{text}");
    }
    let creates = [
        ("operation", "create"),
        ("backend", "redis"),
        ("outcome", "ok"),
    ];
    assert_eq!(
        sample(&s, "marathon_store_operation_seconds_count", &creates),
        Some(6.0),
        "{text}"
    );
    let received = sample(
        &s,
        "marathon_queue_received_tasks_total",
        &[("queue", "default")],
    );
    assert!(
        received.is_some_and(|n| n >= 12.0),
        "received {received:?}\n{text}"
    );
    let receives = sample(
        &s,
        "marathon_queue_receive_seconds_count",
        &[("queue", "default")],
    );
    assert!(receives.is_some_and(|n| n >= 1.0), "{receives:?}\n{text}");
    // Sampled from SQS's ApproximateNumberOfMessages every 200 ms; nothing waits now.
    wait_until(Duration::from_secs(10), "the queue depth is 0", || {
        sample(
            &scrape(m.port).0,
            "marathon_queue_depth",
            &[("queue", "default")],
        ) == Some(0.0)
    });
    // No other backend answered anything.
    for (metric, memory) in [
        ("marathon_store_operation_seconds_count", "memory"),
        ("marathon_queue_operation_seconds_count", "memory"),
    ] {
        assert!(
            !s.samples
                .iter()
                .any(|x| x.metric == metric && x.labels.get("backend") == Some(memory)),
            "{metric} with backend={memory}\n{text}"
        );
    }
    drop(m);
}

/// The events of workflow `id` (its whole history, one page), as JSON values.
#[cfg(all(feature = "redis", feature = "sqs"))]
fn events(port: u16, id: &str) -> Vec<Value> {
    let path = format!("/v1/workflows/{id}/events?after=0&limit=1000");
    let (status, text) = http(port, "GET", &path, None).expect("events");
    assert_eq!(status, 200, "{text}");
    let v: Value = serde_json::from_str(&text).expect("JSON");
    v["events"].as_array().expect("events").clone()
}

/// Crash recovery across processes: a replica on Redis and SQS is killed (SIGKILL:
/// no shutdown, no acks, no hand-over) while it runs a workflow's activity and while
/// another workflow's durable timer is pending, and a replica started afterwards
/// finishes both. The activity's SQS message comes back once its visibility lapses
/// (the dead replica no longer extends it) and runs again; the timer fires from the
/// store. Each result is recorded once.
#[cfg(all(feature = "redis", feature = "sqs"))]
#[test]
fn a_killed_replicas_work_is_finished_by_another_on_redis_and_sqs() {
    let ns = Namespaces::new();
    let mut env = ns.env();
    env.extend([
        // The dead replica's in-flight message returns 2 s after its last extension.
        ("MARATHON_WORKER__VISIBILITY_MS", "2000".to_string()),
        ("MARATHON_WORKER__SWEEP_INTERVAL_MS", "200".to_string()),
    ]);
    let env = borrowed(&env);
    let first = serve_with(&[], &env);

    let start = |body: &Value| {
        let (status, text) = http(first.port, "POST", "/v1/workflows", Some(body)).expect("start");
        assert_eq!(status, 202, "{text}");
    };
    // The timer first (8 s), then the activity (4 s), and the kill as soon as the
    // activity runs: seconds to spare for both on a loaded machine.
    start(&json!({"name": "sleep-then-echo", "id": "crash-timer",
        "input": {"ms": 8000, "value": "after the crash"}}));
    wait_until(Duration::from_secs(20), "the timer is recorded", || {
        events(first.port, "crash-timer")
            .iter()
            .any(|e| e["type"] == "timer_started")
    });
    start(
        &json!({"name": "pipeline", "id": "crash-activity", "input": {
            "pipeline": {"steps": [
                {"type": "activity", "name": "nap", "activity": "sleep", "input": 4000},
                {"type": "activity", "name": "say", "activity": "echo", "input": "$steps.nap"},
            ], "output": "$steps.say"},
            "input": null,
        }}),
    );
    wait_until(Duration::from_secs(20), "the sleep activity runs", || {
        let (s, _) = scrape(first.port);
        sample(
            &s,
            "marathon_activities_in_flight",
            &[("activity", "sleep")],
        ) == Some(1.0)
    });
    let mut first = first;
    first.child.kill().expect("SIGKILL");
    first.child.wait().expect("reaped");
    let killed_at = Instant::now();

    let second = serve_with(&[], &env);
    for (id, output) in [
        ("crash-activity", json!({"slept_ms": 4000})),
        ("crash-timer", json!("after the crash")),
    ] {
        let path = format!("/v1/workflows/{id}/result?wait=30s");
        let (status, text) = http(second.port, "GET", &path, None).expect("result");
        assert_eq!(status, 200, "{id}: {text}");
        let v: Value = serde_json::from_str(&text).expect("JSON");
        assert_eq!(
            (&v["status"], &v["output"]),
            (&json!("completed"), &output),
            "{text}"
        );
    }
    // The attempt ran again in full on the second replica, after the crash.
    assert!(killed_at.elapsed() >= Duration::from_secs(4));
    // An attempt is counted once its result is recorded and the next task sent, so the
    // run's result can be read a moment before the count: poll it.
    let counts = || {
        let (s, text) = scrape(second.port);
        let attempts = |activity| {
            sample(
                &s,
                "marathon_activity_attempts_total",
                &[("activity", activity), ("outcome", "completed")],
            )
        };
        ((attempts("sleep"), attempts("echo")), text)
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    let (mut got, mut text) = counts();
    while got != (Some(1.0), Some(2.0)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        (got, text) = counts();
    }
    assert_eq!(got, (Some(1.0), Some(2.0)), "{text}");
    // One result per call in the history: the dead replica's attempt left none.
    for id in ["crash-activity", "crash-timer"] {
        let history = events(second.port, id);
        let count = |t: &str| history.iter().filter(|e| e["type"] == t).count();
        let want = if id == "crash-timer" {
            (1, 1, 1)
        } else {
            (2, 2, 0)
        };
        assert_eq!(
            (
                count("activity_scheduled"),
                count("activity_completed"),
                count("timer_fired")
            ),
            want,
            "{id}: {history:#?}"
        );
        assert_eq!(count("workflow_completed"), 1, "{id}");
    }
    drop(second);
    drop(first);
}
