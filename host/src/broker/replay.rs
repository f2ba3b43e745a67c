//! Replaying dead letters as new runs, for `dlq replay` and the dashboard alike.

use serde::Serialize;

use super::{Broker, DeadLetterQuery, ReplayReport};
use crate::backend::{ResultBackend, TaskState, TaskStatus};
use crate::signing::SIGNATURE_INVALID;
use crate::storage::StorageError;

/// What [`replay`] did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Replayed {
    #[serde(flatten)]
    pub report: ReplayReport,
    /// Dead letters refused as `signature-invalid`, left in place.
    pub left_invalid: usize,
}

/// Publishes the dead letters `query` selects again, each as attempt 1. A task's terminal
/// status is first replaced by `pending`, or the worker would take the new delivery for a
/// duplicate of a finished task and skip it; a task that succeeded meanwhile keeps its
/// status. Letters refused as `signature-invalid` stay unless `include_invalid`.
pub async fn replay(
    broker: &dyn Broker,
    backend: &dyn ResultBackend,
    query: &DeadLetterQuery,
    include_invalid: bool,
) -> Result<Replayed, StorageError> {
    let mut selected = Vec::new();
    let mut left_invalid = 0;
    for letter in broker.dead_letters(query).await? {
        if !include_invalid && letter.reason.starts_with(SIGNATURE_INVALID) {
            left_invalid += 1;
            continue;
        }
        if let Ok(envelope) = letter.replay_envelope()
            && backend
                .get(&envelope.id)
                .await?
                .is_none_or(|s| s.state != TaskState::Succeeded)
        {
            let status = TaskStatus {
                task: Some(envelope.task.clone()),
                ..TaskStatus::new(envelope.id.clone(), TaskState::Pending)
            };
            backend.replace(&status, None).await?;
        }
        selected.push(letter.id);
    }
    let report = match selected.is_empty() {
        true => ReplayReport::default(),
        false => {
            let query = DeadLetterQuery {
                queue: None,
                ids: selected,
                limit: None,
            };
            broker.replay_dead_letters(&query).await?
        }
    };
    Ok(Replayed {
        report,
        left_invalid,
    })
}
