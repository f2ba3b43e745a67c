//! Brokers: delivery of task envelopes from producers to workers.
//!
//! The [`Broker`] contract is the same for every adapter; the shared conformance suite
//! (`host/tests/all/conformance/broker.rs`) runs unchanged against each of them.
//!
//! - Publish an [`Envelope`] to its queue. Priorities run 0–9, higher first, FIFO within a
//!   priority; `not_before` delays delivery. [`Broker::publish_unique`] stores a task id at
//!   most once within a window, so a producer that publishes again after a crash or a timeout
//!   does not run the task twice.
//! - [`Broker::consume`] leases up to `max` entries from one or more queues for a visibility
//!   timeout. A delivery is [extended](Broker::extend_lease) while it runs, then
//!   [settled](Broker::settle_many): acked, released to be delivered again after a delay,
//!   replaced by its next attempt, or dead-lettered ([`Settle`]), each only while the lease
//!   holds. A delivery whose lease runs out is delivered again: delivery is at least once,
//!   and [`Delivery::deliveries`] counts how often that happened.
//! - Entries that cannot be run go to the dead-letter queue with a reason, either because the
//!   worker says so or because the stored entry cannot be decoded (the consumer carries on).
//!   Dead letters are numbered in the order they arrive; a replay
//!   ([`Broker::requeue_dead_letter`]) deletes a letter and stores its entry in one step.
//! - Broadcast channels fan a message out to every current subscriber (worker control).
//! - Every adapter works inside a namespace; namespaces never see each other's entries.
//!
//! Adapters: [`memory`] (one process, for tests and demos), [`sqlite`] (one host, no
//! infrastructure), [`redis`] (Redis Streams: many workers on many hosts) and [`postgres`]
//! (`SKIP LOCKED` claims and `LISTEN/NOTIFY`: many workers on many hosts, one database).

mod local_broadcast;
pub mod memory;
pub mod postgres;
pub mod redis;
pub mod replay;
pub mod sqlite;

use std::time::Duration;

use async_trait::async_trait;
use serde::Serialize;
use tokio::sync::mpsc;

use crate::envelope::{Envelope, EnvelopeError};
use crate::storage::StorageError;
use crate::time::Timestamp;

/// The namespace adapters use when none is configured.
pub const DEFAULT_NAMESPACE: &str = "stem";

/// The lease a delivery gets when the consumer does not ask for one.
pub const DEFAULT_VISIBILITY_TIMEOUT: Duration = Duration::from_secs(30);

/// What [`Broker::consume`] asks for.
#[derive(Clone, Debug)]
pub struct ConsumeOptions {
    /// The most deliveries to return.
    pub max: usize,
    /// The lease (visibility timeout); `None` uses the adapter's default.
    pub lease: Option<Duration>,
    /// How long to wait for a first delivery when nothing is ready; zero returns at once.
    pub wait: Duration,
}

impl Default for ConsumeOptions {
    fn default() -> ConsumeOptions {
        ConsumeOptions {
            max: 1,
            lease: None,
            wait: Duration::ZERO,
        }
    }
}

/// Identifies one lease of one queue entry. Every delivery of an entry gets a fresh token, so a
/// consumer whose lease ran out cannot ack or extend an entry another consumer now holds: it
/// gets [`StorageError::LeaseLost`]. Until the entry is delivered again, the old receipt
/// still works.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Receipt {
    pub queue: String,
    /// The adapter's id for the stored entry.
    pub entry: String,
    pub(crate) token: String,
}

/// An envelope leased to a consumer.
#[derive(Clone, Debug)]
pub struct Delivery {
    pub envelope: Envelope,
    pub receipt: Receipt,
    /// 1 on the first delivery of this attempt, then counts deliveries whose lease ran out
    /// without being settled (a crashed or stuck worker). Releases do not count; a retry
    /// starts again from 1. Workers dead-letter an entry past their delivery cap.
    pub deliveries: u32,
    pub leased_until: Timestamp,
}

/// What becomes of a leased entry when its delivery is settled. Every variant applies only
/// while the receipt still holds the lease, and atomically: no interleaving of consumers can
/// leave both an entry and its replacement, or neither.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Settle {
    /// Remove the entry for good.
    Ack,
    /// Give the entry back, to be delivered again after the delay. Not counted as a delivery:
    /// the worker chose not to run it (a rate limit, a missing component, a shutdown).
    Release(Duration),
    /// Replace the entry with its next attempt, delivered after the delay, its delivery count
    /// starting again from zero. The envelope must keep the entry's queue and validate.
    Retry {
        next: Box<Envelope>,
        delay: Duration,
    },
    /// Move the entry to the dead-letter queue with the reason.
    DeadLetter(String),
}

