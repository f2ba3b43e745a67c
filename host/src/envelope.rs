//! The task envelope: everything a broker carries about one task to be run.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::codec::Payload;
use crate::task::is_valid_task_name;
use crate::time::Timestamp;

/// The queue a task goes to when neither the task nor the producer names one.
pub const DEFAULT_QUEUE: &str = "default";

/// Highest priority; 0 is the lowest and higher runs first.
pub const MAX_PRIORITY: u8 = 9;

/// One task to run, as producers publish it and brokers store it (serialised as JSON).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    /// Unique per task; retries and redeliveries keep it.
    pub id: String,
    /// The registered task name, e.g. `reports.generate`.
    pub task: String,
    /// The encoded JSON arguments.
    pub args: Payload,
    pub queue: String,
    /// 0–9, higher first.
    pub priority: u8,
    /// Not delivered before this time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_before: Option<Timestamp>,
    /// 1 for the first run; a retry publishes the envelope again with the next attempt.
    pub attempt: u32,
    /// Retries allowed after the first attempt; `None` uses the task's declared option.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_retries: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub soft_time_limit_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_limit_ms: Option<u64>,
    /// A task still queued after this time is not run; it is recorded as revoked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<Timestamp>,
    /// The encoder for the result; `None` uses the task's or the worker's default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result_encoder: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
    /// The task that enqueued this one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent_id: Option<String>,
    /// The first task of the tree this one belongs to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub root_id: Option<String>,
    /// How many sub-task enqueues lead from the root task to this one: 0 for a task a
    /// producer enqueued, the parent's depth + 1 for a sub-task. Workers cap it.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub depth: u32,
    /// The group or chord this task is a member of.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group_id: Option<String>,
    pub created_at: Timestamp,
    /// `KEY-ID:BASE64`, when the producer signs ([`crate::signing`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<String>,
}

fn is_zero(depth: &u32) -> bool {
    *depth == 0
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EnvelopeError {
    #[error("invalid task name `{0}`: use letters, digits, `.`, `_`, `-` and `:`")]
    TaskName(String),
    #[error("priority {0} is out of range: use 0 to 9")]
    Priority(u8),
    #[error("the task id is empty")]
    EmptyId,
    #[error("invalid task id: use at most {MAX_TASK_ID_LEN} bytes and no control characters")]
    TaskId,
    #[error("the queue name is empty")]
    EmptyQueue,
    #[error("attempt must start at 1")]
    Attempt,
    #[error(
        "invalid queue name `{0}`: use 1 to {MAX_QUEUE_NAME_LEN} letters, digits, `.`, `_` and `-`"
    )]
    QueueName(String),
    #[error("a retry cannot move a task from queue `{from}` to queue `{to}`")]
    QueueChanged { from: String, to: String },
}

/// Longest task id, in bytes.
pub const MAX_TASK_ID_LEN: usize = 255;

/// Longest queue name.
pub const MAX_QUEUE_NAME_LEN: usize = 128;

/// Whether `name` is a valid queue name: 1 to [`MAX_QUEUE_NAME_LEN`] ASCII letters, digits,
/// `.`, `_` and `-`. Adapters build storage keys from queue names with `:` as separator, so
/// no two valid names can share a key.
pub fn is_valid_queue_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_QUEUE_NAME_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

impl Envelope {
    /// A first attempt on the default queue at priority 0, with a fresh id.
    pub fn new(task: impl Into<String>, args: Payload) -> Envelope {
        Envelope {
            id: uuid::Uuid::new_v4().to_string(),
            task: task.into(),
            args,
            queue: DEFAULT_QUEUE.to_owned(),
            priority: 0,
            not_before: None,
            attempt: 1,
            max_retries: None,
            soft_time_limit_ms: None,
            time_limit_ms: None,
            expires_at: None,
            result_encoder: None,
            headers: BTreeMap::new(),
            parent_id: None,
            root_id: None,
            depth: 0,
            group_id: None,
            created_at: Timestamp::now(),
            signature: None,
        }
    }

