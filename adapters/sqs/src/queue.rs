//! [`SqsQueue`]: the core's [`Queue`] on AWS SQS.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use aws_config::{BehaviorVersion, ConfigLoader, Region};
use aws_sdk_sqs::Client;
use aws_sdk_sqs::types::{
    ChangeMessageVisibilityBatchRequestEntry, DeleteMessageBatchRequestEntry, Message,
    MessageSystemAttributeName, QueueAttributeName, SendMessageBatchRequestEntry,
};
use futures::{StreamExt, TryStreamExt};
use marathon_core::{Delivery, OutgoingMessage, Queue, QueueError, Receipt, Task};
use parking_lot::{Mutex, RwLock};
use tokio::time::Instant;

use crate::batch::{Batcher, Failure, FlushFn};
use crate::config::{MAX_WAIT, SqsConfigError, SqsQueueConfig};
use crate::error::{SqsError, classify, classify_entry, is_missing_queue};
use crate::message::{
    self, Encoded, MAX_NATIVE_DELAY, MAX_VISIBILITY, decode, due_in, encode, secs_i32,
};

/// Most entries SQS takes in one batch request, and most messages one receive returns.
const MAX_BATCH: usize = crate::batch::MAX_BATCH;
/// Longest `MessageGroupId` SQS accepts.
const MAX_GROUP_ID: usize = 128;
/// Batch requests one `enqueue` or `ack` keeps in flight at once.
const BATCH_CONCURRENCY: usize = 8;
/// How long messages read off a dead-letter queue stay hidden before they are deleted.
const DRAIN_VISIBILITY: i32 = 30;
/// Retention of the dead-letter queues this crate creates: 14 days, SQS's maximum.
const DLQ_RETENTION_SECS: &str = "1209600";
/// How soon an undecodable message is received again, so that SQS's redrive
/// moves it to the dead-letter queue after `max_receives` receives.
const POISON_RETRY_SECS: i32 = 1;
/// Most bytes of an undecodable body quoted in a log line.
const POISON_PREVIEW: usize = 256;

/// Marathon's [`Queue`] on AWS SQS (standard or FIFO queues), safe to share.
///
/// Logical queue `name` is SQS queue `<queue_prefix><name>` (plus `.fifo`), or
/// the URL given for it in `queue_urls`; URLs are looked up once and cached.
pub struct SqsQueue {
    client: Client,
    cfg: SqsQueueConfig,
    /// Longest delay sent as `DelaySeconds`; longer ones carry a due time.
    max_native_delay: Duration,
    urls: RwLock<HashMap<String, String>>,
    /// Serializes the lookup of each logical queue's URL.
    resolving: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    dlq_urls: RwLock<HashMap<String, String>>,
    /// Visibility deadlines of this process's deliveries, by receipt handle.
    leases: Leases,
    /// Coalesces concurrent enqueues into SendMessageBatch, by queue URL.
    senders: Mutex<HashMap<String, Batcher<SendMessageBatchRequestEntry>>>,
    /// Coalesces concurrent acks into DeleteMessageBatch, by queue URL.
    deleters: Mutex<HashMap<String, Batcher<String>>>,
}

impl std::fmt::Debug for SqsQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqsQueue")
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

impl SqsQueue {
    /// Builds a client from the SDK's default chain (`aws_config::defaults`)
    /// with `cfg`'s region and endpoint overrides. Sends no request.
    ///
    /// # Errors
    /// [`QueueError::Backend`] holding an [`SqsConfigError`] naming the setting
    /// when [`SqsQueueConfig::check`] refuses `cfg`.
    pub async fn connect(cfg: SqsQueueConfig) -> Result<Self, QueueError> {
        Self::connect_with(cfg, aws_config::defaults(BehaviorVersion::latest())).await
    }

    /// Like [`SqsQueue::connect`] from a prepared loader (e.g. with static
    /// credentials for LocalStack); `cfg`'s region and endpoint still override it.
    ///
    /// # Errors
    /// [`QueueError::Backend`] holding an [`SqsConfigError`] naming the setting
    /// when [`SqsQueueConfig::check`] refuses `cfg`.
    pub async fn connect_with(
        cfg: SqsQueueConfig,
        mut loader: ConfigLoader,
    ) -> Result<Self, QueueError> {
        // Before the SDK sees the region and endpoint.
        check(&cfg)?;
        if let Some(region) = &cfg.region {
            loader = loader.region(Region::new(region.clone()));
        }
        if let Some(endpoint) = &cfg.endpoint_url {
            loader = loader.endpoint_url(endpoint);
        }
        let sdk = loader.load().await;
        Self::from_client(cfg, Client::new(&sdk))
    }

    /// Wraps an existing SDK client; `cfg`'s region and endpoint are not applied.
    ///
    /// # Errors
    /// [`QueueError::Backend`] holding an [`SqsConfigError`] naming the setting
    /// when [`SqsQueueConfig::check`] refuses `cfg`.
    pub fn from_client(cfg: SqsQueueConfig, client: Client) -> Result<Self, QueueError> {
        check(&cfg)?;
        // The SDK sets no read or operation timeout: a request on a connection that
        // never answers (black-holed path, half-open pooled connection) waits forever,
        // hanging a receive loop, an enqueue inside a task, or a shutdown's nacks.
        // Bound every attempt (longer than the longest long poll) and every operation,
        // unless the caller's client already has its own.
        let client = match client.config().timeout_config() {
            Some(t)
                if t.operation_timeout().is_some() || t.operation_attempt_timeout().is_some() =>
            {
                client
            }
            current => {
                let mut t = current
                    .cloned()
                    .unwrap_or_else(|| {
                        aws_sdk_sqs::config::timeout::TimeoutConfig::builder().build()
                    })
                    .to_builder();
                t = t
                    .operation_attempt_timeout(MAX_WAIT + Duration::from_secs(5))
                    .operation_timeout(Duration::from_secs(40));
                Client::from_conf(
                    client
                        .config()
                        .to_builder()
                        .timeout_config(t.build())
                        .build(),
                )
            }
        };
        let max_native_delay = if cfg.fifo {
            // FIFO queues refuse per-message DelaySeconds.
            Duration::ZERO
        } else {
            MAX_NATIVE_DELAY
        };
        Ok(Self {
            client,
            cfg,
            max_native_delay,
            urls: RwLock::default(),
            resolving: Mutex::default(),
            dlq_urls: RwLock::default(),
            leases: Leases::default(),
            senders: Mutex::default(),
            deleters: Mutex::default(),
        })
    }

