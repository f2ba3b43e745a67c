//! The in-memory broker: one process, nothing survives it. For tests and demos.
//!
//! Entries are stored as the same JSON text the durable adapters store, so decoding, corrupt
//! entries and dead-lettering behave exactly as they do there.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::Notify;

use super::local_broadcast::LocalChannels;
use super::{
    Broker, ConsumeOptions, DEFAULT_NAMESPACE, DEFAULT_VISIBILITY_TIMEOUT, DeadLetter,
    DeadLetterQuery, Delivery, QueueStats, Receipt, Settle, Subscription, decode_entry,
    new_lease_token, validate_all, validate_settles,
};
use crate::envelope::Envelope;
use crate::storage::StorageError;
use crate::time::Timestamp;

/// A handle on in-memory queues. Clones and [`MemoryBroker::with_namespace`] share storage.
#[derive(Clone)]
pub struct MemoryBroker {
    shared: Arc<Shared>,
    namespace: String,
    visibility_timeout: Duration,
}

#[derive(Default)]
struct Shared {
    state: Mutex<State>,
    /// Woken whenever an entry may have become deliverable.
    changed: Notify,
    channels: LocalChannels,
}

#[derive(Default)]
struct State {
    next_id: u64,
    queues: HashMap<QueueKey, Queue>,
    dead: Vec<(String, DeadLetter)>,
    /// Task ids published through `publish_unique`, by namespace, until they are forgotten.
    unique: HashSet<IdKey>,
    /// Keys claimed through `publish_by_key`, with the task id holding each.
    claimed: HashMap<IdKey, String>,
    /// The same keys by when they are forgotten.
    claimed_expiry: BTreeSet<(Timestamp, IdKey)>,
    /// The same ids by when they are forgotten, so pruning looks only at the expired ones.
    unique_expiry: BTreeSet<(Timestamp, IdKey)>,
}

type QueueKey = (String, String);

/// A namespace and a task id.
type IdKey = (String, String);

/// Entries in delivery order: priority descending, then publication order.
#[derive(Default)]
struct Queue {
    entries: BTreeMap<(Reverse<u8>, u64), Entry>,
    priorities: HashMap<u64, u8>,
}

struct Entry {
    visible_at: Timestamp,
    lease_token: Option<String>,
    deliveries: u32,
    payload: String,
}

impl Entry {
    fn is_leased(&self, now: Timestamp) -> bool {
        self.lease_token.is_some() && self.visible_at > now
    }
}

impl Default for MemoryBroker {
    fn default() -> MemoryBroker {
        MemoryBroker::new()
    }
}

impl MemoryBroker {
    pub fn new() -> MemoryBroker {
        MemoryBroker {
            shared: Arc::default(),
            namespace: DEFAULT_NAMESPACE.to_owned(),
            visibility_timeout: DEFAULT_VISIBILITY_TIMEOUT,
        }
    }

    /// A handle on the same storage that sees only `namespace`.
    pub fn with_namespace(&self, namespace: &str) -> MemoryBroker {
        MemoryBroker {
            namespace: namespace.to_owned(),
            ..self.clone()
        }
    }

    pub fn with_visibility_timeout(mut self, timeout: Duration) -> MemoryBroker {
        self.visibility_timeout = timeout;
        self
    }

