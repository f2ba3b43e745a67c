//! The schedule store: Beat's entries, shared by every Beat instance and by the `schedule`
//! commands.
//!
//! Every write is a compare-and-set on the entry's [`ScheduleEntry::revision`]: a Beat that
//! records a firing, an operator who disables an entry and a `schedule apply` that edits it
//! each write only over the revision they read, so none of them undoes another's change, and of
//! several Beats that fire the same slot exactly one records it.

pub mod memory;
pub mod postgres;
pub mod redis;
pub mod sqlite;

use std::collections::BTreeMap;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use jiff::tz::TimeZone;

use crate::schedule::{Schedule, time_zone};
use crate::storage::StorageError;
use crate::time::Timestamp;

/// One scheduled task: what the operator defined, and what Beat keeps about its firings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ScheduleEntry {
    pub id: String,
    pub definition: EntryDefinition,
    pub state: EntryState,
    /// Bumped by every write; 0 for an entry not stored yet.
    #[serde(default)]
    pub revision: u64,
}

/// What to enqueue and when, as the schedule file says.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EntryDefinition {
    pub task: String,
    /// JSON text.
    pub args: String,
    pub schedule: Schedule,
    /// IANA time zone of a cron schedule and of times written without an offset; UTC if unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timezone: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<u8>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_retries: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_limit_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub soft_time_limit_ms: Option<u64>,
    /// Each firing's task expires this long after its slot if no worker ran it by then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
    pub enabled: bool,
    /// Each firing's task is held back by up to this long (the same amount on every Beat).
    #[serde(default)]
    pub jitter_ms: u64,
    /// The entry fires no slot after this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expire_at: Option<Timestamp>,
    #[serde(default)]
    pub catch_up: CatchUp,
    #[serde(default)]
    pub overlap: Overlap,
    /// Free-form data for the operator; Beat ignores it.
    #[serde(default, skip_serializing_if = "serde_json::Map::is_empty")]
    pub meta: serde_json::Map<String, serde_json::Value>,
}

/// What Beat does with slots missed while no Beat ran (or the entry's Beat was down).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CatchUp {
    /// Missed slots are dropped; the entry fires again at its next slot.
    None,
    /// However many slots were missed, the entry fires once (for the latest of them).
    #[default]
    One,
    /// Every missed slot fires, oldest first.
    All,
}

/// Whether a slot fires while the previous firing's task has not finished.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Overlap {
    #[default]
    Allow,
    /// The slot is skipped (and counted) while the previous task is pending or running.
    Skip,
}

/// What Beat records about an entry's firings.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EntryState {
    /// The next slot to fire; `None` once nothing is left (a one-shot that fired, an end
    /// passed).
    pub next_run_at: Option<Timestamp>,
    /// Where an interval without `start_at` counts from: when the entry was applied.
    pub anchor: Timestamp,
    #[serde(default)]
    pub total_run_count: u64,
    /// Slots not fired: skipped for overlap, or dropped by the catch-up policy.
    #[serde(default)]
    pub skipped_count: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_run_at: Option<Timestamp>,
    /// The slot of the last firing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_slot: Option<Timestamp>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_task_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// How late the last firing was published after its slot, in milliseconds.
    #[serde(default)]
    pub drift_ms: u64,
}

impl EntryDefinition {
    /// An enabled entry enqueueing `task` with `args` (JSON text) on `schedule`, every other
    /// option unset.
    pub fn new(task: impl Into<String>, args: impl Into<String>, schedule: Schedule) -> Self {
        EntryDefinition {
            task: task.into(),
            args: args.into(),
            schedule,
            timezone: None,
            queue: None,
            priority: None,
            max_retries: None,
            time_limit_ms: None,
            soft_time_limit_ms: None,
            expires_ms: None,
            headers: BTreeMap::new(),
            enabled: true,
            jitter_ms: 0,
            expire_at: None,
            catch_up: CatchUp::default(),
            overlap: Overlap::default(),
            meta: serde_json::Map::new(),
        }
    }

    /// The entry's time zone. One that this build does not know (stored by a newer one)
    /// falls back to UTC, with a warning.
    pub fn zone(&self) -> TimeZone {
        time_zone(self.timezone.as_deref()).unwrap_or_else(|error| {
            tracing::warn!(%error, "using UTC instead");
            TimeZone::UTC
        })
    }

    fn within_end(&self, slot: Timestamp) -> bool {
        self.expire_at.is_none_or(|end| slot <= end)
    }

    /// The first slot at or after `at`, within `expire_at`.
    pub fn next_slot(
        &self,
        zone: &TimeZone,
        anchor: Timestamp,
        at: Timestamp,
    ) -> Option<Timestamp> {
        self.schedule
            .next_at_or_after(at, zone, anchor)
            .filter(|slot| self.within_end(*slot))
    }

    /// The slot after `slot`, within `expire_at`.
    pub fn slot_after(
        &self,
        zone: &TimeZone,
        anchor: Timestamp,
        slot: Timestamp,
    ) -> Option<Timestamp> {
        self.schedule
            .next_after(slot, zone, anchor)
            .filter(|slot| self.within_end(*slot))
    }