/// An entry in the dead-letter queue.
#[derive(Clone, Debug, Serialize)]
pub struct DeadLetter {
    /// The adapter's id for the dead-letter entry.
    pub id: String,
    pub queue: String,
    /// Absent when the entry was too corrupt to read.
    pub task_id: Option<String>,
    pub task: Option<String>,
    pub reason: String,
    pub dead_at: Timestamp,
    /// The stored entry as it was, decodable or not.
    pub payload: String,
}

impl DeadLetter {
    /// Builds the record for a stored entry, reading what it can of it.
    pub(crate) fn new(
        id: String,
        queue: String,
        payload: String,
        reason: String,
        dead_at: Timestamp,
    ) -> DeadLetter {
        let envelope = decode_entry(&payload).ok();
        DeadLetter {
            id,
            queue,
            task_id: envelope.as_ref().map(|e| e.id.clone()),
            task: envelope.map(|e| e.task),
            reason,
            dead_at,
            payload,
        }
    }

    /// The envelope to publish on replay: a fresh first attempt of the same task id, if the
    /// stored entry is a valid envelope.
    pub fn replay_envelope(&self) -> Result<Envelope, StorageError> {
        let mut envelope = decode_entry(&self.payload)
            .map_err(|e| StorageError::corrupt(format!("dead letter {}", self.id), e))?;
        envelope.attempt = 1;
        envelope.not_before = None;
        Ok(envelope)
    }

    /// Whether `key` names this dead letter: its own id or its task's id.
    pub fn matches(&self, key: &str) -> bool {
        self.id == key || self.task_id.as_deref() == Some(key)
    }

    /// The dead-letter id as a number: every adapter numbers its dead letters in the order
    /// they arrive, and never reuses a number.
    pub fn number(&self) -> Option<u64> {
        self.id.parse().ok()
    }
}

/// What the ids of a [`DeadLetterQuery`] name.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DeadLetterIds {
    /// A dead-letter id or a task id, whichever matches (what people type at `dlq show`).
    /// Dead-letter ids are small numbers, which a producer's task ids can collide with.
    #[default]
    Either,
    /// Dead-letter ids only: an action on one listed letter, never mistaken for a task.
    Letter,
    /// Task ids only.
    Task,
}

/// Which dead letters to list, replay or purge.
#[derive(Clone, Debug, Default)]
pub struct DeadLetterQuery {
    /// Only this queue's; `None` for every queue.
    pub queue: Option<String>,
    /// Only these (what they name: [`DeadLetterQuery::id_kind`]); empty for all.
    pub ids: Vec<String>,
    pub id_kind: DeadLetterIds,
    /// Only those numbered above this ([`DeadLetter::number`]): the page after one seen.
    pub after: Option<u64>,
    /// Only those numbered up to this: the letters that existed when an action began.
    pub up_to: Option<u64>,
    /// Newest first instead of oldest first.
    pub newest_first: bool,
    /// At most this many.
    pub limit: Option<usize>,
}

impl DeadLetterQuery {
    pub(crate) fn selects(&self, letter: &DeadLetter) -> bool {
        let number = letter.number();
        self.queue.as_ref().is_none_or(|q| *q == letter.queue)
            && (self.ids.is_empty() || self.ids.iter().any(|id| self.names(letter, id)))
            && self
                .after
                .is_none_or(|after| number.is_some_and(|n| n > after))
            && self
                .up_to
                .is_none_or(|up_to| number.is_some_and(|n| n <= up_to))
    }

    fn names(&self, letter: &DeadLetter, id: &str) -> bool {
        match self.id_kind {
            DeadLetterIds::Either => letter.matches(id),
            DeadLetterIds::Letter => letter.id == id,
            DeadLetterIds::Task => letter.task_id.as_deref() == Some(id),
        }
    }
}

/// Dead letters read a page at a time, oldest first, for actions on many of them. Only those
/// that existed when the first page was read are returned (unless the query bounds them
/// itself): an action whose work makes new dead letters (a replayed task that fails at once)
/// does not chase them.
pub struct DeadLetterPages<'a, B: Broker + ?Sized> {
    broker: &'a B,
    query: DeadLetterQuery,
    started: bool,
    done: bool,
}

