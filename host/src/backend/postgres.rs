//! The Postgres result backend: task history, groups and heartbeats in a few tables.
//!
//! - A batch of statuses is one `INSERT … ON CONFLICT` statement that leaves a terminal status
//!   alone (unless it has expired); expiry is a column, and expired rows are deleted every
//!   [`PostgresBackendOptions::cleanup_interval`] (reads ignore them before that).
//! - A batch that records a terminal status sends `NOTIFY stem_results` when it commits;
//!   every backend listens on one connection and wakes its waiters at once, in any process on
//!   any host. Waiters also look every [`PostgresBackendOptions::poll_interval`], should a
//!   notification be lost while the listening connection reconnects.
//! - A group member is a row (the primary key counts it once) and the group's row counts its
//!   members in the same statement. Creating a group or saving a canvas is an insert that
//!   leaves an unexpired row of the same id alone.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::Row;
use sqlx::postgres::{PgListener, PgPool};
use tokio::sync::{Notify, OnceCell};

use super::{
    CanvasRecord, GroupProgress, GroupRecord, ResultBackend, StatusQuery, TaskStatus, Ttls,
    WorkerHeartbeat, distinct_slices, is_final,
};
use crate::broker::DEFAULT_NAMESPACE;
use crate::broker::postgres::millis;
use crate::postgres::{self, NOW_MS};
use crate::storage::{Background, Periodic, StorageError};
use crate::time::Timestamp;

/// `stem_groups.callback` and `callback_claimed` are no longer written (chord callbacks are
/// not claimed here any more); they keep their defaults, so a database stays usable by
/// processes of the previous version during an upgrade.
const MIGRATIONS: &[&str] = &[
    "
    CREATE TABLE stem_task_results (
        namespace TEXT NOT NULL,
        id TEXT NOT NULL,
        state TEXT NOT NULL,
        task TEXT,
        status TEXT NOT NULL,
        updated_at BIGINT NOT NULL,
        expires_at BIGINT,
        PRIMARY KEY (namespace, id)
    );
    CREATE INDEX stem_task_results_updated ON stem_task_results (namespace, updated_at);
    CREATE INDEX stem_task_results_expiry ON stem_task_results (expires_at);
    CREATE TABLE stem_groups (
        namespace TEXT NOT NULL,
        id TEXT NOT NULL,
        size INTEGER NOT NULL,
        callback TEXT,
        callback_claimed BOOLEAN NOT NULL DEFAULT false,
        finished INTEGER NOT NULL DEFAULT 0,
        created_at BIGINT NOT NULL,
        expires_at BIGINT NOT NULL,
        PRIMARY KEY (namespace, id)
    );
    CREATE INDEX stem_groups_expiry ON stem_groups (expires_at);
    CREATE TABLE stem_group_members (
        namespace TEXT NOT NULL,
        group_id TEXT NOT NULL,
        task_id TEXT NOT NULL,
        seq BIGSERIAL,
        PRIMARY KEY (namespace, group_id, task_id)
    );
    CREATE TABLE stem_worker_heartbeats (
        namespace TEXT NOT NULL,
        worker_id TEXT NOT NULL,
        heartbeat TEXT NOT NULL,
        expires_at BIGINT NOT NULL,
        PRIMARY KEY (namespace, worker_id)
    );
",
    "
    CREATE TABLE stem_canvases (
        namespace TEXT NOT NULL,
        id TEXT NOT NULL,
        tree TEXT NOT NULL,
        created_at BIGINT NOT NULL,
        expires_at BIGINT NOT NULL,
        PRIMARY KEY (namespace, id)
    );
    CREATE INDEX stem_canvases_expiry ON stem_canvases (expires_at);
",
];

/// The channel a batch with a terminal status notifies, with the namespace as payload.
pub(crate) const RESULTS_CHANNEL: &str = "stem_results";

