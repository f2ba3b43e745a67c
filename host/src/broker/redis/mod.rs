//! The Redis Streams broker: many workers on many hosts share one Redis.
//!
//! Keys, inside the namespace (`q` a queue, `p` a priority 0–9):
//! - `q:Q:P`: a stream per queue and priority, read through the consumer group `stem`; each
//!   entry holds `e` (the envelope JSON) and `d` (how often it was delivered before it was last
//!   added).
//! - Leases are the consumer group's pending entries. Each broker instance reads as a consumer
//!   named `INSTANCE:LEASE_MS` for the lease it asks for, so an entry's lease has run out once
//!   it has been idle for longer than the lease in its consumer's name; the next consume takes
//!   it over with `XCLAIM` (which counts the delivery). A receipt's token names the consumer
//!   and the delivery count, so a settle or an extension applies only while the same instance
//!   holds the same delivery; extending resets the idle time.
//! - `ready:Q`: the lanes (priorities) publishes marked, so a consume looks at those first
//!   (an idle look probes all ten, which also finds entries whose mark went missing).
//! - `delayed:Q` (sorted by due time) and `delayed:Q:data`: entries waiting for `not_before`
//!   or a release delay; every consume moves the due ones into their stream.
//! - `takeover:Q`: set for a moment after one consumer looked for expired leases of `Q`, so
//!   that not every consume scans the pending lists.
//! - `dead`, `dead:data`, `dead:seq`: dead letters in order; `dead:count`: per queue;
//!   `queues`: known queue names (pruned when a queue is empty).
//! - `unique:ID`: a task id published through [`Broker::publish_unique`], expiring after its
//!   window; `unique-key:KEY`: the task id that claimed a key through
//!   [`Broker::publish_by_key`], expiring likewise.
//! - Pub/sub: `wake` (a publish wakes waiting consumers at once) and `broadcast:CHANNEL`.
//!
//! A consume is one script (due delayed entries, expired leases, which lanes hold unread
//! entries) and then `XREADGROUP`s sent by the consumer itself, in one pipeline: the entries
//! never pass through Lua, which halves the server's work per task. Every other change of an
//! entry is one Lua script, a batch of settles one script call, and the scripts take the time
//! from the server (`TIME`), so the clocks of worker hosts do not matter. The scripts name
//! their keys from the namespace, so they suit one Redis server (or a replicated pair), not
//! Redis Cluster. Redis 6.2 or later. Queue names cannot contain `:` (see
//! [`crate::envelope::is_valid_queue_name`]), so no two queues share a key.

use std::collections::HashMap;
use std::sync::{Arc, Weak};
use std::time::Duration;

use async_trait::async_trait;
use futures_util::StreamExt;
use redis::Value;
use redis::aio::ConnectionManager;
use tokio::sync::{Notify, mpsc};

use super::{
    Broker, ConsumeOptions, DEFAULT_NAMESPACE, DEFAULT_VISIBILITY_TIMEOUT, DeadLetter,
    DeadLetterIds, DeadLetterQuery, Delivery, QueueStats, Receipt, Settle, Subscription,
    decode_entry, id_range, letter_numbers, validate_all, validate_settles,
};
use crate::backend::TaskStatus;
use crate::backend::redis::STATUSES;
use crate::envelope::{Envelope, MAX_PRIORITY};
use crate::redis::CLOCK;

mod settlements;

use crate::storage::{Periodic, StorageError};
use crate::time::Timestamp;
pub use settlements::RedisSettlements;

const GROUP: &str = "stem";

/// Most sweep calls per upkeep round (each deletes up to 100 old dead letters).
const SWEEP_CALLS: usize = 50;

/// How often a waiting consumer looks again without a wake-up: due delayed entries and
/// expired leases are found this way.
const POLL: Duration = Duration::from_millis(50);

/// How often one consumer (of all of them) looks for expired leases of a queue.
const TAKEOVER_EVERY: Duration = Duration::from_millis(100);

/// The helpers every script starts with.
const PRELUDE: &str = include_str!("prelude.lua");

