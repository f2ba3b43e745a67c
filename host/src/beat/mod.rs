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
//! next leader publishes the same slot again under the same task id, which the broker refuses
//! ([`crate::broker::Broker::publish_unique`] remembers every id Beat published for [`DUPLICATE_WINDOW`]),
//! so the slot's task is stored once. The leader
//! renews its lock right before it publishes, so a Beat that stalled past its lock publishes
//! nothing. A firing whose record loses to another writer (`schedule run`, an edit) is
//! recorded again on the entry as that writer left it, unless its slot was recorded or
//! rescheduled meanwhile.
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
use crate::client::{Client, EnqueueError, EnqueueRequest};
use crate::envelope::Envelope;
use crate::schedule::Schedule;
use crate::storage::StorageError;
use crate::stores::lock::LockStore;
use crate::stores::schedule::{CatchUp, EntryDefinition, Overlap, ScheduleEntry, ScheduleStore};
use crate::time::Timestamp;

/// The lock the leading Beat holds.
pub const LEADER_LOCK: &str = "beat-leader";
/// The most slots of one entry a round fires under `catch_up = all`; the rest fire in the
/// rounds right after.
const MAX_CATCH_UP_PER_ROUND: usize = 100;
/// Headers every firing carries.
pub const ENTRY_HEADER: &str = "stem-beat-entry";
pub const SLOT_HEADER: &str = "stem-beat-slot";

/// How long the broker remembers a slot's task id, refusing to store it again: far longer
/// than a takeover (the lock TTL and a tick), short enough that the ids of a busy schedule
/// stay few.
pub const DUPLICATE_WINDOW: Duration = Duration::from_secs(600);

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
    /// Entries looked at, and tasks published, per round.
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

/// The next `count` slots of an entry after `now` (its next run, unless that is past: a
/// disabled or backlogged entry's).
pub fn upcoming(entry: &ScheduleEntry, count: usize, now: Timestamp) -> Vec<Timestamp> {
    let definition = &entry.definition;
    let zone = definition.zone();
    let mut slots = Vec::new();
    let mut next = match entry.state.next_run_at {
        Some(next) if next < now => definition.next_slot(&zone, entry.state.anchor, now),
        next => next,
    };
    while let Some(slot) = next.filter(|_| slots.len() < count) {
        slots.push(slot);
        next = definition.slot_after(&zone, entry.state.anchor, slot);
    }
    slots
}

/// The id of the task that fires `entry_id` at `slot`.
pub fn task_id(entry_id: &str, slot: Timestamp) -> String {
    format!("{entry_id}@{slot}")
}

/// What a round does with one due entry: the slots it fires, how many it skips, and the
/// entry's next slot afterwards.
struct Plan {
    fire: Vec<Timestamp>,
    dropped: u64,
    next: Option<Timestamp>,
}

/// Counting the slots a long outage missed stops here; `skipped_count` then says "at least".
const MAX_MISSED_COUNT: u64 = 1_000;

/// Slots of `entry` due at `now`, and which of them fire under its catch-up and overlap
/// policies; at most `most` fire. A slot more than `grace` old counts as missed; while the
/// entry's last firing is `running` (`overlap = skip`), every due slot is skipped at once.
fn plan(
    entry: &ScheduleEntry,
    now: Timestamp,
    grace: Duration,
    most: usize,
    running: bool,
) -> Plan {
    let definition = &entry.definition;
    let (zone, anchor) = (definition.zone(), entry.state.anchor);
    let Some(first) = entry.state.next_run_at.filter(|slot| *slot <= now) else {
        return Plan {
            fire: Vec::new(),
            dropped: 0,
            next: entry.state.next_run_at,
        };
    };
    if definition.catch_up == CatchUp::All && !running {
        // Oldest first, a bounded number per round; with `overlap = skip` one at a time, as
        // the next must wait for it.
        let most = match definition.overlap {
            Overlap::Skip => 1,
            Overlap::Allow => MAX_CATCH_UP_PER_ROUND.min(most).max(1),
        };
        let mut fire = vec![first];
        let mut next = definition.slot_after(&zone, anchor, first);
        while let Some(slot) = next.filter(|slot| *slot <= now && fire.len() < most) {
            fire.push(slot);
            next = definition.slot_after(&zone, anchor, slot);
        }
        return Plan {
            fire,
            dropped: 0,
            next,
        };
    }
    let latest = definition
        .latest_slot(&zone, anchor, now)
        .filter(|latest| *latest >= first)
        .unwrap_or(first);
    let missed = count_slots(definition, &zone, anchor, first, latest);
    let on_time = now.saturating_since(latest) <= grace;
    let fire = match definition.catch_up {
        _ if running => Vec::new(),
        CatchUp::None if !on_time => Vec::new(),
        _ => vec![latest],
    };
    Plan {
        dropped: missed - fire.len() as u64,
        fire,
        next: definition.next_slot(&zone, anchor, just_after(now)),
    }
}

