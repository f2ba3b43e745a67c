//! The SQLite result backend: task history in one local file, no infrastructure.
//!
//! Waiting for a result polls the file every [`SqliteBackendOptions::poll_interval`], so it
//! works from any process on the host; writes from the same process wake waiters at once.
//! SQLite allows one writer at a time: keep the backend in its own file, apart from the broker.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::Row;
use sqlx::sqlite::SqlitePool;
use tokio::sync::Notify;

use super::{
    CanvasRecord, GroupProgress, GroupRecord, ResultBackend, StatusQuery, TaskStatus, Ttls,
    WorkerHeartbeat, distinct_slices, is_final,
};
use crate::broker::DEFAULT_NAMESPACE;
use crate::sqlite;
use crate::storage::Periodic;
use crate::storage::StorageError;
use crate::time::Timestamp;

/// `stem_groups.callback` and `callback_claimed` are no longer written (chord callbacks are
/// not claimed here any more); they keep their defaults, so a file stays usable by processes
/// of the previous version during an upgrade.
const MIGRATIONS: &[&str] = &[
    "
    CREATE TABLE stem_task_results (
        namespace TEXT NOT NULL,
        id TEXT NOT NULL,
        state TEXT NOT NULL,
        task TEXT,
        status TEXT NOT NULL,
        updated_at INTEGER NOT NULL,
        expires_at INTEGER,
        PRIMARY KEY (namespace, id)
    );
    CREATE INDEX stem_task_results_updated ON stem_task_results (namespace, updated_at);
    CREATE INDEX stem_task_results_expiry ON stem_task_results (expires_at);
    CREATE TABLE stem_groups (
        namespace TEXT NOT NULL,
        id TEXT NOT NULL,
        size INTEGER NOT NULL,
        callback TEXT,
        callback_claimed INTEGER NOT NULL DEFAULT 0,
        created_at INTEGER NOT NULL,
        expires_at INTEGER NOT NULL,
        PRIMARY KEY (namespace, id)
    );
    CREATE TABLE stem_group_members (
        namespace TEXT NOT NULL,
        group_id TEXT NOT NULL,
        task_id TEXT NOT NULL,
        PRIMARY KEY (namespace, group_id, task_id)
    );
    CREATE TABLE stem_worker_heartbeats (
        namespace TEXT NOT NULL,
        worker_id TEXT NOT NULL,
        heartbeat TEXT NOT NULL,
        expires_at INTEGER NOT NULL,
        PRIMARY KEY (namespace, worker_id)
    );
",
    "
    CREATE TABLE stem_canvases (
        namespace TEXT NOT NULL,
        id TEXT NOT NULL,
        tree TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        expires_at INTEGER NOT NULL,
        PRIMARY KEY (namespace, id)
    );
    CREATE INDEX stem_canvases_expiry ON stem_canvases (expires_at);
",
    // A group's count kept beside its members: counting them on every report made a group of
    // N members cost N² over its life.
    "
    ALTER TABLE stem_groups ADD COLUMN finished INTEGER NOT NULL DEFAULT 0;
    UPDATE stem_groups SET finished = (
        SELECT COUNT(*) FROM stem_group_members m
        WHERE m.namespace = stem_groups.namespace AND m.group_id = stem_groups.id);
",
];

/// Tuning for [`SqliteBackend::open`].
#[derive(Clone, Debug)]
pub struct SqliteBackendOptions {
    /// Keeps environments sharing one file apart.
    pub namespace: String,
    /// Default expiry of results, groups and heartbeats.
    pub ttls: Ttls,
    /// How often expired rows are deleted.
    pub cleanup_interval: Duration,
    /// How often [`ResultBackend::wait`] reads the file.
    pub poll_interval: Duration,
    pub max_connections: u32,
}

impl Default for SqliteBackendOptions {
    fn default() -> SqliteBackendOptions {
        SqliteBackendOptions {
            namespace: DEFAULT_NAMESPACE.to_owned(),
            ttls: Ttls::default(),
            cleanup_interval: Duration::from_secs(60),
            poll_interval: Duration::from_millis(20),
            max_connections: 4,
        }
    }
}

