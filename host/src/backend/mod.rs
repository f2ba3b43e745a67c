//! Result backends: the history of every task (its state, result or error), group bookkeeping,
//! submitted canvases, and worker heartbeats.
//!
//! The [`ResultBackend`] contract is the same for every adapter; the shared conformance suite
//! (`host/tests/all/conformance/backend.rs`) runs unchanged against each of them.
//!
//! - A task's [`TaskStatus`] moves through the closed set of [`TaskState`]s; results are stored
//!   encoded, with the id of their encoder, so any process can decode them. A terminal status
//!   is never overwritten (every adapter writes conditionally), except by an explicit replay.
//! - [`ResultBackend::wait`] returns once a task reaches a terminal state, whichever process
//!   wrote it.
//! - Groups count their finished members atomically, once per member however often it is
//!   reported; creating a group that exists leaves it alone, so a submitter that retries does
//!   not reset its count. (A chord's callback is published once by
//!   [`crate::broker::Broker::publish_unique`], not claimed here.)
//! - A canvas is stored once, by whoever saves it first, and read by every worker advancing it.
//! - Results, groups, canvases and heartbeats expire after their TTL.
//!
//! Adapters: [`memory`] (one process), [`sqlite`] (one host), [`redis`] and [`postgres`] (many
//! hosts).

pub mod memory;
pub mod postgres;
pub mod redis;
pub mod sqlite;

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::codec::Payload;
use crate::storage::StorageError;
use crate::time::Timestamp;

/// How long results are kept when nothing else is configured.
pub const DEFAULT_RESULT_TTL: Duration = Duration::from_secs(24 * 3600);
/// How long group and canvas records are kept.
pub const DEFAULT_GROUP_TTL: Duration = Duration::from_secs(24 * 3600);
/// How long a worker counts as alive after its last heartbeat.
pub const DEFAULT_HEARTBEAT_TTL: Duration = Duration::from_secs(60);

/// Where a task is in its life. Each state names who moves the task out of it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TaskState {
    /// Published and waiting in the broker. A worker receives it next.
    Pending,
    /// A worker has it and is preparing the run. The worker starts it. (Workers do not write
    /// this state: the write would cost every task and show nothing a reader can act on.)
    Received,
    /// Running in the sandbox, recorded once a run has lasted the worker's `started_after`
    /// (and refreshed by progress and heartbeats). The worker records how it ended.
    Started,
    /// Failed or asked to retry, and published again for a later attempt. A worker receives it.
    Retrying,
    /// Terminal: finished with a result.
    Succeeded,
    /// Terminal: failed for good (error, rejection, or retries exhausted).
    Failed,
    /// Terminal: cancelled before or while running, or expired before it ran.
    Revoked,
}

impl TaskState {
    pub const ALL: [TaskState; 7] = [
        TaskState::Pending,
        TaskState::Received,
        TaskState::Started,
        TaskState::Retrying,
        TaskState::Succeeded,
        TaskState::Failed,
        TaskState::Revoked,
    ];

    /// Terminal states never change again.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            TaskState::Succeeded | TaskState::Failed | TaskState::Revoked
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            TaskState::Pending => "pending",
            TaskState::Received => "received",
            TaskState::Started => "started",
            TaskState::Retrying => "retrying",
            TaskState::Succeeded => "succeeded",
            TaskState::Failed => "failed",
            TaskState::Revoked => "revoked",
        }
    }
}

impl fmt::Display for TaskState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for TaskState {
    type Err = String;

    fn from_str(text: &str) -> Result<TaskState, String> {
        TaskState::ALL
            .into_iter()
            .find(|state| state.as_str() == text)
            .ok_or_else(|| {
                let names: Vec<_> = TaskState::ALL.iter().map(|s| s.as_str()).collect();
                format!(
                    "unknown task state `{text}` (use one of {})",
                    names.join(", ")
                )
            })
    }
}

/// How far a running task says it got (`ctx.progress`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskProgress {
    /// 0 to 100.
    pub percent: u8,
    pub message: String,
}

/// Why a task failed, was retried or was revoked.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskFailure {
    /// A short machine-readable kind, e.g. `failed`, `time_limit`, `trap`, `revoked`.
    pub kind: String,
    pub message: String,
}

/// The recorded state of one task.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskStatus {
    pub id: String,
    pub state: TaskState,
    /// The task name, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task: Option<String>,
    /// The encoded result of a succeeded task.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<Payload>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<TaskFailure>,
    /// The last progress the running task reported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<TaskProgress>,
    /// The attempt this state belongs to; 1 for the first run.
    pub attempt: u32,
    /// The worker that wrote this state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker: Option<String>,
    /// sha256 of the component (the task version) that ran this attempt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub component: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub root_id: Option<String>,
    pub updated_at: Timestamp,
}

