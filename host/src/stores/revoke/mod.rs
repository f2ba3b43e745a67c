//! The revoke store: which tasks must not run (or must stop running).

pub mod memory;
pub mod postgres;
pub mod redis;
pub mod sqlite;

use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::storage::StorageError;
use crate::time::Timestamp;

/// One revoked task.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revocation {
    pub task_id: String,
    /// Stop the task if it is running, not only skip it if it has not started.
    pub terminate: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub revoked_at: Timestamp,
    /// Forgotten after this time.
    pub expires_at: Timestamp,
}

impl Revocation {
    /// A revocation made now that lasts `ttl`.
    pub fn new(task_id: impl Into<String>, terminate: bool, ttl: Duration) -> Revocation {
        let now = Timestamp::now();
        Revocation {
            task_id: task_id.into(),
            terminate,
            reason: None,
            revoked_at: now,
            expires_at: now.saturating_add(ttl),
        }
    }
}

/// Persistent revocations. Revoking a task again replaces its revocation.
#[async_trait]
pub trait RevokeStore: Send + Sync {
    async fn revoke(&self, revocation: &Revocation) -> Result<(), StorageError>;

    /// The task's revocation, unless there is none or it expired.
    async fn get(&self, task_id: &str) -> Result<Option<Revocation>, StorageError>;

    /// The revocations of many tasks at once, in the order of `task_ids`.
    async fn get_many(&self, task_ids: &[String]) -> Result<Vec<Option<Revocation>>, StorageError> {
        let mut found = Vec::with_capacity(task_ids.len());
        for task_id in task_ids {
            found.push(self.get(task_id).await?);
        }
        Ok(found)
    }

    /// Revocations made at or after `since` that have not expired, oldest first. Workers poll
    /// this to learn of revocations of tasks they are running. Adapters may list only the
    /// last hour's; [`RevokeStore::get`] finds older ones.
    async fn list_since(&self, since: Timestamp) -> Result<Vec<Revocation>, StorageError>;

    /// Withdraws a revocation; `false` if there was none.
    async fn remove(&self, task_id: &str) -> Result<bool, StorageError>;
}
