//! In-memory component registry, for tests and single-process runs.

use std::collections::{BTreeMap, BTreeSet, HashMap};
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
    grants: HashMap<String, BTreeSet<String>>,
    signatures: HashMap<String, BTreeMap<String, String>>,
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

    async fn grant(&self, name: &str, grant: &str) -> Result<bool, StorageError> {
        Ok(self
            .lock()
            .grants
            .entry(name.to_owned())
            .or_default()
            .insert(grant.to_owned()))
    }

    async fn revoke_grant(&self, name: &str, grant: &str) -> Result<bool, StorageError> {
        let mut state = self.lock();
        let Some(grants) = state.grants.get_mut(name) else {
            return Ok(false);
        };
        let removed = grants.remove(grant);
        if grants.is_empty() {
            state.grants.remove(name);
        }
        Ok(removed)
    }

    async fn grants(&self, name: &str) -> Result<Vec<String>, StorageError> {
        Ok(self
            .lock()
            .grants
            .get(name)
            .map(|grants| grants.iter().cloned().collect())
            .unwrap_or_default())
    }

    async fn add_signature(
        &self,
        digest: &str,
        key_id: &str,
        signature: &str,
    ) -> Result<(), StorageError> {
        self.lock()
            .signatures
            .entry(digest.to_owned())
            .or_default()
            .insert(key_id.to_owned(), signature.to_owned());
        Ok(())
    }

    async fn signatures(&self, digest: &str) -> Result<Vec<(String, String)>, StorageError> {
        Ok(self
            .lock()
            .signatures
            .get(digest)
            .map(|s| s.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
            .unwrap_or_default())
    }
}