/// A result backend on a SQLite file. Clones share the connection pool.
#[derive(Clone)]
pub struct SqliteBackend {
    inner: Arc<Inner>,
}

struct Inner {
    pool: SqlitePool,
    options: SqliteBackendOptions,
    /// Wakes this backend's waiters when it writes a status.
    changed: Notify,
    _cleaner: Periodic,
}

impl SqliteBackend {
    /// Opens the backend in the file at `path`, creating and migrating it if needed.
    pub async fn open(
        path: impl AsRef<Path>,
        options: SqliteBackendOptions,
    ) -> Result<SqliteBackend, StorageError> {
        let pool = sqlite::open(path.as_ref(), options.max_connections).await?;
        sqlite::migrate(&pool, "result-backend", MIGRATIONS).await?;
        let cleaner = {
            let pool = pool.clone();
            Periodic::spawn(options.cleanup_interval, move || clean(pool.clone()))
        };
        Ok(SqliteBackend {
            inner: Arc::new(Inner {
                pool,
                options,
                changed: Notify::new(),
                _cleaner: cleaner,
            }),
        })
    }

    fn namespace(&self) -> &str {
        &self.inner.options.namespace
    }

    fn pool(&self) -> &SqlitePool {
        &self.inner.pool
    }

    fn ttls(&self) -> &Ttls {
        &self.inner.options.ttls
    }
}

/// Writes a status. With `guard_now`, a stored terminal status that has not expired by then
/// is left as it is; returns whether the row was written.
async fn upsert(
    conn: &mut sqlx::SqliteConnection,
    namespace: &str,
    status: &TaskStatus,
    expires_at: Option<Timestamp>,
    guard_now: Option<Timestamp>,
) -> Result<bool, StorageError> {
    let done = sqlx::query(
        "INSERT INTO stem_task_results (namespace, id, state, task, status, updated_at, expires_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
         ON CONFLICT (namespace, id) DO UPDATE SET
             state = excluded.state, task = excluded.task, status = excluded.status,
             updated_at = excluded.updated_at, expires_at = excluded.expires_at
         WHERE ?8 IS NULL
            OR stem_task_results.state NOT IN ('succeeded', 'failed', 'revoked')
            OR stem_task_results.expires_at <= ?8",
    )
    .bind(namespace)
    .bind(&status.id)
    .bind(status.state.as_str())
    .bind(&status.task)
    .bind(status.to_json())
    .bind(status.updated_at.as_sql())
    .bind(expires_at.map(Timestamp::as_sql))
    .bind(guard_now.map(Timestamp::as_sql))
    .execute(conn)
    .await?;
    Ok(done.rows_affected() > 0)
}

/// Statuses written by one statement (eight bound values each).
const STATUSES_PER_STATEMENT: usize = 500;

/// Writes a slice of distinct tasks' statuses in one statement, leaving terminal ones alone;
/// whether each was written.
async fn upsert_many(
    conn: &mut sqlx::SqliteConnection,
    namespace: &str,
    statuses: &[TaskStatus],
    expires_at: Option<Timestamp>,
    now: Timestamp,
) -> Result<Vec<bool>, StorageError> {
    let sql = format!(
        "INSERT INTO stem_task_results (namespace, id, state, task, status, updated_at, expires_at)
         VALUES {}
         ON CONFLICT (namespace, id) DO UPDATE SET
             state = excluded.state, task = excluded.task, status = excluded.status,
             updated_at = excluded.updated_at, expires_at = excluded.expires_at
         WHERE stem_task_results.state NOT IN ('succeeded', 'failed', 'revoked')
            OR stem_task_results.expires_at <= ?
         RETURNING id",
        vec!["(?, ?, ?, ?, ?, ?, ?)"; statuses.len()].join(", ")
    );
    let mut insert = sqlx::query_scalar::<_, String>(&sql);
    for status in statuses {
        insert = insert
            .bind(namespace)
            .bind(&status.id)
            .bind(status.state.as_str())
            .bind(&status.task)
            .bind(status.to_json())
            .bind(status.updated_at.as_sql())
            .bind(expires_at.map(Timestamp::as_sql));
    }
    let written: std::collections::HashSet<String> = insert
        .bind(now.as_sql())
        .fetch_all(&mut *conn)
        .await?
        .into_iter()
        .collect();
    Ok(statuses.iter().map(|s| written.contains(&s.id)).collect())
}