/// How many slots lie from `first` to `latest`, both included, `first` being one (at most
/// [`MAX_MISSED_COUNT`] for schedules other than intervals).
fn count_slots(
    definition: &EntryDefinition,
    zone: &TimeZone,
    anchor: Timestamp,
    first: Timestamp,
    latest: Timestamp,
) -> u64 {
    if let Schedule::Interval { every_ms, .. } = definition.schedule {
        return (latest.as_millis() - first.as_millis()) / every_ms.max(1) + 1;
    }
    let mut count = 1;
    let mut slot = first;
    while let Some(next) = definition
        .slot_after(zone, anchor, slot)
        .filter(|next| *next <= latest && count < MAX_MISSED_COUNT)
    {
        count += 1;
        slot = next;
    }
    count
}

/// What a round did to one entry, to record on whatever revision of it is current.
struct Outcome {
    /// The entry's next slot when the round read it.
    read_next: Option<Timestamp>,
    fired: Vec<(Timestamp, String)>,
    dropped: u64,
    next: Option<Timestamp>,
    error: Option<String>,
    at: Timestamp,
}

impl Outcome {
    fn record(&self, state: &mut crate::stores::schedule::EntryState) {
        state.next_run_at = self.next;
        state.skipped_count = state.skipped_count.saturating_add(self.dropped);
        state.total_run_count = state
            .total_run_count
            .saturating_add(self.fired.len() as u64);
        // A `schedule run` recorded after this round read the entry stays the last firing.
        let newer = state.last_run_at.is_some_and(|last| last > self.at);
        if let Some((slot, task_id)) = self.fired.last().filter(|_| !newer) {
            state.last_run_at = Some(self.at);
            state.last_slot = Some(*slot);
            state.last_task_id = Some(task_id.clone());
            state.drift_ms =
                u64::try_from(self.at.saturating_since(*slot).as_millis()).unwrap_or(u64::MAX);
        }
        if self.error.is_some() || !self.fired.is_empty() {
            state.last_error.clone_from(&self.error);
        }
    }
}