/// Tuning for [`RedisBroker::connect`].
#[derive(Clone, Debug)]
pub struct RedisBrokerOptions {
    pub namespace: String,
    /// The lease of a delivery when the consumer does not ask for one.
    pub visibility_timeout: Duration,
    /// How often old dead letters are deleted and empty queue names forgotten.
    pub sweeper_interval: Duration,
    /// How long dead letters are kept; `None` keeps them until purged.
    pub dead_letter_retention: Option<Duration>,
}

impl Default for RedisBrokerOptions {
    fn default() -> RedisBrokerOptions {
        RedisBrokerOptions {
            namespace: DEFAULT_NAMESPACE.to_owned(),
            visibility_timeout: DEFAULT_VISIBILITY_TIMEOUT,
            sweeper_interval: Duration::from_secs(60),
            dead_letter_retention: Some(Duration::from_secs(7 * 24 * 3600)),
        }
    }
}

/// A broker on Redis Streams. Clones share the connection and the consumer name.
#[derive(Clone)]
pub struct RedisBroker {
    inner: Arc<Inner>,
}

struct Scripts {
    publish_unique: redis::Script,
    publish_keyed: redis::Script,
    consume: redis::Script,
    settle: redis::Script,
    extend: redis::Script,
    stats: redis::Script,
    purge: redis::Script,
    delete_dead: redis::Script,
    requeue_dead: redis::Script,
    sweep: redis::Script,
}

impl Scripts {
    fn new() -> Scripts {
        let script = |body: &str| redis::Script::new(&format!("{CLOCK}{PRELUDE}\n{body}"));
        Scripts {
            publish_unique: script(include_str!("publish_unique.lua")),
            publish_keyed: script(include_str!("publish_keyed.lua")),
            consume: script(include_str!("consume.lua")),
            settle: settle_script(),
            extend: script(include_str!("extend.lua")),
            stats: script(include_str!("stats.lua")),
            purge: script(include_str!("purge.lua")),
            delete_dead: script(include_str!("delete_dead.lua")),
            requeue_dead: script(include_str!("requeue_dead.lua")),
            sweep: script(include_str!("sweep.lua")),
        }
    }
}

/// The settle script, which records statuses too (for [`RedisSettlements`]).
fn settle_script() -> redis::Script {
    redis::Script::new(&format!(
        "{CLOCK}{PRELUDE}{STATUSES}\n{}",
        include_str!("settle.lua")
    ))
}

/// Adds a batch to a settle script invocation: each entry, and the status to record with it.
fn add_settles<'a>(
    invocation: &mut redis::ScriptInvocation<'_>,
    batch: impl IntoIterator<Item = (&'a Receipt, &'a Settle, Option<&'a TaskStatus>)>,
) {
    for (receipt, settle, status) in batch {
        let (op, text) = match settle {
            Settle::Ack => ("ack".to_owned(), String::new()),
            Settle::Release(delay) => (format!("release|{}", millis(*delay)), String::new()),
            Settle::Retry { next, delay } => (
                format!("retry|{}|{}", millis(*delay), next.priority),
                next.to_json(),
            ),
            Settle::DeadLetter(reason) => ("dead".to_owned(), reason.clone()),
        };
        invocation
            .arg(&receipt.queue)
            .arg(receipt_arg(receipt))
            .arg(op)
            .arg(text);
        match status {
            Some(status) => invocation
                .arg(&status.id)
                .arg(status.state.as_str())
                .arg(status.to_json()),
            None => invocation.arg("").arg("").arg(""),
        };
    }
}

/// A receipt as the scripts read it: `P-ID|DEADLINE|CONSUMER|COUNT|D`.
fn receipt_arg(receipt: &Receipt) -> String {
    format!("{}|{}", receipt.entry, receipt.token)
}

struct Inner {
    client: redis::Client,
    manager: ConnectionManager,
    options: RedisBrokerOptions,
    /// This instance's name; it reads as consumer `INSTANCE:LEASE_MS` of the group.
    instance: String,
    scripts: Scripts,
    /// Woken by publishes anywhere, through the `wake` channel.
    woken: Arc<Notify>,
    listener: std::sync::OnceLock<tokio::task::JoinHandle<()>>,
    _sweeper: Periodic,
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(listener) = self.listener.get() {
            listener.abort();
        }
    }
}