/// Tuning for [`PostgresBackend::connect`].
#[derive(Clone, Debug)]
pub struct PostgresBackendOptions {
    /// Keeps environments sharing one database apart.
    pub namespace: String,
    /// Default expiry of results, groups and heartbeats.
    pub ttls: Ttls,
    /// How often expired rows are deleted.
    pub cleanup_interval: Duration,
    /// The longest a waiter goes without looking, should a notification be lost.
    pub poll_interval: Duration,
}

impl Default for PostgresBackendOptions {
    fn default() -> PostgresBackendOptions {
        PostgresBackendOptions {
            namespace: DEFAULT_NAMESPACE.to_owned(),
            ttls: Ttls::default(),
            cleanup_interval: Duration::from_secs(60),
            poll_interval: Duration::from_secs(1),
        }
    }
}

/// A result backend on a Postgres database. Clones share the pool and the listener.
#[derive(Clone)]
pub struct PostgresBackend {
    inner: Arc<Inner>,
}

struct Inner {
    pool: Arc<PgPool>,
    options: PostgresBackendOptions,
    /// Wakes this backend's waiters when a terminal status is written in its namespace.
    changed: Arc<Notify>,
    /// The listening connection, started by the first wait.
    listener: OnceCell<Background>,
    _cleaner: Periodic,
}

impl PostgresBackend {
    /// Connects to the database at `url`, creating and migrating the tables if needed.
    pub async fn connect(
        url: &str,
        options: PostgresBackendOptions,
    ) -> Result<PostgresBackend, StorageError> {
        let pool = postgres::connect(url).await?;
        postgres::migrate(&pool, "result-backend", MIGRATIONS).await?;
        let cleaner = {
            let pool = PgPool::clone(&pool);
            Periodic::spawn(options.cleanup_interval, move || clean(pool.clone()))
        };
        Ok(PostgresBackend {
            inner: Arc::new(Inner {
                pool,
                options,
                changed: Arc::new(Notify::new()),
                listener: OnceCell::new(),
                _cleaner: cleaner,
            }),
        })
    }

    fn namespace(&self) -> &str {
        &self.inner.options.namespace
    }

    fn pool(&self) -> &PgPool {
        &self.inner.pool
    }

    /// The result TTL of a write, `None` keeping it for ever.
    fn result_ttl(&self, ttl: Option<Duration>) -> Option<i64> {
        ttl.or(self.inner.options.ttls.result).map(millis)
    }

    /// Starts listening once; returns when notifications are being received.
    async fn listen(&self) -> Result<(), StorageError> {
        self.inner
            .listener
            .get_or_try_init(|| async {
                let mut listener = PgListener::connect_with(self.pool()).await?;
                listener.listen(RESULTS_CHANNEL).await?;
                let namespace = self.namespace().to_owned();
                let changed = self.inner.changed.clone();
                Ok::<_, StorageError>(Background::spawn(receive(listener, namespace, changed)))
            })
            .await?;
        Ok(())
    }
}

/// Wakes waiters for every notification of `namespace` until aborted; also when the
/// connection drops, since notifications sent meanwhile are lost.
async fn receive(mut listener: PgListener, namespace: String, changed: Arc<Notify>) {
    loop {
        let notification = postgres::next_notification(&mut listener, &changed).await;
        if notification.payload() == namespace {
            changed.notify_waiters();
        }
    }
}

/// The conflict clause of a status upsert into `stem_task_results AS r`: a stored status is
/// replaced unless it is terminal (and unexpired), or where `also` (an SQL condition) holds.
pub(crate) fn unless_terminal(also: &str) -> String {
    format!(
        "ON CONFLICT (namespace, id) DO UPDATE SET
             state = excluded.state, task = excluded.task, status = excluded.status,
             updated_at = excluded.updated_at, expires_at = excluded.expires_at
         WHERE {also} r.state NOT IN ('succeeded', 'failed', 'revoked')
            OR r.expires_at <= {NOW_MS}"
    )
}

/// Statuses as the column arrays an upsert's `unnest` binds.
pub(crate) struct StatusColumns<'a> {
    pub ids: Vec<&'a str>,
    pub states: Vec<&'static str>,
    pub tasks: Vec<Option<&'a str>>,
    pub texts: Vec<String>,
    pub updated: Vec<i64>,
    /// Whether any of them is terminal (waiters are to be notified).
    pub terminal: bool,
}

