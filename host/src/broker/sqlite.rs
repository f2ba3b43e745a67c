//! The SQLite broker: durable queues in one local file, no infrastructure.
//!
//! Limits, as for every SQLite adapter: one host only (the file must be on local disk);
//! consumers poll, so an idle queue answers within [`SqliteBrokerOptions::poll_interval`]
//! (publishes from the same process wake consumers at once); SQLite allows one writer at a
//! time, so keep the broker and the result backend in separate files. Broadcast messages are
//! rows every subscriber polls for (as often as consumers do), kept for
//! [`BROADCAST_RETENTION`]: they reach every process that has the file open.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::Row;
use sqlx::sqlite::SqlitePool;
use tokio::sync::{Notify, mpsc};

use super::{
    Broker, ConsumeOptions, DEFAULT_NAMESPACE, DEFAULT_VISIBILITY_TIMEOUT, DeadLetter,
    DeadLetterIds, DeadLetterQuery, Delivery, QueueStats, Receipt, SUBSCRIPTION_BUFFER, Settle,
    Subscription, decode_entry, id_range, letter_number, letter_numbers, new_lease_token,
    validate_all, validate_settles,
};
use crate::envelope::Envelope;
use crate::sqlite::{self, placeholders};
use crate::storage::Periodic;
use crate::storage::StorageError;
use crate::time::Timestamp;

const MIGRATIONS: &[&str] = &[
    "
    CREATE TABLE stem_queue_entries (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        namespace TEXT NOT NULL,
        queue TEXT NOT NULL,
        priority INTEGER NOT NULL,
        visible_at INTEGER NOT NULL,
        lease_token TEXT,
        deliveries INTEGER NOT NULL DEFAULT 0,
        payload TEXT NOT NULL
    );
    CREATE INDEX stem_queue_entries_order
        ON stem_queue_entries (namespace, queue, priority DESC, id);
    CREATE TABLE stem_dead_letters (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        namespace TEXT NOT NULL,
        queue TEXT NOT NULL,
        task_id TEXT,
        reason TEXT NOT NULL,
        payload TEXT NOT NULL,
        dead_at INTEGER NOT NULL
    );
    CREATE INDEX stem_dead_letters_queue ON stem_dead_letters (namespace, queue, id);
    CREATE INDEX stem_dead_letters_task ON stem_dead_letters (namespace, task_id);
",
    "
    CREATE INDEX stem_queue_entries_visible ON stem_queue_entries (namespace, queue, visible_at);
",
    "
    CREATE TABLE stem_unique_ids (
        namespace TEXT NOT NULL,
        task_id TEXT NOT NULL,
        expires_at INTEGER NOT NULL,
        PRIMARY KEY (namespace, task_id)
    );
    CREATE INDEX stem_unique_ids_expiry ON stem_unique_ids (expires_at);
",
    "
    CREATE TABLE stem_broadcasts (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        namespace TEXT NOT NULL,
        channel TEXT NOT NULL,
        message TEXT NOT NULL,
        sent_at INTEGER NOT NULL
    );
    CREATE INDEX stem_broadcasts_channel ON stem_broadcasts (namespace, channel, id);
    CREATE INDEX stem_broadcasts_age ON stem_broadcasts (sent_at);
",
    "
    CREATE TABLE stem_unique_keys (
        namespace TEXT NOT NULL,
        key TEXT NOT NULL,
        task_id TEXT NOT NULL,
        claim TEXT NOT NULL,
        expires_at INTEGER NOT NULL,
        PRIMARY KEY (namespace, key)
    );
    CREATE INDEX stem_unique_keys_expiry ON stem_unique_keys (expires_at);
",
];

/// How long broadcast messages are kept for subscribers to read: far longer than any poll.
pub const BROADCAST_RETENTION: Duration = Duration::from_secs(60);

/// Broadcast messages a subscriber reads per poll.
const BROADCAST_BATCH: i64 = 256;