/// A dead letter as the settle script stores it.
#[derive(serde::Deserialize)]
struct StoredDeadLetter {
    queue: String,
    reason: String,
    payload: String,
    dead_at: u64,
}

impl RedisBroker {
    pub async fn connect(
        url: &str,
        options: RedisBrokerOptions,
    ) -> Result<RedisBroker, StorageError> {
        let connection = crate::redis::connect(url).await?;
        let sweeper = {
            let manager = connection.manager.clone();
            let namespace = options.namespace.clone();
            let retention = options.dead_letter_retention.unwrap_or(Duration::ZERO);
            let sweep = Scripts::new().sweep;
            Periodic::spawn(options.sweeper_interval, move || {
                let (mut manager, namespace, sweep) =
                    (manager.clone(), namespace.clone(), sweep.clone());
                async move {
                    // Each call deletes at most 100 old dead letters; a few more calls catch
                    // up with a burst.
                    for _ in 0..SWEEP_CALLS {
                        let swept: Result<u64, _> = sweep
                            .arg(&namespace)
                            .arg(GROUP)
                            .arg(retention.as_millis() as u64)
                            .invoke_async(&mut manager)
                            .await;
                        match swept {
                            Ok(100) => continue,
                            Ok(_) => return,
                            Err(error) => {
                                tracing::warn!(%error, "sweeping old dead letters failed");
                                return;
                            }
                        }
                    }
                }
            })
        };
        Ok(RedisBroker {
            inner: Arc::new(Inner {
                client: connection.client,
                manager: connection.manager,
                options,
                instance: uuid::Uuid::new_v4().simple().to_string(),
                scripts: Scripts::new(),
                woken: Arc::new(Notify::new()),
                listener: std::sync::OnceLock::new(),
                _sweeper: sweeper,
            }),
        })
    }

    fn namespace(&self) -> &str {
        &self.inner.options.namespace
    }

    fn key(&self, suffix: &str) -> String {
        format!("{}:{suffix}", self.namespace())
    }

    fn conn(&self) -> ConnectionManager {
        self.inner.manager.clone()
    }

    /// Starts listening for publishes once; resubscribes after a dropped connection.
    fn listen(&self) {
        let client = self.inner.client.clone();
        let woken: Weak<Notify> = Arc::downgrade(&self.inner.woken);
        let channel = self.key("wake");
        self.inner.listener.get_or_init(|| {
            tokio::spawn(async move {
                loop {
                    let mut pubsub = match client.get_async_pubsub().await {
                        Ok(pubsub) => pubsub,
                        Err(error) => {
                            tracing::warn!(%error, "publish notifications unavailable; polling");
                            tokio::time::sleep(Duration::from_secs(1)).await;
                            continue;
                        }
                    };
                    if pubsub.subscribe(&channel).await.is_err() {
                        continue;
                    }
                    let mut messages = pubsub.on_message();
                    while messages.next().await.is_some() {
                        match woken.upgrade() {
                            Some(woken) => woken.notify_waiters(),
                            None => return,
                        }
                    }
                }
            })
        });
    }

    /// The consumer this instance reads as for `lease`.
    fn consumer(&self, lease: Duration) -> String {
        format!("{}:{}", self.inner.instance, millis(lease))
    }

