//! The SQLite revoke store: revocations in a local file, kept across restarts.

use std::path::Path;

use async_trait::async_trait;
use sqlx::Row;
use sqlx::sqlite::{SqlitePool, SqliteRow};

use super::{Revocation, RevokeStore};
use crate::broker::DEFAULT_NAMESPACE;
use crate::sqlite;
use crate::storage::StorageError;
use crate::time::Timestamp;

const MIGRATIONS: &[&str] = &["
    CREATE TABLE stem_revocations (
        namespace TEXT NOT NULL,
        task_id TEXT NOT NULL,
        terminate INTEGER NOT NULL,
        reason TEXT,
        revoked_at INTEGER NOT NULL,
        expires_at INTEGER NOT NULL,
        PRIMARY KEY (namespace, task_id)
    );
    CREATE INDEX stem_revocations_since ON stem_revocations (namespace, revoked_at);
"];

/// Revocations in a SQLite file. Clones share the connection pool.
#[derive(Clone)]
pub struct SqliteRevokeStore {
    pool: SqlitePool,
    namespace: String,
}

impl SqliteRevokeStore {
    /// Opens the store in the file at `path` (it may be the result backend's file), creating
    /// and migrating it if needed.
    pub async fn open(
        path: impl AsRef<Path>,
        namespace: Option<&str>,
    ) -> Result<SqliteRevokeStore, StorageError> {
        let pool = sqlite::open(path.as_ref(), 2).await?;
        sqlite::migrate(&pool, "revoke-store", MIGRATIONS).await?;
        Ok(SqliteRevokeStore {
            pool,
            namespace: namespace.unwrap_or(DEFAULT_NAMESPACE).to_owned(),
        })
    }
}

fn revocation(row: &SqliteRow) -> Revocation {
    Revocation {
        task_id: row.get("task_id"),
        terminate: row.get("terminate"),
        reason: row.get("reason"),
        revoked_at: Timestamp::from_sql(row.get("revoked_at")),
        expires_at: Timestamp::from_sql(row.get("expires_at")),
    }
}

#[async_trait]
impl RevokeStore for SqliteRevokeStore {
    async fn revoke(&self, revocation: &Revocation) -> Result<(), StorageError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT OR REPLACE INTO stem_revocations
                 (namespace, task_id, terminate, reason, revoked_at, expires_at)
             VALUES (?, ?, ?, ?, ?, ?)",
        )
        .bind(&self.namespace)
        .bind(&revocation.task_id)
        .bind(revocation.terminate)
        .bind(&revocation.reason)
        .bind(revocation.revoked_at.as_sql())
        .bind(revocation.expires_at.as_sql())
        .execute(&mut *tx)
        .await?;
        sqlx::query("DELETE FROM stem_revocations WHERE namespace = ? AND expires_at <= ?")
            .bind(&self.namespace)
            .bind(Timestamp::now().as_sql())
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn get(&self, task_id: &str) -> Result<Option<Revocation>, StorageError> {
        let row = sqlx::query(
            "SELECT * FROM stem_revocations WHERE namespace = ? AND task_id = ? AND expires_at > ?",
        )
        .bind(&self.namespace)
        .bind(task_id)
        .bind(Timestamp::now().as_sql())
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.as_ref().map(revocation))
    }

    async fn get_many(&self, task_ids: &[String]) -> Result<Vec<Option<Revocation>>, StorageError> {
        let mut found = std::collections::HashMap::new();
        for chunk in task_ids.chunks(500) {
            let sql = format!(
                "SELECT * FROM stem_revocations
                 WHERE namespace = ? AND expires_at > ? AND task_id IN ({})",
                crate::sqlite::placeholders(chunk.len())
            );
            let mut select = sqlx::query(&sql)
                .bind(&self.namespace)
                .bind(Timestamp::now().as_sql());
            for id in chunk {
                select = select.bind(id);
            }
            for row in select.fetch_all(&self.pool).await? {
                let revocation = revocation(&row);
                found.insert(revocation.task_id.clone(), revocation);
            }
        }
        Ok(task_ids.iter().map(|id| found.get(id).cloned()).collect())
    }

    async fn list_since(&self, since: Timestamp) -> Result<Vec<Revocation>, StorageError> {
        let rows = sqlx::query(
            "SELECT * FROM stem_revocations
             WHERE namespace = ? AND revoked_at >= ? AND expires_at > ?
             ORDER BY revoked_at, task_id",
        )
        .bind(&self.namespace)
        .bind(since.as_sql())
        .bind(Timestamp::now().as_sql())
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(revocation).collect())
    }

    async fn remove(&self, task_id: &str) -> Result<bool, StorageError> {
        let removed =
            sqlx::query("DELETE FROM stem_revocations WHERE namespace = ? AND task_id = ?")
                .bind(&self.namespace)
                .bind(task_id)
                .execute(&self.pool)
                .await?;
        Ok(removed.rows_affected() > 0)
    }
}