    /// Stores `payload` as a queue entry without checking it, the way a corrupted or foreign
    /// entry would sit in a durable broker. Tests use it to exercise dead-lettering.
    pub fn insert_raw(&self, queue: &str, payload: &str) {
        let mut state = self.lock();
        let id = state.next_id();
        state.queues.entry(self.key(queue)).or_default().insert(
            id,
            0,
            Timestamp::now(),
            payload.to_owned(),
        );
        drop(state);
        self.shared.changed.notify_waiters();
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.shared
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn key(&self, queue: &str) -> QueueKey {
        (self.namespace.clone(), queue.to_owned())
    }

    /// Leases what is ready now; otherwise says when something might be.
    fn take_ready(
        &self,
        queues: &[String],
        max: usize,
        lease: Duration,
    ) -> (Vec<Delivery>, Option<Timestamp>) {
        let now = Timestamp::now();
        let leased_until = now.saturating_add(lease);
        let mut state = self.lock();
        let mut candidates = Vec::new();
        let mut next_visible: Option<Timestamp> = None;
        for queue in queues {
            let Some(entries) = state.queues.get(&self.key(queue)) else {
                continue;
            };
            let mut ready = 0;
            for (key, entry) in &entries.entries {
                if entry.visible_at <= now {
                    candidates.push((*key, queue.clone()));
                    ready += 1;
                    if ready == max {
                        break;
                    }
                } else {
                    next_visible =
                        Some(next_visible.map_or(entry.visible_at, |t| t.min(entry.visible_at)));
                }
            }
        }
        candidates.sort_by_key(|(key, _)| *key);
        let mut deliveries = Vec::new();
        let mut corrupt = Vec::new();
        for (key, queue) in candidates {
            if deliveries.len() == max {
                break;
            }
            let entries = state
                .queues
                .get_mut(&self.key(&queue))
                .expect("queue was just read");
            let entry = entries.entries.get_mut(&key).expect("entry was just read");
            match decode_entry(&entry.payload) {
                Ok(envelope) => {
                    let token = new_lease_token();
                    entry.lease_token = Some(token.clone());
                    entry.visible_at = leased_until;
                    entry.deliveries += 1;
                    deliveries.push(Delivery {
                        envelope,
                        receipt: Receipt {
                            queue,
                            entry: key.1.to_string(),
                            token,
                        },
                        deliveries: entry.deliveries,
                        leased_until,
                    });
                }
                Err(reason) => corrupt.push((queue, key.1, reason)),
            }
        }
        for (queue, id, reason) in corrupt {
            tracing::warn!(
                queue,
                entry = id,
                reason,
                "dead-lettering an undecodable entry"
            );
            if let Some(entry) = state
                .queues
                .get_mut(&self.key(&queue))
                .and_then(|q| q.remove(id))
            {
                state.bury(&self.namespace, queue, id, entry.payload, reason, now);
            }
        }
        (deliveries, next_visible)
    }
}

impl State {
    /// The id of the entry `receipt` leases, unless another delivery has replaced that lease
    /// since or the entry is gone.
    fn leased_id(&self, key: &QueueKey, receipt: &Receipt) -> Option<u64> {
        let id: u64 = receipt.entry.parse().ok()?;
        let entry = self.queues.get(key)?.get(id)?;
        (entry.lease_token.as_deref() == Some(receipt.token.as_str())).then_some(id)
    }

    fn next_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    /// Stores a validated envelope on its queue.
    fn store(&mut self, namespace: &str, envelope: &Envelope, now: Timestamp) {
        let id = self.next_id();
        self.queues
            .entry((namespace.to_owned(), envelope.queue.clone()))
            .or_default()
            .insert(
                id,
                envelope.priority,
                envelope.ready_at(now),
                envelope.to_json(),
            );
    }

    /// Forgets the unique ids whose window has passed.
    fn forget_expired(&mut self, now: Timestamp) {
        while self.unique_expiry.first().is_some_and(|(at, _)| *at <= now) {
            let (_, key) = self.unique_expiry.pop_first().expect("just looked at");
            self.unique.remove(&key);
        }
        while self
            .claimed_expiry
            .first()
            .is_some_and(|(at, _)| *at <= now)
        {
            let (_, key) = self.claimed_expiry.pop_first().expect("just looked at");
            self.claimed.remove(&key);
        }
    }

    fn bury(
        &mut self,
        namespace: &str,
        queue: String,
        id: u64,
        payload: String,
        reason: String,
        now: Timestamp,
    ) {
        let letter = DeadLetter::new(id.to_string(), queue, payload, reason, now);
        self.dead.push((namespace.to_owned(), letter));
    }

    /// The dead letters `query` selects, in its order (they are stored oldest first).
    fn dead_in(&self, namespace: &str, query: &DeadLetterQuery) -> Vec<DeadLetter> {
        let selected = self
            .dead
            .iter()
            .filter(|(ns, letter)| ns == namespace && query.selects(letter))
            .map(|(_, letter)| letter);
        let limit = query.limit.unwrap_or(usize::MAX);
        match query.newest_first {
            true => selected.rev().take(limit).cloned().collect(),
            false => selected.take(limit).cloned().collect(),
        }
    }
}

impl Queue {
    fn insert(&mut self, id: u64, priority: u8, visible_at: Timestamp, payload: String) {
        self.priorities.insert(id, priority);
        let entry = Entry {
            visible_at,
            lease_token: None,
            deliveries: 0,
            payload,
        };
        self.entries.insert((Reverse(priority), id), entry);
    }

