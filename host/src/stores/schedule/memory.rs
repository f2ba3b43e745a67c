//! In-memory schedule store, for tests and single-process runs.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;

use super::{ScheduleEntry, ScheduleStore, select_due};
use crate::storage::StorageError;
use crate::time::Timestamp;

/// Schedule entries in this process. Clones share them.
#[derive(Clone, Default)]
pub struct MemoryScheduleStore {
    entries: Arc<Mutex<BTreeMap<String, ScheduleEntry>>>,
}

impl MemoryScheduleStore {
    fn lock(&self) -> MutexGuard<'_, BTreeMap<String, ScheduleEntry>> {
        self.entries
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[async_trait]
impl ScheduleStore for MemoryScheduleStore {
    async fn get(&self, id: &str) -> Result<Option<ScheduleEntry>, StorageError> {
        Ok(self.lock().get(id).cloned())
    }

    async fn list(&self) -> Result<Vec<ScheduleEntry>, StorageError> {
        Ok(self.lock().values().cloned().collect())
    }

    async fn due(
        &self,
        before: Timestamp,
        limit: usize,
    ) -> Result<Vec<ScheduleEntry>, StorageError> {
        Ok(select_due(self.lock().values().cloned(), before, limit))
    }

    async fn save_many(&self, entries: &[ScheduleEntry]) -> Result<Vec<bool>, StorageError> {
        let mut stored = self.lock();
        Ok(entries
            .iter()
            .map(|entry| {
                let current = stored.get(&entry.id).map_or(0, |e| e.revision);
                let written = current == entry.revision;
                if written {
                    stored.insert(entry.id.clone(), entry.next_revision());
                }
                written
            })
            .collect())
    }

    async fn remove(&self, id: &str) -> Result<bool, StorageError> {
        Ok(self.lock().remove(id).is_some())
    }
}
