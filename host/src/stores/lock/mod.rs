//! The lock store: named locks held by one owner for a TTL, so that of several Beat instances
//! exactly one fires each schedule entry.

pub mod memory;
pub mod postgres;
pub mod redis;
pub mod sqlite;

use std::time::Duration;

use async_trait::async_trait;

use crate::storage::StorageError;

/// Locks that expire unless renewed. Only the owner can renew or release a lock.
#[async_trait]
pub trait LockStore: Send + Sync {
    /// Takes `key` for `owner` unless someone else holds it; `true` if `owner` holds it now.
    async fn acquire(&self, key: &str, owner: &str, ttl: Duration) -> Result<bool, StorageError>;

    /// Extends `owner`'s hold on `key` to `ttl` from now; `false` if `owner` does not hold it.
    async fn renew(&self, key: &str, owner: &str, ttl: Duration) -> Result<bool, StorageError>;

    /// Lets go of `key`; `false` if `owner` did not hold it.
    async fn release(&self, key: &str, owner: &str) -> Result<bool, StorageError>;

    /// Who holds `key` now, if anyone.
    async fn owner(&self, key: &str) -> Result<Option<String>, StorageError>;
}
