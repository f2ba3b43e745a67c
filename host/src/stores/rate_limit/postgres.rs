//! The Postgres rate limiter: GCRA on one locked row per key (its theoretical arrival time),
//! so every worker sharing the database shares the limit.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::postgres::PgPool;

use super::{Permit, RateLimiter, interval_ms};
use crate::broker::DEFAULT_NAMESPACE;
use crate::postgres::{self, NOW_MS};
use crate::storage::StorageError;
use crate::task::RateLimit;

const MIGRATIONS: &[&str] = &["
    CREATE TABLE stem_rate_limits (
        namespace TEXT NOT NULL,
        key TEXT NOT NULL,
        tat BIGINT NOT NULL,
        PRIMARY KEY (namespace, key)
    );
"];

/// Limits in Postgres. Clones share the pool.
#[derive(Clone)]
pub struct PostgresRateLimiter {
    pool: Arc<PgPool>,
    namespace: String,
}

impl PostgresRateLimiter {
    /// Connects to the database at `url`, creating and migrating the table if needed.
    pub async fn connect(
        url: &str,
        namespace: Option<&str>,
    ) -> Result<PostgresRateLimiter, StorageError> {
        let pool = postgres::connect(url).await?;
        postgres::migrate(&pool, "rate-limiter", MIGRATIONS).await?;
        Ok(PostgresRateLimiter {
            pool,
            namespace: namespace.unwrap_or(DEFAULT_NAMESPACE).to_owned(),
        })
    }
}

#[async_trait]
impl RateLimiter for PostgresRateLimiter {
    async fn acquire(&self, key: &str, limit: RateLimit) -> Result<Permit, StorageError> {
        let interval = i64::try_from(interval_ms(limit)).unwrap_or(i64::MAX);
        // The key's row, locked: concurrent takers queue on it and each reads the arrival time
        // the previous one left (one statement would read a snapshot taken before it waited).
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO stem_rate_limits (namespace, key, tat) VALUES ($1, $2, 0)
             ON CONFLICT DO NOTHING",
        )
        .bind(&self.namespace)
        .bind(key)
        .execute(&mut *tx)
        .await?;
        let (tat, now): (i64, i64) = sqlx::query_as(&format!(
            "SELECT tat, {NOW_MS} FROM stem_rate_limits
             WHERE namespace = $1 AND key = $2 FOR UPDATE"
        ))
        .bind(&self.namespace)
        .bind(key)
        .fetch_one(&mut *tx)
        .await?;
        let permit = match tat > now {
            true => {
                Permit::RetryAfter(Duration::from_millis(u64::try_from(tat - now).unwrap_or(1)))
            }
            false => {
                sqlx::query(
                    "UPDATE stem_rate_limits SET tat = $3 WHERE namespace = $1 AND key = $2",
                )
                .bind(&self.namespace)
                .bind(key)
                .bind(now.saturating_add(interval))
                .execute(&mut *tx)
                .await?;
                Permit::Granted
            }
        };
        tx.commit().await?;
        Ok(permit)
    }
}