/// Deletes every expired row.
async fn clean(pool: SqlitePool) {
    let now = Timestamp::now().as_sql();
    let cleaned = async {
        sqlx::query("DELETE FROM stem_task_results WHERE expires_at <= ?")
            .bind(now)
            .execute(&pool)
            .await?;
        sqlx::query(
            "DELETE FROM stem_group_members WHERE (namespace, group_id) IN
                 (SELECT namespace, id FROM stem_groups WHERE expires_at <= ?)",
        )
        .bind(now)
        .execute(&pool)
        .await?;
        sqlx::query("DELETE FROM stem_groups WHERE expires_at <= ?")
            .bind(now)
            .execute(&pool)
            .await?;
        sqlx::query("DELETE FROM stem_canvases WHERE expires_at <= ?")
            .bind(now)
            .execute(&pool)
            .await?;
        sqlx::query("DELETE FROM stem_worker_heartbeats WHERE expires_at <= ?")
            .bind(now)
            .execute(&pool)
            .await?;
        Ok::<(), sqlx::Error>(())
    };
    if let Err(error) = cleaned.await {
        tracing::warn!(%error, "cleaning expired results failed");
    }
}

#[async_trait]
impl ResultBackend for SqliteBackend {
    async fn set_many(
        &self,
        statuses: &[TaskStatus],
        ttl: Option<Duration>,
    ) -> Result<Vec<bool>, StorageError> {
        let now = Timestamp::now();
        let expires_at = self.ttls().result_expiry(ttl, now);
        let mut written = Vec::with_capacity(statuses.len());
        let mut tx = self.pool().begin().await?;
        for slice in distinct_slices(statuses, STATUSES_PER_STATEMENT) {
            written.extend(upsert_many(&mut tx, self.namespace(), slice, expires_at, now).await?);
        }
        tx.commit().await?;
        self.inner.changed.notify_waiters();
        Ok(written)
    }

    async fn replace(
        &self,
        status: &TaskStatus,
        ttl: Option<Duration>,
    ) -> Result<(), StorageError> {
        let expires_at = self.ttls().result_expiry(ttl, Timestamp::now());
        let mut conn = self.pool().acquire().await?;
        upsert(&mut conn, self.namespace(), status, expires_at, None).await?;
        self.inner.changed.notify_waiters();
        Ok(())
    }

    async fn get(&self, id: &str) -> Result<Option<TaskStatus>, StorageError> {
        let text: Option<String> = sqlx::query_scalar(
            "SELECT status FROM stem_task_results
             WHERE namespace = ? AND id = ? AND (expires_at IS NULL OR expires_at > ?)",
        )
        .bind(self.namespace())
        .bind(id)
        .bind(Timestamp::now().as_sql())
        .fetch_optional(self.pool())
        .await?;
        text.map(|text| TaskStatus::from_json(id, &text))
            .transpose()
    }

    async fn get_many(&self, ids: &[String]) -> Result<Vec<Option<TaskStatus>>, StorageError> {
        let mut found = std::collections::HashMap::new();
        for chunk in ids.chunks(500) {
            let sql = format!(
                "SELECT id, status FROM stem_task_results
                 WHERE namespace = ? AND (expires_at IS NULL OR expires_at > ?) AND id IN ({})",
                sqlite::placeholders(chunk.len())
            );
            let mut select = sqlx::query(&sql)
                .bind(self.namespace())
                .bind(Timestamp::now().as_sql());
            for id in chunk {
                select = select.bind(id);
            }
            for row in select.fetch_all(self.pool()).await? {
                let id: String = row.get("id");
                // One unreadable record must not hold up the others: it reads as absent.
                match TaskStatus::from_json(&id, row.get("status")) {
                    Ok(status) => {
                        found.insert(id, status);
                    }
                    Err(error) => tracing::warn!(%error, "ignoring an unreadable status"),
                }
            }
        }
        Ok(ids.iter().map(|id| found.get(id).cloned()).collect())
    }

