//! The Redis lock store: `SET NX PX` with the owner as the value; renew and release check the
//! owner in Lua, so only the holder can extend or drop its lock.

use std::time::Duration;

use async_trait::async_trait;
use redis::aio::ConnectionManager;

use super::LockStore;
use crate::broker::DEFAULT_NAMESPACE;
use crate::storage::StorageError;

/// Takes the lock unless someone else holds it; 1 if ARGV[1] holds it afterwards.
const ACQUIRE: &str = r"
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
if redis.call('GET', KEYS[1]) == ARGV[1] then return 1 end
return 0
";

const RENEW: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
";

const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
";

/// Locks in Redis. Clones share the connection.
#[derive(Clone)]
pub struct RedisLockStore {
    manager: ConnectionManager,
    namespace: String,
    acquire: redis::Script,
    renew: redis::Script,
    release: redis::Script,
}

impl RedisLockStore {
    pub async fn connect(
        url: &str,
        namespace: Option<&str>,
    ) -> Result<RedisLockStore, StorageError> {
        Ok(RedisLockStore {
            manager: crate::redis::connect(url).await?.manager,
            namespace: namespace.unwrap_or(DEFAULT_NAMESPACE).to_owned(),
            acquire: redis::Script::new(ACQUIRE),
            renew: redis::Script::new(RENEW),
            release: redis::Script::new(RELEASE),
        })
    }

    async fn run(
        &self,
        script: &redis::Script,
        key: &str,
        owner: &str,
        ttl: Option<Duration>,
    ) -> Result<bool, StorageError> {
        let mut invocation = script.key(format!("{}:lock:{key}", self.namespace));
        invocation.arg(owner);
        if let Some(ttl) = ttl {
            invocation.arg(ttl.as_millis().max(1) as u64);
        }
        let held: i64 = invocation.invoke_async(&mut self.manager.clone()).await?;
        Ok(held == 1)
    }
}

#[async_trait]
impl LockStore for RedisLockStore {
    async fn acquire(&self, key: &str, owner: &str, ttl: Duration) -> Result<bool, StorageError> {
        self.run(&self.acquire, key, owner, Some(ttl)).await
    }

    async fn renew(&self, key: &str, owner: &str, ttl: Duration) -> Result<bool, StorageError> {
        self.run(&self.renew, key, owner, Some(ttl)).await
    }

    async fn release(&self, key: &str, owner: &str) -> Result<bool, StorageError> {
        self.run(&self.release, key, owner, None).await
    }

    async fn owner(&self, key: &str) -> Result<Option<String>, StorageError> {
        Ok(redis::cmd("GET")
            .arg(format!("{}:lock:{key}", self.namespace))
            .query_async(&mut self.manager.clone())
            .await?)
    }
}
