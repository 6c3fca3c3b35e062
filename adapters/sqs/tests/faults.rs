//! SqsQueue faults against LocalStack: a stopping worker's long poll, an endpoint that never answers, characters SQS refuses, per-entry send retries. Needs `scripts/localstack.sh start` (except the tests on `fake_sqs`).

mod common;

use std::time::{Duration, Instant};

use marathon_core::{Engine, OutgoingMessage, Queue, Task, Worker, WorkerConfig, WorkflowId};
use std::sync::Arc;

const Q: &str = "default";

/// A worker's shutdown drops its in-flight long poll; SQS (LocalStack here) keeps the
/// poll open server-side, so a message sent within the rest of `poll_wait` is handed
/// to the dead poll and stays invisible for the whole visibility timeout (30 s by
/// default) instead of going at once to a replica that is still running.
#[tokio::test]
async fn a_message_sent_right_after_a_worker_shuts_down_is_not_stranded() {
    let q = Arc::new(common::fresh(5, false).await);
    // Create the queue before the worker polls it.
    q.enqueue(Q, vec![]).await.expect("enqueue");
    q.depth(Q).await.expect("depth");
    let engine = Engine::builder().queue(q.clone()).build();
    let worker = Worker::start(
        engine,
        WorkerConfig {
            poll_wait: Duration::from_secs(10),
            sweeper: false,
            ..WorkerConfig::default()
        },
    );
    // Let the worker's long poll reach SQS, then shut it down (as on SIGTERM).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let report = worker.shutdown().await;
    assert_eq!(report.handed_back, 0);
    // Another replica sends work a moment later.
    let task = Task::workflow(WorkflowId::random());
    q.enqueue(Q, vec![OutgoingMessage::now(task.clone())])
        .await
        .expect("enqueue");
    // A live replica polls for it.
    let start = Instant::now();
    let mut got = Vec::new();
    while got.is_empty() && start.elapsed() < Duration::from_secs(15) {
        got = q
            .receive(Q, 10, Duration::from_secs(2), Duration::from_secs(30))
            .await
            .expect("receive");
    }
    let waited = start.elapsed();
    common::teardown(&q).await;
    assert_eq!(
        got.len(),
        1,
        "the message was not delivered within {waited:?}"
    );
    // Well below the 30 s visibility timeout a stranded message waits out.
    assert!(
        waited < Duration::from_secs(10),
        "delivered only after {waited:?}"
    );
}

/// An SQS endpoint that accepts connections and never answers (a black-holed
/// network path, a half-open pooled connection after a NAT or load balancer
/// dropped its state): every call must fail within a bounded time, so the
/// worker's receive loop backs off and recovers, and an engine's enqueue (awaited
/// inside a workflow task) does not hold a worker slot forever. The client is built
/// with no operation or read timeout, so a call waits forever.
#[tokio::test]
async fn a_call_to_an_endpoint_that_never_answers_fails_in_bounded_time() {
    use marathon_sqs::{SqsQueue, SqsQueueConfig};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    // Accept and hold every connection, never answering.
    let holder = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = listener.accept().await {
            held.push(s);
        }
    });
    let cfg = SqsQueueConfig {
        endpoint_url: Some(format!("http://127.0.0.1:{port}")),
        region: Some("us-east-1".into()),
        queue_urls: [(
            Q.to_owned(),
            format!("http://127.0.0.1:{port}/000000000000/q"),
        )]
        .into(),
        ..SqsQueueConfig::default()
    };
    let q = SqsQueue::connect_with(cfg, common::loader())
        .await
        .expect("config");
    // A receive asked to wait 1 s, and a send; allow a minute for the SDK's own
    // retries. Both at once, to keep the test's time to one operation timeout.
    let (r, e) = tokio::join!(
        tokio::time::timeout(
            Duration::from_secs(60),
            q.receive(Q, 10, Duration::from_secs(1), Duration::from_secs(30)),
        ),
        tokio::time::timeout(
            Duration::from_secs(60),
            q.enqueue(
                Q,
                vec![OutgoingMessage::now(Task::workflow(WorkflowId::random()))],
            ),
        )
    );
    holder.abort();
    assert!(r.is_ok(), "receive (1 s wait) still hanging after 60 s");
    assert!(e.is_ok(), "enqueue still hanging after 60 s");
}