fn just_after(at: Timestamp) -> Timestamp {
    Timestamp::from_millis(at.as_millis().saturating_add(1))
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
    Duration::from_millis(hash % jitter_ms.saturating_add(1).max(1))
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
            let mut pause = self.config.tick;
            if leading {
                match self.round(Timestamp::now(), true).await {
                    Ok(Some(round)) => pause = self.pause_after(&round),
                    Ok(None) => leading = false,
                    Err(error) => {
                        tracing::warn!(%error, "a round failed; trying again next tick");
                    }
                }
            }
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
    /// entry is due. The caller should hold the leader lock (several Beats firing at once
    /// publish the same task ids twice).
    pub async fn fire_due(&self, now: Timestamp) -> Result<Round, StorageError> {
        Ok(self.round(now, false).await?.unwrap_or_default())
    }

    /// A round; when `fenced`, the leader lock is renewed right before publishing, and
    /// `None` says it was lost and nothing was published.
    async fn round(&self, now: Timestamp, fenced: bool) -> Result<Option<Round>, StorageError> {
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
            return Ok(Some(round));
        }
        let running = self.still_running(&ready).await?;
        // A slot late by less than a takeover is not missed: `catch_up = none` fires it.
        let grace = self.config.lock_ttl + self.config.tick;
        let mut envelopes: Vec<Envelope> = Vec::new();
        let mut pending: Vec<TaskStatus> = Vec::new();
        let mut recorded: Vec<(ScheduleEntry, Outcome)> = Vec::with_capacity(ready.len());
        for entry in ready {
            if envelopes.len() >= self.config.batch {
                round.more = true;
                break;
            }
            let most = self.config.batch - envelopes.len();
            let plan = plan(&entry, now, grace, most, running.contains(&entry.id));
            let mut outcome = Outcome {
                read_next: entry.state.next_run_at,
                fired: Vec::new(),
                dropped: plan.dropped,
                next: plan.next,
                error: None,
                at: now,
            };
            for slot in &plan.fire {
                match self.client.prepare(firing(&entry, *slot)).await {
                    Ok(envelope) => {
                        if entry.definition.overlap == Overlap::Skip {
                            pending.push(pending_status(&envelope));
                        }
                        outcome.fired.push((*slot, envelope.id.clone()));
                        envelopes.push(envelope);
                    }
                    // The registry could not be read: the slot waits for the next round.
                    Err(EnqueueError::Storage(error)) => return Err(error),
                    Err(error) => {
                        tracing::warn!(entry = entry.id, %error, "cannot enqueue the entry's task");
                        outcome.error = Some(error.to_string());
                        round.failed += 1;
                    }
                }
            }
            round.skipped += outcome.dropped;
            recorded.push((entry, outcome));
        }
        // Still the leader (renewed, or taken again if it lapsed and nobody else took it)?
        if fenced && !envelopes.is_empty() && !self.lead(true).await? {
            return Ok(None);
        }
        if !pending.is_empty() {
            self.backend.set_many(&pending, None).await?;
        }
        self.client
            .publish_unique(envelopes.clone(), DUPLICATE_WINDOW)
            .await?;
        round.fired = envelopes.len();
        for envelope in &envelopes {
            tracing::debug!(task.id = envelope.id, task = envelope.task, "fired");
        }
        let updated: Vec<ScheduleEntry> = recorded
            .iter()
            .map(|(entry, outcome)| {
                let mut entry = entry.clone();
                outcome.record(&mut entry.state);
                entry
            })
            .collect();
        let saved = self.store.save_many(&updated).await?;
        for ((entry, outcome), saved) in recorded.iter().zip(saved) {
            if !saved && !self.record_again(&entry.id, outcome).await? {
                round.conflicts += 1;
            }
        }
        round.more |= updated
            .iter()
            .any(|entry| entry.due_at().is_some_and(|at| at <= now));
        Ok(Some(round))
    }

    /// Records an outcome whose first save lost to another writer, on the entry as it is
    /// now, unless another Beat recorded the slot or the entry was rescheduled meanwhile.
    async fn record_again(&self, id: &str, outcome: &Outcome) -> Result<bool, StorageError> {
        for _ in 0..5 {
            let Some(mut entry) = self.store.get(id).await? else {
                return Ok(false);
            };
            if entry.state.next_run_at != outcome.read_next {
                return Ok(false);
            }
            outcome.record(&mut entry.state);
            if self.store.save(&entry).await? {
                return Ok(true);
            }
        }
        Ok(false)
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
}

/// The `pending` status Beat records for a firing that `overlap = skip` will watch.
fn pending_status(envelope: &Envelope) -> TaskStatus {
    let mut status = TaskStatus::new(&envelope.id, TaskState::Pending);
    status.task = Some(envelope.task.clone());
    status
}

/// Enqueues entry `id`'s task now, outside its schedule (`schedule run`), under the id
/// `ID@run-TIME`, and counts the firing; `None` if there is no such entry.
pub async fn run_now(
    store: &dyn ScheduleStore,
    client: &Client,
    backend: &dyn ResultBackend,
    id: &str,
) -> Result<Option<Envelope>, RunNowError> {
    let Some(entry) = store.get(id).await? else {
        return Ok(None);
    };
    let now = Timestamp::now();
    let mut request = firing(&entry, now);
    request.task_id = Some(format!("{id}@run-{now}"));
    request.not_before = None;
    request.headers.remove(SLOT_HEADER);
    let envelope = client.prepare(request).await?;
    if entry.definition.overlap == Overlap::Skip {
        backend.set(&pending_status(&envelope), None).await?;
    }
    client.publish(&envelope).await?;
    // Counted on whatever revision is current: a Beat recording a slot meanwhile wins.
    let mut current = Some(entry);
    for _ in 0..10 {
        let Some(mut entry) = current else { break };
        entry.state.total_run_count += 1;
        entry.state.last_run_at = Some(now);
        entry.state.last_task_id = Some(envelope.id.clone());
        if store.save(&entry).await? {
            break;
        }
        current = store.get(id).await?;
    }
    Ok(Some(envelope))
}

/// Why `schedule run` could not fire an entry.
#[derive(Debug, thiserror::Error)]
pub enum RunNowError {
    #[error(transparent)]
    Enqueue(#[from] EnqueueError),
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