impl<'a> StatusColumns<'a> {
    pub(crate) fn of(statuses: &[&'a TaskStatus]) -> StatusColumns<'a> {
        StatusColumns {
            ids: statuses.iter().map(|s| s.id.as_str()).collect(),
            states: statuses.iter().map(|s| s.state.as_str()).collect(),
            tasks: statuses.iter().map(|s| s.task.as_deref()).collect(),
            texts: statuses.iter().map(|s| s.to_json()).collect(),
            updated: statuses.iter().map(|s| s.updated_at.as_sql()).collect(),
            terminal: statuses.iter().any(|s| s.state.is_terminal()),
        }
    }
}

/// Writes a slice of distinct tasks' statuses in one statement, leaving unexpired terminal
/// ones alone unless `overwrite`; whether each was written. Notifies waiters when the slice
/// holds a terminal status.
pub(crate) async fn upsert_statuses(
    conn: &mut sqlx::PgConnection,
    namespace: &str,
    statuses: &[&TaskStatus],
    ttl: Option<i64>,
    overwrite: bool,
) -> Result<Vec<bool>, StorageError> {
    let columns = StatusColumns::of(statuses);
    let written: std::collections::HashSet<String> = sqlx::query_scalar(&format!(
        "INSERT INTO stem_task_results AS r
             (namespace, id, state, task, status, updated_at, expires_at)
         SELECT $1, id, state, task, status, updated_at, {NOW_MS} + $7
         FROM unnest($2::text[], $3::text[], $4::text[], $5::text[], $6::bigint[])
             AS s(id, state, task, status, updated_at)
         {}
         RETURNING r.id",
        unless_terminal("$8 OR")
    ))
    .bind(namespace)
    .bind(&columns.ids)
    .bind(&columns.states)
    .bind(&columns.tasks)
    .bind(&columns.texts)
    .bind(&columns.updated)
    .bind(ttl)
    .bind(overwrite)
    .fetch_all(&mut *conn)
    .await?
    .into_iter()
    .collect();
    if columns.terminal && !written.is_empty() {
        sqlx::query("SELECT pg_notify($1, $2)")
            .bind(RESULTS_CHANNEL)
            .bind(namespace)
            .execute(&mut *conn)
            .await?;
    }
    Ok(columns.ids.iter().map(|id| written.contains(*id)).collect())
}

/// Writes statuses cut by [`distinct_slices`], one statement per slice; whether each was
/// written.
pub(crate) async fn set_statuses(
    conn: &mut sqlx::PgConnection,
    namespace: &str,
    slices: &[&[TaskStatus]],
    ttl: Option<i64>,
) -> Result<Vec<bool>, StorageError> {
    let mut written = Vec::new();
    for slice in slices {
        let slice: Vec<&TaskStatus> = slice.iter().collect();
        written.extend(upsert_statuses(conn, namespace, &slice, ttl, false).await?);
    }
    Ok(written)
}

/// Deletes every expired row.
async fn clean(pool: PgPool) {
    let cleaned = async {
        sqlx::query(&format!(
            "DELETE FROM stem_task_results WHERE expires_at <= {NOW_MS}"
        ))
        .execute(&pool)
        .await?;
        sqlx::query(&format!(
            "DELETE FROM stem_group_members m USING stem_groups g
             WHERE m.namespace = g.namespace AND m.group_id = g.id AND g.expires_at <= {NOW_MS}"
        ))
        .execute(&pool)
        .await?;
        sqlx::query(&format!(
            "DELETE FROM stem_groups WHERE expires_at <= {NOW_MS}"
        ))
        .execute(&pool)
        .await?;
        sqlx::query(&format!(
            "DELETE FROM stem_canvases WHERE expires_at <= {NOW_MS}"
        ))
        .execute(&pool)
        .await?;
        sqlx::query(&format!(
            "DELETE FROM stem_worker_heartbeats WHERE expires_at <= {NOW_MS}"
        ))
        .execute(&pool)
        .await?;
        Ok::<(), sqlx::Error>(())
    };
    if let Err(error) = cleaned.await {
        tracing::warn!(%error, "cleaning expired results failed");
    }
}

#[async_trait]
impl ResultBackend for PostgresBackend {
    async fn set_many(
        &self,
        statuses: &[TaskStatus],
        ttl: Option<Duration>,
    ) -> Result<Vec<bool>, StorageError> {
        if statuses.is_empty() {
            return Ok(Vec::new());
        }
        let ttl = self.result_ttl(ttl);
        let mut conn = self.pool().acquire().await?;
        let slices = distinct_slices(statuses, usize::MAX);
        if slices.len() == 1 {
            return set_statuses(&mut conn, self.namespace(), &slices, ttl).await;
        }
        let mut tx = sqlx::Connection::begin(&mut *conn).await?;
        let written = set_statuses(&mut tx, self.namespace(), &slices, ttl).await?;
        tx.commit().await?;
        Ok(written)
    }

    async fn replace(
        &self,
        status: &TaskStatus,
        ttl: Option<Duration>,
    ) -> Result<(), StorageError> {
        let mut conn = self.pool().acquire().await?;
        let ttl = self.result_ttl(ttl);
        upsert_statuses(&mut conn, self.namespace(), &[status], ttl, true).await?;
        Ok(())
    }

    async fn get(&self, id: &str) -> Result<Option<TaskStatus>, StorageError> {
        let text: Option<String> = sqlx::query_scalar(&format!(
            "SELECT status FROM stem_task_results
             WHERE namespace = $1 AND id = $2 AND (expires_at IS NULL OR expires_at > {NOW_MS})"
        ))
        .bind(self.namespace())
        .bind(id)
        .fetch_optional(self.pool())
        .await?;
        text.map(|text| TaskStatus::from_json(id, &text))
            .transpose()
    }

    async fn get_many(&self, ids: &[String]) -> Result<Vec<Option<TaskStatus>>, StorageError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let rows = sqlx::query(&format!(
            "SELECT id, status FROM stem_task_results
             WHERE namespace = $1 AND id = ANY($2)
               AND (expires_at IS NULL OR expires_at > {NOW_MS})"
        ))
        .bind(self.namespace())
        .bind(ids)
        .fetch_all(self.pool())
        .await?;
        let mut found = std::collections::HashMap::new();
        for row in rows {
            let id: String = row.get("id");
            // One unreadable record must not hold up the others: it reads as absent.
            match TaskStatus::from_json(&id, row.get("status")) {
                Ok(status) => {
                    found.insert(id, status);
                }
                Err(error) => tracing::warn!(%error, "ignoring an unreadable status"),
            }
        }
        Ok(ids.iter().map(|id| found.get(id).cloned()).collect())
    }

    async fn wait(&self, id: &str, timeout: Duration) -> Result<Option<TaskStatus>, StorageError> {
        if !timeout.is_zero() {
            self.listen().await?;
        }
        crate::wait::until(
            &self.inner.changed,
            timeout,
            self.inner.options.poll_interval,
            || self.get(id),
            is_final,
        )
        .await
    }

    async fn list(&self, query: &StatusQuery) -> Result<Vec<TaskStatus>, StorageError> {
        let rows = sqlx::query(&format!(
            "SELECT id, status FROM stem_task_results
             WHERE namespace = $1 AND (expires_at IS NULL OR expires_at > {NOW_MS})
               AND ($2::text IS NULL OR state = $2) AND ($3::text IS NULL OR task = $3)
             ORDER BY updated_at DESC, id LIMIT $4"
        ))
        .bind(self.namespace())
        .bind(query.state.map(|state| state.as_str()))
        .bind(query.task.as_deref())
        .bind(i64::try_from(query.limit).unwrap_or(i64::MAX))
        .fetch_all(self.pool())
        .await?;
        rows.iter()
            .map(|row| TaskStatus::from_json(row.get("id"), row.get("status")))
            .collect()
    }

    async fn create_group(
        &self,
        group: &GroupRecord,
        ttl: Option<Duration>,
    ) -> Result<bool, StorageError> {
        let ttl = millis(ttl.unwrap_or(self.inner.options.ttls.group));
        let mut tx = self.pool().begin().await?;
        // A concurrent create of the same id waits for this one's row, then leaves it alone.
        let created = sqlx::query(&format!(
            "INSERT INTO stem_groups AS g (namespace, id, size, finished, created_at, expires_at)
             VALUES ($1, $2, $3, 0, $4, {NOW_MS} + $5)
             ON CONFLICT (namespace, id) DO UPDATE SET
                 size = excluded.size, finished = 0, created_at = excluded.created_at,
                 expires_at = excluded.expires_at
             WHERE g.expires_at <= {NOW_MS}"
        ))
        .bind(self.namespace())
        .bind(&group.id)
        .bind(i64::from(group.size))
        .bind(group.created_at.as_sql())
        .bind(ttl)
        .execute(&mut *tx)
        .await?
        .rows_affected()
            > 0;
        if created {
            // Members of an expired group of the same id that cleaning has not reached yet.
            sqlx::query("DELETE FROM stem_group_members WHERE namespace = $1 AND group_id = $2")
                .bind(self.namespace())
                .bind(&group.id)
                .execute(&mut *tx)
                .await?;
            sqlx::query(
                "WITH added AS (
                     INSERT INTO stem_group_members (namespace, group_id, task_id)
                     SELECT $1, $2, task_id FROM unnest($3::text[]) WITH ORDINALITY AS m(task_id, n)
                     ORDER BY n
                     ON CONFLICT DO NOTHING
                     RETURNING 1)
                 UPDATE stem_groups SET finished = (SELECT count(*) FROM added)
                 WHERE namespace = $1 AND id = $2",
            )
            .bind(self.namespace())
            .bind(&group.id)
            .bind(&group.finished)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(created)
    }

    async fn get_group(&self, id: &str) -> Result<Option<GroupRecord>, StorageError> {
        let Some(row) = sqlx::query(&format!(
            "SELECT size, created_at,
                 ARRAY(SELECT task_id FROM stem_group_members m
                       WHERE m.namespace = g.namespace AND m.group_id = g.id
                       ORDER BY seq) AS finished
             FROM stem_groups g
             WHERE namespace = $1 AND id = $2 AND expires_at > {NOW_MS}"
        ))
        .bind(self.namespace())
        .bind(id)
        .fetch_optional(self.pool())
        .await?
        else {
            return Ok(None);
        };
        Ok(Some(GroupRecord {
            id: id.to_owned(),
            size: u32::try_from(row.get::<i32, _>("size")).unwrap_or(0),
            finished: row.get("finished"),
            created_at: Timestamp::from_sql(row.get("created_at")),
        }))
    }

    async fn group_member_finished(
        &self,
        group_id: &str,
        task_id: &str,
    ) -> Result<GroupProgress, StorageError> {
        // The count is a column of the group's row: concurrent reports queue on the row lock
        // and each adds its member to the count the previous one left.
        let row = sqlx::query(&format!(
            "WITH added AS (
                 INSERT INTO stem_group_members (namespace, group_id, task_id)
                 SELECT namespace, id, $3 FROM stem_groups
                 WHERE namespace = $1 AND id = $2 AND expires_at > {NOW_MS}
                 ON CONFLICT DO NOTHING
                 RETURNING task_id)
             UPDATE stem_groups SET finished = finished + (SELECT count(*) FROM added)
             WHERE namespace = $1 AND id = $2 AND expires_at > {NOW_MS}
             RETURNING size, finished"
        ))
        .bind(self.namespace())
        .bind(group_id)
        .bind(task_id)
        .fetch_optional(self.pool())
        .await?
        .ok_or_else(|| StorageError::NotFound(format!("group {group_id}")))?;
        Ok(GroupProgress {
            finished: u32::try_from(row.get::<i32, _>("finished")).unwrap_or(u32::MAX),
            size: u32::try_from(row.get::<i32, _>("size")).unwrap_or(0),
        })
    }

