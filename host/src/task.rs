//! What a task is, independent of where it runs: its declared options and its definition.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::capabilities::Capabilities;

/// Options a task declares in its component (`describe`); an enqueue may override them.
/// `None` leaves the choice to the worker's configuration.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub struct TaskOptions {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub queue: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub priority: Option<u8>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_retries: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_backoff_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_backoff_max_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_jitter: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub soft_time_limit_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hard_time_limit_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory_limit_bytes: Option<u64>,
    /// Payload encoder of the arguments (see [`crate::codec`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub args_encoder: Option<String>,
    /// Payload encoder of the result.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub result_encoder: Option<String>,
}

impl TaskOptions {
    pub fn soft_time_limit(&self) -> Option<Duration> {
        self.soft_time_limit_ms.map(Duration::from_millis)
    }

    pub fn hard_time_limit(&self) -> Option<Duration> {
        self.hard_time_limit_ms.map(Duration::from_millis)
    }
}

/// A task as a component declares it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskDefinition {
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    pub options: TaskOptions,
    /// What the task needs beyond computing; a run gets only what is also granted.
    #[serde(default, skip_serializing_if = "Capabilities::is_empty")]
    pub capabilities: Capabilities,
}

/// One execution of a task, as the guest receives it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Invocation {
    pub id: String,
    pub name: String,
    /// JSON-encoded arguments.
    pub args: String,
    /// 1 for the first run.
    pub attempt: u32,
    pub headers: Vec<(String, String)>,
}

impl Invocation {
    /// A first attempt with a fresh id and no headers.
    pub fn new(name: impl Into<String>, args: impl Into<String>) -> Self {
        Invocation {
            id: uuid::Uuid::new_v4().to_string(),
            name: name.into(),
            args: args.into(),
            attempt: 1,
            headers: Vec::new(),
        }
    }
}

/// Severity of a guest log line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    Trace,
    Debug,
    Info,
    Warn,
    Error,
}

/// Task names are dotted identifiers such as `reports.generate`: letters, digits, `.`, `_`,
/// `-` and `:`, at most 200 bytes.
pub fn is_valid_task_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 200
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b':'))
}

/// A token-bucket rate such as `10/s`: `count` tasks per `period`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateLimit {
    pub count: u32,
    pub period: Duration,
}

impl RateLimit {
    /// Parses `N/s`, `N/m` or `N/h` with N > 0.
    pub fn parse(text: &str) -> Option<RateLimit> {
        let (count, per) = text.split_once('/')?;
        let count: u32 = count.trim().parse().ok().filter(|n| *n > 0)?;
        let period = match per.trim() {
            "s" => Duration::from_secs(1),
            "m" => Duration::from_secs(60),
            "h" => Duration::from_secs(3600),
            _ => return None,
        };
        Some(RateLimit { count, period })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn task_names() {
        assert!(is_valid_task_name("reports.generate"));
        assert!(is_valid_task_name("billing:email-receipt_v2"));
        assert!(!is_valid_task_name(""));
        assert!(!is_valid_task_name("has space"));
        assert!(!is_valid_task_name("slash/name"));
        assert!(!is_valid_task_name(&"x".repeat(201)));
    }

    #[test]
    fn rate_limits() {
        assert_eq!(
            RateLimit::parse("10/s"),
            Some(RateLimit {
                count: 10,
                period: Duration::from_secs(1)
            })
        );
        assert_eq!(
            RateLimit::parse("100/m").map(|r| r.period.as_secs()),
            Some(60)
        );
        assert_eq!(RateLimit::parse("5/h").map(|r| r.count), Some(5));
        assert_eq!(RateLimit::parse("0/s"), None);
        assert_eq!(RateLimit::parse("10/d"), None);
        assert_eq!(RateLimit::parse("ten/s"), None);
    }
}
