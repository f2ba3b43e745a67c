//! In-memory revoke store, for tests and single-process runs.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;

use super::{Revocation, RevokeStore};
use crate::storage::StorageError;
use crate::time::Timestamp;

/// Revocations in this process. Clones share them.
#[derive(Clone, Default)]
pub struct MemoryRevokeStore {
    revocations: Arc<Mutex<HashMap<String, Revocation>>>,
}

impl MemoryRevokeStore {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, Revocation>> {
        self.revocations
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[async_trait]
impl RevokeStore for MemoryRevokeStore {
    async fn revoke(&self, revocation: &Revocation) -> Result<(), StorageError> {
        let now = Timestamp::now();
        let mut revocations = self.lock();
        revocations.retain(|_, r| r.expires_at > now);
        revocations.insert(revocation.task_id.clone(), revocation.clone());
        Ok(())
    }

    async fn get(&self, task_id: &str) -> Result<Option<Revocation>, StorageError> {
        let now = Timestamp::now();
        Ok(self
            .lock()
            .get(task_id)
            .filter(|r| r.expires_at > now)
            .cloned())
    }

    async fn list_since(&self, since: Timestamp) -> Result<Vec<Revocation>, StorageError> {
        let now = Timestamp::now();
        let mut found: Vec<Revocation> = self
            .lock()
            .values()
            .filter(|r| r.revoked_at >= since && r.expires_at > now)
            .cloned()
            .collect();
        found.sort_by(|a, b| {
            a.revoked_at
                .cmp(&b.revoked_at)
                .then_with(|| a.task_id.cmp(&b.task_id))
        });
        Ok(found)
    }

    async fn remove(&self, task_id: &str) -> Result<bool, StorageError> {
        Ok(self.lock().remove(task_id).is_some())
    }
}
