//! Cluster mode over TLS: a real local three-master Redis Cluster speaking TLS
//! only (clients and cluster bus, private CA) with a password.

mod common;

use common::cluster::LocalCluster;
use marathon_core::{
    EventData, KeyedAppend, KeyedOutcome, ListQuery, NewEvent, NewWorkflow, Seq, Store, Timestamp,
    WorkflowId,
};
use marathon_redis::{RedisStore, RedisStoreConfig};
use serde_json::json;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_mode_over_tls_with_a_private_ca_and_a_password() {
    let cluster = tokio::task::spawn_blocking(|| LocalCluster::start_with(Some("s3cret")))
        .await
        .expect("start the TLS cluster");
    let ca = cluster.dir.join("ca.pem").to_string_lossy().into_owned();
    let config = |ca: Option<String>| RedisStoreConfig {
        cluster_nodes: cluster.urls(),
        key_prefix: "marathon-cluster-tls-test:".into(),
        tls_ca_file: ca,
        connect_timeout: Duration::from_secs(2),
        ..Default::default()
    };
    let shown = format!("{:?}", config(None));
    assert!(!shown.contains("s3cret"), "{shown}");

    let store = RedisStore::connect(config(Some(ca.clone())))
        .await
        .expect("TLS cluster connection with the private CA and the password");
    let t = Timestamp(1_000);
    let mut ids = Vec::new();
    for _ in 0..8 {
        let id = WorkflowId::random();
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
        ids.push(id);
    }
    for id in &ids {
        let outcome = store
            .append_keyed(
                id,
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
        assert_eq!(store.read(id, Seq::ZERO, 10).await.expect("read").len(), 2);
    }
    // Multi-shard reads (per-shard pipelines on every master) over TLS.
    let page = store.list(&ListQuery::default()).await.expect("list");
    assert_eq!(page.items.len(), ids.len());

    // The append readers (their own cluster client) connect over TLS too: a
    // subscription is woken by the next append.
    let mut sub = store.subscribe(&ids[0], Seq(2)).await.expect("subscribe");
    store
        .append_keyed(
            &ids[0],
            KeyedAppend {
                key: Some("s:2".into()),
                events: vec![NewEvent::new(
                    t,
                    EventData::SignalReceived {
                        name: "go".into(),
                        payload: json!(2),
                    },
                )],
                ..Default::default()
            },
        )
        .await
        .expect("append over TLS");
    let next = tokio::time::timeout(Duration::from_secs(5), futures::StreamExt::next(&mut sub))
        .await
        .expect("woken within 5 s");
    assert_eq!(next.map(|e| e.map(|e| e.seq).ok()), Some(Some(Seq(3))));
    drop(sub);

    let untrusted = RedisStore::connect(config(None)).await;
    assert!(
        untrusted.is_err(),
        "a certificate from an unknown CA must be refused"
    );
    drop(store);
    tokio::task::spawn_blocking(move || drop(cluster))
        .await
        .expect("stop the TLS cluster");
}