    async fn wait(&self, id: &str, timeout: Duration) -> Result<Option<TaskStatus>, StorageError> {
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
        let mut sql = String::from(
            "SELECT id, status FROM stem_task_results
             WHERE namespace = ? AND (expires_at IS NULL OR expires_at > ?)",
        );
        if query.state.is_some() {
            sql.push_str(" AND state = ?");
        }
        if query.task.is_some() {
            sql.push_str(" AND task = ?");
        }
        sql.push_str(" ORDER BY updated_at DESC, id LIMIT ?");
        let mut select = sqlx::query(&sql)
            .bind(self.namespace())
            .bind(Timestamp::now().as_sql());
        if let Some(state) = query.state {
            select = select.bind(state.as_str());
        }
        if let Some(task) = &query.task {
            select = select.bind(task);
        }
        let rows = select
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
        let now = Timestamp::now();
        let expires_at = now.saturating_add(ttl.unwrap_or(self.ttls().group));
        // The upsert comes first so the transaction takes the write lock at once.
        let mut tx = self.pool().begin().await?;
        let created = sqlx::query(
            "INSERT INTO stem_groups (namespace, id, size, created_at, expires_at)
             VALUES (?, ?, ?, ?, ?)
             ON CONFLICT (namespace, id) DO UPDATE SET
                 size = excluded.size, created_at = excluded.created_at,
                 expires_at = excluded.expires_at
             WHERE stem_groups.expires_at <= ?",
        )
        .bind(self.namespace())
        .bind(&group.id)
        .bind(i64::from(group.size))
        .bind(group.created_at.as_sql())
        .bind(expires_at.as_sql())
        .bind(now.as_sql())
        .execute(&mut *tx)
        .await?
        .rows_affected()
            > 0;
        if created {
            // Members of an expired group of the same id that cleaning has not reached yet.
            sqlx::query("DELETE FROM stem_group_members WHERE namespace = ? AND group_id = ?")
                .bind(self.namespace())
                .bind(&group.id)
                .execute(&mut *tx)
                .await?;
            for member in &group.finished {
                sqlx::query(
                    "INSERT OR IGNORE INTO stem_group_members (namespace, group_id, task_id)
                     VALUES (?, ?, ?)",
                )
                .bind(self.namespace())
                .bind(&group.id)
                .bind(member)
                .execute(&mut *tx)
                .await?;
            }
            sqlx::query(
                "UPDATE stem_groups SET finished = (
                     SELECT COUNT(*) FROM stem_group_members m
                     WHERE m.namespace = stem_groups.namespace AND m.group_id = stem_groups.id)
                 WHERE namespace = ? AND id = ?",
            )
            .bind(self.namespace())
            .bind(&group.id)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(created)
    }

    async fn get_group(&self, id: &str) -> Result<Option<GroupRecord>, StorageError> {
        let Some(row) = sqlx::query(
            "SELECT size, created_at FROM stem_groups
             WHERE namespace = ? AND id = ? AND expires_at > ?",
        )
        .bind(self.namespace())
        .bind(id)
        .bind(Timestamp::now().as_sql())
        .fetch_optional(self.pool())
        .await?
        else {
            return Ok(None);
        };
        let finished = sqlx::query_scalar(
            "SELECT task_id FROM stem_group_members
             WHERE namespace = ? AND group_id = ? ORDER BY rowid",
        )
        .bind(self.namespace())
        .bind(id)
        .fetch_all(self.pool())
        .await?;
        Ok(Some(GroupRecord {
            id: id.to_owned(),
            size: u32::try_from(row.get::<i64, _>("size")).unwrap_or(0),
            finished,
            created_at: Timestamp::from_sql(row.get("created_at")),
        }))
    }

