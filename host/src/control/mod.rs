//! The control plane: commands to running workers and the event stream, over the broker's
//! broadcast channels.
//!
//! Every channel lives under a control namespace (`STEM_CONTROL_NAMESPACE`, default `stem`),
//! inside the broker's own namespace:
//!
//! - `NS.control`: [`Request`]s, which every worker hears and answers if its id matches the
//!   request's worker filter. Revocations travel here too, so a running task stops at once
//!   instead of at the next poll of the revoke store.
//! - `NS.reply.REQUEST-ID`: one [`Reply`] per worker, read by whoever sent the request
//!   ([`request`] collects them until every expected worker answered or the timeout passed).
//! - `NS.events`: [`events`], the task and worker lifecycle as it happens.
//!
//! Broadcast is fire and forget: a worker that is not subscribed when a request is sent never
//! sees it. That is what control commands want (ask whoever is alive now); anything that must
//! reach a worker later (broadcast tasks, revocations) is also stored where that worker reads
//! it.

pub mod events;
pub mod revoke;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::broker::Broker;
use crate::routing::glob_matches;
use crate::storage::StorageError;
use crate::time::Timestamp;

/// The control namespace used when none is configured.
pub const DEFAULT_CONTROL_NAMESPACE: &str = "stem";

/// The names of one control namespace's channels.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Channels {
    namespace: String,
}

impl Default for Channels {
    fn default() -> Channels {
        Channels::new(DEFAULT_CONTROL_NAMESPACE)
    }
}

impl Channels {
    pub fn new(namespace: &str) -> Channels {
        Channels {
            namespace: namespace.to_owned(),
        }
    }

    pub fn control(&self) -> String {
        format!("{}.control", self.namespace)
    }

    pub fn reply(&self, request_id: &str) -> String {
        format!("{}.reply.{request_id}", self.namespace)
    }

    pub fn events(&self) -> String {
        format!("{}.events", self.namespace)
    }
}

/// How a worker stops, from the gentlest. Every mode first stops fetching and gives back the
/// deliveries still waiting for a run slot.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "snake_case")]
pub enum ShutdownMode {
    /// Running tasks finish (each within its own time limit). SIGTERM.
    Warm,
    /// Running tasks get the shutdown grace, then are stopped and given back. SIGINT.
    Soft,
    /// Running tasks are stopped at once and given back. SIGQUIT.
    Hard,
}

/// What `inspect` asks about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Inspect {
    /// The deliveries a worker holds: running, or waiting for a slot.
    Active,
    /// The tasks a worker can run, from the registry, and which it has compiled.
    Registered,
    /// The revocations a worker has applied recently.
    Revoked,
}

/// A command for workers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "snake_case")]
pub enum Command {
    Ping,
    Stats,
    Inspect {
        what: Inspect,
    },
    Shutdown {
        mode: ShutdownMode,
    },
    /// Stop fetching from these queues until resumed.
    Pause {
        queues: Vec<String>,
    },
    Resume {
        queues: Vec<String>,
    },
    /// Start or stop sending events (Celery's `enable_events` / `disable_events`).
    Events {
        enabled: bool,
    },
    /// Revoked tasks (already in the revoke store); no reply.
    Revoke {
        task_ids: Vec<String>,
        terminate: bool,
    },
}

impl Command {
    /// Whether workers answer it.
    pub fn wants_reply(&self) -> bool {
        !matches!(self, Command::Revoke { .. })
    }
}

/// A command as it travels on `NS.control`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Request {
    pub id: String,
    pub sent_at: Timestamp,
    /// Worker ids or globs (`host-a:*`); empty for every worker.
    #[serde(default)]
    pub workers: Vec<String>,
    #[serde(flatten)]
    pub command: Command,
}

impl Request {
    pub fn new(command: Command, workers: Vec<String>) -> Request {
        Request {
            id: uuid::Uuid::new_v4().simple().to_string(),
            sent_at: Timestamp::now(),
            workers,
            command,
        }
    }

    /// Whether the worker named `worker_id` is addressed.
    pub fn addresses(&self, worker_id: &str) -> bool {
        self.workers.is_empty()
            || self
                .workers
                .iter()
                .any(|pattern| pattern == worker_id || glob_matches(pattern, worker_id))
    }
}

