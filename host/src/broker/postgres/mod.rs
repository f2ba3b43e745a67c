//! The Postgres broker: queues in one table, claimed with `FOR UPDATE SKIP LOCKED`.
//!
//! - An entry is a row of `stem_queue_entries`; `visible_at` (server milliseconds) is when it
//!   may be delivered: its `not_before` or nack delay while it waits, its lease deadline while
//!   it is leased. `visible_at` is deliberately not indexed, and pages keep a fifth free, so a
//!   claim or an extension is often a HOT update that touches no index (1.6× the drain rate
//!   of a 50,000-task queue, measured). A consume claims a batch in one statement, highest priority first, then
//!   oldest; concurrent consumers skip each other's rows instead of waiting on them. A lease
//!   is a fresh token on the row; extending moves `visible_at`; an expired lease is simply a
//!   row that is visible again, so the next consume takes it over.
//! - Acked rows are deleted (a batch of acks is one statement), so the table holds only what
//!   is waiting or running; dead letters move to `stem_dead_letters`. The table churns, and
//!   the dead tuples of deleted rows slow every claim until they are vacuumed, so it is created
//!   with an eager autovacuum (`autovacuum_vacuum_scale_factor = 0.01`), and brokers vacuum it
//!   themselves when its dead tuples pile up anyway (autovacuum off, or too slow for the
//!   churn; [`PostgresBrokerOptions::vacuum_after`]), one broker at a time; once a drained
//!   table's indexes still hold more than 4 MiB of a past backlog's pages, they are rebuilt
//!   (`REINDEX CONCURRENTLY`, which blocks nobody). A role that does not own the table can do
//!   neither: Postgres skips the vacuum with a warning in its own log.
//! - Publishes and releases `NOTIFY stem_queues`; every broker listens on one connection and
//!   wakes its waiting consumers at once. Entries that become due later (delays, expired
//!   leases) are found by consumers looking again when the next one falls due, at the latest
//!   every [`PostgresBrokerOptions::poll_interval`].
//! - Broadcast is `NOTIFY stem_broadcast`, reaching every listening process; a message too big
//!   for a notification (8000 bytes) is stored in `stem_broadcasts` and the notification
//!   carries its id. A process that is disconnected when a message is sent misses it.

mod settlements;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use sqlx::Row;
use sqlx::postgres::{PgListener, PgPool};
use tokio::sync::{Notify, OnceCell};

use super::local_broadcast::LocalChannels;
use super::{
    Broker, ConsumeOptions, DEFAULT_NAMESPACE, DEFAULT_VISIBILITY_TIMEOUT, DeadLetter,
    DeadLetterIds, DeadLetterQuery, Delivery, QueueStats, Receipt, Settle, Subscription,
    decode_entry, id_range, letter_number, letter_numbers, new_lease_token, validate_all,
    validate_settles,
};
use crate::envelope::Envelope;
use crate::postgres::{self, NOW_MS};
use crate::storage::{Background, Periodic, StorageError};
use crate::time::Timestamp;

pub use settlements::PostgresSettlements;

const MIGRATIONS: &[&str] = &[
    "
    CREATE TABLE stem_queue_entries (
        id BIGSERIAL PRIMARY KEY,
        namespace TEXT NOT NULL,
        queue TEXT NOT NULL,
        priority SMALLINT NOT NULL,
        visible_at BIGINT NOT NULL,
        lease_token TEXT,
        deliveries INTEGER NOT NULL DEFAULT 0,
        payload TEXT NOT NULL
    ) WITH (fillfactor = 80, autovacuum_vacuum_scale_factor = 0.01,
            autovacuum_analyze_scale_factor = 0.05);
    CREATE INDEX stem_queue_entries_order
        ON stem_queue_entries (namespace, queue, priority DESC, id);
    CREATE TABLE stem_dead_letters (
        id BIGSERIAL PRIMARY KEY,
        namespace TEXT NOT NULL,
        queue TEXT NOT NULL,
        task_id TEXT,
        reason TEXT NOT NULL,
        payload TEXT NOT NULL,
        dead_at BIGINT NOT NULL
    );
    CREATE INDEX stem_dead_letters_queue ON stem_dead_letters (namespace, queue, id);
    CREATE INDEX stem_dead_letters_task ON stem_dead_letters (namespace, task_id);
    CREATE INDEX stem_dead_letters_age ON stem_dead_letters (namespace, dead_at);
    CREATE TABLE stem_broadcasts (
        id BIGSERIAL PRIMARY KEY,
        message TEXT NOT NULL,
        sent_at BIGINT NOT NULL
    );
",
    "
    CREATE TABLE stem_unique_ids (
        namespace TEXT NOT NULL,
        task_id TEXT NOT NULL,
        expires_at BIGINT NOT NULL,
        PRIMARY KEY (namespace, task_id)
    );
    CREATE INDEX stem_unique_ids_expiry ON stem_unique_ids (expires_at);
",
    "
    CREATE TABLE stem_unique_keys (
        namespace TEXT NOT NULL,
        key TEXT NOT NULL,
        task_id TEXT NOT NULL,
        claim TEXT NOT NULL,
        expires_at BIGINT NOT NULL,
        PRIMARY KEY (namespace, key)
    );
    CREATE INDEX stem_unique_keys_expiry ON stem_unique_keys (expires_at);
",
];

/// The channel publishes and releases notify, with the namespace as payload.
const READY_CHANNEL: &str = "stem_queues";
/// The channel broadcasts travel on.
const BROADCAST_CHANNEL: &str = "stem_broadcast";
/// Larger notifications go through `stem_broadcasts` (Postgres refuses 8000 bytes and more).
const NOTIFY_LIMIT: usize = 7_000;
/// The shortest a waiting consumer sleeps before looking again (no spinning on entries
/// another consumer is claiming).
const MIN_PAUSE_MS: u64 = 10;