    async fn group_member_finished(
        &self,
        group_id: &str,
        task_id: &str,
    ) -> Result<GroupProgress, StorageError> {
        let now = Timestamp::now();
        // The insert comes first so the transaction takes the write lock at once: a read
        // first would have to upgrade its lock, which SQLite refuses when another writer won.
        let mut tx = self.pool().begin().await?;
        let added = sqlx::query(
            "INSERT OR IGNORE INTO stem_group_members (namespace, group_id, task_id)
             SELECT namespace, id, ? FROM stem_groups
             WHERE namespace = ? AND id = ? AND expires_at > ?",
        )
        .bind(task_id)
        .bind(self.namespace())
        .bind(group_id)
        .bind(now.as_sql())
        .execute(&mut *tx)
        .await?
        .rows_affected();
        let row = sqlx::query(
            "UPDATE stem_groups SET finished = finished + ?
             WHERE namespace = ? AND id = ? AND expires_at > ?
             RETURNING size, finished",
        )
        .bind(i64::try_from(added).unwrap_or(0))
        .bind(self.namespace())
        .bind(group_id)
        .bind(now.as_sql())
        .fetch_optional(&mut *tx)
        .await?
        .ok_or_else(|| StorageError::NotFound(format!("group {group_id}")))?;
        tx.commit().await?;
        Ok(GroupProgress {
            finished: u32::try_from(row.get::<i64, _>("finished")).unwrap_or(u32::MAX),
            size: u32::try_from(row.get::<i64, _>("size")).unwrap_or(0),
        })
    }

    async fn save_canvas(
        &self,
        canvas: &CanvasRecord,
        ttl: Option<Duration>,
    ) -> Result<Option<CanvasRecord>, StorageError> {
        let now = Timestamp::now();
        let expires_at = now.saturating_add(ttl.unwrap_or(self.ttls().group));
        // The upsert comes first so the transaction takes the write lock at once; the canvas
        // it finds can then neither change nor go before the read.
        let mut tx = self.pool().begin().await?;
        let saved = sqlx::query(
            "INSERT INTO stem_canvases (namespace, id, tree, created_at, expires_at)
             VALUES (?, ?, ?, ?, ?)
             ON CONFLICT (namespace, id) DO UPDATE SET
                 tree = excluded.tree, created_at = excluded.created_at,
                 expires_at = excluded.expires_at
             WHERE stem_canvases.expires_at <= ?",
        )
        .bind(self.namespace())
        .bind(&canvas.id)
        .bind(&canvas.tree)
        .bind(canvas.created_at.as_sql())
        .bind(expires_at.as_sql())
        .bind(now.as_sql())
        .execute(&mut *tx)
        .await?
        .rows_affected()
            > 0;
        let stored = if saved {
            None
        } else {
            let row = sqlx::query(
                "SELECT tree, created_at FROM stem_canvases WHERE namespace = ? AND id = ?",
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
        let row = sqlx::query(
            "SELECT tree, created_at FROM stem_canvases
             WHERE namespace = ? AND id = ? AND expires_at > ?",
        )
        .bind(self.namespace())
        .bind(id)
        .bind(Timestamp::now().as_sql())
        .fetch_optional(self.pool())
        .await?;
        Ok(row.map(|row| canvas_record(id, &row)))
    }

    async fn heartbeat(
        &self,
        heartbeat: &WorkerHeartbeat,
        ttl: Option<Duration>,
    ) -> Result<(), StorageError> {
        let expires_at = Timestamp::now().saturating_add(ttl.unwrap_or(self.ttls().heartbeat));
        let text = serde_json::to_string(heartbeat).expect("a heartbeat always serialises");
        sqlx::query(
            "INSERT OR REPLACE INTO stem_worker_heartbeats (namespace, worker_id, heartbeat, expires_at)
             VALUES (?, ?, ?, ?)",
        )
        .bind(self.namespace())
        .bind(&heartbeat.worker_id)
        .bind(text)
        .bind(expires_at.as_sql())
        .execute(self.pool())
        .await?;
        Ok(())
    }

    async fn workers(&self) -> Result<Vec<WorkerHeartbeat>, StorageError> {
        let rows = sqlx::query(
            "SELECT worker_id, heartbeat FROM stem_worker_heartbeats
             WHERE namespace = ? AND expires_at > ? ORDER BY worker_id",
        )
        .bind(self.namespace())
        .bind(Timestamp::now().as_sql())
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
fn canvas_record(id: &str, row: &sqlx::sqlite::SqliteRow) -> CanvasRecord {
    CanvasRecord {
        id: id.to_owned(),
        tree: row.get("tree"),
        created_at: Timestamp::from_sql(row.get("created_at")),
    }
}
