//! The in-memory result backend: one process, nothing survives it. For tests and demos.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::Notify;

use super::{
    CanvasRecord, GroupProgress, GroupRecord, ResultBackend, StatusQuery, TaskStatus, Ttls,
    WorkerHeartbeat, is_final,
};
use crate::broker::DEFAULT_NAMESPACE;
use crate::storage::StorageError;
use crate::time::Timestamp;

/// Expired records are dropped on read, and all of them every this many writes.
const SWEEP_EVERY_WRITES: u64 = 1024;

/// A handle on in-memory results. Clones and [`MemoryBackend::with_namespace`] share storage.
#[derive(Clone)]
pub struct MemoryBackend {
    shared: Arc<Shared>,
    namespace: String,
    ttls: Ttls,
}

#[derive(Default)]
struct Shared {
    state: Mutex<State>,
    /// Woken on every status change, for [`ResultBackend::wait`].
    changed: Notify,
}

type Key = (String, String);

#[derive(Default)]
struct State {
    writes: u64,
    statuses: HashMap<Key, Expiring<TaskStatus>>,
    groups: HashMap<Key, Expiring<GroupRecord>>,
    canvases: HashMap<Key, Expiring<CanvasRecord>>,
    heartbeats: HashMap<Key, Expiring<WorkerHeartbeat>>,
}

struct Expiring<T> {
    value: T,
    expires_at: Option<Timestamp>,
}

impl<T> Expiring<T> {
    fn live(&self, now: Timestamp) -> bool {
        self.expires_at.is_none_or(|at| at > now)
    }
}

impl State {
    fn put(
        &mut self,
        key: Key,
        status: &TaskStatus,
        expires_at: Option<Timestamp>,
        now: Timestamp,
    ) {
        let value = status.clone();
        self.statuses.insert(key, Expiring { value, expires_at });
        self.wrote(now);
    }

    fn wrote(&mut self, now: Timestamp) {
        self.writes += 1;
        if self.writes.is_multiple_of(SWEEP_EVERY_WRITES) {
            self.statuses.retain(|_, s| s.live(now));
            self.groups.retain(|_, g| g.live(now));
            self.canvases.retain(|_, c| c.live(now));
            self.heartbeats.retain(|_, h| h.live(now));
        }
    }
}

impl Default for MemoryBackend {
    fn default() -> MemoryBackend {
        MemoryBackend::new(Ttls::default())
    }
}

impl MemoryBackend {
    pub fn new(ttls: Ttls) -> MemoryBackend {
        MemoryBackend {
            shared: Arc::default(),
            namespace: DEFAULT_NAMESPACE.to_owned(),
            ttls,
        }
    }