    pub fn with_queue(mut self, queue: impl Into<String>) -> Envelope {
        self.queue = queue.into();
        self
    }

    pub fn with_priority(mut self, priority: u8) -> Envelope {
        self.priority = priority;
        self
    }

    pub fn with_id(mut self, id: impl Into<String>) -> Envelope {
        self.id = id.into();
        self
    }

    /// Delays delivery by `delay` from now.
    pub fn delayed(mut self, delay: Duration) -> Envelope {
        self.not_before = Some(Timestamp::now().saturating_add(delay));
        self
    }

    /// Checks what brokers rely on; they refuse to publish an envelope that fails it.
    pub fn validate(&self) -> Result<(), EnvelopeError> {
        if self.id.is_empty() {
            return Err(EnvelopeError::EmptyId);
        }
        // Ids become storage keys and SQL text, which refuses NUL.
        if self.id.len() > MAX_TASK_ID_LEN || self.id.chars().any(char::is_control) {
            return Err(EnvelopeError::TaskId);
        }
        if !is_valid_task_name(&self.task) {
            return Err(EnvelopeError::TaskName(self.task.clone()));
        }
        if self.queue.is_empty() {
            return Err(EnvelopeError::EmptyQueue);
        }
        if !is_valid_queue_name(&self.queue) {
            return Err(EnvelopeError::QueueName(self.queue.clone()));
        }
        if self.priority > MAX_PRIORITY {
            return Err(EnvelopeError::Priority(self.priority));
        }
        if self.attempt == 0 {
            return Err(EnvelopeError::Attempt);
        }
        Ok(())
    }

    /// The stored form.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("an envelope always serialises")
    }

    pub fn from_json(text: &str) -> Result<Envelope, serde_json::Error> {
        serde_json::from_str(text)
    }

    /// When the envelope may first be delivered.
    pub fn ready_at(&self, now: Timestamp) -> Timestamp {
        self.not_before.map_or(now, |at| at.max(now))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_as_json_and_omits_empty_fields() {
        let mut envelope = Envelope::new("reports.generate", Payload::json(r#"{"a":1}"#))
            .with_queue("reports")
            .with_priority(8);
        envelope.headers.insert("trace".into(), "abc".into());
        let text = envelope.to_json();
        assert!(!text.contains("parent_id"), "{text}");
        assert_eq!(Envelope::from_json(&text).unwrap(), envelope);
    }

    #[test]
    fn validation_names_the_problem() {
        let ok = Envelope::new("hello.add", Payload::json("{}"));
        assert_eq!(ok.validate(), Ok(()));
        assert_eq!(
            ok.clone().with_priority(10).validate(),
            Err(EnvelopeError::Priority(10))
        );
        assert_eq!(
            Envelope::new("bad name", Payload::json("{}")).validate(),
            Err(EnvelopeError::TaskName("bad name".into()))
        );
        assert_eq!(
            ok.clone().with_queue("").validate(),
            Err(EnvelopeError::EmptyQueue)
        );
        assert_eq!(
            ok.clone().with_queue("reports:data").validate(),
            Err(EnvelopeError::QueueName("reports:data".into()))
        );
        assert_eq!(
            ok.clone().with_queue("x".repeat(129)).validate(),
            Err(EnvelopeError::QueueName("x".repeat(129)))
        );
        assert_eq!(
            ok.clone().with_queue("media-2.thumbs_v1").validate(),
            Ok(())
        );
        assert_eq!(
            ok.clone().with_id("").validate(),
            Err(EnvelopeError::EmptyId)
        );
        assert_eq!(
            ok.clone().with_id("a\0b").validate(),
            Err(EnvelopeError::TaskId)
        );
        assert_eq!(
            ok.clone()
                .with_id("x".repeat(MAX_TASK_ID_LEN + 1))
                .validate(),
            Err(EnvelopeError::TaskId)
        );
    }
}
