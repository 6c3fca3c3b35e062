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
/// Shortest long poll `wait_time` may ask for: SQS counts whole seconds, and 0 s
/// would return at once on an empty queue (a receive loop that spins).
pub(crate) const MIN_WAIT: Duration = Duration::from_secs(1);
/// Longest long poll SQS allows.
pub(crate) const MAX_WAIT: Duration = Duration::from_secs(20);

/// Whether `s` holds only characters SQS allows in a queue name.
fn sqs_name_chars(s: &str) -> bool {
    s.chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

/// Whether `url` is an absolute `http://` or `https://` URL with a host. What the
/// `url` crate would mend is refused: blanks and control characters (stripped or
/// skipped), backslashes (read as `/`) and extra slashes before the host
/// (`http:///h` reads as `http://h/`).
fn is_http_url(url: &str) -> bool {
    let Some((scheme, rest)) = url.split_once("://") else {
        return false;
    };
    matches!(scheme, "http" | "https")
        && !rest.starts_with('/')
        && !url
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || c == '\\')
        && url::Url::parse(url).is_ok_and(|u| u.host_str().is_some_and(|h| !h.is_empty()))
}

/// Whether queue URL `url` names a FIFO queue: its last path segment, the queue's
/// name, ends in `.fifo`.
fn names_fifo_queue(url: &str) -> bool {
    url::Url::parse(url).is_ok_and(|u| {
        u.path_segments()
            .and_then(|mut segments| segments.rfind(|s| !s.is_empty()))
            .is_some_and(|name| name.ends_with(".fifo"))
    })
}

/// Whether `region` can name an AWS region: a host label (letters, digits and `-`,
/// not first; at most 63), as the SDK requires to build a request.
fn is_region(region: &str) -> bool {
    (1..=63).contains(&region.len())
        && !region.starts_with('-')
        && region
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-')
}

/// A setting [`SqsQueueConfig::check`] refuses, as [`crate::SqsQueue`]'s constructors
/// report it (inside [`marathon_core::QueueError::Backend`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid SQS queue configuration: `{field}`: {message}")]
pub struct SqsConfigError {
    /// The setting's key within the queue's configuration (`[queue]` of the
    /// server), e.g. `endpoint_url`, `wait_time_ms` or `queue_urls.<name>`.
    pub field: String,
    /// What is wrong with it.
    pub message: String,
}