    /// The last slot at or before `at`, within `expire_at`.
    pub fn latest_slot(
        &self,
        zone: &TimeZone,
        anchor: Timestamp,
        at: Timestamp,
    ) -> Option<Timestamp> {
        let at = self.expire_at.map_or(at, |end| end.min(at));
        self.schedule.latest_at_or_before(at, zone, anchor)
    }
}

impl ScheduleEntry {
    /// An entry not stored yet, first due at `first` (where an interval counts from).
    pub fn new(id: impl Into<String>, definition: EntryDefinition, first: Timestamp) -> Self {
        ScheduleEntry {
            id: id.into(),
            definition,
            state: EntryState {
                next_run_at: Some(first),
                anchor: first,
                ..EntryState::default()
            },
            revision: 0,
        }
    }

    /// When the store should offer the entry to Beat: its next slot, if enabled.
    pub fn due_at(&self) -> Option<Timestamp> {
        self.state.next_run_at.filter(|_| self.definition.enabled)
    }

    /// The stored form, for adapters that keep an entry as text.
    pub(crate) fn to_json(&self) -> String {
        serde_json::to_string(self).expect("a schedule entry always serialises")
    }

    pub(crate) fn from_json(text: &str) -> Result<ScheduleEntry, StorageError> {
        serde_json::from_str(text).map_err(|e| StorageError::corrupt("schedule entry", e))
    }

    /// The entry as stored after a write over its current revision. A new entry starts at a
    /// revision taken from the clock (and a random part), so a writer still holding an entry
    /// that was removed and created again cannot write over the new one.
    pub(crate) fn next_revision(&self) -> ScheduleEntry {
        let revision = match self.revision {
            0 => {
                let micros = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |since| since.as_micros() as u64);
                // Below i64::MAX, which SQL stores, for the next two centuries.
                micros.saturating_mul(1000) + fastrand::u64(1..1000)
            }
            current => current.saturating_add(1),
        };
        ScheduleEntry {
            revision,
            ..self.clone()
        }
    }
}

/// Decodes stored `(id, text)` rows, setting aside (and logging) those that cannot be read,
/// so that one damaged or newer-format entry does not stop Beat from firing the others.
/// Returns the entries and the ids set aside, which the adapter takes out of its due index
/// (they stay stored, for `schedule list` to report and `schedule remove` to delete).
pub(crate) fn decode_readable(rows: Vec<(String, String)>) -> (Vec<ScheduleEntry>, Vec<String>) {
    let mut entries = Vec::with_capacity(rows.len());
    let mut unreadable = Vec::new();
    for (id, text) in rows {
        match ScheduleEntry::from_json(&text) {
            Ok(entry) => entries.push(entry),
            Err(error) => {
                tracing::warn!(entry = id, %error, "a schedule entry cannot be read; it no longer fires");
                unreadable.push(id);
            }
        }
    }
    (entries, unreadable)
}

/// Decodes stored entries; one that cannot be read is an error.
pub(crate) fn decode_all(texts: &[String]) -> Result<Vec<ScheduleEntry>, StorageError> {
    texts
        .iter()
        .map(|text| ScheduleEntry::from_json(text))
        .collect()
}

/// The entries due at `before`, earliest first (then by id), at most `limit`.
pub(crate) fn select_due(
    entries: impl IntoIterator<Item = ScheduleEntry>,
    before: Timestamp,
    limit: usize,
) -> Vec<ScheduleEntry> {
    let mut due: Vec<(Timestamp, ScheduleEntry)> = entries
        .into_iter()
        .filter_map(|entry| Some((entry.due_at()?, entry)))
        .filter(|(at, _)| *at <= before)
        .collect();
    due.sort_by(|(a, x), (b, y)| a.cmp(b).then_with(|| x.id.cmp(&y.id)));
    due.truncate(limit);
    due.into_iter().map(|(_, entry)| entry).collect()
}

/// Schedule entries. See the module documentation for the compare-and-set.
#[async_trait]
pub trait ScheduleStore: Send + Sync {
    async fn get(&self, id: &str) -> Result<Option<ScheduleEntry>, StorageError>;

    /// Every entry, by id.
    async fn list(&self) -> Result<Vec<ScheduleEntry>, StorageError>;

    /// Enabled entries whose next slot is at or before `before`, earliest first, at most
    /// `limit`. An entry that cannot be decoded is logged and taken out of the due ones.
    async fn due(
        &self,
        before: Timestamp,
        limit: usize,
    ) -> Result<Vec<ScheduleEntry>, StorageError>;

    /// Writes each entry whose stored revision is still `entry.revision` (0: not stored yet),
    /// storing it with the revision after; whether each was written. One round trip or
    /// transaction for the whole batch; the ids in a batch are distinct.
    async fn save_many(&self, entries: &[ScheduleEntry]) -> Result<Vec<bool>, StorageError>;

    /// [`ScheduleStore::save_many`] for one entry.
    async fn save(&self, entry: &ScheduleEntry) -> Result<bool, StorageError> {
        let saved = self.save_many(std::slice::from_ref(entry)).await?;
        Ok(saved.first() == Some(&true))
    }

    /// Deletes an entry whatever its revision; `false` if there was none.
    async fn remove(&self, id: &str) -> Result<bool, StorageError>;
}