/// Tuning for [`SqliteBroker::open`].
#[derive(Clone, Debug)]
pub struct SqliteBrokerOptions {
    /// Keeps environments sharing one file apart.
    pub namespace: String,
    /// The lease of a delivery when the consumer does not ask for one.
    pub visibility_timeout: Duration,
    /// How often a waiting consumer looks for due entries.
    pub poll_interval: Duration,
    /// How often expired dead letters and forgotten unique ids are deleted.
    pub sweeper_interval: Duration,
    /// How long dead letters are kept; `None` keeps them until purged.
    pub dead_letter_retention: Option<Duration>,
    pub max_connections: u32,
}

impl Default for SqliteBrokerOptions {
    fn default() -> SqliteBrokerOptions {
        SqliteBrokerOptions {
            namespace: DEFAULT_NAMESPACE.to_owned(),
            visibility_timeout: DEFAULT_VISIBILITY_TIMEOUT,
            poll_interval: Duration::from_millis(20),
            sweeper_interval: Duration::from_secs(60),
            dead_letter_retention: Some(Duration::from_secs(7 * 24 * 3600)),
            max_connections: 4,
        }
    }
}

/// A broker on a SQLite file. Clones share the connection pool.
#[derive(Clone)]
pub struct SqliteBroker {
    inner: Arc<Inner>,
}

struct Inner {
    pool: SqlitePool,
    options: SqliteBrokerOptions,
    /// Wakes consumers of this broker when it publishes.
    published: Notify,
    _sweeper: Periodic,
}

impl SqliteBroker {
    /// Opens the broker in the file at `path`, creating and migrating it if needed.
    pub async fn open(
        path: impl AsRef<Path>,
        options: SqliteBrokerOptions,
    ) -> Result<SqliteBroker, StorageError> {
        let path = path.as_ref();
        let pool = sqlite::open(path, options.max_connections).await?;
        sqlite::migrate(&pool, "broker", MIGRATIONS).await?;
        let sweeper = {
            let pool = pool.clone();
            let namespace = options.namespace.clone();
            let retention = options.dead_letter_retention;
            Periodic::spawn(options.sweeper_interval, move || {
                sweep(pool.clone(), namespace.clone(), retention)
            })
        };
        Ok(SqliteBroker {
            inner: Arc::new(Inner {
                pool,
                options,
                published: Notify::new(),
                _sweeper: sweeper,
            }),
        })
    }

    fn namespace(&self) -> &str {
        &self.inner.options.namespace
    }

    fn pool(&self) -> &SqlitePool {
        &self.inner.pool
    }

    /// Leases what is ready now, dead-lettering entries that cannot be decoded.
    async fn take_ready(
        &self,
        queues: &[String],
        max: usize,
        lease: Duration,
    ) -> Result<Vec<Delivery>, StorageError> {
        let now = Timestamp::now();
        if !self.any_ready(queues, now).await? {
            return Ok(Vec::new());
        }
        let leased_until = now.saturating_add(lease);
        let token = new_lease_token();
        // From one queue, in delivery order, stopping at `max`: the order index, not the
        // `visible_at` one, which would make SQLite sort every ready entry on each claim.
        // Several queues are merged by a sort either way; there the `visible_at` index reads
        // only ready entries.
        let hint = match queues.len() {
            1 => "INDEXED BY stem_queue_entries_order",
            _ => "",
        };
        let sql = format!(
            "UPDATE stem_queue_entries
             SET lease_token = ?, visible_at = ?, deliveries = deliveries + 1
             WHERE id IN (
                 SELECT id FROM stem_queue_entries {hint}
                 WHERE namespace = ? AND queue IN ({}) AND visible_at <= ?
                 ORDER BY priority DESC, id
                 LIMIT ?)
             RETURNING id, queue, priority, deliveries, payload",
            placeholders(queues.len())
        );
        let mut query = sqlx::query(&sql)
            .bind(&token)
            .bind(leased_until.as_sql())
            .bind(self.namespace());
        for queue in queues {
            query = query.bind(queue);
        }
        let mut rows = query
            .bind(now.as_sql())
            .bind(i64::try_from(max).unwrap_or(i64::MAX))
            .fetch_all(self.pool())
            .await?;
        rows.sort_by_key(|row| (-row.get::<i64, _>("priority"), row.get::<i64, _>("id")));
        let mut deliveries = Vec::with_capacity(rows.len());
        for row in rows {
            let id: i64 = row.get("id");
            let queue: String = row.get("queue");
            let payload: String = row.get("payload");
            let receipt = Receipt {
                queue,
                entry: id.to_string(),
                token: token.clone(),
            };
            match decode_entry(&payload) {
                Ok(envelope) => deliveries.push(Delivery {
                    envelope,
                    receipt,
                    deliveries: u32::try_from(row.get::<i64, _>("deliveries")).unwrap_or(u32::MAX),
                    leased_until,
                }),
                Err(reason) => {
                    tracing::warn!(
                        queue = receipt.queue,
                        entry = id,
                        reason,
                        "dead-lettering an undecodable entry"
                    );
                    self.dead_letter(&receipt, &reason).await?;
                }
            }
        }
        Ok(deliveries)
    }