/// One worker's answer.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Reply {
    pub request_id: String,
    pub worker: String,
    /// When the worker answered, by its clock.
    pub replied_at: Timestamp,
    /// `false` when the worker could not do what was asked; `body` then says why.
    pub ok: bool,
    pub body: serde_json::Value,
}

/// What [`request`] collected.
#[derive(Clone, Debug, Serialize)]
pub struct Replies {
    /// When the request was sent, by this host's clock.
    pub sent_at: Timestamp,
    pub replies: Vec<Reply>,
    /// Workers expected to answer that did not, within the timeout.
    pub missing: Vec<String>,
    /// From sending the request to the last reply (or the timeout).
    pub elapsed_ms: u64,
}

/// Sends `request` and collects replies until every worker in `expected` answered (when
/// `expected` is given) or `timeout` passed.
pub async fn request(
    broker: &Arc<dyn Broker>,
    channels: &Channels,
    request: &Request,
    expected: Option<BTreeSet<String>>,
    timeout: Duration,
) -> Result<Replies, StorageError> {
    let text = serde_json::to_string(request).expect("a request always serialises");
    if !request.command.wants_reply() {
        broker.broadcast(&channels.control(), &text).await?;
        return Ok(Replies {
            sent_at: request.sent_at,
            replies: Vec::new(),
            missing: Vec::new(),
            elapsed_ms: 0,
        });
    }
    // Subscribed before sending, so no reply is missed.
    let mut subscription = broker.subscribe(&channels.reply(&request.id)).await?;
    let started = Instant::now();
    broker.broadcast(&channels.control(), &text).await?;
    let mut replies: Vec<Reply> = Vec::new();
    let mut waiting_for = expected.clone();
    let deadline = tokio::time::Instant::now() + timeout;
    let mut last = Duration::ZERO;
    while waiting_for.as_ref().is_none_or(|set| !set.is_empty()) {
        let message = match tokio::time::timeout_at(deadline, subscription.recv()).await {
            Ok(Some(message)) => message,
            Ok(None) | Err(_) => break,
        };
        let Ok(reply) = serde_json::from_str::<Reply>(&message) else {
            tracing::warn!("ignoring an unreadable control reply");
            continue;
        };
        if reply.request_id != request.id || replies.iter().any(|r| r.worker == reply.worker) {
            continue;
        }
        last = started.elapsed();
        if let Some(set) = waiting_for.as_mut() {
            set.remove(&reply.worker);
        }
        replies.push(reply);
    }
    let elapsed = if waiting_for.as_ref().is_some_and(BTreeSet::is_empty) {
        last
    } else {
        started.elapsed()
    };
    replies.sort_by(|a, b| a.worker.cmp(&b.worker));
    Ok(Replies {
        sent_at: request.sent_at,
        replies,
        missing: waiting_for.map(Vec::from_iter).unwrap_or_default(),
        elapsed_ms: u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_and_address_by_id_or_glob() {
        let request = Request::new(
            Command::Pause {
                queues: vec!["reports".into()],
            },
            vec!["host-a:*".into(), "host-b:7".into()],
        );
        let text = serde_json::to_string(&request).unwrap();
        assert!(text.contains(r#""command":"pause""#), "{text}");
        let back: Request = serde_json::from_str(&text).unwrap();
        assert_eq!(back.command, request.command);
        assert!(back.addresses("host-a:12"));
        assert!(back.addresses("host-b:7"));
        assert!(!back.addresses("host-b:8"));
        assert!(Request::new(Command::Ping, Vec::new()).addresses("anyone"));
    }

    #[test]
    fn shutdown_modes_order_from_gentlest() {
        assert!(ShutdownMode::Warm < ShutdownMode::Soft);
        assert!(ShutdownMode::Soft < ShutdownMode::Hard);
        let text = serde_json::to_string(&Command::Shutdown {
            mode: ShutdownMode::Hard,
        })
        .unwrap();
        assert_eq!(text, r#"{"command":"shutdown","mode":"hard"}"#);
    }
}
