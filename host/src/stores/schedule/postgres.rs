//! The Postgres schedule store: one row per entry with its revision and, while it is enabled
//! and has a next slot, when it is due (indexed). A batch is saved in one statement that
//! updates each row only where its revision is still the writer's, and inserts new entries.

use std::collections::HashSet;
use std::sync::Arc;

use async_trait::async_trait;
use sqlx::postgres::PgPool;

use super::{ScheduleEntry, ScheduleStore, decode_all, decode_readable};
use crate::broker::DEFAULT_NAMESPACE;
use crate::postgres;
use crate::storage::StorageError;
use crate::time::Timestamp;

const MIGRATIONS: &[&str] = &[
    "
    CREATE TABLE stem_schedules (
        namespace TEXT NOT NULL,
        id TEXT NOT NULL,
        enabled BOOLEAN NOT NULL,
        next_run_at BIGINT NOT NULL,
        entry TEXT NOT NULL,
        PRIMARY KEY (namespace, id)
    );
    CREATE INDEX stem_schedules_due ON stem_schedules (namespace, next_run_at, id);
    ",
    // Entries gained revisions and a definition/state split; the first table only ever held
    // entries written through the library, before Beat read any.
    "
    DROP TABLE stem_schedules;
    CREATE TABLE stem_beat_entries (
        namespace TEXT NOT NULL,
        id TEXT NOT NULL,
        revision BIGINT NOT NULL,
        due_at BIGINT,
        entry TEXT NOT NULL,
        PRIMARY KEY (namespace, id)
    );
    CREATE INDEX stem_beat_entries_due ON stem_beat_entries (namespace, due_at, id)
        WHERE due_at IS NOT NULL;
    ",
];

/// Schedule entries in Postgres. Clones share the pool.
#[derive(Clone)]
pub struct PostgresScheduleStore {
    pool: Arc<PgPool>,
    namespace: String,
}

impl PostgresScheduleStore {
    /// Connects to the database at `url`, creating and migrating the table if needed.
    pub async fn connect(
        url: &str,
        namespace: Option<&str>,
    ) -> Result<PostgresScheduleStore, StorageError> {
        let pool = postgres::connect(url).await?;
        postgres::migrate(&pool, "schedule-store", MIGRATIONS).await?;
        Ok(PostgresScheduleStore {
            pool,
            namespace: namespace.unwrap_or(DEFAULT_NAMESPACE).to_owned(),
        })
    }
}

#[async_trait]
impl ScheduleStore for PostgresScheduleStore {
    async fn get(&self, id: &str) -> Result<Option<ScheduleEntry>, StorageError> {
        let text: Option<String> = sqlx::query_scalar(
            "SELECT entry FROM stem_beat_entries WHERE namespace = $1 AND id = $2",
        )
        .bind(&self.namespace)
        .bind(id)
        .fetch_optional(&*self.pool)
        .await?;
        text.map(|text| ScheduleEntry::from_json(&text)).transpose()
    }

    async fn list(&self) -> Result<Vec<ScheduleEntry>, StorageError> {
        let texts: Vec<String> = sqlx::query_scalar(
            "SELECT entry FROM stem_beat_entries WHERE namespace = $1 ORDER BY id",
        )
        .bind(&self.namespace)
        .fetch_all(&*self.pool)
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
             WHERE namespace = $1 AND due_at IS NOT NULL AND due_at <= $2
             ORDER BY due_at, id LIMIT $3",
        )
        .bind(&self.namespace)
        .bind(before.as_sql())
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .fetch_all(&*self.pool)
        .await?;
        let (entries, unreadable) = decode_readable(rows);
        if !unreadable.is_empty() {
            sqlx::query(
                "UPDATE stem_beat_entries SET due_at = NULL WHERE namespace = $1 AND id = ANY($2)",
            )
            .bind(&self.namespace)
            .bind(&unreadable)
            .execute(&*self.pool)
            .await?;
        }
        Ok(entries)
    }

    async fn save_many(&self, entries: &[ScheduleEntry]) -> Result<Vec<bool>, StorageError> {
        if entries.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<&str> = entries.iter().map(|e| e.id.as_str()).collect();
        let expected: Vec<i64> = entries
            .iter()
            .map(|e| i64::try_from(e.revision).unwrap_or(i64::MAX))
            .collect();
        let due: Vec<Option<i64>> = entries
            .iter()
            .map(|e| e.due_at().map(Timestamp::as_sql))
            .collect();
        let stored: Vec<ScheduleEntry> = entries.iter().map(ScheduleEntry::next_revision).collect();
        let revisions: Vec<i64> = stored
            .iter()
            .map(|e| i64::try_from(e.revision).unwrap_or(i64::MAX))
            .collect();
        let texts: Vec<String> = stored.iter().map(ScheduleEntry::to_json).collect();
        let written: Vec<i64> = sqlx::query_scalar(
            "WITH input AS (
                 SELECT * FROM unnest($2::text[], $3::bigint[], $4::bigint[], $5::text[],
                                      $6::bigint[])
                     WITH ORDINALITY AS i(id, expected, due_at, entry, revision, n)
             ),
             updated AS (
                 UPDATE stem_beat_entries e
                 SET revision = e.revision + 1, due_at = i.due_at, entry = i.entry
                 FROM input i
                 WHERE e.namespace = $1 AND e.id = i.id AND i.expected > 0
                   AND e.revision = i.expected
                 RETURNING i.n
             ),
             inserted AS (
                 INSERT INTO stem_beat_entries (namespace, id, revision, due_at, entry)
                 SELECT $1, id, revision, due_at, entry FROM input WHERE expected = 0
                 ON CONFLICT (namespace, id) DO NOTHING
                 RETURNING (SELECT n FROM input i
                            WHERE i.id = stem_beat_entries.id AND i.expected = 0
                            ORDER BY n LIMIT 1)
             )
             SELECT n FROM updated UNION ALL SELECT n FROM inserted",
        )
        .bind(&self.namespace)
        .bind(&ids)
        .bind(&expected)
        .bind(&due)
        .bind(&texts)
        .bind(&revisions)
        .fetch_all(&*self.pool)
        .await?;
        let written: HashSet<i64> = written.into_iter().collect();
        Ok((1..=entries.len() as i64)
            .map(|n| written.contains(&n))
            .collect())
    }

    async fn remove(&self, id: &str) -> Result<bool, StorageError> {
        let removed = sqlx::query("DELETE FROM stem_beat_entries WHERE namespace = $1 AND id = $2")
            .bind(&self.namespace)
            .bind(id)
            .execute(&*self.pool)
            .await?;
        Ok(removed.rows_affected() > 0)
    }
}