impl<'a, B: Broker + ?Sized> DeadLetterPages<'a, B> {
    /// Most dead letters one page holds.
    pub const PAGE: usize = 500;

    pub fn new(broker: &'a B, query: &DeadLetterQuery) -> DeadLetterPages<'a, B> {
        DeadLetterPages {
            broker,
            query: DeadLetterQuery {
                newest_first: false,
                ..query.clone()
            },
            started: false,
            done: false,
        }
    }

    /// The next page; `None` after the last.
    pub async fn next(&mut self) -> Result<Option<Vec<DeadLetter>>, StorageError> {
        if !self.started {
            self.started = true;
            if self.query.up_to.is_none() {
                let newest = DeadLetterQuery {
                    newest_first: true,
                    limit: Some(1),
                    ..self.query.clone()
                };
                match self.broker.dead_letters(&newest).await?.first() {
                    Some(letter) => self.query.up_to = letter.number(),
                    None => self.done = true,
                }
            }
        }
        if self.done {
            return Ok(None);
        }
        let size = self
            .query
            .limit
            .map_or(Self::PAGE, |left| left.min(Self::PAGE));
        let page = self
            .broker
            .dead_letters(&DeadLetterQuery {
                limit: Some(size),
                ..self.query.clone()
            })
            .await?;
        if let Some(left) = &mut self.query.limit {
            *left -= page.len().min(*left);
        }
        // A short page, or one whose last letter has no number to go on from, is the last.
        match page.last().and_then(DeadLetter::number) {
            Some(last) if page.len() == size && self.query.limit != Some(0) => {
                self.query.after = Some(last);
            }
            _ => self.done = true,
        }
        Ok((!page.is_empty()).then_some(page))
    }
}

/// What a replay did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ReplayReport {
    /// Task ids published again.
    pub replayed: Vec<String>,
    /// Dead letters left in place, with why (an entry too corrupt to replay).
    pub skipped: Vec<(String, String)>,
}

/// Counts for one queue at one moment.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct QueueStats {
    pub queue: String,
    /// Deliverable now (including entries whose lease ran out).
    pub ready: u64,
    /// Waiting for their `not_before` or a nack delay.
    pub delayed: u64,
    /// Leased to a consumer.
    pub in_flight: u64,
    /// In the dead-letter queue.
    pub dead: u64,
}

/// Messages a subscription holds before its reader takes them. Past it, a feeder from a
/// server connection waits (the server then buffers, and drops a reader that falls too far
/// behind); in-process fan-out drops the message.
pub(crate) const SUBSCRIPTION_BUFFER: usize = 1024;

/// Messages of one broadcast channel, from the moment of subscribing.
pub struct Subscription {
    receiver: mpsc::Receiver<String>,
    /// The task that feeds `receiver` from a server connection, stopped with the subscription.
    feeder: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        if let Some(feeder) = &self.feeder {
            feeder.abort();
        }
    }
}

impl Subscription {
    pub(crate) fn new(receiver: mpsc::Receiver<String>) -> Subscription {
        Subscription {
            receiver,
            feeder: None,
        }
    }

    /// A subscription fed by `feeder`, which is aborted when the subscription is dropped.
    pub(crate) fn fed_by(
        receiver: mpsc::Receiver<String>,
        feeder: tokio::task::JoinHandle<()>,
    ) -> Subscription {
        Subscription {
            receiver,
            feeder: Some(feeder),
        }
    }

    /// The next message; `None` once the broker is gone.
    pub async fn recv(&mut self) -> Option<String> {
        self.receiver.recv().await
    }
}

/// Delivery of task envelopes. See the module documentation for the guarantees.
#[async_trait]
pub trait Broker: Send + Sync {
    /// Stores an envelope on its queue. Refuses an envelope that fails
    /// [`Envelope::validate`].
    async fn publish(&self, envelope: &Envelope) -> Result<(), StorageError> {
        self.publish_batch(std::slice::from_ref(envelope)).await
    }

    /// Stores many envelopes at once, all or none: if one fails [`Envelope::validate`],
    /// nothing is stored.
    async fn publish_batch(&self, envelopes: &[Envelope]) -> Result<(), StorageError>;