    fn get(&self, id: u64) -> Option<&Entry> {
        let priority = *self.priorities.get(&id)?;
        self.entries.get(&(Reverse(priority), id))
    }

    fn get_mut(&mut self, id: u64) -> Option<&mut Entry> {
        let priority = *self.priorities.get(&id)?;
        self.entries.get_mut(&(Reverse(priority), id))
    }

    fn remove(&mut self, id: u64) -> Option<Entry> {
        let priority = self.priorities.remove(&id)?;
        self.entries.remove(&(Reverse(priority), id))
    }
}

#[async_trait]
impl Broker for MemoryBroker {
    async fn publish_batch(&self, envelopes: &[Envelope]) -> Result<(), StorageError> {
        validate_all(envelopes)?;
        let now = Timestamp::now();
        let mut state = self.lock();
        for envelope in envelopes {
            state.store(&self.namespace, envelope, now);
        }
        drop(state);
        self.shared.changed.notify_waiters();
        Ok(())
    }

    async fn publish_unique(
        &self,
        envelopes: &[Envelope],
        window: Duration,
    ) -> Result<Vec<bool>, StorageError> {
        validate_all(envelopes)?;
        let now = Timestamp::now();
        let forget_at = now.saturating_add(window);
        let mut state = self.lock();
        state.forget_expired(now);
        let mut stored = Vec::with_capacity(envelopes.len());
        for envelope in envelopes {
            let key = (self.namespace.clone(), envelope.id.clone());
            let fresh = state.unique.insert(key.clone());
            if fresh {
                state.unique_expiry.insert((forget_at, key));
                state.store(&self.namespace, envelope, now);
            }
            stored.push(fresh);
        }
        drop(state);
        if stored.contains(&true) {
            self.shared.changed.notify_waiters();
        }
        Ok(stored)
    }

    async fn publish_by_key(
        &self,
        key: &str,
        envelope: &Envelope,
        window: Duration,
    ) -> Result<Option<String>, StorageError> {
        envelope.validate()?;
        let now = Timestamp::now();
        let mut state = self.lock();
        state.forget_expired(now);
        let key = (self.namespace.clone(), key.to_owned());
        if let Some(holder) = state.claimed.get(&key) {
            return Ok(Some(holder.clone()));
        }
        let until = now.saturating_add(window);
        state.claimed_expiry.insert((until, key.clone()));
        state.claimed.insert(key, envelope.id.clone());
        state.store(&self.namespace, envelope, now);
        drop(state);
        self.shared.changed.notify_waiters();
        Ok(None)
    }

    async fn consume(
        &self,
        queues: &[String],
        options: &ConsumeOptions,
    ) -> Result<Vec<Delivery>, StorageError> {
        let lease = options.lease.unwrap_or(self.visibility_timeout);
        let deadline = tokio::time::Instant::now() + options.wait;
        loop {
            let changed = self.shared.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let (deliveries, next_visible) = self.take_ready(queues, options.max.max(1), lease);
            let now = tokio::time::Instant::now();
            if !deliveries.is_empty() || now >= deadline {
                return Ok(deliveries);
            }
            let wake = next_visible
                .map(|at| now + at.saturating_since(Timestamp::now()))
                .map_or(deadline, |at| at.min(deadline));
            let _ = tokio::time::timeout_at(wake, changed).await;
        }
    }

    async fn settle_many(&self, batch: &[(Receipt, Settle)]) -> Result<Vec<bool>, StorageError> {
        validate_settles(batch.iter().map(|(receipt, settle)| (receipt, settle)))?;
        let now = Timestamp::now();
        let mut state = self.lock();
        let mut held = Vec::with_capacity(batch.len());
        for (receipt, settle) in batch {
            let key = self.key(&receipt.queue);
            let Some(id) = state.leased_id(&key, receipt) else {
                held.push(false);
                continue;
            };
            let queue = state
                .queues
                .get_mut(&key)
                .expect("the lease was just found");
            match settle {
                Settle::Ack => {
                    queue.remove(id);
                }
                Settle::Release(delay) => {
                    let entry = queue.get_mut(id).expect("the lease was just found");
                    entry.lease_token = None;
                    entry.visible_at = now.saturating_add(*delay);
                    entry.deliveries = entry.deliveries.saturating_sub(1);
                }
                Settle::Retry { next, delay } => {
                    queue.remove(id);
                    queue.insert(
                        id,
                        next.priority,
                        now.saturating_add(*delay),
                        next.to_json(),
                    );
                }
                Settle::DeadLetter(reason) => {
                    let entry = queue.remove(id).expect("the lease was just found");
                    let queue = receipt.queue.clone();
                    state.bury(
                        &self.namespace,
                        queue,
                        id,
                        entry.payload,
                        reason.clone(),
                        now,
                    );
                }
            }
            held.push(true);
        }
        drop(state);
        self.shared.changed.notify_waiters();
        Ok(held)
    }

