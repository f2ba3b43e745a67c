//! The Postgres revoke store: one row per revoked task; expired rows are ignored by reads and
//! deleted by the next revocation.

use std::sync::Arc;

use async_trait::async_trait;
use sqlx::Row;
use sqlx::postgres::{PgPool, PgRow};

use super::{Revocation, RevokeStore};
use crate::broker::DEFAULT_NAMESPACE;
use crate::postgres::{self, NOW_MS};
use crate::storage::StorageError;
use crate::time::Timestamp;

const MIGRATIONS: &[&str] = &["
    CREATE TABLE stem_revocations (
        namespace TEXT NOT NULL,
        task_id TEXT NOT NULL,
        terminate BOOLEAN NOT NULL,
        reason TEXT,
        revoked_at BIGINT NOT NULL,
        expires_at BIGINT NOT NULL,
        PRIMARY KEY (namespace, task_id)
    );
    CREATE INDEX stem_revocations_since ON stem_revocations (namespace, revoked_at);
    CREATE INDEX stem_revocations_expiry ON stem_revocations (namespace, expires_at);
"];

/// Revocations in Postgres. Clones share the pool.
#[derive(Clone)]
pub struct PostgresRevokeStore {
    pool: Arc<PgPool>,
    namespace: String,
}

impl PostgresRevokeStore {
    /// Connects to the database at `url`, creating and migrating the table if needed.
    pub async fn connect(
        url: &str,
        namespace: Option<&str>,
    ) -> Result<PostgresRevokeStore, StorageError> {
        let pool = postgres::connect(url).await?;
        postgres::migrate(&pool, "revoke-store", MIGRATIONS).await?;
        Ok(PostgresRevokeStore {
            pool,
            namespace: namespace.unwrap_or(DEFAULT_NAMESPACE).to_owned(),
        })
    }
}

fn revocation(row: &PgRow) -> Revocation {
    Revocation {
        task_id: row.get("task_id"),
        terminate: row.get("terminate"),
        reason: row.get("reason"),
        revoked_at: Timestamp::from_sql(row.get("revoked_at")),
        expires_at: Timestamp::from_sql(row.get("expires_at")),
    }
}

#[async_trait]
impl RevokeStore for PostgresRevokeStore {
    async fn revoke(&self, revocation: &Revocation) -> Result<(), StorageError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO stem_revocations
                 (namespace, task_id, terminate, reason, revoked_at, expires_at)
             VALUES ($1, $2, $3, $4, $5, $6)
             ON CONFLICT (namespace, task_id) DO UPDATE SET
                 terminate = excluded.terminate, reason = excluded.reason,
                 revoked_at = excluded.revoked_at, expires_at = excluded.expires_at",
        )
        .bind(&self.namespace)
        .bind(&revocation.task_id)
        .bind(revocation.terminate)
        .bind(revocation.reason.as_deref().map(postgres::storable))
        .bind(revocation.revoked_at.as_sql())
        .bind(revocation.expires_at.as_sql())
        .execute(&mut *tx)
        .await?;
        sqlx::query(&format!(
            "DELETE FROM stem_revocations WHERE namespace = $1 AND expires_at <= {NOW_MS}"
        ))
        .bind(&self.namespace)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn get(&self, task_id: &str) -> Result<Option<Revocation>, StorageError> {
        let row = sqlx::query(&format!(
            "SELECT * FROM stem_revocations
             WHERE namespace = $1 AND task_id = $2 AND expires_at > {NOW_MS}"
        ))
        .bind(&self.namespace)
        .bind(task_id)
        .fetch_optional(&*self.pool)
        .await?;
        Ok(row.as_ref().map(revocation))
    }

    async fn get_many(&self, task_ids: &[String]) -> Result<Vec<Option<Revocation>>, StorageError> {
        if task_ids.is_empty() {
            return Ok(Vec::new());
        }
        let rows = sqlx::query(&format!(
            "SELECT * FROM stem_revocations
             WHERE namespace = $1 AND task_id = ANY($2) AND expires_at > {NOW_MS}"
        ))
        .bind(&self.namespace)
        .bind(task_ids)
        .fetch_all(&*self.pool)
        .await?;
        let found: std::collections::HashMap<String, Revocation> = rows
            .iter()
            .map(|row| {
                let revocation = revocation(row);
                (revocation.task_id.clone(), revocation)
            })
            .collect();
        Ok(task_ids.iter().map(|id| found.get(id).cloned()).collect())
    }

    async fn list_since(&self, since: Timestamp) -> Result<Vec<Revocation>, StorageError> {
        let rows = sqlx::query(&format!(
            "SELECT * FROM stem_revocations
             WHERE namespace = $1 AND revoked_at >= $2 AND expires_at > {NOW_MS}
             ORDER BY revoked_at, task_id"
        ))
        .bind(&self.namespace)
        .bind(since.as_sql())
        .fetch_all(&*self.pool)
        .await?;
        Ok(rows.iter().map(revocation).collect())
    }

    async fn remove(&self, task_id: &str) -> Result<bool, StorageError> {
        let removed =
            sqlx::query("DELETE FROM stem_revocations WHERE namespace = $1 AND task_id = $2")
                .bind(&self.namespace)
                .bind(task_id)
                .execute(&*self.pool)
                .await?;
        Ok(removed.rows_affected() > 0)
    }
}