    /// The underlying SDK client, for administration and tests.
    #[must_use]
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// The configuration in force, as given (and checked).
    #[must_use]
    pub fn config(&self) -> &SqsQueueConfig {
        &self.cfg
    }

    /// Lowers the longest native delay (tests of the long-delay path).
    #[cfg(test)]
    pub(crate) fn set_max_native_delay(&mut self, d: Duration) {
        if !self.cfg.fifo {
            self.max_native_delay = d;
        }
    }

    fn fifo_suffix(&self) -> &'static str {
        if self.cfg.fifo { ".fifo" } else { "" }
    }

    /// SQS name of logical queue `name`.
    #[must_use]
    pub fn sqs_name(&self, name: &str) -> String {
        format!("{}{name}{}", self.cfg.queue_prefix, self.fifo_suffix())
    }

    /// SQS name of the dead-letter queue of logical queue `name`.
    fn dlq_name(&self, name: &str) -> String {
        format!("{}{name}-dlq{}", self.cfg.queue_prefix, self.fifo_suffix())
    }

    /// The URL of logical queue `name`, creating the queue if configured to.
    async fn url(&self, name: &str) -> Result<String, QueueError> {
        if let Some(url) = self.cfg.queue_urls.get(name) {
            return Ok(url.clone());
        }
        if let Some(url) = self.urls.read().get(name) {
            return Ok(url.clone());
        }
        // One lookup (or creation) per name at a time: the first use is often
        // many concurrent calls, which would each look up and create the queue.
        let lock = self
            .resolving
            .lock()
            .entry(name.to_owned())
            .or_default()
            .clone();
        let _resolving = lock.lock().await;
        if let Some(url) = self.urls.read().get(name) {
            return Ok(url.clone());
        }
        let sqs_name = self.sqs_name(name);
        let url = match self
            .client
            .get_queue_url()
            .queue_name(&sqs_name)
            .send()
            .await
        {
            Ok(out) => out
                .queue_url
                .ok_or_else(|| no_url("get_queue_url", &sqs_name))?,
            Err(e)
                if self.cfg.create_if_missing
                    && e.as_service_error()
                        .is_some_and(|s| s.is_queue_does_not_exist()) =>
            {
                self.create(name).await?
            }
            Err(e) => return Err(classify("get_queue_url", false, e)),
        };
        self.urls.write().insert(name.to_owned(), url.clone());
        Ok(url)
    }

    /// Looks up (with `create_if_missing`, creates) logical queue `name`, as its first
    /// use would: `Ok(false)` when it does not exist. A queue given by `queue_urls`
    /// is asked for an attribute instead (its first use takes the URL as it is, so a
    /// URL naming no queue would only fail each call).
    ///
    /// # Errors
    /// A [`QueueError`] when SQS cannot be asked or refuses otherwise.
    pub async fn resolve(&self, name: &str) -> Result<bool, QueueError> {
        let found = match self.cfg.queue_urls.get(name) {
            Some(url) => self
                .client
                .get_queue_attributes()
                .queue_url(url)
                .attribute_names(QueueAttributeName::QueueArn)
                .send()
                .await
                .map(|_| ())
                .map_err(|e| classify("get_queue_attributes", false, e)),
            None => self.url(name).await.map(|_| ()),
        };
        match found {
            Ok(()) => Ok(true),
            Err(e) if is_missing_queue(&e) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Forgets the cached URLs of `name` after SQS said its queue does not exist
    /// (deleted, or lost with a broker restart such as LocalStack's). Returns
    /// whether the caller may call [`Self::url`] again to recreate it: only with
    /// `create_if_missing` and no explicit URL for it.
    fn recover(&self, name: &str) -> bool {
        self.urls.write().remove(name);
        self.dlq_urls.write().remove(name);
        let recreate = self.cfg.create_if_missing && !self.cfg.queue_urls.contains_key(name);
        tracing::warn!(
            queue = %self.sqs_name(name),
            recreate,
            "SQS queue does not exist (deleted or lost with a broker restart)"
        );
        recreate
    }

    /// Runs `op` on the URL of `name`; if the queue turns out missing, recreates
    /// it (when allowed, see [`Self::recover`]) and runs `op` once more.
    async fn on_queue<T, F, Fut>(&self, name: &str, op: F) -> Result<T, QueueError>
    where
        F: Fn(String) -> Fut,
        Fut: Future<Output = Result<T, QueueError>>,
    {
        let url = self.url(name).await?;
        match op(url).await {
            Err(e) if is_missing_queue(&e) && self.recover(name) => op(self.url(name).await?).await,
            r => r,
        }
    }

    /// Hands each entry to the send batcher of `url`; one outcome per entry.
    async fn send_coalesced(
        &self,
        url: &str,
        entries: &[(usize, SendMessageBatchRequestEntry)],
    ) -> Vec<Result<(), Failure>> {
        let waits: Vec<_> = {
            let mut senders = self.senders.lock();
            let start = || {
                // One request at a time on FIFO queues keeps a group's messages in order.
                let in_flight = if self.cfg.fifo { 1 } else { BATCH_CONCURRENCY };
                Batcher::start(
                    send_flush(self.client.clone(), url.to_owned()),
                    self.cfg.batch_window,
                    in_flight,
                    self.max_message_bytes(),
                )
            };
            let b = senders.entry(url.to_owned()).or_insert_with(start);
            // Started on a runtime that has since shut down (a queue shared across runtimes).
            if b.is_closed() {
                *b = start();
            }
            entries
                .iter()
                .map(|(size, e)| b.submit(e.clone(), *size))
                .collect()
        };
        futures::future::join_all(waits).await
    }

    /// Hands each receipt to the delete batcher of `url`; one outcome per receipt.
    async fn delete_coalesced(&self, url: &str, receipts: Vec<String>) -> Vec<Result<(), Failure>> {
        let waits: Vec<_> = {
            let mut deleters = self.deleters.lock();
            let start = || {
                Batcher::start(
                    delete_flush(self.client.clone(), url.to_owned()),
                    self.cfg.batch_window,
                    BATCH_CONCURRENCY,
                    usize::MAX,
                )
            };
            let b = deleters.entry(url.to_owned()).or_insert_with(start);
            if b.is_closed() {
                *b = start();
            }
            receipts.into_iter().map(|r| b.submit(r, 0)).collect()
        };
        futures::future::join_all(waits).await
    }

    /// Makes undecodable messages visible again soon, so that SQS's redrive
    /// moves them to the dead-letter queue after `max_receives` receives
    /// (instead of each hiding for a whole visibility timeout). They are never
    /// deleted here: a body Marathon cannot read may still matter to someone.
    async fn poisoned(&self, queue: &str, url: &str, poison: Vec<(Message, serde_json::Error)>) {
        let mut entries = Vec::with_capacity(poison.len());
        for (i, (m, e)) in poison.into_iter().enumerate() {
            tracing::warn!(
                queue,
                message_id = ?m.message_id,
                receive_count = receive_count(&m, self.cfg.fifo),
                max_receives = self.cfg.max_receives,
                error = %e,
                body = %preview(m.body().unwrap_or_default()),
                "undecodable message (not a Marathon task); it goes to the dead-letter queue after max_receives receives"
            );
            if let Ok(entry) = ChangeMessageVisibilityBatchRequestEntry::builder()
                .id(i.to_string())
                .set_receipt_handle(m.receipt_handle)
                .visibility_timeout(POISON_RETRY_SECS)
                .build()
            {
                entries.push(entry);
            }
        }
        if entries.is_empty() {
            return;
        }
        if let Err(e) = self
            .client
            .change_message_visibility_batch()
            .queue_url(url)
            .set_entries(Some(entries))
            .send()
            .await
        {
            tracing::warn!(queue, error = %classify("change_message_visibility_batch", true, e), "could not shorten an undecodable message's visibility");
        }
    }

    /// Creates the dead-letter queue, then the queue redriving to it. Both calls
    /// are idempotent, so replicas racing to create are fine.
    async fn create(&self, name: &str) -> Result<String, QueueError> {
        let mut dlq_attrs = HashMap::from([(
            QueueAttributeName::MessageRetentionPeriod,
            DLQ_RETENTION_SECS.to_owned(),
        )]);
        let mut attrs = HashMap::new();
        if self.cfg.fifo {
            dlq_attrs.insert(QueueAttributeName::FifoQueue, "true".to_owned());
            attrs.insert(QueueAttributeName::FifoQueue, "true".to_owned());
        }
        let dlq_name = self.dlq_name(name);
        let dlq_url = self
            .client
            .create_queue()
            .queue_name(&dlq_name)
            .set_attributes(Some(dlq_attrs))
            .send()
            .await
            .map_err(|e| classify("create_queue", false, e))?
            .queue_url
            .ok_or_else(|| no_url("create_queue", &dlq_name))?;
        let dlq_arn = self
            .client
            .get_queue_attributes()
            .queue_url(&dlq_url)
            .attribute_names(QueueAttributeName::QueueArn)
            .send()
            .await
            .map_err(|e| classify("get_queue_attributes", false, e))?
            .attributes
            .and_then(|mut a| a.remove(&QueueAttributeName::QueueArn))
            .ok_or_else(|| {
                backend(
                    "get_queue_attributes",
                    format!("no QueueArn for {dlq_name}"),
                )
            })?;
        let redrive = serde_json::json!({
            "deadLetterTargetArn": dlq_arn,
            "maxReceiveCount": self.cfg.max_receives,
        });
        attrs.insert(QueueAttributeName::RedrivePolicy, redrive.to_string());
        let sqs_name = self.sqs_name(name);
        let url = self
            .client
            .create_queue()
            .queue_name(&sqs_name)
            .set_attributes(Some(attrs))
            .send()
            .await
            .map_err(|e| classify("create_queue", false, e))?
            .queue_url
            .ok_or_else(|| no_url("create_queue", &sqs_name))?;
        tracing::info!(queue = %sqs_name, dlq = %dlq_name, "created SQS queues");
        self.dlq_urls.write().insert(name.to_owned(), dlq_url);
        Ok(url)
    }

    /// The URL of the dead-letter queue of `name`, read from its `RedrivePolicy`
    /// (so explicit `queue_urls` work too).
    async fn dlq_url(&self, name: &str) -> Result<String, QueueError> {
        if let Some(url) = self.dlq_urls.read().get(name) {
            return Ok(url.clone());
        }
        let url = self.url(name).await?;
        let policy = self
            .client
            .get_queue_attributes()
            .queue_url(&url)
            .attribute_names(QueueAttributeName::RedrivePolicy)
            .send()
            .await
            .map_err(|e| classify("get_queue_attributes", false, e))?
            .attributes
            .and_then(|mut a| a.remove(&QueueAttributeName::RedrivePolicy))
            .ok_or_else(|| {
                backend(
                    "drain_dead_letters",
                    format!("queue {name} has no RedrivePolicy"),
                )
            })?;
        let policy: serde_json::Value = serde_json::from_str(&policy)
            .map_err(|e| backend("drain_dead_letters", format!("bad RedrivePolicy: {e}")))?;
        let arn = policy
            .get("deadLetterTargetArn")
            .and_then(serde_json::Value::as_str)
            .ok_or_else(|| {
                backend(
                    "drain_dead_letters",
                    "RedrivePolicy without deadLetterTargetArn",
                )
            })?;
        // arn:aws:sqs:<region>:<account>:<name>
        let mut parts = arn.rsplitn(3, ':');
        let (Some(dlq_name), Some(account)) = (parts.next(), parts.next()) else {
            return Err(backend(
                "drain_dead_letters",
                format!("bad dead-letter ARN {arn}"),
            ));
        };
        let dlq_url = self
            .client
            .get_queue_url()
            .queue_name(dlq_name)
            .queue_owner_aws_account_id(account)
            .send()
            .await
            .map_err(|e| classify("get_queue_url", false, e))?
            .queue_url
            .ok_or_else(|| no_url("get_queue_url", dlq_name))?;
        self.dlq_urls
            .write()
            .insert(name.to_owned(), dlq_url.clone());
        Ok(dlq_url)
    }

    fn send_entry(
        &self,
        id: usize,
        e: Encoded,
        task: &Task,
    ) -> Result<SendMessageBatchRequestEntry, QueueError> {
        let mut b = SendMessageBatchRequestEntry::builder()
            .id(id.to_string())
            .message_body(e.body)
            .set_message_attributes((!e.attributes.is_empty()).then_some(e.attributes));
        if e.delay_seconds > 0 {
            b = b.delay_seconds(e.delay_seconds);
        }
        if self.cfg.fifo {
            let wf = task.workflow_id().as_str();
            b = b
                .message_group_id(&wf[..wf.len().min(MAX_GROUP_ID)])
                // Random: two equal tasks are two deliveries, never merged.
                .message_deduplication_id(uuid::Uuid::new_v4().simple().to_string());
        }
        b.build().map_err(|e| QueueError::Backend(Box::new(e)))
    }

    /// Sends entries in batches of at most ten and at most `max_message_bytes` in all.
    async fn send_batches(
        &self,
        url: &str,
        entries: Vec<(usize, SendMessageBatchRequestEntry)>,
    ) -> Result<(), QueueError> {
        let limit = self.max_message_bytes();
        let mut batches: Vec<Vec<SendMessageBatchRequestEntry>> = Vec::new();
        let mut size = 0;
        for (entry_size, mut entry) in entries {
            match batches.last_mut() {
                Some(b) if b.len() < MAX_BATCH && size + entry_size <= limit => {
                    size += entry_size;
                    // Ids only need to be unique within one request.
                    entry.id = b.len().to_string();
                    b.push(entry);
                }
                _ => {
                    size = entry_size;
                    entry.id = "0".to_owned();
                    batches.push(vec![entry]);
                }
            }
        }
        futures::stream::iter(batches)
            .map(|batch| async move {
                match send_batch(&self.client, url, batch)
                    .await
                    .into_iter()
                    .find_map(Result::err)
                {
                    Some(f) => Err(f.into_error("send_message_batch")),
                    None => Ok(()),
                }
            })
            .buffer_unordered(BATCH_CONCURRENCY)
            .try_collect::<()>()
            .await
    }

    /// Deletes by receipt in batches of ten.
    async fn delete_batches(&self, url: &str, receipts: Vec<String>) -> Result<(), QueueError> {
        let batches: Vec<Vec<String>> =
            receipts.chunks(MAX_BATCH).map(<[String]>::to_vec).collect();
        futures::stream::iter(batches)
            .map(|batch| async move {
                let entries = batch
                    .into_iter()
                    .enumerate()
                    .map(|(i, r)| {
                        DeleteMessageBatchRequestEntry::builder()
                            .id(i.to_string())
                            .receipt_handle(r)
                            .build()
                            .map_err(|e| QueueError::Backend(Box::new(e)))
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                let out = self
                    .client
                    .delete_message_batch()
                    .queue_url(url)
                    .set_entries(Some(entries))
                    .send()
                    .await
                    .map_err(|e| classify("delete_message_batch", true, e))?;
                match out.failed.first() {
                    Some(f) => Err(classify_entry(
                        "delete_message_batch",
                        true,
                        f.code(),
                        f.message(),
                        f.sender_fault(),
                    )),
                    None => Ok(()),
                }
            })
            .buffer_unordered(BATCH_CONCURRENCY)
            .try_collect::<()>()
            .await
    }

    /// Puts back messages received before their due time. Standard queues get
    /// a fresh copy delayed by up to 15 minutes and lose the original, so the
    /// copy's receive count starts again at zero (a hidden message must not use
    /// up the receives that lead to the dead-letter queue). FIFO queues cannot
    /// delay single messages: there the message is hidden again (up to 12 h).
    /// Failures are only logged: the message then reappears after its visibility
    /// timeout and is checked again.
    async fn defer(&self, url: &str, early: Vec<(Message, Duration)>) {
        if self.cfg.fifo {
            let entries: Vec<_> = early
                .iter()
                .enumerate()
                .filter_map(|(i, (m, left))| {
                    ChangeMessageVisibilityBatchRequestEntry::builder()
                        .id(i.to_string())
                        .set_receipt_handle(m.receipt_handle.clone())
                        .visibility_timeout(secs_i32(*left, MAX_VISIBILITY))
                        .build()
                        .ok()
                })
                .collect();
            let res = self
                .client
                .change_message_visibility_batch()
                .queue_url(url)
                .set_entries(Some(entries))
                .send()
                .await;
            if let Err(e) = res {
                tracing::warn!(error = %classify("change_message_visibility_batch", true, e), "could not hide an early message again");
            }
            return;
        }
        let mut copies = Vec::with_capacity(early.len());
        let mut receipts = Vec::with_capacity(early.len());
        for (i, (m, left)) in early.into_iter().enumerate() {
            let entry = SendMessageBatchRequestEntry::builder()
                .id(i.to_string())
                .set_message_body(m.body)
                .set_message_attributes(m.message_attributes)
                .delay_seconds(secs_i32(left.min(self.max_native_delay), MAX_NATIVE_DELAY))
                .build();
            match (entry, m.receipt_handle) {
                (Ok(entry), Some(r)) => {
                    copies.push((entry_size(&entry), entry));
                    receipts.push(r);
                }
                (Err(e), _) => tracing::warn!(error = %e, "could not copy an early message"),
                (_, None) => tracing::warn!("early message without a receipt handle"),
            }
        }
        // Copy first, delete after: a crash in between duplicates, never loses.
        if let Err(e) = self.send_batches(url, copies).await {
            tracing::warn!(error = %e, "could not re-send early messages");
            return;
        }
        if let Err(e) = self.delete_batches(url, receipts).await {
            tracing::warn!(error = %e, "could not delete early messages after re-sending them");
        }
    }

    /// Changes the visibility of a live delivery; `release` ends its lease (nack).
    async fn change_visibility(
        &self,
        queue: &str,
        receipt: &Receipt,
        visibility: Duration,
        release: bool,
    ) -> Result<(), QueueError> {
        let start = Instant::now();
        if self.leases.expired(&receipt.0, start) {
            return Err(QueueError::InvalidReceipt);
        }
        let url = self.url(queue).await?;
        let res = self
            .client
            .change_message_visibility()
            .queue_url(url)
            .receipt_handle(&receipt.0)
            .visibility_timeout(secs_i32(visibility, MAX_VISIBILITY))
            .send()
            .await
            .map_err(|e| classify("change_message_visibility", true, e))
            .map_err(|e| {
                if is_missing_queue(&e) {
                    // The delivery went with its queue.
                    self.recover(queue);
                    QueueError::InvalidReceipt
                } else {
                    e
                }
            });
        match (&res, release) {
            (Err(QueueError::InvalidReceipt), _) | (Ok(_), true) => self.leases.remove(&receipt.0),
            (Ok(_), false) => self
                .leases
                .renew(&receipt.0, start + visibility.min(MAX_VISIBILITY)),
            (Err(_), _) => {}
        }
        res.map(|_| ())
    }
}

/// Visibility deadlines of deliveries received by this process. SQS (LocalStack
/// at least) lets an expired receipt handle change visibility; the contract says
/// an expired receipt is invalid, so extend and nack check here first. Receipts
/// of other processes are unknown here and left to SQS. A delivery's deadline
/// counts from the receive's answer: SQS starts a message's visibility when it hands
/// it out, which in a long poll can be up to 20 s after the request (counting from
/// the request would expire such a delivery at once), and only the answer's transit
/// time before the answer arrives. A renewal's deadline counts from before its request.
#[derive(Default)]
struct Leases {
    map: parking_lot::Mutex<LeaseMap>,
}

#[derive(Default)]
struct LeaseMap {
    deadlines: HashMap<String, Instant>,
    /// Size after the last sweep of expired entries.
    swept: usize,
}

impl Leases {
    fn insert(&self, receipts: impl IntoIterator<Item = String>, until: Instant) {
        let mut m = self.map.lock();
        for r in receipts {
            m.deadlines.insert(r, until);
        }
        // Deliveries never acked nor nacked leave entries behind: sweep them
        // whenever the map has doubled, so the cost stays amortized O(1).
        if m.deadlines.len() > 2 * m.swept + 1024 {
            let now = Instant::now();
            m.deadlines.retain(|_, t| *t > now);
            m.swept = m.deadlines.len();
        }
    }

    fn expired(&self, receipt: &str, now: Instant) -> bool {
        self.map
            .lock()
            .deadlines
            .get(receipt)
            .is_some_and(|t| *t <= now)
    }

    fn renew(&self, receipt: &str, until: Instant) {
        if let Some(t) = self.map.lock().deadlines.get_mut(receipt) {
            *t = until;
        }
    }

    fn remove(&self, receipt: &str) {
        self.map.lock().deadlines.remove(receipt);
    }

    fn remove_all<'a>(&self, receipts: impl IntoIterator<Item = &'a String>) {
        let mut m = self.map.lock();
        for r in receipts {
            m.deadlines.remove(r);
        }
    }
}

fn backend(op: &'static str, detail: impl Into<String>) -> QueueError {
    QueueError::Backend(Box::new(SqsError::new(op, detail)))
}

fn no_url(op: &'static str, name: &str) -> QueueError {
    backend(op, format!("no QueueUrl returned for {name}"))
}

fn clamp_i32(n: usize) -> i32 {
    i32::try_from(n).unwrap_or(i32::MAX)
}

/// The start of a body, for logs, cut on a character boundary.
fn preview(body: &str) -> &str {
    &body[..body.floor_char_boundary(POISON_PREVIEW)]
}

/// Outcomes of a batch request: all fail with `whole`, or each failed entry
/// (`(id, failure)`) fails alone.
fn outcomes(
    n: usize,
    whole: Option<Failure>,
    failed: impl IntoIterator<Item = (String, Failure)>,
) -> Vec<Result<(), Failure>> {
    if let Some(f) = whole {
        return vec![Err(f); n];
    }
    let mut res = vec![Ok(()); n];
    for (id, f) in failed {
        if let Some(r) = id.parse::<usize>().ok().and_then(|i| res.get_mut(i)) {
            *r = Err(f);
        }
    }
    res
}

/// One SendMessageBatch for the send batcher of `url`.
fn send_flush(client: Client, url: String) -> FlushFn<SendMessageBatchRequestEntry> {
    Arc::new(move |entries: Vec<SendMessageBatchRequestEntry>| {
        let (client, url) = (client.clone(), url.clone());
        Box::pin(async move { send_batch(&client, &url, entries).await })
    })
}

/// How often the entries SQS failed on its side are sent again.
const ENTRY_RETRIES: u32 = 2;
/// The pause before the first of those retries; doubled before the next.
const ENTRY_RETRY_PAUSE: Duration = Duration::from_millis(100);

/// Sends `entries` (at most ten) in one SendMessageBatch, then sends again, up to
/// [`ENTRY_RETRIES`] times, the entries SQS reports failed on its side
/// (`SenderFault` false, or throttled): SQS sent none of those, so sending them
/// again cannot duplicate a message, while giving up would leave an activity
/// task to the sweeper. A failed request as a whole is not sent again here (the
/// SDK's own retries have run, and SQS may have taken it). One outcome per
/// entry, in order.
async fn send_batch(
    client: &Client,
    url: &str,
    entries: Vec<SendMessageBatchRequestEntry>,
) -> Vec<Result<(), Failure>> {
    let mut res = vec![Ok(()); entries.len()];
    // Ids only need to be unique within one request: an entry's is its position.
    let mut pending: Vec<SendMessageBatchRequestEntry> = entries
        .into_iter()
        .enumerate()
        .map(|(i, mut e)| {
            e.id = i.to_string();
            e
        })
        .collect();
    let mut pause = ENTRY_RETRY_PAUSE;
    for attempt in 0..=ENTRY_RETRIES {
        let last = attempt == ENTRY_RETRIES;
        // Positions of the entries this request carries: a failed request fails them.
        let carried: Vec<usize> = pending
            .iter()
            .filter_map(|e| e.id.parse::<usize>().ok())
            .collect();
        // Kept for a retry only while one may follow.
        let sent = if last {
            std::mem::take(&mut pending)
        } else {
            pending.clone()
        };
        let out = match client
            .send_message_batch()
            .queue_url(url)
            .set_entries(Some(sent))
            .send()
            .await
        {
            Ok(out) => out,
            Err(e) => {
                let f = Failure::of(&classify("send_message_batch", false, e));
                for i in carried {
                    if let Some(r) = res.get_mut(i) {
                        *r = Err(f.clone());
                    }
                }
                return res;
            }
        };
        let mut again = Vec::new();
        for f in out.failed {
            let e = classify_entry(
                "send_message_batch",
                false,
                f.code(),
                f.message(),
                f.sender_fault(),
            );
            let Some(i) = f.id.parse::<usize>().ok().filter(|i| *i < res.len()) else {
                continue;
            };
            if !last && matches!(e, QueueError::Unavailable(_)) {
                tracing::debug!(error = %e, attempt, "SQS failed a message of a batch; sending it again");
                again.push(i);
            } else {
                res[i] = Err(Failure::of(&e));
            }
        }
        if again.is_empty() {
            break;
        }
        pending.retain(|e| e.id.parse::<usize>().is_ok_and(|i| again.contains(&i)));
        tokio::time::sleep(pause).await;
        pause *= 2;
    }
    res
}

/// One DeleteMessageBatch for the delete batcher of `url`.
fn delete_flush(client: Client, url: String) -> FlushFn<String> {
    Arc::new(move |receipts: Vec<String>| {
        let (client, url) = (client.clone(), url.clone());
        Box::pin(async move {
            let n = receipts.len();
            let entries = receipts
                .into_iter()
                .enumerate()
                .map(|(i, r)| {
                    DeleteMessageBatchRequestEntry::builder()
                        .id(i.to_string())
                        .receipt_handle(r)
                        .build()
                })
                .collect::<Result<Vec<_>, _>>();
            let entries = match entries {
                Ok(e) => e,
                Err(e) => return outcomes(n, Some(Failure::Backend(e.to_string())), []),
            };
            match client
                .delete_message_batch()
                .queue_url(url)
                .set_entries(Some(entries))
                .send()
                .await
            {
                Err(e) => outcomes(
                    n,
                    Some(Failure::of(&classify("delete_message_batch", true, e))),
                    [],
                ),
                Ok(out) => outcomes(
                    n,
                    None,
                    out.failed.into_iter().map(|f| {
                        let e = classify_entry(
                            "delete_message_batch",
                            true,
                            f.code(),
                            f.message(),
                            f.sender_fault(),
                        );
                        (f.id, Failure::of(&e))
                    }),
                ),
            }
        })
    })
}

#[async_trait]
impl Queue for SqsQueue {
    async fn enqueue(&self, queue: &str, messages: Vec<OutgoingMessage>) -> Result<(), QueueError> {
        if messages.is_empty() {
            return Ok(());
        }
        let limit = self.max_message_bytes();
        let now = SystemTime::now();
        // Encode everything first: a message too large sends nothing.
        let mut entries = Vec::with_capacity(messages.len());
        for (i, m) in messages.iter().enumerate() {
            let e = encode(m, now, self.max_native_delay, limit)?;
            let size = e.size;
            entries.push((size, self.send_entry(i, e, &m.task)?));
        }
        let mut recreated = false;
        loop {
            let url = self.url(queue).await?;
            let results = self.send_coalesced(&url, &entries).await;
            let mut missing = Vec::new();
            let mut failure = None;
            for (entry, r) in entries.into_iter().zip(results) {
                match r {
                    Ok(()) => {}
                    Err(f @ Failure::MissingQueue(_)) => {
                        missing.push(entry);
                        failure.get_or_insert(f);
                    }
                    Err(f) => {
                        failure = Some(f);
                    }
                }
            }
            match failure {
                None => return Ok(()),
                // Only a missing queue left: recreate it once and send what it refused.
                Some(Failure::MissingQueue(_)) if !recreated && self.recover(queue) => {
                    recreated = true;
                    entries = missing;
                }
                Some(f) => return Err(f.into_error("enqueue")),
            }
        }
    }

    async fn receive(
        &self,
        queue: &str,
        max: usize,
        wait: Duration,
        visibility: Duration,
    ) -> Result<Vec<Delivery>, QueueError> {
        if max == 0 {
            return Ok(Vec::new());
        }
        let mut url = self.url(queue).await?;
        let mut recreated = false;
        let deadline = Instant::now() + wait;
        loop {
            let sent_at = Instant::now();
            let left = deadline.saturating_duration_since(sent_at);
            let out = match self
                .client
                .receive_message()
                .queue_url(&url)
                .max_number_of_messages(clamp_i32(max.min(MAX_BATCH)))
                .wait_time_seconds(secs_i32(left.min(self.cfg.wait_time), MAX_WAIT))
                .visibility_timeout(secs_i32(visibility, MAX_VISIBILITY))
                .message_system_attribute_names(MessageSystemAttributeName::ApproximateReceiveCount)
                .message_system_attribute_names(
                    MessageSystemAttributeName::ApproximateFirstReceiveTimestamp,
                )
                .message_attribute_names("All")
                .send()
                .await
                .map_err(|e| classify("receive_message", false, e))
            {
                Ok(out) => out,
                Err(e) if is_missing_queue(&e) && !recreated && self.recover(queue) => {
                    recreated = true;
                    url = self.url(queue).await?;
                    continue;
                }
                Err(e) => return Err(e),
            };
            // SQS starts a message's visibility when it hands the message out: in a
            // long poll, any time up to this answer (dating the lease from the request
            // instead would expire a message that arrived late in a 20 s poll at once).
            let received_at = Instant::now();
            let now = SystemTime::now();
            let mut deliveries = Vec::new();
            let mut early = Vec::new();
            let mut poison = Vec::new();
            for m in out.messages.unwrap_or_default() {
                if let Some(left) = due_in(m.message_attributes.as_ref(), now) {
                    early.push((m, left));
                    continue;
                }
                let Some(receipt) = m.receipt_handle.clone() else {
                    tracing::warn!(message_id = ?m.message_id, "message without a receipt handle");
                    continue;
                };
                match decode(m.body().unwrap_or_default()) {
                    Ok(task) => deliveries.push(Delivery {
                        receipt: Receipt(receipt),
                        task,
                        receive_count: receive_count(&m, self.cfg.fifo),
                        trace_context: message::trace_context(m.message_attributes.as_ref()),
                    }),
                    Err(e) => poison.push((m, e)),
                }
            }
            self.leases.insert(
                deliveries.iter().map(|d| d.receipt.0.clone()),
                received_at + visibility.min(MAX_VISIBILITY),
            );
            if !early.is_empty() {
                self.defer(&url, early).await;
            }
            if !poison.is_empty() {
                self.poisoned(queue, &url, poison).await;
            }
            if !deliveries.is_empty() || Instant::now() >= deadline {
                return Ok(deliveries);
            }
        }
    }

    async fn ack(&self, queue: &str, receipts: Vec<Receipt>) -> Result<(), QueueError> {
        if receipts.is_empty() {
            return Ok(());
        }
        let url = self.url(queue).await?;
        let receipts: Vec<String> = receipts.into_iter().map(|r| r.0).collect();
        self.leases.remove_all(&receipts);
        let mut failure = None;
        for r in self.delete_coalesced(&url, receipts).await {
            match r {
                Ok(()) => {}
                // The messages went with their queue: deleted for good, as asked.
                Err(Failure::MissingQueue(_)) => {
                    self.recover(queue);
                }
                Err(f) => {
                    failure.get_or_insert(f);
                }
            }
        }
        failure.map_or(Ok(()), |f| Err(f.into_error("ack")))
    }

    async fn nack(
        &self,
        queue: &str,
        receipt: &Receipt,
        delay: Duration,
    ) -> Result<(), QueueError> {
        // SQS caps visibility at 12 h from the receive; a longer delay comes back after 12 h.
        self.change_visibility(queue, receipt, delay, true).await
    }

    async fn extend(
        &self,
        queue: &str,
        receipt: &Receipt,
        visibility: Duration,
    ) -> Result<(), QueueError> {
        self.change_visibility(queue, receipt, visibility, false)
            .await
    }

    async fn depth(&self, queue: &str) -> Result<u64, QueueError> {
        let attrs = self
            .on_queue(queue, |url| async move {
                self.client
                    .get_queue_attributes()
                    .queue_url(url)
                    .attribute_names(QueueAttributeName::ApproximateNumberOfMessages)
                    .attribute_names(QueueAttributeName::ApproximateNumberOfMessagesDelayed)
                    .send()
                    .await
                    .map_err(|e| classify("get_queue_attributes", false, e))
            })
            .await?
            .attributes
            .unwrap_or_default();
        let count = |name: &QueueAttributeName| -> u64 {
            attrs.get(name).and_then(|v| v.parse().ok()).unwrap_or(0)
        };
        Ok(count(&QueueAttributeName::ApproximateNumberOfMessages)
            + count(&QueueAttributeName::ApproximateNumberOfMessagesDelayed))
    }

    async fn drain_dead_letters(&self, queue: &str, max: usize) -> Result<Vec<Task>, QueueError> {
        let mut url = match self.dlq_url(queue).await {
            Err(e) if is_missing_queue(&e) && self.recover(queue) => self.dlq_url(queue).await?,
            r => r?,
        };
        let mut recreated = false;
        // Tasks taken off the DLQ and deleted there: no later drain can report them,
        // so a failure after some were deleted returns them rather than the error.
        let mut tasks = Vec::new();
        // Messages read, undecodable ones included: those stay on the DLQ, so
        // counting only tasks would read the whole DLQ on every drain.
        let mut read = 0;
        while read < max {
            let out = match self
                .client
                .receive_message()
                .queue_url(&url)
                .max_number_of_messages(clamp_i32((max - read).min(MAX_BATCH)))
                .wait_time_seconds(0)
                .visibility_timeout(DRAIN_VISIBILITY)
                .send()
                .await
                .map_err(|e| classify("receive_message", false, e))
            {
                Ok(out) => out,
                Err(e) if is_missing_queue(&e) && !recreated && self.recover(queue) => {
                    recreated = true;
                    url = self.dlq_url(queue).await?;
                    continue;
                }
                Err(e) => return drained(queue, tasks, e),
            };
            let messages = out.messages.unwrap_or_default();
            if messages.is_empty() {
                break;
            }
            read += messages.len();
            let mut taken = Vec::with_capacity(messages.len());
            for m in messages {
                match decode(m.body().unwrap_or_default()) {
                    Ok(task) => {
                        if let Some(r) = m.receipt_handle {
                            taken.push((task, r));
                        }
                    }
                    // Reported, and kept on the dead-letter queue for a human to look at.
                    Err(e) => {
                        tracing::error!(
                            queue,
                            dlq = %self.dlq_name(queue),
                            message_id = ?m.message_id,
                            error = %e,
                            body = %preview(m.body().unwrap_or_default()),
                            "undecodable message in the dead-letter queue (not a Marathon task); left there for an operator"
                        );
                    }
                }
            }
            let (round, receipts): (Vec<Task>, Vec<String>) = taken.into_iter().unzip();
            // A task is returned once its message is deleted; one not deleted stays
            // on the DLQ (hidden for DRAIN_VISIBILITY) and a later drain returns it.
            let mut failure = None;
            for (task, r) in round
                .into_iter()
                .zip(self.delete_coalesced(&url, receipts).await)
            {
                match r {
                    Ok(()) => tasks.push(task),
                    Err(f) => {
                        failure.get_or_insert(f);
                    }
                }
            }
            if let Some(f) = failure {
                return drained(queue, tasks, f.into_error("drain_dead_letters"));
            }
        }
        Ok(tasks)
    }

    fn check_task_queue(&self, task_queue: &str) -> Result<(), String> {
        self.cfg.check_queue_name(task_queue)
    }

    fn finish_receive_when_stopping(&self) -> bool {
        // A long poll dropped by the client stays open at SQS, which may still hand
        // it messages that no one holds (aws-sdk-js#2350, aws-sdk-net#1680).
        true
    }

    async fn ping(&self) -> Result<(), QueueError> {
        let mut req = self.client.list_queues().max_results(1);
        if !self.cfg.queue_prefix.is_empty() {
            req = req.queue_name_prefix(&self.cfg.queue_prefix);
        }
        req.send()
            .await
            .map_err(|e| classify("list_queues", false, e))?;
        Ok(())
    }
}

/// The end of a drain that failed with `e`: the tasks already deleted from the
/// dead-letter queue if there are any (no later drain can return them), else `e`.
fn drained(queue: &str, tasks: Vec<Task>, e: QueueError) -> Result<Vec<Task>, QueueError> {
    if tasks.is_empty() {
        return Err(e);
    }
    tracing::warn!(queue, error = %e, drained = tasks.len(), "draining dead letters stopped early; returning those already taken off the dead-letter queue");
    Ok(tasks)
}

/// Runs [`SqsQueueConfig::check`], its refusal as a [`QueueError::Backend`].
fn check(cfg: &SqsQueueConfig) -> Result<(), QueueError> {
    cfg.check().map_err(|(field, message)| {
        QueueError::Backend(Box::new(SqsConfigError { field, message }))
    })
}

/// Size of a copied entry as SQS counts it (body and attributes).
fn entry_size(e: &SendMessageBatchRequestEntry) -> usize {
    e.message_body.len()
        + e.message_attributes.as_ref().map_or(0, |a| {
            a.iter()
                .map(|(k, v)| k.len() + v.data_type().len() + v.string_value().map_or(0, str::len))
                .sum()
        })
}

/// The receive count of a delivery. On FIFO queues, receives spent hiding a
/// long-delayed message before its due time are not counted (SQS still counts
/// them towards the dead-letter limit).
fn receive_count(m: &Message, fifo: bool) -> u32 {
    let attr = |name: MessageSystemAttributeName| -> Option<u64> {
        m.attributes()?.get(&name)?.parse().ok()
    };
    let count = attr(MessageSystemAttributeName::ApproximateReceiveCount).unwrap_or(1);
    let count = u32::try_from(count).unwrap_or(u32::MAX);
    let early = match (fifo, message::due_ms(m.message_attributes.as_ref())) {
        (true, Some(due)) => attr(MessageSystemAttributeName::ApproximateFirstReceiveTimestamp)
            .map_or(0, |first| message::early_receives(due, first)),
        _ => 0,
    };
    count.saturating_sub(early).max(1)
}

#[cfg(test)]
mod tests {
    //! The long-delay path on LocalStack, with the 15-minute threshold lowered to 1 s.
    use super::*;
    use crate::testkit;
    use marathon_core::WorkflowId;

    /// A client built offline: `from_client` sends nothing, so no SQS is needed.
    fn offline_client() -> Client {
        Client::from_conf(
            aws_sdk_sqs::Config::builder()
                .behavior_version(BehaviorVersion::latest())
                .region(Region::new("us-east-1"))
                .build(),
        )
    }

    /// `from_client` refuses what `check` refuses, naming the setting in a typed
    /// error; it used to take a `wait_time` of 0 or a prefix SQS refuses (and
    /// clamp the first unasked).
    #[test]
    fn from_client_refuses_a_config_check_refuses() {
        for (cfg, field) in [
            (
                SqsQueueConfig {
                    wait_time: Duration::ZERO,
                    ..SqsQueueConfig::default()
                },
                "wait_time_ms",
            ),
            (
                SqsQueueConfig {
                    wait_time: Duration::from_secs(60),
                    ..SqsQueueConfig::default()
                },
                "wait_time_ms",
            ),
            (
                SqsQueueConfig {
                    queue_prefix: "dev:".into(),
                    ..SqsQueueConfig::default()
                },
                "queue_prefix",
            ),
            (
                SqsQueueConfig {
                    max_receives: 0,
                    ..SqsQueueConfig::default()
                },
                "max_receives",
            ),
        ] {
            let Err(QueueError::Backend(e)) = SqsQueue::from_client(cfg, offline_client()) else {
                panic!("{field}: accepted");
            };
            let e = e
                .downcast_ref::<SqsConfigError>()
                .unwrap_or_else(|| panic!("{field}: not an SqsConfigError: {e}"));
            assert_eq!(e.field, field);
        }
        let q = SqsQueue::from_client(SqsQueueConfig::default(), offline_client())
            .expect("the default config");
        assert_eq!(q.config(), &SqsQueueConfig::default());
    }

    async fn fresh() -> SqsQueue {
        let mut q = testkit::connect(testkit::config(2, false)).await;
        q.set_max_native_delay(Duration::from_secs(1));
        q
    }

    async fn teardown(q: &SqsQueue) {
        testkit::delete_queues(&q.client, &q.cfg.queue_prefix).await;
    }

    #[tokio::test]
    async fn delays_beyond_the_native_limit_are_deferred_without_using_up_receives() {
        let q = fresh().await;
        let task = Task::workflow(WorkflowId::random());
        let start = std::time::Instant::now();
        // 4 s with a native limit of 1 s: sent with 1 s, then re-sent up to 3 times.
        q.enqueue(
            "d",
            vec![OutgoingMessage::now(task.clone()).delayed(Duration::from_secs(4))],
        )
        .await
        .expect("enqueue");
        let mut got = Vec::new();
        while got.is_empty() && start.elapsed() < Duration::from_secs(15) {
            got = q
                .receive("d", 10, Duration::from_secs(1), Duration::from_secs(30))
                .await
                .expect("receive");
            assert_eq!(q.depth("d").await.expect("depth") + got.len() as u64, 1);
        }
        let elapsed = start.elapsed();
        assert!(
            elapsed >= Duration::from_millis(3900),
            "delivered early: {elapsed:?}"
        );
        assert!(
            elapsed < Duration::from_secs(8),
            "delivered late: {elapsed:?}"
        );
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].task, task);
        // Early receives did not count: max_receives is 2 and it was received several times.
        assert_eq!(got[0].receive_count, 1);
        assert!(
            q.drain_dead_letters("d", 10)
                .await
                .expect("drain")
                .is_empty()
        );
        teardown(&q).await;
    }
}
