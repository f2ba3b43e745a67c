//! The Postgres schedule store: one row per entry, indexed by next run time. A firing is
//! recorded on the locked row only if its next run is still the one the Beat saw, so of
//! several Beats exactly one records each firing.

use std::sync::Arc;

use async_trait::async_trait;
use sqlx::postgres::PgPool;

use super::{ScheduleEntry, ScheduleStore};
use crate::broker::DEFAULT_NAMESPACE;
use crate::postgres;
use crate::storage::StorageError;
use crate::time::Timestamp;

const MIGRATIONS: &[&str] = &["
    CREATE TABLE stem_schedules (
        namespace TEXT NOT NULL,
        id TEXT NOT NULL,
        enabled BOOLEAN NOT NULL,
        next_run_at BIGINT NOT NULL,
        entry TEXT NOT NULL,
        PRIMARY KEY (namespace, id)
    );
    CREATE INDEX stem_schedules_due ON stem_schedules (namespace, next_run_at, id);
"];

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
    async fn upsert(&self, entry: &ScheduleEntry) -> Result<(), StorageError> {
        sqlx::query(
            "INSERT INTO stem_schedules (namespace, id, enabled, next_run_at, entry)
             VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (namespace, id) DO UPDATE SET
                 enabled = excluded.enabled, next_run_at = excluded.next_run_at,
                 entry = excluded.entry",
        )
        .bind(&self.namespace)
        .bind(&entry.id)
        .bind(entry.enabled)
        .bind(entry.next_run_at.as_sql())
        .bind(entry.to_json())
        .execute(&*self.pool)
        .await?;
        Ok(())
    }

    async fn get(&self, id: &str) -> Result<Option<ScheduleEntry>, StorageError> {
        let text: Option<String> =
            sqlx::query_scalar("SELECT entry FROM stem_schedules WHERE namespace = $1 AND id = $2")
                .bind(&self.namespace)
                .bind(id)
                .fetch_optional(&*self.pool)
                .await?;
        text.map(|text| ScheduleEntry::from_json(&text)).transpose()
    }

    async fn list(&self) -> Result<Vec<ScheduleEntry>, StorageError> {
        let texts: Vec<String> =
            sqlx::query_scalar("SELECT entry FROM stem_schedules WHERE namespace = $1 ORDER BY id")
                .bind(&self.namespace)
                .fetch_all(&*self.pool)
                .await?;
        texts
            .iter()
            .map(|text| ScheduleEntry::from_json(text))
            .collect()
    }

    async fn remove(&self, id: &str) -> Result<bool, StorageError> {
        let removed = sqlx::query("DELETE FROM stem_schedules WHERE namespace = $1 AND id = $2")
            .bind(&self.namespace)
            .bind(id)
            .execute(&*self.pool)
            .await?;
        Ok(removed.rows_affected() > 0)
    }

    async fn due(&self, now: Timestamp, limit: usize) -> Result<Vec<ScheduleEntry>, StorageError> {
        let texts: Vec<String> = sqlx::query_scalar(
            "SELECT entry FROM stem_schedules
             WHERE namespace = $1 AND enabled AND next_run_at <= $2
             ORDER BY next_run_at, id LIMIT $3",
        )
        .bind(&self.namespace)
        .bind(now.as_sql())
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .fetch_all(&*self.pool)
        .await?;
        texts
            .iter()
            .map(|text| ScheduleEntry::from_json(text))
            .collect()
    }

    async fn mark_run(
        &self,
        id: &str,
        expected_next_run: Timestamp,
        ran_at: Timestamp,
        next_run_at: Timestamp,
    ) -> Result<bool, StorageError> {
        // The entry locked while it is read and written back: an edit made meanwhile is not
        // overwritten with the old entry.
        let mut tx = self.pool.begin().await?;
        let text: Option<String> = sqlx::query_scalar(
            "SELECT entry FROM stem_schedules WHERE namespace = $1 AND id = $2 FOR UPDATE",
        )
        .bind(&self.namespace)
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(mut entry) = text
            .map(|text| ScheduleEntry::from_json(&text))
            .transpose()?
        else {
            return Ok(false);
        };
        if entry.next_run_at != expected_next_run {
            return Ok(false);
        }
        entry.last_run_at = Some(ran_at);
        entry.next_run_at = next_run_at;
        entry.total_runs += 1;
        let recorded = sqlx::query(
            "UPDATE stem_schedules SET next_run_at = $3, entry = $4
             WHERE namespace = $1 AND id = $2",
        )
        .bind(&self.namespace)
        .bind(id)
        .bind(next_run_at.as_sql())
        .bind(entry.to_json())
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(recorded.rows_affected() == 1)
    }
}