    async fn save_canvas(
        &self,
        canvas: &CanvasRecord,
        ttl: Option<Duration>,
    ) -> Result<Option<CanvasRecord>, StorageError> {
        let ttl = millis(ttl.unwrap_or(self.inner.options.ttls.group));
        // In a transaction: the insert that finds an unexpired canvas locks it, so the read
        // after it (a statement of its own, to see a canvas committed meanwhile) finds it too.
        let mut tx = self.pool().begin().await?;
        let saved = sqlx::query(&format!(
            "INSERT INTO stem_canvases AS c (namespace, id, tree, created_at, expires_at)
             VALUES ($1, $2, $3, $4, {NOW_MS} + $5)
             ON CONFLICT (namespace, id) DO UPDATE SET
                 tree = excluded.tree, created_at = excluded.created_at,
                 expires_at = excluded.expires_at
             WHERE c.expires_at <= {NOW_MS}"
        ))
        .bind(self.namespace())
        .bind(&canvas.id)
        .bind(&canvas.tree)
        .bind(canvas.created_at.as_sql())
        .bind(ttl)
        .execute(&mut *tx)
        .await?
        .rows_affected()
            > 0;
        let stored = if saved {
            None
        } else {
            let row = sqlx::query(
                "SELECT tree, created_at FROM stem_canvases WHERE namespace = $1 AND id = $2",
            )
            .bind(self.namespace())
            .bind(&canvas.id)
            .fetch_one(&mut *tx)
            .await?;
            Some(canvas_record(&canvas.id, &row))
        };
        tx.commit().await?;
        Ok(stored)
    }