/// How often a broker looks at the queue table's dead tuples.
pub const VACUUM_CHECK: Duration = Duration::from_secs(2);
/// The advisory lock (with the schema's hash) of the broker that vacuums, so that the brokers
/// of a schema take turns.
const VACUUM_LOCK: i32 = 0x5354_4d56; // "STMV"

/// How long stored broadcast messages are kept for listeners to read.
const BROADCAST_RETENTION: Duration = Duration::from_secs(3600);

/// Tuning for [`PostgresBroker::connect`].
#[derive(Clone, Debug)]
pub struct PostgresBrokerOptions {
    /// Keeps environments sharing one database apart.
    pub namespace: String,
    /// The lease of a delivery when the consumer does not ask for one.
    pub visibility_timeout: Duration,
    /// The longest a waiting consumer goes without looking, should a notification be lost.
    pub poll_interval: Duration,
    /// How often old dead letters, broadcast messages and forgotten unique ids are deleted.
    pub sweeper_interval: Duration,
    /// How long dead letters are kept; `None` keeps them until purged.
    pub dead_letter_retention: Option<Duration>,
    /// Vacuum the queue table when this many dead tuples piled up since the last vacuum, or it
    /// holds more dead than live ones (looked at every [`VACUUM_CHECK`]); `None` leaves it to
    /// autovacuum.
    pub vacuum_after: Option<u64>,
}

impl Default for PostgresBrokerOptions {
    fn default() -> PostgresBrokerOptions {
        PostgresBrokerOptions {
            namespace: DEFAULT_NAMESPACE.to_owned(),
            visibility_timeout: DEFAULT_VISIBILITY_TIMEOUT,
            poll_interval: Duration::from_secs(1),
            sweeper_interval: Duration::from_secs(60),
            dead_letter_retention: Some(Duration::from_secs(7 * 24 * 3600)),
            vacuum_after: Some(10_000),
        }
    }
}

/// A broker on a Postgres database. Clones share the pool and the listener.
#[derive(Clone)]
pub struct PostgresBroker {
    inner: Arc<Inner>,
}

struct Inner {
    pool: Arc<PgPool>,
    /// The entries table named so that any connection to the database finds it (with the
    /// URL's schema, if any), for publishes on the caller's connection.
    entries_table: String,
    /// Whose broadcasts this broker receives: its schema and namespace.
    scope: String,
    options: PostgresBrokerOptions,
    /// Wakes this broker's waiting consumers when anything is published in its namespace.
    published: Arc<Notify>,
    /// Broadcast subscribers of this broker.
    channels: Arc<LocalChannels>,
    /// The listening connection, started by the first consume that waits or subscribe.
    listener: OnceCell<Background>,
    _sweeper: Periodic,
    _vacuum: Option<Periodic>,
}

/// What travels in a broadcast notification.
#[derive(Serialize, Deserialize)]
struct BroadcastNote {
    /// The schema and namespace of the sender: a notification reaches the whole database.
    scope: String,
    channel: String,
    /// The message, or the id of its row in `stem_broadcasts`.
    #[serde(default)]
    message: Option<String>,
    #[serde(default)]
    stored: Option<i64>,
}

impl PostgresBroker {
    /// Connects to the database at `url`, creating and migrating the tables if needed.
    pub async fn connect(
        url: &str,
        options: PostgresBrokerOptions,
    ) -> Result<PostgresBroker, StorageError> {
        let pool = postgres::connect(url).await?;
        postgres::migrate(&pool, "broker", MIGRATIONS).await?;
        let schema = postgres::schema_of(url);
        let entries_table = match &schema {
            Some(schema) => format!("\"{schema}\".stem_queue_entries"),
            None => "stem_queue_entries".to_owned(),
        };
        let scope = format!("{}/{}", schema.unwrap_or_default(), options.namespace);
        let sweeper = {
            let pool = PgPool::clone(&pool);
            let namespace = options.namespace.clone();
            let retention = options.dead_letter_retention;
            Periodic::spawn(options.sweeper_interval, move || {
                sweep(pool.clone(), namespace.clone(), retention)
            })
        };
        let vacuum = options.vacuum_after.map(|threshold| {
            let pool = PgPool::clone(&pool);
            let left = Arc::new(AtomicU64::new(0));
            Periodic::spawn(VACUUM_CHECK, move || {
                vacuum_if_bloated(pool.clone(), threshold, left.clone())
            })
        });
        Ok(PostgresBroker {
            inner: Arc::new(Inner {
                pool,
                entries_table,
                scope,
                options,
                published: Arc::new(Notify::new()),
                channels: Arc::new(LocalChannels::default()),
                listener: OnceCell::new(),
                _sweeper: sweeper,
                _vacuum: vacuum,
            }),
        })
    }

    fn namespace(&self) -> &str {
        &self.inner.options.namespace
    }

    fn pool(&self) -> &PgPool {
        &self.inner.pool
    }

    /// Publishes `envelopes` inside the caller's transaction, on `conn` (a connection to this
    /// broker's database): the tasks exist if and only if the transaction commits, and
    /// consumers are woken when it does. All or none, as [`Broker::publish_batch`]. Build the
    /// envelopes with [`crate::client::Client::prepare`], which checks and completes them as
    /// an enqueue does.
    ///
    /// ```ignore
    /// let mut tx = pool.begin().await?;
    /// sqlx::query("INSERT INTO orders (id) VALUES ($1)").bind(order).execute(&mut *tx).await?;
    /// let envelope = client.prepare(EnqueueRequest::new("billing.charge", args)).await?;
    /// broker.publish_in(&mut tx, &[envelope]).await?;
    /// tx.commit().await?;
    /// ```
    pub async fn publish_in(
        &self,
        conn: &mut sqlx::PgConnection,
        envelopes: &[Envelope],
    ) -> Result<(), StorageError> {
        validate_all(envelopes)?;
        if envelopes.is_empty() {
            return Ok(());
        }
        store_entries(conn, &self.inner.entries_table, self.namespace(), envelopes).await
    }

