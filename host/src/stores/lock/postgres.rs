//! The Postgres lock store: one row per held lock with its owner and deadline; every change is
//! one conditional statement, so only the holder can renew or release, and an expired lock is
//! free for the next taker.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::postgres::PgPool;

use super::LockStore;
use crate::broker::DEFAULT_NAMESPACE;
use crate::broker::postgres::millis;
use crate::postgres::{self, NOW_MS};
use crate::storage::StorageError;

const MIGRATIONS: &[&str] = &["
    CREATE TABLE stem_locks (
        namespace TEXT NOT NULL,
        key TEXT NOT NULL,
        owner TEXT NOT NULL,
        expires_at BIGINT NOT NULL,
        PRIMARY KEY (namespace, key)
    );
"];

/// Locks in Postgres. Clones share the pool.
#[derive(Clone)]
pub struct PostgresLockStore {
    pool: Arc<PgPool>,
    namespace: String,
}

impl PostgresLockStore {
    /// Connects to the database at `url`, creating and migrating the table if needed.
    pub async fn connect(
        url: &str,
        namespace: Option<&str>,
    ) -> Result<PostgresLockStore, StorageError> {
        let pool = postgres::connect(url).await?;
        postgres::migrate(&pool, "lock-store", MIGRATIONS).await?;
        Ok(PostgresLockStore {
            pool,
            namespace: namespace.unwrap_or(DEFAULT_NAMESPACE).to_owned(),
        })
    }
}

#[async_trait]
impl LockStore for PostgresLockStore {
    async fn acquire(&self, key: &str, owner: &str, ttl: Duration) -> Result<bool, StorageError> {
        // A lock already held by `owner` keeps its deadline, as `SET NX` would.
        let holder: Option<String> = sqlx::query_scalar(&format!(
            "INSERT INTO stem_locks AS l (namespace, key, owner, expires_at)
             VALUES ($1, $2, $3, {NOW_MS} + $4)
             ON CONFLICT (namespace, key) DO UPDATE SET
                 owner = excluded.owner,
                 expires_at = CASE WHEN l.owner = excluded.owner AND l.expires_at > {NOW_MS}
                                   THEN l.expires_at ELSE excluded.expires_at END
             WHERE l.expires_at <= {NOW_MS} OR l.owner = excluded.owner
             RETURNING owner"
        ))
        .bind(&self.namespace)
        .bind(key)
        .bind(owner)
        .bind(millis(ttl).max(1))
        .fetch_optional(&*self.pool)
        .await?;
        Ok(holder.as_deref() == Some(owner))
    }

    async fn renew(&self, key: &str, owner: &str, ttl: Duration) -> Result<bool, StorageError> {
        let renewed = sqlx::query(&format!(
            "UPDATE stem_locks SET expires_at = {NOW_MS} + $4
             WHERE namespace = $1 AND key = $2 AND owner = $3 AND expires_at > {NOW_MS}"
        ))
        .bind(&self.namespace)
        .bind(key)
        .bind(owner)
        .bind(millis(ttl).max(1))
        .execute(&*self.pool)
        .await?;
        Ok(renewed.rows_affected() == 1)
    }

    async fn release(&self, key: &str, owner: &str) -> Result<bool, StorageError> {
        let released = sqlx::query(&format!(
            "DELETE FROM stem_locks
             WHERE namespace = $1 AND key = $2 AND owner = $3 AND expires_at > {NOW_MS}"
        ))
        .bind(&self.namespace)
        .bind(key)
        .bind(owner)
        .execute(&*self.pool)
        .await?;
        Ok(released.rows_affected() == 1)
    }

    async fn owner(&self, key: &str) -> Result<Option<String>, StorageError> {
        Ok(sqlx::query_scalar(&format!(
            "SELECT owner FROM stem_locks
             WHERE namespace = $1 AND key = $2 AND expires_at > {NOW_MS}"
        ))
        .bind(&self.namespace)
        .bind(key)
        .fetch_optional(&*self.pool)
        .await?)
    }
}
