use serde::{Deserialize, Serialize};
use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Longest accepted workflow id, in bytes.
pub const MAX_WORKFLOW_ID_LEN: usize = 200;

/// Why a string is not a valid [`WorkflowId`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IdError {
    /// The id is empty.
    #[error("workflow id must not be empty")]
    Empty,
    /// The id is longer than [`MAX_WORKFLOW_ID_LEN`].
    #[error("workflow id is {0} bytes long; at most {MAX_WORKFLOW_ID_LEN} are allowed")]
    TooLong(usize),
    /// The id holds a character outside `A-Z a-z 0-9 - _ . : @`.
    #[error("workflow id contains {0:?}; only A-Z a-z 0-9 and - _ . : @ are allowed")]
    BadChar(char),
}

/// The id of one workflow execution: 1 to 200 characters from `A-Z a-z 0-9 - _ . : @`.
///
/// The safe set keeps ids usable unescaped in URLs, Redis keys (no `{`/`}`
/// hash-tag braces) and queue message attributes.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct WorkflowId(String);

impl WorkflowId {
    /// Validates `s` as a workflow id.
    ///
    /// # Errors
    /// [`IdError`] when `s` is empty, too long or has a character outside the safe set.
    pub fn parse(s: impl Into<String>) -> Result<Self, IdError> {
        let s = s.into();
        if s.is_empty() {
            return Err(IdError::Empty);
        }
        if s.len() > MAX_WORKFLOW_ID_LEN {
            return Err(IdError::TooLong(s.len()));
        }
        if let Some(c) = s
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':' | '@')))
        {
            return Err(IdError::BadChar(c));
        }
        Ok(Self(s))
    }

    /// A fresh random id (a UUID v4).
    #[must_use]
    pub fn random() -> Self {
        Self(uuid::Uuid::new_v4().to_string())
    }

    /// The id as a string slice.
    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl<'de> Deserialize<'de> for WorkflowId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::parse(s).map_err(serde::de::Error::custom)
    }
}

impl fmt::Display for WorkflowId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::str::FromStr for WorkflowId {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, IdError> {
        Self::parse(s)
    }
}

/// The sequence number of an event in one history: 1, 2, 3, … with no gaps; 0 means "none yet".
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Seq(pub u64);

impl Seq {
    /// Before the first event.
    pub const ZERO: Seq = Seq(0);

    /// The next sequence number.
    #[must_use]
    pub fn next(self) -> Seq {
        Seq(self.0 + 1)
    }
}

impl fmt::Display for Seq {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Wall-clock time as milliseconds since the Unix epoch (UTC).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Timestamp(pub u64);

impl Timestamp {
    /// The current system time.
    #[must_use]
    pub fn now() -> Self {
        let ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or(0);
        Timestamp(u64::try_from(ms).unwrap_or(u64::MAX))
    }

    /// This time plus `d`, saturating.
    #[must_use]
    pub fn plus(self, d: Duration) -> Self {
        Timestamp(
            self.0
                .saturating_add(u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
        )
    }

    /// How long after `earlier` this time is (zero if it is not later).
    #[must_use]
    pub fn since(self, earlier: Timestamp) -> Duration {
        Duration::from_millis(self.0.saturating_sub(earlier.0))
    }

    /// Milliseconds since the epoch.
    #[must_use]
    pub fn as_millis(self) -> u64 {
        self.0
    }
}

impl std::ops::Add<Duration> for Timestamp {
    type Output = Timestamp;
    fn add(self, d: Duration) -> Timestamp {
        self.plus(d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workflow_ids_are_validated() {
        assert!(WorkflowId::parse("order-42:v1@eu.x_y").is_ok());
        assert_eq!(WorkflowId::parse(""), Err(IdError::Empty));
        assert_eq!(WorkflowId::parse("a{b}"), Err(IdError::BadChar('{')));
        assert_eq!(WorkflowId::parse("a b"), Err(IdError::BadChar(' ')));
        assert!(matches!(
            WorkflowId::parse("x".repeat(201)),
            Err(IdError::TooLong(201))
        ));
        assert!(serde_json::from_str::<WorkflowId>("\"bad/id\"").is_err());
    }
}