impl SqsQueueConfig {
    /// Checks what SQS or the SDK would refuse on every request, or what could not
    /// work at all: an `endpoint_url` or `queue_urls` entry that is not an `http(s)://`
    /// URL, a `queue_urls` entry whose queue type (`.fifo` or not) differs from
    /// `fifo`, `max_receives` of 0, a `region` that cannot be one, a `queue_prefix`
    /// with characters SQS refuses in a queue name or too long to leave room for
    /// one, and a `wait_time` outside SQS's long polls of 1 to 20 s. Names of
    /// particular queues are [`Self::check_queue_name`]'s. No I/O.
    ///
    /// # Errors
    /// The first bad setting: its key (as in the configuration file, relative to
    /// the queue's section) and what is wrong.
    pub fn check(&self) -> Result<(), (String, String)> {
        // The SDK takes any string and fails every request later.
        if let Some(url) = &self.endpoint_url
            && !is_http_url(url)
        {
            return Err((
                "endpoint_url".into(),
                format!(
                    "{:?} is not an http(s) URL like http://127.0.0.1:4566",
                    marathon_core::masked_url(url)
                ),
            ));
        }
        if self.max_receives == 0 {
            return Err((
                "max_receives".into(),
                "must be at least 1 with SQS (receives before a message goes to the dead-letter queue)"
                    .into(),
            ));
        }
        // The SDK builds no request with such a region (not even to look a queue up).
        if let Some(region) = &self.region
            && !is_region(region)
        {
            return Err((
                "region".into(),
                format!(
                    "{region:?} is not an AWS region like eu-west-1 (leave it unset for AWS_REGION or the profile's region)"
                ),
            ));
        }
        // The same for a queue's explicit URL.
        if let Some((name, url)) = self.queue_urls.iter().find(|(_, u)| !is_http_url(u)) {
            return Err((
                format!("queue_urls.{name}"),
                format!(
                    "{:?} is not an http(s) URL like https://sqs.eu-west-1.amazonaws.com/123456789012/marathon-{name}",
                    marathon_core::masked_url(url)
                ),
            ));
        }
        // SQS refuses every send to it: a FIFO queue wants a message group id, a
        // standard queue refuses one. A FIFO queue's name (the URL's last segment)
        // ends in `.fifo`, a standard queue's cannot.
        if let Some((name, url)) = self
            .queue_urls
            .iter()
            .find(|(_, u)| names_fifo_queue(u) != self.fifo)
        {
            let message = if self.fifo {
                format!(
                    "{url:?} names a standard queue (no .fifo suffix) while fifo = true: SQS would refuse every send to it; give its FIFO queue's URL or set fifo = false"
                )
            } else {
                format!(
                    "{url:?} names a FIFO queue (.fifo) while fifo = false: SQS would refuse every send to it; give a standard queue's URL or set fifo = true"
                )
            };
            return Err((format!("queue_urls.{name}"), message));
        }
        self.check_queue_prefix()
            .map_err(|m| ("queue_prefix".to_string(), m))?;
        // Each poll would return at once on an empty queue (the old code raised it to
        // 1 s unasked), or SQS refuses it (the old code lowered it to 20 s).
        if !(MIN_WAIT..=MAX_WAIT).contains(&self.wait_time) {
            return Err((
                "wait_time_ms".into(),
                format!(
                    "{} ms is not a long poll SQS takes: from {} to {} ms",
                    self.wait_time.as_millis(),
                    MIN_WAIT.as_millis(),
                    MAX_WAIT.as_millis()
                ),
            ));
        }
        Ok(())
    }

    /// Checks that `queue_prefix` can begin an SQS queue name: only characters SQS
    /// allows, and short enough that `<queue_prefix><name>` with the suffixes this
    /// configuration adds (`-dlq` with `create_if_missing`, `.fifo` with `fifo`) fits
    /// 80 characters for a name of at least one.
    fn check_queue_prefix(&self) -> Result<(), String> {
        let prefix = &self.queue_prefix;
        if !sqs_name_chars(prefix) {
            return Err(format!(
                "{prefix:?} may hold only letters, digits, '-' and '_', as SQS queue names do"
            ));
        }
        let suffixes = self.suffixes();
        let shortest = prefix.len() + 1 + suffixes.iter().map(|s| s.len()).sum::<usize>();
        if shortest > MAX_SQS_NAME {
            return Err(format!(
                "{prefix:?} is {} characters: even a one-character queue name{} would make an SQS name of {shortest}, SQS allows {MAX_SQS_NAME}",
                prefix.len(),
                with(&suffixes)
            ));
        }
        Ok(())
    }

    /// The suffixes the longest SQS name this configuration builds has after
    /// `<queue_prefix><name>`: the dead-letter queue's `-dlq` when this crate creates
    /// it, then `.fifo` on FIFO queues.
    fn suffixes(&self) -> Vec<&'static str> {
        let mut suffixes = Vec::new();
        if self.create_if_missing {
            suffixes.push("-dlq");
        }
        if self.fifo {
            suffixes.push(".fifo");
        }
        suffixes
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
        let suffixes = self.suffixes();
        let longest = base.len() + suffixes.iter().map(|s| s.len()).sum::<usize>();
        if longest > MAX_SQS_NAME {
            return Err(format!(
                "SQS queue name {base:?} is too long: {longest} characters{}, SQS allows {MAX_SQS_NAME}",
                with(&suffixes)
            ));
        }
        Ok(())
    }
}

