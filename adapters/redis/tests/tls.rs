//! `rediss://` with a private certificate authority and a password, against a
//! private TLS `redis-server` this test starts (certificates made with `openssl`).

mod common;

use marathon_core::{
    EventData, KeyedAppend, KeyedOutcome, NewEvent, NewWorkflow, Seq, Store, StoreError, Timestamp,
    WorkflowId,
};
use marathon_redis::{RedisStore, RedisStoreConfig};
use serde_json::json;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rediss_with_a_private_ca_and_a_password() {
    let dir = std::env::temp_dir().join(format!("marathon-tls-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    common::certificates(&dir);
    let port = common::free_port();
    let mut server = tokio::process::Command::new("redis-server")
        .args([
            "--port",
            "0",
            "--tls-port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--tls-cert-file",
            "server.pem",
            "--tls-key-file",
            "server.key",
            "--tls-ca-cert-file",
            "ca.pem",
            "--tls-auth-clients",
            "no",
            "--requirepass",
            "s3cret",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .current_dir(&dir)
        .stdout(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("redis-server on the PATH (apt-get install -y redis-server)");
    // Generous: a loaded machine can take seconds to start it.
    let t0 = std::time::Instant::now();
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        if let Ok(Some(status)) = server.try_wait() {
            panic!("redis-server on port {port} exited at start: {status}");
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "redis-server on port {port} did not answer within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let ca = dir.join("ca.pem").to_string_lossy().into_owned();
    let config = |url: String, ca: Option<String>| RedisStoreConfig {
        url,
        key_prefix: "marathon-tls-test:".into(),
        tls_ca_file: ca,
        connect_timeout: Duration::from_secs(2),
        ..Default::default()
    };

    let store = RedisStore::connect(config(
        format!("rediss://:s3cret@127.0.0.1:{port}"),
        Some(ca.clone()),
    ))
    .await
    .expect("TLS connection with the private CA and the password");
    let id = WorkflowId::random();
    let t = Timestamp(1_000);
    store
        .create(NewWorkflow {
            id: id.clone(),
            name: "tls".into(),
            input: json!({"over": "tls"}),
            task_queue: "default".into(),
            idempotency_key: None,
            started_at: t,
            task_deadline: t.plus(Duration::from_secs(30)),
            trace_context: None,
        })
        .await
        .expect("create over TLS");
    let outcome = store
        .append_keyed(
            &id,
            KeyedAppend {
                key: Some("s:1".into()),
                events: vec![NewEvent::new(
                    t,
                    EventData::SignalReceived {
                        name: "go".into(),
                        payload: json!(1),
                    },
                )],
                ..Default::default()
            },
        )
        .await
        .expect("append over TLS");
    assert_eq!(outcome, KeyedOutcome::Appended(Seq(2)));
    assert_eq!(store.read(&id, Seq::ZERO, 10).await.expect("read").len(), 2);

    // A wrong password, no trusted CA, or plain TCP to the TLS port: clear errors, no panic.
    let wrong = RedisStore::connect(config(
        format!("rediss://:nope@127.0.0.1:{port}"),
        Some(ca.clone()),
    ))
    .await;
    assert!(
        matches!(wrong, Err(StoreError::Backend(_))),
        "wrong password: {:?}",
        wrong.err()
    );
    let untrusted =
        RedisStore::connect(config(format!("rediss://:s3cret@127.0.0.1:{port}"), None)).await;
    assert!(
        untrusted.is_err(),
        "a certificate from an unknown CA must be refused"
    );
    let plain =
        RedisStore::connect(config(format!("redis://:s3cret@127.0.0.1:{port}"), None)).await;
    assert!(plain.is_err(), "plain TCP to a TLS port must fail");
    let missing = RedisStore::connect(config(
        format!("rediss://:s3cret@127.0.0.1:{port}"),
        Some("/nonexistent/ca.pem".into()),
    ))
    .await;
    assert!(
        matches!(missing, Err(StoreError::Backend(_))),
        "missing CA file"
    );

    server.kill().await.expect("stop redis-server");
    let _ = std::fs::remove_dir_all(&dir);
}
