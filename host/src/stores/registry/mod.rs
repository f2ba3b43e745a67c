//! The component registry: component bytes by sha256, and which component implements each
//! task name, with a version per change.
//!
//! Uploading a component stores its bytes under their digest and maps every task it declares
//! to that digest. Uploading a changed component makes a new version of each of its tasks;
//! uploading the same bytes again changes nothing. Workers look the current version up per
//! delivery (with a short cache), fetch the bytes by digest and verify them, so a new version
//! reaches running workers without a restart.
//!
//! The registry also keeps what every worker must agree on about a task beyond its code: the
//! operator's grants per task name (the text form of a [`crate::capabilities::Grant`]), which
//! outlive versions, and signatures of component digests (`task upload --sign`).

pub mod memory;
pub mod postgres;
pub mod redis;
pub mod sqlite;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::storage::StorageError;
use crate::task::TaskDefinition;
use crate::time::Timestamp;

/// One version of one task: the component that implements it and what it declares.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskVersion {
    pub name: String,
    /// 1 for the first upload; each upload with a different component adds one.
    pub version: u32,
    /// sha256 of the component, lower-case hex.
    pub digest: String,
    pub definition: TaskDefinition,
    pub uploaded_at: Timestamp,
}

/// Components and the task names they implement.
#[async_trait]
pub trait ComponentRegistry: Send + Sync {
    /// Stores component bytes under `digest` (their sha256, which the caller verified).
    /// Storing the same bytes again changes nothing; different bytes under a known digest (a
    /// damaged copy) are replaced. Returns whether anything was written.
    async fn put_component(&self, digest: &str, bytes: &[u8]) -> Result<bool, StorageError>;

    /// The bytes stored under `digest`, as stored: the caller verifies them.
    async fn component(&self, digest: &str) -> Result<Option<Vec<u8>>, StorageError>;

    /// Maps each definition's task name to `digest`, atomically. A name whose current version
    /// has another digest gets a new version. Returns the current version of each name.
    async fn register(
        &self,
        digest: &str,
        definitions: &[TaskDefinition],
    ) -> Result<Vec<TaskVersion>, StorageError>;

    /// The current version of a task.
    async fn task(&self, name: &str) -> Result<Option<TaskVersion>, StorageError>;

    /// The current version of every task, by name.
    async fn tasks(&self) -> Result<Vec<TaskVersion>, StorageError>;

    /// Every version of a task, oldest first.
    async fn versions(&self, name: &str) -> Result<Vec<TaskVersion>, StorageError>;

    /// Grants `grant` (a grant's text form) to task `name`, whichever version is current.
    /// Returns whether it was new.
    async fn grant(&self, name: &str, grant: &str) -> Result<bool, StorageError>;

    /// Takes a grant back; returns whether the task had it.
    async fn revoke_grant(&self, name: &str, grant: &str) -> Result<bool, StorageError>;

    /// The grants of task `name`, sorted.
    async fn grants(&self, name: &str) -> Result<Vec<String>, StorageError>;

    /// Records a signature of component `digest` by the key `key_id`, replacing an earlier one
    /// by the same key.
    async fn add_signature(
        &self,
        digest: &str,
        key_id: &str,
        signature: &str,
    ) -> Result<(), StorageError>;

    /// The signatures of component `digest`, as (key id, signature), sorted by key id.
    async fn signatures(&self, digest: &str) -> Result<Vec<(String, String)>, StorageError>;
}