    /// A handle on the same storage that sees only `namespace`.
    pub fn with_namespace(&self, namespace: &str) -> MemoryBackend {
        MemoryBackend {
            namespace: namespace.to_owned(),
            ..self.clone()
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.shared
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn key(&self, id: &str) -> Key {
        (self.namespace.clone(), id.to_owned())
    }

    fn group_mut<T>(
        &self,
        group_id: &str,
        change: impl FnOnce(&mut GroupRecord) -> T,
    ) -> Result<T, StorageError> {
        let now = Timestamp::now();
        let mut state = self.lock();
        match state
            .groups
            .get_mut(&self.key(group_id))
            .filter(|g| g.live(now))
        {
            Some(group) => Ok(change(&mut group.value)),
            None => Err(StorageError::NotFound(format!("group {group_id}"))),
        }
    }
}

#[async_trait]
impl ResultBackend for MemoryBackend {
    async fn set_many(
        &self,
        statuses: &[TaskStatus],
        ttl: Option<Duration>,
    ) -> Result<Vec<bool>, StorageError> {
        let now = Timestamp::now();
        let expires_at = self.ttls.result_expiry(ttl, now);
        let mut state = self.lock();
        let mut written = Vec::with_capacity(statuses.len());
        for status in statuses {
            let key = self.key(&status.id);
            let terminal = state
                .statuses
                .get(&key)
                .is_some_and(|s| s.live(now) && s.value.state.is_terminal());
            if !terminal {
                state.put(key, status, expires_at, now);
            }
            written.push(!terminal);
        }
        drop(state);
        self.shared.changed.notify_waiters();
        Ok(written)
    }

    async fn replace(
        &self,
        status: &TaskStatus,
        ttl: Option<Duration>,
    ) -> Result<(), StorageError> {
        let now = Timestamp::now();
        let mut state = self.lock();
        let expires_at = self.ttls.result_expiry(ttl, now);
        state.put(self.key(&status.id), status, expires_at, now);
        drop(state);
        self.shared.changed.notify_waiters();
        Ok(())
    }

    async fn get(&self, id: &str) -> Result<Option<TaskStatus>, StorageError> {
        let now = Timestamp::now();
        let state = self.lock();
        Ok(state
            .statuses
            .get(&self.key(id))
            .filter(|s| s.live(now))
            .map(|s| s.value.clone()))
    }

    async fn wait(&self, id: &str, timeout: Duration) -> Result<Option<TaskStatus>, StorageError> {
        // Every write in this process notifies, so there is nothing to poll for.
        crate::wait::until(
            &self.shared.changed,
            timeout,
            timeout,
            || self.get(id),
            is_final,
        )
        .await
    }

    async fn list(&self, query: &StatusQuery) -> Result<Vec<TaskStatus>, StorageError> {
        let now = Timestamp::now();
        let state = self.lock();
        let mut found: Vec<TaskStatus> = state
            .statuses
            .iter()
            .filter(|((ns, _), s)| *ns == self.namespace && s.live(now) && query.selects(&s.value))
            .map(|(_, s)| s.value.clone())
            .collect();
        found.sort_by(TaskStatus::newest_first);
        found.truncate(query.limit);
        Ok(found)
    }

    async fn create_group(
        &self,
        group: &GroupRecord,
        ttl: Option<Duration>,
    ) -> Result<bool, StorageError> {
        let now = Timestamp::now();
        let key = self.key(&group.id);
        let mut state = self.lock();
        if state.groups.get(&key).is_some_and(|g| g.live(now)) {
            return Ok(false);
        }
        state.groups.insert(
            key,
            Expiring {
                value: group.clone(),
                expires_at: Some(now.saturating_add(ttl.unwrap_or(self.ttls.group))),
            },
        );
        state.wrote(now);
        Ok(true)
    }

    async fn get_group(&self, id: &str) -> Result<Option<GroupRecord>, StorageError> {
        let now = Timestamp::now();
        let state = self.lock();
        Ok(state
            .groups
            .get(&self.key(id))
            .filter(|g| g.live(now))
            .map(|g| g.value.clone()))
    }

    async fn group_member_finished(
        &self,
        group_id: &str,
        task_id: &str,
    ) -> Result<GroupProgress, StorageError> {
        self.group_mut(group_id, |group| {
            if !group.finished.iter().any(|id| id == task_id) {
                group.finished.push(task_id.to_owned());
            }
            GroupProgress {
                finished: u32::try_from(group.finished.len()).unwrap_or(u32::MAX),
                size: group.size,
            }
        })
    }

    async fn save_canvas(
        &self,
        canvas: &CanvasRecord,
        ttl: Option<Duration>,
    ) -> Result<Option<CanvasRecord>, StorageError> {
        let now = Timestamp::now();
        let key = self.key(&canvas.id);
        let mut state = self.lock();
        if let Some(stored) = state.canvases.get(&key).filter(|c| c.live(now)) {
            return Ok(Some(stored.value.clone()));
        }
        state.canvases.insert(
            key,
            Expiring {
                value: canvas.clone(),
                expires_at: Some(now.saturating_add(ttl.unwrap_or(self.ttls.group))),
            },
        );
        state.wrote(now);
        Ok(None)
    }

    async fn get_canvas(&self, id: &str) -> Result<Option<CanvasRecord>, StorageError> {
        let now = Timestamp::now();
        let state = self.lock();
        Ok(state
            .canvases
            .get(&self.key(id))
            .filter(|c| c.live(now))
            .map(|c| c.value.clone()))
    }

    async fn heartbeat(
        &self,
        heartbeat: &WorkerHeartbeat,
        ttl: Option<Duration>,
    ) -> Result<(), StorageError> {
        let now = Timestamp::now();
        let mut state = self.lock();
        state.heartbeats.insert(
            self.key(&heartbeat.worker_id),
            Expiring {
                value: heartbeat.clone(),
                expires_at: Some(now.saturating_add(ttl.unwrap_or(self.ttls.heartbeat))),
            },
        );
        state.wrote(now);
        Ok(())
    }

    async fn workers(&self) -> Result<Vec<WorkerHeartbeat>, StorageError> {
        let now = Timestamp::now();
        let state = self.lock();
        let mut workers: Vec<WorkerHeartbeat> = state
            .heartbeats
            .iter()
            .filter(|((ns, _), h)| *ns == self.namespace && h.live(now))
            .map(|(_, h)| h.value.clone())
            .collect();
        workers.sort_by(|a, b| a.worker_id.cmp(&b.worker_id));
        Ok(workers)
    }
}