    /// Leases what is ready now: the consume script moves due entries, takes over expired
    /// leases and delivers a few unread entries or names the lanes that hold more; then one
    /// pipeline reads from those lanes, highest priority first, as many as each holds until
    /// `max`.
    async fn take_ready(
        &self,
        queues: &[String],
        max: usize,
        lease: Duration,
    ) -> Result<Vec<Delivery>, StorageError> {
        let consumer = self.consumer(lease);
        let mut invocation = self.inner.scripts.consume.prepare_invoke();
        invocation
            .arg(self.namespace())
            .arg(GROUP)
            .arg(&consumer)
            .arg(max)
            .arg(millis(self.inner.options.visibility_timeout))
            .arg(millis(TAKEOVER_EVERY));
        for queue in queues {
            invocation.arg(queue);
        }
        type Delivered = (String, String, u32, u32, String);
        let (now, delivered, lanes): (u64, Vec<Delivered>, Vec<(String, u8, i64)>) =
            invocation.invoke_async(&mut self.conn()).await?;
        let leased_until = Timestamp::from_millis(now).saturating_add(lease);
        let deadline = leased_until.as_millis();
        let mut entries: Vec<(Receipt, u32, String)> = delivered
            .into_iter()
            .map(|(queue, entry, before, count, payload)| {
                let receipt = Receipt {
                    queue,
                    entry,
                    token: format!("{deadline}|{consumer}|{count}|{before}"),
                };
                (receipt, before + count, payload)
            })
            .collect();

        let mut room = max.saturating_sub(entries.len());
        let mut reads = Vec::new();
        let mut pipe = redis::pipe();
        for (queue, priority, unread) in lanes {
            if room == 0 {
                break;
            }
            let count = usize::try_from(unread).map_or(room, |unread| unread.min(room));
            room -= count;
            pipe.cmd("XREADGROUP")
                .arg("GROUP")
                .arg(GROUP)
                .arg(&consumer)
                .arg("COUNT")
                .arg(count)
                .arg("STREAMS")
                .arg(self.key(&format!("q:{queue}:{priority}")))
                .arg(">");
            reads.push((queue, priority));
        }
        if !reads.is_empty() {
            let replies: Vec<Value> = pipe.query_async(&mut self.conn()).await?;
            for ((queue, priority), reply) in reads.into_iter().zip(replies) {
                for (id, before, payload) in read_entries(reply) {
                    let receipt = Receipt {
                        queue: queue.clone(),
                        entry: format!("{priority}-{id}"),
                        token: format!("{deadline}|{consumer}|1|{before}"),
                    };
                    entries.push((receipt, before + 1, payload));
                }
            }
        }

        let mut deliveries = Vec::with_capacity(entries.len());
        for (receipt, count, payload) in entries {
            match decode_entry(&payload) {
                Ok(envelope) => deliveries.push(Delivery {
                    envelope,
                    receipt,
                    deliveries: count,
                    leased_until,
                }),
                Err(reason) => {
                    tracing::warn!(
                        queue = receipt.queue,
                        entry = receipt.entry,
                        reason,
                        "dead-lettering an undecodable entry"
                    );
                    self.dead_letter(&receipt, &reason).await?;
                }
            }
        }
        Ok(deliveries)
    }

    /// The ids of the dead letters `query` may select, in its order: the ones it names when
    /// it names dead-letter ids only, else every one in its range.
    async fn dead_ids(&self, query: &DeadLetterQuery) -> Result<Vec<String>, StorageError> {
        if query.id_kind == DeadLetterIds::Letter && !query.ids.is_empty() {
            let (after, up_to) = id_range(query);
            let mut numbers: Vec<i64> = letter_numbers(&query.ids)
                .into_iter()
                .filter(|n| *n > after && *n <= up_to)
                .collect();
            numbers.sort_unstable();
            numbers.dedup();
            if query.newest_first {
                numbers.reverse();
            }
            return Ok(numbers.iter().map(i64::to_string).collect());
        }
        let low = query
            .after
            .map_or("-inf".to_owned(), |after| format!("({after}"));
        let high = query
            .up_to
            .map_or("+inf".to_owned(), |up_to| up_to.to_string());
        let mut range = redis::cmd("ZRANGE");
        range.arg(self.key("dead"));
        match query.newest_first {
            true => range.arg(high).arg(low).arg("BYSCORE").arg("REV"),
            false => range.arg(low).arg(high).arg("BYSCORE"),
        };
        Ok(range.query_async(&mut self.conn()).await?)
    }
}

/// Dead letters read at once while looking for the ones a query selects.
const DEAD_LETTERS_PER_READ: usize = 500;