/// SQS accepts only #x9 | #xA | #xD | #x20-#xD7FF | #xE000-#xFFFD | #x10000-#x10FFFF
/// in a body; serde_json leaves U+FFFE / U+FFFF (and other noncharacters) unescaped,
/// so a task whose data holds one (an activity input or result, a signal payload) is
/// refused on every send. The adapter should escape such characters (`\uFFFF`)
/// so that any JSON value travels.
#[tokio::test]
async fn a_task_whose_data_holds_u_ffff_can_be_sent() {
    use marathon_core::model::{ActivityCall, ActivityOptions, ActivityTask, Seq, Timestamp};
    let q = common::fresh(5, false).await;
    let task = Task::Activity(ActivityTask {
        workflow_id: WorkflowId::random(),
        activity_id: 1,
        attempt: 1,
        scheduled_seq: Seq(2),
        workflow_task_queue: Q.to_owned(),
        call: Some(ActivityCall {
            name: "llm".into(),
            input: serde_json::json!({"prompt": "odd \u{FFFF} char"}),
            options: ActivityOptions::default(),
            scheduled_at: Timestamp(0),
        }),
        run: None,
        deadline: None,
        copy: 0,
    });
    let r = q.enqueue(Q, vec![OutgoingMessage::now(task.clone())]).await;
    let got = if r.is_ok() {
        q.receive(Q, 1, Duration::from_secs(2), Duration::from_secs(30))
            .await
            .expect("receive")
    } else {
        Vec::new()
    };
    common::teardown(&q).await;
    r.expect("enqueue of a task with U+FFFF in its input");
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].task, task);
}

/// Fails the first entry of the next `budget` SendMessageBatch calls on SQS's side:
/// the entry is taken out of the request (SQS never sees it) and the response
/// reports it failed with `SenderFault` false, as SQS does for an internal error.
#[derive(Debug)]
struct FailFirstEntry {
    budget: std::sync::atomic::AtomicUsize,
    pending: std::sync::Mutex<Vec<String>>,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Replaces a request's JSON body (and its length) through `edit`.
fn edit_json(
    headers: &mut aws_sdk_sqs::config::http::HttpRequest,
    edit: impl FnOnce(&mut serde_json::Value) -> Result<(), BoxError>,
) -> Result<(), BoxError> {
    let mut v: serde_json::Value =
        serde_json::from_slice(headers.body().bytes().ok_or("a streaming body")?)?;
    edit(&mut v)?;
    let bytes = serde_json::to_vec(&v)?;
    headers
        .headers_mut()
        .insert("content-length", bytes.len().to_string());
    *headers.body_mut() = bytes.into();
    Ok(())
}

impl aws_sdk_sqs::config::Intercept for FailFirstEntry {
    fn name(&self) -> &'static str {
        "FailFirstEntry"
    }

    fn modify_before_transmit(
        &self,
        ctx: &mut aws_sdk_sqs::config::interceptors::BeforeTransmitInterceptorContextMut<'_>,
        _: &aws_sdk_sqs::config::RuntimeComponents,
        _: &mut aws_sdk_sqs::config::ConfigBag,
    ) -> Result<(), BoxError> {
        use std::sync::atomic::Ordering;
        let req = ctx.request_mut();
        if req.headers().get("x-amz-target") != Some("AmazonSQS.SendMessageBatch")
            || self
                .budget
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |b| b.checked_sub(1))
                .is_err()
        {
            return Ok(());
        }
        edit_json(req, |body| {
            let entries = body["Entries"].as_array_mut().ok_or("no entries")?;
            let first = entries.remove(0);
            let id = first["Id"].as_str().ok_or("no id")?.to_owned();
            self.pending.lock().expect("lock").push(id);
            Ok(())
        })
    }

    fn modify_before_attempt_completion(
        &self,
        ctx: &mut aws_sdk_sqs::config::interceptors::FinalizerInterceptorContextMut<'_>,
        _: &aws_sdk_sqs::config::RuntimeComponents,
        _: &mut aws_sdk_sqs::config::ConfigBag,
    ) -> Result<(), BoxError> {
        let Some(Ok(out)) = ctx.output_or_error_mut() else {
            return Ok(());
        };
        let Some(out) = out
            .downcast_mut::<aws_sdk_sqs::operation::send_message_batch::SendMessageBatchOutput>()
        else {
            return Ok(());
        };
        if let Some(id) = self.pending.lock().expect("lock").pop() {
            out.failed.push(
                aws_sdk_sqs::types::BatchResultErrorEntry::builder()
                    .id(id)
                    .sender_fault(false)
                    .code("InternalError")
                    .message("injected")
                    .build()?,
            );
        }
        Ok(())
    }
}