/// `" with -dlq and .fifo"`, or nothing without suffixes.
fn with(suffixes: &[&str]) -> String {
    if suffixes.is_empty() {
        String::new()
    } else {
        format!(" with {}", suffixes.join(" and "))
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

    /// The key `check` names for `cfg`, or `Ok`.
    fn field(cfg: SqsQueueConfig) -> Result<(), String> {
        cfg.check().map_err(|e| e.0)
    }

    #[test]
    fn the_default_config_passes_check() {
        assert_eq!(SqsQueueConfig::default().check(), Ok(()));
    }

    #[test]
    fn an_endpoint_that_is_not_an_http_url_is_refused() {
        for bad in [
            "notaurl",
            "127.0.0.1:4566",
            "ftp://h:1",
            "http://",
            "http:///path",
            "HTTP://h:1",
            " http://h:1",
            "http://h :1",
            "http://h:1\n",
            "http://\\\\h:1",
            "http://h:99999",
        ] {
            let cfg = SqsQueueConfig {
                endpoint_url: Some(bad.into()),
                ..SqsQueueConfig::default()
            };
            assert_eq!(field(cfg), Err("endpoint_url".into()), "{bad:?}");
        }
        for good in [
            "http://127.0.0.1:4566",
            "https://sqs.eu-west-1.amazonaws.com",
            "http://[::1]:4566/",
            "http://localhost.localstack.cloud:4566",
        ] {
            let cfg = SqsQueueConfig {
                endpoint_url: Some(good.into()),
                ..SqsQueueConfig::default()
            };
            assert_eq!(field(cfg), Ok(()), "{good:?}");
        }
        let e = SqsQueueConfig {
            endpoint_url: Some("notaurl".into()),
            ..SqsQueueConfig::default()
        }
        .check()
        .expect_err("no URL");
        assert!(e.1.contains("http(s) URL"), "{}", e.1);
        // A refused URL's password is not shown.
        for bad in ["ftp://k:s3cret@h:1", "k:s3cret@h:1"] {
            let e = SqsQueueConfig {
                endpoint_url: Some(bad.into()),
                queue_urls: [("q".to_string(), bad.to_string())].into(),
                ..SqsQueueConfig::default()
            }
            .check()
            .expect_err("not http");
            assert!(!e.1.contains("s3cret"), "{}", e.1);
            let e = SqsQueueConfig {
                queue_urls: [("q".to_string(), bad.to_string())].into(),
                ..SqsQueueConfig::default()
            }
            .check()
            .expect_err("not http");
            assert!(!e.1.contains("s3cret"), "{}", e.1);
        }
    }

    #[test]
    fn max_receives_of_zero_is_refused() {
        let cfg = SqsQueueConfig {
            max_receives: 0,
            ..SqsQueueConfig::default()
        };
        assert_eq!(field(cfg), Err("max_receives".into()));
        let cfg = SqsQueueConfig {
            max_receives: 1,
            ..SqsQueueConfig::default()
        };
        assert_eq!(field(cfg), Ok(()));
    }

    #[test]
    fn a_region_that_cannot_be_one_is_refused() {
        for bad in ["", " ", "eu west 1", "-eu", "eu_west_1", &"a".repeat(64)] {
            let cfg = SqsQueueConfig {
                region: Some(bad.into()),
                ..SqsQueueConfig::default()
            };
            assert_eq!(field(cfg), Err("region".into()), "{bad:?}");
        }
        for good in ["eu-west-1", "us-gov-west-1", &"a".repeat(63)] {
            let cfg = SqsQueueConfig {
                region: Some(good.into()),
                ..SqsQueueConfig::default()
            };
            assert_eq!(field(cfg), Ok(()), "{good:?}");
        }
    }

    #[test]
    fn a_queue_url_that_is_not_an_http_url_is_refused_by_its_name() {
        let cfg = SqsQueueConfig {
            queue_urls: [
                (
                    "a".to_string(),
                    "https://sqs.eu-west-1.amazonaws.com/1/a".to_string(),
                ),
                ("llm".to_string(), "marathon-llm".to_string()),
            ]
            .into(),
            ..SqsQueueConfig::default()
        };
        assert_eq!(field(cfg), Err("queue_urls.llm".into()));
        let cfg = SqsQueueConfig {
            queue_urls: [(
                "a".to_string(),
                "http://127.0.0.1:4566/queue/us-east-1/000000000000/a".to_string(),
            )]
            .into(),
            ..SqsQueueConfig::default()
        };
        assert_eq!(field(cfg), Ok(()));
    }

    /// SQS refuses every send to a queue whose type differs from `fifo` (a message
    /// group id to a standard queue, none to a FIFO queue): such a URL is refused.
    #[test]
    fn a_queue_url_of_the_other_queue_type_is_refused_by_its_name() {
        let standard = "http://127.0.0.1:4566/queue/us-east-1/000000000000/mt-q".to_string();
        let fifo = "https://sqs.eu-west-1.amazonaws.com/123456789012/mt-q.fifo".to_string();
        let cfg = |fifo_queues: bool, url: &str| SqsQueueConfig {
            fifo: fifo_queues,
            queue_urls: [("jobs".to_string(), url.to_string())].into(),
            ..SqsQueueConfig::default()
        };
        assert_eq!(field(cfg(false, &standard)), Ok(()));
        assert_eq!(field(cfg(true, &fifo)), Ok(()));
        assert_eq!(field(cfg(true, &format!("{fifo}/"))), Ok(()));
        assert_eq!(field(cfg(true, &standard)), Err("queue_urls.jobs".into()));
        assert_eq!(field(cfg(false, &fifo)), Err("queue_urls.jobs".into()));
        let e = cfg(true, &standard).check().expect_err("standard queue");
        assert!(e.1.contains("fifo = true"), "{}", e.1);
    }

    /// A prefix SQS refuses in every name, or one that leaves no room for a name
    /// with the suffixes the configuration adds, is refused whatever queues are used.
    #[test]
    fn a_prefix_that_can_begin_no_sqs_name_is_refused() {
        for bad in ["dev:", "a.b", "ä-", "p q"] {
            let cfg = SqsQueueConfig {
                queue_prefix: bad.into(),
                ..SqsQueueConfig::default()
            };
            let e = cfg.check().expect_err(bad);
            assert_eq!(e.0, "queue_prefix", "{bad:?}");
            assert!(e.1.contains("letters, digits"), "{}", e.1);
        }
        for good in ["", "marathon-", "Prod_2-"] {
            let cfg = SqsQueueConfig {
                queue_prefix: good.into(),
                ..SqsQueueConfig::default()
            };
            assert_eq!(field(cfg), Ok(()), "{good:?}");
        }
        // 79 characters leave one for a name of an existing standard queue, not more.
        let fits = |prefix_len: usize, create_if_missing: bool, fifo: bool| {
            field(SqsQueueConfig {
                queue_prefix: "p".repeat(prefix_len),
                create_if_missing,
                fifo,
                ..SqsQueueConfig::default()
            })
        };
        assert_eq!(fits(79, false, false), Ok(()));
        assert_eq!(fits(80, false, false), Err("queue_prefix".into()));
        // `<prefix><name>-dlq.fifo`: 80 - 1 - 4 - 5 = 70.
        assert_eq!(fits(70, true, true), Ok(()));
        assert_eq!(fits(71, true, true), Err("queue_prefix".into()));
        assert_eq!(fits(75, true, false), Ok(()));
        assert_eq!(fits(76, true, false), Err("queue_prefix".into()));
        assert_eq!(fits(74, false, true), Ok(()));
        assert_eq!(fits(75, false, true), Err("queue_prefix".into()));
    }

    /// `wait_time` outside SQS's long polls of 1 to 20 s is refused, not clamped.
    #[test]
    fn a_wait_time_outside_one_to_twenty_seconds_is_refused() {
        for ms in [0, 999, 20_001, 60_000, u64::MAX] {
            let cfg = SqsQueueConfig {
                wait_time: Duration::from_millis(ms),
                ..SqsQueueConfig::default()
            };
            let e = cfg.check().expect_err(&ms.to_string());
            assert_eq!(e.0, "wait_time_ms", "{ms}");
            assert!(e.1.contains("from 1000 to 20000 ms"), "{}", e.1);
        }
        for ms in [1000, 1500, 20_000] {
            let cfg = SqsQueueConfig {
                wait_time: Duration::from_millis(ms),
                ..SqsQueueConfig::default()
            };
            assert_eq!(field(cfg), Ok(()), "{ms}");
        }
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