#[async_trait]
impl Broker for RedisBroker {
    async fn publish_batch(&self, envelopes: &[Envelope]) -> Result<(), StorageError> {
        validate_all(envelopes)?;
        if envelopes.is_empty() {
            return Ok(());
        }
        let now = Timestamp::now();
        let mut pipe = redis::pipe();
        pipe.atomic();
        let mut lanes: HashMap<(&str, u8), u64> = HashMap::new();
        for envelope in envelopes {
            let queue = &envelope.queue;
            let ready_at = envelope.ready_at(now);
            if ready_at > now {
                let id = uuid::Uuid::new_v4().simple().to_string();
                let delayed = self.key(&format!("delayed:{queue}"));
                pipe.cmd("HSET")
                    .arg(format!("{delayed}:data"))
                    .arg(&id)
                    .arg(format!("{}|0|{}", envelope.priority, envelope.to_json()))
                    .ignore()
                    .cmd("ZADD")
                    .arg(&delayed)
                    .arg(ready_at.as_millis())
                    .arg(&id)
                    .ignore();
            } else {
                pipe.cmd("XADD")
                    .arg(self.key(&format!("q:{queue}:{}", envelope.priority)))
                    .arg("*")
                    .arg("d")
                    .arg(0)
                    .arg("e")
                    .arg(envelope.to_json())
                    .ignore();
                *lanes.entry((queue, envelope.priority)).or_default() += 1;
            }
        }
        let mut queues: Vec<&str> = envelopes.iter().map(|e| e.queue.as_str()).collect();
        queues.sort_unstable();
        queues.dedup();
        for ((queue, priority), count) in lanes {
            pipe.cmd("HINCRBY")
                .arg(self.key(&format!("ready:{queue}")))
                .arg(priority)
                .arg(count)
                .ignore();
        }
        pipe.cmd("SADD")
            .arg(self.key("queues"))
            .arg(&queues)
            .ignore();
        pipe.cmd("PUBLISH")
            .arg(self.key("wake"))
            .arg("published")
            .ignore();
        let () = pipe.query_async(&mut self.conn()).await?;
        Ok(())
    }

    async fn publish_unique(
        &self,
        envelopes: &[Envelope],
        window: Duration,
    ) -> Result<Vec<bool>, StorageError> {
        validate_all(envelopes)?;
        if envelopes.is_empty() {
            return Ok(Vec::new());
        }
        let now = Timestamp::now();
        let mut invocation = self.inner.scripts.publish_unique.prepare_invoke();
        // `PX` takes no zero.
        invocation
            .arg(self.namespace())
            .arg(GROUP)
            .arg(millis(window).max(1));
        for envelope in envelopes {
            let (due, delayed_id) = delay_slot(envelope, now);
            invocation
                .arg(&envelope.id)
                .arg(&envelope.queue)
                .arg(envelope.priority)
                .arg(due)
                .arg(delayed_id)
                .arg(envelope.to_json());
        }
        let stored: Vec<i64> = invocation.invoke_async(&mut self.conn()).await?;
        Ok(stored.into_iter().map(|done| done == 1).collect())
    }

    async fn publish_by_key(
        &self,
        key: &str,
        envelope: &Envelope,
        window: Duration,
    ) -> Result<Option<String>, StorageError> {
        envelope.validate()?;
        let (due, delayed_id) = delay_slot(envelope, Timestamp::now());
        let holder: Option<String> = self
            .inner
            .scripts
            .publish_keyed
            .prepare_invoke()
            .arg(self.namespace())
            .arg(GROUP)
            .arg(millis(window).max(1))
            .arg(key)
            .arg(&envelope.id)
            .arg(&envelope.queue)
            .arg(envelope.priority)
            .arg(due)
            .arg(delayed_id)
            .arg(envelope.to_json())
            .invoke_async(&mut self.conn())
            .await?;
        Ok(holder)
    }

    async fn consume(
        &self,
        queues: &[String],
        options: &ConsumeOptions,
    ) -> Result<Vec<Delivery>, StorageError> {
        if queues.is_empty() {
            return Ok(Vec::new());
        }
        let lease = options
            .lease
            .unwrap_or(self.inner.options.visibility_timeout);
        if !options.wait.is_zero() {
            self.listen();
        }
        // A consume's leases are written by one script; keep it to a size Lua handles well.
        let max = options.max.clamp(1, 1000);
        crate::wait::until(
            &self.inner.woken,
            options.wait,
            POLL,
            || self.take_ready(queues, max, lease),
            |deliveries| !deliveries.is_empty(),
        )
        .await
    }

