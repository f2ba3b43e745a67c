//! The SQLite schedule store: one row per entry with its revision and, while it is enabled and
//! has a next slot, when it is due (indexed). A batch is saved in one transaction of
//! conditional writes, so Beats in several processes sharing the file record each slot once.

use std::path::Path;

use async_trait::async_trait;
use sqlx::sqlite::SqlitePool;

use super::{ScheduleEntry, ScheduleStore, decode_all, decode_readable};
use crate::broker::DEFAULT_NAMESPACE;
use crate::sqlite;
use crate::storage::StorageError;
use crate::time::Timestamp;

const MIGRATIONS: &[&str] = &["
    CREATE TABLE stem_beat_entries (
        namespace TEXT NOT NULL,
        id TEXT NOT NULL,
        revision INTEGER NOT NULL,
        due_at INTEGER,
        entry TEXT NOT NULL,
        PRIMARY KEY (namespace, id)
    );
    CREATE INDEX stem_beat_entries_due ON stem_beat_entries (namespace, due_at, id)
        WHERE due_at IS NOT NULL;
"];

/// Schedule entries in a SQLite file. Clones share the connection pool.
#[derive(Clone)]
pub struct SqliteScheduleStore {
    pool: SqlitePool,
    namespace: String,
}

impl SqliteScheduleStore {
    /// Opens the store in the file at `path` (it may hold the lock store too), creating and
    /// migrating it if needed.
    pub async fn open(
        path: impl AsRef<Path>,
        namespace: Option<&str>,
    ) -> Result<SqliteScheduleStore, StorageError> {
        let pool = sqlite::open(path.as_ref(), 2).await?;
        sqlite::migrate(&pool, "schedule-store", MIGRATIONS).await?;
        Ok(SqliteScheduleStore {
            pool,
            namespace: namespace.unwrap_or(DEFAULT_NAMESPACE).to_owned(),
        })
    }
}

#[async_trait]
impl ScheduleStore for SqliteScheduleStore {
    async fn get(&self, id: &str) -> Result<Option<ScheduleEntry>, StorageError> {
        let text: Option<String> = sqlx::query_scalar(
            "SELECT entry FROM stem_beat_entries WHERE namespace = ? AND id = ?",
        )
        .bind(&self.namespace)
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        text.map(|text| ScheduleEntry::from_json(&text)).transpose()
    }

    async fn list(&self) -> Result<Vec<ScheduleEntry>, StorageError> {
        let texts: Vec<String> = sqlx::query_scalar(
            "SELECT entry FROM stem_beat_entries WHERE namespace = ? ORDER BY id",
        )
        .bind(&self.namespace)
        .fetch_all(&self.pool)
        .await?;
        decode_all(&texts)
    }

    async fn due(
        &self,
        before: Timestamp,
        limit: usize,
    ) -> Result<Vec<ScheduleEntry>, StorageError> {
        let rows: Vec<(String, String)> = sqlx::query_as(
            "SELECT id, entry FROM stem_beat_entries
             WHERE namespace = ? AND due_at IS NOT NULL AND due_at <= ?
             ORDER BY due_at, id LIMIT ?",
        )
        .bind(&self.namespace)
        .bind(before.as_sql())
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .fetch_all(&self.pool)
        .await?;
        let (entries, unreadable) = decode_readable(rows);
        for id in unreadable {
            sqlx::query(
                "UPDATE stem_beat_entries SET due_at = NULL WHERE namespace = ? AND id = ?",
            )
            .bind(&self.namespace)
            .bind(id)
            .execute(&self.pool)
            .await?;
        }
        Ok(entries)
    }

    async fn save_many(&self, entries: &[ScheduleEntry]) -> Result<Vec<bool>, StorageError> {
        if entries.is_empty() {
            return Ok(Vec::new());
        }
        // Every statement writes, so the transaction takes the write lock at its first one
        // instead of failing to upgrade a read.
        let mut tx = self.pool.begin().await?;
        let mut written = Vec::with_capacity(entries.len());
        for entry in entries {
            let stored = entry.next_revision();
            let due_at = entry.due_at().map(Timestamp::as_sql);
            let result = if entry.revision == 0 {
                sqlx::query(
                    "INSERT INTO stem_beat_entries (namespace, id, revision, due_at, entry)
                     VALUES (?, ?, ?, ?, ?) ON CONFLICT (namespace, id) DO NOTHING",
                )
                .bind(&self.namespace)
                .bind(&entry.id)
                .bind(i64::try_from(stored.revision).unwrap_or(i64::MAX))
                .bind(due_at)
                .bind(stored.to_json())
                .execute(&mut *tx)
                .await?
            } else {
                sqlx::query(
                    "UPDATE stem_beat_entries SET revision = revision + 1, due_at = ?, entry = ?
                     WHERE namespace = ? AND id = ? AND revision = ?",
                )
                .bind(due_at)
                .bind(stored.to_json())
                .bind(&self.namespace)
                .bind(&entry.id)
                .bind(i64::try_from(entry.revision).unwrap_or(i64::MAX))
                .execute(&mut *tx)
                .await?
            };
            written.push(result.rows_affected() == 1);
        }
        tx.commit().await?;
        Ok(written)
    }

    async fn remove(&self, id: &str) -> Result<bool, StorageError> {
        let removed = sqlx::query("DELETE FROM stem_beat_entries WHERE namespace = ? AND id = ?")
            .bind(&self.namespace)
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(removed.rows_affected() > 0)
    }
}
