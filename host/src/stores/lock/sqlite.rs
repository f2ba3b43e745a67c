//! The SQLite lock store: one row per held lock with its owner and deadline, for Beats in
//! several processes on one host sharing a file. Every change is one conditional statement.
//! Deadlines are this host's wall clock, which every process sharing the file reads alike.

use std::path::Path;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::sqlite::SqlitePool;

use super::LockStore;
use crate::broker::DEFAULT_NAMESPACE;
use crate::sqlite;
use crate::storage::StorageError;
use crate::time::Timestamp;

const MIGRATIONS: &[&str] = &["
    CREATE TABLE stem_locks (
        namespace TEXT NOT NULL,
        key TEXT NOT NULL,
        owner TEXT NOT NULL,
        expires_at INTEGER NOT NULL,
        PRIMARY KEY (namespace, key)
    );
"];

/// Locks in a SQLite file. Clones share the connection pool.
#[derive(Clone)]
pub struct SqliteLockStore {
    pool: SqlitePool,
    namespace: String,
}

impl SqliteLockStore {
    /// Opens the store in the file at `path` (it may hold the schedule store too), creating
    /// and migrating it if needed.
    pub async fn open(
        path: impl AsRef<Path>,
        namespace: Option<&str>,
    ) -> Result<SqliteLockStore, StorageError> {
        let pool = sqlite::open(path.as_ref(), 2).await?;
        sqlite::migrate(&pool, "lock-store", MIGRATIONS).await?;
        Ok(SqliteLockStore {
            pool,
            namespace: namespace.unwrap_or(DEFAULT_NAMESPACE).to_owned(),
        })
    }
}

fn deadline(ttl: Duration) -> i64 {
    Timestamp::now()
        .saturating_add(ttl.max(Duration::from_millis(1)))
        .as_sql()
}

#[async_trait]
impl LockStore for SqliteLockStore {
    async fn acquire(&self, key: &str, owner: &str, ttl: Duration) -> Result<bool, StorageError> {
        // A lock already held by `owner` keeps its deadline, as `SET NX` would.
        let now = Timestamp::now().as_sql();
        let holder: Option<String> = sqlx::query_scalar(
            "INSERT INTO stem_locks AS l (namespace, key, owner, expires_at) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (namespace, key) DO UPDATE SET
                 owner = excluded.owner,
                 expires_at = CASE WHEN l.owner = excluded.owner AND l.expires_at > ?5
                                   THEN l.expires_at ELSE excluded.expires_at END
             WHERE l.expires_at <= ?5 OR l.owner = excluded.owner
             RETURNING owner",
        )
        .bind(&self.namespace)
        .bind(key)
        .bind(owner)
        .bind(deadline(ttl))
        .bind(now)
        .fetch_optional(&self.pool)
        .await?;
        Ok(holder.as_deref() == Some(owner))
    }

    async fn renew(&self, key: &str, owner: &str, ttl: Duration) -> Result<bool, StorageError> {
        let renewed = sqlx::query(
            "UPDATE stem_locks SET expires_at = ?
             WHERE namespace = ? AND key = ? AND owner = ? AND expires_at > ?",
        )
        .bind(deadline(ttl))
        .bind(&self.namespace)
        .bind(key)
        .bind(owner)
        .bind(Timestamp::now().as_sql())
        .execute(&self.pool)
        .await?;
        Ok(renewed.rows_affected() == 1)
    }

    async fn release(&self, key: &str, owner: &str) -> Result<bool, StorageError> {
        let released = sqlx::query(
            "DELETE FROM stem_locks
             WHERE namespace = ? AND key = ? AND owner = ? AND expires_at > ?",
        )
        .bind(&self.namespace)
        .bind(key)
        .bind(owner)
        .bind(Timestamp::now().as_sql())
        .execute(&self.pool)
        .await?;
        Ok(released.rows_affected() == 1)
    }

    async fn owner(&self, key: &str) -> Result<Option<String>, StorageError> {
        Ok(sqlx::query_scalar(
            "SELECT owner FROM stem_locks WHERE namespace = ? AND key = ? AND expires_at > ?",
        )
        .bind(&self.namespace)
        .bind(key)
        .bind(Timestamp::now().as_sql())
        .fetch_optional(&self.pool)
        .await?)
    }
}
