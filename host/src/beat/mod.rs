//! Beat: turns schedule entries into tasks, from any number of processes at once.
//!
//! Every Beat runs the same loop. It takes (or renews) the leader lock in the lock store;
//! without it, it stands by and tries again every tick, so when the leader dies another takes
//! over within the lock's TTL plus a tick. The leader asks the schedule store for the entries
//! due before the next tick, sleeps until the earliest of them, and fires what is due:
//!
//! 1. For each entry it works out the slots due by now and what its catch-up policy fires of
//!    them ([`CatchUp`]); an entry with `overlap = skip` whose previous task has not finished
//!    fires nothing and counts the slots as skipped.
//! 2. It publishes one task per fired slot, whose id is derived from the entry and the slot
//!    (`ENTRY@SLOT`), in one batch.
//! 3. It records the firings with a compare-and-set on each entry's revision, in one batch.
//!
//! Publishing comes before recording, so a Beat that dies between the two loses nothing: the
//! next leader publishes the same slot again under the same task id, and a worker that finds
//! that id already finished settles the copy without running it. Two leaders at once (a
//! paused process whose lock expired) are harmless the same way: the compare-and-set lets one
//! of them record each slot, and the task ids they publish are the same.
//!
//! The store is read afresh every round, so `schedule apply`, `enable` and `disable` reach a
//! running Beat within a tick.

pub mod file;

use std::collections::HashSet;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use jiff::tz::TimeZone;

use crate::backend::{ResultBackend, TaskState, TaskStatus};
use crate::client::{Client, EnqueueRequest};
use crate::envelope::Envelope;
use crate::schedule::time_zone;
use crate::storage::StorageError;
use crate::stores::lock::LockStore;
use crate::stores::schedule::{CatchUp, EntryDefinition, Overlap, ScheduleEntry, ScheduleStore};
use crate::time::Timestamp;

/// The lock the leading Beat holds.
pub const LEADER_LOCK: &str = "beat-leader";
/// The most slots of one entry a round fires under `catch_up = all`; the rest fire in the
/// rounds right after.
const MAX_CATCH_UP_PER_ROUND: usize = 100;
/// Steps taken to find the slots missed during a long outage before jumping to the present.
const MAX_SLOT_SCAN: usize = 100_000;
/// Headers every firing carries.
pub const ENTRY_HEADER: &str = "stem-beat-entry";
pub const SLOT_HEADER: &str = "stem-beat-slot";

/// How a Beat runs.
#[derive(Clone, Debug)]
pub struct BeatConfig {
    /// This Beat's name in the lock store.
    pub id: String,
    /// How often the store is read (changes reach the Beat within a tick) and how often a
    /// standby Beat tries the leader lock.
    pub tick: Duration,
    /// How long leadership lasts unrenewed: the longest a dead leader's entries wait.
    pub lock_ttl: Duration,
    /// Entries fired per round.
    pub batch: usize,
}

impl Default for BeatConfig {
    fn default() -> BeatConfig {
        BeatConfig {
            id: format!("beat-{}", uuid::Uuid::new_v4()),
            tick: Duration::from_secs(1),
            lock_ttl: Duration::from_secs(5),
            batch: 1000,
        }
    }
}

/// What one round did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Round {
    /// Tasks published.
    pub fired: usize,
    /// Slots not fired (overlap, catch-up policy).
    pub skipped: u64,
    /// Firings that could not be enqueued (unknown task, bad arguments); recorded on the entry.
    pub failed: usize,
    /// Entries another writer changed first; they are looked at again next round.
    pub conflicts: usize,
    /// More entries are due now than one round fires.
    pub more: bool,
    /// When the next entry is due, if before the next tick.
    pub next_due: Option<Timestamp>,
}

/// The parts a Beat works with.
pub struct Beat {
    config: BeatConfig,
    store: Arc<dyn ScheduleStore>,
    locks: Arc<dyn LockStore>,
    client: Client,
    backend: Arc<dyn ResultBackend>,
}

/// The slot an entry fires next at or after `at`, within its `expire_at`.
pub fn next_slot(
    definition: &EntryDefinition,
    zone: &TimeZone,
    anchor: Timestamp,
    at: Timestamp,
) -> Option<Timestamp> {
    definition
        .schedule
        .next_at_or_after(at, zone, anchor)
        .filter(|slot| definition.expire_at.is_none_or(|end| *slot <= end))
}