/// SQS fails one message of a batch on its side (an internal error, `SenderFault`
/// false): it sent none of that message, so the adapter sends it again instead of
/// failing the enqueue (which left an activity task to the sweeper, minutes
/// later). Every message arrives exactly once.
#[tokio::test]
async fn a_message_sqs_failed_on_its_side_is_sent_again() {
    let cfg = common::config(5, false);
    let sdk = common::loader()
        .endpoint_url(common::endpoint())
        .load()
        .await;
    let failing = FailFirstEntry {
        budget: 1.into(),
        pending: std::sync::Mutex::new(Vec::new()),
    };
    let conf = aws_sdk_sqs::config::Builder::from(&sdk)
        .interceptor(failing)
        .build();
    let q = marathon_sqs::SqsQueue::from_client(cfg, aws_sdk_sqs::Client::from_conf(conf))
        .expect("config");
    let tasks: Vec<Task> = (0..3)
        .map(|_| Task::workflow(WorkflowId::random()))
        .collect();
    let sent = q
        .enqueue(Q, tasks.iter().cloned().map(OutgoingMessage::now).collect())
        .await;
    let mut got = Vec::new();
    let start = Instant::now();
    // All three, then one more poll for a copy.
    let mut extra_polls = 1;
    while start.elapsed() < Duration::from_secs(30) {
        if got.len() >= tasks.len() {
            if extra_polls == 0 {
                break;
            }
            extra_polls -= 1;
        }
        for d in q
            .receive(Q, 10, Duration::from_secs(1), Duration::from_secs(30))
            .await
            .expect("receive")
        {
            got.push(d.task);
        }
    }
    common::teardown(&q).await;
    sent.expect("the enqueue succeeds after sending the failed message again");
    let ids = |ts: &[Task]| {
        let mut v: Vec<String> = ts.iter().map(|t| t.workflow_id().to_string()).collect();
        v.sort();
        v
    };
    assert_eq!(ids(&got), ids(&tasks), "each message exactly once");
}

/// A fake SQS endpoint (no LocalStack): each SendMessageBatch is answered by the
/// next of `replies` (HTTP status and JSON body), and counted in `calls`.
async fn fake_sqs(replies: Vec<(u16, String)>) -> (String, Arc<std::sync::atomic::AtomicUsize>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = calls.clone();
    let replies = Arc::new(replies);
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let (calls, replies) = (counted.clone(), replies.clone());
            tokio::spawn(async move {
                let mut buf = Vec::new();
                loop {
                    // One request: its head, then Content-Length bytes of body.
                    let head_end = loop {
                        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            break p + 4;
                        }
                        let mut chunk = [0u8; 4096];
                        match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    };
                    let head = String::from_utf8_lossy(&buf[..head_end]).to_lowercase();
                    let len: usize = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .and_then(|v| v.trim().parse().ok())
                        .unwrap_or(0);
                    while buf.len() < head_end + len {
                        let mut chunk = [0u8; 4096];
                        match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    buf.drain(..head_end + len);
                    let i = calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    let (status, body) = replies
                        .get(i)
                        .cloned()
                        .unwrap_or((500, r#"{"__type":"InternalError"}"#.to_owned()));
                    let reply = format!(
                        "HTTP/1.1 {status} X\r\ncontent-type: application/x-amz-json-1.0\r\n\
                         content-length: {}\r\n\r\n{body}",
                        body.len()
                    );
                    if s.write_all(reply.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (url, calls)
}

/// SQS fails an entry on its side twice, then the third SendMessageBatch (the last
/// retry) fails as a whole: the enqueue fails. It reported success, although
/// that message was never sent (lost: a workflow task or an activity's never ran).
#[tokio::test]
async fn a_message_whose_last_retry_failed_as_a_whole_fails_the_enqueue() {
    let entry_failed = r#"{"Successful":[],"Failed":[{"Id":"0","SenderFault":false,"Code":"InternalError","Message":"injected"}]}"#;
    let (url, calls) = fake_sqs(vec![
        (200, entry_failed.to_owned()),
        (200, entry_failed.to_owned()),
        (
            400,
            r#"{"__type":"com.amazonaws.sqs#InvalidParameterValue","message":"injected"}"#
                .to_owned(),
        ),
    ])
    .await;
    let cfg = marathon_sqs::SqsQueueConfig {
        queue_urls: [(Q.to_owned(), format!("{url}/000000000000/q"))].into(),
        region: Some("us-east-1".into()),
        ..marathon_sqs::SqsQueueConfig::default()
    };
    let sdk = common::loader().endpoint_url(&url).load().await;
    let q =
        marathon_sqs::SqsQueue::from_client(cfg, aws_sdk_sqs::Client::new(&sdk)).expect("config");
    let sent = q
        .enqueue(
            Q,
            vec![OutgoingMessage::now(Task::workflow(WorkflowId::random()))],
        )
        .await;
    assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 3);
    assert!(sent.is_err(), "the message was never sent: {sent:?}");
}
