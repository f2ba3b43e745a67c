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
    async fn upsert(&self, entry: &ScheduleEntry) -> Result<(), StorageError> {
        self.lock().insert(entry.id.clone(), entry.clone());
        Ok(())
    }

    async fn get(&self, id: &str) -> Result<Option<ScheduleEntry>, StorageError> {
        Ok(self.lock().get(id).cloned())
    }

    async fn list(&self) -> Result<Vec<ScheduleEntry>, StorageError> {
        Ok(self.lock().values().cloned().collect())
    }

    async fn remove(&self, id: &str) -> Result<bool, StorageError> {
        Ok(self.lock().remove(id).is_some())
    }

    async fn due(&self, now: Timestamp, limit: usize) -> Result<Vec<ScheduleEntry>, StorageError> {
        Ok(select_due(self.lock().values().cloned(), now, limit))
    }

    async fn mark_run(
        &self,
        id: &str,
        expected_next_run: Timestamp,
        ran_at: Timestamp,
        next_run_at: Timestamp,
    ) -> Result<bool, StorageError> {
        let mut entries = self.lock();
        match entries.get_mut(id) {
            Some(entry) if entry.next_run_at == expected_next_run => {
                entry.last_run_at = Some(ran_at);
                entry.next_run_at = next_run_at;
                entry.total_runs += 1;
                Ok(true)
            }
            _ => Ok(false),
        }
    }
}