    /// Publishes each envelope unless one with the same task id was published through
    /// `publish_unique` within `window` (the adapter remembers each id that long); per
    /// envelope, whether it was stored. Remembering an id and storing its envelope happen
    /// together (one Lua script, one transaction): a producer that crashes and publishes again
    /// cannot store a second copy, and an id is never remembered without its envelope. A
    /// duplicate id inside one batch is stored once (the first). Refuses the whole batch if
    /// one envelope fails [`Envelope::validate`]. Plain publishes neither check nor record
    /// ids, and neither do settles: a retry of a uniquely published entry goes through.
    async fn publish_unique(
        &self,
        envelopes: &[Envelope],
        window: Duration,
    ) -> Result<Vec<bool>, StorageError>;

    /// Publishes `envelope` unless `key` was claimed through `publish_by_key` within `window`:
    /// `None` when it was stored (and the key claimed for its task id), else the id of the task
    /// that holds the key. Claiming and storing happen together, as for
    /// [`Broker::publish_unique`]. Unique tasks ([`crate::client::EnqueueRequest::unique_for`])
    /// use it, with a key made of the task name and its arguments.
    async fn publish_by_key(
        &self,
        key: &str,
        envelope: &Envelope,
        window: Duration,
    ) -> Result<Option<String>, StorageError>;

    /// Leases up to `options.max` ready entries from `queues`, highest priority first, then
    /// oldest first. Waits up to `options.wait` for one when none is ready. Entries that cannot
    /// be decoded are dead-lettered on the way and not returned.
    async fn consume(
        &self,
        queues: &[String],
        options: &ConsumeOptions,
    ) -> Result<Vec<Delivery>, StorageError>;

    /// Settles many deliveries at once, each only if its receipt still holds the lease:
    /// `Ok(true)` for those settled, `Ok(false)` for those whose lease was lost (that entry
    /// is left alone). Adapters apply a batch in one round trip or one transaction.
    async fn settle_many(&self, batch: &[(Receipt, Settle)]) -> Result<Vec<bool>, StorageError>;

    /// Settles one delivery; [`StorageError::LeaseLost`] if its lease was lost.
    async fn settle(&self, receipt: &Receipt, settle: Settle) -> Result<(), StorageError> {
        let held = self.settle_many(&[(receipt.clone(), settle)]).await?;
        if held.first() == Some(&true) {
            Ok(())
        } else {
            Err(StorageError::LeaseLost(receipt.entry.clone()))
        }
    }

    /// Removes a delivered entry for good.
    async fn ack(&self, receipt: &Receipt) -> Result<(), StorageError> {
        self.settle(receipt, Settle::Ack).await
    }

    /// Gives a delivered entry back, to be delivered again after `delay`. The delivery is not
    /// counted: [`Delivery::deliveries`] of the next delivery is the same.
    async fn nack(&self, receipt: &Receipt, delay: Duration) -> Result<(), StorageError> {
        self.settle(receipt, Settle::Release(delay)).await
    }

    /// Moves a delivered entry to the dead-letter queue.
    async fn dead_letter(&self, receipt: &Receipt, reason: &str) -> Result<(), StorageError> {
        self.settle(receipt, Settle::DeadLetter(reason.to_owned()))
            .await
    }

    /// Keeps a delivery leased for `lease` from now.
    async fn extend_lease(
        &self,
        receipt: &Receipt,
        lease: Duration,
    ) -> Result<Timestamp, StorageError>;

    /// The dead letters `query` selects, oldest first unless it asks for newest first.
    async fn dead_letters(&self, query: &DeadLetterQuery) -> Result<Vec<DeadLetter>, StorageError>;

    /// Deletes dead letters by their dead-letter ids; returns how many there were.
    async fn delete_dead_letters(&self, ids: &[String]) -> Result<u64, StorageError>;

    /// Moves dead letter `id` back onto a queue as `envelope` (its replay, see
    /// [`DeadLetter::replay_envelope`]): deletes the letter and stores the envelope together
    /// (one transaction, one Lua script), and only if the letter is still there. Whether this
    /// call moved it: `false` when another replay or a purge took it first, and then nothing
    /// is stored. Two replays of the same letters, at once, publish each letter once, and a
    /// crash leaves either the letter or its entry, never both or neither.
    async fn requeue_dead_letter(
        &self,
        id: &str,
        envelope: &Envelope,
    ) -> Result<bool, StorageError>;