    /// Starts listening once; returns when notifications are being received.
    async fn listen(&self) -> Result<(), StorageError> {
        self.inner
            .listener
            .get_or_try_init(|| async {
                let mut listener = PgListener::connect_with(self.pool()).await?;
                listener
                    .listen_all([READY_CHANNEL, BROADCAST_CHANNEL])
                    .await?;
                let pool = PgPool::clone(self.pool());
                let namespace = self.namespace().to_owned();
                let published = self.inner.published.clone();
                let channels = self.inner.channels.clone();
                let scope = self.inner.scope.clone();
                Ok::<_, StorageError>(Background::spawn(receive(
                    listener, pool, namespace, scope, published, channels,
                )))
            })
            .await?;
        Ok(())
    }

    /// Leases what is ready now, dead-lettering entries that cannot be decoded; also when the
    /// next of the queues' entries falls due, if none is ready.
    async fn take_ready(
        &self,
        queues: &[String],
        max: usize,
        lease: Duration,
    ) -> Result<(Vec<Delivery>, Option<i64>), StorageError> {
        let token = new_lease_token();
        // One ordered, locking index scan per queue ($5, $6, …), each in a CTE of its own (a
        // `UNION` may not lock), merged: `queue = ANY(...)` would make Postgres read and sort
        // every ready entry of the queues on each claim.
        let scans: Vec<String> = (0..queues.len())
            .map(|at| {
                format!(
                    "q{at} AS (
                         SELECT id, priority FROM stem_queue_entries, now
                         WHERE namespace = $1 AND queue = ${} AND visible_at <= now.ms
                         ORDER BY priority DESC, id LIMIT $2 FOR UPDATE SKIP LOCKED)",
                    at + 5
                )
            })
            .collect();
        let merged: Vec<String> = (0..queues.len())
            .map(|at| format!("SELECT id, priority FROM q{at}"))
            .collect();
        let sql = format!(
            "WITH now AS (SELECT {NOW_MS} AS ms), {},
             picked AS (
                 SELECT id FROM ({}) AS candidates
                 ORDER BY priority DESC, id LIMIT $2)
             UPDATE stem_queue_entries e
             SET lease_token = $3, visible_at = now.ms + $4, deliveries = e.deliveries + 1
             FROM picked, now
             WHERE e.id = picked.id
             RETURNING e.id, e.queue, e.priority, e.deliveries, e.payload, e.visible_at",
            scans.join(", "),
            merged.join(" UNION ALL ")
        );
        let mut claim = sqlx::query(&sql)
            .bind(self.namespace())
            .bind(i64::try_from(max).unwrap_or(i64::MAX))
            .bind(&token)
            .bind(millis(lease));
        for queue in queues {
            claim = claim.bind(queue);
        }
        let mut rows = claim.fetch_all(self.pool()).await?;
        if rows.is_empty() {
            // When the next entry falls due (a delay, or a lease running out): a look at every
            // entry of the queues, which then holds only delayed and running ones.
            let earliest = per_queue(
                queues.len(),
                2,
                "(SELECT min(visible_at) AS visible_at FROM stem_queue_entries
                  WHERE namespace = $1 AND queue = $QUEUE)",
            );
            let sql = format!("SELECT min(visible_at) - {NOW_MS} FROM ({earliest}) AS earliest");
            let mut next_due = sqlx::query_scalar(&sql).bind(self.namespace());
            for queue in queues {
                next_due = next_due.bind(queue);
            }
            let next: Option<i64> = next_due.fetch_one(self.pool()).await?;
            return Ok((Vec::new(), next));
        }
        rows.sort_by_key(|row| (-row.get::<i16, _>("priority"), row.get::<i64, _>("id")));
        let mut deliveries = Vec::with_capacity(rows.len());
        for row in rows {
            let id: i64 = row.get("id");
            let payload: String = row.get("payload");
            let receipt = Receipt {
                queue: row.get("queue"),
                entry: id.to_string(),
                token: token.clone(),
            };
            match decode_entry(&payload) {
                Ok(envelope) => deliveries.push(Delivery {
                    envelope,
                    receipt,
                    deliveries: u32::try_from(row.get::<i32, _>("deliveries")).unwrap_or(0),
                    leased_until: Timestamp::from_sql(row.get("visible_at")),
                }),
                Err(reason) => {
                    tracing::warn!(
                        queue = receipt.queue,
                        entry = id,
                        reason,
                        "dead-lettering an undecodable entry"
                    );
                    // The rest of the batch is leased: a failure here must not strand it.
                    if let Err(error) = self.dead_letter(&receipt, &reason).await {
                        tracing::error!(%error, entry = id, "dead-lettering failed; the entry comes back when its lease runs out");
                    }
                }
            }
        }
        Ok((deliveries, None))
    }

    async fn select_dead(&self, query: &DeadLetterQuery) -> Result<Vec<DeadLetter>, StorageError> {
        let limit = query
            .limit
            .map_or(i64::MAX, |n| i64::try_from(n).unwrap_or(i64::MAX));
        let by_letter = matches!(query.id_kind, DeadLetterIds::Either | DeadLetterIds::Letter);
        let by_task = matches!(query.id_kind, DeadLetterIds::Either | DeadLetterIds::Task);
        let letters = (!query.ids.is_empty() && by_letter).then(|| letter_numbers(&query.ids));
        let tasks = (!query.ids.is_empty() && by_task).then_some(&query.ids);
        let (after, up_to) = id_range(query);
        let order = if query.newest_first { "DESC" } else { "ASC" };
        let rows = sqlx::query(&format!(
            "SELECT id, queue, reason, payload, dead_at FROM stem_dead_letters
             WHERE namespace = $1 AND ($2::text IS NULL OR queue = $2)
               AND (($3::bigint[] IS NULL AND $4::text[] IS NULL)
                    OR id = ANY($3) OR task_id = ANY($4))
               AND id > $5 AND id <= $6
             ORDER BY id {order} LIMIT $7"
        ))
        .bind(self.namespace())
        .bind(query.queue.as_deref())
        .bind(letters)
        .bind(tasks)
        .bind(after)
        .bind(up_to)
        .bind(limit)
        .fetch_all(self.pool())
        .await?;
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

/// `select` once per queue, joined by `UNION ALL`, its `$QUEUE` naming parameters `$first`,
/// `$first + 1`, …: one ordered index scan per queue.
fn per_queue(queues: usize, first: usize, select: &str) -> String {
    (0..queues)
        .map(|at| select.replace("$QUEUE", &format!("${}", first + at)))
        .collect::<Vec<_>>()
        .join(" UNION ALL ")
}

/// A duration in whole milliseconds, for SQL.
pub(crate) fn millis(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

/// Hands notifications to waiting consumers and broadcast subscribers until aborted. When the
/// connection drops, notifications sent meanwhile are lost: consumers are woken to look again.
async fn receive(
    mut listener: PgListener,
    pool: PgPool,
    namespace: String,
    scope: String,
    published: Arc<Notify>,
    channels: Arc<LocalChannels>,
) {
    loop {
        let notification = postgres::next_notification(&mut listener, &published).await;
        match notification.channel() {
            READY_CHANNEL if notification.payload() == namespace => published.notify_waiters(),
            BROADCAST_CHANNEL => {
                let Ok(note) = serde_json::from_str::<BroadcastNote>(notification.payload()) else {
                    continue;
                };
                // Stored messages are read only where someone listens on their channel.
                if note.scope != scope || !channels.has_subscribers(&note.channel) {
                    continue;
                }
                let message = match (note.message, note.stored) {
                    (Some(message), _) => Some(message),
                    (None, Some(id)) => {
                        sqlx::query_scalar("SELECT message FROM stem_broadcasts WHERE id = $1")
                            .bind(id)
                            .fetch_optional(&pool)
                            .await
                            .unwrap_or_else(|error| {
                                tracing::warn!(%error, "reading a broadcast message failed");
                                None
                            })
                    }
                    (None, None) => None,
                };
                if let Some(message) = message {
                    channels.send(&note.channel, &message);
                }
            }
            _ => {}
        }
    }
}

/// Deletes dead letters older than the retention, stored broadcast messages, and unique ids
/// whose window has passed (of every namespace: an expired id counts as absent in any of them).
async fn sweep(pool: PgPool, namespace: String, retention: Option<Duration>) {
    if let Some(retention) = retention {
        let swept = sqlx::query(&format!(
            "DELETE FROM stem_dead_letters WHERE namespace = $1 AND dead_at < {NOW_MS} - $2"
        ))
        .bind(&namespace)
        .bind(millis(retention))
        .execute(&pool)
        .await;
        if let Err(error) = swept {
            tracing::warn!(%error, "sweeping expired dead letters failed");
        }
    }
    let swept = sqlx::query(&format!(
        "DELETE FROM stem_broadcasts WHERE sent_at < {NOW_MS} - $1"
    ))
    .bind(millis(BROADCAST_RETENTION))
    .execute(&pool)
    .await;
    if let Err(error) = swept {
        tracing::warn!(%error, "sweeping stored broadcast messages failed");
    }
    for table in ["stem_unique_ids", "stem_unique_keys"] {
        let swept = sqlx::query(&format!("DELETE FROM {table} WHERE expires_at <= {NOW_MS}"))
            .execute(&pool)
            .await;
        if let Err(error) = swept {
            tracing::warn!(%error, table, "sweeping forgotten unique ids failed");
        }
    }
}

/// Fewer dead tuples than this are never worth a vacuum.
const MIN_DEAD_TO_VACUUM: u64 = 1_000;

/// Vacuums the queue table once it holds `threshold` more dead tuples than the last vacuum
/// left (some can stay, held by an old snapshot), or more dead than live ones, unless another
/// broker of the schema is doing so. On a connection of its own, so that the advisory lock
/// goes with it should the job be stopped midway.
async fn vacuum_if_bloated(pool: PgPool, threshold: u64, left: Arc<AtomicU64>) {
    let vacuumed = async {
        let dead: Option<i64> = sqlx::query_scalar(
            "SELECT n_dead_tup FROM pg_stat_user_tables
             WHERE relid = 'stem_queue_entries'::regclass",
        )
        .fetch_optional(&pool)
        .await?;
        let dead = dead.map_or(0, |dead| u64::try_from(dead).unwrap_or(0));
        let piled = dead.saturating_sub(left.load(Ordering::Relaxed));
        if piled < MIN_DEAD_TO_VACUUM {
            return Ok(());
        }
        if piled < threshold {
            // Below the threshold, only a mostly dead table (a drained queue) is vacuumed, to
            // give its pages back. Live entries are counted, up to the dead ones: the
            // statistics' estimate lags far behind a drain.
            let live: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM (SELECT 1 FROM stem_queue_entries LIMIT $1) AS bounded",
            )
            .bind(i64::try_from(piled).unwrap_or(i64::MAX))
            .fetch_one(&pool)
            .await?;
            if u64::try_from(live).unwrap_or(0) >= piled {
                return Ok(());
            }
        }
        let mut conn =
            <sqlx::PgConnection as sqlx::Connection>::connect_with(&pool.connect_options()).await?;
        let ours: bool =
            sqlx::query_scalar("SELECT pg_try_advisory_lock($1, hashtext(current_schema()))")
                .bind(VACUUM_LOCK)
                .fetch_one(&mut conn)
                .await?;
        if ours {
            sqlx::Executor::execute(&mut conn, "VACUUM stem_queue_entries").await?;
            let after: Option<i64> = sqlx::query_scalar(
                "SELECT n_dead_tup FROM pg_stat_user_tables
                 WHERE relid = 'stem_queue_entries'::regclass",
            )
            .fetch_optional(&mut conn)
            .await?;
            left.store(
                after.map_or(0, |n| u64::try_from(n).unwrap_or(0)),
                Ordering::Relaxed,
            );
            shrink_indexes(&mut conn).await?;
        }
        sqlx::Connection::close(conn).await
    };
    if let Err(error) = vacuumed.await {
        tracing::warn!(%error, "vacuuming the queue table failed");
    }
}

/// The index size past which a nearly empty queue table's indexes are rebuilt.
const INDEX_SHRINK_BYTES: i64 = 4 << 20;

/// Rebuilds the queue table's indexes when the table is nearly empty (fewer than 1,000 entries
/// in every namespace) but they still hold the
/// pages of a past backlog (vacuum keeps index pages for reuse, never returns them), without
/// blocking publishes or claims. Indexes a failed rebuild left invalid are dropped first.
async fn shrink_indexes(conn: &mut sqlx::PgConnection) -> Result<(), sqlx::Error> {
    let size: i64 = sqlx::query_scalar("SELECT pg_indexes_size('stem_queue_entries'::regclass)")
        .fetch_one(&mut *conn)
        .await?;
    if size < INDEX_SHRINK_BYTES {
        return Ok(());
    }
    // Counted, not estimated (the statistics lag behind a drain), up to the bound.
    let entries: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT 1 FROM stem_queue_entries LIMIT 1000) AS bounded",
    )
    .fetch_one(&mut *conn)
    .await?;
    if entries >= 1000 {
        return Ok(());
    }
    let invalid: Vec<String> = sqlx::query_scalar(
        "SELECT indexrelid::regclass::text FROM pg_index
         WHERE indrelid = 'stem_queue_entries'::regclass AND NOT indisvalid",
    )
    .fetch_all(&mut *conn)
    .await?;
    for index in invalid {
        // A name Postgres made for the rebuild's copy, quoted as `regclass` printed it.
        sqlx::Executor::execute(
            &mut *conn,
            format!("DROP INDEX CONCURRENTLY {index}").as_str(),
        )
        .await?;
    }
    sqlx::Executor::execute(&mut *conn, "REINDEX TABLE CONCURRENTLY stem_queue_entries").await?;
    Ok(())
}