    async fn extend_lease(
        &self,
        receipt: &Receipt,
        lease: Duration,
    ) -> Result<Timestamp, StorageError> {
        let leased_until = Timestamp::now().saturating_add(lease);
        let key = self.key(&receipt.queue);
        let mut state = self.lock();
        let id = state
            .leased_id(&key, receipt)
            .ok_or_else(|| StorageError::LeaseLost(receipt.entry.clone()))?;
        if let Some(entry) = state.queues.get_mut(&key).and_then(|q| q.get_mut(id)) {
            entry.visible_at = leased_until;
        }
        Ok(leased_until)
    }

    async fn dead_letters(&self, query: &DeadLetterQuery) -> Result<Vec<DeadLetter>, StorageError> {
        Ok(self.lock().dead_in(&self.namespace, query))
    }

    async fn requeue_dead_letter(
        &self,
        id: &str,
        envelope: &Envelope,
    ) -> Result<bool, StorageError> {
        envelope.validate()?;
        let mut state = self.lock();
        let Some(at) = state
            .dead
            .iter()
            .position(|(ns, letter)| *ns == self.namespace && letter.id == id)
        else {
            return Ok(false);
        };
        state.dead.remove(at);
        state.store(&self.namespace, envelope, Timestamp::now());
        drop(state);
        self.shared.changed.notify_waiters();
        Ok(true)
    }

    async fn delete_dead_letters(&self, ids: &[String]) -> Result<u64, StorageError> {
        let mut state = self.lock();
        let before = state.dead.len();
        state
            .dead
            .retain(|(ns, letter)| !(*ns == self.namespace && ids.contains(&letter.id)));
        Ok((before - state.dead.len()) as u64)
    }

    async fn purge(&self, queue: &str) -> Result<u64, StorageError> {
        let now = Timestamp::now();
        let mut state = self.lock();
        let Some(entries) = state.queues.get_mut(&self.key(queue)) else {
            return Ok(0);
        };
        let doomed: Vec<u64> = entries
            .entries
            .iter()
            .filter(|(_, entry)| !entry.is_leased(now))
            .map(|((_, id), _)| *id)
            .collect();
        for id in &doomed {
            entries.remove(*id);
        }
        Ok(doomed.len() as u64)
    }

    async fn stats(&self, queue: &str) -> Result<QueueStats, StorageError> {
        let now = Timestamp::now();
        let state = self.lock();
        let mut stats = QueueStats {
            queue: queue.to_owned(),
            ..QueueStats::default()
        };
        if let Some(entries) = state.queues.get(&self.key(queue)) {
            for entry in entries.entries.values() {
                if entry.is_leased(now) {
                    stats.in_flight += 1;
                } else if entry.visible_at > now {
                    stats.delayed += 1;
                } else {
                    stats.ready += 1;
                }
            }
        }
        stats.dead = state
            .dead
            .iter()
            .filter(|(ns, letter)| *ns == self.namespace && letter.queue == queue)
            .count() as u64;
        Ok(stats)
    }

    async fn queues(&self) -> Result<Vec<String>, StorageError> {
        let state = self.lock();
        let mut names: Vec<String> = state
            .queues
            .iter()
            .filter(|((ns, _), queue)| *ns == self.namespace && !queue.entries.is_empty())
            .map(|((_, name), _)| name.clone())
            .chain(
                state
                    .dead
                    .iter()
                    .filter(|(ns, _)| *ns == self.namespace)
                    .map(|(_, letter)| letter.queue.clone()),
            )
            .collect();
        names.sort();
        names.dedup();
        Ok(names)
    }

    async fn broadcast(&self, channel: &str, message: &str) -> Result<(), StorageError> {
        self.shared
            .channels
            .send(&format!("{}:{channel}", self.namespace), message);
        Ok(())
    }

    async fn subscribe(&self, channel: &str) -> Result<Subscription, StorageError> {
        Ok(self
            .shared
            .channels
            .subscribe(&format!("{}:{channel}", self.namespace)))
    }
}
