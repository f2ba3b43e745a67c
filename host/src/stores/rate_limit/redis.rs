//! The Redis rate limiter: GCRA in one Lua script, so every worker on every host shares it.

use async_trait::async_trait;
use redis::aio::ConnectionManager;

use super::{Permit, RateLimiter, interval_ms};
use crate::broker::DEFAULT_NAMESPACE;
use crate::storage::StorageError;
use crate::task::RateLimit;
use crate::time::Timestamp;

/// 0 when granted, else the milliseconds to wait. The arrival time expires once stale.
/// ARGV: now ms, interval ms.
const ACQUIRE: &str = r"
local now, interval = tonumber(ARGV[1]), tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
if tat > now then return tat - now end
redis.call('SET', KEYS[1], now + interval, 'PX', interval + 1000)
return 0
";

/// Limits in Redis. Clones share the connection.
#[derive(Clone)]
pub struct RedisRateLimiter {
    manager: ConnectionManager,
    namespace: String,
    acquire: redis::Script,
}

impl RedisRateLimiter {
    pub async fn connect(
        url: &str,
        namespace: Option<&str>,
    ) -> Result<RedisRateLimiter, StorageError> {
        Ok(RedisRateLimiter {
            manager: crate::redis::connect(url).await?.manager,
            namespace: namespace.unwrap_or(DEFAULT_NAMESPACE).to_owned(),
            acquire: redis::Script::new(ACQUIRE),
        })
    }
}

#[async_trait]
impl RateLimiter for RedisRateLimiter {
    async fn acquire(&self, key: &str, limit: RateLimit) -> Result<Permit, StorageError> {
        let wait: u64 = self
            .acquire
            .key(format!("{}:rate:{key}", self.namespace))
            .arg(Timestamp::now().as_millis())
            .arg(interval_ms(limit))
            .invoke_async(&mut self.manager.clone())
            .await?;
        Ok(match wait {
            0 => Permit::Granted,
            ms => Permit::RetryAfter(std::time::Duration::from_millis(ms)),
        })
    }
}