    async fn settle_many(&self, batch: &[(Receipt, Settle)]) -> Result<Vec<bool>, StorageError> {
        validate_settles(batch.iter().map(|(receipt, settle)| (receipt, settle)))?;
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        let mut invocation = self.inner.scripts.settle.prepare_invoke();
        invocation.arg(self.namespace()).arg(GROUP).arg(0).arg(0);
        add_settles(
            &mut invocation,
            batch
                .iter()
                .map(|(receipt, settle)| (receipt, settle, None)),
        );
        let held: Vec<i64> = invocation.invoke_async(&mut self.conn()).await?;
        Ok(held.into_iter().map(|done| done == 1).collect())
    }

    async fn extend_lease(
        &self,
        receipt: &Receipt,
        lease: Duration,
    ) -> Result<Timestamp, StorageError> {
        let until: u64 = self
            .inner
            .scripts
            .extend
            .arg(self.namespace())
            .arg(GROUP)
            .arg(&receipt.queue)
            .arg(receipt_arg(receipt))
            .arg(millis(lease))
            .invoke_async(&mut self.conn())
            .await?;
        if until == 0 {
            return Err(StorageError::LeaseLost(receipt.entry.clone()));
        }
        Ok(Timestamp::from_millis(until))
    }

    async fn dead_letters(&self, query: &DeadLetterQuery) -> Result<Vec<DeadLetter>, StorageError> {
        let limit = query.limit.unwrap_or(usize::MAX);
        let mut letters = Vec::new();
        if limit == 0 {
            return Ok(letters);
        }
        let ids = self.dead_ids(query).await?;
        let mut conn = self.conn();
        for chunk in ids.chunks(DEAD_LETTERS_PER_READ) {
            let texts: Vec<Option<String>> = redis::cmd("HMGET")
                .arg(self.key("dead:data"))
                .arg(chunk)
                .query_async(&mut conn)
                .await?;
            for (id, text) in chunk.iter().zip(texts) {
                let Some(text) = text else { continue };
                let stored: StoredDeadLetter = serde_json::from_str(&text)
                    .map_err(|e| StorageError::corrupt(format!("dead letter {id}"), e))?;
                let letter = DeadLetter::new(
                    id.clone(),
                    stored.queue,
                    stored.payload,
                    stored.reason,
                    Timestamp::from_millis(stored.dead_at),
                );
                if query.selects(&letter) {
                    letters.push(letter);
                    if letters.len() == limit {
                        return Ok(letters);
                    }
                }
            }
        }
        Ok(letters)
    }

    async fn delete_dead_letters(&self, ids: &[String]) -> Result<u64, StorageError> {
        if ids.is_empty() {
            return Ok(0);
        }
        let mut invocation = self.inner.scripts.delete_dead.prepare_invoke();
        invocation.arg(self.namespace()).arg(GROUP);
        for id in ids {
            invocation.arg(id);
        }
        Ok(invocation.invoke_async(&mut self.conn()).await?)
    }

    async fn requeue_dead_letter(
        &self,
        id: &str,
        envelope: &Envelope,
    ) -> Result<bool, StorageError> {
        envelope.validate()?;
        let (due, delayed_id) = delay_slot(envelope, Timestamp::now());
        let moved: i64 = self
            .inner
            .scripts
            .requeue_dead
            .arg(self.namespace())
            .arg(GROUP)
            .arg(id)
            .arg(&envelope.queue)
            .arg(envelope.priority)
            .arg(due)
            .arg(delayed_id)
            .arg(envelope.to_json())
            .invoke_async(&mut self.conn())
            .await?;
        Ok(moved == 1)
    }

    async fn purge(&self, queue: &str) -> Result<u64, StorageError> {
        Ok(self
            .inner
            .scripts
            .purge
            .arg(self.namespace())
            .arg(GROUP)
            .arg(queue)
            .arg(millis(self.inner.options.visibility_timeout))
            .invoke_async(&mut self.conn())
            .await?)
    }