/// Moves entry `id` to the dead letters if `token` (when given) still leases it; whether it
/// moved.
async fn bury(
    conn: &mut sqlx::PgConnection,
    namespace: &str,
    id: i64,
    token: Option<&str>,
    reason: &str,
) -> Result<bool, StorageError> {
    let removed = sqlx::query(
        "DELETE FROM stem_queue_entries
         WHERE id = $1 AND namespace = $2 AND ($3::text IS NULL OR lease_token = $3)
         RETURNING queue, payload",
    )
    .bind(id)
    .bind(namespace)
    .bind(token)
    .fetch_optional(&mut *conn)
    .await?;
    let Some(removed) = removed else {
        return Ok(false);
    };
    let payload: String = removed.get("payload");
    let task_id = decode_entry(&payload).ok().map(|e| e.id);
    sqlx::query(&format!(
        "INSERT INTO stem_dead_letters (namespace, queue, task_id, reason, payload, dead_at)
         VALUES ($1, $2, $3, $4, $5, {NOW_MS})"
    ))
    .bind(namespace)
    .bind(removed.get::<String, _>("queue"))
    .bind(task_id)
    .bind(postgres::storable(reason))
    .bind(payload)
    .execute(&mut *conn)
    .await?;
    Ok(true)
}

/// Acks every `(entry, token)` still leased in one statement; the entries deleted.
pub(crate) async fn delete_acked(
    conn: &mut sqlx::PgConnection,
    namespace: &str,
    entries: &[i64],
    tokens: &[&str],
) -> Result<std::collections::HashSet<i64>, StorageError> {
    if entries.is_empty() {
        return Ok(Default::default());
    }
    let deleted = sqlx::query_scalar(
        "DELETE FROM stem_queue_entries e
         USING unnest($1::bigint[], $2::text[]) AS acked(id, token)
         WHERE e.id = acked.id AND e.lease_token = acked.token AND e.namespace = $3
         RETURNING e.id",
    )
    .bind(entries)
    .bind(tokens)
    .bind(namespace)
    .fetch_all(&mut *conn)
    .await?;
    Ok(deleted.into_iter().collect())
}

