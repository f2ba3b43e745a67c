//! The schedule store: Beat's periodic entries, shared by every Beat instance.

pub mod memory;
pub mod postgres;
pub mod redis;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::storage::StorageError;
use crate::time::Timestamp;

/// One periodic task.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScheduleEntry {
    pub id: String,
    pub task: String,
    /// JSON arguments.
    pub args: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue: Option<String>,
    /// When it fires, e.g. `every 5m` or a cron expression; Beat interprets it.
    pub spec: String,
    pub enabled: bool,
    pub next_run_at: Timestamp,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_run_at: Option<Timestamp>,
    pub total_runs: u64,
}

impl ScheduleEntry {
    /// The stored form, for adapters that keep an entry as text.
    pub(crate) fn to_json(&self) -> String {
        serde_json::to_string(self).expect("a schedule entry always serialises")
    }

    pub(crate) fn from_json(text: &str) -> Result<ScheduleEntry, StorageError> {
        serde_json::from_str(text).map_err(|e| StorageError::corrupt("schedule entry", e))
    }
}

/// The enabled entries due at `now`, earliest first (then by id), at most `limit`.
pub(crate) fn select_due(
    entries: impl IntoIterator<Item = ScheduleEntry>,
    now: Timestamp,
    limit: usize,
) -> Vec<ScheduleEntry> {
    let mut due: Vec<ScheduleEntry> = entries
        .into_iter()
        .filter(|entry| entry.enabled && entry.next_run_at <= now)
        .collect();
    due.sort_by(|a, b| {
        a.next_run_at
            .cmp(&b.next_run_at)
            .then_with(|| a.id.cmp(&b.id))
    });
    due.truncate(limit);
    due
}

/// Schedule entries. Several Beats may share a store: [`ScheduleStore::mark_run`] lets only
/// one of them record each firing.
#[async_trait]
pub trait ScheduleStore: Send + Sync {
    /// Adds an entry or replaces the one with the same id.
    async fn upsert(&self, entry: &ScheduleEntry) -> Result<(), StorageError>;

    async fn get(&self, id: &str) -> Result<Option<ScheduleEntry>, StorageError>;

    /// Every entry, by id.
    async fn list(&self) -> Result<Vec<ScheduleEntry>, StorageError>;

    /// Deletes an entry; `false` if there was none.
    async fn remove(&self, id: &str) -> Result<bool, StorageError>;

    /// Enabled entries due at `now`, earliest first, at most `limit`.
    async fn due(&self, now: Timestamp, limit: usize) -> Result<Vec<ScheduleEntry>, StorageError>;

    /// Records a firing, if the entry's next run is still `expected_next_run`; `false` when
    /// another Beat recorded it first (or the entry is gone).
    async fn mark_run(
        &self,
        id: &str,
        expected_next_run: Timestamp,
        ran_at: Timestamp,
        next_run_at: Timestamp,
    ) -> Result<bool, StorageError>;
}