    /// Whether anything is deliverable. Idle consumers poll with this read, so they do not
    /// take SQLite's one write lock away from producers and other consumers for nothing.
    async fn any_ready(&self, queues: &[String], now: Timestamp) -> Result<bool, StorageError> {
        let sql = format!(
            "SELECT EXISTS (SELECT 1 FROM stem_queue_entries
                            WHERE namespace = ? AND queue IN ({}) AND visible_at <= ?)",
            placeholders(queues.len())
        );
        let mut query = sqlx::query_scalar(&sql).bind(self.namespace());
        for queue in queues {
            query = query.bind(queue);
        }
        Ok(query.bind(now.as_sql()).fetch_one(self.pool()).await?)
    }

    async fn select_dead(&self, query: &DeadLetterQuery) -> Result<Vec<DeadLetter>, StorageError> {
        let mut sql = String::from(
            "SELECT id, queue, reason, payload, dead_at FROM stem_dead_letters WHERE namespace = ?",
        );
        if query.queue.is_some() {
            sql.push_str(" AND queue = ?");
        }
        // Lists of ids are bound as one JSON array each: any number of them fits in the two
        // bound values, far below SQLite's limit.
        let (letters, tasks) = id_lists(query);
        match (&letters, &tasks) {
            (Some(_), Some(_)) => sql.push_str(
                " AND (id IN (SELECT value FROM json_each(?))
                       OR task_id IN (SELECT value FROM json_each(?)))",
            ),
            (Some(_), None) => sql.push_str(" AND id IN (SELECT value FROM json_each(?))"),
            (None, Some(_)) => sql.push_str(" AND task_id IN (SELECT value FROM json_each(?))"),
            (None, None) => {}
        }
        sql.push_str(" AND id > ? AND id <= ?");
        sql.push_str(match query.newest_first {
            true => " ORDER BY id DESC LIMIT ?",
            false => " ORDER BY id LIMIT ?",
        });
        let mut select = sqlx::query(&sql).bind(self.namespace());
        if let Some(queue) = &query.queue {
            select = select.bind(queue);
        }
        for list in [letters, tasks].into_iter().flatten() {
            select = select.bind(list);
        }
        let (after, up_to) = id_range(query);
        select = select.bind(after).bind(up_to);
        let limit = query
            .limit
            .map_or(i64::MAX, |n| i64::try_from(n).unwrap_or(i64::MAX));
        let rows = select.bind(limit).fetch_all(self.pool()).await?;
        Ok(rows
            .into_iter()
            .map(|row| {
                DeadLetter::new(
                    row.get::<i64, _>("id").to_string(),
                    row.get("queue"),
                    row.get("payload"),
                    row.get("reason"),
                    Timestamp::from_sql(row.get("dead_at")),
                )
            })
            .collect())
    }
}

/// The query's dead-letter ids and task ids, each as a JSON array, when it selects by them.
fn id_lists(query: &DeadLetterQuery) -> (Option<String>, Option<String>) {
    if query.ids.is_empty() {
        return (None, None);
    }
    let letters = || serde_json::to_string(&letter_numbers(&query.ids)).expect("serialises");
    let tasks = || serde_json::to_string(&query.ids).expect("strings serialise");
    match query.id_kind {
        DeadLetterIds::Either => (Some(letters()), Some(tasks())),
        DeadLetterIds::Letter => (Some(letters()), None),
        DeadLetterIds::Task => (None, Some(tasks())),
    }
}

/// Acks deleted by one statement, well within SQLite's limit of bound values.
const ACKS_PER_STATEMENT: usize = 500;