/// Settles `batch` on `conn` (a transaction, when the caller needs one): acks in one
/// statement, the rest one by one. Per settle, whether its lease held; whether anything
/// became deliverable again.
pub(crate) async fn settle_on(
    conn: &mut sqlx::PgConnection,
    namespace: &str,
    batch: &[(&Receipt, &Settle)],
) -> Result<(Vec<bool>, bool), StorageError> {
    let mut held = vec![false; batch.len()];
    let mut released = false;
    let entry = |receipt: &Receipt| receipt.entry.parse::<i64>().ok();
    let acks: Vec<(usize, i64, &str)> = batch
        .iter()
        .enumerate()
        .filter(|(_, (_, settle))| **settle == Settle::Ack)
        .filter_map(|(at, (receipt, _))| Some((at, entry(receipt)?, receipt.token.as_str())))
        .collect();
    let ids: Vec<i64> = acks.iter().map(|(_, id, _)| *id).collect();
    let tokens: Vec<&str> = acks.iter().map(|(_, _, token)| *token).collect();
    let mut deleted = delete_acked(conn, namespace, &ids, &tokens).await?;
    for (at, id, _) in &acks {
        held[*at] = deleted.remove(id);
    }
    for (at, (receipt, settle)) in batch.iter().enumerate() {
        let Some(id) = entry(receipt) else { continue };
        held[at] = match settle {
            Settle::Ack => continue,
            Settle::Release(delay) => {
                released = true;
                sqlx::query(&format!(
                    "UPDATE stem_queue_entries
                     SET lease_token = NULL, visible_at = {NOW_MS} + $1,
                         deliveries = GREATEST(deliveries - 1, 0)
                     WHERE id = $2 AND lease_token = $3 AND namespace = $4"
                ))
                .bind(millis(*delay))
                .bind(id)
                .bind(&receipt.token)
                .bind(namespace)
                .execute(&mut *conn)
                .await?
                .rows_affected()
                    > 0
            }
            Settle::Retry { next, delay } => {
                released = true;
                sqlx::query(&format!(
                    "UPDATE stem_queue_entries
                     SET lease_token = NULL, visible_at = {NOW_MS} + $1, deliveries = 0,
                         priority = $2, payload = $3
                     WHERE id = $4 AND lease_token = $5 AND namespace = $6"
                ))
                .bind(millis(*delay))
                .bind(i16::from(next.priority))
                .bind(next.to_json())
                .bind(id)
                .bind(&receipt.token)
                .bind(namespace)
                .execute(&mut *conn)
                .await?
                .rows_affected()
                    > 0
            }
            Settle::DeadLetter(reason) => {
                bury(conn, namespace, id, Some(&receipt.token), reason).await?
            }
        };
    }
    Ok((held, released))
}

