//! Configuration of [`crate::SqsQueue`].

use std::collections::BTreeMap;
use std::time::Duration;

use marathon_core::model::duration_ms;
use serde::{Deserialize, Serialize};

/// How Marathon finds or creates its SQS queues. Plain data, no I/O.
///
/// Credentials are not part of it: the AWS SDK's own chain provides them
/// (environment, profile, web identity, ECS/EC2 roles).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SqsQueueConfig {
    /// Prefix of every SQS queue name: logical queue `default` is SQS queue
    /// `<queue_prefix>default`. Default `"marathon-"`.
    pub queue_prefix: String,
    /// Explicit queue URLs by logical name; they win over `queue_prefix`. Default empty.
    pub queue_urls: BTreeMap<String, String>,
    /// Creates a missing queue and its dead-letter queue `<name>-dlq` on first use
    /// (needs `sqs:CreateQueue`, `sqs:GetQueueAttributes`). Default `false`.
    pub create_if_missing: bool,
    /// Receives after which a message moves to the dead-letter queue (the
    /// `maxReceiveCount` of the queues this crate creates). Default 5.
    pub max_receives: u32,
    /// AWS region; `None` uses the SDK's chain (`AWS_REGION`, profile). Default `None`.
    pub region: Option<String>,
    /// Endpoint override, e.g. `http://127.0.0.1:4566` for LocalStack. Default `None`.
    pub endpoint_url: Option<String>,
    /// Longest single long poll; SQS allows at most 20 s. Default 20 s.
    #[serde(with = "duration_ms", rename = "wait_time_ms")]
    pub wait_time: Duration,
    /// Uses FIFO queues (`<name>.fifo`), grouped by workflow id. Default `false`.
    pub fifo: bool,
    /// How long a single send or ack waits for others to share its batch
    /// request (SendMessageBatch, DeleteMessageBatch); 0 only batches what is
    /// already waiting. Default 5 ms.
    #[serde(with = "duration_ms", rename = "batch_window_ms")]
    pub batch_window: Duration,
}

impl Default for SqsQueueConfig {
    fn default() -> Self {
        Self {
            queue_prefix: "marathon-".into(),
            queue_urls: BTreeMap::new(),
            create_if_missing: false,
            max_receives: 5,
            region: None,
            endpoint_url: None,
            wait_time: Duration::from_secs(20),
            fifo: false,
            batch_window: Duration::from_millis(5),
        }
    }
}

/// Longest SQS queue name.
const MAX_SQS_NAME: usize = 80;

/// Whether `s` holds only characters SQS allows in a queue name.
fn sqs_name_chars(s: &str) -> bool {
    s.chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

impl SqsQueueConfig {
    /// Whether `queue_prefix` holds only characters SQS allows in a queue name (else
    /// no queue named through it can exist).
    #[must_use]
    pub fn prefix_is_valid(&self) -> bool {
        sqs_name_chars(&self.queue_prefix)
    }

    /// Checks that logical queue `name` maps to SQS names SQS accepts: unless
    /// `queue_urls` names its URL, `<queue_prefix><name>` (plus `.fifo` on FIFO
    /// queues) must be 1 to 80 letters, digits, `-` and `_`, and so must its
    /// dead-letter queue `<queue_prefix><name>-dlq` when `create_if_missing` creates
    /// it. SQS refuses anything else on every call, so a worker would retry such a
    /// queue forever.
    ///
    /// # Errors
    /// A message naming the queue and the rule.
    pub fn check_queue_name(&self, name: &str) -> Result<(), String> {
        if self.queue_urls.contains_key(name) {
            return Ok(());
        }
        let base = format!("{}{name}", self.queue_prefix);
        if base.is_empty() || !sqs_name_chars(&base) {
            return Err(format!(
                "SQS queue name {base:?} (queue_prefix + queue {name:?}) may hold only letters, digits, '-' and '_'"
            ));
        }
        let mut suffixes = Vec::new();
        if self.create_if_missing {
            suffixes.push("-dlq");
        }
        if self.fifo {
            suffixes.push(".fifo");
        }
        let longest = base.len() + suffixes.iter().map(|s| s.len()).sum::<usize>();
        if longest > MAX_SQS_NAME {
            let with = if suffixes.is_empty() {
                String::new()
            } else {
                format!(" with {}", suffixes.join(" and "))
            };
            return Err(format!(
                "SQS queue name {base:?} is too long: {longest} characters{with}, SQS allows {MAX_SQS_NAME}"
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partial_config_fills_defaults_and_rejects_unknown_fields() {
        let cfg: SqsQueueConfig =
            serde_json::from_str(r#"{"queue_prefix":"p-","fifo":true,"wait_time_ms":5000}"#)
                .expect("valid config");
        assert_eq!(cfg.queue_prefix, "p-");
        assert!(cfg.fifo);
        assert_eq!(cfg.wait_time, Duration::from_secs(5));
        assert_eq!(cfg.max_receives, 5);
        assert_eq!(cfg.batch_window, Duration::from_millis(5));
        assert!(serde_json::from_str::<SqsQueueConfig>(r#"{"queue_prefx":"p-"}"#).is_err());
    }

    #[test]
    fn queue_names_follow_sqs_rules() {
        let cfg = SqsQueueConfig::default();
        assert_eq!(cfg.check_queue_name("llm_calls-2"), Ok(()));
        for bad in ["llm.calls", "a:b", "ä", ""] {
            let cfg = SqsQueueConfig {
                queue_prefix: String::new(),
                ..SqsQueueConfig::default()
            };
            assert!(cfg.check_queue_name(bad).is_err(), "{bad:?}");
        }
        let colon = SqsQueueConfig {
            queue_prefix: "dev:".into(),
            ..SqsQueueConfig::default()
        };
        assert!(colon.check_queue_name("default").is_err());
        // Queues that exist already: 80 characters fit, 81 do not.
        let long = "q".repeat(80 - "marathon-".len());
        assert_eq!(cfg.check_queue_name(&long), Ok(()));
        assert!(cfg.check_queue_name(&format!("{long}q")).is_err());
        // Created with their dead-letter queue: "-dlq" counts; on FIFO ".fifo" too.
        let created = SqsQueueConfig {
            create_if_missing: true,
            ..SqsQueueConfig::default()
        };
        let short = "q".repeat(76 - "marathon-".len());
        assert_eq!(created.check_queue_name(&short), Ok(()));
        assert!(created.check_queue_name(&format!("{short}q")).is_err());
        let fifo = SqsQueueConfig {
            fifo: true,
            ..created.clone()
        };
        assert!(fifo.check_queue_name(&short).is_err());
        let fifo_existing = SqsQueueConfig {
            fifo: true,
            ..SqsQueueConfig::default()
        };
        assert_eq!(
            fifo_existing.check_queue_name(&"q".repeat(75 - "marathon-".len())),
            Ok(())
        );
        // A queue with an explicit URL is not named by the prefix.
        let urls = SqsQueueConfig {
            queue_urls: [("llm.calls".to_string(), "http://x/q".to_string())].into(),
            ..SqsQueueConfig::default()
        };
        assert_eq!(urls.check_queue_name("llm.calls"), Ok(()));
    }
}