    async fn get_canvas(&self, id: &str) -> Result<Option<CanvasRecord>, StorageError> {
        let row = sqlx::query(&format!(
            "SELECT tree, created_at FROM stem_canvases
             WHERE namespace = $1 AND id = $2 AND expires_at > {NOW_MS}"
        ))
        .bind(self.namespace())
        .bind(id)
        .fetch_optional(self.pool())
        .await?;
        Ok(row.map(|row| canvas_record(id, &row)))
    }

    async fn heartbeat(
        &self,
        heartbeat: &WorkerHeartbeat,
        ttl: Option<Duration>,
    ) -> Result<(), StorageError> {
        let ttl = millis(ttl.unwrap_or(self.inner.options.ttls.heartbeat));
        let text = serde_json::to_string(heartbeat).expect("a heartbeat always serialises");
        sqlx::query(&format!(
            "INSERT INTO stem_worker_heartbeats (namespace, worker_id, heartbeat, expires_at)
             VALUES ($1, $2, $3, {NOW_MS} + $4)
             ON CONFLICT (namespace, worker_id) DO UPDATE SET
                 heartbeat = excluded.heartbeat, expires_at = excluded.expires_at"
        ))
        .bind(self.namespace())
        .bind(&heartbeat.worker_id)
        .bind(text)
        .bind(ttl)
        .execute(self.pool())
        .await?;
        Ok(())
    }

    async fn workers(&self) -> Result<Vec<WorkerHeartbeat>, StorageError> {
        let rows = sqlx::query(&format!(
            "SELECT worker_id, heartbeat FROM stem_worker_heartbeats
             WHERE namespace = $1 AND expires_at > {NOW_MS} ORDER BY worker_id"
        ))
        .bind(self.namespace())
        .fetch_all(self.pool())
        .await?;
        rows.iter()
            .map(|row| {
                serde_json::from_str(row.get("heartbeat")).map_err(|e| {
                    StorageError::corrupt(
                        format!("heartbeat of worker {}", row.get::<String, _>("worker_id")),
                        e,
                    )
                })
            })
            .collect()
    }
}

/// A canvas from a row of `stem_canvases` (`tree`, `created_at`).
fn canvas_record(id: &str, row: &sqlx::postgres::PgRow) -> CanvasRecord {
    CanvasRecord {
        id: id.to_owned(),
        tree: row.get("tree"),
        created_at: Timestamp::from_sql(row.get("created_at")),
    }
}