/// Deletes dead letters older than the retention, and unique ids whose window has passed
/// (of every namespace: an expired id counts as absent in any of them).
async fn sweep(pool: SqlitePool, namespace: String, retention: Option<Duration>) {
    let now = Timestamp::now();
    if let Some(retention) = retention {
        let cutoff = Timestamp::from_millis(
            now.as_millis()
                .saturating_sub(u64::try_from(retention.as_millis()).unwrap_or(u64::MAX)),
        );
        let swept =
            sqlx::query("DELETE FROM stem_dead_letters WHERE namespace = ? AND dead_at < ?")
                .bind(&namespace)
                .bind(cutoff.as_sql())
                .execute(&pool)
                .await;
        if let Err(error) = swept {
            tracing::warn!(%error, "sweeping expired dead letters failed");
        }
    }
    let old = now
        .as_millis()
        .saturating_sub(BROADCAST_RETENTION.as_millis() as u64);
    let swept = sqlx::query("DELETE FROM stem_broadcasts WHERE sent_at < ?")
        .bind(Timestamp::from_millis(old).as_sql())
        .execute(&pool)
        .await;
    if let Err(error) = swept {
        tracing::warn!(%error, "sweeping old broadcast messages failed");
    }
    for table in ["stem_unique_ids", "stem_unique_keys"] {
        let swept = sqlx::query(&format!("DELETE FROM {table} WHERE expires_at <= ?"))
            .bind(now.as_sql())
            .execute(&pool)
            .await;
        if let Err(error) = swept {
            tracing::warn!(%error, table, "sweeping forgotten unique ids failed");
        }
    }
}

/// Polls for the channel's messages after `last` and hands them to the subscriber, until the
/// subscription is dropped.
async fn feed_subscriber(
    broker: SqliteBroker,
    channel: String,
    mut last: i64,
    sender: mpsc::Sender<String>,
) {
    let mut ticks = tokio::time::interval(broker.inner.options.poll_interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let rows = sqlx::query(
            "SELECT id, message FROM stem_broadcasts
             WHERE namespace = ? AND channel = ? AND id > ? ORDER BY id LIMIT ?",
        )
        .bind(broker.namespace())
        .bind(&channel)
        .bind(last)
        .bind(BROADCAST_BATCH)
        .fetch_all(broker.pool())
        .await;
        match rows {
            Ok(rows) => {
                for row in rows {
                    last = row.get("id");
                    if sender.send(row.get("message")).await.is_err() {
                        return;
                    }
                }
            }
            Err(error) => tracing::warn!(%error, "reading broadcast messages failed"),
        }
        if sender.is_closed() {
            return;
        }
    }
}

/// Stores a validated envelope as a queue entry.
async fn insert_entry(
    conn: &mut sqlx::SqliteConnection,
    namespace: &str,
    envelope: &Envelope,
    now: Timestamp,
) -> Result<(), StorageError> {
    sqlx::query(
        "INSERT INTO stem_queue_entries (namespace, queue, priority, visible_at, payload)
         VALUES (?, ?, ?, ?, ?)",
    )
    .bind(namespace)
    .bind(&envelope.queue)
    .bind(i64::from(envelope.priority))
    .bind(envelope.ready_at(now).as_sql())
    .bind(envelope.to_json())
    .execute(conn)
    .await?;
    Ok(())
}

/// Moves entry `id` to the dead letters, if `token` (when given) still leases it; returns
/// how many entries moved.
async fn bury(
    tx: &mut sqlx::SqliteConnection,
    namespace: &str,
    id: i64,
    token: Option<&str>,
    reason: &str,
    now: Timestamp,
) -> Result<u64, StorageError> {
    let removed = sqlx::query(
        "DELETE FROM stem_queue_entries
         WHERE id = ? AND namespace = ? AND (? IS NULL OR lease_token = ?)
         RETURNING queue, payload",
    )
    .bind(id)
    .bind(namespace)
    .bind(token)
    .bind(token)
    .fetch_optional(&mut *tx)
    .await?;
    let Some(removed) = removed else {
        return Ok(0);
    };
    let payload: String = removed.get("payload");
    let task_id = decode_entry(&payload).ok().map(|e| e.id);
    sqlx::query(
        "INSERT INTO stem_dead_letters (namespace, queue, task_id, reason, payload, dead_at)
         VALUES (?, ?, ?, ?, ?, ?)",
    )
    .bind(namespace)
    .bind(removed.get::<String, _>("queue"))
    .bind(task_id)
    .bind(reason)
    .bind(payload)
    .bind(now.as_sql())
    .execute(&mut *tx)
    .await?;
    Ok(1)
}