impl TaskStatus {
    /// A status in `state` at the first attempt, stamped now.
    pub fn new(id: impl Into<String>, state: TaskState) -> TaskStatus {
        TaskStatus {
            id: id.into(),
            state,
            task: None,
            result: None,
            error: None,
            progress: None,
            attempt: 1,
            worker: None,
            component: None,
            group_id: None,
            parent_id: None,
            root_id: None,
            updated_at: Timestamp::now(),
        }
    }

    /// The order of [`ResultBackend::list`]: most recently updated first, then by id.
    pub fn newest_first(a: &TaskStatus, b: &TaskStatus) -> std::cmp::Ordering {
        b.updated_at
            .cmp(&a.updated_at)
            .then_with(|| a.id.cmp(&b.id))
    }

    pub(crate) fn to_json(&self) -> String {
        serde_json::to_string(self).expect("a status always serialises")
    }

    pub(crate) fn from_json(id: &str, text: &str) -> Result<TaskStatus, StorageError> {
        serde_json::from_str(text).map_err(|e| StorageError::corrupt(format!("status of {id}"), e))
    }
}

/// Whether a wait for this status is over: it reached a terminal state.
pub(crate) fn is_final(status: &Option<TaskStatus>) -> bool {
    status.as_ref().is_some_and(|s| s.state.is_terminal())
}

/// `statuses` in order, cut into slices of at most `most` in which no task appears twice:
/// one statement cannot write a row twice.
pub(crate) fn distinct_slices(statuses: &[TaskStatus], most: usize) -> Vec<&[TaskStatus]> {
    let mut slices = Vec::new();
    let mut start = 0;
    let mut ids = std::collections::HashSet::new();
    for (at, status) in statuses.iter().enumerate() {
        if at - start == most || !ids.insert(status.id.as_str()) {
            slices.push(&statuses[start..at]);
            start = at;
            ids.clear();
            ids.insert(status.id.as_str());
        }
    }
    if start < statuses.len() {
        slices.push(&statuses[start..]);
    }
    slices
}

/// Which statuses [`ResultBackend::list`] returns, most recently updated first.
#[derive(Clone, Debug)]
pub struct StatusQuery {
    pub state: Option<TaskState>,
    pub task: Option<String>,
    pub limit: usize,
}

impl Default for StatusQuery {
    fn default() -> StatusQuery {
        StatusQuery {
            state: None,
            task: None,
            limit: 100,
        }
    }
}

impl StatusQuery {
    pub(crate) fn selects(&self, status: &TaskStatus) -> bool {
        self.state.is_none_or(|state| state == status.state)
            && self
                .task
                .as_ref()
                .is_none_or(|task| status.task.as_ref() == Some(task))
    }
}

/// A group of tasks, and which of them have finished.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupRecord {
    pub id: String,
    /// How many members the group has.
    pub size: u32,
    /// Member task ids that have finished, in the order they were reported.
    pub finished: Vec<String>,
    pub created_at: Timestamp,
}

impl GroupRecord {
    pub fn new(id: impl Into<String>, size: u32) -> GroupRecord {
        GroupRecord {
            id: id.into(),
            size,
            finished: Vec::new(),
            created_at: Timestamp::now(),
        }
    }

    pub fn is_complete(&self) -> bool {
        self.finished.len() as u64 >= u64::from(self.size)
    }
}

/// Counts after a member was reported finished.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GroupProgress {
    pub finished: u32,
    pub size: u32,
}

impl GroupProgress {
    pub fn is_complete(self) -> bool {
        self.finished >= self.size
    }
}

/// A submitted canvas (chain, group, chord): its validated tree as JSON, stored once by the
/// submitter and read by every worker that advances it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CanvasRecord {
    pub id: String,
    /// The canvas tree, JSON.
    pub tree: String,
    pub created_at: Timestamp,
}

/// What a worker says about itself, every few seconds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerHeartbeat {
    pub worker_id: String,
    pub hostname: String,
    pub pid: u32,
    pub queues: Vec<String>,
    /// Broadcasts whose tasks the worker runs.
    #[serde(default)]
    pub broadcasts: Vec<String>,
    /// Run slots now (they change when the worker autoscales).
    pub concurrency: u32,
    /// Tasks running now.
    pub in_flight: u32,
    /// Tasks finished since the worker started.
    pub processed: u64,
    pub started_at: Timestamp,
    pub last_seen: Timestamp,
}