/// The entry's time zone; one stored before its zone was known falls back to UTC.
fn zone_of(definition: &EntryDefinition) -> TimeZone {
    time_zone(definition.timezone.as_deref()).unwrap_or(TimeZone::UTC)
}

/// The next `count` slots of an entry, from its next run.
pub fn upcoming(entry: &ScheduleEntry, count: usize) -> Vec<Timestamp> {
    let zone = zone_of(&entry.definition);
    let mut slots = Vec::with_capacity(count);
    let mut next = entry.state.next_run_at;
    while let Some(slot) = next {
        if slots.len() == count {
            break;
        }
        slots.push(slot);
        next = next_slot(
            &entry.definition,
            &zone,
            entry.state.anchor,
            Timestamp::from_millis(slot.as_millis() + 1),
        );
    }
    slots
}

/// The id of the task that fires `entry_id` at `slot`.
pub fn task_id(entry_id: &str, slot: Timestamp) -> String {
    format!("{entry_id}@{slot}")
}

/// What a round does with one due entry.
struct Plan {
    fire: Vec<Timestamp>,
    dropped: u64,
    next: Option<Timestamp>,
}

/// Slots of `entry` due at `now`, and which of them fire under its catch-up policy. A slot
/// more than `grace` old counts as missed.
fn plan(entry: &ScheduleEntry, now: Timestamp, grace: Duration) -> Plan {
    let definition = &entry.definition;
    let zone = zone_of(definition);
    let anchor = entry.state.anchor;
    let after = |slot: Timestamp| {
        next_slot(
            definition,
            &zone,
            anchor,
            Timestamp::from_millis(slot.as_millis() + 1),
        )
    };
    let mut due = Vec::new();
    let mut cursor = entry.state.next_run_at;
    let mut jumped = false;
    while let Some(slot) = cursor.filter(|slot| *slot <= now) {
        if due.len() == MAX_SLOT_SCAN {
            jumped = true;
            break;
        }
        due.push(slot);
        cursor = after(slot);
    }
    if jumped {
        cursor = next_slot(
            definition,
            &zone,
            anchor,
            Timestamp::from_millis(now.as_millis() + 1),
        );
    }
    let total = due.len() as u64;
    let fire: Vec<Timestamp> = match definition.catch_up {
        CatchUp::All => {
            if due.len() > MAX_CATCH_UP_PER_ROUND {
                let rest = due[MAX_CATCH_UP_PER_ROUND];
                due.truncate(MAX_CATCH_UP_PER_ROUND);
                return Plan {
                    fire: due,
                    dropped: 0,
                    next: Some(rest),
                };
            }
            due
        }
        CatchUp::One => due.last().copied().into_iter().collect(),
        CatchUp::None => due
            .last()
            .copied()
            .filter(|slot| now.saturating_since(*slot) <= grace)
            .into_iter()
            .collect(),
    };
    Plan {
        dropped: total - fire.len() as u64,
        fire,
        next: cursor,
    }
}