#[async_trait]
impl Broker for SqliteBroker {
    async fn publish_batch(&self, envelopes: &[Envelope]) -> Result<(), StorageError> {
        validate_all(envelopes)?;
        let now = Timestamp::now();
        let mut tx = self.pool().begin().await?;
        for envelope in envelopes {
            insert_entry(&mut tx, self.namespace(), envelope, now).await?;
        }
        tx.commit().await?;
        self.inner.published.notify_waiters();
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
        let mut seen = std::collections::HashSet::new();
        let mut stored = Vec::with_capacity(envelopes.len());
        // The first statement writes, so the transaction takes SQLite's write lock at once.
        let mut tx = self.pool().begin().await?;
        for envelope in envelopes {
            let remembered = seen.insert(envelope.id.as_str())
                && sqlx::query(
                    "INSERT INTO stem_unique_ids (namespace, task_id, expires_at) VALUES (?, ?, ?)
                     ON CONFLICT (namespace, task_id) DO UPDATE SET expires_at = excluded.expires_at
                     WHERE stem_unique_ids.expires_at <= ?",
                )
                .bind(self.namespace())
                .bind(&envelope.id)
                .bind(forget_at.as_sql())
                .bind(now.as_sql())
                .execute(&mut *tx)
                .await?
                .rows_affected()
                    > 0;
            if remembered {
                insert_entry(&mut tx, self.namespace(), envelope, now).await?;
            }
            stored.push(remembered);
        }
        tx.commit().await?;
        if stored.contains(&true) {
            self.inner.published.notify_waiters();
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
        let claim = uuid::Uuid::new_v4().simple().to_string();
        // The first statement writes, so the transaction takes SQLite's write lock at once. It
        // claims the key when it is free or forgotten, and returns who holds it either way.
        let mut tx = self.pool().begin().await?;
        let (holder, held_by): (String, String) = sqlx::query_as(
            "INSERT INTO stem_unique_keys (namespace, key, task_id, claim, expires_at)
             VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT (namespace, key) DO UPDATE SET
                 task_id = CASE WHEN expires_at <= ?6 THEN excluded.task_id ELSE task_id END,
                 claim = CASE WHEN expires_at <= ?6 THEN excluded.claim ELSE claim END,
                 expires_at = CASE WHEN expires_at <= ?6 THEN excluded.expires_at
                     ELSE expires_at END
             RETURNING task_id, claim",
        )
        .bind(self.namespace())
        .bind(key)
        .bind(&envelope.id)
        .bind(&claim)
        .bind(now.saturating_add(window).as_sql())
        .bind(now.as_sql())
        .fetch_one(&mut *tx)
        .await?;
        if held_by != claim {
            tx.rollback().await?;
            return Ok(Some(holder));
        }
        insert_entry(&mut tx, self.namespace(), envelope, now).await?;
        tx.commit().await?;
        self.inner.published.notify_waiters();
        Ok(None)
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
        let max = options.max.max(1);
        crate::wait::until(
            &self.inner.published,
            options.wait,
            self.inner.options.poll_interval,
            || self.take_ready(queues, max, lease),
            |deliveries| !deliveries.is_empty(),
        )
        .await
    }

    async fn settle_many(&self, batch: &[(Receipt, Settle)]) -> Result<Vec<bool>, StorageError> {
        validate_settles(batch.iter().map(|(receipt, settle)| (receipt, settle)))?;
        let now = Timestamp::now();
        let namespace = self.namespace();
        let mut held = vec![false; batch.len()];
        let mut released = false;
        let mut tx = self.pool().begin().await?;
        // Acks, the usual settle, go in one statement per lease token (the deliveries of one
        // consume share theirs) and slice.
        let mut acks: Vec<(&str, usize, i64)> = batch
            .iter()
            .enumerate()
            .filter(|(_, (_, settle))| *settle == Settle::Ack)
            .filter_map(|(at, (receipt, _))| {
                let id = receipt.entry.parse::<i64>().ok()?;
                Some((receipt.token.as_str(), at, id))
            })
            .collect();
        acks.sort_unstable();
        for same_token in acks.chunk_by(|a, b| a.0 == b.0) {
            for slice in same_token.chunks(ACKS_PER_STATEMENT) {
                let sql = format!(
                    // `+namespace`: by primary key, not by scanning the namespace's index.
                    "DELETE FROM stem_queue_entries
                     WHERE id IN ({}) AND lease_token = ? AND +namespace = ?
                     RETURNING id",
                    placeholders(slice.len())
                );
                let mut delete = sqlx::query_scalar::<_, i64>(&sql);
                for (_, _, id) in slice {
                    delete = delete.bind(id);
                }
                let mut deleted: std::collections::HashSet<i64> = delete
                    .bind(slice[0].0)
                    .bind(namespace)
                    .fetch_all(&mut *tx)
                    .await?
                    .into_iter()
                    .collect();
                for (_, at, id) in slice {
                    held[*at] = deleted.remove(id);
                }
            }
        }
        for (at, (receipt, settle)) in batch.iter().enumerate() {
            let Ok(id) = receipt.entry.parse::<i64>() else {
                continue;
            };
            let done = match settle {
                Settle::Ack => continue,
                Settle::Release(delay) => {
                    released = true;
                    sqlx::query(
                        "UPDATE stem_queue_entries
                         SET lease_token = NULL, visible_at = ?, deliveries = MAX(deliveries - 1, 0)
                         WHERE id = ? AND lease_token = ? AND namespace = ?",
                    )
                    .bind(now.saturating_add(*delay).as_sql())
                    .bind(id)
                    .bind(&receipt.token)
                    .bind(namespace)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected()
                }
                Settle::Retry { next, delay } => {
                    released = true;
                    sqlx::query(
                        "UPDATE stem_queue_entries
                         SET lease_token = NULL, visible_at = ?, deliveries = 0, priority = ?,
                             payload = ?
                         WHERE id = ? AND lease_token = ? AND namespace = ?",
                    )
                    .bind(now.saturating_add(*delay).as_sql())
                    .bind(i64::from(next.priority))
                    .bind(next.to_json())
                    .bind(id)
                    .bind(&receipt.token)
                    .bind(namespace)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected()
                }
                Settle::DeadLetter(reason) => {
                    bury(&mut tx, namespace, id, Some(&receipt.token), reason, now).await?
                }
            };
            held[at] = done > 0;
        }
        tx.commit().await?;
        if released {
            self.inner.published.notify_waiters();
        }
        Ok(held)
    }

    async fn extend_lease(
        &self,
        receipt: &Receipt,
        lease: Duration,
    ) -> Result<Timestamp, StorageError> {
        let lost = || StorageError::LeaseLost(receipt.entry.clone());
        let id: i64 = receipt.entry.parse().map_err(|_| lost())?;
        let leased_until = Timestamp::now().saturating_add(lease);
        let done = sqlx::query(
            "UPDATE stem_queue_entries SET visible_at = ?
             WHERE id = ? AND lease_token = ? AND namespace = ?",
        )
        .bind(leased_until.as_sql())
        .bind(id)
        .bind(&receipt.token)
        .bind(self.namespace())
        .execute(self.pool())
        .await?;
        if done.rows_affected() == 0 {
            return Err(lost());
        }
        Ok(leased_until)
    }

    async fn dead_letters(&self, query: &DeadLetterQuery) -> Result<Vec<DeadLetter>, StorageError> {
        self.select_dead(query).await
    }

    async fn delete_dead_letters(&self, ids: &[String]) -> Result<u64, StorageError> {
        if ids.is_empty() {
            return Ok(0);
        }
        let numbers = serde_json::to_string(&letter_numbers(ids)).expect("numbers serialise");
        let deleted = sqlx::query(
            "DELETE FROM stem_dead_letters
             WHERE namespace = ? AND id IN (SELECT value FROM json_each(?))",
        )
        .bind(self.namespace())
        .bind(numbers)
        .execute(self.pool())
        .await?;
        Ok(deleted.rows_affected())
    }

    async fn requeue_dead_letter(
        &self,
        id: &str,
        envelope: &Envelope,
    ) -> Result<bool, StorageError> {
        envelope.validate()?;
        let Some(number) = letter_number(id) else {
            return Ok(false);
        };
        // The delete is the claim: of two replays, the one whose delete found the letter
        // stores its entry, in the same transaction.
        let mut tx = self.pool().begin().await?;
        let claimed = sqlx::query("DELETE FROM stem_dead_letters WHERE namespace = ? AND id = ?")
            .bind(self.namespace())
            .bind(number)
            .execute(&mut *tx)
            .await?
            .rows_affected()
            > 0;
        if claimed {
            insert_entry(&mut tx, self.namespace(), envelope, Timestamp::now()).await?;
        }
        tx.commit().await?;
        if claimed {
            self.inner.published.notify_waiters();
        }
        Ok(claimed)
    }

    async fn purge(&self, queue: &str) -> Result<u64, StorageError> {
        let purged = sqlx::query(
            "DELETE FROM stem_queue_entries
             WHERE namespace = ? AND queue = ? AND (lease_token IS NULL OR visible_at <= ?)",
        )
        .bind(self.namespace())
        .bind(queue)
        .bind(Timestamp::now().as_sql())
        .execute(self.pool())
        .await?;
        Ok(purged.rows_affected())
    }

    async fn stats(&self, queue: &str) -> Result<QueueStats, StorageError> {
        let now = Timestamp::now().as_sql();
        let row = sqlx::query(
            "SELECT
                 COALESCE(SUM(visible_at <= ?), 0) AS ready,
                 COALESCE(SUM(visible_at > ? AND lease_token IS NULL), 0) AS delayed,
                 COALESCE(SUM(visible_at > ? AND lease_token IS NOT NULL), 0) AS in_flight,
                 (SELECT COUNT(*) FROM stem_dead_letters WHERE namespace = ? AND queue = ?) AS dead
             FROM stem_queue_entries WHERE namespace = ? AND queue = ?",
        )
        .bind(now)
        .bind(now)
        .bind(now)
        .bind(self.namespace())
        .bind(queue)
        .bind(self.namespace())
        .bind(queue)
        .fetch_one(self.pool())
        .await?;
        let count = |column: &str| u64::try_from(row.get::<i64, _>(column)).unwrap_or(0);
        Ok(QueueStats {
            queue: queue.to_owned(),
            ready: count("ready"),
            delayed: count("delayed"),
            in_flight: count("in_flight"),
            dead: count("dead"),
        })
    }

    async fn queues(&self) -> Result<Vec<String>, StorageError> {
        let names = sqlx::query_scalar(
            "SELECT queue FROM stem_queue_entries WHERE namespace = ?
             UNION SELECT queue FROM stem_dead_letters WHERE namespace = ?
             ORDER BY queue",
        )
        .bind(self.namespace())
        .bind(self.namespace())
        .fetch_all(self.pool())
        .await?;
        Ok(names)
    }

    async fn broadcast(&self, channel: &str, message: &str) -> Result<(), StorageError> {
        sqlx::query(
            "INSERT INTO stem_broadcasts (namespace, channel, message, sent_at)
             VALUES (?, ?, ?, ?)",
        )
        .bind(self.namespace())
        .bind(channel)
        .bind(message)
        .bind(Timestamp::now().as_sql())
        .execute(self.pool())
        .await?;
        Ok(())
    }

    async fn subscribe(&self, channel: &str) -> Result<Subscription, StorageError> {
        // Ids only grow (AUTOINCREMENT, one writer at a time): what comes after the largest
        // now is what is sent from now on.
        let last: i64 = sqlx::query_scalar("SELECT COALESCE(MAX(id), 0) FROM stem_broadcasts")
            .fetch_one(self.pool())
            .await?;
        let (sender, receiver) = mpsc::channel(SUBSCRIPTION_BUFFER);
        let feeder = tokio::spawn(feed_subscriber(
            self.clone(),
            channel.to_owned(),
            last,
            sender,
        ));
        Ok(Subscription::fed_by(receiver, feeder))
    }
}
