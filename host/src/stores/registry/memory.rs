//! In-memory component registry, for tests and single-process runs.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;

use super::{ComponentRegistry, TaskVersion};
use crate::storage::StorageError;
use crate::task::TaskDefinition;
use crate::time::Timestamp;

/// Components in this process. Clones share them.
#[derive(Clone, Default)]
pub struct MemoryRegistry {
    state: Arc<Mutex<State>>,
}

#[derive(Default)]
struct State {
    components: HashMap<String, Arc<Vec<u8>>>,
    versions: BTreeMap<String, Vec<TaskVersion>>,
}

impl MemoryRegistry {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[async_trait]
impl ComponentRegistry for MemoryRegistry {
    async fn put_component(&self, digest: &str, bytes: &[u8]) -> Result<bool, StorageError> {
        let mut state = self.lock();
        if state
            .components
            .get(digest)
            .is_some_and(|stored| stored.as_slice() == bytes)
        {
            return Ok(false);
        }
        state
            .components
            .insert(digest.to_owned(), Arc::new(bytes.to_vec()));
        Ok(true)
    }

    async fn component(&self, digest: &str) -> Result<Option<Vec<u8>>, StorageError> {
        Ok(self
            .lock()
            .components
            .get(digest)
            .map(|bytes| bytes.to_vec()))
    }

    async fn register(
        &self,
        digest: &str,
        definitions: &[TaskDefinition],
    ) -> Result<Vec<TaskVersion>, StorageError> {
        let now = Timestamp::now();
        let mut state = self.lock();
        let mut current = Vec::new();
        for definition in definitions {
            let versions = state.versions.entry(definition.name.clone()).or_default();
            if versions.last().is_none_or(|latest| latest.digest != digest) {
                versions.push(TaskVersion {
                    name: definition.name.clone(),
                    version: versions.last().map_or(1, |latest| latest.version + 1),
                    digest: digest.to_owned(),
                    definition: definition.clone(),
                    uploaded_at: now,
                });
            }
            current.extend(versions.last().cloned());
        }
        Ok(current)
    }

    async fn task(&self, name: &str) -> Result<Option<TaskVersion>, StorageError> {
        Ok(self
            .lock()
            .versions
            .get(name)
            .and_then(|v| v.last().cloned()))
    }

    async fn tasks(&self) -> Result<Vec<TaskVersion>, StorageError> {
        Ok(self
            .lock()
            .versions
            .values()
            .filter_map(|v| v.last().cloned())
            .collect())
    }

    async fn versions(&self, name: &str) -> Result<Vec<TaskVersion>, StorageError> {
        Ok(self.lock().versions.get(name).cloned().unwrap_or_default())
    }
}