/// Stores `envelopes` (validated) in `table`, in order, and notifies consumers when the
/// statement's transaction commits.
async fn store_entries(
    conn: &mut sqlx::PgConnection,
    table: &str,
    namespace: &str,
    envelopes: &[Envelope],
) -> Result<(), StorageError> {
    let mut queues = Vec::with_capacity(envelopes.len());
    let mut priorities = Vec::with_capacity(envelopes.len());
    let mut not_before = Vec::with_capacity(envelopes.len());
    let mut payloads = Vec::with_capacity(envelopes.len());
    for envelope in envelopes {
        queues.push(envelope.queue.as_str());
        priorities.push(i16::from(envelope.priority));
        not_before.push(envelope.not_before.map_or(0, Timestamp::as_sql));
        payloads.push(envelope.to_json());
    }
    sqlx::query(&format!(
        "WITH stored AS (
             INSERT INTO {table} (namespace, queue, priority, visible_at, payload)
             SELECT $1, queue, priority, GREATEST(not_before, {NOW_MS}), payload
             FROM unnest($2::text[], $3::smallint[], $4::bigint[], $5::text[])
                 WITH ORDINALITY AS p(queue, priority, not_before, payload, n)
             ORDER BY n
             RETURNING 1)
         SELECT pg_notify($6, $1) FROM (SELECT 1 FROM stored LIMIT 1) AS any_stored"
    ))
    .bind(namespace)
    .bind(&queues)
    .bind(&priorities)
    .bind(&not_before)
    .bind(&payloads)
    .bind(READY_CHANNEL)
    .execute(conn)
    .await?;
    Ok(())
}

/// Tells listening consumers that `namespace` has work.
pub(crate) async fn notify_ready(
    conn: &mut sqlx::PgConnection,
    namespace: &str,
) -> Result<(), StorageError> {
    sqlx::query("SELECT pg_notify($1, $2)")
        .bind(READY_CHANNEL)
        .bind(namespace)
        .execute(conn)
        .await?;
    Ok(())
}

