//! The Postgres rate limiter: GCRA in one statement, so every worker sharing the database
//! shares the limit. One row per key holds its theoretical arrival time.

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
        // The slot is taken when the stored arrival time has passed (the row lock orders
        // concurrent takers); otherwise the wait is what is left of it.
        let wait: i64 = sqlx::query_scalar(&format!(
            "WITH now AS (SELECT {NOW_MS} AS ms),
             taken AS (
                 INSERT INTO stem_rate_limits AS r (namespace, key, tat)
                 SELECT $1, $2, now.ms + $3 FROM now
                 ON CONFLICT (namespace, key) DO UPDATE SET tat = excluded.tat
                 WHERE r.tat <= excluded.tat - $3
                 RETURNING 1)
             SELECT CASE WHEN EXISTS (SELECT 1 FROM taken) THEN 0
                    ELSE GREATEST(
                        (SELECT tat FROM stem_rate_limits WHERE namespace = $1 AND key = $2)
                            - (SELECT ms FROM now),
                        1)
                    END"
        ))
        .bind(&self.namespace)
        .bind(key)
        .bind(interval)
        .fetch_one(&*self.pool)
        .await?;
        Ok(match u64::try_from(wait).unwrap_or(1) {
            0 => Permit::Granted,
            ms => Permit::RetryAfter(Duration::from_millis(ms)),
        })
    }
}