/// A short, stable spread of a firing inside its jitter: every Beat computes the same one.
fn jitter_of(task_id: &str, jitter_ms: u64) -> Duration {
    if jitter_ms == 0 {
        return Duration::ZERO;
    }
    // FNV-1a: stable across processes and releases, unlike the standard library's hasher.
    let hash = task_id
        .bytes()
        .fold(0xcbf2_9ce4_8422_2325_u64, |hash, byte| {
            (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
        });
    Duration::from_millis(hash % (jitter_ms + 1))
}

impl Beat {
    pub fn new(
        config: BeatConfig,
        store: Arc<dyn ScheduleStore>,
        locks: Arc<dyn LockStore>,
        client: Client,
        backend: Arc<dyn ResultBackend>,
    ) -> Beat {
        Beat {
            config,
            store,
            locks,
            client,
            backend,
        }
    }

    /// Runs until `shutdown` completes, then lets go of the leader lock.
    pub async fn run(&self, shutdown: impl Future<Output = ()>) {
        tokio::pin!(shutdown);
        let mut leading = false;
        loop {
            let was_leading = leading;
            leading = match self.lead(leading).await {
                Ok(leading) => leading,
                Err(error) => {
                    tracing::warn!(%error, "cannot reach the lock store; not firing");
                    false
                }
            };
            if leading != was_leading {
                if leading {
                    tracing::info!(
                        beat = self.config.id,
                        "leading: this Beat fires the schedule"
                    );
                } else {
                    tracing::warn!(beat = self.config.id, "lost the leader lock; standing by");
                }
            }
            let pause = if leading {
                match self.fire_due(Timestamp::now()).await {
                    Ok(round) => self.pause_after(&round),
                    Err(error) => {
                        tracing::warn!(%error, "a round failed; trying again next tick");
                        self.config.tick
                    }
                }
            } else {
                self.config.tick
            };
            tokio::select! {
                () = &mut shutdown => break,
                () = tokio::time::sleep(pause) => {}
            }
        }
        if leading {
            let _ = self.locks.release(LEADER_LOCK, &self.config.id).await;
        }
    }

    /// Renews or takes the leader lock; whether this Beat leads now.
    async fn lead(&self, leading: bool) -> Result<bool, StorageError> {
        let (id, ttl) = (&self.config.id, self.config.lock_ttl);
        if leading && self.locks.renew(LEADER_LOCK, id, ttl).await? {
            return Ok(true);
        }
        self.locks.acquire(LEADER_LOCK, id, ttl).await
    }

    /// How long to sleep after a round: until the next entry is due, at most a tick.
    fn pause_after(&self, round: &Round) -> Duration {
        if round.more {
            return Duration::ZERO;
        }
        round.next_due.map_or(self.config.tick, |at| {
            at.saturating_since(Timestamp::now()).min(self.config.tick)
        })
    }

    /// One round at `now`: fires the entries due, records the firings, and says when the next
    /// entry is due. The caller must hold the leader lock (several Beats firing at once are
    /// safe, only wasteful).
    pub async fn fire_due(&self, now: Timestamp) -> Result<Round, StorageError> {
        let horizon = now.saturating_add(self.config.tick);
        let entries = self.store.due(horizon, self.config.batch).await?;
        let full = entries.len() == self.config.batch;
        let (ready, later): (Vec<ScheduleEntry>, Vec<ScheduleEntry>) = entries
            .into_iter()
            .partition(|entry| entry.due_at().is_some_and(|at| at <= now));
        let mut round = Round {
            more: full && later.is_empty(),
            next_due: later.first().and_then(ScheduleEntry::due_at),
            ..Round::default()
        };
        if ready.is_empty() {
            return Ok(round);
        }
        let running = self.still_running(&ready).await?;
        let grace = self.config.tick * 2;
        let mut envelopes: Vec<Envelope> = Vec::new();
        let mut pending: Vec<TaskStatus> = Vec::new();
        let mut updated: Vec<ScheduleEntry> = Vec::with_capacity(ready.len());
        for mut entry in ready {
            let mut plan = plan(&entry, now, grace);
            if !plan.fire.is_empty() && running.contains(&entry.id) {
                plan.dropped += plan.fire.len() as u64;
                plan.fire.clear();
            }
            round.skipped += plan.dropped;
            entry.state.skipped_count += plan.dropped;
            entry.state.next_run_at = plan.next;
            for slot in &plan.fire {
                match self.client.prepare(firing(&entry, *slot)).await {
                    Ok(envelope) => {
                        if entry.definition.overlap == Overlap::Skip {
                            let mut status = TaskStatus::new(&envelope.id, TaskState::Pending);
                            status.task = Some(envelope.task.clone());
                            pending.push(status);
                        }
                        entry.state.total_run_count += 1;
                        entry.state.last_run_at = Some(now);
                        entry.state.last_slot = Some(*slot);
                        entry.state.last_task_id = Some(envelope.id.clone());
                        entry.state.last_error = None;
                        entry.state.drift_ms =
                            u64::try_from(now.saturating_since(*slot).as_millis())
                                .unwrap_or(u64::MAX);
                        envelopes.push(envelope);
                    }
                    Err(error) => {
                        tracing::warn!(entry = entry.id, %error, "cannot enqueue the entry's task");
                        entry.state.last_error = Some(error.to_string());
                        round.failed += 1;
                    }
                }
            }
            updated.push(entry);
        }
        if !pending.is_empty() {
            self.backend.set_many(&pending, None).await?;
        }
        self.client.broker().publish_batch(&envelopes).await?;
        round.fired = envelopes.len();
        let saved = self.store.save_many(&updated).await?;
        round.conflicts = saved.iter().filter(|saved| !**saved).count();
        if round.conflicts > 0 {
            tracing::debug!(
                conflicts = round.conflicts,
                "entries changed meanwhile; their firings were published under the same ids"
            );
        }
        for envelope in &envelopes {
            tracing::debug!(task.id = envelope.id, task = envelope.task, "fired");
        }
        round.more |= updated
            .iter()
            .any(|entry| entry.due_at().is_some_and(|at| at <= now));
        Ok(round)
    }

    /// Ids of the entries with `overlap = skip` whose previous task has not finished.
    async fn still_running(
        &self,
        entries: &[ScheduleEntry],
    ) -> Result<HashSet<String>, StorageError> {
        let watched: Vec<(&str, String)> = entries
            .iter()
            .filter(|entry| entry.definition.overlap == Overlap::Skip)
            .filter_map(|entry| Some((entry.id.as_str(), entry.state.last_task_id.clone()?)))
            .collect();
        if watched.is_empty() {
            return Ok(HashSet::new());
        }
        let task_ids: Vec<String> = watched.iter().map(|(_, task)| task.clone()).collect();
        let statuses = self.backend.get_many(&task_ids).await?;
        Ok(watched
            .iter()
            .zip(statuses)
            .filter(|(_, status)| status.as_ref().is_some_and(|s| !s.state.is_terminal()))
            .map(|((entry, _), _)| (*entry).to_owned())
            .collect())
    }

    /// Fires `id` now, outside its schedule (`schedule run`), and counts the firing; `None`
    /// if there is no such entry.
    pub async fn run_now(&self, id: &str) -> Result<Option<Envelope>, RunNowError> {
        let Some(entry) = self.store.get(id).await? else {
            return Ok(None);
        };
        let now = Timestamp::now();
        let mut request = firing(&entry, now);
        request.task_id = Some(format!("{id}@run-{now}"));
        let envelope = self.client.prepare(request).await?;
        self.client.broker().publish(&envelope).await?;
        // Counted on whatever revision is current: a Beat recording a slot meanwhile wins.
        let mut current = Some(entry);
        for _ in 0..10 {
            let Some(mut entry) = current else { break };
            entry.state.total_run_count += 1;
            entry.state.last_run_at = Some(now);
            entry.state.last_task_id = Some(envelope.id.clone());
            if self.store.save(&entry).await? {
                break;
            }
            current = self.store.get(id).await?;
        }
        Ok(Some(envelope))
    }
}

/// Why `schedule run` could not fire an entry.
#[derive(Debug, thiserror::Error)]
pub enum RunNowError {
    #[error(transparent)]
    Enqueue(#[from] crate::client::EnqueueError),
    #[error(transparent)]
    Storage(#[from] StorageError),
}

/// The task that fires `entry` at `slot`.
fn firing(entry: &ScheduleEntry, slot: Timestamp) -> EnqueueRequest {
    let definition = &entry.definition;
    let id = task_id(&entry.id, slot);
    let mut headers = definition.headers.clone();
    headers.insert(ENTRY_HEADER.to_owned(), entry.id.clone());
    headers.insert(SLOT_HEADER.to_owned(), slot.to_string());
    let jitter = jitter_of(&id, definition.jitter_ms);
    EnqueueRequest {
        task: definition.task.clone(),
        args: definition.args.clone(),
        queue: definition.queue.clone(),
        priority: definition.priority,
        not_before: (!jitter.is_zero()).then(|| slot.saturating_add(jitter)),
        max_retries: definition.max_retries,
        time_limit_ms: definition.time_limit_ms,
        soft_time_limit_ms: definition.soft_time_limit_ms,
        expires_at: definition
            .expires_ms
            .map(|ms| slot.saturating_add(Duration::from_millis(ms))),
        task_id: Some(id),
        headers,
        ..EnqueueRequest::default()
    }
}

#[cfg(test)]
mod tests;