    async fn stats(&self, queue: &str) -> Result<QueueStats, StorageError> {
        let (ready, delayed, in_flight, dead): (i64, u64, u64, u64) = self
            .inner
            .scripts
            .stats
            .arg(self.namespace())
            .arg(GROUP)
            .arg(queue)
            .arg(millis(self.inner.options.visibility_timeout))
            .invoke_async(&mut self.conn())
            .await?;
        Ok(QueueStats {
            queue: queue.to_owned(),
            ready: u64::try_from(ready).unwrap_or(0),
            delayed,
            in_flight,
            dead,
        })
    }

    async fn queues(&self) -> Result<Vec<String>, StorageError> {
        let (known, dead): (Vec<String>, HashMap<String, i64>) = redis::pipe()
            .cmd("SMEMBERS")
            .arg(self.key("queues"))
            .cmd("HGETALL")
            .arg(self.key("dead:count"))
            .query_async(&mut self.conn())
            .await?;
        let mut names = Vec::new();
        for queue in known.into_iter().chain(dead.keys().cloned()) {
            if names.contains(&queue) {
                continue;
            }
            let stats = self.stats(&queue).await?;
            if stats.ready + stats.delayed + stats.in_flight + stats.dead > 0 {
                names.push(queue);
            }
        }
        names.sort();
        Ok(names)
    }

    async fn broadcast(&self, channel: &str, message: &str) -> Result<(), StorageError> {
        let () = redis::cmd("PUBLISH")
            .arg(self.key(&format!("broadcast:{channel}")))
            .arg(message)
            .query_async(&mut self.conn())
            .await?;
        Ok(())
    }

    async fn subscribe(&self, channel: &str) -> Result<Subscription, StorageError> {
        let mut pubsub = self.inner.client.get_async_pubsub().await?;
        pubsub
            .subscribe(self.key(&format!("broadcast:{channel}")))
            .await?;
        let (sender, receiver) = mpsc::channel(super::SUBSCRIPTION_BUFFER);
        let feeder = tokio::spawn(async move {
            let mut messages = pubsub.into_on_message();
            while let Some(message) = messages.next().await {
                let Ok(text) = message.get_payload::<String>() else {
                    continue;
                };
                if sender.send(text).await.is_err() {
                    return;
                }
            }
        });
        Ok(Subscription::fed_by(receiver, feeder))
    }
}

/// Where the scripts put an entry: `(0, "")` when it is ready at `now`, else the millisecond
/// it is due and a fresh id for its place in the delayed set.
fn delay_slot(envelope: &Envelope, now: Timestamp) -> (u64, String) {
    let ready_at = envelope.ready_at(now);
    if ready_at > now {
        (
            ready_at.as_millis(),
            uuid::Uuid::new_v4().simple().to_string(),
        )
    } else {
        (0, String::new())
    }
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// The entries of one stream's `XREADGROUP` reply: id, the deliveries before (`d`) and the
/// stored envelope (`e`). An entry without a readable `e` comes back with an empty one, to be
/// dead-lettered as undecodable.
fn read_entries(reply: Value) -> Vec<(String, u32, String)> {
    let text = |value: &Value| match value {
        Value::BulkString(bytes) => String::from_utf8_lossy(bytes).into_owned(),
        Value::SimpleString(text) => text.clone(),
        _ => String::new(),
    };
    let Value::Array(streams) = reply else {
        return Vec::new();
    };
    let mut read = Vec::new();
    for stream in streams {
        let Value::Array(mut parts) = stream else {
            continue;
        };
        let Some(Value::Array(entries)) = parts.pop() else {
            continue;
        };
        for entry in entries {
            let Value::Array(entry) = entry else { continue };
            let [id, Value::Array(fields)] = entry.as_slice() else {
                continue;
            };
            let (mut before, mut payload) = (0, String::new());
            for pair in fields.chunks(2) {
                if let [name, value] = pair {
                    match text(name).as_str() {
                        "d" => before = text(value).parse().unwrap_or(0),
                        "e" => payload = text(value),
                        _ => {}
                    }
                }
            }
            read.push((text(id), before, payload));
        }
    }
    read
}

/// Priorities are single digits in keys and members; the envelope check keeps them so.
const _: () = assert!(MAX_PRIORITY <= 9);