/// Task history. See the module documentation for the guarantees.
#[async_trait]
pub trait ResultBackend: Send + Sync {
    /// Records a task's status, replacing the previous one unless that one is terminal:
    /// a terminal status never changes (a late or duplicate writer cannot undo a result);
    /// only [`ResultBackend::replace`] overrides it. Returns whether the status was written.
    /// It expires after `ttl`, or the backend's default result TTL.
    async fn set(&self, status: &TaskStatus, ttl: Option<Duration>) -> Result<bool, StorageError> {
        let written = self.set_many(std::slice::from_ref(status), ttl).await?;
        Ok(written.first() == Some(&true))
    }

    /// [`ResultBackend::set`] for many statuses at once, in one round trip or transaction;
    /// whether each was written.
    async fn set_many(
        &self,
        statuses: &[TaskStatus],
        ttl: Option<Duration>,
    ) -> Result<Vec<bool>, StorageError>;

    /// Records a status even over a terminal one. Only for an explicit replay (a dead letter
    /// published again), which starts the task's history over.
    async fn replace(&self, status: &TaskStatus, ttl: Option<Duration>)
    -> Result<(), StorageError>;

    /// The current status, unless unknown or expired.
    async fn get(&self, id: &str) -> Result<Option<TaskStatus>, StorageError>;

    /// The current statuses of many tasks at once, in the order of `ids`.
    async fn get_many(&self, ids: &[String]) -> Result<Vec<Option<TaskStatus>>, StorageError> {
        let mut found = Vec::with_capacity(ids.len());
        for id in ids {
            found.push(self.get(id).await?);
        }
        Ok(found)
    }

    /// Waits until the task reaches a terminal state, at most `timeout`, and returns its status
    /// then: terminal, or the last one seen if the wait timed out (`None` if it never had one).
    async fn wait(&self, id: &str, timeout: Duration) -> Result<Option<TaskStatus>, StorageError>;

    /// Statuses matching `query`, most recently updated first.
    async fn list(&self, query: &StatusQuery) -> Result<Vec<TaskStatus>, StorageError>;

    /// Creates the group unless one with its id exists; a repeated create leaves the existing
    /// record (and its finished members) alone. Returns whether it created it. The group
    /// expires after `ttl` or the default group TTL; an expired one counts as absent.
    async fn create_group(
        &self,
        group: &GroupRecord,
        ttl: Option<Duration>,
    ) -> Result<bool, StorageError>;

    /// The group, unless unknown or expired.
    async fn get_group(&self, id: &str) -> Result<Option<GroupRecord>, StorageError>;

    /// Records that member `task_id` finished, atomically. Reporting the same member twice
    /// counts it once. Fails with [`StorageError::NotFound`] if the group is unknown.
    async fn group_member_finished(
        &self,
        group_id: &str,
        task_id: &str,
    ) -> Result<GroupProgress, StorageError>;

    /// Stores the canvas unless one with its id exists; returns the canvas stored before (left
    /// unchanged) if there was one. Expires after `ttl` or the group TTL.
    async fn save_canvas(
        &self,
        canvas: &CanvasRecord,
        ttl: Option<Duration>,
    ) -> Result<Option<CanvasRecord>, StorageError>;

    /// The canvas, unless unknown or expired.
    async fn get_canvas(&self, id: &str) -> Result<Option<CanvasRecord>, StorageError>;

    /// Records a worker heartbeat; the worker counts as gone after `ttl` or the default
    /// heartbeat TTL.
    async fn heartbeat(
        &self,
        heartbeat: &WorkerHeartbeat,
        ttl: Option<Duration>,
    ) -> Result<(), StorageError>;

    /// Heartbeats of the workers alive now, sorted by worker id.
    async fn workers(&self) -> Result<Vec<WorkerHeartbeat>, StorageError>;
}

/// Expiry times of the kinds of records.
#[derive(Clone, Copy, Debug)]
pub struct Ttls {
    /// `None` keeps results until they are deleted.
    pub result: Option<Duration>,
    /// Groups and canvases.
    pub group: Duration,
    pub heartbeat: Duration,
}

impl Default for Ttls {
    fn default() -> Ttls {
        Ttls {
            result: Some(DEFAULT_RESULT_TTL),
            group: DEFAULT_GROUP_TTL,
            heartbeat: DEFAULT_HEARTBEAT_TTL,
        }
    }
}

impl Ttls {
    pub(crate) fn result_expiry(&self, ttl: Option<Duration>, now: Timestamp) -> Option<Timestamp> {
        ttl.or(self.result).map(|ttl| now.saturating_add(ttl))
    }
}
