//! In-memory lock store, for tests and single-process runs.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;

use super::LockStore;
use crate::storage::StorageError;
use crate::time::Timestamp;

/// Locks in this process. Clones share them.
#[derive(Clone, Default)]
pub struct MemoryLockStore {
    locks: Arc<Mutex<HashMap<String, Held>>>,
}

struct Held {
    owner: String,
    expires_at: Timestamp,
}

impl MemoryLockStore {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, Held>> {
        self.locks
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The live hold on `key`, dropping an expired one.
    fn held<'a>(locks: &'a mut HashMap<String, Held>, key: &str) -> Option<&'a mut Held> {
        let now = Timestamp::now();
        if locks.get(key).is_some_and(|held| held.expires_at <= now) {
            locks.remove(key);
        }
        locks.get_mut(key)
    }
}

#[async_trait]
impl LockStore for MemoryLockStore {
    async fn acquire(&self, key: &str, owner: &str, ttl: Duration) -> Result<bool, StorageError> {
        let mut locks = self.lock();
        if let Some(held) = Self::held(&mut locks, key) {
            return Ok(held.owner == owner);
        }
        let held = Held {
            owner: owner.to_owned(),
            expires_at: Timestamp::now().saturating_add(ttl),
        };
        locks.insert(key.to_owned(), held);
        Ok(true)
    }

    async fn renew(&self, key: &str, owner: &str, ttl: Duration) -> Result<bool, StorageError> {
        let mut locks = self.lock();
        match Self::held(&mut locks, key) {
            Some(held) if held.owner == owner => {
                held.expires_at = Timestamp::now().saturating_add(ttl);
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    async fn release(&self, key: &str, owner: &str) -> Result<bool, StorageError> {
        let mut locks = self.lock();
        let owned = Self::held(&mut locks, key).is_some_and(|held| held.owner == owner);
        if owned {
            locks.remove(key);
        }
        Ok(owned)
    }

    async fn owner(&self, key: &str) -> Result<Option<String>, StorageError> {
        let mut locks = self.lock();
        Ok(Self::held(&mut locks, key).map(|held| held.owner.clone()))
    }
}