#[async_trait]
impl Broker for PostgresBroker {
    async fn publish_batch(&self, envelopes: &[Envelope]) -> Result<(), StorageError> {
        validate_all(envelopes)?;
        if envelopes.is_empty() {
            return Ok(());
        }
        let mut conn = self.pool().acquire().await?;
        store_entries(&mut conn, "stem_queue_entries", self.namespace(), envelopes).await
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
        let mut ids = Vec::with_capacity(envelopes.len());
        let mut queues = Vec::with_capacity(envelopes.len());
        let mut priorities = Vec::with_capacity(envelopes.len());
        let mut not_before = Vec::with_capacity(envelopes.len());
        let mut payloads = Vec::with_capacity(envelopes.len());
        for envelope in envelopes {
            ids.push(envelope.id.as_str());
            queues.push(envelope.queue.as_str());
            priorities.push(i16::from(envelope.priority));
            not_before.push(envelope.not_before.map_or(0, Timestamp::as_sql));
            payloads.push(envelope.to_json());
        }
        // One statement: the first envelope of each id, the ids remembered now (new, or
        // forgotten since), their entries, and a notification if any was stored (`notified`
        // has its one row exactly when `remembered` has rows). A concurrent publish of the
        // same id waits for this one's row and then finds it remembered.
        let mut remembered: std::collections::HashSet<String> = sqlx::query_scalar(&format!(
            "WITH batch AS (
                 SELECT DISTINCT ON (task_id) task_id, queue, priority, not_before, payload, n
                 FROM unnest($2::text[], $3::text[], $4::smallint[], $5::bigint[], $6::text[])
                     WITH ORDINALITY AS b(task_id, queue, priority, not_before, payload, n)
                 ORDER BY task_id, n),
             remembered AS (
                 INSERT INTO stem_unique_ids AS u (namespace, task_id, expires_at)
                 SELECT $1, task_id, {NOW_MS} + $7 FROM batch
                 ON CONFLICT (namespace, task_id) DO UPDATE SET expires_at = excluded.expires_at
                     WHERE u.expires_at <= {NOW_MS}
                 RETURNING task_id),
             stored AS (
                 INSERT INTO stem_queue_entries (namespace, queue, priority, visible_at, payload)
                 SELECT $1, queue, priority, GREATEST(not_before, {NOW_MS}), payload
                 FROM batch JOIN remembered USING (task_id)
                 ORDER BY n
                 RETURNING 1),
             notified AS (
                 SELECT pg_notify($8, $1) FROM (SELECT 1 FROM stored LIMIT 1) AS any_stored)
             SELECT task_id FROM remembered, notified"
        ))
        .bind(self.namespace())
        .bind(&ids)
        .bind(&queues)
        .bind(&priorities)
        .bind(&not_before)
        .bind(&payloads)
        .bind(millis(window))
        .bind(READY_CHANNEL)
        .fetch_all(self.pool())
        .await?
        .into_iter()
        .collect();
        // The first envelope of each remembered id was stored; a later one of the batch was not.
        Ok(ids.iter().map(|id| remembered.remove(*id)).collect())
    }

    async fn publish_by_key(
        &self,
        key: &str,
        envelope: &Envelope,
        window: Duration,
    ) -> Result<Option<String>, StorageError> {
        envelope.validate()?;
        let claim = uuid::Uuid::new_v4().simple().to_string();
        let mut tx = self.pool().begin().await?;
        // Claims the key when it is free or forgotten; else leaves the row as it is. Either way
        // the row comes back, locked: its claim says who holds the key. The clock is read once
        // (`excluded.expires_at - $5` is that reading).
        let (holder, held_by): (String, String) = sqlx::query_as(&format!(
            "INSERT INTO stem_unique_keys AS k (namespace, key, task_id, claim, expires_at)
             VALUES ($1, $2, $3, $4, {NOW_MS} + $5)
             ON CONFLICT (namespace, key) DO UPDATE SET
                 task_id = CASE WHEN k.expires_at <= excluded.expires_at - $5
                     THEN excluded.task_id ELSE k.task_id END,
                 claim = CASE WHEN k.expires_at <= excluded.expires_at - $5
                     THEN excluded.claim ELSE k.claim END,
                 expires_at = CASE WHEN k.expires_at <= excluded.expires_at - $5
                     THEN excluded.expires_at ELSE k.expires_at END
             RETURNING task_id, claim"
        ))
        .bind(self.namespace())
        .bind(key)
        .bind(&envelope.id)
        .bind(&claim)
        .bind(millis(window))
        .fetch_one(&mut *tx)
        .await?;
        if held_by != claim {
            tx.rollback().await?;
            return Ok(Some(holder));
        }
        store_entries(
            &mut tx,
            "stem_queue_entries",
            self.namespace(),
            std::slice::from_ref(envelope),
        )
        .await?;
        tx.commit().await?;
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
        if !options.wait.is_zero() {
            self.listen().await?;
        }
        let poll = self.inner.options.poll_interval;
        let (deliveries, _) = crate::wait::until_paused(
            &self.inner.published,
            options.wait,
            || self.take_ready(queues, max, lease),
            |(deliveries, _)| !deliveries.is_empty(),
            // Look again when the next entry falls due (due already means ready but locked by
            // another consumer's claim: a moment), at the latest after the poll interval.
            |(_, next_due)| match next_due {
                Some(due) => poll.min(Duration::from_millis(
                    u64::try_from(*due).unwrap_or(0).max(MIN_PAUSE_MS),
                )),
                None => poll,
            },
        )
        .await?;
        Ok(deliveries)
    }

    async fn settle_many(&self, batch: &[(Receipt, Settle)]) -> Result<Vec<bool>, StorageError> {
        validate_settles(batch.iter().map(|(receipt, settle)| (receipt, settle)))?;
        let pairs: Vec<(&Receipt, &Settle)> = batch.iter().map(|(r, s)| (r, s)).collect();
        let only_acks = batch.iter().all(|(_, settle)| *settle == Settle::Ack);
        let mut conn = self.pool().acquire().await?;
        if only_acks {
            // One statement needs no transaction.
            return Ok(settle_on(&mut conn, self.namespace(), &pairs).await?.0);
        }
        let mut tx = sqlx::Connection::begin(&mut *conn).await?;
        let (held, released) = settle_on(&mut tx, self.namespace(), &pairs).await?;
        if released {
            notify_ready(&mut tx, self.namespace()).await?;
        }
        tx.commit().await?;
        Ok(held)
    }

    async fn extend_lease(
        &self,
        receipt: &Receipt,
        lease: Duration,
    ) -> Result<Timestamp, StorageError> {
        let lost = || StorageError::LeaseLost(receipt.entry.clone());
        let id: i64 = receipt.entry.parse().map_err(|_| lost())?;
        let until: Option<i64> = sqlx::query_scalar(&format!(
            "UPDATE stem_queue_entries SET visible_at = {NOW_MS} + $1
             WHERE id = $2 AND lease_token = $3 AND namespace = $4
             RETURNING visible_at"
        ))
        .bind(millis(lease))
        .bind(id)
        .bind(&receipt.token)
        .bind(self.namespace())
        .fetch_optional(self.pool())
        .await?;
        until.map(Timestamp::from_sql).ok_or_else(lost)
    }

    async fn dead_letters(&self, query: &DeadLetterQuery) -> Result<Vec<DeadLetter>, StorageError> {
        self.select_dead(query).await
    }

    async fn delete_dead_letters(&self, ids: &[String]) -> Result<u64, StorageError> {
        if ids.is_empty() {
            return Ok(0);
        }
        let deleted =
            sqlx::query("DELETE FROM stem_dead_letters WHERE namespace = $1 AND id = ANY($2)")
                .bind(self.namespace())
                .bind(letter_numbers(ids))
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
        // One statement: the delete is the claim (a concurrent one waits for this row, then
        // finds it gone and stores nothing), the entry is stored from what it returned.
        let moved: i64 = sqlx::query_scalar(&format!(
            "WITH claimed AS (
                 DELETE FROM stem_dead_letters WHERE namespace = $1 AND id = $2 RETURNING 1),
             stored AS (
                 INSERT INTO stem_queue_entries (namespace, queue, priority, visible_at, payload)
                 SELECT $1, $3, $4, GREATEST($5, {NOW_MS}), $6 FROM claimed
                 RETURNING 1),
             notified AS (SELECT pg_notify($7, $1) FROM stored)
             SELECT count(*) FROM notified"
        ))
        .bind(self.namespace())
        .bind(number)
        .bind(&envelope.queue)
        .bind(i16::from(envelope.priority))
        .bind(envelope.not_before.map_or(0, Timestamp::as_sql))
        .bind(envelope.to_json())
        .bind(READY_CHANNEL)
        .fetch_one(self.pool())
        .await?;
        Ok(moved > 0)
    }

    async fn purge(&self, queue: &str) -> Result<u64, StorageError> {
        let purged = sqlx::query(&format!(
            "DELETE FROM stem_queue_entries
             WHERE namespace = $1 AND queue = $2
               AND (lease_token IS NULL OR visible_at <= {NOW_MS})"
        ))
        .bind(self.namespace())
        .bind(queue)
        .execute(self.pool())
        .await?;
        Ok(purged.rows_affected())
    }

    async fn stats(&self, queue: &str) -> Result<QueueStats, StorageError> {
        let row = sqlx::query(&format!(
            "WITH now AS (SELECT {NOW_MS} AS ms)
             SELECT
                 count(*) FILTER (WHERE visible_at <= now.ms) AS ready,
                 count(*) FILTER (WHERE visible_at > now.ms AND lease_token IS NULL) AS delayed,
                 count(*) FILTER (WHERE visible_at > now.ms AND lease_token IS NOT NULL)
                     AS in_flight,
                 (SELECT count(*) FROM stem_dead_letters WHERE namespace = $1 AND queue = $2)
                     AS dead
             FROM stem_queue_entries, now WHERE namespace = $1 AND queue = $2"
        ))
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
        // Each distinct name found by one index probe ("loose index scan"), not by reading
        // every row.
        let names = sqlx::query_scalar(
            "WITH RECURSIVE
             entries(queue) AS (
                 (SELECT queue FROM stem_queue_entries WHERE namespace = $1
                  ORDER BY queue LIMIT 1)
                 UNION ALL
                 SELECT (SELECT e.queue FROM stem_queue_entries e
                         WHERE e.namespace = $1 AND e.queue > entries.queue
                         ORDER BY e.queue LIMIT 1)
                 FROM entries WHERE entries.queue IS NOT NULL),
             dead(queue) AS (
                 (SELECT queue FROM stem_dead_letters WHERE namespace = $1
                  ORDER BY queue LIMIT 1)
                 UNION ALL
                 SELECT (SELECT d.queue FROM stem_dead_letters d
                         WHERE d.namespace = $1 AND d.queue > dead.queue
                         ORDER BY d.queue LIMIT 1)
                 FROM dead WHERE dead.queue IS NOT NULL)
             SELECT queue FROM entries WHERE queue IS NOT NULL
             UNION SELECT queue FROM dead WHERE queue IS NOT NULL
             ORDER BY queue",
        )
        .bind(self.namespace())
        .fetch_all(self.pool())
        .await?;
        Ok(names)
    }

    async fn broadcast(&self, channel: &str, message: &str) -> Result<(), StorageError> {
        let mut note = BroadcastNote {
            scope: self.inner.scope.clone(),
            channel: channel.to_owned(),
            message: Some(message.to_owned()),
            stored: None,
        };
        let mut payload = serde_json::to_string(&note).unwrap_or_default();
        if payload.len() > NOTIFY_LIMIT {
            let id: i64 = sqlx::query_scalar(&format!(
                "INSERT INTO stem_broadcasts (message, sent_at) VALUES ($1, {NOW_MS}) RETURNING id"
            ))
            .bind(message)
            .fetch_one(self.pool())
            .await?;
            note.message = None;
            note.stored = Some(id);
            payload = serde_json::to_string(&note).unwrap_or_default();
        }
        sqlx::query("SELECT pg_notify($1, $2)")
            .bind(BROADCAST_CHANNEL)
            .bind(payload)
            .execute(self.pool())
            .await?;
        Ok(())
    }

    async fn subscribe(&self, channel: &str) -> Result<Subscription, StorageError> {
        self.listen().await?;
        Ok(self.inner.channels.subscribe(channel))
    }
}