    /// Publishes the selected dead letters again as first attempts and removes them, a page
    /// at a time, each with [`Broker::requeue_dead_letter`]: a letter that a concurrent replay
    /// or purge took is left out of the report. A dead letter too corrupt to replay stays, and
    /// the report says why. Letters that arrive meanwhile are left for the next replay.
    async fn replay_dead_letters(
        &self,
        query: &DeadLetterQuery,
    ) -> Result<ReplayReport, StorageError> {
        let mut report = ReplayReport::default();
        let mut pages = DeadLetterPages::new(self, query);
        while let Some(page) = pages.next().await? {
            for letter in page {
                match letter.replay_envelope() {
                    Ok(envelope) => {
                        if self.requeue_dead_letter(&letter.id, &envelope).await? {
                            report.replayed.push(envelope.id);
                        }
                    }
                    Err(error) => report.skipped.push((letter.id, error.to_string())),
                }
            }
        }
        Ok(report)
    }

    /// Deletes the selected dead letters, a page at a time; returns how many. Letters that
    /// arrive meanwhile are left.
    async fn purge_dead_letters(&self, query: &DeadLetterQuery) -> Result<u64, StorageError> {
        let mut purged = 0;
        let mut pages = DeadLetterPages::new(self, query);
        while let Some(page) = pages.next().await? {
            let ids: Vec<String> = page.into_iter().map(|letter| letter.id).collect();
            purged += self.delete_dead_letters(&ids).await?;
        }
        Ok(purged)
    }

    /// Deletes every entry of `queue` that is not leased; returns how many.
    async fn purge(&self, queue: &str) -> Result<u64, StorageError>;

    /// Counts for one queue.
    async fn stats(&self, queue: &str) -> Result<QueueStats, StorageError>;

    /// Every queue with entries or dead letters, sorted by name.
    async fn queues(&self) -> Result<Vec<String>, StorageError>;

    /// Sends `message` to every current subscriber of `channel`.
    async fn broadcast(&self, channel: &str, message: &str) -> Result<(), StorageError>;

    /// Receives what is broadcast on `channel` from now on.
    async fn subscribe(&self, channel: &str) -> Result<Subscription, StorageError>;
}

/// Checks the envelopes of a settle batch's retries before any of the batch is applied.
pub(crate) fn validate_settles<'a>(
    batch: impl IntoIterator<Item = (&'a Receipt, &'a Settle)>,
) -> Result<(), StorageError> {
    for (receipt, settle) in batch {
        if let Settle::Retry { next, .. } = settle {
            next.validate()?;
            if next.queue != receipt.queue {
                return Err(StorageError::InvalidEnvelope(EnvelopeError::QueueChanged {
                    from: receipt.queue.clone(),
                    to: next.queue.clone(),
                }));
            }
        }
    }
    Ok(())
}

/// Checks a whole batch before any of it is stored.
pub(crate) fn validate_all(envelopes: &[Envelope]) -> Result<(), StorageError> {
    for envelope in envelopes {
        envelope.validate()?;
    }
    Ok(())
}

/// A dead-letter id as the number SQL adapters store, if it is one (written as they write it).
pub(crate) fn letter_number(id: &str) -> Option<i64> {
    id.parse::<i64>()
        .ok()
        .filter(|number| *number > 0 && number.to_string() == id)
}

/// The ids of `ids` that can be dead-letter ids, as numbers.
pub(crate) fn letter_numbers(ids: &[String]) -> Vec<i64> {
    ids.iter().filter_map(|id| letter_number(id)).collect()
}

/// A query's `(after, up_to)` bounds as SQL numbers, open ends as the extremes.
pub(crate) fn id_range(query: &DeadLetterQuery) -> (i64, i64) {
    let number = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
    (
        query.after.map_or(0, number),
        query.up_to.map_or(i64::MAX, number),
    )
}

/// Fresh lease tokens; random so that two processes never mint the same one.
pub(crate) fn new_lease_token() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

/// A stored entry's envelope, or the reason to dead-letter the entry: it cannot be decoded, or
/// it breaks what brokers rely on (an entry stored before a check existed, or by another
/// producer), which would otherwise fail every settle of it.
pub(crate) fn decode_entry(payload: &str) -> Result<Envelope, String> {
    let envelope =
        Envelope::from_json(payload).map_err(|error| format!("undecodable entry: {error}"))?;
    envelope
        .validate()
        .map_err(|error| format!("invalid entry: {error}"))?;
    Ok(envelope)
}
